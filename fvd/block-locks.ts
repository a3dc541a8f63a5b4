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

export class BlockLocks {
  private readonly held = new Map<number, Array<() => void>>();
  private claims: BlockClaims | null = null;
  /** Locked blocks whose shared claim the lock holds (claims may be attached while locks are held). */
  private readonly claimed = new Set<number>();

  /** From now on every lock of a block below `claims.blocks` also holds its shared claim (null: no more). */
  shareWith(claims: BlockClaims | null): void {
    this.claims = claims;
  }

  isLocked(block: number): boolean {
    return this.held.has(block);
  }

  get size(): number {
    return this.held.size;
  }

  /** Locks [first, last] if none of it is locked; returns false (taking nothing) otherwise. */
  tryAcquire(first: number, last: number): boolean {
    for (let b = first; b <= last; b++) if (this.held.has(b)) return false;
    const claims = this.claims;
    if (claims !== null) {
      const top = Math.min(last, claims.blocks - 1);
      for (let b = first; b <= top; b++) {
        if (claims.tryClaim(b)) continue;
        for (let c = first; c < b; c++) claims.release(c); // a queue thread holds b: take nothing
        return false;
      }
      for (let b = first; b <= top; b++) this.claimed.add(b);
    }
    for (let b = first; b <= last; b++) this.held.set(b, []);
    return true;
  }

  /** Locks [first, last], waiting for holders. */
  async acquire(first: number, last: number): Promise<void> {
    for (let b = first; b <= last; b++) {
      let waiters = this.held.get(b);
      while (waiters) {
        await new Promise<void>((resolve) => waiters!.push(resolve));
        waiters = this.held.get(b);
      }
      this.held.set(b, []);
      const claims = this.claims;
      if (claims !== null && b < claims.blocks) {
        await claims.claim(b);
        this.claimed.add(b);
      }
    }
  }

  release(first: number, last: number): void {
    const claims = this.claims;
    // (A lock taken before claims were attached holds none; detaching waits for no lock.)
    for (let b = first; b <= last; b++) {
      if (this.claimed.delete(b) && claims !== null) claims.release(b);
      const waiters = this.held.get(b);
      this.held.delete(b);
      if (waiters) for (const wake of waiters) wake();
    }
  }
}
