/**
 * Worker threads that decode compressed qcow2 clusters in batches, so that a large read (convert,
 * prefetch: 4 MiB, 64 clusters of 64 KiB) decodes on every core, as qemu-img's thread pool does:
 * the calling thread reads the file, decodes the first share itself and copies the rest out.
 *
 * Why batches: one message each way per batch of clusters (up to BATCH_BYTES of output), not per
 * cluster — a per-cluster thread-pool trip cost the main thread as much as the inflate itself
 * (qcow2-decompress.ts). Why not every read: a worker message and the copy back cost tens of
 * microseconds, so reads of a few clusters (a guest's copy-on-read) decode on the calling thread
 * in slices instead (qcow2-decompress.ts); the reader chooses (qcow2.ts, WORKER_MIN_CLUSTERS).
 *
 * The workers start on first use, at most poolSize() of them, and are unreferenced while idle, so
 * they never keep a process alive. A worker takes tens of milliseconds to load (measured ~40 ms
 * on an idle core); until the first has, readers decode everything on the calling thread
 * (workersReady) rather than wait for it. A worker that dies fails its batches (one-line error)
 * and is replaced by the next batch.
 */
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import { FvdError } from './errors.js';
import { zstdWorkerEntry, type DecodeFailure } from './qcow2-decompress.js';
import type { CompressionType } from './qcow2-format.js';

/** Output bytes per batch: a batch is a few hundred microseconds of work (at least one cluster). */
export const BATCH_BYTES = 1024 * 1024;
/**
 * Workers at most: one per core but the calling thread's, which decodes a share of each read
 * itself (qcow2.ts); at least one, at most three.
 */
export function poolSize(): number {
  // Asked once per read: computed once, as availableParallelism() reads /proc/self/cgroup and
  // calls sched_getaffinity on every call (libuv's cgroup-aware count; 630 times in one convert).
  return (cachedPoolSize ??= Math.min(3, Math.max(1, (os.availableParallelism?.() ?? os.cpus().length) - 1)));
}
let cachedPoolSize: number | undefined;

export interface BatchRequest {
  id: number;
  type: CompressionType;
  /** Tests: the worker exits with this code instead of decoding (0: decodes). */
  exitForTest: number;
  clusterSize: number;
  /** Shared memory holding the compressed streams, and each cluster's stream in it. */
  src: SharedArrayBuffer;
  starts: number[];
  lengths: number[];
  /** Shared memory the clusters are decoded into, one after another (starts.length clusters, then DECODE_SPARE bytes of room). */
  out: SharedArrayBuffer;
}

/**
 * Done (the clusters are in `out`); or the index of the first cluster that did not decode, and
 * why; or, once at start, that the worker has loaded.
 */
export type BatchReply = { id: number } | { id: number; index: number; failure: DecodeFailure } | { ready: true };
export type BatchResult = { ok: true } | { ok: false; index: number; failure: DecodeFailure };

/** A reader's batch in flight: clusters decoded together into `out`, given back once all are copied out. */
export interface DecodeBatch {
  done: Promise<void>;
  out: SharedArrayBuffer;
  /** Members not yet copied out. */
  unread: number;
}

interface Pending {
  resolve: (r: BatchResult) => void;
  reject: (e: Error) => void;
}

/** The engine's own worker entry; a registered zstd decoder may bring another (zstdWorkerEntry). */
const ENGINE_ENTRY = new URL('./qcow2-decode-worker.js', import.meta.url);

/** The entry new workers start from now. */
function currentEntry(): string {
  return (zstdWorkerEntry() ?? ENGINE_ENTRY).href;
}

class DecodeWorker {
  readonly entry = currentEntry();
  readonly worker = new Worker(new URL(this.entry));
  /** Started from another entry than the current one: ends once its batches are done. */
  retired = false;
  readonly pending = new Map<number, Pending>();
  /** Set once the worker has loaded and can take batches at once. */
  ready = false;
  /** Settles once the worker has loaded, or has died. */
  readonly loaded: Promise<void>;
  private settleLoaded!: () => void;

