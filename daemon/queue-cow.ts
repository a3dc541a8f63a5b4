/**
 * Copy-on-write on the queue thread (docs/DESIGN.md §2.5): a guest write into ONE block that is
 * still only in the local raw base is stored whole by the queue thread itself — the base's bytes
 * around the guest's, one synchronous read of the base and one synchronous write of the image —
 * and so is a write of whole blocks (no base bytes needed), and a write into one block local
 * already whose bit is not journaled (a soft copy: written in place). The blocks are then
 * published here (publish: bits set, claims released) and the guest answered by the queue thread,
 * the main thread queuing their record later (FvdImage.journalAnsweredBlocks; DESIGN.md §2.5 step
 * 5) — or, with FVD_STORED_ANSWER=main, the main thread sets the bits, queues the record and
 * answers (FvdImage.adoptStoredBlocks).
 * Before, the main thread read the base and wrote the block through the libuv pool: two hand-offs
 * per copy-on-write, most of its time in the trace (README, `make bench-trace-dev`).
 *
 * Exclusion: the block's shared claim (fvd/block-claims.ts), which every engine lock of the block
 * also takes, is held from before the "still absent?" check until the bits are set (publish, or
 * the engine, which releases it then). A copy-on-read or prefetch copy or another guest write of the block
 * either ran before (the block is local: declined here) or waits / skips until the bit is set.
 *
 * Only what cannot block: both transfers synchronous (daemon/direct-io.ts). Anything else — the
 * block taken, already local, a read or write that would block, was short or failed — declines,
 * leaves no claim behind and the caller hands the request to the engine as before. A declined
 * attempt may have written part of the block: harmless, the block is absent, so nobody reads its
 * image bytes, and whoever makes it local writes the whole block first.
 *
 * Only for raw-like, unencrypted, writable images over a plain local raw base (the engine decides:
 * FvdImage.shareBlockClaims). No allocation, promise or closure per request.
 */
import { setRange } from '../fvd/bitmap.js';
import { BlockClaims } from '../fvd/block-claims.js';
import type { SharedView } from '../fvd/mapping.js';
import type { DirectIo } from './direct-io.js';

/** store()'s answer when it did nothing (the request goes to the engine). */
export const COW_DECLINED = -1;

export class QueueCow {
  readonly claims: BlockClaims;
  private readonly bs: number;
  /** The block being read (for the base read's end-of-file zero fill, made once). */
  private fillAt = 0;
  private readonly zeroFill: (from: number) => void;
  /** Blocks stored; writes into blocks local already (in place); declined attempts after a claim. */
  stored = 0;
  overwritten = 0;
  declined = 0;
  /** The last block of the range the last successful store() holds (its first is what it returned). */
  lastBlock = -1;

  /**
   * `bytes`/`bufBase`: the queue's request buffers (tag t's slice at t·maxIo, address bufBase +
   * t·maxIo); the last blockSize bytes of a tag's slice are free for the block (maxIo ≥ 2 blocks
   * for any request stored here: the guest's bytes at the slice's start must not overlap it).
   */
  constructor(
    private readonly view: SharedView,
    claims: SharedArrayBuffer,
    private readonly base: DirectIo,
    private readonly image: DirectIo,
    private readonly bytes: Uint8Array,
    private readonly bufBase: number,
    private readonly maxIo: number,
    /** Also copy-on-write a partial block (false: whole blocks only; EngineRequests queueCowMode). */
    private readonly partial = true,
  ) {
    this.bs = view.blockSize;
    this.claims = new BlockClaims(claims, view.baseBlocks);
    this.zeroFill = (from: number) => {
      this.bytes.fill(0, this.fillAt + from, this.fillAt + this.bs);
    };
  }

