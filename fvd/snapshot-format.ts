/**
 * On-disk structures of internal snapshots (docs/FORMAT.md §10): the snapshot directory, the
 * refcount table and the saved state of a snapshot (a copy of the lookup table and the bitmap).
 * Each lives in whole storage chunks of the data area, is written once and never modified in place:
 * an operation writes new copies and switches the header to them (one atomic sector write).
 */
import { CorruptImageError, FvdError } from './errors.js';
import { SECTOR, crc, roundUp, tableBytes, MAX_METADATA_REGION, MAX_VIRTUAL_SIZE, type Header } from './format.js';

/** "FVDS" as bytes 46 56 44 53. */
export const DIRECTORY_MAGIC = 0x53445646;
/** "FVDR" as bytes 46 56 44 52. */
export const REFCOUNT_MAGIC = 0x52445646;
export const DIRECTORY_HEADER = 32;
export const ENTRY_FIXED = 64;
export const REFCOUNT_HEADER = 16;
/** Refcounts are u16: no chunk can be referenced by more snapshots than this. */
export const MAX_REFCOUNT = 0xffff;
export const MAX_SNAPSHOTS = MAX_REFCOUNT;
export const MAX_NAME_BYTES = 255;

export interface SnapshotEntry {
  /** Unique, never reused, >= 1. */
  id: number;
  name: string;
  /** Byte offset of the saved state (table region, then bitmap region): a chunk of the data area. */
  stateOffset: number;
  /** tableBytes(virtualSize) + bitmapLength of the image. */
  stateLength: number;
  /** The virtual size when the snapshot was taken. */
  virtualSize: number;
  /** Creation time: seconds and nanoseconds since the Unix epoch. */
  dateSec: number;
  dateNsec: number;
  /** crc32 of the saved state's stateLength bytes. */
  stateCrc: number;
  /** Chunks the saved table maps (for listings; the table itself is the truth). */
  mappedChunks: number;
}

export interface Directory {
  entries: SnapshotEntry[];
  /** The id the next snapshot gets. */
  nextId: number;
}

/** The one-line reason a name is unusable, or null. Names are what users type on a command line. */
export function nameProblem(name: string): string | null {
  if (name.length === 0) return 'a snapshot name must not be empty';
  const bytes = Buffer.byteLength(name, 'utf8');
  if (bytes > MAX_NAME_BYTES) return `snapshot name is ${bytes} bytes long (at most ${MAX_NAME_BYTES})`;
  // A lone surrogate does not survive the UTF-8 round trip.
  if (Buffer.from(name, 'utf8').toString('utf8') !== name) return 'snapshot name is not valid Unicode';
  // Control characters would garble listings; surrounding blanks make names look alike.
  if (/[\u0000-\u001f\u007f-\u009f]/.test(name)) return 'snapshot name contains a control character';
  if (name.trim() !== name) return 'snapshot name must not begin or end with white space';
  return null;
}

export function validateName(name: string): void {
  const p = nameProblem(name);
  if (p) throw new FvdError(`invalid snapshot name ${JSON.stringify(name)}: ${p}`, 'EINVAL');
}

/**
 * Bytes of a snapshot's saved state for an image of `virtualSize` with `h`'s geometry: the table
 * and the whole bitmap region (FORMAT.md §10.3), which create sizes for the larger of base and
 * disk, so it may exceed what the base alone needs.
 */
export function stateBytes(h: Header, virtualSize: number): number {
  return tableBytes(virtualSize, h.chunkSize) + h.bitmapLength;
}

function entryBytes(e: SnapshotEntry): number {
  return ENTRY_FIXED + roundUp(Buffer.byteLength(e.name, 'utf8'), 8);
}

export function encodeDirectory(d: Directory): Uint8Array {
  let used = DIRECTORY_HEADER;
  for (const e of d.entries) used += entryBytes(e);
  const buf = new Uint8Array(roundUp(used, SECTOR));
  const dv = new DataView(buf.buffer);
  dv.setUint32(0, DIRECTORY_MAGIC, true);
  dv.setUint32(8, d.entries.length, true);
  dv.setUint32(12, d.nextId, true);
  let pos = DIRECTORY_HEADER;
  for (const e of d.entries) {
    const name = Buffer.from(e.name, 'utf8');
    dv.setUint32(pos, e.id, true);
    dv.setUint16(pos + 4, name.length, true);
    dv.setBigUint64(pos + 8, BigInt(e.stateOffset), true);
    dv.setBigUint64(pos + 16, BigInt(e.stateLength), true);
    dv.setBigUint64(pos + 24, BigInt(e.virtualSize), true);
    dv.setBigUint64(pos + 32, BigInt(e.dateSec), true);
    dv.setUint32(pos + 40, e.dateNsec, true);
    dv.setUint32(pos + 44, e.stateCrc, true);
    dv.setUint32(pos + 48, e.mappedChunks, true);
    buf.set(name, pos + ENTRY_FIXED);
    pos += entryBytes(e);
  }
  dv.setUint32(4, crc(buf.subarray(8)), true);
  return buf;
}

/**
 * Decodes and validates a directory read from `offset` (`buf` is the whole region). Checks
 * everything that needs no other structure: magic, checksum, bounds, ids, names, state geometry.
 */
