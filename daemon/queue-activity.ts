/**
 * Foreground activity of the queue workers, for the prefetcher's latency budget
 * (fvd/prefetch-control.ts): each worker times its requests and publishes running totals in a
 * small SharedArrayBuffer; the main thread sums them over all queues when the prefetcher polls.
 *
 * A request's latency here is what the daemon adds: from the moment its FETCH completion is
 * reaped to the moment its COMMIT is prepared. That is only part of what the guest sees — a copy
 * that takes CPU from the guest slows its own kernel and submitter, not this part — so the
 * prefetcher also reads a drop in the request count as a latency rise (`partialLatency`,
 * fvd/prefetch-control.ts).
 *
 * Layout, one Int32Array per queue, written only by that queue's worker (Atomics, so the main
 * thread never sees a torn value):
 *
 *   [0] requests completed   (mod 2^32)
 *   [1] summed latency in µs (mod 2^32; the worker carries the sub-µs remainder itself)
 *   [2] requests in flight   (begun, not yet committed)
 *
 * Counters wrap: the reader adds unsigned deltas between polls, which is exact as long as a poll
 * comes at least once per 2^32 µs of summed latency (over an hour at queue depth 1000).
 */

const OPS = 0;
const LATENCY_US = 1;
const IN_FLIGHT = 2;
const SLOTS = 3;

export function newActivityBuffer(): SharedArrayBuffer {
  return new SharedArrayBuffer(SLOTS * 4);
}

/** The worker's side: begin() when a request arrives, end() when its result is committed. */
export class QueueActivityWriter {
  private readonly counters: Int32Array;
  /** Start time (ms, performance.now) of each tag's request; NaN when none is in flight. */
  private readonly startedAt: Float64Array;
  /** Summed latency not yet published (below 1 µs), in ns. */
  private carryNs = 0;

  constructor(buffer: SharedArrayBuffer, depth: number) {
    this.counters = new Int32Array(buffer);
    this.startedAt = new Float64Array(depth).fill(NaN);
  }

  begin(tag: number, nowMs: number): void {
    this.startedAt[tag] = nowMs;
    Atomics.add(this.counters, IN_FLIGHT, 1);
  }

  end(tag: number, nowMs: number): void {
    const t0 = this.startedAt[tag]!;
    if (t0 !== t0) return; // NaN: no request begun on this tag (cannot happen; never count it)
    this.startedAt[tag] = NaN;
    const ns = Math.max(0, (nowMs - t0) * 1e6) + this.carryNs;
    const us = Math.floor(ns / 1000);
    this.carryNs = ns - us * 1000;
    Atomics.add(this.counters, OPS, 1);
    Atomics.add(this.counters, LATENCY_US, us);
    Atomics.sub(this.counters, IN_FLIGHT, 1);
  }
}

/** Running totals since the reader was made, as fvd/prefetch.ts's ForegroundActivity. */
export interface ActivityTotals {
  ops: number;
  bytes: number;
  latencyNs: number;
  inFlight: number;
}

/** The main thread's side: cumulative totals over every queue, polled by the prefetcher. */
export class QueueActivityReader {
  private readonly views: Int32Array[];
  private readonly lastOps: Uint32Array;
  private readonly lastLatency: Uint32Array;
  private readonly totals: ActivityTotals = { ops: 0, bytes: 0, latencyNs: 0, inFlight: 0 };

  constructor(buffers: readonly SharedArrayBuffer[]) {
    this.views = buffers.map((b) => new Int32Array(b));
    this.lastOps = new Uint32Array(this.views.map((v) => Atomics.load(v, OPS)));
    this.lastLatency = new Uint32Array(this.views.map((v) => Atomics.load(v, LATENCY_US)));
  }

  /** Reads every queue's counters; returns the same (updated) object each time. */
  poll(): ActivityTotals {
    const t = this.totals;
    let inFlight = 0;
    for (let q = 0; q < this.views.length; q++) {
      const v = this.views[q]!;
      const ops = Atomics.load(v, OPS) >>> 0;
      const lat = Atomics.load(v, LATENCY_US) >>> 0;
      t.ops += (ops - this.lastOps[q]!) >>> 0;
      t.latencyNs += ((lat - this.lastLatency[q]!) >>> 0) * 1000;
      this.lastOps[q] = ops;
      this.lastLatency[q] = lat;
      inFlight += Math.max(0, Atomics.load(v, IN_FLIGHT));
    }
    t.inFlight = inFlight;
    return t;
  }
}
