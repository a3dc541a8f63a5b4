/**
 * Adaptive background prefetching (FVD paper §3.4.2 and its QEMU implementation, block/fvd-prefetch.c):
 * copies every base block that is not yet local into the image, in large sequential reads, until
 * the whole disk is local, then records FULLY_LOCAL (`FvdImage.markFullyLocal`), after which reads
 * never consult the bitmap nor open the base.
 *
 * Copies go through the engine hook `prefetchBlocks(b0, b1)`: a *soft write* like copy-on-read
 * (bits set in memory only, FORMAT.md §5.2/§9), taken under the engine's block locks and skipping
 * any block a guest request holds — so a guest write always wins, and a block skipped now is
 * picked up by a later pass. Every `persistBytes` copied (or `persistMs`), the prefetcher has the
 * engine journal those soft bits (`persistSoftBits`: fdatasync of the data, then the records), so
 * a crash or kill during a long prefetch loses at most that much progress. (The persist counts as
 * prefetch I/O for rule 2; it is not done more often while the guest is busy, because an
 * fdatasync also cleans the guest's dirty pages and re-dirtying them slows its writes.)
 *
 * One loop, one reader scanning the base sequentially, with up to `depth` chunks in flight:
 *
 *   cursor → nextAbsentBlock(cursor) = b → start prefetchBlocks(b, b + chunk − 1) → cursor = end
 *
 * wrapping to block 0 once the end is reached (after the chunks in flight finished), until a scan
 * from 0 finds nothing absent. The chunks in flight cover disjoint block ranges (the cursor only
 * moves forward within a pass), each has its own copy buffer, and each sets its blocks' bits
 * itself once its data write completed (the engine hook's rule, the same as copy-on-read's), so
 * they may complete in any order: a bit never goes before its data, and a block is never read
 * twice by the prefetcher (only absent blocks are read, a block in flight is locked and beyond
 * the cursor, and a copied block is present from then on). Pipelining hides the base's request
 * latency and overlaps one chunk's local write with the next chunks' fetches; the default depth
 * follows what the base serves at once (`FvdImage.baseReadAhead()`: a remote source's connections
 * × request size), 1 for a local file. While the foreground is busy (rule 2) one chunk at a time.
 * A persist (below) runs in background while chunks start and complete: it journals only bits
 * already set, i.e. blocks whose data write completed before it (FORMAT.md §9).
 *
 * Throttling, checked before every chunk:
 *
 *  1. Bandwidth cap (`maxBytesPerSec`): pacing, not a bucket — after a chunk of n bytes started at
 *     t0, the next may start at max(previous slot, t0) + n / cap. No catching up after pauses.
 *     (n is reserved when the chunk starts — its whole range — and corrected to the bytes it
 *     actually read when it completes, so chunks in flight cannot overrun the cap.)
 *  2. Foreground latency (`maxLatencyShare`), when the activity source reports latencies: the
 *     latency budget of fvd/prefetch-control.ts (baseline from periodic probes), fed per
 *     completed foreground request (a ForegroundMeter) or per poll (a polled ActivitySource, such
 *     as the daemon's queue workers' shared counters, daemon/queue-activity.ts). A chunk starts
 *     only while the budget is not overdrawn or the foreground is idle; a completion that refills
 *     it wakes the loop at once (a polled source is read after each chunk and at least every
 *     `windowMs` while waiting). While the foreground is active, chunks are `busyChunkBytes`
 *     (smaller: each slows fewer requests, and the gate is consulted more often).
 *  3. Foreground rate, when the source reports no latency (latencyNs stays 0: an owner that
 *     counts requests but does not time them): a window with at least `busyOpsPerSec`
 *     foreground operations per second means "guest busy": pause until the rate has stayed below
 *     that for `idleResumeMs`.
 *  4. FVD's own throughput rule: prefetch throughput is bytes copied per unit of time with prefetch
 *     I/O in flight (overlapping chunks count that time once; with one chunk at a time this is
 *     the time inside prefetchBlocks); once at least `windowMs` of it accumulated, an EWMA (α = 0.8) is updated,
 *     and when it is below `minBytesPerSec` the prefetcher backs off (random pause of
 *     minPauseMs .. maxPauseMs) with 50 % probability — contention from something it cannot see
 *     (other images on the same disk) — otherwise the average is reset.
 *
 * Any prefetch I/O error ends prefetching: no new chunk starts, the chunks still in flight are
 * waited for (they may complete and keep their copies), then state `failed`, the first error kept;
 * the image is unaffected (the hook releases its locks; a copy that failed simply leaves the
 * blocks in the base, for a later prefetch).
 *
 * The owner must `await prefetcher.stop()` before closing the image.
 */
