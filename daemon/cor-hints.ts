/**
 * Copy-on-read hints: queue threads that answered a read from the base themselves (daemon/fvd-queue.ts)
 * tell the engine which blocks to copy into the image, without waiting for the copy.
 *
 * Shared memory only, so a hint costs the queue thread no allocation, promise or closure:
 * - an Int32 word array: [0] bytes of hinted blocks not yet released (the bound), [1] a wake flag;
 * - a bitmap of hinted blocks (coalescing: a block already hinted and not yet released is not
 *   hinted again, by any queue);
 * - per queue, a single-producer (that queue) single-consumer (main thread) ring of block numbers.
 *
 * A hint is dropped when the outstanding bytes would pass the cap (FVD's
 * max_outstanding_copy_on_read_data): the block stays in the base and the prefetcher copies it
 * later. A hinted block counts until the main thread releases it (copied, found local, or given
 * up), so every ring holds at most cap / blockSize entries and never overflows.
 *
 * Waking the main thread: after a push, the queue thread sets the wake flag; only the one that
 * turned it from 0 to 1 posts a message. The main thread clears the flag before it drains, so a
 * push it does not see in that drain sets the flag again and posts again (all accesses are
 * sequentially consistent Atomics).
 */

/** What the main thread hands to every queue worker (structured-clonable). */
export interface CorHintShared {
  words: SharedArrayBuffer;
  hinted: SharedArrayBuffer;
  rings: SharedArrayBuffer[];
  capBytes: number;
  blockSize: number;
  baseBlocks: number;
}

const W_OUTSTANDING = 0;
const W_WAKE = 1;
// A ring: Int32 [0] head (consumer), [1] tail (producer), then `capacity` block numbers.
const R_HEAD = 0;
const R_TAIL = 1;

export function createCorHints(capBytes: number, blockSize: number, baseBlocks: number, queues: number): CorHintShared {
  const capacity = Math.floor(capBytes / blockSize) + 1;
  return {
    words: new SharedArrayBuffer(8),
    hinted: new SharedArrayBuffer(Math.max(1, Math.ceil(baseBlocks / 32)) * 4),
    rings: Array.from({ length: queues }, () => new SharedArrayBuffer((2 + capacity) * 4)),
    capBytes,
    blockSize,
    baseBlocks,
  };
}

/** A queue thread's side: offers blocks. */
export class CorHintProducer {
  private readonly words: Int32Array;
  private readonly hinted: Int32Array;
  private readonly ring: Int32Array;
  private readonly capacity: number;
  private readonly cap: number;
  private readonly bs: number;
  private readonly baseBlocks: number;
  /** Hints offered, dropped at the cap, and coalesced with one already pending (figures). */
  offered = 0;
  dropped = 0;
  coalesced = 0;

  constructor(s: CorHintShared, qid: number) {
    this.words = new Int32Array(s.words);
    this.hinted = new Int32Array(s.hinted);
    this.ring = new Int32Array(s.rings[qid]!);
    this.capacity = this.ring.length - 2;
    this.cap = s.capBytes;
    this.bs = s.blockSize;
    this.baseBlocks = s.baseBlocks;
  }

  /**
   * Hints the blocks of [offset, offset + length) below the base's blocks. Returns true when the
   * caller must wake the main thread (post one message).
   */
  offer(offset: number, length: number): boolean {
    const bs = this.bs;
    const b1 = Math.min(Math.floor((offset + length - 1) / bs), this.baseBlocks - 1);
    let pushed = false;
    for (let b = Math.floor(offset / bs); b <= b1; b++) {
      this.offered++;
      const word = b >>> 5;
      const bit = 1 << (b & 31);
      if ((Atomics.load(this.hinted, word) & bit) !== 0) {
        this.coalesced++;
        continue;
      }
      if (Atomics.add(this.words, W_OUTSTANDING, bs) + bs > this.cap) {
        Atomics.sub(this.words, W_OUTSTANDING, bs);
        this.dropped++;
        continue;
      }
      if ((Atomics.or(this.hinted, word, bit) & bit) !== 0) {
        // Another queue hinted it meanwhile.
        Atomics.sub(this.words, W_OUTSTANDING, bs);
        this.coalesced++;
        continue;
      }
      const tail = this.ring[R_TAIL]!; // only this thread writes it
      this.ring[2 + (tail % this.capacity)] = b;
      Atomics.store(this.ring, R_TAIL, tail + 1);
      pushed = true;
    }
    return pushed && Atomics.exchange(this.words, W_WAKE, 1) === 0;
  }
}

/** The main thread's side: drains the rings and releases blocks once handled. */
export class CorHintConsumer {
  private readonly words: Int32Array;
  private readonly hinted: Int32Array;
  private readonly rings: Int32Array[];
  private readonly bs: number;

  constructor(s: CorHintShared) {
    this.words = new Int32Array(s.words);
    this.hinted = new Int32Array(s.hinted);
    this.rings = s.rings.map((r) => new Int32Array(r));
    this.bs = s.blockSize;
  }

  /** Calls fn for every hinted block pushed so far; returns how many. */
  drain(fn: (block: number) => void): number {
    Atomics.store(this.words, W_WAKE, 0); // before reading the tails: see the file comment
    let n = 0;
    for (const ring of this.rings) {
      const capacity = ring.length - 2;
      let head = ring[R_HEAD]!;
      const tail = Atomics.load(ring, R_TAIL);
      while (head !== tail) {
        const block = ring[2 + (head % capacity)]!;
        // The slot is free before fn may release the block: every entry still in a ring is
        // counted in the outstanding bytes, which keeps the rings from overflowing.
        Atomics.store(ring, R_HEAD, ++head);
        fn(block);
        n++;
      }
    }
    return n;
  }

  /** The block's hint is done with (copied, already local, or dropped): it may be hinted again. */
  release(block: number): void {
    Atomics.and(this.hinted, block >>> 5, ~(1 << (block & 31)));
    Atomics.sub(this.words, W_OUTSTANDING, this.bs);
  }

  /** Bytes of hinted blocks not yet released. */
  outstanding(): number {
    return Atomics.load(this.words, W_OUTSTANDING);
  }
}
