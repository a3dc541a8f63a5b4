/**
 * Adaptive background prefetching (FVD paper §3.4.2, code fvd-prefetch.c; ublk-fvd-notes §1.9):
 * copies every base block that is not yet local into the image, in large sequential reads, until
 * the whole disk is local, then records FULLY_LOCAL (`FvdImage.markFullyLocal`), after which reads
 * never consult the bitmap nor open the base.
 *
 * Copies go through the engine hook `prefetchBlocks(b0, b1)`: a *soft write* like copy-on-read
 * (bits set in memory only, persisted at the next checkpoint, FORMAT.md §5.2/§9), taken under the
 * engine's block locks and skipping any block a guest request holds — so a guest write always
 * wins, and a block skipped now is picked up by a later pass.
 *
 * One loop, one chunk in flight at a time ("one reader scanning the base sequentially"):
 *
 *   cursor → nextAbsentBlock(cursor) = b → prefetchBlocks(b, b + chunkBlocks − 1) → cursor = end
 *
 * wrapping to block 0 once the end is reached, until a scan from 0 finds nothing absent. Each
 * block is read from the base at most once by the prefetcher (only absent blocks are read, and a
 * copied block is present from then on).
 *
 * Throttling, checked between chunks and every `windowMs` while waiting:
 *
 *  1. Bandwidth cap (`maxBytesPerSec`): pacing, not a bucket — after a chunk of n bytes started at
 *     t0, the next may start at max(previous slot, t0) + n / cap. No catching up after pauses.
 *  2. Foreground latency (`maxLatencyShare`), when the activity source reports latency: the mean
 *     foreground latency of windows during which no prefetch I/O ran is the *baseline* (EWMA,
 *     α = 0.8 like FVD). A window while prefetching whose mean latency exceeds
 *     baseline × (1 + share) makes the prefetcher back off for a random 1 ms .. `maxPauseMs` pause
 *     (randomized like FVD, so several prefetchers on one disk do not resume in lock-step). With
 *     foreground activity and no baseline yet, it backs off first to measure one. A back-off
 *     ends early when the foreground has been idle for `idleResumeMs`.
 *  3. Foreground rate, when the source reports no latency (latencyNs stays 0; e.g. the daemon's
 *     queue workers count requests but do not time them): a window with at least `busyOpsPerSec`
 *     foreground operations per second means "guest busy": pause until the rate has stayed below
 *     that for `idleResumeMs`.
 *  4. FVD's own throughput rule: prefetch throughput is measured per operation (time inside
 *     prefetchBlocks); once at least `windowMs` of it accumulated, an EWMA (α = 0.8) is updated,
 *     and when it is below `minBytesPerSec` the prefetcher backs off (random pause) with 50 %
 *     probability — contention from something it cannot see (other images on the same disk) —
 *     otherwise the average is reset. After every pause the throughput state is reset.
 *
 * Any prefetch I/O error ends prefetching: state `failed`, the error kept; the image is unaffected
 * (the hook releases its locks; a copy that failed simply leaves the blocks in the base).
 *
 * The owner must `await prefetcher.stop()` before closing the image.
 */
import { EventEmitter } from 'node:events';
import type { FvdImage } from './image.js';

/** Cumulative counters of foreground I/O, fed by whoever serves the image. */
export interface ForegroundActivity {
  /** Requests completed. */
  ops: number;
  /** Bytes transferred by them. */
  bytes: number;
  /** Sum of their latencies in nanoseconds; 0 when the owner does not time requests. */
  latencyNs: number;
}

export type ActivitySource = () => ForegroundActivity;

export interface PrefetchOptions {
  /** Bytes per prefetch read (rounded up to whole blocks); default 1 MiB. */
  chunkBytes?: number;
  /** Bandwidth cap in bytes per second of base data copied; default unlimited (0 or Infinity). */
  maxBytesPerSec?: number;
  /** Foreground latency may rise at most this share over its idle baseline (default 0.1). */
  maxLatencyShare?: number;
  /** The foreground must be idle this long before a busy pause ends (default 500 ms). */
  idleResumeMs?: number;
  /** Random back-off pauses last minPauseMs .. maxPauseMs (default 1 .. 2000 ms). */
  minPauseMs?: number;
  maxPauseMs?: number;
  /** Measurement window (FVD's throughput_measure_time, default 100 ms). */
  windowMs?: number;
  /** Without latency figures, this many foreground ops per second mean "busy" (default 10). */
  busyOpsPerSec?: number;
  /** FVD's min throughput: below it, back off with 50 % probability (default 5 MiB/s; 0 = off). */
  minBytesPerSec?: number;
  /** Seed of the back-off randomness (deterministic tests); default random. */
  seed?: number;
  /** Foreground activity to adapt to; none = the offline tool, nothing to yield to. */
  activity?: ActivitySource;
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
  /** Back-off and busy pauses so far. */
  backoffs: number;
  /** Baseline foreground latency in ns (windows without prefetch I/O), or null. */
  baselineLatencyNs: number | null;
  /** The error that ended prefetching (state 'failed'). */
  error: Error | null;
}