import { EventEmitter } from 'node:events';
import type { FvdImage } from './image.js';
import { FvdError } from './errors.js';
import { LatencyBudget } from './prefetch-control.js';
import { isUrl } from './base-location.js';

/** Cumulative counters of foreground I/O, fed by whoever serves the image. */
export interface ForegroundActivity {
  /** Requests completed. */
  ops: number;
  /** Bytes transferred by them. */
  bytes: number;
  /** Sum of their latencies in nanoseconds; 0 when the owner does not time requests. */
  latencyNs: number;
  /** Requests begun and not yet completed, when the owner counts them (keeps "idle" honest). */
  inFlight?: number;
}

/**
 * The copy unit for a base chain (its paths or URLs), for `fvd prefetch` without --chunk and for
 * serve's background prefetching alike. Over HTTP, large sequential ranges (8 MiB, each split
 * into parallel requests). Over NBD, one request's worth (2 MiB, the client's request size), with
 * more chunks in flight (the Prefetcher's depth follows): each reply lands in its chunk's buffer
 * and is written while still in the CPU cache — with 8 MiB chunks the write's copy into the page
 * cache cost twice the system time (1 GiB template, 768 MiB of data: sys 0.46–0.58 s against
 * 0.98–1.38 s, four interleaved rounds at load 9–10), while over HTTP 2 MiB was no better.
 * 1 MiB for a local base.
 */
export function defaultChunkBytes(baseChain: readonly string[]): number {
  if (baseChain.some((p) => /^nbds?(\+unix)?:/i.test(p))) return 2 * MiB;
  if (baseChain.some((p) => isUrl(p))) return 8 * MiB;
  return MiB;
}

export type ActivitySource = () => ForegroundActivity;

export interface PrefetchOptions {
  /** Bytes per prefetch read while the foreground is idle (rounded up to whole blocks); default 1 MiB. */
  chunkBytes?: number;
  /** Bytes per prefetch read while the foreground is active (latency budget); default 256 KiB. */
  busyChunkBytes?: number;
  /**
   * Chunks in flight at once while the foreground is idle (≥ 1). Default: enough to cover what
   * the base serves at once (`FvdImage.baseReadAhead()`, a remote source's connections × request
   * size) plus one whose local write overlaps the fetches, at most 8; 1 for a local base.
   */
  depth?: number;
  /** Bandwidth cap in bytes per second of base data copied; default unlimited (0 or Infinity). */
  maxBytesPerSec?: number;
  /** Foreground latency may rise at most this share over its baseline (default 0.1). */
  maxLatencyShare?: number;
  /** Latency budget: the foreground is idle after this long without a request (default 50 ms). */
  idleMs?: number;
  /** Latency budget: requests this soon after prefetch I/O do not feed the baseline (default 2 ms). */
  settleMs?: number;
  /** Rate rule: the foreground must be quiet this long before a busy pause ends (default 500 ms). */
  idleResumeMs?: number;
  /** Random back-off pauses (throughput rule) last minPauseMs .. maxPauseMs (default 1 .. 2000 ms). */
  minPauseMs?: number;
  maxPauseMs?: number;
  /** Measurement window (FVD's throughput_measure_time, default 100 ms). */
  windowMs?: number;
  /**
   * The polled latencies cover only part of each request's path (the ublk daemon's part): a drop
   * in the request rate is charged as a latency rise too (fvd/prefetch-control.ts, rateTerm).
   */
  partialLatency?: boolean;
  /** Without latency figures, this many foreground ops per second mean "busy" (default 10). */
  busyOpsPerSec?: number;
  /** FVD's min throughput: below it, back off with 50 % probability (default 5 MiB/s; 0 = off). */
  minBytesPerSec?: number;
  /** Journal the copied blocks' bits after this many bytes were copied (default 64 MiB; 0 = never). */
  persistBytes?: number;
  /** ... or after this long with unpersisted copies (default 10 s; 0 = no time trigger). */
  persistMs?: number;
  /** Seed of the back-off randomness (deterministic tests); default random. */
  seed?: number;
  /**
   * Foreground activity to adapt to: a ForegroundMeter (per-request latencies, the best input) or
   * a polled source of cumulative counters. None = the offline tool, nothing to yield to.
   */
  activity?: ActivitySource | ForegroundMeter;
  /** Clock in milliseconds (tests); default performance.now. */
  now?: () => number;
}

