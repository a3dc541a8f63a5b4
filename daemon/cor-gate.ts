/**
 * When a queue thread may hint a base read for copy-on-read: copy-on-read yields to a busy guest
 * (docs/DESIGN.md §2.2). A queue counts as busy while the guest keeps more than `maxLoad`
 * requests on it (QueueLoop.load) and for `quietMs` after the last time it did.
 *
 * Why the quiet period: under a steady deep load, a queue served synchronously still sees turns
 * with one or two requests (the daemon answers faster than the guest refills); judging each read
 * alone hinted up to 9 % of the reads of fio 4K randread QD16, and each hint writes a whole block for
 * a few KiB read, so the copies still cost the guest most of its rate (README, fvd-cow against
 * fvd-cow-nocor). A guest at depth 1 never passes the bound and keeps every hint.
 */
export class CorGate {
  /** Until when (ms, the loop's clock) the queue counts as busy. */
  private busyUntil = 0;

  constructor(
    private readonly maxLoad: number,
    private readonly quietMs: number,
  ) {}

  /** True when a base read at this load and time (ms) may be hinted. */
  allows(load: number, now: number): boolean {
    if (load > this.maxLoad) {
      this.busyUntil = now + this.quietMs;
      return false;
    }
    return now >= this.busyUntil;
  }
}
