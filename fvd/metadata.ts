/// <reference lib="es2024.sharedmemory" />
/**
 * Loading an image's metadata — the one implementation behind every opener of an FVD image file:
 * the engine (FvdImage.fromParts, fvd/image.ts) and offline maintenance (OfflineImage,
 * fvd/maintenance/offline-image.ts). Both used to carry their own copy, and the copies disagreed:
 * after a crash the engine accepted a table entry past the end of the file (FORMAT.md §4.3) and
 * offline maintenance refused the same image as truncated. One loader, one rule.
 *
 * The steps, in the order an opener runs them (the engine opens the base between steps 3 and 4):
 *   1. readHeaderPage — the header sector and the rest of the first page (base path, identity);
 *   2. unlockKey — the key is checked before anything else is read or written (§11.2);
 *   3. readBaseReference — the base path and identity, checksums verified (§2, §2.2);
 *   4. readMaps — bitmap, lookup table, journal replay in memory (§6.4), table checks (§4.3).
 * A writer that replayed the journal persists the result with coverMappedChunks (§4.3: the file
 * is extended over chunks mapped past its end) and then writeCheckpoint (§6.4 order).
 */
import type { BlockFile } from './io.js';
import { CorruptImageError, FvdError } from './errors.js';
import { BASE_NONE, BASE_PATH_OFFSET, CHUNK_EMPTY, HEADER_SIZE, INCOMPAT_COMPACT, INCOMPAT_DIRTY, INCOMPAT_ENCRYPTED, PAGE, crc, decodeHeader, type Header } from './format.js';
import { newBitmap, setRange } from './bitmap.js';
import { replayJournal, type JournalSink } from './journal.js';
import { KeyError, parseCryptFields, unlock, type XtsCipher } from './crypto.js';

/** Step 1: the header (decoded and checked against the file's size) and the whole first page. */
export async function readHeaderPage(imagePath: string, file: BlockFile): Promise<{ first: Uint8Array; header: Header }> {
  const first = new Uint8Array(PAGE);
  await file.read(first, 0);
  return { first, header: decodeHeader(imagePath, first.subarray(0, HEADER_SIZE), file.size()) };
}

export interface KeyOptions {
  /** Key material of an encrypted image; refused for an unencrypted one. */
  key?: Uint8Array;
  /** Without `key`: open an encrypted image for metadata only (no cipher), instead of refusing. */
  withoutKey?: boolean;
}

/**
 * Step 2: the data cipher of an image being opened (null when unencrypted, or encrypted and opened
 * withoutKey). Damaged key fields are reported even without the key. An encrypted image cannot
 * serve as a base (`isBase`): its overlays would need its key.
 */
export async function unlockKey(imagePath: string, header: Header, options: KeyOptions, isBase = false): Promise<XtsCipher | null> {
  if (!(header.incompatible & INCOMPAT_ENCRYPTED)) {
    if (options.key) throw new KeyError(`${imagePath}: the image is not encrypted, but a key was given`);
    return null;
  }
  if (isBase) throw new FvdError(`${imagePath}: the image is encrypted; an encrypted image cannot be a base image`, 'EINVAL');
  if (options.key) return unlock(imagePath, header.crypt!, options.key);
  parseCryptFields(imagePath, header.crypt!);
  if (options.withoutKey) return null;
  throw new KeyError(`${imagePath}: the image is encrypted: its key is needed (--key-file PATH, or --key-file - for stdin)`);
}

/** The base as the image names it: its path, and the identity recorded after it (§2.2) or null. */
export interface BaseReference {
  path: string;
  identity: string | null;
}

/** Step 3: the base path and identity from the first page, checksums verified; null without a base. */
export function readBaseReference(imagePath: string, first: Uint8Array, header: Header): BaseReference | null {
  if (header.baseFormat === BASE_NONE) return null;
  const at = header.basePathOffset || BASE_PATH_OFFSET;
  const bytes = first.subarray(at, at + header.basePathLength);
  if (crc(bytes) !== header.basePathCrc) throw new CorruptImageError(imagePath, 'base path checksum mismatch');
  return { path: Buffer.from(bytes).toString('utf8'), identity: readBaseIdentity(imagePath, first, header) };
}

/** The base identity after the base path (FORMAT.md §2.2), or null when none is recorded. */
function readBaseIdentity(imagePath: string, first: Uint8Array, header: Header): string | null {
  const n = header.baseIdentityLength ?? 0;
  if (!n) return null;
  const at = (header.basePathOffset || BASE_PATH_OFFSET) + header.basePathLength;
  const bytes = first.subarray(at, at + n);
  if (crc(bytes) !== header.baseIdentityCrc) throw new CorruptImageError(imagePath, 'base identity checksum mismatch');
  return Buffer.from(bytes).toString('utf8');
}

