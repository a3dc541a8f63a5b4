/**
 * The prefetcher's foreground-latency controller: a *latency budget* (token bucket), fed per
 * foreground request, that decides whether the next prefetch chunk may start. Pure logic on an
 * injected clock, so it is unit-tested deterministically (tests/prefetch-control.test.ts).
 *
 * The requirement is "prefetching never raises mean foreground latency by more than `share`".
 * With B the foreground latency without prefetching, that is Σ lat ≤ n·(1 + share)·B over the
 * requests. The bucket keeps exactly that sum:
 *
 *   every completed request:  tokens += (1 + share)·B − lat      (capped at share·B·burstRequests)
 *   next chunk may start:     tokens ≥ 0, or the foreground is idle
 *
 * so a request slowed by prefetch I/O spends its excess, and every request at the baseline earns
 * share·B back. Back-off therefore happens per request, not per measurement window: the first slow
 * completion after a chunk can close the gate, and the completion that brings the bucket back to
 * zero opens it (the owner wakes the prefetcher then). The duty cycle that results is whatever the
 * budget allows: a foreground that prefetch I/O barely slows leaves it nearly unthrottled, one it
 * slows a lot gets short, sparse chunks.
 *
 * B is measured, not configured: an EWMA of *clean* requests — those during which no prefetch I/O
 * ran and that started at least `settleMs` after the last one ended (page-cache and CPU after-
 * effects of a copy). Every request, clean or not, is charged against the budget, so after-effects
 * that outlast `settleMs` still cost budget. Until `minSamples` clean requests were seen, an active
 * foreground closes the gate (prefetching pauses so a baseline can be measured).
 *
 * Data a copy left in the page cache makes later guest flushes slower, long after the copy: the
 * owner flags it (`setResidue`) until it is durable, and requests meanwhile do not feed the
 * baseline either (they are charged like all others).
 *
 * Idle: no request completed for `idleMs` and none in flight (when the owner counts them). Then
 * nothing can be slowed: the gate is open and any debt is forgiven (the foreground that incurred
 * it is gone; a guest issuing a request every so often must not stall prefetching forever).
 */

export interface LatencyBudgetOptions {
  /** Allowed rise of mean foreground latency over its baseline, e.g. 0.1 = 10 %. */
  share: number;
  /** The foreground is idle after this long without a completion (ms). */
  idleMs?: number;
  /** Requests that start within this long after prefetch I/O ended do not feed the baseline (ms). */
  settleMs?: number;
  /** Clean requests needed before the baseline is trusted. */
  minSamples?: number;
  /** Bucket capacity, in requests' worth of allowance (share·B each). */
  burstRequests?: number;
  /** EWMA weight of one clean request in the baseline. */
  baselineWeight?: number;
}

export class LatencyBudget {
  readonly share: number;
  readonly idleMs: number;
  readonly settleMs: number;
  readonly minSamples: number;
  readonly burstRequests: number;
  readonly baselineWeight: number;

  /** Budget in ns of foreground latency; negative = prefetch owes the foreground. */
  tokensNs = 0;
  /** Baseline foreground latency (ns), or null until minSamples clean requests were seen. */
  baselineNs: number | null = null;
  /** Requests seen, and how many of them overlapped prefetch I/O (or its settle time). */
  requests = 0;
  overlapped = 0;
  /** Times the gate closed on an exhausted budget or a missing baseline. */
  closings = 0;

  private cleanSum = 0;
  private cleanCount = 0;
  private ioActive = false;
  private residue = false;
  private lastIoEnd = Number.NEGATIVE_INFINITY;
  private lastRequestAt = Number.NEGATIVE_INFINITY;
  private open = true;

  constructor(options: LatencyBudgetOptions) {
    if (!(options.share >= 0)) throw new RangeError('latency share must be 0 or more');
    this.share = options.share;
    this.idleMs = options.idleMs ?? 50;
    this.settleMs = options.settleMs ?? 2;
    this.minSamples = options.minSamples ?? 32;
    this.burstRequests = options.burstRequests ?? 64;
    this.baselineWeight = options.baselineWeight ?? 1 / 1024;
  }

  /** Prefetch I/O starts (only one at a time). */
  ioStart(): void {
    this.ioActive = true;
  }

  ioEnd(now: number): void {
    this.ioActive = false;
    this.lastIoEnd = now;
  }

  /**
   * Prefetched data is (not) waiting in the page cache for writeback: a guest flush meanwhile
   * writes it and is slower for it, however long after the copy. While set, completions are still
   * charged but do not teach the baseline (once it exists), so it stays the prefetch-free latency.
   */
  setResidue(on: boolean): void {
    this.residue = on;
  }

  /**
   * `n` foreground requests completed by `now` (ms) with latencies summing to `latencyNs`; the
   * earliest of them started at `since` (ms). For one request, since = now − latency. Returns
   * true when this completion reopened the gate (the owner should wake a waiting prefetcher).
   */
  onRequests(now: number, n: number, latencyNs: number, since: number): boolean {
    if (n <= 0) return false;
    this.requests += n;
    this.lastRequestAt = now;
    const dirty = this.ioActive || this.lastIoEnd + this.settleMs > since || (this.residue && this.baselineNs !== null);
    if (dirty) this.overlapped += n;
    else this.learn(n, latencyNs);
    const b = this.baselineNs;
    if (b !== null) {
      this.tokensNs = Math.min(this.tokensNs + n * (1 + this.share) * b - latencyNs, this.share * b * this.burstRequests);
    }
    return this.update(now);
  }

  /** May the next chunk start now? (Also records gate closings.) */
  ready(now: number, inFlight = 0): boolean {
    this.update(now, inFlight);
    return this.open;
  }

  /** Foreground activity seen within idleMs (or requests in flight). */
  busy(now: number, inFlight = 0): boolean {
    return inFlight > 0 || now - this.lastRequestAt < this.idleMs;
  }

  /** When the foreground becomes idle if nothing else completes (ms), for the owner's timer. */
  idleAt(): number {
    return this.lastRequestAt + this.idleMs;
  }

  private learn(n: number, latencyNs: number): void {
    const mean = latencyNs / n;
    if (this.baselineNs === null) {
      this.cleanSum += latencyNs;
      this.cleanCount += n;
      if (this.cleanCount >= this.minSamples) this.baselineNs = this.cleanSum / this.cleanCount;
      return;
    }
    // Unclamped: the *mean* latency is what is bounded, and every request's full latency is
    // charged, so the baseline must be the mean of clean latencies, tails included (a clamped or
    // median baseline sits below it and drains the budget with no prefetching at all). The small
    // weight keeps one outlier (a GC pause, another process) from moving it far.
    const w = n === 1 ? this.baselineWeight : 1 - (1 - this.baselineWeight) ** n;
    this.baselineNs += w * (mean - this.baselineNs);
  }

  private update(now: number, inFlight = 0): boolean {
    const was = this.open;
    if (!this.busy(now, inFlight)) {
      if (this.tokensNs < 0) this.tokensNs = 0; // idle: debt forgiven
      this.open = true;
    } else {
      this.open = this.baselineNs !== null && this.tokensNs >= 0;
    }
    if (was && !this.open) this.closings++;
    return !was && this.open;
  }
}