  /**
   * Tag's WRITE of `length` bytes at `offset` (its data at the start of the tag's slice): stores
   * the whole block (or the whole blocks a block-aligned write covers) and returns the first
   * block's number — `lastBlock` the last; their claims are then held, for the engine to release
   * after adoptStoredBlocks or for publish — or COW_DECLINED, nothing held.
   */
  store(tag: number, offset: number, length: number): number {
    const view = this.view;
    const bs = this.bs;
    if (view.fullyLocal[0] !== 0) return COW_DECLINED;
    const b = Math.floor(offset / bs);
    if (b >= view.baseBlocks) return COW_DECLINED;
    if (b !== Math.floor((offset + length - 1) / bs)) return this.storeWhole(tag, offset, length);
    const whole = offset === b * bs && length === Math.min(bs, view.liveSize[0]! - offset);
    // A partial block needs the base's bytes unless the block is local already. Looked at before
    // the claim: a set bit stays set (bits only go 0 -> 1 while served), so a partial write that
    // passes here finds the block local under the claim too; a clear bit is checked again there.
    if (!this.partial && !whole && !this.isPresent(b)) return COW_DECLINED;
    if (!this.claims.tryClaim(b)) return COW_DECLINED;
    if (this.isPresent(b)) {
      // Local already, its bit not journaled (else the write had taken the fast path): a soft copy
      // (prefetch, copy-on-read) whose bit waits for persistSoftBits, or a write the view had not
      // shown when routed. The image holds the whole block, so the guest's bytes are written in
      // place, partial or not, no base bytes; the caller's record makes the bit durable like a
      // store's. Before, such a write went to the engine: on a fresh image with prefetching on,
      // every write into a block the prefetcher had just copied took the main thread's path.
      if (this.image.transfer(true, this.bufBase + tag * this.maxIo, length, view.dataOffset + offset, this.zeroFill) !== length) return this.decline(b);
      this.overwritten++;
      this.lastBlock = b;
      return b;
    }
    if (length > this.maxIo - bs) return this.decline(b);
    // Absent, seen under the claim: nobody else can make the block local now.
    const start = b * bs;
    // The block as the image stores it: up to the disk's end (the last base block may pass it).
    const blockLen = Math.min(bs, view.liveSize[0]! - start);
    const slice = tag * this.maxIo;
    let at = slice;
    if (offset !== start || length !== blockLen) {
      // The base's block in the slice's tail, zeros past the base's end, the guest's bytes over it.
      at = slice + this.maxIo - bs;
      const inBase = Math.min(blockLen, view.baseLimit - start);
      this.fillAt = at;
      if (inBase > 0 && this.base.transfer(false, this.bufBase + at, inBase, start, this.zeroFill) !== inBase) return this.decline(b);
      if (inBase < blockLen) this.bytes.fill(0, at + Math.max(inBase, 0), at + blockLen);
      this.bytes.copyWithin(at + (offset - start), slice, slice + length);
    }
    if (this.image.transfer(true, this.bufBase + at, blockLen, view.dataOffset + start, this.zeroFill) !== blockLen) return this.decline(b);
    this.stored++;
    this.lastBlock = b;
    return b;
  }

  /**
   * A write of whole blocks [b0, b1] (aligned, two or more, all below the base's end): no base
   * bytes are needed, so it is stored as it is, under the claims of all its blocks (taken in
   * ascending order; one taken by someone else → all given back, declined). Whether a block is
   * local already does not matter: the guest's bytes replace the whole of it either way. Returns
   * b0; `lastBlock` says b1.
   */
  private storeWhole(tag: number, offset: number, length: number): number {
    const view = this.view;
    const bs = this.bs;
    if (offset % bs !== 0 || length % bs !== 0) return COW_DECLINED;
    const b0 = offset / bs;
    const b1 = b0 + length / bs - 1;
    if (b1 >= view.baseBlocks) return COW_DECLINED;
    const claims = this.claims;
    for (let b = b0; b <= b1; b++) {
      if (claims.tryClaim(b)) continue;
      for (let c = b0; c < b; c++) claims.release(c);
      return COW_DECLINED;
    }
    if (this.image.transfer(true, this.bufBase + tag * this.maxIo, length, view.dataOffset + offset, this.zeroFill) !== length) {
      for (let b = b0; b <= b1; b++) claims.release(b);
      this.declined++;
      return COW_DECLINED;
    }
    this.stored += b1 - b0 + 1;
    this.lastBlock = b1;
    return b0;
  }

  /**
   * After a successful store of blocks [b0, b1], when the queue answers the write itself
   * (DESIGN.md §2.5 step 5; with a pending log, after its record went to the queue log): the blocks become local — `present` first (a read finds the
   * stored bytes), then `journaled` (a later write takes the fast path: its record is queued by
   * the main thread before any commit a FLUSH waits for) — and the claims go, so whoever takes a
   * block next sees it local. Atomic bit sets (fvd/bitmap.ts): the main thread sets bits in the same bytes.
   */
  publish(b0: number, b1: number): void {
    setRange(this.view.present, b0, b1 - b0 + 1);
    setRange(this.view.journaled, b0, b1 - b0 + 1);
    for (let b = b0; b <= b1; b++) this.claims.release(b);
  }

  /** Block b's `present` bit (atomic: other threads set bits in the same byte). */
  private isPresent(b: number): boolean {
    return (Atomics.load(this.view.present, b >>> 3) & (1 << (b & 7))) !== 0;
  }

  private decline(b: number): number {
    this.claims.release(b);
    this.declined++;
    return COW_DECLINED;
  }
}
