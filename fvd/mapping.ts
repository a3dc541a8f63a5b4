/**
 * The one mapping rule of an FVD image (FORMAT.md §3.1, §4): where a range of the virtual disk
 * reads from. In the spirit of QEMU's qcow2_get_host_offset: given the layout and a virtual byte
 * range, mapRun describes the FIRST run of that range — its kind and length — and the caller loops
 * (offset += length). On return, `length` bytes starting at the offset are all of that one kind,
 * all local or all not (the bitmap's verdict), and, for STORED, contiguous in the image file from
 * `host`.
 *
 * Hot path (every request of the engine goes through it): the result is written into a
 * caller-provided object (newRun) and nothing is allocated per call.
 */
import { CHUNK_EMPTY } from './format.js';

/** Stored in this image's file at `host` (raw-like: data_offset + offset; compact: a mapped chunk). */
export const STORED = 0;
/** Not local yet (bit clear): read from the base, which has these bytes (offset < base size). */
export const BASE = 1;
/**
 * Known to read as zeros without reading anything: an unmapped chunk (§4.2), a mapped chunk that
 * starts at or past `storageEnd` (§4.3: its first data write was lost in a crash), or bytes of a
 * block not yet local that lie past the base's end (§3.1).
 */
export const ZERO = 2;
/**
 * A chunk the caller must handle itself (`settling` said so: being allocated, or written while a
 * snapshot shares it). Always one chunk (or its part inside the range), never merged.
 */
export const PENDING = 3;
export type RunKind = typeof STORED | typeof BASE | typeof ZERO | typeof PENDING;

/** What the rule needs to know about an image. Mutable fields may change between calls. */
export interface MappingLayout {
  dataOffset: number;
  blockSize: number;
  chunkSize: number;
  /** min(base size, virtual size): base bytes that exist; 0 without a base. */
  baseLimit: number;
  /**
   * Blocks with a meaningful bit: ceil(baseLimit / blockSize). 0 when every block is local: no
   * base, FULLY_LOCAL set, or a caller that asks about this image's storage only.
   */
  baseBlocks: number;
  /** The bitmap (read only for blocks below baseBlocks). */
  bitmap: Uint8Array;
  /** The lookup table (compact layout), or null (raw-like). */
  table: Uint32Array | null;
  /**
   * Compact layout: file offset past which no storage exists. A mapped chunk starting at or past
   * it reads as zeros (§4.3). Infinity when the caller reads such storage itself (it reads zeros).
   */
  storageEnd: number;
  /** Chunks reported as PENDING (one at a time), or null. */
  settling: ((chunk: number) => boolean) | null;
}

/** The result of mapRun, filled in place. `host` is meaningful for STORED only. */
export interface MappedRun {
  kind: RunKind;
  length: number;
  host: number;
  /** The bytes are this image's (FULLY_LOCAL, past the bitmap, or bit set); false: the base's. */
  local: boolean;
}

export function newRun(): MappedRun {
  return { kind: ZERO, length: 0, host: 0, local: true };
}

/** Layout over an image's own storage only (every block local): for readers of this file's data. */
export function storageLayout(dataOffset: number, blockSize: number, chunkSize: number, table: Uint32Array | null, storageEnd = Number.POSITIVE_INFINITY): MappingLayout {
  return { dataOffset, blockSize, chunkSize, baseLimit: 0, baseBlocks: 0, bitmap: EMPTY_BITMAP, table, storageEnd, settling: null };
}

const EMPTY_BITMAP = new Uint8Array(1);

function blockLocal(l: MappingLayout, b: number): boolean {
  return b >= l.baseBlocks || (l.bitmap[b >>> 3]! & (1 << (b & 7))) !== 0;
}

/**
 * The first run of [offset, offset + length) (length > 0, inside the virtual disk) into `out`;
 * returns `out`.
 */
