/**
 * The prefetcher's foreground-latency controller: a *latency budget* (token bucket), fed per
 * foreground request, that decides whether the next prefetch chunk may start. Pure logic on an
 * injected clock, so it is unit-tested deterministically (tests/fvd/prefetch-control.test.ts).
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
 * B is measured, not configured. A request is *clean* when no prefetch I/O ran during it and it
 * started at least `settleMs` after the last one ended (page-cache and CPU after-effects of a
 * copy). Every request, clean or not, is charged against the budget. Until `minSamples` clean
 * requests were seen, an active foreground closes the gate (prefetching pauses so a first baseline
 * can be measured). After that B comes from *probes*: every `probeEveryMs` while the foreground is
 * active, the gate stays closed for `probeMs` (counted from the end of the prefetch I/O then in
 * flight) and the mean of the clean requests that started in its second part (after `probeSkipMs`:
 * after-effects of a copy, measured to outlast a few ms, are over) joins the last `probeHistory`
 * probe means, whose median is B. The first estimate (the median of the first `minSamples` clean
 * latencies) only stands in until the first probe, which replaces it: it is taken while the guest
 * is just starting, often right after full-speed copies (measured in a guest: 279 µs, against
 * 15 µs in the probes seconds later — an estimate that high lets prefetching run unthrottled).
 * Until `probeHistory` probes were taken they come four times as often, so B settles within about
 * a second. Medians, because one probe or request
 * hit by a stall (GC, another process) would otherwise inflate B for seconds; they sit at or
 * below the mean for the right-skewed latencies seen here, which errs on the safe side. Probes are scheduled by the clock, not by latency: learning from whatever clean
 * requests happen to occur is biased, because the gate is closed — and clean requests plentiful —
 * precisely when the foreground is slow, so such a baseline sits above the true one and lets the
 * mean latency overshoot the share (measured: +7..10 points with the benchmark's flushes).
 *
 * Copies are not made durable early for the sake of measurement: an fdatasync also cleans the
 * guest's dirty pages, and re-dirtying them made the guest's writes slower for hundreds of ms
 * (measured: probes right after such syncs inflated B, and the mean rose 11–24 % instead of 10).
 * The writeback of copied data that a later guest flush performs is charged like everything else.
 *
 * Partial latencies (`rateTerm`): an owner that sees only part of each request's latency — the
 * ublk daemon times a request from its arrival at the queue to its commit, not the guest's whole
 * path through its own kernel — cannot see every slowdown it causes. On a guest with few CPUs the
 * copy's CPU time slows the guest's submitting and completing, not the daemon's part: measured, the
 * daemon's part stayed at its 12 µs baseline while fio's latency doubled and its request rate
 * halved. For a guest that keeps a fixed number of requests in flight (closed loop), latency is
 * that number over the request rate (Little's law), so a lower rate *is* a latency rise:
 * C/C_B = λ_B/λ. The budget then also measures the rate λ_B in the same clean samples as B (and
 * probes), and charges a polled window of `windowMs` with n requests
 *
 *   max(their measured latency sum, B·λ_B·windowMs)
 *
 * where B·λ_B·windowMs = n·B·λ_B/λ is the latency sum scaled by the rate drop. A window at the
 * baseline rate costs n·B; one at half the rate costs 2·n·B. A guest that keeps a fixed rate
 * instead (open loop) shows the slowdown in the measured latencies, the first term. A guest that
 * slows down by itself is charged too until the next probes measure its new rate: conservative.
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
  /** A baseline probe every this long while the foreground is active (ms, default 1000). */
  probeEveryMs?: number;
  /** Length of a probe: the gate stays closed this long (ms, default 200). */
  probeMs?: number;
  /** Only requests that start this long into the probe are samples (ms, default probeMs / 2). */
  probeSkipMs?: number;
  /** B is the median of this many most recent probe means (default 5). */
  probeHistory?: number;
  /**
   * The owner's latencies are partial: a drop of the request rate below its baseline counts as a
   * latency rise too (see above). Needs the window length in onRequests. Default false.
   */
  rateTerm?: boolean;
}

export class LatencyBudget {
  readonly share: number;
  readonly idleMs: number;
  readonly settleMs: number;
  readonly minSamples: number;
  readonly burstRequests: number;
  readonly probeEveryMs: number;
  readonly probeMs: number;
  readonly probeSkipMs: number;
  readonly probeHistory: number;
  readonly rateTerm: boolean;

  /** Budget in ns of foreground latency; negative = prefetch owes the foreground. */
  tokensNs = 0;
  /** Baseline foreground latency (ns), or null until minSamples clean requests were seen. */
  baselineNs: number | null = null;
  /** Baseline request rate (per ms) measured with B, when rateTerm; null until known. */
  baselineRate: number | null = null;
  /** Requests seen, and how many of them overlapped prefetch I/O (or its settle time). */
  requests = 0;
  overlapped = 0;
  /** Times the gate closed on an exhausted budget, a missing baseline or a probe. */
  closings = 0;
  /** Probes that updated the baseline. */
  probes = 0;

