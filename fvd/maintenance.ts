/**
 * Offline maintenance of FVD images: `commit` (write an image's local blocks into its base and
 * empty it), `rebase` (change the base, copying what differs) and `resize` (grow or shrink the
 * virtual disk). docs/FORMAT.md §12 is the normative description, including the crash-safety
 * argument for every ordering below.
 *
 * Every operation holds the image's exclusive lock for its whole run, so a served image fails
 * with the usual "in use" error. Data moves through the engine (FvdImage), so that its bitmap,
 * lookup table and journal stay right; metadata that the engine never changes on its own (the
 * base fields, the sizes, where the regions lie) is switched here, on a *clean* image (journal
 * checkpointed, DIRTY clear), by writes that never touch a byte the live header gives meaning to,
 * followed by a single-sector header write — the one atomic step of each switch.
 *
 * Encrypted images (FORMAT.md §12.7): the key, if given, is checked right after the header;
 * data read here or through the engine is plaintext, and the engine encrypts what it stores.
 * Operations that read no data (rebase -u, growing, resize --shrink) work without the key.
 * Images with internal snapshots are refused, with the reason (FORMAT.md §12.6).
 */
import path from 'node:path';
import type { BlockFile, IoBackend } from './io.js';
import { FvdError } from './errors.js';
import {
  AUTOCLEAR_FULLY_LOCAL,
  AUTOCLEAR_KNOWN,
  BASE_FVD,
  BASE_NONE,
  BASE_PATH_OFFSET,
  BASE_QCOW2,
  BASE_RAW,
  CHUNK_EMPTY,
  COMPAT_ZERO_DETECTED,
  INCOMPAT_COMPACT,
  INCOMPAT_DIRTY,
  INCOMPAT_ENCRYPTED,
  INCOMPAT_SNAPSHOTS,
  MAX_BASE_PATH,
  MAX_METADATA_REGION,
  MAX_JOURNAL_SEQ,
  MAX_VIRTUAL_SIZE,
  MIN_JOURNAL_SIZE,
  PAGE,
  SECTOR,
  BASE_FORMAT_CHOICES,
  baseFormatCode,
  baseFormatName,
  bitmapBytes,
  crc,
  decodeHeader,
  encodeHeader,
  roundUp,
  tableBytes,
  type BaseFormat,
  type Header,
} from './format.js';
import { forEachClearRun, setRange, testBit } from './bitmap.js';
import { FvdImage, holeAt, openBase, type BaseImage, type OpenOptions } from './image.js';
import { STORED, mapRun, newRun, storageLayout, type MappingLayout } from './mapping.js';
import { chunksOf, coverMappedChunks, readBaseReference, readHeaderPage, readMaps, tableRegionOf, unlockKey, writeCheckpoint } from './metadata.js';
import { resolveBasePath } from './base-location.js';
import { KeyError, type XtsCipher } from './crypto.js';

/**
 * Incompatible features these operations know how to carry over (others: refuse, FORMAT.md
 * §12.6). ENCRYPTED needs nothing but its header bytes 176..303 carried across every header
 * write (they are part of `Header`): the XTS tweak is the guest sector, so data never has to be
 * re-encrypted when metadata moves.
 */
const MAINTENANCE_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_COMPACT | INCOMPAT_ENCRYPTED;

/** The op name under which commit opens an FVD base for writing (its refusals name it as a base). */
const COMMIT_BASE = 'commit-base';

/** Why each operation refuses internal snapshots (FORMAT.md §12.6): one line each. */
const SNAPSHOT_REFUSAL: Record<string, string> = {
  commit:
    'its snapshots read every block they do not hold through the base, so writing into the base would change what each snapshot holds; delete the snapshots first (fvd snapshot -d NAME)',
  rebase:
    'its snapshots read every block they do not hold through the base, so switching the base would change what each snapshot holds; delete the snapshots first (fvd snapshot -d NAME)',
  resize:
    'a snapshot can only be applied to a disk of the size it was taken at, its saved state is laid out for the current bitmap, and shrinking would free storage snapshots use; delete the snapshots first (fvd snapshot -d NAME)',
  [COMMIT_BASE]: 'writing into a base with snapshots is not supported; delete its snapshots first (fvd snapshot -d NAME)',
};
/** Data is compared and copied in windows of this many bytes (rounded to whole blocks). */
const WINDOW = 1024 * 1024;

// -----------------------------------------------------------------------------------------------
// The image file, offline

/**
 * One image file held with its exclusive lock, read at the metadata level: header, base path,
 * in-place bitmap and lookup table. After `ensureClean()` the on-disk metadata is authoritative
 * (journal replayed and checkpointed, DIRTY clear), which every metadata switch requires.
 */
class OfflineImage {
  header!: Header;
  basePath = '';
  /** The remote base's identity stored after the path (FORMAT.md §2.2), '' when none. */
  baseIdentity = '';
  /** The whole bitmap region (bitmap_length bytes). */
  bitmap!: Uint8Array;
  /**
   * One entry per chunk (ceil(virtual_size / chunk_size)), or null in raw-like layout; its
   * `buffer` is the whole table region (table_length bytes), padding included.
   */
  table: Uint32Array | null = null;
  private dirty = false;
  private replayedNextSeq = 0;
  /** ENCRYPTED: the data cipher, when the key was given (null: metadata-only work). */
  private xts: XtsCipher | null = null;

  private constructor(
    readonly path: string,
    readonly file: BlockFile,
    private readonly op: string,
    /** Key material for the engine opened by withEngine (it unlocks the image again). */
    private readonly key: Uint8Array | undefined,
  ) {}

  /**
   * Opens the image with its exclusive lock. `key`: its key material, checked here, after the
   * header and before anything else is read or written (as the engine does, FORMAT.md §11.2):
   * a wrong key, or a key for an unencrypted image, is refused with nothing changed. Without
   * it an encrypted image is opened for metadata work only (requireKey guards data access).
   */
  static async open(io: IoBackend, imagePath: string, op: string, key?: Uint8Array): Promise<OfflineImage> {
    const file = await io.open(imagePath, { lock: 'exclusive' });
    const img = new OfflineImage(imagePath, file, op, key);
    try {
      const page = await readHeaderPage(imagePath, file);
      img.checkHeader(page.header);
      // Without the key an encrypted image is opened for metadata work only (requireKey).
      img.xts = await unlockKey(imagePath, page.header, key ? { key } : { withoutKey: true });
      await img.load(page);
      return img;
    } catch (err) {
      img.xts?.destroy();
      await file.close();
      throw err;
    }
  }

  get encrypted(): boolean {
    return (this.header.incompatible & INCOMPAT_ENCRYPTED) !== 0n;
  }