export type PrefetchState = 'idle' | 'running' | 'paused' | 'done' | 'stopped' | 'failed';
export type PauseReason = 'user' | 'busy' | 'latency' | 'throughput';

export interface PrefetchProgress {
  state: PrefetchState;
  /** Why it is paused (state 'paused'), or null. */
  pauseReason: PauseReason | null;
  /** Base bytes this prefetcher copied into the image. */
  bytesDone: number;
  /** Base bytes still only in the base (whoever makes them local: prefetch, guest writes, COR). */
  bytesRemaining: number;
  /** bytesDone / (bytesDone + bytesRemaining), 1 when nothing remains. */
  fraction: number;
  /** Recent copy rate in bytes per second (last few seconds, pauses included). */
  rate: number;
  /** Seconds to completion at that rate, or null when unknown (no rate yet, paused). */
  etaSeconds: number | null;
  /** Milliseconds since start(). */
  elapsedMs: number;
  /** Pauses so far: busy, throughput back-offs, latency-budget waits longer than windowMs. */
  backoffs: number;
  /** Times the latency budget closed the gate before a chunk (short waits included). */
  throttles: number;
  /** Baseline foreground latency in ns (requests without prefetch I/O), or null. */
  baselineLatencyNs: number | null;
  /** Baseline foreground request rate per second (partialLatency), or null. */
  baselineOpsPerSec: number | null;
  /** Times the copied blocks' bits were journaled (persistSoftBits). */
  persists: number;
  /** The error that ended prefetching (state 'failed'). */
  error: Error | null;
}

const MiB = 1024 * 1024;
const ALPHA = 0.8;
/** A pass that copied nothing (every absent block held by guest requests) waits this long. */
const LOCKED_RETRY_MS = 5;
const RATE_SPAN_MS = 5000;
const RATE_SAMPLE_MS = 250;

/** mulberry32: small seeded PRNG, so back-off decisions replay exactly in tests. */
function makeRandom(seed: number | undefined): () => number {
  if (seed === undefined) return Math.random;
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) | 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** What a ForegroundMeter reports each completion to (a Prefetcher). */
interface ForegroundListener {
  onForeground(latencyNs: number): void;
}

/**
 * Measures foreground requests for a Prefetcher: `begin()` when a request is issued and
 * `end(bytes, latencyNs)` when it completes (or `time(promise, bytes)` for both), and pass the
 * meter as the prefetcher's `activity`. Every completion reaches the prefetcher's latency budget
 * at once; requests in flight keep the foreground from counting as idle. `record()` is `end()`
 * for owners that cannot call `begin()`. Allocation-free per request.
 */
export class ForegroundMeter {
  private readonly totals: ForegroundActivity = { ops: 0, bytes: 0, latencyNs: 0 };
  /** Requests begun and not yet ended. */
  inFlight = 0;
  /** @internal set by the Prefetcher that adapts to this meter */
  listener: ForegroundListener | null = null;
  begin(): void {
    this.inFlight++;
  }
  end(bytes: number, latencyNs: number): void {
    if (this.inFlight > 0) this.inFlight--;
    this.record(bytes, latencyNs);
  }
  record(bytes: number, latencyNs: number): void {
    this.totals.ops++;
    this.totals.bytes += bytes;
    this.totals.latencyNs += latencyNs;
    this.listener?.onForeground(latencyNs);
  }
  /** Awaits `p` and records it with its latency. */
  async time<T>(p: Promise<T>, bytes: number, startNs = process.hrtime.bigint()): Promise<T> {
    this.begin();
    try {
      return await p;
    } finally {
      this.end(bytes, Number(process.hrtime.bigint() - startNs));
    }
  }
  readonly source: ActivitySource = () => this.totals;
}

