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
 *   [3] sectors read         (512 bytes; mod 2^32)
 *   [4] sectors written      (512 bytes; mod 2^32)
 *
 * Counters wrap: the reader adds unsigned deltas between polls, which is exact as long as a poll
 * comes at least once per 2^32 µs of summed latency (over an hour at queue depth 1000) and per
 * 2 TiB transferred (the metrics poll every 5 s).
 */

const OPS = 0;
const LATENCY_US = 1;
const IN_FLIGHT = 2;
const READ_SECTORS = 3;
const WRITE_SECTORS = 4;
const SLOTS = 5;

/** What a request moves, for the byte counters: begin()'s `direction`. */
export const ACTIVITY_OTHER = 0;
export const ACTIVITY_READ = 1;
export const ACTIVITY_WRITE = 2;

export function newActivityBuffer(): SharedArrayBuffer {
  return new SharedArrayBuffer(SLOTS * 4);
}

/** The worker's side: begin() when a request arrives, end() when its result is committed. */
export class QueueActivityWriter {
  private readonly counters: Int32Array;
  /** Start time (ms, performance.now) of each tag's request; NaN when none is in flight. */
  private readonly startedAt: Float64Array;
  /** Each tag's request: its direction (ACTIVITY_*) and 512-byte sectors, counted at end(). */
  private readonly direction: Uint8Array;
  private readonly sectors: Uint32Array;
  /** Summed latency not yet published (below 1 µs), in ns. */
  private carryNs = 0;

  constructor(buffer: SharedArrayBuffer, depth: number) {
    this.counters = new Int32Array(buffer);
    this.startedAt = new Float64Array(depth).fill(NaN);
    this.direction = new Uint8Array(depth);
    this.sectors = new Uint32Array(depth);
  }

  /** `direction` ACTIVITY_READ/WRITE and `sectors` count the request's bytes once it completes. */
  begin(tag: number, nowMs: number, direction = ACTIVITY_OTHER, sectors = 0): void {
    this.startedAt[tag] = nowMs;
    this.direction[tag] = direction;
    this.sectors[tag] = sectors;
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
    // Bytes of a request that completed, successfully or not: what the device was asked to move.
    const dir = this.direction[tag]!;
    if (dir === ACTIVITY_READ) Atomics.add(this.counters, READ_SECTORS, this.sectors[tag]!);
    else if (dir === ACTIVITY_WRITE) Atomics.add(this.counters, WRITE_SECTORS, this.sectors[tag]!);
  }
}

/** Running totals since the reader was made, as fvd/prefetch.ts's ForegroundActivity. */
export interface ActivityTotals {
  ops: number;
  /** bytesRead + bytesWritten. */
  bytes: number;
  bytesRead: number;
  bytesWritten: number;
  latencyNs: number;
  inFlight: number;
}

/** The main thread's side: cumulative totals over every queue, polled by the prefetcher. */
export class QueueActivityReader {
  private readonly views: Int32Array[];
  private readonly lastOps: Uint32Array;
  private readonly lastLatency: Uint32Array;
  private readonly lastRead: Uint32Array;
  private readonly lastWritten: Uint32Array;
  private readonly totals: ActivityTotals = { ops: 0, bytes: 0, bytesRead: 0, bytesWritten: 0, latencyNs: 0, inFlight: 0 };

  constructor(buffers: readonly SharedArrayBuffer[]) {
    this.views = buffers.map((b) => new Int32Array(b));
    this.lastOps = new Uint32Array(this.views.map((v) => Atomics.load(v, OPS)));
    this.lastLatency = new Uint32Array(this.views.map((v) => Atomics.load(v, LATENCY_US)));
    this.lastRead = new Uint32Array(this.views.map((v) => Atomics.load(v, READ_SECTORS)));
    this.lastWritten = new Uint32Array(this.views.map((v) => Atomics.load(v, WRITE_SECTORS)));
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
      const rd = Atomics.load(v, READ_SECTORS) >>> 0;
      const wr = Atomics.load(v, WRITE_SECTORS) >>> 0;
      t.bytesRead += ((rd - this.lastRead[q]!) >>> 0) * 512;
      t.bytesWritten += ((wr - this.lastWritten[q]!) >>> 0) * 512;
      this.lastRead[q] = rd;
      this.lastWritten[q] = wr;
      inFlight += Math.max(0, Atomics.load(v, IN_FLIGHT));
    }
    t.inFlight = inFlight;
    t.bytes = t.bytesRead + t.bytesWritten;
    return t;
  }
}
