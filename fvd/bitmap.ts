/**
 * Bit operations on the copy-on-write bitmap: block b is bit (b % 8), least significant first, of
 * byte floor(b / 8). A set bit means the block's data lives in this image, not in the base.
 * Backed by SharedArrayBuffer so the daemon's queue workers can read it without copies.
 */
export function newBitmap(bytes: number): Uint8Array {
  return new Uint8Array(new SharedArrayBuffer(Math.max(bytes, 1)));
}

export function testBit(bm: Uint8Array, b: number): boolean {
  return (bm[b >>> 3]! & (1 << (b & 7))) !== 0;
}

/**
 * Atomic: queue threads set bits of the same shared bytes (daemon/queue-cow.ts answers a stored
 * write itself), and a plain read-modify-write here could drop a bit one of them set meanwhile.
 * Atomic also for setRange's whole bytes (stores of 0xff): the bits a thread sets become visible
 * to the others in the order it set them (QueueCow.publish: `present` before `journaled`).
 */
export function setBit(bm: Uint8Array, b: number): void {
  const i = b >>> 3;
  if (i < bm.length) Atomics.or(bm, i, 1 << (b & 7)); // past the end: ignored, as a plain store was
}

/** Sets bits [first, first + count). */
export function setRange(bm: Uint8Array, first: number, count: number): void {
  let b = first;
  const end = first + count;
  while (b < end && b & 7) setBit(bm, b++);
  for (const whole = Math.min(end >>> 3, bm.length); b >>> 3 < whole; b += 8) Atomics.store(bm, b >>> 3, 0xff);
  if (b >>> 3 >= bm.length) return; // past the end: ignored
  while (b < end) setBit(bm, b++);
}

/** True when every bit in [first, first + count) is set. */
export function allSet(bm: Uint8Array, first: number, count: number): boolean {
  let b = first;
  const end = first + count;
  while (b < end && b & 7) if (!testBit(bm, b++)) return false;
  while (b + 8 <= end) {
    if (bm[b >>> 3] !== 0xff) return false;
    b += 8;
  }
  while (b < end) if (!testBit(bm, b++)) return false;
  return true;
}

const POPCOUNT = new Uint8Array(256).map((_, i) => {
  let n = 0;
  for (let v = i; v; v >>= 1) n += v & 1;
  return n;
});

/** Number of set bits among the first `count` bits. */
export function countSet(bm: Uint8Array, count: number): number {
  let n = 0;
  const full = count >>> 3;
  for (let i = 0; i < full; i++) n += POPCOUNT[bm[i]!]!;
  for (let b = full * 8; b < count; b++) if (testBit(bm, b)) n++;
  return n;
}

/**
 * Calls fn(first, last) for each maximal run of clear bits within [from, to] (inclusive), in
 * order. The callback may set bits of the run it is given.
 */
export function forEachClearRun(bm: Uint8Array, from: number, to: number, fn: (first: number, last: number) => void): void {
  let b = from;
  while (b <= to) {
    if (testBit(bm, b)) {
      b++;
      continue;
    }
    let e = b;
    while (e + 1 <= to && !testBit(bm, e + 1)) e++;
    fn(b, e);
    b = e + 1;
  }
}