export class Prefetcher extends EventEmitter implements ForegroundListener {
  readonly chunkBlocks: number;
  readonly busyChunkBlocks: number;
  private readonly blockSize: number;
  private readonly blocks: number;
  /** Bytes of the virtual disk that have bitmap bits (min(base size, virtual size)). */
  private readonly baseLimit: number;
  private readonly cap: number;
  private readonly idleResumeMs: number;
  private readonly minPauseMs: number;
  private readonly maxPauseMs: number;
  private readonly windowMs: number;
  private readonly busyOpsPerSec: number;
  private readonly minBytesPerSec: number;
  private readonly persistBytes: number;
  private readonly persistMs: number;
  private readonly random: () => number;
  private readonly meter: ForegroundMeter | null;
  private readonly activity: ActivitySource | null;
  private readonly now: () => number;
  /** The latency budget (rule 2); consulted once latency figures arrived. */
  readonly budget: LatencyBudget;
  /** Chunks in flight at most (foreground idle). */
  readonly depth: number;
  /** Copy buffers not in use, reused by later chunks (no per-chunk allocation, no GC pressure). */
  private readonly freeScratch: Uint8Array[] = [];
  /** Chunks in flight; each settles (never rejects) when its copy ended. */
  private readonly chunks = new Set<Promise<void>>();
  /** The persist in flight (journaling copied blocks' bits), or null; it never rejects. */
  private persisting: Promise<void> | null = null;
  /** The first error of a chunk or persist: no chunk starts after it, the loop ends with it. */
  private chunkError: Error | null = null;
  /** Blocks of the chunks copied in this pass: false after a pass that copied nothing. */
  private copiedThisPass = false;

  private state: PrefetchState = 'idle';
  private pauseReason: PauseReason | null = null;
  private userPaused = false;
  private stopping = false;
  private error: Error | null = null;
  private loopPromise: Promise<void> | null = null;
  private startedAt = 0;
  private bytesDone = 0;
  private backoffs = 0;
  private persists = 0;
  private unpersistedBytes = 0;
  private lastPersistAt = 0;
  /** Prefetch I/O operations in flight (chunks and persists). */
  private ioCount = 0;
  /** Settles when ioCount drops to 0 (pause() waits on it). */
  private ioIdle: Promise<void> | null = null;
  private resolveIoIdle: (() => void) | null = null;
  /** Throughput rule: chunk time is counted up to here (chunks in flight overlap: counted once). */
  private tpSince = 0;
  /** Wakes the current sleep early (stop, resume, a foreground completion refilling the budget). */
  private wake: (() => void) | null = null;
  /** The loop waits for the latency budget: a completion that reopens it wakes the loop. */
  private waitingForBudget = false;
  /** Latency figures have been seen: rule 2 applies (else rule 3). */
  private timed = false;
  /** Pacing: the earliest time the next chunk may start (bandwidth cap). */
  private nextSlot = 0;
  private pauseUntil = 0;
  // polled foreground window (rules 2 and 3 for an ActivitySource)
  private winStart = 0;
  private winOps = 0;
  private winLat = 0;
  private winPrefetched = false;
  /** Foreground requests in flight at the last poll of a polled source. */
  private polledInFlight = 0;
  /** The first baseline was announced ('baseline' event). */
  private baselineAnnounced = false;
  /** Last time the foreground was seen busy (rate rule). */
  private lastBusyAt = Number.NEGATIVE_INFINITY;
  // FVD throughput rule
  private tpBytes = 0;
  private tpMs = 0;
  private tpAvg: number | null = null;
  // progress rate samples [t, bytesDone, t, bytesDone, ...]
  private readonly samples: number[] = [];

  /** Resolves when the loop ends (done, stopped or failed), with the final progress. */
  readonly finished: Promise<PrefetchProgress>;
  private resolveFinished!: (p: PrefetchProgress) => void;