  /** Throws the one-line KeyError when `what` needs the data of an image opened without its key. */
  requireKey(what: string): void {
    if (this.encrypted && !this.xts)
      throw new KeyError(`${this.path}: the image is encrypted: ${what} needs its key (--key-file PATH, or --key-file - for stdin)`);
  }

  /** This operation's refusals, decided from the header alone before anything is written (§12.6). */
  private checkHeader(h: Header): void {
    const op = this.op === COMMIT_BASE ? 'commit' : this.op;
    // Bases of other formats are read, never written (FORMAT.md §12.6, §13).
    if (this.op === 'commit' && h.baseFormat === BASE_QCOW2)
      throw new FvdError(`${this.path}: commit refuses an image over a qcow2 base: fvd reads qcow2 bases but never writes them (flatten with 'fvd convert' instead)`, 'EINVAL');
    if (h.incompatible & INCOMPAT_SNAPSHOTS)
      throw new FvdError(`${this.path}: ${op} refuses ${this.op === COMMIT_BASE ? 'a base' : 'an image'} with internal snapshots: ${SNAPSHOT_REFUSAL[this.op] ?? 'not supported'}`, 'EINVAL');
    const extra = h.incompatible & ~MAINTENANCE_INCOMPAT;
    if (extra) throw new FvdError(`${this.path}: ${op} does not support images with incompatible feature bits 0x${extra.toString(16)}`, 'EINVAL');
  }

  get compact(): boolean {
    return (this.header.incompatible & INCOMPAT_COMPACT) !== 0n;
  }

  get fullyLocal(): boolean {
    return (this.header.autoclear & AUTOCLEAR_FULLY_LOCAL) !== 0n;
  }

  /** Blocks with a meaningful bit under the current header. */
  get baseBlocks(): number {
    return baseBlocksOf(this.header);
  }

  /**
   * Reads (again) the on-disk state through the engine's loader (fvd/metadata.ts); a dirty
   * image's journal is replayed in memory only. `page`: the first page, when just read.
   */
  async load(page?: { first: Uint8Array; header: Header }): Promise<void> {
    const { first, header: h } = page ?? (await readHeaderPage(this.path, this.file));
    this.checkHeader(h);
    h.autoclear &= AUTOCLEAR_KNOWN; // a writer clears the autoclear bits it does not know
    const ref = readBaseReference(this.path, first, h);
    const maps = await readMaps(this.path, this.file, h);
    this.header = h;
    this.basePath = ref?.path ?? '';
    this.baseIdentity = ref?.identity ?? '';
    this.bitmap = maps.bitmap;
    this.table = maps.table;
    this.dirty = maps.dirty;
    this.replayedNextSeq = maps.nextSeq;
  }

  /**
   * Makes the on-disk metadata authoritative: if the image was not closed cleanly, extends the
   * file over chunks mapped past its end (FORMAT.md §4.3), then writes the replayed table and
   * bitmap in place and a clean header that empties the journal — the engine's recovery and
   * checkpoint (fvd/metadata.ts), with DIRTY cleared in the same header write.
   */
  async ensureClean(): Promise<void> {
    if (!this.dirty) return;
    const h = this.header;
    await coverMappedChunks(this.file, h, this.table);
    const snapshot = { table: this.table ? tableRegionOf(h, this.table) : null, bitmap: h.bitmapLength ? this.bitmap : null };
    await writeCheckpoint(this.file, h, snapshot, () =>
      this.writeHeader({ ...h, journalStartSeq: this.replayedNextSeq, incompatible: h.incompatible & ~INCOMPAT_DIRTY }),
    );
    this.dirty = false;
  }

  async writeHeader(h: Header): Promise<void> {
    selfCheck(this.path, h, this.file.size());
    await this.file.write(encodeHeader(h), 0);
    await this.file.flush();
    this.header = h;
  }

  /**
   * Reads bytes of the virtual disk from this image's own storage (never from the base), as
   * plaintext: an encrypted image's sectors are decrypted (whole sectors only; the tweak is the
   * guest sector, wherever the storage lies).
   */
  async readLocal(buf: Uint8Array, offset: number): Promise<void> {
    if (this.encrypted) {
      this.requireKey(`reading its data for ${this.op}`);
      await this.readStored(buf, offset);
      this.xts!.decrypt(buf, offset / SECTOR);
      return;
    }
    return this.readStored(buf, offset);
  }

  /** This image's own storage as the mapping rule sees it (fvd/mapping.ts): every block local. */
  private storageMap(): MappingLayout {
    const h = this.header;
    return storageLayout(h.dataOffset, h.blockSize, h.chunkSize, this.table);
  }

  /** The stored bytes (ciphertext for an encrypted image) of [offset, offset + buf.length). */
  private async readStored(buf: Uint8Array, offset: number): Promise<void> {
    const layout = this.storageMap();
    const run = newRun();
    const end = offset + buf.length;
    for (let pos = offset; pos < end; pos += run.length) {
      mapRun(layout, pos, end - pos, run);
      const sub = buf.subarray(pos - offset, pos - offset + run.length);
      if (run.kind === STORED) await this.file.read(sub, run.host);
      else sub.fill(0);
    }
  }

  /** This image's own storage for [offset, offset + length) is known to read zeros (unmapped, holes). */
  localKnownZero(offset: number, length: number): boolean {
    const layout = this.storageMap();
    const run = newRun();
    const end = offset + length;
    for (let pos = offset; pos < end; pos += run.length) {
      mapRun(layout, pos, end - pos, run);
      if (run.kind === STORED && !holeAt(this.file, run.host, run.host + run.length)) return false;
    }
    return true;
  }

  /** Makes this image's storage for [offset, offset + length) read as zeros (bits untouched). */
  async zeroLocal(offset: number, length: number): Promise<void> {
    const layout = this.storageMap();
    const run = newRun();
    const end = offset + length;
    for (let pos = offset; pos < end; pos += run.length) {
      mapRun(layout, pos, end - pos, run);
      if (run.kind === STORED) await this.file.zeroRange(run.host, run.length);
    }
  }

  /**
   * Runs `fn` on the engine opened over this same file descriptor (the lock stays held), then
   * closes the engine cleanly (checkpoint) and reloads the on-disk state.
   */
  async withEngine<T>(io: IoBackend, fn: (image: FvdImage) => Promise<T>, readOnly = false): Promise<T> {
    // An encrypted image's engine gets the key (and unlocks it again), or serves metadata only.
    const keyed: OpenOptions = this.encrypted ? (this.key ? { key: this.key } : { withoutKey: true }) : {};
    const image = await FvdImage.fromParts(io, this.path, borrowed(this.file), { copyOnRead: false, readOnly, ...keyed }, []);
    let result: T;
    try {
      result = await fn(image);
    } finally {
      await image.close();
    }
    await this.load();
    return result;
  }

  close(): Promise<void> {
    this.xts?.destroy(); // the key leaves memory with the image (FORMAT.md §11.2)
    return this.file.close();
  }
}

