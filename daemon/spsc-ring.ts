/**
 * The one shared-memory ring the threads hand work through: single producer, single consumer,
 * fixed-size entries of Int32 words in a SharedArrayBuffer. Used by the completion rings (main →
 * queue), the stored-write rings (queue → main) and the copy-on-read hint rings (queue → main).
 *
 * Layout (Int32Array): [0] head (written by the consumer only), [1] tail (producer only), [2] a
 * wake flag (for rings whose producer wakes the consumer by a message: only the push that raises
 * it posts), [3] unused, then `capacity` entries of `width` words. Head and tail count modulo
 * 2·capacity (entry = count mod capacity; equal counts: empty, counts capacity apart: full), so
 * they never leave the Int32 range: plain counters would turn negative after 2^31 entries — hours
 * of a busy queue — and index outside the ring. The producer writes an entry's
 * words, then stores the tail; the consumer loads the tail, reads the entry, then stores the head —
 * all sequentially consistent Atomics on head and tail, so a published entry is read whole and an
 * entry is not overwritten before the consumer moved past it. Callers size the ring so that it
 * cannot overflow (each says why: one entry per tag in flight, or a byte cap); push does not check.
 *
 * No allocation, promise or closure per entry: the producer fills words at the index slot gives,
 * the consumer reads words at the index oldest gives.
 */
const HEAD = 0;
const TAIL = 1;
const WAKE = 2;
const HEADER = 4;

export class SpscRing {
  readonly words: Int32Array;
  readonly capacity: number;
  /** Where head and tail wrap: 2·capacity. */
  private readonly span: number;

  constructor(
    sab: SharedArrayBuffer,
    readonly width: number,
  ) {
    this.words = new Int32Array(sab);
    this.capacity = Math.floor((this.words.length - HEADER) / width);
    if (this.capacity < 1) throw new Error(`ring: ${sab.byteLength} bytes hold no entry of ${width} words`);
    this.span = 2 * this.capacity;
  }

  /** The shared memory of a ring of `capacity` entries of `width` words. */
  static create(capacity: number, width: number): SharedArrayBuffer {
    return new SharedArrayBuffer((HEADER + width * capacity) * 4);
  }

  /**
   * Producer: the index in `words` of the next entry's first word. Fill its `width` words, then
   * publish().
   */
  slot(): number {
    return HEADER + this.width * (this.words[TAIL]! % this.capacity); // only this thread writes the tail
  }

  /** Producer: makes the entry filled at slot() visible to the consumer. */
  publish(): void {
    const tail = this.words[TAIL]! + 1;
    Atomics.store(this.words, TAIL, tail === this.span ? 0 : tail);
  }

  /**
   * Producer, after publish: raises the wake flag; true when it was down — the caller must then
   * wake the consumer (one message). The consumer lowers it (lowerWake) before it reads the tail,
   * so an entry it does not see in that pass raises the flag again.
   */
  raiseWake(): boolean {
    return Atomics.exchange(this.words, WAKE, 1) === 0;
  }

  /** Consumer: before draining (see raiseWake). */
  lowerWake(): void {
    Atomics.store(this.words, WAKE, 0);
  }

  /**
   * Consumer: the entries published so far (one load of the tail). A drain takes that many and no
   * more: entries pushed meanwhile wait for the next drain (the wake flag says so), which keeps a
   * drain bounded however fast the producer refills the ring.
   */
  available(): number {
    return (Atomics.load(this.words, TAIL) - this.words[HEAD]! + this.span) % this.span; // only this thread writes the head
  }

  /**
   * Consumer, while available() entries remain: the index in `words` of the oldest one. Read its
   * words, then consume() — before acting on them: the slot is free again then, and acting
   * (completing a tag) may let the producer push its next entry.
   */
  oldest(): number {
    return HEADER + this.width * (this.words[HEAD]! % this.capacity);
  }

  /** Consumer: the entry oldest() gave is read; its slot may be reused. */
  consume(): void {
    const head = this.words[HEAD]! + 1;
    Atomics.store(this.words, HEAD, head === this.span ? 0 : head);
  }

  /** Entries published and not yet consumed (for tests and figures). */
  get length(): number {
    return (Atomics.load(this.words, TAIL) - Atomics.load(this.words, HEAD) + this.span) % this.span;
  }
}