  constructor(
    readonly image: FvdImage,
    options: PrefetchOptions = {},
  ) {
    super();
    const { blocks, blockSize } = image.baseProgress();
    const st = image.stats();
    this.blockSize = blockSize;
    this.blocks = blocks;
    this.baseLimit = Math.min(st.baseSize, st.virtualSize);
    const chunk = options.chunkBytes ?? MiB;
    if (!(chunk > 0)) throw new RangeError(`chunkBytes must be positive`);
    this.chunkBlocks = Math.max(1, Math.ceil(chunk / blockSize));
    const busyChunk = options.busyChunkBytes ?? Math.min(chunk, 256 * 1024);
    if (!(busyChunk > 0)) throw new RangeError(`busyChunkBytes must be positive`);
    this.busyChunkBlocks = Math.max(1, Math.ceil(busyChunk / blockSize));
    const readAhead = image.baseReadAhead();
    const depth = options.depth ?? (readAhead > 0 ? Math.min(8, 1 + Math.ceil(readAhead / (this.chunkBlocks * blockSize))) : 1);
    if (!(Number.isInteger(depth) && depth >= 1)) throw new RangeError(`depth must be a positive integer`);
    this.depth = depth;
    const cap = options.maxBytesPerSec ?? 0;
    this.cap = cap > 0 && Number.isFinite(cap) ? cap : 0;
    this.budget = new LatencyBudget({
      share: options.maxLatencyShare ?? 0.1,
      idleMs: options.idleMs,
      settleMs: options.settleMs,
      rateTerm: options.partialLatency ?? false,
    });
    this.idleResumeMs = options.idleResumeMs ?? 500;
    this.minPauseMs = Math.max(0, options.minPauseMs ?? 1);
    this.maxPauseMs = Math.max(this.minPauseMs, options.maxPauseMs ?? 2000);
    this.windowMs = Math.max(1, options.windowMs ?? 100);
    this.busyOpsPerSec = options.busyOpsPerSec ?? 10;
    this.minBytesPerSec = options.minBytesPerSec ?? 5 * MiB;
    this.persistBytes = options.persistBytes ?? 64 * MiB;
    this.persistMs = options.persistMs ?? 10_000;
    this.random = makeRandom(options.seed);
    const act = options.activity;
    this.meter = act instanceof ForegroundMeter ? act : null;
    this.activity = act instanceof ForegroundMeter ? null : (act ?? null);
    this.now = options.now ?? (() => performance.now());
    this.finished = new Promise((r) => (this.resolveFinished = r));
  }

  /** Starts the background loop (idempotent). */
  start(): this {
    if (this.loopPromise) return this;
    this.startedAt = this.now();
    this.lastPersistAt = this.startedAt;
    if (this.meter) this.meter.listener = this;
    this.resetWindow(this.startedAt);
    this.samples.push(this.startedAt, 0);
    this.setState('running', null);
    this.loopPromise = this.loop().catch((err: unknown) => {
      this.error = err instanceof Error ? err : new Error(String(err));
      this.setState('failed', null);
    }).finally(() => {
      if (this.meter?.listener === this) this.meter.listener = null;
      const p = this.progress();
      this.resolveFinished(p);
      this.emit(this.state, p); // 'done' | 'stopped' | 'failed'
    });
    return this;
  }

  /** Stops after the chunks in flight (waits for them). The image stays as it is: usable, partly local. */
  async stop(): Promise<void> {
    this.stopping = true;
    this.wake?.();
    if (this.loopPromise) await this.loopPromise;
    else if (this.state === 'idle') {
      this.setState('stopped', null);
      this.resolveFinished(this.progress());
    }
  }

  /** Pauses until resume(); resolves once no prefetch I/O is in flight. */
  async pause(): Promise<void> {
    this.userPaused = true;
    if (this.state === 'running' || this.state === 'paused') this.setState('paused', 'user');
    while (this.ioIdle) await this.ioIdle;
  }

  resume(): void {
    this.userPaused = false;
    this.wake?.();
  }

  /** A foreground request completed (from a ForegroundMeter): rule 2, per request. */
  onForeground(latencyNs: number): void {
    if (latencyNs <= 0) return;
    this.timed = true;
    const now = this.now();
    if (this.budget.onRequests(now, 1, latencyNs, now - latencyNs / 1e6) && this.waitingForBudget) this.wake?.();
    this.noteBaseline();
  }

  progress(): PrefetchProgress {
    const now = this.now();
    const { absent } = this.image.baseProgress();
    let remaining = absent * this.blockSize;
    // The last block may straddle the base's end: only its base part counts.
    if (absent > 0 && this.image.nextAbsentBlock(this.blocks - 1) === this.blocks - 1)
      remaining -= this.blocks * this.blockSize - this.baseLimit;
    remaining = Math.max(0, remaining);
    this.sampleRate(now);
    const rate = this.rate(now);
    const total = this.bytesDone + remaining;
    const active = this.state === 'running';
    return {
      state: this.state,
      pauseReason: this.state === 'paused' ? this.pauseReason : null,
      bytesDone: this.bytesDone,
      bytesRemaining: remaining,
      fraction: total ? this.bytesDone / total : 1,
      rate,
      etaSeconds: remaining === 0 ? 0 : active && rate > 0 ? remaining / rate : null,
      elapsedMs: this.startedAt ? now - this.startedAt : 0,
      backoffs: this.backoffs,
      throttles: this.budget.closings,
      baselineLatencyNs: this.budget.baselineNs,
      baselineOpsPerSec: this.budget.baselineRate === null ? null : this.budget.baselineRate * 1000,
      persists: this.persists,
      error: this.error,
    };
  }