/** A BlockFile that shares `file` and leaves closing it to its owner. */
function borrowed(file: BlockFile): BlockFile {
  return {
    read: (b, o) => file.read(b, o),
    write: (b, o) => file.write(b, o),
    flush: () => file.flush(),
    zeroRange: (o, l) => file.zeroRange(o, l),
    size: () => file.size(),
    truncate: (l) => file.truncate(l),
    close: async () => {},
    isBlockDevice: file.isBlockDevice,
    readOnly: file.readOnly,
    path: file.path,
  };
}

function baseBlocksOf(h: Header): number {
  return Math.ceil(Math.min(h.baseSize, h.virtualSize) / h.blockSize);
}

/** A header this module is about to write must pass the reader's own checks (else: a bug). */
function selfCheck(imagePath: string, h: Header, fileSize: number): void {
  try {
    decodeHeader(imagePath, encodeHeader(h), fileSize);
  } catch (err) {
    throw new Error(`internal error: about to write an invalid header: ${(err as Error).message}`);
  }
}

function resolveFrom(imagePath: string, basePath: string): string {
  return resolveBasePath(imagePath, basePath);
}

function isZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

/** The maximal runs [first, last] of set bits within [from, to]. */
function setRuns(bm: Uint8Array, from: number, to: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let b = from; b <= to; ) {
    if (!testBit(bm, b)) {
      b++;
      continue;
    }
    let e = b;
    while (e + 1 <= to && testBit(bm, e + 1)) e++;
    out.push([b, e]);
    b = e + 1;
  }
  return out;
}

/** The maximal runs [first, last] of clear bits within [from, to]. */
function clearRuns(bm: Uint8Array, from: number, to: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  if (to >= from) forEachClearRun(bm, from, to, (b, e) => out.push([b, e]));
  return out;
}

/** Window size for a block size: whole blocks, about WINDOW bytes. */
function windowBytes(blockSize: number): number {
  return Math.max(1, Math.floor(WINDOW / blockSize)) * blockSize;
}

/** Splits block runs [first, last] into windows of at most WINDOW bytes: fn(b0, b1) in order. */
async function windows(first: number, last: number, blockSize: number, fn: (b0: number, b1: number) => Promise<void>): Promise<void> {
  const per = windowBytes(blockSize) / blockSize;
  for (let b = first; b <= last; b += per) await fn(b, Math.min(last, b + per - 1));
}

// -----------------------------------------------------------------------------------------------
// Metadata switch: layout planning, then the ordered writes

type Layout = Pick<Header, 'bitmapOffset' | 'bitmapLength' | 'tableOffset' | 'tableLength' | 'journalOffset' | 'journalLength'>;

interface LayoutPlan {
  layout: Layout;
  /** Where the table goes for the intermediate header when it has to move (two-step switch). */
  tempTable: number | null;
}

/**
 * Places bitmap, table and journal for a new virtual size / base size inside the space the image
 * already has before its data area (data_offset never moves: it addresses every byte of data).
 * The bitmap only grows; the table has the formula length; the journal follows and gives up room
 * if needed (FORMAT.md §12.2). Throws a clear error when the metadata cannot fit.
 */
function planLayout(op: string, imagePath: string, cur: Header, virtualSize: number, baseSize: number): LayoutPlan {
  const compact = (cur.incompatible & INCOMPAT_COMPACT) !== 0n;
  const need = bitmapBytes(Math.min(baseSize, virtualSize), cur.blockSize);
  const bitmapLength = Math.max(cur.bitmapLength, need);
  const tableLength = compact ? tableBytes(virtualSize, cur.chunkSize) : 0;
  if (bitmapLength > MAX_METADATA_REGION)
    throw new FvdError(`${op}: ${imagePath}: the bitmap would need ${bitmapLength} bytes (limit ${MAX_METADATA_REGION})`, 'EINVAL');
  if (tableLength > MAX_METADATA_REGION)
    throw new FvdError(`${op}: ${imagePath}: a ${virtualSize}-byte disk needs a ${tableLength}-byte lookup table at ${cur.chunkSize}-byte chunks (limit ${MAX_METADATA_REGION})`, 'EINVAL');
  const D = cur.dataOffset;
  const bitmapOffset = bitmapLength ? (cur.bitmapLength ? cur.bitmapOffset : PAGE) : 0;
  let pos = bitmapLength ? bitmapOffset + bitmapLength : PAGE;
  let tableOffset = 0;
  if (tableLength) {
    tableOffset = cur.tableOffset >= pos ? cur.tableOffset : pos;
    pos = tableOffset + tableLength;
  }
  if (pos > D)
    throw new FvdError(
      `${op}: ${imagePath}: not enough room for the metadata: bitmap ${bitmapLength} and lookup table ${tableLength} bytes must fit before the data area at ${D}`,
      'ENOSPC',
    );
  let journalOffset = 0;
  let journalLength = 0;
  if (cur.journalLength) {
    journalOffset = Math.max(pos, cur.journalOffset);
    journalLength = Math.min(cur.journalLength, Math.floor((D - journalOffset) / PAGE) * PAGE);
    if (journalLength < MIN_JOURNAL_SIZE) journalOffset = journalLength = 0;
  }
  let tempTable: number | null = null;
  if (tableLength && tableOffset !== cur.tableOffset) {
    // The new bitmap covers the live table: first move the table out of the way (step 1).
    tempTable = roundUp(Math.max(cur.tableOffset + cur.tableLength, tableOffset + tableLength), PAGE);
    if (tempTable + cur.tableLength > D)
      throw new FvdError(
        `${op}: ${imagePath}: not enough room to move the lookup table (${cur.tableLength} bytes) for a larger bitmap before the data area at ${D}`,
        'ENOSPC',
      );
  }
  return { layout: { bitmapOffset, bitmapLength, tableOffset, tableLength, journalOffset, journalLength }, tempTable };
}

interface PathPlan {
  bytes: Uint8Array;
  /** Where the new path is written before the header switch (0: no path bytes to write). */
  at: number;
  /** The path went elsewhere than 512: move it there afterwards (two more header writes). */
  normalize: boolean;
  changed: boolean;
}

/**
 * The base path lives in the first page, outside the header sector, so a new path is written
 * where the live one is not and the header (with base_path_offset) switches to it in one sector
 * write; then it is moved back to offset 512 (FORMAT.md §12.4).
 */
