/**
 * Metadata switch (FORMAT.md §12.2, §12.4): layout planning, then the ordered writes that move a
 * clean image to a new header — new sizes, base fields, region layout, base path — with a single
 * header-sector write as the one atomic step.
 */
import { FvdError } from '../errors.js';
import {
  BASE_PATH_OFFSET,
  CHUNK_EMPTY,
  INCOMPAT_COMPACT,
  INCOMPAT_DIRTY,
  MAX_BASE_PATH,
  MAX_METADATA_REGION,
  MAX_JOURNAL_SEQ,
  MIN_JOURNAL_SIZE,
  PAGE,
  SECTOR,
  bitmapBytes,
  roundUp,
  tableBytes,
  type Header,
} from '../format.js';
import { testBit } from '../bitmap.js';
import { chunksOf, tableRegionOf } from '../metadata.js';
import { baseBlocksOf, type OfflineImage } from './offline-image.js';

type Layout = Pick<Header, 'bitmapOffset' | 'bitmapLength' | 'tableOffset' | 'tableLength' | 'journalOffset' | 'journalLength'>;

export interface LayoutPlan {
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
export function planLayout(op: string, imagePath: string, cur: Header, virtualSize: number, baseSize: number): LayoutPlan {
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

export interface PathPlan {
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
export function planPath(op: string, imagePath: string, cur: Header, curPath: string, newPath: string, curIdentity = '', newIdentity = ''): PathPlan {
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

/**
 * The journal fields of a header whose journal goes to `to` (FORMAT.md §12.2, §12.5): when its
 * place or length changes, stale sectors of the old region must never match a sequence number
 * replay looks for, so journal_start_seq passes every number the old region can hold. If that
 * would pass 2^52 (only a damaged or hostile header gets there), the journal is dropped instead and
 * the number kept: no journal rather than an invalid header; every flush then checkpoints.
 */
export function movedJournal(
  live: Header,
  to: Pick<Header, 'journalOffset' | 'journalLength'>,
): Pick<Header, 'journalOffset' | 'journalLength' | 'journalStartSeq'> {
  const { journalOffset, journalLength } = to;
  if (journalOffset === live.journalOffset && journalLength === live.journalLength) return { journalOffset, journalLength, journalStartSeq: live.journalStartSeq };
  const journalStartSeq = live.journalStartSeq + live.journalLength / SECTOR + 1;
  if (journalStartSeq > MAX_JOURNAL_SEQ) return { journalOffset: 0, journalLength: 0, journalStartSeq: live.journalStartSeq };
  return { journalOffset, journalLength, journalStartSeq };
}

export interface SwitchTarget {
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
export async function switchTo(img: OfflineImage, t: SwitchTarget): Promise<void> {
  const file = img.file;
  const live = img.header;
  const liveBB = img.fullyLocal ? 0 : baseBlocksOf(live);
  const liveChunks = live.tableLength ? chunksOf(live) : 0;
  const j = movedJournal(live, t.header);
  const h: Header = { ...t.header, ...j };
  if (j.journalOffset !== t.header.journalOffset || j.journalLength !== t.header.journalLength)
    t.plan.layout.journalOffset = t.plan.layout.journalLength = 0; // dropped: as the caller reports it

  // The new bitmap must agree with the live one on every bit the live header reads.
  for (let b = 0; b < liveBB; b++)
    if (testBit(t.bitmap, b) !== testBit(img.bitmap, b)) throw new Error(`internal error: switch would change live bitmap bit ${b}`);
  if (t.table && img.table)
    for (let c = 0; c < Math.min(liveChunks, t.table.length); c++)
      if (t.table[c] !== img.table[c]) throw new Error(`internal error: switch would change live table entry ${c}`);

  if (t.plan.tempTable !== null) {
    // Step 1: the table to a place neither region of the new layout covers; no journal meanwhile.
    await file.write(tableRegionOf(live, img.table!), t.plan.tempTable);
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