export function mapRun(l: MappingLayout, offset: number, length: number, out: MappedRun): MappedRun {
  const end = offset + length;
  const bs = l.blockSize;
  const b = Math.floor(offset / bs);
  const local = blockLocal(l, b);
  // The end of the blocks sharing this block's locality (blocks past baseBlocks are all local).
  let localEnd: number;
  if (local && b >= l.baseBlocks) localEnd = end;
  else {
    localEnd = Math.min(end, (b + 1) * bs);
    while (localEnd < end) {
      const nb = localEnd / bs;
      if (local && nb >= l.baseBlocks) {
        localEnd = end;
        break;
      }
      if (blockLocal(l, nb) !== local) break;
      localEnd = Math.min(end, localEnd + bs);
    }
  }
  out.local = local;
  out.host = 0;
  if (!local) {
    // §3.1: base bytes up to the base's end; the rest of a block straddling it reads zeros.
    if (offset < l.baseLimit) (out.kind = BASE), (out.length = Math.min(localEnd, l.baseLimit) - offset);
    else (out.kind = ZERO), (out.length = localEnd - offset);
    return out;
  }
  const table = l.table;
  if (!table) {
    out.kind = STORED;
    out.host = l.dataOffset + offset;
    out.length = localEnd - offset;
    return out;
  }
  const cs = l.chunkSize;
  const c = Math.floor(offset / cs);
  let runEnd = Math.min(localEnd, (c + 1) * cs);
  const settling = l.settling;
  if (settling && settling(c)) {
    out.kind = PENDING;
    out.length = runEnd - offset;
    return out;
  }
  const id = table[c]!;
  if (storageless(l, id)) {
    while (runEnd < localEnd) {
      const next = runEnd / cs;
      if (!storageless(l, table[next]!) || (settling && settling(next))) break;
      runEnd = Math.min(localEnd, runEnd + cs);
    }
    out.kind = ZERO;
    out.length = runEnd - offset;
    return out;
  }
  let prev = id;
  while (runEnd < localEnd) {
    const next = runEnd / cs;
    // The settling flag before the table entry: see directRoute.
    if (settling && settling(next)) break;
    const nextId = table[next]!;
    if (nextId !== prev + 1 || storageless(l, nextId)) break;
    prev = nextId;
    runEnd = Math.min(localEnd, runEnd + cs);
  }
  out.kind = STORED;
  out.host = l.dataOffset + id * cs + (offset - c * cs);
  out.length = runEnd - offset;
  return out;
}

/** The chunk has no storage to read: unmapped, or mapped past the end of storage (§4.3). */
function storageless(l: MappingLayout, id: number): boolean {
  return id === CHUNK_EMPTY || l.dataOffset + id * l.chunkSize >= l.storageEnd;
}

/**
 * The engine's state as the daemon's queue workers share it, all in SharedArrayBuffers updated in
 * place by the engine (FvdImage.sharedView; docs/DESIGN.md §2.1 gives the memory-ordering rules).
 * Defined here, once, beside the rule that reads it (directRoute).
 */
export interface SharedView {
  /**
   * [0] is the virtual size in bytes: grows while serving (FvdImage.growOnline) before the kernel
   * is told (UPDATE_SIZE), so no request the kernel sends lies past it (docs/DESIGN.md §2.1).
   */
  liveSize: Float64Array;
  dataOffset: number;
  blockSize: number;
  chunkSize: number;
  /** min(base size, virtual size): bytes the base has; 0 without a base (MappingLayout.baseLimit). */
  baseLimit: number;
  baseBlocks: number;
  /** Bytes covered by bitmap blocks; past it everything is local. */
  bitmapEnd: number;
  /** When the view was taken (informational); the live value is `fullyLocal`. */
  allLocal: boolean;
  /**
   * [0] is 1 while every block is local: set at open from the engine's state, to 1 when prefetch
   * finishes while serving, back to 0 when a base is attached again.
   */
  fullyLocal: Int32Array;
  present: Uint8Array;
  journaled: Uint8Array;
  table: Uint32Array | null;
  /**
   * The data area holds ciphertext (FORMAT.md §11). Routing is the same as unencrypted (the
   * storage offsets do not change); the worker encrypts/decrypts fast-path data itself.
   */
  encrypted: boolean;
  /**
   * Compact images: per virtual chunk, 1 while a snapshot shares its storage (the engine must
   * copy it before a write; it clears the flag after updating the table). Null when raw-like.
   */
  shared: Uint8Array | null;
}