function planPath(op: string, imagePath: string, cur: Header, curPath: string, newPath: string, curIdentity = '', newIdentity = ''): PathPlan {
  // The identity (FORMAT.md §2.2) travels with its path: both are one run of bytes here.
  const bytes = newPath === '' ? Buffer.alloc(0) : Buffer.from(newPath + newIdentity, 'utf8');
  const curBytes = Buffer.from(curPath + curIdentity, 'utf8');
  const P = cur.basePathOffset || BASE_PATH_OFFSET;
  if (bytes.length === 0) return { bytes, at: 0, normalize: false, changed: curBytes.length !== 0 };
  if (curBytes.equals(bytes) && P === BASE_PATH_OFFSET) return { bytes, at: 0, normalize: false, changed: false };
  const L = curBytes.length;
  if (L === 0 || BASE_PATH_OFFSET + bytes.length <= P) return { bytes, at: BASE_PATH_OFFSET, normalize: false, changed: true };
  const at = roundUp(Math.max(P + L, BASE_PATH_OFFSET + bytes.length), SECTOR);
  if (at + bytes.length > PAGE)
    throw new FvdError(
      `${op}: ${imagePath}: the old and new base paths (${L} and ${bytes.length} bytes) do not fit side by side in the first page for a crash-safe switch (at most ${MAX_BASE_PATH} bytes together)`,
      'EINVAL',
    );
  return { bytes, at, normalize: true, changed: true };
}

interface SwitchTarget {
  /** The complete new header (layout from planLayout; base fields; sizes; features). */
  header: Header;
  plan: LayoutPlan;
  path: PathPlan;
  /** New bitmap bits (any length; copied into a region of header.bitmapLength bytes). */
  bitmap: Uint8Array;
  /** New table entries for ceil(virtual_size / chunk_size) chunks, or null. */
  table: Uint32Array | null;
}

/**
 * Switches the image to `t` (FORMAT.md §12.2): every byte written before a header write lies
 * outside what the live header gives meaning to, or equals it; each header write is one sector,
 * made durable before the next step.
 */
async function switchTo(img: OfflineImage, t: SwitchTarget): Promise<void> {
  const file = img.file;
  const live = img.header;
  const liveBB = img.fullyLocal ? 0 : baseBlocksOf(live);
  const liveChunks = live.tableLength ? chunksOf(live) : 0;
  // Stale sectors of a moved journal must never match a sequence number replay looks for: start
  // past every number the old region can hold (FORMAT.md §12.2).
  const journalMoved = t.header.journalOffset !== live.journalOffset || t.header.journalLength !== live.journalLength;
  const h: Header = {
    ...t.header,
    journalStartSeq: journalMoved ? live.journalStartSeq + live.journalLength / SECTOR + 1 : live.journalStartSeq,
  };
  if (h.journalStartSeq > MAX_JOURNAL_SEQ) {
    // Numbers used up (only a damaged or hostile header gets here): no journal rather than an
    // invalid header; every flush then checkpoints (FORMAT.md §12.2).
    h.journalStartSeq = live.journalStartSeq;
    h.journalOffset = h.journalLength = 0;
    t.plan.layout.journalOffset = t.plan.layout.journalLength = 0; // as the caller reports it
  }

  // The new bitmap must agree with the live one on every bit the live header reads.
  for (let b = 0; b < liveBB; b++)
    if (testBit(t.bitmap, b) !== testBit(img.bitmap, b)) throw new Error(`internal error: switch would change live bitmap bit ${b}`);
  if (t.table && img.table)
    for (let c = 0; c < Math.min(liveChunks, t.table.length); c++)
      if (t.table[c] !== img.table[c]) throw new Error(`internal error: switch would change live table entry ${c}`);

  if (t.plan.tempTable !== null) {
    // Step 1: the table to a place neither region of the new layout covers; no journal meanwhile.
    await file.write(new Uint8Array(img.table!.buffer), t.plan.tempTable);
    await file.flush();
    await img.writeHeader({ ...live, tableOffset: t.plan.tempTable, journalOffset: 0, journalLength: 0 });
  }
  // Step 2: the regions of the new layout. The table keeps the live entries the new size drops
  // (shrink) until after the switch; they are padding for the new header.
  if (h.bitmapLength) {
    const region = new Uint8Array(h.bitmapLength);
    region.set(t.bitmap.subarray(0, Math.min(t.bitmap.length, region.length)));
    await file.write(region, h.bitmapOffset);
  }
  let cleanupTable = false;
  if (h.tableLength && t.table) {
    const entries = new Uint32Array(h.tableLength / 4).fill(CHUNK_EMPTY);
    entries.set(t.table);
    for (let c = t.table.length; c < Math.min(liveChunks, entries.length); c++) {
      if (img.table![c] !== CHUNK_EMPTY) {
        entries[c] = img.table![c]!;
        cleanupTable = true;
      }
    }
    await file.write(new Uint8Array(entries.buffer), h.tableOffset);
    if (cleanupTable) t.table = entries.slice(0, t.table.length);
  }
  if (t.path.changed && t.path.at) await file.write(t.path.bytes, t.path.at);
  await file.flush();

  // Step 3: the switch.
  const pathOffset = t.path.changed ? (t.path.at === BASE_PATH_OFFSET ? 0 : t.path.at) : live.basePathOffset ?? 0;
  await img.writeHeader({ ...h, basePathOffset: pathOffset, incompatible: h.incompatible & ~INCOMPAT_DIRTY });

  // Step 4: tidy up what the new header no longer reads.
  if (cleanupTable) {
    const entries = new Uint32Array(h.tableLength / 4).fill(CHUNK_EMPTY);
    entries.set(t.table!);
    await file.write(new Uint8Array(entries.buffer), h.tableOffset);
    await file.flush();
  }
  const n = t.path.bytes.length;
  if (t.path.normalize) {
    // The path back to 512 (the live copy at `at` is untouched by this write), then the header.
    const lead = new Uint8Array(t.path.at - BASE_PATH_OFFSET);
    lead.set(t.path.bytes);
    await file.write(lead, BASE_PATH_OFFSET);
    await file.flush();
    await img.writeHeader({ ...img.header, basePathOffset: 0 });
  }
  if (t.path.changed) {
    // Nothing reads the rest of the first page any more: zero it, as create leaves it.
    await file.write(new Uint8Array(PAGE - BASE_PATH_OFFSET - n), BASE_PATH_OFFSET + n);
    await file.flush();
  }
  await img.load();
}

// -----------------------------------------------------------------------------------------------
// commit

export interface CommitOptions {
  /** Key material of an encrypted image (its data is read as plaintext into the base). */
  key?: Uint8Array;
  /** Leave the image's local blocks in place after writing them into the base (qemu-img commit -d). */
  keep?: boolean;
  /** Called after each window of examined data, with bytes examined so far and in all. */
  onProgress?: (done: number, total: number) => void;
}

export interface CommitResult {
  /** The base as named in the image, and its format. */
  base: string;
  baseFormat: BaseFormat;
  /** Bytes of this image's local data examined (compared with the base). */
  bytesExamined: number;
  /** Bytes written into the base (those that differed). */
  bytesWritten: number;
  /** The base's new size when it had to grow to the image's size, else null. */
  baseGrownTo: number | null;
  /** True when the image was emptied (reads everything from the base now). */
  emptied: boolean;
}

