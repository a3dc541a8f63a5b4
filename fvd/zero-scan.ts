/**
 * Zero detection at create (FVD's "free write to zero-filled blocks"): which blocks of a base
 * read as zeros, so the image marks them local and never copies or reads them.
 *
 * A base that can list where its data is (`BaseImage.nextDataExtent`: holes of a raw file,
 * allocation of a qcow2 image) is read only where data may be: a sparse 20 GiB base with 64 MiB
 * of data costs 64 MiB of reads, not 20 GiB. Other bases are scanned in steps as before.
 */
import type { BlockFile } from './io.js';
import { setRange } from './bitmap.js';
import { isZero } from './bytes.js';
import { FvdError } from './errors.js';
import type { BaseImage } from './image-types.js';

/** Bytes read (and compared) at once. */
const ZERO_SCAN_BYTES = 4 * 1024 * 1024;
/** Reads of data extents kept in flight at once. */
const SCAN_READS_IN_FLIGHT = 8;

/** [start, end): bytes that may hold data; every byte outside such extents reads as zeros. */
export type DataExtent = [start: number, end: number];

/**
 * The first extent of a file at or after `offset` that may hold data (SEEK_DATA, then SEEK_HOLE),
 * clipped to [offset, size); null when no byte from `offset` to the end holds data. A file that
 * cannot tell where its data is answers the whole rest as data; one that knows its data but not
 * its holes answers from its first data to the end.
 */
export function fileDataExtent(file: BlockFile, offset: number): DataExtent | null {
  const size = file.size();
  if (offset >= size) return null;
  const start = file.nextData?.(offset) ?? offset;
  if (start >= size) return null;
  const hole = file.nextHole?.(start) ?? size;
  // A hole "at" start would contradict SEEK_DATA (a racing writer): then treat the rest as data.
  return [start, hole > start ? Math.min(hole, size) : size];
}

/**
 * Sets the bit of every all-zero block of [0, limit) of the base. What the base knows to be zero
 * from its metadata (holes of a raw file, unallocated and zero clusters of a qcow2 image, NBD
 * block status) is marked without reading it; a remote base is not read at all — that would
 * download the whole template at create — only asked. A last block cut by `limit` counts as zero
 * when its bytes below `limit` are.
 */
export async function markZeroBlocks(base: BaseImage, limit: number, blockSize: number, bitmap: Uint8Array): Promise<void> {
  if (base.nextDataExtent && !base.remote) await markByExtents(base, base.nextDataExtent.bind(base), limit, blockSize, bitmap);
  else await markByScan(base, limit, blockSize, bitmap);
}

/**
 * Every block is first taken as zero; a block overlapping a data extent loses its bit as soon as
 * one byte of the extent inside it is not zero. Bytes outside the extents read as zeros, so a bit
 * left set means the whole block reads as zeros — the same bitmap as reading everything.
 * Only the extents are read, in pieces of at most ZERO_SCAN_BYTES, SCAN_READS_IN_FLIGHT at a time
 * (a sparse base has many small extents: one read after the other would wait on each).
 */
async function markByExtents(
  base: BaseImage,
  nextDataExtent: (offset: number) => Promise<DataExtent | null>,
  limit: number,
  blockSize: number,
  bitmap: Uint8Array,
): Promise<void> {
  const step = Math.max(blockSize, Math.floor(ZERO_SCAN_BYTES / blockSize) * blockSize);
  const buffers: Buffer[] = [];
  const blocks = Math.ceil(limit / blockSize);
  // A scratch map of "no non-zero byte seen", copied into the bitmap at the end, so a failing
  // scan (the create is then refused) leaves the caller's bitmap as it was.
  const zeroSoFar = new Uint8Array(Math.ceil(blocks / 8));
  setRange(zeroSoFar, 0, blocks);

  const scanPiece = async (a: number, z: number): Promise<void> => {
    const buf = buffers.pop() ?? Buffer.allocUnsafe(step);
    try {
      await base.read(buf.subarray(0, z - a), a);
      for (let off = a; off < z; ) {
        const b = Math.floor(off / blockSize);
        const n = Math.min(z, (b + 1) * blockSize) - off;
        if (!isZero(buf.subarray(off - a, off - a + n))) zeroSoFar[b >>> 3]! &= ~(1 << (b & 7));
        off += n;
      }
    } finally {
      buffers.push(buf);
    }
  };
  const inFlight = new Set<Promise<void>>();
  let failure: { err: unknown } | null = null;
  try {
    for (let pos = 0; pos < limit && !failure; ) {
      const ext = await nextDataExtent(pos);
      if (!ext || ext[0] >= limit) break;
      const start = Math.max(ext[0], pos);
      const end = Math.min(ext[1], limit);
      if (end <= start) throw new FvdError(`base data extent [${ext[0]}, ${ext[1]}) asked at ${pos} does not move forward`, 'EIO');
      for (let a = start; a < end && !failure; ) {
        const z = Math.min(end, Math.floor(a / blockSize) * blockSize + step);
        // Blocks already known to hold data need no more reading.
        if (!allClear(zeroSoFar, a, z, blockSize)) {
          const p: Promise<void> = scanPiece(a, z)
            .catch((err: unknown) => void (failure ??= { err }))
            .finally(() => inFlight.delete(p));
          inFlight.add(p);
          if (inFlight.size >= SCAN_READS_IN_FLIGHT) await Promise.race(inFlight);
        }
        a = z;
      }
      pos = end;
    }
  } finally {
    // Never leave a read running into a base the caller is about to close.
    await Promise.all(inFlight);
  }
  if (failure) throw (failure as { err: unknown }).err;
  for (let i = 0; i < zeroSoFar.length; i++) bitmap[i]! |= zeroSoFar[i]!;
}

/** True when every block overlapping [a, z) is already known to hold data (nothing to learn by reading). */
function allClear(bm: Uint8Array, a: number, z: number, blockSize: number): boolean {
  const first = Math.floor(a / blockSize);
  const last = Math.ceil(z / blockSize);
  for (let b = first; b < last; b++) if (bm[b >>> 3]! & (1 << (b & 7))) return false;
  return true;
}

/** The step-wise scan for bases that cannot list their data: read every step not known zero. */
async function markByScan(base: BaseImage, limit: number, blockSize: number, bitmap: Uint8Array): Promise<void> {
  const step = Math.max(blockSize, Math.floor(ZERO_SCAN_BYTES / blockSize) * blockSize);
  const buf = Buffer.alloc(step);
  for (let pos = 0; pos < limit; pos += step) {
    const len = Math.min(step, limit - pos);
    if (await base.knownZero(pos, len)) {
      setRange(bitmap, pos / blockSize, Math.ceil(len / blockSize));
      continue;
    }
    if (base.remote) {
      for (let off = 0; off < len; off += blockSize)
        if (await base.knownZero(pos + off, Math.min(blockSize, len - off))) setRange(bitmap, (pos + off) / blockSize, 1);
      continue;
    }
    await base.read(buf.subarray(0, len), pos);
    for (let off = 0; off < len; off += blockSize) {
      const n = Math.min(blockSize, len - off);
      if (isZero(buf.subarray(off, off + n))) setRange(bitmap, (pos + off) / blockSize, 1);
    }
  }
}
