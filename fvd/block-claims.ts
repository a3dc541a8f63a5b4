/**
 * Claims on base blocks shared between threads: one bit per block in shared memory, set with a
 * compare-and-swap, so that the engine's block locks (fvd/block-locks.ts, main thread) and the
 * queue threads that copy-on-write a block themselves (daemon/queue-cow.ts) exclude each other.
 *
 * Whoever stores bytes into a block that is not yet local — a guest write's copy-on-write, a
 * copy-on-read or prefetch copy, a zeroing — holds the block's claim from before its decision
 * ("is the block still absent?") until the block's `present` bit is set (or the attempt is given
 * up). Without it, a copy that read the base could overwrite a guest write that landed in between
 * (docs/DESIGN.md §2.5).
 *
 * Queue threads never wait for a claim: they try once and hand the request to the engine when the
 * block is taken. The engine waits (asynchronously: Atomics.waitAsync on the claim's word, with a
 * timeout so that a wake-up it missed costs a few milliseconds, never a hang).
 */

/** How long the engine sleeps at most before looking at a claimed block again (ms). */
const WAIT_MS = 20;

/** Atomics.waitAsync (V8 8.7+, every Node we run; TypeScript types it from lib es2024 only). */
type WaitAsyncResult = { async: false; value: string } | { async: true; value: Promise<string> };
const waitAsync = (Atomics as unknown as { waitAsync(a: Int32Array, i: number, v: number, ms: number): WaitAsyncResult }).waitAsync;

export class BlockClaims {
  readonly words: Int32Array;

  /** `shared`: from create() (or another thread's BlockClaims.shared); `blocks`: how many bits. */
  constructor(
    readonly shared: SharedArrayBuffer,
    readonly blocks: number,
  ) {
    this.words = new Int32Array(shared);
    if (this.words.length * 32 < blocks) throw new RangeError(`block claims: ${this.words.length * 32} bits for ${blocks} blocks`);
  }

  /** Claims for blocks [0, blocks), none claimed. */
  static create(blocks: number): BlockClaims {
    return new BlockClaims(new SharedArrayBuffer(Math.max(1, Math.ceil(blocks / 32)) * 4), blocks);
  }

  /** Sets b's claim if it is free; false when someone holds it. */
  tryClaim(b: number): boolean {
    const words = this.words;
    const i = b >>> 5;
    const bit = 1 << (b & 31);
    for (;;) {
      const old = Atomics.load(words, i);
      if ((old & bit) !== 0) return false;
      if (Atomics.compareExchange(words, i, old, old | bit) === old) return true;
    }
  }

  /**
   * Claims every block of [first, last] if none of them is held, one compare-and-swap per 32-bit
   * word instead of one per block (a prefetch chunk of 1 MiB is 256 blocks of 4 KiB); false,
   * holding none of them, when one is held.
   */
  tryClaimRange(first: number, last: number): boolean {
    const words = this.words;
    for (let i = first >>> 5, end = last >>> 5; i <= end; i++) {
      const mask = wordMask(i, first, last);
      for (;;) {
        const old = Atomics.load(words, i);
        if ((old & mask) !== 0) {
          if (i > first >>> 5) this.releaseRange(first, (i << 5) - 1); // taken so far: give back
          return false;
        }
        if (Atomics.compareExchange(words, i, old, old | mask) === old) break;
      }
    }
    return true;
  }

  /** Clears the claims of [first, last] (held by the caller), waking the engine once per word. */
  releaseRange(first: number, last: number): void {
    for (let i = first >>> 5, end = last >>> 5; i <= end; i++) {
      Atomics.and(this.words, i, ~wordMask(i, first, last));
      Atomics.notify(this.words, i);
    }
  }

  /** Clears b's claim (held by the caller) and wakes the engine if it waits on the word. */
  release(b: number): void {
    const i = b >>> 5;
    Atomics.and(this.words, i, ~(1 << (b & 31)));
    Atomics.notify(this.words, i);
  }

  isClaimed(b: number): boolean {
    return (Atomics.load(this.words, b >>> 5) & (1 << (b & 31))) !== 0;
  }

  /** Claims b, waiting (asynchronously) while another thread holds it. */
  async claim(b: number): Promise<void> {
    const words = this.words;
    const i = b >>> 5;
    const bit = 1 << (b & 31);
    while (!this.tryClaim(b)) {
      const seen = Atomics.load(words, i);
      if ((seen & bit) === 0) continue; // released in between: try again
      const w = waitAsync(words, i, seen, WAIT_MS);
      if (w.async) await w.value;
    }
  }
}

/** The bits of word i that stand for blocks of [first, last]. */
function wordMask(i: number, first: number, last: number): number {
  const lo = Math.max(first - (i << 5), 0);
  const hi = Math.min(last - (i << 5), 31);
  return hi === 31 ? ~0 << lo : ((1 << (hi + 1)) - 1) & (~0 << lo);
}