export function decodeDirectory(path: string, buf: Uint8Array, h: Header, fileSize: number): Directory {
  const bad = (what: string) => new CorruptImageError(path, `snapshot directory: ${what}`);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (buf.length < DIRECTORY_HEADER || dv.getUint32(0, true) !== DIRECTORY_MAGIC) throw bad('bad magic');
  if (dv.getUint32(4, true) !== crc(buf.subarray(8))) throw bad('checksum mismatch');
  const count = dv.getUint32(8, true);
  const nextId = dv.getUint32(12, true);
  if (count === 0 || count > MAX_SNAPSHOTS) throw bad(`invalid snapshot count ${count}`);
  for (let i = 16; i < DIRECTORY_HEADER; i++) if (buf[i]) throw bad('reserved bytes set');
  const entries: SnapshotEntry[] = [];
  const ids = new Set<number>();
  const names = new Set<string>();
  const decoder = new TextDecoder('utf-8', { fatal: true });
  let pos = DIRECTORY_HEADER;
  for (let i = 0; i < count; i++) {
    if (pos + ENTRY_FIXED > buf.length) throw bad(`entry ${i} overruns the directory`);
    const nameLen = dv.getUint16(pos + 4, true);
    if (pos + ENTRY_FIXED + roundUp(nameLen, 8) > buf.length) throw bad(`entry ${i} overruns the directory`);
    const u64 = (off: number) => {
      const v = dv.getBigUint64(pos + off, true);
      return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.POSITIVE_INFINITY : Number(v);
    };
    const e: SnapshotEntry = {
      id: dv.getUint32(pos, true),
      name: '',
      stateOffset: u64(8),
      stateLength: u64(16),
      virtualSize: u64(24),
      dateSec: u64(32),
      dateNsec: dv.getUint32(pos + 40, true),
      stateCrc: dv.getUint32(pos + 44, true),
      mappedChunks: dv.getUint32(pos + 48, true),
    };
    if (dv.getUint16(pos + 6, true) !== 0 || dv.getUint32(pos + 52, true) !== 0 || dv.getBigUint64(pos + 56, true) !== 0n)
      throw bad(`entry ${i}: reserved fields set`);
    try {
      e.name = decoder.decode(buf.subarray(pos + ENTRY_FIXED, pos + ENTRY_FIXED + nameLen));
    } catch {
      throw bad(`entry ${i}: name is not valid UTF-8`);
    }
    const problem = nameProblem(e.name);
    if (problem) throw bad(`entry ${i}: ${problem}`);
    if (names.has(e.name)) throw bad(`two snapshots are named ${JSON.stringify(e.name)}`);
    if (e.id === 0 || e.id >= nextId || ids.has(e.id)) throw bad(`entry ${i}: invalid or repeated id ${e.id}`);
    if (!Number.isSafeInteger(e.virtualSize) || e.virtualSize <= 0 || e.virtualSize % SECTOR || e.virtualSize > MAX_VIRTUAL_SIZE)
      throw bad(`snapshot '${e.name}': invalid virtual size ${e.virtualSize}`);
    const expect = stateBytes(h, e.virtualSize);
    if (e.stateLength !== expect || expect > 2 * MAX_METADATA_REGION) throw bad(`snapshot '${e.name}': saved state length ${e.stateLength}, expected ${expect}`);
    if (!Number.isSafeInteger(e.stateOffset) || e.stateOffset < h.dataOffset || (e.stateOffset - h.dataOffset) % h.chunkSize)
      throw bad(`snapshot '${e.name}': saved state at ${e.stateOffset} is not a chunk of the data area`);
    if (e.stateOffset + e.stateLength > fileSize)
      throw new CorruptImageError(path, `truncated: snapshot '${e.name}' saved state at ${e.stateOffset}+${e.stateLength} lies beyond the end (${fileSize} bytes)`);
    if (!Number.isSafeInteger(e.dateSec) || e.dateNsec >= 1e9) throw bad(`snapshot '${e.name}': invalid date`);
    ids.add(e.id);
    names.add(e.name);
    entries.push(e);
    pos += ENTRY_FIXED + roundUp(nameLen, 8);
  }
  return { entries, nextId };
}

export function encodeRefcounts(counts: Uint16Array, entries: number): Uint8Array {
  const buf = new Uint8Array(roundUp(REFCOUNT_HEADER + 2 * entries, SECTOR));
  const dv = new DataView(buf.buffer);
  dv.setUint32(0, REFCOUNT_MAGIC, true);
  dv.setUint32(8, entries, true);
  for (let i = 0; i < entries; i++) dv.setUint16(REFCOUNT_HEADER + 2 * i, counts[i]!, true);
  dv.setUint32(4, crc(buf.subarray(8)), true);
  return buf;
}

export function decodeRefcounts(path: string, buf: Uint8Array): Uint16Array {
  const bad = (what: string) => new CorruptImageError(path, `refcount table: ${what}`);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (buf.length < REFCOUNT_HEADER || dv.getUint32(0, true) !== REFCOUNT_MAGIC) throw bad('bad magic');
  if (dv.getUint32(4, true) !== crc(buf.subarray(8))) throw bad('checksum mismatch');
  const n = dv.getUint32(8, true);
  if (dv.getUint32(12, true) !== 0) throw bad('reserved bytes set');
  if (REFCOUNT_HEADER + 2 * n > buf.length) throw bad(`${n} entries overrun the table`);
  const counts = new Uint16Array(n);
  for (let i = 0; i < n; i++) counts[i] = dv.getUint16(REFCOUNT_HEADER + 2 * i, true);
  return counts;
}

/** Number of entries worth storing: up to the last non-zero count. */
export function usedRefcountEntries(counts: Uint16Array): number {
  let n = counts.length;
  while (n > 0 && counts[n - 1] === 0) n--;
  return n;
}
