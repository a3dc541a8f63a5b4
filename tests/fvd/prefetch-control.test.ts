/**
 * The prefetcher's latency budget (fvd/prefetch-control.ts), on a virtual clock: baseline learning
 * from clean requests only, per-request reaction (one slow completion closes the gate, the
 * completion that repays the debt reopens it), attribution of requests that overlap prefetch I/O
 * or its settle time, idle forgiveness, the bucket's cap, and a discrete-event simulation of a
 * closed-loop foreground in which the budget keeps the mean latency rise within the share while
 * prefetching still progresses (and an unthrottled prefetcher does not).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { LatencyBudget } from '../../fvd/prefetch-control.js';

const US = 1000; // ns

/** n clean requests of `lat` ns each, completing `gap` ms apart from `t`; returns the end time. */
function feed(b: LatencyBudget, t: number, n: number, lat: number, gap = 0.1): number {
  for (let i = 0; i < n; i++) {
    t += gap;
    b.onRequests(t, 1, lat, t - lat / 1e6);
  }
  return t;
}

test('no foreground: always ready, not busy, no baseline', () => {
  const b = new LatencyBudget({ share: 0.1 });
  assert.ok(b.ready(0));
  assert.not.ok(b.busy(0));
  b.ioStart();
  b.ioEnd(5);
  assert.ok(b.ready(1000));
  assert.is(b.baselineNs, null);
  assert.is(b.closings, 0);
});

test('an active foreground closes the gate until minSamples clean requests gave a baseline', () => {
  const b = new LatencyBudget({ share: 0.1, minSamples: 8 });
  let t = feed(b, 0, 1, 100 * US);
  assert.not.ok(b.ready(t), 'busy and no baseline yet');
  assert.is(b.closings, 1);
  t = feed(b, t, 6, 100 * US);
  assert.not.ok(b.ready(t));
  const reopened = b.onRequests(t + 0.1, 1, 100 * US, t);
  assert.ok(reopened, 'the 8th clean completion reopens the gate');
  assert.is(b.baselineNs, 100 * US);
  assert.ok(b.ready(t + 0.1));
});

test('per request: one slow overlapped completion closes the gate; clean ones repay exactly the excess', () => {
  const b = new LatencyBudget({ share: 0.25, minSamples: 4, settleMs: 0 });
  let t = feed(b, 0, 4, 100 * US);
  assert.is(b.baselineNs, 100 * US);
  // Only the request that completed the baseline earned its allowance (share × B = 25 µs).
  assert.is(b.tokensNs, 25 * US);
  b.ioStart();
  t += 0.5;
  // One request slowed to 400 µs by the copy: excess 300 µs, less its own 25 µs allowance.
  b.onRequests(t, 1, 400 * US, t - 0.4);
  assert.not.ok(b.ready(t), 'closed by a single completion, no window to wait for');
  assert.is(b.tokensNs, 25 * US + 125 * US - 400 * US);
  assert.is(b.overlapped, 1);
  b.ioEnd(t);
  // Each clean request at the baseline earns 25 µs: 9 of them leave -25 µs, the 10th 0.
  let reopenedAt = -1;
  for (let i = 1; i <= 25 && reopenedAt < 0; i++) {
    t += 0.1;
    if (b.onRequests(t, 1, 100 * US, t - 0.1)) reopenedAt = i;
  }
  assert.is(reopenedAt, 10, 'reopened by the completion that repaid the debt');
  assert.ok(b.ready(t));
  assert.is(b.baselineNs, 100 * US, 'overlapped requests never move the baseline');
});

test('attribution: requests that started during prefetch I/O or within settleMs after it are not clean', () => {
  const b = new LatencyBudget({ share: 0.1, minSamples: 2, settleMs: 2 });
  b.ioStart();
  b.onRequests(1, 1, 500 * US, 0.5); // during the copy
  b.ioEnd(1);
  b.onRequests(2.5, 1, 400 * US, 2.1); // started 1.1 ms after it ended: still settling
  assert.is(b.overlapped, 2);
  assert.is(b.baselineNs, null);
  b.onRequests(3.5, 1, 100 * US, 3.4); // started 2.4 ms after: clean
  b.onRequests(3.6, 1, 120 * US, 3.5);
  assert.is(b.baselineNs, 110 * US);
  // A request that began before a copy ended (a long one) is not clean either.
  b.ioStart();
  b.ioEnd(10);
  b.onRequests(13, 1, 5000 * US, 8);
  assert.is(b.overlapped, 3);
  assert.is(b.baselineNs, 110 * US);
});

