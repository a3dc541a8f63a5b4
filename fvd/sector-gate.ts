/**
 * Serializes the read-modify-write of partial sectors on encrypted images (FORMAT.md §11.3).
 *
 * XTS transforms whole 512-byte sectors, so a write that starts or ends inside a sector reads the
 * sector(s) around it, merges the new bytes into the plaintext and writes whole sectors. Between
 * that read and that write, nothing else may write those sectors, or its update is lost (the RMW
 * writes back the stale rest of the sector). Two kinds of writers take part:
 *
 * * an **RMW** registers the whole sector range it will write, [first, last], exclusively: it
 *   waits for registered ranges that overlap it (other RMWs), registers, then *drains*: it waits
 *   until every plain (whole-sector) write already in flight has completed, while new plain writes
 *   wait at the gate. Only then does it read. It unregisters after its write completed.
 * * a **plain** write (whole sectors: guest writes, write-zeroes, discards) enters without waiting
 *   unless an RMW is draining or a registered range overlaps its own; then it waits and retries.
 *   It is counted in `inFlight` until it leaves.
 *
 * So from an RMW's read to its write, no other write to any sector it writes is in flight, and none
 * starts: neither update is lost, whatever the interleaving. Copy-on-read and prefetch need no part
 * in this: they only ever write blocks that are not yet present (under the engine's block locks),
 * whose content is the base's, and an RMW that read such a sector read the same base bytes (the
 * base is read-only) — the RMW's own write then goes through the block locks like any other write.
 *
 * Waiting happens only before a writer takes any block lock, and a drainer waits only for writers
 * that have passed the gate (which wait on nothing here), so the gate cannot deadlock with the
 * block locks. Plain writes pay one counter increment and two field tests while no RMW is active
 * (no allocation). The draining barrier stops *all* new plain writes briefly (there is no per-write
 * range record to tell the overlapping ones apart), which bounds an RMW's wait by the writes already
 * in flight: a stream of writes elsewhere cannot starve it. Unaligned writes come only from the CLI
 * and the API — ublk requests are whole sectors — so this costs the device path nothing.
 */
export class SectorGate {
  private inFlight = 0;
  private draining = 0;
  /** Registered RMW ranges, [first, last] pairs of sector numbers (a handful at most). */
  private readonly ranges: number[] = [];
  private waiters: Array<() => void> = [];
  private drainers: Array<() => void> = [];

  /** True if a plain write of sectors [first, last] may enter now (and then it has entered). */
  tryEnter(first: number, last: number): boolean {
    if (this.draining > 0 || (this.ranges.length > 0 && this.overlaps(first, last))) return false;
    this.inFlight++;
    return true;
  }

  /** A plain write that tryEnter turned away: waits, then enters. */
  async enter(first: number, last: number): Promise<void> {
    while (!this.tryEnter(first, last)) await this.wait();
  }

  /** A plain write completed (or failed). */
  leave(): void {
    if (--this.inFlight === 0 && this.drainers.length) {
      const d = this.drainers;
      this.drainers = [];
      for (const wake of d) wake();
    }
  }

  /** An RMW of sectors [first, last]: registers the range exclusively, then drains plain writes. */
  async lock(first: number, last: number): Promise<void> {
    while (this.overlaps(first, last)) await this.wait();
    this.ranges.push(first, last);
    this.draining++;
    try {
      while (this.inFlight > 0) await new Promise<void>((resolve) => this.drainers.push(resolve));
    } finally {
      this.draining--;
      this.wakeAll();
    }
  }

  unlock(first: number, last: number): void {
    for (let i = 0; i < this.ranges.length; i += 2) {
      if (this.ranges[i] === first && this.ranges[i + 1] === last) {
        this.ranges.splice(i, 2);
        break;
      }
    }
    this.wakeAll();
  }

  /** For tests: nothing registered, draining or in flight. */
  get idle(): boolean {
    return this.inFlight === 0 && this.draining === 0 && this.ranges.length === 0;
  }

  private overlaps(first: number, last: number): boolean {
    const r = this.ranges;
    for (let i = 0; i < r.length; i += 2) if (first <= r[i + 1]! && r[i]! <= last) return true;
    return false;
  }

  private wait(): Promise<void> {
    return new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  private wakeAll(): void {
    if (!this.waiters.length) return;
    const w = this.waiters;
    this.waiters = [];
    for (const wake of w) wake();
  }
}