/** A base opened for writing: a raw file or an FVD image (through the engine). */
interface WritableBase {
  size: number;
  read(buf: Uint8Array, offset: number): Promise<void>;
  knownZero(offset: number, length: number): Promise<boolean>;
  write(buf: Uint8Array, offset: number): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
  /** A raw block device: it cannot grow. */
  readonly device: boolean;
  /** Raw files: extend to `size` bytes (zeros), durably. (An FVD base grows by resizeImage.) */
  grow?(size: number): Promise<void>;
}

/** Errors opening the base for writing, turned into one clear line naming the base. */
function baseOpenError(err: unknown, shown: string, resolved: string): FvdError {
  const e = err as NodeJS.ErrnoException;
  if (e?.code === 'EACCES' || e?.code === 'EPERM' || e?.code === 'EROFS')
    return new FvdError(`base image '${shown}' is read-only (${e.code}): cannot commit into it`, 'EROFS');
  if (e?.code === 'EBUSY') return new FvdError(`base image '${shown}' is in use by another process (locked): cannot commit into it`, 'EBUSY');
  if (err instanceof FvdError) return new FvdError(`base image '${shown}': ${err.message.replace(`${resolved}: `, '')}`, err.code);
  if (e?.code === 'ENOENT') return new FvdError(`base image '${shown}' not found (looked for ${resolved})`, 'ENOENT');
  return new FvdError(`base image '${shown}' cannot be opened for writing: ${e?.message ?? err}`, 'EIO');
}

async function openWritableBase(io: IoBackend, resolved: string, format: number, shown: string): Promise<WritableBase> {
  try {
    if (format === BASE_RAW) {
      const file = await io.open(resolved, { lock: 'exclusive' });
      const raw: WritableBase = {
        size: file.size(),
        read: (b, o) => file.read(b, o),
        knownZero: async (o, l) => holeAt(file, o, o + l),
        write: (b, o) => file.write(b, o),
        writeZeroes: (o, l) => file.zeroRange(o, l),
        flush: () => file.flush(),
        close: () => file.close(),
        device: file.isBlockDevice,
        grow: async (size) => {
          await file.truncate(size);
          await file.flush();
          raw.size = size;
        },
      };
      return raw;
    }
    const image = await FvdImage.open(io, resolved, { copyOnRead: false });
    return {
      size: image.size,
      read: (b, o) => image.read(b, o),
      knownZero: (o, l) => image.knownZero(o, l),
      write: (b, o) => image.write(b, o),
      writeZeroes: (o, l) => image.writeZeroes(o, l),
      flush: () => image.flush(),
      close: () => image.close(),
      device: false,
    };
  } catch (err) {
    throw baseOpenError(err, shown, resolved);
  }
}

/**
 * Writes every block of the image that is local into its base, then (unless `keep`) empties the
 * image so it reads everything from the base. The base grows to the image's size first when it
 * is smaller (FORMAT.md §12.3).
 */
export async function commitImage(io: IoBackend, imagePath: string, options: CommitOptions = {}): Promise<CommitResult> {
  const img = await OfflineImage.open(io, imagePath, 'commit', options.key);
  try {
    const h0 = img.header;
    if (h0.baseFormat === BASE_NONE) throw new FvdError(`${imagePath}: has no base image to commit into`, 'EINVAL');
    // Its blocks go into the (never encrypted) base as plaintext: decrypted with the key.
    img.requireKey('commit');
    const shown = img.basePath;
    const resolved = resolveFrom(imagePath, shown);
    const self = path.resolve(imagePath);
    const V = h0.virtualSize;
    const bs = h0.blockSize;

    // The base chain as readers see it (loops, missing images, its size), before changing anything.
    const probe = await openBase(io, resolved, h0.baseFormat, [self], shown);
    const actual = probe.size;
    await probe.close();
    if (actual !== h0.baseSize && !(h0.baseSizeNext && actual === h0.baseSizeNext))
      throw new FvdError(
        `${imagePath}: base image '${shown}' is ${actual} bytes but was ${h0.baseSize} bytes when the image was created (wrong or resized base)`,
        'EINVAL',
      );
    const grow = V > h0.baseSize;
    const plan = grow ? planLayout('commit', imagePath, h0, V, V) : null;

    // Writable? Locked by someone else? Asked now, so a refusal changes nothing.
    let base: WritableBase | null = null;
    if (h0.baseFormat === BASE_RAW) {
      base = await openWritableBase(io, resolved, BASE_RAW, shown);
      if (grow && base.size < V && base.device) {
        await base.close();
        throw new FvdError(`commit: base image '${shown}' is a ${base.size}-byte block device and cannot grow to the image's ${V} bytes`, 'ENOSPC');
      }
    } else {
      // Lockable for writing, and (if it must grow) room for its metadata at the new size.
      const b = await OfflineImage.open(io, resolved, COMMIT_BASE).catch((err) => {
        throw baseOpenError(err, shown, resolved);
      });
      try {
        if (grow && b.header.virtualSize < V) planLayout('resize', shown, b.header, V, b.header.baseSize);
      } catch (err) {
        throw baseOpenError(err, shown, resolved);
      } finally {
        await b.close();
      }
    }

    try {
      await img.ensureClean();
      let grownTo: number | null = null;
      if (grow) {
        // A: bits for the blocks between the old base end and the disk's end, set (local) while
        // they are still padding; the header notes the size the base is about to have.
        const oldBB = img.baseBlocks;
        const newBB = Math.ceil(V / bs);
        if (newBB > oldBB) {
          const grown = new Uint8Array(Math.max(img.bitmap.length, plan!.layout.bitmapLength));
          grown.set(img.bitmap);
          setRange(grown, oldBB, newBB - oldBB);
          await switchTo(img, {
            header: { ...img.header, ...plan!.layout, baseSizeNext: V },
            plan: plan!,
            path: { bytes: new Uint8Array(0), at: 0, normalize: false, changed: false },
            bitmap: grown,
            table: img.table ? img.table.slice(0, chunksOf(img.header)) : null,
          });
        } else {
          await img.writeHeader({ ...img.header, baseSizeNext: V });
        }
        // B: grow the base (a raw file is extended with zeros; an FVD base is resized, §12.5).
        if (actual < V) {
          if (base) {
            await base.grow!(V);
          } else {
            await resizeImage(io, resolved, V).catch((err) => {
              throw baseOpenError(err, shown, resolved);
            });
          }
        }
        // C: the image now describes the grown base; its new blocks are local (bits set in A).
        await img.writeHeader({ ...img.header, baseSize: V, baseSizeNext: 0 });
        grownTo = V;
      }
      if (!base) base = await openWritableBase(io, resolved, BASE_FVD, shown);

      // D: copy what differs, block by block; the image's view never changes (only blocks it
      // holds itself are written into the base, and it does not read the base for those).
      const h = img.header;
      const bb = baseBlocksOf(h);
      const all = img.fullyLocal;
      let examined = 0;
      let written = 0;
      const runs: Array<[number, number]> = all ? (bb > 0 ? [[0, bb - 1]] : []) : setRuns(img.bitmap, 0, bb - 1);
      let total = 0;
      for (const [b, e] of runs) total += Math.min((e + 1) * bs, V) - b * bs;
      const mineBuf = new Uint8Array(Math.min(windowBytes(bs), roundUp(V, bs)));
      const theirsBuf = new Uint8Array(mineBuf.length);
      const copyRun = async (b: number, e: number) => {
        await windows(b, e, bs, async (b0, b1) => {
          const start = b0 * bs;
          const end = Math.min((b1 + 1) * bs, V);
          examined += end - start;
          // Zero on both sides without reading (holes, unmapped chunks, a freshly grown base).
          if (img.localKnownZero(start, end - start) && (await base!.knownZero(start, end - start))) return;
          const mine = mineBuf.subarray(0, end - start);
          const theirs = theirsBuf.subarray(0, end - start);
          await img.readLocal(mine, start);
          await base!.read(theirs, start);
          for (let off = 0; off < mine.length; ) {
            // Maximal run of differing blocks with the same zero-ness, written in one request.
            const blockEnd = (o: number) => Math.min(o + bs, mine.length);
            if (sameBytes(mine.subarray(off, blockEnd(off)), theirs.subarray(off, blockEnd(off)))) {
              off = blockEnd(off);
              continue;
            }
            const zero = isZero(mine.subarray(off, blockEnd(off)));
            let runEnd = blockEnd(off);
            while (runEnd < mine.length) {
              const next = mine.subarray(runEnd, blockEnd(runEnd));
              if (sameBytes(next, theirs.subarray(runEnd, blockEnd(runEnd))) || isZero(next) !== zero) break;
              runEnd = blockEnd(runEnd);
            }
            if (zero) await base!.writeZeroes(start + off, runEnd - off);
            else await base!.write(mine.subarray(off, runEnd), start + off);
            written += runEnd - off;
            off = runEnd;
          }
          options.onProgress?.(examined, total);
        });
      };
      for (const [b, e] of runs) await copyRun(b, e);
      await base.flush(); // the base holds every local block durably before any bit is cleared
      await base.close();
      base = null;

      // E: empty the image: bits cleared (durable) before any data is dropped.
      if (!options.keep) await emptyImage(img);
      return { base: shown, baseFormat: baseFormatName(h0.baseFormat) as BaseFormat, bytesExamined: examined, bytesWritten: written, baseGrownTo: grownTo, emptied: !options.keep };
    } finally {
      await base?.close();
    }
  } finally {
    await img.close();
  }
}