  // ---------------------------------------------------------------------------------------------

  private setState(state: PrefetchState, reason: PauseReason | null): void {
    const changed = state !== this.state || reason !== this.pauseReason;
    this.state = state;
    this.pauseReason = reason;
    if (changed) this.emit('state', state, reason);
  }

  private fgInFlight(): number {
    return this.meter ? this.meter.inFlight : this.polledInFlight;
  }

  /** Announces the first baseline ('baseline', ns): the owner may log that the budget is live. */
  private noteBaseline(): void {
    if (!this.baselineAnnounced && this.budget.baselineNs !== null) {
      this.baselineAnnounced = true;
      this.emit('baseline', this.budget.baselineNs);
    }
  }

  private async loop(): Promise<void> {
    const image = this.image;
    let cursor = 0;
    for (;;) {
      if (this.chunkError) return this.fail();
      const now = this.now();
      if (
        this.unpersistedBytes > 0 &&
        !this.persisting &&
        ((this.persistBytes > 0 && this.unpersistedBytes >= this.persistBytes) || (this.persistMs > 0 && now - this.lastPersistAt >= this.persistMs))
      ) {
        this.startPersist();
      }
      await this.gate();
      if (this.stopping) {
        await this.drain();
        return this.setState('stopped', null);
      }
      if (this.chunkError) return this.fail();
      const b = image.nextAbsentBlock(cursor);
      if (b < 0) {
        // Blocks of chunks in flight are still absent: let them land before looking again (and
        // a persist end before FULLY_LOCAL is recorded).
        if (this.chunks.size > 0 || this.persisting) {
          await this.drain();
          continue;
        }
        if (cursor === 0) {
          // Nothing absent: record FULLY_LOCAL (it waits for copy-on-read in flight first).
          if (await image.markFullyLocal()) {
            this.sampleRate(this.now(), true);
            return this.setState('done', null);
          }
          await this.sleep(LOCKED_RETRY_MS);
          continue;
        }
        // End of a pass: blocks skipped because a guest request held them are still absent.
        if (!this.copiedThisPass) {
          // Nothing copied in a whole pass: guest requests hold everything left — or the image
          // was closed under us (prefetchBlocks then copies nothing, forever).
          if (image.isClosed) throw new FvdError(`${image.path}: image closed while prefetching`, 'EINVAL');
          await this.sleep(LOCKED_RETRY_MS);
        }
        cursor = 0;
        this.copiedThisPass = false;
        continue;
      }
      const t0 = this.now();
      const busy = this.timed && this.budget.busy(t0, this.fgInFlight());
      const n = busy ? this.busyChunkBlocks : this.chunkBlocks;
      const b1 = Math.min(b + n - 1, this.blocks - 1);
      this.startChunk(b, b1, t0);
      cursor = b1 + 1;
    }
  }

  /** Starts copying blocks [b, b1] (not awaited: it joins `chunks`, and settles without rejecting). */
  private startChunk(b: number, b1: number, t0: number): void {
    // Bandwidth cap: reserve the whole range now, give back what was not read at completion.
    const reserved = Math.max(0, Math.min((b1 + 1) * this.blockSize, this.baseLimit) - b * this.blockSize);
    if (this.cap) this.nextSlot = Math.max(this.nextSlot, t0) + (reserved / this.cap) * 1000;
    const scratch = this.freeScratch.pop() ?? new Uint8Array(this.chunkBlocks * this.blockSize);
    if (this.chunks.size === 0) this.tpSince = t0;
    const chunk: Promise<void> = this.io(this.image.prefetchBlocks(b, b1, scratch)).then(
      (bytes) => {
        const t1 = this.now();
        if (this.cap) this.nextSlot -= ((reserved - bytes) / this.cap) * 1000;
        this.tpMs += t1 - this.tpSince;
        this.tpSince = t1;
        if (bytes > 0) {
          this.copiedThisPass = true;
          this.bytesDone += bytes;
          this.unpersistedBytes += bytes;
          this.tpBytes += bytes;
        }
        this.sampleRate(t1);
        this.observe(t1);
        this.throughputRule();
      },
      (err: unknown) => {
        this.chunkError ??= err instanceof Error ? err : new Error(String(err));
      },
    ).finally(() => {
      this.freeScratch.push(scratch);
      this.chunks.delete(chunk);
      this.wake?.(); // a slot is free
    });
    this.chunks.add(chunk);
  }

