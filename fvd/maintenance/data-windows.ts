/**
 * How commit, rebase and resize walk data (fvd/maintenance.ts): runs of bitmap bits and windows
 * of whole blocks (their byte comparisons: ../bytes.ts).
 */
import { forEachClearRun, testBit } from '../bitmap.js';

/** Data is compared and copied in windows of this many bytes (rounded to whole blocks). */
export const WINDOW = 1024 * 1024;

/** The maximal runs [first, last] of set bits within [from, to]. */
export function setRuns(bm: Uint8Array, from: number, to: number): Array<[number, number]> {
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
export function clearRuns(bm: Uint8Array, from: number, to: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  if (to >= from) forEachClearRun(bm, from, to, (b, e) => out.push([b, e]));
  return out;
}

/** Window size for a block size: whole blocks, about WINDOW bytes. */
export function windowBytes(blockSize: number): number {
  return Math.max(1, Math.floor(WINDOW / blockSize)) * blockSize;
}

/** Splits block runs [first, last] into windows of at most WINDOW bytes: fn(b0, b1) in order. */
export async function windows(first: number, last: number, blockSize: number, fn: (b0: number, b1: number) => Promise<void>): Promise<void> {
  const per = windowBytes(blockSize) / blockSize;
  for (let b = first; b <= last; b += per) await fn(b, Math.min(last, b + per - 1));
}