const MiB = 1024 * 1024;
const ALPHA = 0.8;
/** Windows with fewer foreground ops do not judge latency (too noisy). */
const MIN_WINDOW_OPS = 4;
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

/**
 * Counts foreground requests for a Prefetcher: call `record(bytes, latencyNs)` per completed
 * request (or `time(promise, bytes)`), and pass `meter.source` as the activity source.
 */
export class ForegroundMeter {
  private readonly totals: ForegroundActivity = { ops: 0, bytes: 0, latencyNs: 0 };
  record(bytes: number, latencyNs: number): void {
    this.totals.ops++;
    this.totals.bytes += bytes;
    this.totals.latencyNs += latencyNs;
  }
  /** Awaits `p` and records it with its latency. */
  async time<T>(p: Promise<T>, bytes: number, startNs = process.hrtime.bigint()): Promise<T> {
    try {
      return await p;
    } finally {
      this.record(bytes, Number(process.hrtime.bigint() - startNs));
    }
  }
  readonly source: ActivitySource = () => this.totals;
}

export class Prefetcher extends EventEmitter {
  readonly chunkBlocks: number;
  private readonly blockSize: number;
  private readonly blocks: number;
  /** Bytes of the virtual disk that have bitmap bits (min(base size, virtual size)). */
  private readonly baseLimit: number;
  private readonly cap: number;
  private readonly share: number;
  private readonly idleResumeMs: number;
  private readonly minPauseMs: number;
  private readonly maxPauseMs: number;
  private readonly windowMs: number;
  private readonly busyOpsPerSec: number;
  private readonly minBytesPerSec: number;
  private readonly random: () => number;
  private readonly activity: ActivitySource | null;
  private readonly now: () => number;