test('aggregated windows: n requests at once feed and charge like n single ones', () => {
  const one = new LatencyBudget({ share: 0.2, minSamples: 4, settleMs: 0 });
  const agg = new LatencyBudget({ share: 0.2, minSamples: 4, settleMs: 0 });
  const t = feed(one, 0, 4, 50 * US);
  agg.onRequests(t, 4, 200 * US, 0);
  assert.is(agg.baselineNs, one.baselineNs);
  one.ioStart();
  agg.ioStart();
  const [t1, t2] = [one.tokensNs, agg.tokensNs];
  for (let i = 0; i < 3; i++) one.onRequests(t + 1, 1, 90 * US, t);
  agg.onRequests(t + 1, 3, 270 * US, t);
  const near = (a: number, b: number) => Math.abs(a - b) < 1e-3;
  assert.ok(near(agg.tokensNs - t2, one.tokensNs - t1), `${agg.tokensNs - t2} vs ${one.tokensNs - t1}`);
  assert.ok(near(agg.tokensNs - t2, 3 * 60 * US - 270 * US), `${agg.tokensNs - t2}`);
  assert.is(agg.overlapped, 3);
});

test('probes: the gate closes for probeMs every probeEveryMs; the median of recent probe means (tails included) is the baseline', () => {
  const b = new LatencyBudget({ share: 0.1, minSamples: 4, settleMs: 0, probeEveryMs: 100, probeMs: 20, probeHistory: 3, burstRequests: 1e9 });
  let t = feed(b, 0, 4, 100 * US); // first baseline at t = 0.4; the first probe is due a quarter period later, at 25.4
  assert.is(b.baselineNs, 100 * US);
  t = feed(b, t, 240, 100 * US);
  assert.ok(b.ready(t), `open before the probe (t ${t})`);
  t = 25.5;
  b.onRequests(t, 1, 100 * US, t - 0.1);
  assert.not.ok(b.ready(t), 'closed for the probe although the budget is full');
  // During the probe the foreground runs at 99 × 50 µs + 1 × 5050 µs: mean 100 µs — a median of
  // requests or a clamped mean would sit near 50 µs and then drain the budget with no prefetching.
  // Only requests in the probe's second half (after probeSkipMs = 10 ms) are samples.
  for (let k = 0; k < 2; k++) {
    t = feed(b, t, 99, 50 * US);
    t = feed(b, t, 1, 5050 * US);
  }
  assert.ok(b.ready(t + 0.1), 'the probe ended after probeMs');
  assert.is(b.probes, 1);
  assert.ok(Math.abs(b.baselineNs! - 100 * US) < 1, `baseline ${b.baselineNs}`);
  /** Clean requests of `lat` every 0.1 ms until `probes` probes were taken; returns [t, when]. */
  const until = (from: number, lat: number, probes: number): number => {
    let at = from;
    while (b.probes < probes && at < from + 1000) at = feed(b, at, 1, lat);
    return at;
  };
  // Until probeHistory (3) probes were taken, they come every probeEveryMs / 4 (+ probeMs).
  const p1 = t;
  t = until(t, 100 * US, 2);
  assert.ok(t - p1 < 25 + 20 + 2, `second probe ${t - p1} ms after the first`);
  // One probe hit by a stall does not move the median; a foreground that stays slower does.
  t = until(t, 1000 * US, 3);
  assert.ok(Math.abs(b.baselineNs! - 100 * US) < 1, `one slow probe: baseline ${b.baselineNs}`);
  const p3 = t;
  t = until(t, 1000 * US, 4);
  assert.ok(t - p3 >= 100 + 20 - 1, `then every probeEveryMs: ${t - p3} ms`);
  assert.ok(Math.abs(b.baselineNs! - 1000 * US) < 1, `two of three probes slow: baseline ${b.baselineNs}`);
  // Prefetch I/O in flight when a probe is due: the probe lasts probeMs from the copy's end, and
  // the requests that overlap the copy are no samples.
  const c = new LatencyBudget({ share: 0.1, minSamples: 4, settleMs: 0, probeEveryMs: 100, probeMs: 20 });
  t = feed(c, 0, 4, 100 * US); // probe due at 25.4
  t = feed(c, t, 240, 100 * US);
  c.ioStart();
  c.onRequests(25.5, 1, 300 * US, 25.2);
  assert.not.ok(c.ready(25.5), 'probing');
  c.onRequests(30, 1, 9000 * US, 21); // overlaps the copy: not a sample
  c.ioEnd(31);
  assert.not.ok(c.ready(45), 'the probe lasts probeMs from the end of the copy');
  assert.is(c.probes, 0);
  feed(c, 35, 200, 300 * US);
  assert.is(c.probes, 1);
  assert.ok(Math.abs(c.baselineNs! - 300 * US) < 1, `baseline ${c.baselineNs}: the first probe replaces the first estimate (100); only clean probe requests count`);
});

