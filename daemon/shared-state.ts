/**
 * What the queue workers share with the engine on the main thread, all in SharedArrayBuffers:
 * the bitmaps and lookup table (to route fast-path requests themselves) and, per queue, a
 * completion ring through which the main thread hands back requests it served.
 */
import type { FvdImage } from '../fvd/image.js';
import { directHostOffset } from '../fvd/mapping.js';

export interface EngineView {
  size: number;
  dataOffset: number;
  blockSize: number;
  chunkSize: number;
  baseBlocks: number;
  /** Bytes covered by bitmap blocks; past it everything is local. */
  bitmapEnd: number;
  /** When the view was taken (informational); the live value is `fullyLocal`. */
  allLocal: boolean;
  /**
   * [0] is 1 while every block is local: set at open from the engine's state, to 1 when prefetch
   * finishes while serving, back to 0 when a base is attached again.
   */
  fullyLocal: Int32Array;
  present: Uint8Array;
  journaled: Uint8Array;
  table: Uint32Array | null;
  /**
   * The data area holds ciphertext (FORMAT.md §11). Routing is the same as unencrypted (the
   * storage offsets do not change); the worker encrypts/decrypts fast-path data itself
   * (daemon/fast-crypt.ts) with the key from QueueWorkerData.
   */
  encrypted: boolean;
  /**
   * Compact images: per virtual chunk, 1 while a snapshot shares its storage (the engine must
   * copy it before a write; it clears the flag after updating the table). Null when raw-like.
   */
  shared: Uint8Array | null;
}

export function engineView(image: FvdImage): EngineView {
  return image.sharedView();
}

/**
 * Storage offset for a request the worker may serve directly, or -1 when the engine must handle
 * it: the engine's rule (fvd/mapping.ts directHostOffset). Allocation-free; called once per request.
 */
export function mapDirect(v: EngineView, offset: number, length: number, write: boolean): number {
  return directHostOffset(v, offset, length, write);
}

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