  private state: PrefetchState = 'idle';
  private pauseReason: PauseReason | null = null;
  private userPaused = false;
  private stopping = false;
  private error: Error | null = null;
  private loopPromise: Promise<void> | null = null;
  private startedAt = 0;
  private bytesDone = 0;
  private backoffs = 0;
  /** Prefetch I/O in flight, and a promise that settles when it ends (pause() waits on it). */
  private inFlight: Promise<unknown> | null = null;
  /** Wakes the current sleep early (stop, resume). */
  private wake: (() => void) | null = null;
  /** Pacing: the earliest time the next chunk may start (bandwidth cap). */
  private nextSlot = 0;
  // foreground window
  private winStart = 0;
  private winOps = 0;
  private winLat = 0;
  private winPrefetched = false;
  private baselineNs: number | null = null;
  /** Last time the foreground was seen busy (rate rule) or active at all (latency rule). */
  private lastBusyAt = -Infinity;
  private lastActiveAt = -Infinity;
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
    const cap = options.maxBytesPerSec ?? 0;
    this.cap = cap > 0 && Number.isFinite(cap) ? cap : 0;
    this.share = options.maxLatencyShare ?? 0.1;
    this.idleResumeMs = options.idleResumeMs ?? 500;
    this.minPauseMs = Math.max(0, options.minPauseMs ?? 1);
    this.maxPauseMs = Math.max(this.minPauseMs, options.maxPauseMs ?? 2000);
    this.windowMs = Math.max(1, options.windowMs ?? 100);
    this.busyOpsPerSec = options.busyOpsPerSec ?? 10;
    this.minBytesPerSec = options.minBytesPerSec ?? 5 * MiB;
    this.random = makeRandom(options.seed);
    this.activity = options.activity ?? null;
    this.now = options.now ?? (() => performance.now());
    this.finished = new Promise((r) => (this.resolveFinished = r));
  }

  /** Starts the background loop (idempotent). */
  start(): this {
    if (this.loopPromise) return this;
    this.startedAt = this.now();
    this.resetWindow(this.startedAt);
    this.samples.push(this.startedAt, 0);
    this.setState('running', null);
    this.loopPromise = this.loop().catch((err: unknown) => {
      this.error = err instanceof Error ? err : new Error(String(err));
      this.setState('failed', null);
    }).finally(() => {
      this.inFlight = null;
      const p = this.progress();
      this.resolveFinished(p);
      this.emit(this.state, p); // 'done' | 'stopped' | 'failed'
    });
    return this;
  }

  /** Stops after the chunk in flight (waits for it). The image stays as it is: usable, partly local. */
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
    while (this.inFlight) await this.inFlight.catch(() => undefined);
  }

  resume(): void {
    this.userPaused = false;
    this.wake?.();
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
      baselineLatencyNs: this.baselineNs,
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

  private async loop(): Promise<void> {
    const image = this.image;
    let cursor = 0;
    let copiedThisPass = false;
    for (;;) {
      await this.gate();
      if (this.stopping) return this.setState('stopped', null);
      const b = image.nextAbsentBlock(cursor);
      if (b < 0) {
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
        if (!copiedThisPass) {
          // Nothing copied in a whole pass: guest requests hold everything left — or the image
          // was closed under us (a zero-length read then throws, ending the loop as failed).
          await image.read(new Uint8Array(0), 0);
          await this.sleep(LOCKED_RETRY_MS);
        }
        cursor = 0;
        copiedThisPass = false;
        continue;
      }
      const b1 = Math.min(b + this.chunkBlocks - 1, this.blocks - 1);
      const t0 = this.now();
      this.winPrefetched = true;
      const io = image.prefetchBlocks(b, b1);
      this.inFlight = io;
      let bytes: number;
      try {
        bytes = await io;
      } finally {
        this.inFlight = null;
      }
      const t1 = this.now();
      cursor = b1 + 1;
      if (bytes > 0) {
        copiedThisPass = true;
        this.bytesDone += bytes;
        this.tpBytes += bytes;
        this.tpMs += t1 - t0;
        if (this.cap) this.nextSlot = Math.max(this.nextSlot, t0) + (bytes / this.cap) * 1000;
      }
      this.sampleRate(t1);
      this.observe(t1);
      this.throughputRule();
    }
  }

  /**
   * Returns when the next chunk may start: waits out the user's pause, back-offs, busy periods and
   * the bandwidth cap, sampling the foreground every window meanwhile.
   */
  private async gate(): Promise<void> {
    for (;;) {
      if (this.stopping) return;
      const now = this.now();
      if (this.userPaused) {
        this.setState('paused', 'user');
        await this.sleep(this.windowMs);
        this.observe(this.now());
        continue;
      }
      if (this.state === 'paused' && this.pauseReason !== 'user') {
        // A back-off or busy pause in progress: observe() decides when it ends.
        await this.sleep(Math.min(this.windowMs, Math.max(1, this.pauseUntil - now)));
        this.observe(this.now());
        continue;
      }
      if (this.state === 'paused') this.setState('running', null); // user resumed
      if (this.cap && this.nextSlot > now) {
        await this.sleep(Math.min(this.windowMs, this.nextSlot - now));
        this.observe(this.now());
        continue;
      }
      return;
    }
  }

  private pauseUntil = 0;

  /** Random back-off (FVD): uniform minPauseMs .. maxPauseMs. */
  private backOff(reason: PauseReason, now: number): void {
    this.backoffs++;
    let until = now + this.minPauseMs + this.random() * (this.maxPauseMs - this.minPauseMs);
    // Without a baseline yet, pause long enough for one clean window to measure it.
    if (reason === 'latency' && this.baselineNs === null) until = Math.max(until, now + 2 * this.windowMs);
    this.pauseUntil = until;
    this.resetThroughput();
    this.resetWindow(now); // windows measured from here on are free of prefetch I/O
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
    this.winPrefetched = this.inFlight !== null;
  }

  private resetThroughput(): void {
    this.tpBytes = 0;
    this.tpMs = 0;
    this.tpAvg = null;
  }

  /** Closes the foreground measurement window when it is long enough, and applies rules 2 and 3. */
  private observe(now: number): void {
    const paused = this.state === 'paused' && this.pauseReason !== 'user';
    if (paused && now >= this.pauseUntil) this.endPause();
    if (!this.activity) return;
    const dt = now - this.winStart;
    if (dt < this.windowMs) return;
    const a = this.activity();
    const dOps = a.ops - this.winOps;
    const dLat = a.latencyNs - this.winLat;
    const prefetched = this.winPrefetched;
    const timed = dLat > 0;
    // Too few timed requests to judge a mean: let the window grow (up to 10 windows).
    if (timed && dOps < MIN_WINDOW_OPS && dt < 10 * this.windowMs) return;
    this.resetWindow(now);
    if (dOps > 0) this.lastActiveAt = now;
    const busy = !timed && dOps > 0 && (dOps * 1000) / dt >= this.busyOpsPerSec;
    if (busy) this.lastBusyAt = now;
    const mean = timed && dOps >= MIN_WINDOW_OPS ? dLat / dOps : null;
    if (mean !== null && !prefetched) this.baselineNs = this.baselineNs === null ? mean : ALPHA * this.baselineNs + (1 - ALPHA) * mean;

    const state = this.state;
    if (state === 'running' && prefetched) {
      if (busy) return this.busyPause();
      if (mean !== null && (this.baselineNs === null || mean > this.baselineNs * (1 + this.share))) return this.backOff('latency', now);
    } else if (state === 'paused') {
      // Busy pause: ends once the rate stayed low for idleResumeMs. Latency back-off: ends early
      // when the foreground went idle (no requests at all) for idleResumeMs. (A throughput
      // back-off answers contention the foreground source cannot see: it runs its course.)
      if (this.pauseReason === 'busy' && now - this.lastBusyAt >= this.idleResumeMs) this.endPause();
      else if (this.pauseReason === 'latency' && now - this.lastActiveAt >= this.idleResumeMs) this.endPause();
    }
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