/** What routing reads of the shared view. */
export type SharedMappingView = Pick<
  SharedView,
  'dataOffset' | 'blockSize' | 'chunkSize' | 'baseLimit' | 'baseBlocks' | 'fullyLocal' | 'present' | 'journaled' | 'table' | 'shared'
>;

/** directRoute: the engine must serve the request (mixed kinds, bitmap work, allocation, ...). */
export const ENGINE = 4;
export type DirectRouteKind = typeof STORED | typeof BASE | typeof ZERO | typeof ENGINE;

// Scratch state of directRoute: workers are single-threaded and the call never yields.
const directLayout = storageLayout(0, 1, 1, null);
let directShared: Uint8Array | null = null;
// The flag is read atomically before the table entry (mapRun asks `settling` first): the engine
// clears it only after pointing the table at the chunk's private copy, so a cleared flag
// guarantees the new mapping is seen.
const sharedChunk = (c: number): boolean => Atomics.load(directShared!, c) !== 0;

/**
 * The fast path's rule: how a request of the virtual disk reads or writes as a whole, seen from
 * the shared view. Allocation-free: once per request. Returns
 * - STORED: one contiguous extent of the image file, from `out.host` (reads and writes);
 * - BASE (reads only): no byte is local; `out.length` bytes from the offset are in the base (the
 *   base's own bytes at the same offset) and the rest of the request, if any, lies past the
 *   base's end and reads as zeros (the last block of a base that ends inside it);
 * - ZERO (reads only): every byte reads as zeros without reading anything — an unmapped chunk,
 *   a local (e.g. zero-detected) block in an unmapped chunk, non-local bytes past the base's end;
 * - ENGINE: anything else — a mix of kinds, chunks not adjacent in storage, any write that is
 *   not one journaled STORED extent (bitmap work, copy-on-write, allocation), a write to a chunk
 *   a snapshot shares.
 * `out.length` is the request's length for STORED/ZERO, the base's part of it for BASE; `out.host`
 * is meaningful for STORED.
 */
export function directRoute(v: SharedMappingView, offset: number, length: number, write: boolean, out: MappedRun): DirectRouteKind {
  const allLocal = v.fullyLocal[0] !== 0;
  const baseBlocks = allLocal ? 0 : v.baseBlocks;
  if (write && baseBlocks > 0) {
    // A write needs the bits journaled as well as set (present covers the reads, in mapRun).
    const bs = v.blockSize;
    const b1 = Math.min(Math.floor((offset + length - 1) / bs), baseBlocks - 1);
    for (let b = Math.floor(offset / bs); b <= b1; b++) if ((v.journaled[b >>> 3]! & (1 << (b & 7))) === 0) return ENGINE;
  }
  const l = directLayout;
  l.dataOffset = v.dataOffset;
  l.blockSize = v.blockSize;
  l.chunkSize = v.chunkSize;
  // With every block local nothing comes from the base: no bytes are BASE (nor ZERO past its end).
  l.baseLimit = allLocal ? 0 : v.baseLimit;
  l.baseBlocks = baseBlocks;
  l.bitmap = v.present;
  l.table = v.table;
  directShared = write ? v.shared : null;
  l.settling = directShared ? sharedChunk : null;
  const run = mapRun(l, offset, length, out);
  const kind = run.kind;
  if (write) return kind === STORED && run.length === length ? STORED : ENGINE;
  if (run.length === length) return kind === PENDING ? ENGINE : kind;
  if (kind === BASE) {
    // Base bytes up to the base's end, then zeros: only if the rest is all ZERO.
    const inBase = run.length;
    const end = offset + length;
    for (let pos = offset + inBase; pos < end; pos += run.length) if (mapRun(l, pos, end - pos, run).kind !== ZERO) return ENGINE;
    run.kind = BASE;
    run.length = inBase;
    run.host = 0;
    return BASE;
  }
  if (kind !== ZERO) return ENGINE;
  // ZERO runs split by locality (unmapped chunk of local blocks, then non-local bytes past the
  // base's end) still read as zeros as a whole.
  const end = offset + length;
  for (let pos = offset + run.length; pos < end; pos += run.length) if (mapRun(l, pos, end - pos, run).kind !== ZERO) return ENGINE;
  run.kind = ZERO;
  run.length = length;
  run.host = 0;
  return ZERO;
}
