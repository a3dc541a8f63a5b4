/**
 * Copying base blocks into the image as *soft writes* (FORMAT.md §5.2): copy-on-read of guest
 * reads, and the prefetcher's copies (fvd/prefetch.ts through FvdImage.prefetchBlocks). The copied
 * data equals the base's, so only the in-memory `present` bit is set, after the data write
 * completed; losing it in a crash costs a re-read, never data. Journaling those bits later is the
 * engine's (FvdImage.persistSoftBits).
 *
 * A copy holds the block locks of the blocks it writes (fvd/block-locks.ts), shared with the
 * guest write path: a copy never overwrites a block a guest write made local, and a guest request
 * that holds a lock wins (the copy is skipped). Copy-on-read is bounded by `maxCorBytes` in flight
 * and turns itself off after its first failure (the blocks simply stay in the base).
 */
import { STAGE_BASE_END, STAGE_BASE_START, engineStamp, engineStampFirst } from './trace.js';
import { forEachClearRun, setRange } from './bitmap.js';
import type { BlockBufferPool } from './block-pool.js';
import type { BlockLocks } from './block-locks.js';
import type { DataArea } from './data-area.js';

/** The engine's view of the disk that the copies need. */
export interface CopyGeometry {
  /** Virtual size in bytes. */
  readonly size: number;
  readonly blockSize: number;
  /** Bytes backed by the base: min(base size, virtual size). */
  readonly baseLimit: number;
}

export class BaseCopier {
  /** Bytes of copy-on-read copies in flight (bounded by maxCorBytes). */
  private corBytes = 0;

  constructor(
    private readonly disk: CopyGeometry,
    private readonly present: Uint8Array,
    private readonly locks: BlockLocks,
    private readonly data: DataArea,
    /** Reads base bytes; past the base's end the disk reads zeros (FvdImage's readBaseRaw). */
    private readonly readBase: (buf: Uint8Array, offset: number) => Promise<void>,
    /** Registers a background copy, so that FvdImage.idle() waits for it. */
    private readonly track: (copy: Promise<void>) => void,
    /** Copy-on-read on; cleared after the first failed copy. */
    public copyOnRead: boolean,
    readonly maxCorBytes: number,
    /** Block buffers for copies without a caller's scratch (shared with FvdImage's copy-on-write). */
    private readonly blocks: BlockBufferPool,
  ) {}

  /** A run of blocks not local at submit time: read the base, maybe copy it into the image. */
  /** `slot`: the request's trace slot (fvd/trace.ts), or -1. */
  async readFromBase(buf: Uint8Array, offset: number, slot = -1): Promise<void> {
    const bs = this.disk.blockSize;
    const b0 = Math.floor(offset / bs);
    const b1 = Math.floor((offset + buf.length - 1) / bs);
    const wStart = b0 * bs;
    const wEnd = Math.min((b1 + 1) * bs, this.disk.size);
    const wLen = wEnd - wStart;
    if (slot >= 0) engineStampFirst(slot, STAGE_BASE_START);
    if (!this.copyOnRead || this.corBytes + wLen > this.maxCorBytes || !this.locks.tryAcquire(b0, b1)) {
      await this.readBase(buf, offset);
      if (slot >= 0) engineStamp(slot, STAGE_BASE_END);
      return;
    }
    // Copy-on-read: read whole blocks, answer the guest, write them to the image in background.
    this.corBytes += wLen;
    let whole: Uint8Array;
    try {
      whole = new Uint8Array(wLen);
      await this.readBase(whole, wStart);
    } catch (err) {
      this.corBytes -= wLen;
      this.locks.release(b0, b1);
      throw err;
    }
    if (slot >= 0) engineStamp(slot, STAGE_BASE_END);
    buf.set(whole.subarray(offset - wStart, offset - wStart + buf.length));
    this.track(this.copyToImage(whole, wStart, b0, b1));
  }

