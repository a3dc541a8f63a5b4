/**
 * Copy-on-read hints: queue threads that answered a read from the base themselves (daemon/fvd-queue.ts)
 * tell the engine which blocks to copy into the image, without waiting for the copy.
 *
 * Shared memory only, so a hint costs the queue thread no allocation, promise or closure:
 * - an Int32 word array: [0] bytes of hinted blocks not yet released (the bound), [1] a wake flag;
 * - a bitmap of hinted blocks (coalescing: a block already hinted and not yet released is not
 *   hinted again, by any queue);
 * - per queue, a single-producer (that queue) single-consumer (main thread) ring of (block, slot)
 *   pairs (daemon/spsc-ring.ts; their own wake flags unused: one flag for all, below); a slot
 *   >= 0 carries block's data (below), a negative slot -n is a run of n blocks from block on
 *   without data (the main thread reads the base itself, once for the run: a 128 KiB read of
 *   4 KiB blocks is one entry and one copy, not 32);
 * - data slots (a hint that carries its block's data): one block-sized slot each in a pool of
 *   mmap'ed memory allocated by the main thread (ffi/uring.ts allocPinned, not populated: pages
 *   are touched only by the slots used), every thread mapping the same addresses. Each queue owns
 *   its own range of slots, as many as hints can be outstanding (up to 256): every hint can carry
 *   its data however far the engine's copies lag (with 32, only about a third did in a guest's 4K
 *   random reads: the rest found every slot BUSY). A queue takes its lowest free slot, so the
 *   pages touched follow the peak of carried hints in flight, not the pool's size. A slot's state
 *   is one Int32 (FREE / BUSY): only the owning queue turns it BUSY (when it reads a block into
 *   it), only the main thread turns it FREE (after the copy wrote or skipped it). The data is
 *   written before the ring's tail is stored and read after the tail is loaded (sequentially
 *   consistent Atomics), and the queue never touches a BUSY slot, so the main thread reads it
 *   whole and unchanged.
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

import { SpscRing } from './spsc-ring.js';

/** What the main thread hands to every queue worker (structured-clonable). */
export interface CorHintShared {
  words: SharedArrayBuffer;
  hinted: SharedArrayBuffer;
  rings: SharedArrayBuffer[];
  capBytes: number;
  blockSize: number;
  baseBlocks: number;
  /** Int32 per data slot: SLOT_FREE or SLOT_BUSY; queue q owns [q * slotsPerQueue, (q + 1) * slotsPerQueue). */
  slots: SharedArrayBuffer;
  /** 0: hints never carry data. */
  slotsPerQueue: number;
  /** The pool of slots (slot i at poolAddress + i * blockSize), 0 / 0 without one. */
  poolAddress: number;
  poolLength: number;
}

export const SLOT_FREE = 0;
export const SLOT_BUSY = 1;
/** The slot drain reports for a hint without data (in the ring: -1, a run of one block). */
export const NO_SLOT = -1;
/** Hints carry data only for blocks up to this size (a slot per block; keeps the pool small). */
export const MAX_SLOT_BLOCK = 256 * 1024;
/**
 * Covers the default cap (16 MiB of 64 KiB blocks = 256 hints) whole; smaller blocks get up to
 * 256 slots (a slot search scans at most that many words).
 */
const MAX_SLOTS_PER_QUEUE = 256;

const W_OUTSTANDING = 0;
const W_WAKE = 1;
/** A ring entry: (block, slot) — slot < 0 is a run of -slot blocks without data. */
const ENTRY_WORDS = 2;

function ringCapacity(capBytes: number, blockSize: number): number {
  return Math.floor(capBytes / blockSize) + 1;
}

/** Data slots per queue: no more than hints can be outstanding, at most 256, none for large blocks. */
export function slotsPerQueue(capBytes: number, blockSize: number): number {
  return blockSize <= MAX_SLOT_BLOCK ? Math.min(ringCapacity(capBytes, blockSize), MAX_SLOTS_PER_QUEUE) : 0;
}

/** Bytes of the data-slot pool the main thread allocates for `queues` queues (0: no pool). */
export function corSlotPoolBytes(capBytes: number, blockSize: number, queues: number): number {
  return slotsPerQueue(capBytes, blockSize) * queues * blockSize;
}

/**
 * The shared state of the hints. `pool`: the data-slot pool (corSlotPoolBytes long, allocated by
 * the caller, who frees it once the workers are gone and every carried copy finished), or null:
 * hints carry no data.
 */