  constructor() {
    this.loaded = new Promise((resolve) => (this.settleLoaded = resolve));
    this.worker.unref();
    this.worker.on('message', (reply: BatchReply) => {
      if ('ready' in reply) {
        this.ready = true;
        return this.settleLoaded();
      }
      const p = this.pending.get(reply.id);
      if (!p) return;
      this.pending.delete(reply.id);
      if (this.pending.size === 0) this.worker.unref();
      if (this.pending.size === 0 && this.retired) void this.worker.terminate();
      p.resolve('failure' in reply ? { ok: false, index: reply.index, failure: reply.failure } : { ok: true });
    });
    this.worker.on('error', (err) => this.fail(`qcow2 decode worker failed: ${String(err?.message ?? err).replace(/\s+/g, ' ')}`));
    this.worker.on('exit', (code) => this.fail(`qcow2 decode worker exited (code ${code})`));
  }

  send(req: BatchRequest): Promise<BatchResult> {
    return new Promise((resolve, reject) => {
      if (this.pending.size === 0) this.worker.ref();
      this.pending.set(req.id, { resolve, reject });
      this.worker.postMessage(req);
    });
  }

  private fail(message: string): void {
    workers = workers.filter((w) => w !== this);
    this.ready = false;
    this.settleLoaded();
    for (const p of this.pending.values()) p.reject(new FvdError(message, 'EIO'));
    this.pending.clear();
  }
}

let workers: DecodeWorker[] = [];
let nextId = 0;

/**
 * Whether a decode worker has loaded and can take batches now; starts one if none runs. A reader
 * decodes on its own thread while this is false (the worker loads on another core meanwhile).
 */
export function workersReady(): boolean {
  retireOtherEntries();
  if (workers.length === 0) workers.push(new DecodeWorker());
  return workers.some((w) => w.ready);
}

/**
 * Takes workers started from another entry than the current one out of the pool (a zstd decoder
 * registered or removed after they started: their zstd differs); each ends once idle.
 */
function retireOtherEntries(): void {
  const entry = currentEntry();
  if (workers.every((w) => w.entry === entry)) return;
  for (const w of workers.filter((w) => w.entry !== entry)) {
    w.retired = true;
    if (w.pending.size === 0) void w.worker.terminate();
  }
  workers = workers.filter((w) => w.entry === entry);
}

/** Starts a decode worker if none runs and resolves once one has loaded (tests; bulk readers). */
export async function startDecodeWorkers(): Promise<void> {
  if (!workersReady()) await Promise.race(workers.map((w) => w.loaded));
}

/**
 * Decodes the clusters whose streams are at `starts` (`lengths` bytes) of `src` into `out`, one
 * after another, on the least busy worker (starting one while fewer than poolSize() run). Both
 * buffers must stay untouched until the promise settles.
 */
export function decodeBatch(type: CompressionType, clusterSize: number, src: SharedArrayBuffer, starts: number[], lengths: number[], out: SharedArrayBuffer): Promise<BatchResult> {
  let w: DecodeWorker | null = null;
  for (const c of workers) if (!w || c.pending.size < w.pending.size) w = c;
  if (!w || (w.pending.size > 0 && workers.length < poolSize())) {
    w = new DecodeWorker();
    workers.push(w);
  }
  const exitForTest = exitNext;
  exitNext = 0;
  return w.send({ id: nextId++, type, clusterSize, src, starts, lengths, out, exitForTest });
}

let exitNext = 0;
/** Tests: the worker that takes the next batch exits with `code`, as a crashing worker would. */
export function exitNextWorkerForTest(code: number): void {
  exitNext = code;
}

/**
 * Shared buffers, reused: fresh memory costs a page fault per 4 KiB when first written, which
 * for a template's worth of clusters was more than the copies themselves. Buffers given back are
 * kept by size, up to SPARE_MAX_BYTES in all (convert keeps two reads in flight: about 7 MiB).
 */
const spare = new Map<number, SharedArrayBuffer[]>();
const SPARE_MAX_BYTES = 16 * 1024 * 1024;
let spareBytes = 0;

export function takeShared(size: number): SharedArrayBuffer {
  const b = spare.get(size)?.pop();
  if (!b) return new SharedArrayBuffer(size);
  spareBytes -= size;
  return b;
}

export function giveShared(b: SharedArrayBuffer): void {
  if (spareBytes + b.byteLength > SPARE_MAX_BYTES) return;
  let list = spare.get(b.byteLength);
  if (!list) spare.set(b.byteLength, (list = []));
  list.push(b);
  spareBytes += b.byteLength;
}

/** Ends every worker (tests; a process that exits need not call it). */
export async function stopDecodeWorkers(): Promise<void> {
  const all = workers;
  workers = [];
  await Promise.all(all.map((w) => w.worker.terminate()));
}

/** Workers running now (tests). */
export function decodeWorkerCount(): number {
  return workers.length;
}
