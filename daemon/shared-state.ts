/**
 * What the queue workers share with the engine on the main thread, all in SharedArrayBuffers:
 * the bitmaps and lookup table (to route fast-path requests themselves) and, per queue, a
 * completion ring through which the main thread hands back requests it served.
 */
import type { SharedView } from '../fvd/mapping.js';

/** The engine's shared view as the workers get it (defined in the engine: fvd/mapping.ts). */
export type EngineView = SharedView;

/**
 * Single-producer (main thread) single-consumer (worker) ring of completed tags with their results.
 * Layout (Int32Array): [0] head (consumer), [1] tail (producer), then `capacity` (tag, result) pairs.
 */
export class CompletionRing {
  readonly words: Int32Array;
  private readonly capacity: number;

  constructor(sab: SharedArrayBuffer) {
    this.words = new Int32Array(sab);
    this.capacity = (this.words.length - 2) >> 1;
  }

  static create(capacity: number): SharedArrayBuffer {
    return new SharedArrayBuffer((2 + 2 * capacity) * 4);
  }

  push(tag: number, result: number): void {
    const tail = Atomics.load(this.words, 1);
    const slot = 2 + 2 * (tail % this.capacity);
    this.words[slot] = tag;
    this.words[slot + 1] = result;
    Atomics.store(this.words, 1, tail + 1);
  }

  /** Calls fn for each completed (tag, result); returns how many. */
  drain(fn: (tag: number, result: number) => void): number {
    let head = Atomics.load(this.words, 0);
    const tail = Atomics.load(this.words, 1);
    let n = 0;
    while (head !== tail) {
      const slot = 2 + 2 * (head % this.capacity);
      fn(this.words[slot]!, this.words[slot + 1]!);
      head++;
      n++;
    }
    Atomics.store(this.words, 0, head);
    return n;
  }
}

/**
 * Writes a queue thread stored itself as whole base blocks (daemon/queue-cow.ts), queue → main
 * thread: single producer (the queue), single consumer (the main thread). It replaces a
 * postMessage per write: only the push that raises the wake flag posts a message, and the main
 * thread adopts every entry pushed so far, appends their pending-log records in one write and
 * wakes the queue once (measured against a message per write: no faster at 4K or 128K writes,
 * README — the wait for the main thread bounds them, not the hand-over's cost). The main thread clears the flag before it reads the tail, so an entry it does not
 * see in that drain raises the flag again and posts again (sequentially consistent Atomics).
 * A tag has at most one entry in flight, so `depth` entries never overflow.
 * Layout (Int32Array): [0] head (consumer), [1] tail (producer), [2] wake flag, [3] unused, then
 * `depth` entries of (tag, first block, last block, length).
 */
export class StoredRing {
  private readonly words: Int32Array;
  private readonly capacity: number;

  constructor(sab: SharedArrayBuffer) {
    this.words = new Int32Array(sab);
    this.capacity = (this.words.length - 4) >> 2;
  }

  static create(depth: number): SharedArrayBuffer {
    return new SharedArrayBuffer((4 + 4 * depth) * 4);
  }

  /** Queue thread: tag stored blocks [first, last]. True when the caller must post one wake message. */
  push(tag: number, first: number, last: number, length: number): boolean {
    const w = this.words;
    const tail = w[1]!; // only this thread writes it
    const at = 4 + 4 * (tail % this.capacity);
    w[at] = tag;
    w[at + 1] = first;
    w[at + 2] = last;
    w[at + 3] = length;
    Atomics.store(w, 1, tail + 1); // publishes the entry
    return Atomics.exchange(w, 2, 1) === 0;
  }

  /** Main thread: calls fn for every entry pushed so far; returns how many. */
  drain(fn: (tag: number, first: number, last: number, length: number) => void): number {
    const w = this.words;
    Atomics.store(w, 2, 0); // before reading the tail: see the class comment
    let head = w[0]!; // only this thread writes it
    const tail = Atomics.load(w, 1);
    let n = 0;
    while (head !== tail) {
      const at = 4 + 4 * (head % this.capacity);
      // The entry's tag may be reused only after fn completed it: reading first is safe.
      const tag = w[at]!;
      const first = w[at + 1]!;
      const last = w[at + 2]!;
      const length = w[at + 3]!;
      // The entry is free before fn completes its tag: the queue thread, running meanwhile, may
      // see the completion, get the tag's next request and push again.
      Atomics.store(w, 0, ++head);
      fn(tag, first, last, length);
      n++;
    }
    return n;
  }
}