test('no probes while the foreground is idle', () => {
  const b = new LatencyBudget({ share: 0.1, minSamples: 2, idleMs: 50, probeEveryMs: 100, probeMs: 20 });
  const t = feed(b, 0, 2, 100 * US);
  assert.ok(b.ready(t + 500), 'idle long past the probe time: open');
  assert.is(b.probes, 0);
});

test('idle: no completion for idleMs (and none in flight) opens the gate and forgives the debt', () => {
  const b = new LatencyBudget({ share: 0.1, minSamples: 4, idleMs: 50, settleMs: 0 });
  let t = feed(b, 0, 4, 100 * US);
  b.ioStart();
  b.onRequests(t + 1, 1, 5000 * US, t);
  b.ioEnd(t + 1);
  t += 1;
  assert.not.ok(b.ready(t + 10));
  assert.is(b.idleAt(), t + 50);
  assert.not.ok(b.ready(t + 60, 1), 'a request in flight: not idle');
  assert.ok(b.busy(t + 60, 1));
  assert.ok(b.ready(t + 60), 'idle');
  assert.is(b.tokensNs, 0, 'debt forgiven');
  // The foreground returns: the gate stays open (no debt), and closes on the next slow request.
  b.ioStart();
  b.onRequests(t + 61, 1, 400 * US, t + 60.6);
  assert.not.ok(b.ready(t + 61));
});

test('the bucket is capped: a long clean period buys at most burstRequests × share × B', () => {
  const b = new LatencyBudget({ share: 0.1, minSamples: 4, burstRequests: 32 });
  const t = feed(b, 0, 10_000, 100 * US);
  assert.is(b.tokensNs, 0.1 * 100 * US * 32);
  b.ioStart();
  b.onRequests(t + 1, 1, 500 * US, t); // more excess (400 µs) than the cap (320 µs) + its own 10 µs
  assert.not.ok(b.ready(t + 1));
});

/**
 * Discrete-event simulation, virtual time in ms: W closed-loop workers, each request takes B,
 * or B × (1 + slowdown) when a prefetch chunk is in flight at its issue; a chunk takes D. The
 * prefetcher starts a chunk whenever nothing is in flight and `gate()` allows.
 */
function simulate(opts: { share: number; B: number; slowdown: number; D: number; W: number; ms: number; throttled: boolean }) {
  const budget = new LatencyBudget({ share: opts.share, settleMs: 0.2 });
  const Bms = opts.B;
  const done = new Float64Array(opts.W); // completion time of each worker's request
  const start = new Float64Array(opts.W);
  let ioEnd = -1; // end of the chunk in flight, or -1
  let chunks = 0;
  let latSum = 0;
  let n = 0;
  const issue = (w: number, t: number) => {
    start[w] = t;
    done[w] = t + (ioEnd >= 0 ? Bms * (1 + opts.slowdown) : Bms);
  };
  for (let w = 0; w < opts.W; w++) issue(w, w * (Bms / opts.W));
  let t = 0;
  const tryStart = () => {
    if (ioEnd < 0 && (!opts.throttled || budget.ready(t, opts.W))) {
      ioEnd = t + opts.D;
      budget.ioStart();
      chunks++;
    }
  };
  tryStart();
  while (t < opts.ms) {
    let w = 0;
    for (let i = 1; i < opts.W; i++) if (done[i]! < done[w]!) w = i;
    if (ioEnd >= 0 && ioEnd <= done[w]!) {
      t = ioEnd;
      ioEnd = -1;
      budget.ioEnd(t);
      tryStart();
      continue;
    }
    t = done[w]!;
    const lat = (t - start[w]!) * 1e6;
    if (t > 20) {
      latSum += lat;
      n++;
    }
    budget.onRequests(t, 1, lat, start[w]!);
    issue(w, t);
    tryStart();
  }
  return { rise: latSum / n / (Bms * 1e6) - 1, duty: (chunks * opts.D) / opts.ms };
}

