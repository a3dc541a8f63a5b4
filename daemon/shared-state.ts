/**
 * What the queue workers share with the engine on the main thread, all in SharedArrayBuffers:
 * the bitmaps and lookup table (to route fast-path requests themselves) and, per queue, a
 * completion ring through which the main thread hands back requests it served.
 */
import type { SharedView } from '../fvd/mapping.js';
import { SpscRing } from './spsc-ring.js';

/** The engine's shared view as the workers get it (defined in the engine: fvd/mapping.ts). */
export type EngineView = SharedView;

/**
 * Completed tags with their results, main thread → queue thread (an SpscRing of (tag, result)
 * pairs; the queue thread drains it when the eventfd wakes it). A tag has at most one entry in
 * flight, so the ring sized to the queue's depth never overflows.
 */
export class CompletionRing {
  private readonly ring: SpscRing;

  constructor(sab: SharedArrayBuffer) {
    this.ring = new SpscRing(sab, 2);
  }

  static create(capacity: number): SharedArrayBuffer {
    return SpscRing.create(capacity, 2);
  }

  push(tag: number, result: number): void {
    const ring = this.ring;
    const at = ring.slot();
    ring.words[at] = tag;
    ring.words[at + 1] = result;
    ring.publish();
  }

  /** Calls fn for each completed (tag, result); returns how many. */
  drain(fn: (tag: number, result: number) => void): number {
    const ring = this.ring;
    const w = ring.words;
    let n = 0;
    for (let left = ring.available(); left > 0; left--) {
      const at = ring.oldest();
      const tag = w[at]!;
      const result = w[at + 1]!;
      ring.consume();
      fn(tag, result);
      n++;
    }
    return n;
  }
}

/**
 * A StoredRing entry's tag when the queue thread answered the write itself (DESIGN.md
 * §2.5 step 5): the main thread only queues the blocks' record; there is no tag to complete.
 */
export const STORED_ANSWERED = -1;

/**
 * The StoredRing's size: with the queue answering its stored writes (STORED_ANSWERED) entries no
 * longer wait for their tag's completion, so a burst of them may outrun the main thread's drain;
 * a queue that finds the ring full hands the write to the engine instead (hasRoom). 16 bytes per
 * entry: 64 KiB per queue.
 */
export const STORED_RING_ENTRIES = 4096;

/**
 * Answered entries wake the main thread only once this many wait in the ring (pushAnswered):
 * nobody waits for their records but the next FLUSH or FUA write, which drains every ring first,
 * so until then they are taken in with the queue's once-a-second figures or its next entry that
 * waits. A wake per answered write cost the queue thread a postMessage and took the main thread
 * from the CPU the queue threads share (README, issue 11's table).
 */
export const ANSWERED_WAKE_AT = STORED_RING_ENTRIES / 4;

/**
 * Writes a queue thread stored itself as whole base blocks (daemon/queue-cow.ts), queue → main
 * thread: an SpscRing of (tag, first block, last block, length) with its wake flag. It replaces
 * a postMessage per write: only the push that raises the wake flag posts a message, and the main
 * thread adopts every entry pushed so far, appends their pending-log records in one write and
 * wakes the queue once (measured against a message per write: no faster at 4K or 128K writes,
 * README — the wait for the main thread bounds them, not the hand-over's cost). The main thread
 * lowers the flag before it reads the tail, so an entry it does not see in that drain raises
 * the flag again and posts again. A tag has at most one entry in flight waiting for its answer;
 * answered entries (STORED_ANSWERED) are bounded by the ring's room only (hasRoom) and raise the
 * flag only in numbers (pushAnswered).
 */
export class StoredRing {
  private readonly ring: SpscRing;

  constructor(sab: SharedArrayBuffer) {
    this.ring = new SpscRing(sab, 4);
  }

  static create(entries: number): SharedArrayBuffer {
    return SpscRing.create(entries, 4);
  }

  /** Queue thread: false when a push now would overwrite an entry the main thread has not read. */
  hasRoom(): boolean {
    return this.ring.length < this.ring.capacity;
  }

  /**
   * Queue thread: tag stored blocks [first, last] and waits for its answer. True when the
   * caller must post one wake message.
   */
  push(tag: number, first: number, last: number, length: number): boolean {
    this.put(tag, first, last, length);
    return this.ring.raiseWake();
  }

  /**
   * Queue thread: a write it stored as blocks [first, last] and answered itself. True when the
   * caller must post one wake message: only once ANSWERED_WAKE_AT entries wait.
   */
  pushAnswered(first: number, last: number, length: number): boolean {
    this.put(STORED_ANSWERED, first, last, length);
    return this.ring.length >= ANSWERED_WAKE_AT && this.ring.raiseWake();
  }

  private put(tag: number, first: number, last: number, length: number): void {
    const ring = this.ring;
    const w = ring.words;
    const at = ring.slot();
    w[at] = tag;
    w[at + 1] = first;
    w[at + 2] = last;
    w[at + 3] = length;
    ring.publish();
  }

  /** Main thread: calls fn for every entry pushed so far; returns how many. */
  drain(fn: (tag: number, first: number, last: number, length: number) => void): number {
    const ring = this.ring;
    const w = ring.words;
    ring.lowerWake(); // before reading the tail: see the class comment
    let n = 0;
    for (let left = ring.available(); left > 0; left--) {
      const at = ring.oldest();
      const tag = w[at]!;
      const first = w[at + 1]!;
      const last = w[at + 2]!;
      const length = w[at + 3]!;
      // The entry is free before fn completes its tag: the queue thread, running meanwhile, may
      // see the completion, get the tag's next request and push again.
      ring.consume();
      fn(tag, first, last, length);
      n++;
    }
    return n;
  }
}
