/**
 * commit: writes an image's local blocks into its base and empties it (FORMAT.md §12.3).
 */
import path from 'node:path';
import { holeAt, type IoBackend } from '../io.js';
import { FvdError } from '../errors.js';
import { AUTOCLEAR_FULLY_LOCAL, BASE_FVD, BASE_NONE, BASE_RAW, COMPAT_ZERO_DETECTED, baseFormatName, roundUp, type BaseFormat } from '../format.js';
import { setRange } from '../bitmap.js';
import { FvdImage, openBase } from '../image.js';
import { chunksOf } from '../metadata.js';
import { COMMIT_BASE, OfflineImage, baseBlocksOf, resolveFrom } from './offline-image.js';
import { setRuns, windowBytes, windows } from './data-windows.js';
import { isZero, sameBytes } from '../bytes.js';
import { planLayout, switchTo } from './metadata-switch.js';
import { resizeImage } from './resize.js';

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