/** The bitmap and table as the image reads them: in place, with the journal replayed over them. */
export interface Maps {
  /** The bitmap region's bytes (at least one byte when `shared`). */
  bitmap: Uint8Array;
  /**
   * One entry per chunk of the virtual disk, or null in raw-like layout. Its `buffer` is the whole
   * table region (table_length bytes), as read and replayed: padding past the last chunk included.
   */
  table: Uint32Array | null;
  /** DIRTY was set: the journal was replayed into `bitmap` and `table` (in memory only). */
  dirty: boolean;
  /** Records applied by `afterReplay` (the pending log), in memory only. */
  appliedPending: number;
  /** The first sequence number after the replayed log (journal_start_seq when clean). */
  nextSeq: number;
  /** Journal sectors replayed. */
  replayedSectors: number;
}

/**
 * Step 4: reads the bitmap and table, replays the journal of a dirty image into them (in memory:
 * persisting it is the writer's business, see coverMappedChunks and writeCheckpoint) and checks
 * the table. `shared`: allocate both on SharedArrayBuffers (the engine's queue workers map
 * requests through them without copies).
 */
export async function readMaps(
  imagePath: string,
  file: BlockFile,
  header: Header,
  options: {
    shared?: boolean;
    /**
     * After the journal replay of a dirty image, before the table checks: applies more records
     * (the volatile pending log, fvd/pending-log.ts) through the same validating sink. Returns
     * how many it applied.
     */
    afterReplay?: (sink: JournalSink) => number;
  } = {},
): Promise<Maps> {
  const bitmap = options.shared ? newBitmap(header.bitmapLength) : new Uint8Array(header.bitmapLength);
  if (header.bitmapLength) await file.read(bitmap.subarray(0, header.bitmapLength), header.bitmapOffset);
  let table: Uint32Array | null = null;
  if (header.incompatible & INCOMPAT_COMPACT) {
    // The table is little-endian on disk; so is every platform this runs on (x86-64, arm64).
    // Only the entries are read: readers ignore the padding (FORMAT.md §4.2).
    table = options.shared ? growableTable(header) : new Uint32Array(chunksOf(header));
    await file.read(new Uint8Array(table.buffer, 0, table.length * 4), header.tableOffset);
  }
  const dirty = (header.incompatible & INCOMPAT_DIRTY) !== 0n;
  let nextSeq = header.journalStartSeq;
  let replayedSectors = 0;
  let appliedPending = 0;
  if (dirty) {
    const baseBlocks = Math.ceil(Math.min(header.baseSize, header.virtualSize) / header.blockSize);
    const sink: JournalSink = {
      bitmapSet(firstBlock, count) {
        // Writers log bits of base blocks only (below min(base size, virtual size)).
        if (firstBlock + count > baseBlocks || count === 0)
          throw new CorruptImageError(imagePath, `journal bitmap record for blocks ${firstBlock}+${count} out of range`);
        setRange(bitmap, firstBlock, count);
      },
      tableSet(chunk, id) {
        if (!table || chunk >= table.length) throw new CorruptImageError(imagePath, `journal table record for chunk ${chunk} out of range`);
        table[chunk] = id;
      },
    };
    const r = await replayJournal(file, header.journalOffset, header.journalLength, header.journalStartSeq, sink);
    nextSeq = r.nextSeq;
    replayedSectors = r.sectors;
    if (options.afterReplay) appliedPending = options.afterReplay(sink);
  }
  // During an interrupted snapshot revert the in-place table may be torn: the engine replaces it
  // by the snapshot's saved table (validated there, fvd/snapshot.ts), so it is not checked here.
  if (table && !header.revertSnapshotId) validateTable(imagePath, table, header, file, dirty);
  return { bitmap, table, dirty, nextSeq, replayedSectors, appliedPending };
}

/**
 * The served engine's table: a length-tracking view of a growable SharedArrayBuffer holding
 * exactly the chunk count's entries, so a served image grows it in place (FvdImage.growOnline)
 * and every holder — mapping layouts, allocator, the queue workers' cloned views — sees the new
 * length at once. It can grow up to data_offset (the table never moves while served); only the
 * pages it uses are committed.
 */
export function growableTable(header: Header): Uint32Array {
  const bytes = chunksOf(header) * 4;
  return new Uint32Array(new SharedArrayBuffer(bytes, { maxByteLength: Math.max(bytes, maxTableEntries(header) * 4) }));
}

/** The most entries the table can hold at its offset, up to data_offset (it never moves while served). */
export function maxTableEntries(header: Header): number {
  return Math.floor((header.dataOffset - header.tableOffset) / 4);
}