export function createCorHints(
  capBytes: number,
  blockSize: number,
  baseBlocks: number,
  queues: number,
  pool: { address: number; length: number } | null = null,
): CorHintShared {
  const capacity = ringCapacity(capBytes, blockSize);
  const perQueue = pool ? slotsPerQueue(capBytes, blockSize) : 0;
  if (pool && pool.length < perQueue * queues * blockSize) throw new Error(`copy-on-read slot pool: ${pool.length} B, ${perQueue * queues * blockSize} B needed`);
  return {
    words: new SharedArrayBuffer(8),
    hinted: new SharedArrayBuffer(Math.max(1, Math.ceil(baseBlocks / 32)) * 4),
    rings: Array.from({ length: queues }, () => SpscRing.create(capacity, ENTRY_WORDS)),
    capBytes,
    blockSize,
    baseBlocks,
    slots: new SharedArrayBuffer(Math.max(1, perQueue * queues) * 4),
    slotsPerQueue: perQueue,
    poolAddress: pool && perQueue > 0 ? pool.address : 0,
    poolLength: pool && perQueue > 0 ? pool.length : 0,
  };
}

/** A queue thread's side: offers blocks. */
export class CorHintProducer {
  private readonly words: Int32Array;
  private readonly hinted: Int32Array;
  private readonly ring: SpscRing;
  private readonly cap: number;
  private readonly bs: number;
  private readonly baseBlocks: number;
  private readonly slots: Int32Array;
  /** This queue's slots: [slot0, slot0 + nSlots). */
  private readonly slot0: number;
  private readonly nSlots: number;
  private readonly poolAddress: number;
  /** Hints offered, dropped at the cap, and coalesced with one already pending (figures). */
  offered = 0;
  dropped = 0;
  coalesced = 0;
  /** Hints pushed with their block's data. */
  carried = 0;
  /** takeSlot calls that found every slot of this queue BUSY (figures). */
  noSlot = 0;

  constructor(s: CorHintShared, qid: number) {
    this.words = new Int32Array(s.words);
    this.hinted = new Int32Array(s.hinted);
    this.ring = new SpscRing(s.rings[qid]!, ENTRY_WORDS);
    this.cap = s.capBytes;
    this.bs = s.blockSize;
    this.baseBlocks = s.baseBlocks;
    this.slots = new Int32Array(s.slots);
    this.nSlots = s.slotsPerQueue;
    this.slot0 = qid * s.slotsPerQueue;
    this.poolAddress = s.poolAddress;
  }

  /** Hints may carry data (the pool has slots for this queue). */
  get carriesData(): boolean {
    return this.nSlots > 0;
  }

  /**
   * Hints the blocks of [offset, offset + length) below the base's blocks. Returns true when the
   * caller must wake the main thread (post one message).
   */
  offer(offset: number, length: number): boolean {
    const bs = this.bs;
    const b1 = Math.min(Math.floor((offset + length - 1) / bs), this.baseBlocks - 1);
    let pushed = false;
    // Claimed neighbours go as one run entry (-count): one copy of the run on the main thread.
    let first = -1;
    for (let b = Math.floor(offset / bs); b <= b1; b++) {
      if (this.claim(b)) {
        if (first < 0) first = b;
      } else if (first >= 0) {
        this.pushEntry(first, first - b);
        first = -1;
        pushed = true;
      }
    }
    if (first >= 0) {
      this.pushEntry(first, first - b1 - 1);
      pushed = true;
    }
    return pushed && Atomics.exchange(this.words, W_WAKE, 1) === 0;
  }

  /**
   * Newly hints block b (below the base's blocks) for this queue: false when it is already
   * hinted (coalesced) or the cap is full (dropped). A claimed block must be pushed (push).
   */
  claim(b: number): boolean {
    const bs = this.bs;
    this.offered++;
    const word = b >>> 5;
    const bit = 1 << (b & 31);
    if ((Atomics.load(this.hinted, word) & bit) !== 0) {
      this.coalesced++;
      return false;
    }
    if (Atomics.add(this.words, W_OUTSTANDING, bs) + bs > this.cap) {
      Atomics.sub(this.words, W_OUTSTANDING, bs);
      this.dropped++;
      return false;
    }
    if ((Atomics.or(this.hinted, word, bit) & bit) !== 0) {
      // Another queue hinted it meanwhile.
      Atomics.sub(this.words, W_OUTSTANDING, bs);
      this.coalesced++;
      return false;
    }
    return true;
  }

  /**
   * The lowest free slot of this queue, now BUSY (the caller fills it, then pushes it or gives it
   * back), or -1: all in use. Lowest first: the pool's pages touched stay those of the most slots
   * ever BUSY at once.
   */
  takeSlot(): number {
    const end = this.slot0 + this.nSlots;
    for (let slot = this.slot0; slot < end; slot++) {
      if (Atomics.load(this.slots, slot) === SLOT_FREE) {
        // Only this thread turns this queue's slots BUSY: no other taker to race with.
        Atomics.store(this.slots, slot, SLOT_BUSY);
        return slot;
      }
    }
    if (this.nSlots > 0) this.noSlot++;
    return -1;
  }