/**
 * Commit step E: clears every bit (one in-place bitmap write, durable), then FULLY_LOCAL and
 * ZERO_DETECTED in the header, then gives the storage back: punched (raw-like) or unmapped and
 * truncated (compact).
 */
async function emptyImage(img: OfflineImage): Promise<void> {
  const h = img.header;
  const file = img.file;
  if (h.bitmapLength) {
    await file.write(new Uint8Array(h.bitmapLength), h.bitmapOffset);
    await file.flush();
  }
  await img.writeHeader({ ...h, autoclear: h.autoclear & ~AUTOCLEAR_FULLY_LOCAL, compatible: h.compatible & ~COMPAT_ZERO_DETECTED });
  if (!img.table) {
    await file.zeroRange(h.dataOffset, h.virtualSize);
  } else {
    await file.write(new Uint8Array(h.tableLength).fill(0xff), h.tableOffset);
    await file.flush();
    // Storage is free only once no entry references it (durable above).
    if (!file.isBlockDevice) await file.truncate(h.dataOffset);
  }
  await file.flush();
  await img.load();
}

// -----------------------------------------------------------------------------------------------
// rebase

export interface RebaseOptions {
  /** The new base path as it will be recorded (relative to the image's directory); '' removes the base. */
  base: string;
  baseFormat?: BaseFormat;
  /** Header only: do not compare or copy (qemu-img rebase -u). The old base need not exist. */
  unsafe?: boolean;
  /** Key material of an encrypted image: needed unless `unsafe` (safe mode copies data in, encrypted). */
  key?: Uint8Array;
  onProgress?: (done: number, total: number) => void;
}

export interface RebaseResult {
  oldBase: string | null;
  newBase: string | null;
  /** Bytes copied from the old chain into the image (safe mode). */
  bytesCopied: number;
  /** Bytes compared (safe mode). */
  bytesExamined: number;
  /** The journal had to give up room for a larger bitmap: its new length, else null. */
  journalShrunkTo: number | null;
}

/**
 * Changes the image's base. Safe mode first copies into the image every block it reads from the
 * old chain whose data the new chain does not have at the same place, so the image reads the
 * same afterwards; then one header write switches the base (FORMAT.md §12.4).
 */
