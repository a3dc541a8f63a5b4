/**
 * resize: grows or shrinks the virtual disk (FORMAT.md §12.5).
 */
import type { IoBackend } from '../io.js';
import { FvdError } from '../errors.js';
import { CHUNK_EMPTY, MAX_VIRTUAL_SIZE, SECTOR, roundUp } from '../format.js';
import { setRange, testBit } from '../bitmap.js';
import type { FvdImage } from '../image.js';
import { chunksOf } from '../metadata.js';
import { OfflineImage, baseBlocksOf } from './offline-image.js';
import { WINDOW } from './data-windows.js';
import { isZero } from '../bytes.js';
import { planLayout, switchTo } from './metadata-switch.js';

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
      if (isZero(piece)) continue;
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