  /** First clean latencies (only until the first baseline), then the recent probe means. */
  private readonly first: number[] = [];
  private readonly history: number[] = [];
  private ioActive = false;
  private lastIoEnd = Number.NEGATIVE_INFINITY;
  private lastRequestAt = Number.NEGATIVE_INFINITY;
  private open = true;
  private nextProbeAt = Number.POSITIVE_INFINITY;
  /** Start of the probe in progress, or -1. */
  private probeStart = -1;
  private probeSum = 0;
  private probeN = 0;
  /** Length of the windows the probe's samples came from (rateTerm), and of the first samples'. */
  private probeWindowMs = 0;
  private firstWindowMs = 0;
  private firstOps = 0;
  private readonly rateHistory: number[] = [];

  constructor(options: LatencyBudgetOptions) {
    if (!(options.share >= 0)) throw new RangeError('latency share must be 0 or more');
    this.share = options.share;
    this.idleMs = options.idleMs ?? 50;
    this.settleMs = options.settleMs ?? 2;
    this.minSamples = options.minSamples ?? 32;
    this.burstRequests = options.burstRequests ?? 64;
    this.probeEveryMs = options.probeEveryMs ?? 1000;
    this.probeMs = options.probeMs ?? 200;
    this.probeSkipMs = Math.min(this.probeMs, options.probeSkipMs ?? this.probeMs / 2);
    this.probeHistory = Math.max(1, options.probeHistory ?? 5);
    this.rateTerm = options.rateTerm ?? false;
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
   * `n` foreground requests completed by `now` (ms) with latencies summing to `latencyNs`; the
   * earliest of them started at `since` (ms). For one request, since = now − latency. A polled
   * owner passes `windowMs`, the length of the window they completed in (windows contiguous):
   * the rate term needs it. Returns true when this completion reopened the gate (the owner
   * should wake a waiting prefetcher).
   */
  onRequests(now: number, n: number, latencyNs: number, since: number, windowMs = 0): boolean {
    if (n <= 0) return false;
    this.requests += n;
    this.lastRequestAt = now;
    const dirty = this.ioActive || this.lastIoEnd + this.settleMs > since;
    if (dirty) this.overlapped += n;
    else if (this.baselineNs === null) this.learn(now, n, latencyNs, windowMs);
    else if (this.probeStart >= 0 && since >= Math.max(this.probeStart, this.lastIoEnd) + this.probeSkipMs) {
      this.probeSum += latencyNs;
      this.probeN += n;
      this.probeWindowMs += windowMs;
    }
    const b = this.baselineNs;
    if (b !== null) {
      const rate = this.baselineRate;
      const charge = rate !== null && windowMs > 0 ? Math.max(latencyNs, b * rate * windowMs) : latencyNs;
      this.tokensNs = Math.min(this.tokensNs + n * (1 + this.share) * b - charge, this.share * b * this.burstRequests);
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

  /** The first baseline: the median of the first minSamples clean latencies. */
  private learn(now: number, n: number, latencyNs: number, windowMs: number): void {
    for (let k = 0; k < n && this.first.length < this.minSamples; k++) this.first.push(latencyNs / n);
    this.firstOps += n;
    this.firstWindowMs += windowMs;
    if (this.first.length >= this.minSamples) {
      this.history.push(median(this.first));
      this.baselineNs = this.history[0]!;
      if (this.rateTerm && this.firstWindowMs > 0) {
        this.rateHistory.push(this.firstOps / this.firstWindowMs);
        this.baselineRate = this.rateHistory[0]!;
      }
      this.nextProbeAt = now + this.probeEveryMs / 4;
    }
  }

  /** Mean latency of the probe's clean requests, tails included: the mean is what is bounded. */
  private finishProbe(now: number): void {
    if (this.probeN >= 4) {
      if (this.probes === 0) {
        this.history.length = 0; // the first estimate only stood in (see above)
        this.rateHistory.length = 0;
      }
      this.baselineNs = recentMedian(this.history, this.probeSum / this.probeN, this.probeHistory);
      if (this.rateTerm && this.probeWindowMs > 0) this.baselineRate = recentMedian(this.rateHistory, this.probeN / this.probeWindowMs, this.probeHistory);
      this.probes++;
    }
    this.probeStart = -1;
    this.nextProbeAt = now + (this.probes < this.probeHistory ? this.probeEveryMs / 4 : this.probeEveryMs);
  }

  private update(now: number, inFlight = 0): boolean {
    const was = this.open;
    if (!this.busy(now, inFlight)) {
      if (this.tokensNs < 0) this.tokensNs = 0; // idle: debt forgiven
      this.probeStart = -1; // nothing to measure
      this.open = true;
    } else {
      if (this.probeStart >= 0 && now >= Math.max(this.probeStart, this.lastIoEnd) + this.probeMs) this.finishProbe(now);
      else if (this.probeStart < 0 && now >= this.nextProbeAt) {
        this.probeStart = now;
        this.probeSum = 0;
        this.probeN = 0;
        this.probeWindowMs = 0;
      }
      this.open = this.baselineNs !== null && this.tokensNs >= 0 && this.probeStart < 0;
    }
    if (was && !this.open) this.closings++;
    return !was && this.open;
  }
}

/** Appends `x` to the recent values `xs` (keeping the last `keep`) and returns their median. */
function recentMedian(xs: number[], x: number, keep: number): number {
  xs.push(x);
  if (xs.length > keep) xs.shift();
  return median(xs);
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}
