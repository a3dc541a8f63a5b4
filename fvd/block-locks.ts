/**
 * Per-block locks that keep copy-on-write, copy-on-read and zeroing of the same base block from
 * interleaving: a copy reads the base and then writes the image, and a guest write that slipped in
 * between would be overwritten with stale base data. Only the slow paths take locks; a write to
 * blocks that are already local and journaled never does.
 *
 * Lockers always take blocks in ascending order, so two range lockers cannot deadlock.
 */
export class BlockLocks {
  private readonly held = new Map<number, Array<() => void>>();

  isLocked(block: number): boolean {
    return this.held.has(block);
  }

  get size(): number {
    return this.held.size;
  }

  /** Locks [first, last] if none of it is locked; returns false (taking nothing) otherwise. */
  tryAcquire(first: number, last: number): boolean {
    for (let b = first; b <= last; b++) if (this.held.has(b)) return false;
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
    }
  }

  release(first: number, last: number): void {
    for (let b = first; b <= last; b++) {
      const waiters = this.held.get(b);
      this.held.delete(b);
      if (waiters) for (const wake of waiters) wake();
    }
  }
}