export async function rebaseImage(io: IoBackend, imagePath: string, options: RebaseOptions): Promise<RebaseResult> {
  const newPath = options.base;
  let fmt = BASE_NONE;
  if (newPath !== '') {
    if (options.baseFormat === undefined) throw new FvdError(`rebase: new base given without its format: add -F raw, -F qcow2 or -F fvd`, 'EINVAL');
    fmt = baseFormatCode(options.baseFormat);
    if (fmt < 0) throw new FvdError(`rebase: unknown base format '${options.baseFormat}' (${BASE_FORMAT_CHOICES})`, 'EINVAL');
    const n = Buffer.byteLength(newPath);
    if (n > MAX_BASE_PATH) throw new FvdError(`rebase: base path must be 1 to ${MAX_BASE_PATH} bytes long`, 'EINVAL');
  }
  const self = path.resolve(imagePath);
  let resolved = '';
  if (newPath !== '') {
    resolved = resolveFrom(imagePath, newPath);
    if (resolved === self) throw new FvdError(`rebase: an image cannot be its own base`, 'EINVAL');
  }
  const img = await OfflineImage.open(io, imagePath, 'rebase', options.key);
  let newBase: BaseImage | null = null;
  try {
    const h0 = img.header;
    // Safe mode reads and copies data (encrypted on the way in); -u writes only metadata and
    // zeroes storage, which reads as zero plaintext without any key (FORMAT.md §11.3).
    if (!options.unsafe) img.requireKey('a safe rebase (it compares and copies data; -u switches the header only)');
    if (newPath !== '') newBase = await openBase(io, resolved, fmt, [self], newPath);
    const B = newBase ? newBase.size : 0;
    const V = h0.virtualSize;
    const bs = h0.blockSize;
    const oldBB = baseBlocksOf(h0);
    const newBB = Math.ceil(Math.min(B, V) / bs);
    const plan = planLayout('rebase', imagePath, h0, V, B);
    const newIdentity = newBase?.identity ?? '';
    const pathPlan = planPath('rebase', imagePath, h0, img.basePath, newPath, img.baseIdentity, newIdentity);
    const newPathBytes = Buffer.byteLength(newPath, 'utf8');
    const idBytes = Buffer.from(newIdentity, 'utf8');
    const wasFullyLocal = img.fullyLocal;
    const oldPath = h0.baseFormat === BASE_NONE ? null : img.basePath;

    let copied = 0;
    let examined = 0;
    if (!wasFullyLocal && oldBB > 0) {
      if (!options.unsafe) {
        const r = await copyDiffering(io, img, newBase, newBB, options.onProgress).catch((err) => {
          if (err instanceof FvdError && err.code === 'ENOENT')
            throw new FvdError(`${err.message}; 'rebase -u' switches the base without reading the old one`, 'ENOENT');
          throw err;
        });
        copied = r.copied;
        examined = r.examined;
      } else {
        // Blocks past the new base's end that were read from the old base become local, and
        // read what their storage holds: make that zeros, like reading past a base's end.
        await img.ensureClean();
        const runs = clearRuns(img.bitmap, newBB, oldBB - 1);
        for (const [b, e] of runs) await img.zeroLocal(b * bs, Math.min((e + 1) * bs, V) - b * bs);
        if (runs.length) await img.file.flush();
      }
    }
    await img.ensureClean();

    const h = img.header;
    const bitmap = new Uint8Array(Math.max(h.bitmapLength, plan.layout.bitmapLength));
    bitmap.set(img.bitmap);
    // Blocks that were past the old base's end (always local) and now lie over the new base
    // stay local: their bits are set (they are padding for the live header).
    if (newBB > oldBB) setRange(bitmap, oldBB, newBB - oldBB);
    let autoclear = h.autoclear;
    if (!newBase) autoclear &= ~AUTOCLEAR_FULLY_LOCAL;
    const header: Header = {
      ...h,
      ...plan.layout,
      autoclear,
      compatible: h.compatible & ~COMPAT_ZERO_DETECTED,
      baseSize: B,
      baseSizeNext: 0,
      baseFormat: fmt,
      basePathLength: newPathBytes,
      basePathCrc: newPathBytes ? crc(pathPlan.bytes.subarray(0, newPathBytes)) : 0,
      baseIdentityLength: idBytes.length,
      baseIdentityCrc: idBytes.length ? crc(idBytes) : 0,
    };
    await switchTo(img, { header, plan, path: pathPlan, bitmap, table: img.table ? img.table.slice(0, chunksOf(h)) : null });
    return {
      oldBase: oldPath,
      newBase: newPath === '' ? null : newPath,
      bytesCopied: copied,
      bytesExamined: examined,
      journalShrunkTo: plan.layout.journalLength < h0.journalLength ? plan.layout.journalLength : null,
    };
  } finally {
    await newBase?.close();
    await img.close();
  }
}

/**
 * Safe rebase, data step: through the engine (old chain open, journaled bits), copies into the
 * image each block it still reads from the old chain unless the new chain has the same bytes
 * there. Blocks past the new base's end are always copied: they become local.
 */
async function copyDiffering(
  io: IoBackend,
  img: OfflineImage,
  newBase: BaseImage | null,
  newBB: number,
  onProgress?: (done: number, total: number) => void,
): Promise<{ copied: number; examined: number }> {
  const h = img.header;
  const V = h.virtualSize;
  const bs = h.blockSize;
  const oldBB = baseBlocksOf(h);
  const newLimit = newBase ? Math.min(newBase.size, V) : 0;
  const runs = clearRuns(img.bitmap, 0, oldBB - 1);
  let total = 0;
  for (const [b, e] of runs) total += Math.min((e + 1) * bs, V) - b * bs;
  let copied = 0;
  let examined = 0;
  const oldBuf = new Uint8Array(Math.min(windowBytes(bs), roundUp(V, bs)));
  const freshBuf = new Uint8Array(oldBuf.length);
  await img.withEngine(io, async (engine) => {
    for (const [first, last] of runs) {
      await windows(first, last, bs, async (b0, b1) => {
        const start = b0 * bs;
        const end = Math.min((b1 + 1) * bs, V);
        const inNew = Math.max(0, Math.min(end, newLimit) - start);
        examined += end - start;
        // Zeros in both chains, known without reading: nothing to copy (blocks past the new
        // base's end are excluded: they must be copied whatever they hold).
        if (b1 < newBB && (await engine.knownZero(start, end - start)) && (inNew === 0 || (await newBase!.knownZero(start, inNew)))) {
          onProgress?.(examined, total);
          return;
        }
        const old = oldBuf.subarray(0, end - start);
        await engine.read(old, start);
        const fresh = freshBuf.subarray(0, end - start).fill(0);
        if (inNew > 0) await newBase!.read(fresh.subarray(0, inNew), start);
        const mustCopy = (b: number) => {
          if (b >= newBB) return true;
          const o = b * bs - start;
          const n = Math.min(o + bs, old.length);
          return !sameBytes(old.subarray(o, n), fresh.subarray(o, n));
        };
        for (let b = b0; b <= b1; ) {
          if (!mustCopy(b)) {
            b++;
            continue;
          }
          const zero = isZero(old.subarray(b * bs - start, Math.min((b + 1) * bs, V) - start));
          let e = b;
          while (e + 1 <= b1 && mustCopy(e + 1) && isZero(old.subarray((e + 1) * bs - start, Math.min((e + 2) * bs, V) - start)) === zero) e++;
          const s = b * bs;
          const t = Math.min((e + 1) * bs, V);
          if (zero) await engine.writeZeroes(s, t - s);
          else await engine.write(old.subarray(s - start, t - start), s);
          copied += t - s;
          b = e + 1;
        }
        onProgress?.(examined, total);
      });
    }
  });
  return { copied, examined };
}

// -----------------------------------------------------------------------------------------------
// resize

export interface ResizeOptions {
  /** Allow dropping data past the new end (qemu-img resize --shrink). */
  shrink?: boolean;
  /**
   * Key material of an encrypted image. Needed only to read data: to shrink without `shrink`
   * (the dropped range must read as zero plaintext), and to grow when the block holding an
   * unaligned old end still reads from the base (it is copied in, encrypted).
   */
  key?: Uint8Array;
}

export interface ResizeResult {
  oldSize: number;
  newSize: number;
  /** The journal had to give up room for a larger lookup table or bitmap: its new length, else null. */
  journalShrunkTo: number | null;
}

