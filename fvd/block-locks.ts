/**
 * Per-block locks that keep copy-on-write, copy-on-read and zeroing of the same base block from
 * interleaving: a copy reads the base and then writes the image, and a guest write that slipped in
 * between would be overwritten with stale base data. Only the slow paths take locks; a write to
 * blocks that are already local and journaled never does.
 *
 * Lockers always take blocks in ascending order, so two range lockers cannot deadlock.
 *
 * While queue threads copy-on-write blocks themselves (daemon/queue-cow.ts), a lock also holds
 * the blocks' shared claims (fvd/block-claims.ts): taken after the in-process lock, released with
 * it. Queue threads only ever try one claim and never wait, so waiting here cannot deadlock.
 */
import type { BlockClaims } from './block-claims.js';

/** state[] bits of a block: locked, and (with it) holding the block's shared claim. */
const LOCKED = 1;
const CLAIMED = 2;

export class BlockLocks {
  /**
   * Per block: LOCKED | CLAIMED. An array, not a map of blocks: a prefetch chunk locks and
   * releases hundreds of blocks (1 MiB of 4 KiB blocks), and per-block map entries and waiter
   * lists cost the main thread more CPU than the copy itself under emulation. Grows on demand.
   */
  private state = new Uint8Array(1024);
  /** Wake-ups of acquire() waiting for a block; a block is here only while someone waits for it. */
  private readonly waiters = new Map<number, Array<() => void>>();
  private held = 0;
  private claims: BlockClaims | null = null;

  /** From now on every lock of a block below `claims.blocks` also holds its shared claim (null: no more). */
  shareWith(claims: BlockClaims | null): void {
    this.claims = claims;
  }

  isLocked(block: number): boolean {
    return block < this.state.length && (this.state[block]! & LOCKED) !== 0;
  }

  /** How many blocks are locked. */
  get size(): number {
    return this.held;
  }

  /** Locks [first, last] if none of it is locked; returns false (taking nothing) otherwise. */
  tryAcquire(first: number, last: number): boolean {
    const state = this.room(last);
    for (let b = first; b <= last; b++) if (state[b] !== 0) return false;
    const claims = this.claims;
    const top = claims !== null ? Math.min(last, claims.blocks - 1) : first - 1;
    // A queue thread holds one of them: take nothing.
    if (top >= first && !claims!.tryClaimRange(first, top)) return false;
    for (let b = first; b <= last; b++) state[b] = b <= top ? LOCKED | CLAIMED : LOCKED;
    this.held += last - first + 1;
    return true;
  }

  /** Locks [first, last], waiting for holders. */
  async acquire(first: number, last: number): Promise<void> {
    for (let b = first; b <= last; b++) {
      while (this.isLocked(b)) {
        let list = this.waiters.get(b);
        if (!list) this.waiters.set(b, (list = []));
        await new Promise<void>((resolve) => list!.push(resolve));
      }
      this.room(b)[b] = LOCKED;
      this.held++;
      const claims = this.claims;
      if (claims !== null && b < claims.blocks) {
        await claims.claim(b);
        this.state[b] = LOCKED | CLAIMED;
      }
    }
  }

  release(first: number, last: number): void {
    const claims = this.claims;
    const state = this.state;
    // Claims released by runs (one atomic per word). A lock taken before claims were attached
    // holds none; detaching waits for no lock, and then nothing is released to the shared bits.
    let run = -1;
    const end = Math.min(last, state.length - 1); // past the array: never locked
    for (let b = first; b <= end; b++) {
      if ((state[b]! & CLAIMED) !== 0) {
        if (run < 0) run = b;
      } else if (run >= 0) {
        if (claims !== null) claims.releaseRange(run, b - 1);
        run = -1;
      }
      if (state[b] !== 0) this.held--;
      state[b] = 0;
    }
    if (run >= 0 && claims !== null) claims.releaseRange(run, end);
    if (this.waiters.size === 0) return;
    for (let b = first; b <= last; b++) {
      const list = this.waiters.get(b);
      if (!list) continue;
      this.waiters.delete(b);
      for (const wake of list) wake();
    }
  }

  /** The state array, grown to hold block `last`. */
  private room(last: number): Uint8Array {
    if (last < this.state.length) return this.state;
    let n = this.state.length;
    while (n <= last) n *= 2;
    const grown = new Uint8Array(n);
    grown.set(this.state);
    return (this.state = grown);
  }
}