test('simulation: the budget holds the mean latency rise to the share; blind prefetching does not', () => {
  for (const [slowdown, D] of [[1, 1], [3, 0.5], [0.5, 4], [10, 1]] as const) {
    const base = { share: 0.1, B: 0.05, slowdown, D, W: 4, ms: 5000 };
    const adaptive = simulate({ ...base, throttled: true });
    const blind = simulate({ ...base, throttled: false });
    const what = `slowdown ${slowdown}, chunk ${D} ms`;
    assert.ok(adaptive.rise <= 0.1 * 1.02, `${what}: mean latency rose ${(adaptive.rise * 100).toFixed(1)} %`);
    assert.ok(adaptive.duty > 0.005, `${what}: prefetching starved (duty ${adaptive.duty})`);
    assert.ok(blind.rise > 0.1 * 2, `${what}: blind rise ${(blind.rise * 100).toFixed(1)} % (the scenario must hurt)`);
  }
  // The lighter the harm, the more prefetching the same budget buys.
  const light = simulate({ share: 0.1, B: 0.05, slowdown: 0.5, D: 1, W: 4, ms: 5000, throttled: true });
  const heavy = simulate({ share: 0.1, B: 0.05, slowdown: 5, D: 1, W: 4, ms: 5000, throttled: true });
  assert.ok(light.duty > 2 * heavy.duty, `duty light ${light.duty} vs heavy ${heavy.duty}`);
});

test('share 0: any measured slowdown closes the gate; an idle foreground still lets it run', () => {
  const b = new LatencyBudget({ share: 0, minSamples: 2, settleMs: 0 });
  let t = feed(b, 0, 2, 100 * US);
  b.ioStart();
  b.onRequests(t + 0.2, 1, 101 * US, t + 0.1);
  b.ioEnd(t + 0.2);
  assert.not.ok(b.ready(t + 0.2));
  t += 1000;
  assert.ok(b.ready(t));
  assert.throws(() => new LatencyBudget({ share: -1 }), /share/);
});

/**
 * Polled windows of `ms` each with `n` requests of `lat` ns (latency sum n·lat), from `t`; clean
 * unless the caller marked prefetch I/O. Returns the end time.
 */
function feedWindows(b: LatencyBudget, t: number, windows: number, ms: number, n: number, lat: number): number {
  for (let i = 0; i < windows; i++) {
    b.onRequests(t + ms, n, n * lat, t, ms);
    t += ms;
  }
  return t;
}

test('rate term: a request rate that halves at an unchanged (partial) latency overdraws the budget; without the term it does not', () => {
  for (const rateTerm of [false, true]) {
    const b = new LatencyBudget({ share: 0.1, minSamples: 32, settleMs: 0, rateTerm });
    // Baseline: 20 requests per 1-ms window (20 per ms), 10 µs each inside the daemon.
    let t = feedWindows(b, 0, 4, 1, 20, 10 * US);
    assert.is(b.baselineNs, 10 * US);
    assert.is(b.baselineRate, rateTerm ? 20 : null);
    assert.ok(b.ready(t));
    // Prefetching: the daemon's part of each request is unchanged, but only 10 per ms complete.
    b.ioStart();
    t = feedWindows(b, t, 5, 1, 10, 10 * US);
    b.ioEnd(t);
    if (rateTerm) {
      // The baseline was complete in window 2 (40 ≥ 32 samples), which with windows 3 and 4 earned 20 µs
      // each (share·B per request). Each slow window costs B·λ_B·1 ms = 200 µs for 10 requests that
      // earn 110 µs: −90 µs a window.
      assert.ok(Math.abs(b.tokensNs - (3 * 20 * US - 5 * 90 * US)) < 1, `tokens ${b.tokensNs}`);
      assert.not.ok(b.ready(t), 'the guest lost half its rate: closed');
    } else {
      assert.ok(b.tokensNs > 0, 'the partial latency alone sees nothing');
      assert.ok(b.ready(t));
    }
  }
});

test('rate term: a window at the baseline rate costs no more than its latency; the rate baseline follows the probes', () => {
  const b = new LatencyBudget({ share: 0.1, minSamples: 8, settleMs: 0, rateTerm: true, probeEveryMs: 100, probeMs: 20, probeSkipMs: 10, probeHistory: 1 });
  let t = feedWindows(b, 0, 1, 1, 8, 10 * US); // 8 per ms
  assert.is(b.baselineRate, 8);
  const before = b.tokensNs;
  t = feedWindows(b, t, 10, 1, 8, 10 * US);
  assert.ok(Math.abs(b.tokensNs - Math.min(before + 10 * 8 * US, 0.1 * 10 * US * 64)) < 1, 'each window earns share·B per request');
  // The guest settles at 4 per ms (its own choice): charged until a probe measures the new rate.
  t = feedWindows(b, t, 200, 1, 4, 10 * US);
  assert.ok(b.probes >= 1);
  assert.is(b.baselineRate, 4);
  const after = b.tokensNs;
  t = feedWindows(b, t, 5, 1, 4, 10 * US);
  assert.ok(b.tokensNs >= after, 'at the new baseline rate the budget no longer drains');
});

test.run();