/**
 * Sets the virtual size. Growing: the new range reads as zeros (even where the base extends
 * further). Shrinking: refused while any byte past the new end reads non-zero, unless `shrink`
 * (FORMAT.md §12.5).
 */
export async function resizeImage(io: IoBackend, imagePath: string, size: number, options: ResizeOptions = {}): Promise<ResizeResult> {
  if (!Number.isSafeInteger(size) || size <= 0 || size > MAX_VIRTUAL_SIZE)
    throw new FvdError(`resize: size ${size} out of range (1 byte to ${MAX_VIRTUAL_SIZE} bytes)`, 'EINVAL');
  const V2 = roundUp(size, SECTOR);
  const img = await OfflineImage.open(io, imagePath, 'resize', options.key);
  try {
    const h0 = img.header;
    const V = h0.virtualSize;
    const bs = h0.blockSize;
    if (V2 === V) return { oldSize: V, newSize: V, journalShrunkTo: null };
    if (img.compact && Math.ceil(V2 / h0.chunkSize) >= CHUNK_EMPTY)
      throw new FvdError(`resize: ${imagePath}: too many chunks for ${V2} bytes at ${h0.chunkSize}-byte chunks`, 'EINVAL');
    const plan = planLayout('resize', imagePath, h0, V2, h0.baseSize);
    const oldBB = baseBlocksOf(h0);
    const newBB = Math.ceil(Math.min(h0.baseSize, V2) / bs);

    const endBlock = Math.floor(V / bs);
    const copyEndBlock = V2 > V && V % bs !== 0 && endBlock < oldBB && !img.fullyLocal && !testBit(img.bitmap, endBlock);
    if (copyEndBlock) img.requireKey(`growing it (the block holding the old end, ${V} bytes, still reads from the base and must be copied in)`);
    if (V2 < V && !options.shrink) {
      // Nothing that reads non-zero may be dropped without --shrink: plaintext is what counts
      // (a sector of zeros is stored as non-zero ciphertext), hence the key.
      img.requireKey('shrinking it without --shrink (the dropped range must be read to prove it is zero)');
      const at = await img.withEngine(io, (engine) => firstNonZero(engine, V2, V), true);
      if (at >= 0)
        throw new FvdError(
          `resize: ${imagePath}: shrinking to ${V2} bytes would discard data (byte ${at} is not zero); use --shrink to drop it`,
          'EINVAL',
        );
    }
    await img.ensureClean();

    if (V2 > V) {
      // The block that holds the old end becomes whole: if it still reads from the base, the
      // base's bytes past the old end would show. Copy its in-disk part into the image first.
      const b = endBlock;
      if (copyEndBlock) {
        await img.withEngine(io, async (engine) => {
          const part = new Uint8Array(V - b * bs);
          await engine.read(part, b * bs);
          if (isZero(part)) await engine.writeZeroes(b * bs, part.length);
          else await engine.write(part, b * bs);
        });
      }
      // Storage for the new range must read zeros (a crashed shrink may have left data there).
      const file = img.file;
      const h = img.header;
      if (!img.table) {
        const end = h.dataOffset + V;
        if (file.size() > end) await file.zeroRange(end, file.size() - end);
        if (file.size() < h.dataOffset + V2) await file.truncate(h.dataOffset + V2);
      } else if (V % h.chunkSize) {
        const c = Math.floor(V / h.chunkSize);
        const id = img.table[c]!;
        const inChunk = V - c * h.chunkSize;
        if (id !== CHUNK_EMPTY) await file.zeroRange(h.dataOffset + id * h.chunkSize + inChunk, h.chunkSize - inChunk);
      }
      await file.flush();
    }

    const h = img.header;
    const bitmap = new Uint8Array(Math.max(h.bitmapLength, plan.layout.bitmapLength));
    bitmap.set(img.bitmap);
    // Blocks past the old end that are over the base now: local, reading zeros.
    if (newBB > oldBB) setRange(bitmap, oldBB, newBB - oldBB);
    let table: Uint32Array | null = null;
    if (img.table) {
      table = new Uint32Array(Math.ceil(V2 / h.chunkSize)).fill(CHUNK_EMPTY);
      table.set(img.table.subarray(0, Math.min(table.length, chunksOf(h))));
    }
    await switchTo(img, {
      header: { ...h, ...plan.layout, virtualSize: V2 },
      plan,
      path: { bytes: new Uint8Array(0), at: 0, normalize: false, changed: false },
      bitmap,
      table,
    });
    if (V2 < V) await reclaimAfterShrink(img);
    return { oldSize: V, newSize: V2, journalShrunkTo: plan.layout.journalLength < h0.journalLength ? plan.layout.journalLength : null };
  } finally {
    await img.close();
  }
}

/** The first byte in [from, to) of the virtual disk that is not zero, or -1. */
async function firstNonZero(engine: FvdImage, from: number, to: number): Promise<number> {
  const buf = new Uint8Array(Math.min(WINDOW, to - from));
  for (const e of engine.extents()) {
    if (e.kind === 'zero') continue;
    const a = Math.max(from, e.offset);
    const z = Math.min(to, e.offset + e.length);
    for (let pos = a; pos < z; pos += buf.length) {
      const piece = buf.subarray(0, Math.min(buf.length, z - pos));
      if (await engine.knownZero(pos, piece.length)) continue;
      await engine.read(piece, pos);
      for (let i = 0; i < piece.length; i++) if (piece[i] !== 0) return pos + i;
    }
  }
  return -1;
}

/** After a shrink: the dropped range's storage goes back to the host. */
async function reclaimAfterShrink(img: OfflineImage): Promise<void> {
  const file = img.file;
  const h = img.header;
  if (!img.table) {
    if (!file.isBlockDevice) await file.truncate(h.dataOffset + h.virtualSize);
    await file.flush();
    return;
  }
  // Chunks only the dropped entries referenced are free now (the table write in the switch's
  // step 4 is durable); punch them and cut the file after the last chunk still in use.
  const keep = chunksOf(h);
  let maxRef = -1;
  for (let c = 0; c < keep; c++) if (img.table[c] !== CHUNK_EMPTY && img.table[c]! > maxRef) maxRef = img.table[c]!;
  const cs = h.chunkSize;
  if (!file.isBlockDevice) {
    const inFile = Math.ceil((file.size() - h.dataOffset) / cs);
    const used = new Uint8Array(Math.max(inFile, 0));
    for (let c = 0; c < keep; c++) if (img.table[c] !== CHUNK_EMPTY) used[img.table[c]!] = 1;
    for (let id = 0; id <= maxRef; id++) if (!used[id]) await file.zeroRange(h.dataOffset + id * cs, cs);
    await file.truncate(h.dataOffset + (maxRef + 1) * cs);
  }
  await file.flush();
}