/** Chunks of the virtual disk: entries of the lookup table that mean something. */
export function chunksOf(header: Header): number {
  return Math.ceil(header.virtualSize / header.chunkSize);
}

/** The highest storage id `table` maps, or `floor` when that is higher (or nothing is mapped). */
export function highestMappedId(table: Uint32Array, floor: number): number {
  let max = floor;
  for (let c = 0; c < table.length; c++) if (table[c] !== CHUNK_EMPTY && table[c]! > max) max = table[c]!;
  return max;
}

/**
 * Table entries must point inside the data area and never share storage. After a crash
 * (`crashed`: DIRTY set) an entry may point past the end of a regular file (FORMAT.md §4.3: it
 * was logged before the chunk's first data write, which was lost); that storage reads as zeros.
 * In a cleanly closed image such an entry means the file was truncated: corrupt.
 */
function validateTable(imagePath: string, table: Uint32Array, header: Header, file: BlockFile, crashed: boolean): void {
  const maxId = file.isBlockDevice ? Math.floor((file.size() - header.dataOffset) / header.chunkSize) : Number.POSITIVE_INFINITY;
  const seen = new Set<number>();
  // Chunks past the end are allocated one after another from the end (§4.3), so after a crash
  // they lie below the file's chunk count plus the number of mapped entries.
  let mapped = 0;
  for (let c = 0; c < table.length; c++) if (table[c] !== CHUNK_EMPTY) mapped++;
  const pastEndLimit = Math.ceil(Math.max(0, file.size() - header.dataOffset) / header.chunkSize) + mapped;
  for (let c = 0; c < table.length; c++) {
    const id = table[c]!;
    if (id === CHUNK_EMPTY) continue;
    if (id >= maxId) throw new CorruptImageError(imagePath, `chunk ${c} maps to storage chunk ${id} beyond the end of the device`);
    if (!file.isBlockDevice && header.dataOffset + id * header.chunkSize >= file.size() && (!crashed || id >= pastEndLimit))
      throw new CorruptImageError(
        imagePath,
        `chunk ${c} maps to storage chunk ${id} beyond the end of the file (${crashed ? 'further than a crash can leave it' : 'truncated?'})`,
      );
    if (seen.has(id)) throw new CorruptImageError(imagePath, `storage chunk ${id} is mapped twice`);
    seen.add(id);
  }
}

/**
 * Recovery (FORMAT.md §4.3): extends a compact image file over chunks mapped past its end (their
 * first data write was lost in the crash), so that once DIRTY is cleared every mapped chunk lies
 * inside the file. Runs before the recovery checkpoint, whose first fdatasync makes it durable.
 * Only a chunk that starts at or past the end is "outside" (validateTable); a partly written last
 * chunk is inside and stays as thin as it is.
 */
export async function coverMappedChunks(file: BlockFile, header: Header, table: Uint32Array | null): Promise<void> {
  if (!table || file.isBlockDevice) return;
  const max = highestMappedId(table, -1);
  const start = header.dataOffset + max * header.chunkSize;
  if (max >= 0 && start >= file.size()) await file.truncate(start + header.chunkSize);
}

/**
 * The table region as a checkpoint writes it: a copy of the entries, the rest of the region
 * 0xFF (unmapped). Taken synchronously, so it holds exactly the entries of this moment.
 */
export function tableRegionOf(header: Header, table: Uint32Array): Uint8Array {
  const region = new Uint8Array(header.tableLength).fill(0xff);
  region.set(new Uint8Array(table.buffer, table.byteOffset, table.length * 4));
  return region;
}

/**
 * A checkpoint's writes in their order (FORMAT.md §6.4): fdatasync; the table in place, durable;
 * the bitmap in place, durable; then `writeHeader` (which writes the header moving
 * journal_start_seq, and makes it durable). The table goes first: a power cut between the two
 * writes may leave a new mapping without its bits (reads the base, as before), never bits
 * without their mapping. `table` from tableRegionOf, `bitmap` exactly bitmap_length bytes; both
 * snapshots the caller took before calling.
 */
export async function writeCheckpoint(
  file: BlockFile,
  header: Header,
  snapshot: { table: Uint8Array | null; bitmap: Uint8Array | null },
  writeHeader: () => Promise<void>,
): Promise<void> {
  await file.flush();
  if (snapshot.table) {
    await file.write(snapshot.table, header.tableOffset);
    await file.flush();
  }
  if (snapshot.bitmap) {
    await file.write(snapshot.bitmap, header.bitmapOffset);
    await file.flush();
  }
  await writeHeader();
}
