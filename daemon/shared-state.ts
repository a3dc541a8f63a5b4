/**
 * What the queue workers share with the engine on the main thread, all in SharedArrayBuffers:
 * the bitmaps and lookup table (to route fast-path requests themselves) and, per queue, a
 * completion ring through which the main thread hands back requests it served.
 */
import type { FvdImage } from '../fvd/image.js';
import { CHUNK_EMPTY } from '../fvd/format.js';

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
 * it (a base block not yet local, a bit not yet journaled for a write, an unmapped chunk, chunks
 * not adjacent in storage, a write to a chunk a snapshot shares). Allocation-free; called once per
 * request.
 */
export function mapDirect(v: EngineView, offset: number, length: number, write: boolean): number {
  const end = offset + length;
  if (offset < v.bitmapEnd && v.fullyLocal[0] === 0) {
    const bs = v.blockSize;
    const b0 = Math.floor(offset / bs);
    const b1 = Math.min(Math.floor((end - 1) / bs), v.baseBlocks - 1);
    for (let b = b0; b <= b1; b++) {
      const mask = 1 << (b & 7);
      if ((v.present[b >>> 3]! & mask) === 0) return -1;
      if (write && (v.journaled[b >>> 3]! & mask) === 0) return -1;
    }
  }
  const table = v.table;
  if (!table) return v.dataOffset + offset;
  const cs = v.chunkSize;
  const c0 = Math.floor(offset / cs);
  const c1 = Math.floor((end - 1) / cs);
  // The flag is read atomically before the table: the engine clears it only after pointing the
  // table at the chunk's private copy, so a cleared flag guarantees the new mapping is seen.
  const shared = v.shared;
  if (write && shared) for (let c = c0; c <= c1; c++) if (Atomics.load(shared, c) !== 0) return -1;
  const id = table[c0]!;
  if (id === CHUNK_EMPTY) return -1;
  for (let c = c0 + 1; c <= c1; c++) if (table[c] !== id + (c - c0)) return -1;
  return v.dataOffset + id * cs + (offset - c0 * cs);
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