  /** A slot taken but not pushed (its read did not complete) is free again. */
  giveBack(slot: number): void {
    Atomics.store(this.slots, slot, SLOT_FREE);
  }

  /** The address of a slot's blockSize bytes in the pool. */
  slotAddress(slot: number): number {
    return this.poolAddress + slot * this.bs;
  }

  /** Byte offset of a slot in the pool. */
  slotOffset(slot: number): number {
    return slot * this.bs;
  }

  /**
   * Pushes a claimed block, with the slot holding its data (filled before this call) or NO_SLOT.
   * Returns true when the caller must wake the main thread (post one message).
   */
  push(b: number, slot: number): boolean {
    if (slot !== NO_SLOT) this.carried++;
    this.pushEntry(b, slot);
    return Atomics.exchange(this.words, W_WAKE, 1) === 0;
  }

  private pushEntry(b: number, slot: number): void {
    const ring = this.ring;
    const at = ring.slot();
    ring.words[at] = b;
    ring.words[at + 1] = slot;
    ring.publish(); // publishes the entry and the slot's data
  }
}

/** The main thread's side: drains the rings and releases blocks once handled. */
export class CorHintConsumer {
  private readonly words: Int32Array;
  private readonly hinted: Int32Array;
  private readonly rings: SpscRing[];
  private readonly bs: number;
  private readonly slots: Int32Array;
  /** Per data slot, its block of the pool (views made once); empty without a pool. */
  private readonly slotViews: Uint8Array[];

  /** `pool`: the bytes of the data-slot pool at s.poolAddress (the main thread's mapping), or null. */
  constructor(s: CorHintShared, pool: Uint8Array | null = null) {
    this.words = new Int32Array(s.words);
    this.hinted = new Int32Array(s.hinted);
    this.rings = s.rings.map((r) => new SpscRing(r, ENTRY_WORDS));
    this.bs = s.blockSize;
    this.slots = new Int32Array(s.slots);
    const n = s.slotsPerQueue * s.rings.length;
    if (n > 0 && (!pool || pool.length < n * s.blockSize)) throw new Error('copy-on-read hints carry data: the consumer needs the slot pool');
    this.slotViews = Array.from({ length: n }, (_, i) => pool!.subarray(i * s.blockSize, (i + 1) * s.blockSize));
  }

  /**
   * Calls fn for every hint pushed so far: a block with the slot that carries its data (count 1),
   * or a run of `count` blocks from `block` on without data (slot NO_SLOT); returns how many
   * hints. Every block is released (release, releaseRun) and every slot freed (freeSlot) later.
   */
  drain(fn: (block: number, slot: number, count: number) => void): number {
    Atomics.store(this.words, W_WAKE, 0); // before reading the tails: see the file comment
    let n = 0;
    for (const ring of this.rings) {
      const w = ring.words;
      for (let left = ring.available(); left > 0; left--) {
        const at = ring.oldest();
        const block = w[at]!;
        const slot = w[at + 1]!;
        // The entry is free before fn may release the block: every entry still in a ring is
        // counted in the outstanding bytes, which keeps the rings from overflowing.
        ring.consume();
        if (slot >= 0) fn(block, slot, 1);
        else fn(block, NO_SLOT, -slot);
        n++;
      }
    }
    return n;
  }

  /** A carried block's data (blockSize bytes; zeros past the base's end). Valid until freeSlot. */
  slotData(slot: number): Uint8Array {
    return this.slotViews[slot]!;
  }

  /** The carried data was written or skipped: the owning queue may reuse the slot. */
  freeSlot(slot: number): void {
    Atomics.store(this.slots, slot, SLOT_FREE);
  }

  /** Slots in use (BUSY), for tests and the stop's check. */
  busySlots(): number {
    let n = 0;
    for (let i = 0; i < this.slotViews.length; i++) if (Atomics.load(this.slots, i) === SLOT_BUSY) n++;
    return n;
  }

  /** The block's hint is done with (copied, already local, or dropped): it may be hinted again. */
  release(block: number): void {
    Atomics.and(this.hinted, block >>> 5, ~(1 << (block & 31)));
    Atomics.sub(this.words, W_OUTSTANDING, this.bs);
  }

  /** Releases blocks [first, first + count) (a run's hint). */
  releaseRun(first: number, count: number): void {
    for (let b = first; b < first + count; b++) this.release(b);
  }

  /** Bytes of hinted blocks not yet released. */
  outstanding(): number {
    return Atomics.load(this.words, W_OUTSTANDING);
  }
}
