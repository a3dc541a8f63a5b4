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
