/**
 * rebase: changes an image's base, copying what differs unless -u (FORMAT.md §12.4).
 */
import path from 'node:path';
import type { IoBackend } from '../io.js';
import { FvdError } from '../errors.js';
import {
  AUTOCLEAR_FULLY_LOCAL,
  BASE_FORMAT_CHOICES,
  BASE_NONE,
  COMPAT_ZERO_DETECTED,
  MAX_BASE_PATH,
  baseFormatCode,
  crc,
  roundUp,
  type BaseFormat,
  type Header,
} from '../format.js';
import { setRange } from '../bitmap.js';
import { openBase, type BaseImage } from '../image.js';
import { chunksOf } from '../metadata.js';
import { OfflineImage, baseBlocksOf, resolveFrom } from './offline-image.js';
import { clearRuns, windowBytes, windows } from './data-windows.js';
import { isZero, sameBytes } from '../bytes.js';
import { planLayout, planPath, switchTo } from './metadata-switch.js';

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