  /** Waits until no chunk and no persist is in flight; throws the first error. */
  private async drain(): Promise<void> {
    while (this.chunks.size > 0) await Promise.race(this.chunks);
    if (this.persisting) await this.persisting;
    if (this.chunkError) throw this.chunkError;
  }

  /** A chunk failed: wait for the others (they use the image), then end with its error. */
  private async fail(): Promise<never> {
    await this.drain();
    throw this.chunkError!;
  }

  /** Prefetch I/O: tracked for pause(), the throughput rule and the latency budget's attribution. */
  private async io<T>(p: Promise<T>): Promise<T> {
    if (this.ioCount++ === 0) {
      this.ioIdle = new Promise((r) => (this.resolveIoIdle = r));
      this.budget.ioStart();
    }
    this.winPrefetched = true;
    try {
      return await p;
    } finally {
      if (--this.ioCount === 0) {
        this.budget.ioEnd(this.now());
        const resolve = this.resolveIoIdle!;
        this.ioIdle = null;
        this.resolveIoIdle = null;
        resolve();
      }
    }
  }

  /**
   * Journals the bits of the blocks copied so far (the engine makes their data durable first), in
   * background: the loop keeps starting chunks meanwhile, so the fetch from the base overlaps the
   * fdatasync (waiting for it stalled a remote prefetch for a fifth of its time). One persist at
   * a time; its error ends prefetching like a chunk's.
   */
  private startPersist(): void {
    const pending = this.unpersistedBytes;
    this.persisting = this.io(this.image.persistSoftBits()).then(
      (blocks) => {
        this.unpersistedBytes = Math.max(0, this.unpersistedBytes - pending);
        this.lastPersistAt = this.now();
        this.persists++;
        this.emit('persisted', blocks);
      },
      (err: unknown) => {
        this.chunkError ??= err instanceof Error ? err : new Error(String(err));
      },
    ).finally(() => {
      this.persisting = null;
      this.wake?.();
    });
  }

  /**
   * Returns when the next chunk may start: waits out the user's pause, back-offs, busy periods, the
   * latency budget and the bandwidth cap.
   */
  private async gate(): Promise<void> {
    let budgetWaitSince = -1;
    for (;;) {
      if (this.stopping || this.chunkError) return;
      let now = this.now();
      if (this.userPaused) {
        this.setState('paused', 'user');
        await this.sleep(this.windowMs);
        this.observe(this.now());
        continue;
      }
      // A free slot: `depth` chunks in flight while the foreground is idle, one while it is busy.
      if (this.chunks.size >= (this.timed && this.budget.busy(now, this.fgInFlight()) ? 1 : this.depth)) {
        await Promise.race(this.chunks);
        continue;
      }
      if (this.state === 'paused' && this.pauseReason === 'user') this.setState('running', null); // user resumed
      this.observe(now);
      if (this.state === 'paused' && this.pauseReason !== 'latency') {
        // A back-off or busy pause in progress: observe() decides when it ends.
        await this.sleep(Math.min(this.windowMs, Math.max(1, this.pauseUntil - now)));
        continue;
      }
      if (this.timed && !this.budget.ready(now, this.fgInFlight())) {
        // Rule 2: the budget is overdrawn. A completion that refills it wakes us (per request);
        // otherwise we look again when the foreground would count as idle, or after a window —
        // also a polled source, not more often: each poll wakes the serving process's main
        // thread, and in a 2-vCPU guest whose CPUs its own I/O saturates, polling every 5 ms cost
        // the guest half its IOPS (bench/device-prefetch.sh).
        if (budgetWaitSince < 0) budgetWaitSince = now;
        else if (now - budgetWaitSince >= this.windowMs && this.state === 'running') {
          this.backoffs++;
          this.setState('paused', 'latency');
          this.emit('backoff', 'latency');
        }
        this.waitingForBudget = true;
        try {
          await this.sleep(Math.max(1, Math.min(this.windowMs, this.budget.idleAt() - now + 1)));
        } finally {
          this.waitingForBudget = false;
        }
        continue;
      }
      if (this.state === 'paused' && this.pauseReason === 'latency') this.setState('running', null);
      now = this.now();
      if (this.cap && this.nextSlot > now) {
        await this.sleep(Math.min(this.windowMs, this.nextSlot - now));
        continue;
      }
      return;
    }
  }