  /**
   * Copies the blocks of [b0, last] that are still absent, skipping runs a guest request holds
   * locked (they come back in a later pass). Returns the bytes read from the base; errors are
   * thrown. `scratch`, if large enough, is the copy buffer (free again once this resolves).
   */
  async copyAbsent(b0: number, last: number, scratch?: Uint8Array): Promise<number> {
    const runs: number[] = [];
    forEachClearRun(this.present, b0, last, (b, e) => runs.push(b, e));
    let bytes = 0;
    const bs = this.disk.blockSize;
    for (let i = 0; i < runs.length; i += 2) {
      const b = runs[i]!;
      const e = runs[i + 1]!;
      if (!this.locks.tryAcquire(b, e)) continue;
      const start = b * bs;
      const len = Math.min((e + 1) * bs, this.disk.size) - start;
      // Without the caller's scratch (a copy-on-read hint): a pooled block buffer for one block, a new one for a run.
      const own = scratch && scratch.length >= len ? null : len <= bs ? this.blocks.take() : new Uint8Array(len);
      const whole = own ? own.subarray(0, len) : scratch!.subarray(0, len);
      try {
        try {
          await this.readBase(whole, start);
        } catch (err) {
          this.locks.release(b, e);
          throw err;
        }
        bytes += Math.max(0, Math.min(whole.length, this.disk.baseLimit - start));
        this.corBytes += whole.length; // copyToImage accounts it back
        await this.copyToImage(whole, start, b, e, true);
      } finally {
        // Read and write are over (or failed): the buffer is free again.
        if (own && own.length === bs) this.blocks.give(own);
      }
    }
    return bytes;
  }

  /**
   * Copies the blocks of [b, last] still absent, in background (a queue thread's copy-on-read
   * hint). Never rejects: like a failed copy-on-read, a failed copy only turns copy-on-read off.
   */
  copyInBackground(b: number, last = b): Promise<void> {
    return this.copyAbsent(b, last).then(
      () => undefined,
      () => this.backgroundCopyFailed(),
    );
  }

  /**
   * Copies block b from `data` (its whole block as the base holds it: the base's bytes, zeros past
   * the base's end) if it is still absent, in background: a copy-on-read hint that carries the
   * block (daemon/cor-hints.ts), read by a queue thread before this call, without the lock. That
   * is safe because the base never changes while the image is served (every reader opens it
   * read-only; docs/DESIGN.md §2.2), so bytes read earlier are the bytes a read now would give; what decides whether
   * they may be written is, as for copyAbsent, the block lock and the present bit checked under
   * it: a guest write that made the block local (bit set) or holds its lock wins and the copy is
   * skipped. `data` is only read, and no longer once this resolves. Never rejects: a failed write
   * turns copy-on-read off.
   */
  copyCarried(b: number, data: Uint8Array): Promise<void> {
    if (!this.locks.tryAcquire(b, b)) return Promise.resolve(); // a guest request holds it: it wins
    const bs = this.disk.blockSize;
    const start = b * bs;
    const len = Math.min(bs, this.disk.size - start);
    this.corBytes += len; // copyToImage accounts it back
    return this.copyToImage(data.subarray(0, len), start, b, b, true).then(
      () => undefined,
      () => this.backgroundCopyFailed(),
    );
  }

  /** A failed background copy is harmless — the blocks stay in the base — but stops further copies. */
  private backgroundCopyFailed(): void {
    this.copyOnRead = false;
  }

  /** Writes the still-absent runs of `whole` (blocks [b0, b1], locked by the caller) and releases them. */
  private async copyToImage(whole: Uint8Array, wStart: number, b0: number, b1: number, rethrow = false): Promise<void> {
    try {
      // Only still-absent runs are stored. (The block locks keep writers out meanwhile, so
      // this is all of them; the check keeps a block that became local from being overwritten.)
      const bs = this.disk.blockSize;
      const runs: number[] = [];
      forEachClearRun(this.present, b0, b1, (b, e) => runs.push(b, e));
      for (let i = 0; i < runs.length; i += 2) {
        const b = runs[i]!;
        const e = runs[i + 1]!;
        const from = b * bs - wStart;
        const to = Math.min((e + 1) * bs, wStart + whole.length) - wStart;
        await this.data.write(whole.subarray(from, to), b * bs);
        setRange(this.present, b, e - b + 1); // soft: not journaled (FORMAT.md §5.2)
      }
    } catch (err) {
      if (rethrow) throw err;
      this.backgroundCopyFailed();
    } finally {
      this.corBytes -= whole.length;
      this.locks.release(b0, b1);
    }
  }
}