  /** Random back-off (FVD): uniform minPauseMs .. maxPauseMs. */
  private backOff(reason: PauseReason, now: number): void {
    this.backoffs++;
    this.pauseUntil = now + this.minPauseMs + this.random() * (this.maxPauseMs - this.minPauseMs);
    this.resetThroughput();
    this.setState('paused', reason);
    this.emit('backoff', reason);
  }

  private busyPause(): void {
    this.backoffs++;
    this.pauseUntil = Number.POSITIVE_INFINITY;
    this.resetThroughput();
    this.resetWindow(this.now());
    this.setState('paused', 'busy');
    this.emit('backoff', 'busy');
  }

  private endPause(): void {
    this.resetThroughput();
    this.setState('running', null);
  }

  private resetWindow(now: number): void {
    const a = this.activity?.();
    this.winStart = now;
    this.winOps = a ? a.ops : 0;
    this.winLat = a ? a.latencyNs : 0;
    this.winPrefetched = this.ioCount > 0;
  }

  private resetThroughput(): void {
    this.tpBytes = 0;
    this.tpMs = 0;
    this.tpAvg = null;
  }

  /**
   * Ends a timed pause, and reads a polled activity source: timed requests go to the latency
   * budget as one aggregate (rule 2), untimed ones drive the busy rule (rule 3) per window.
   */
  private observe(now: number): void {
    const paused = this.state === 'paused' && this.pauseReason !== 'user' && this.pauseReason !== 'latency';
    if (paused && now >= this.pauseUntil) this.endPause();
    if (!this.activity) return;
    const a = this.activity();
    this.polledInFlight = a.inFlight ?? 0;
    const dOps = a.ops - this.winOps;
    const dLat = a.latencyNs - this.winLat;
    if (dLat > 0) {
      this.timed = true;
      this.budget.onRequests(now, dOps, dLat, this.winStart, now - this.winStart);
      this.noteBaseline();
      this.resetWindow(now);
      return;
    }
    if (this.timed) {
      // No request in this window: windows stay contiguous and short, so a window that reports
      // requests covers only the time they came in (the rate term charges by window length).
      this.resetWindow(now);
      return;
    }
    const dt = now - this.winStart;
    if (dt < this.windowMs) return;
    const prefetched = this.winPrefetched;
    this.resetWindow(now);
    const busy = dOps > 0 && (dOps * 1000) / dt >= this.busyOpsPerSec;
    if (busy) this.lastBusyAt = now;
    if (this.state === 'running' && prefetched && busy) this.busyPause();
    else if (this.state === 'paused' && this.pauseReason === 'busy' && now - this.lastBusyAt >= this.idleResumeMs) this.endPause();
  }

  /** Rule 4 (FVD): EWMA of per-operation throughput; below the minimum, back off half the time. */
  private throughputRule(): void {
    if (this.state !== 'running' || !this.minBytesPerSec || this.tpMs < this.windowMs) return;
    const thisRate = (this.tpBytes / this.tpMs) * 1000;
    this.tpBytes = 0;
    this.tpMs = 0;
    this.tpAvg = this.tpAvg === null ? thisRate : ALPHA * this.tpAvg + (1 - ALPHA) * thisRate;
    if (this.tpAvg < this.minBytesPerSec) {
      if (this.random() < 0.5) this.backOff('throughput', this.now());
      else this.tpAvg = null;
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const timer = setTimeout(done, Math.max(0, ms));
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wake = () => {
        this.wake = null;
        done();
      };
    });
  }

  private sampleRate(now: number, force = false): void {
    const s = this.samples;
    if (!force && s.length && now - s[s.length - 2]! < RATE_SAMPLE_MS) return;
    s.push(now, this.bytesDone);
    while (s.length > 4 && now - s[2]! >= RATE_SPAN_MS) s.splice(0, 2);
  }

  private rate(now: number): number {
    const s = this.samples;
    if (s.length < 2) return 0;
    const t0 = s[0]!;
    const dt = now - t0;
    if (dt <= 0) return 0;
    return ((this.bytesDone - s[1]!) / dt) * 1000;
  }
}
