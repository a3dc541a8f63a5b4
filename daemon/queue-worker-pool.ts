/**
 * Queue workers started before the server needs them. A worker thread's start-up — a Node
 * environment and the queue's module graph (koffi comes only once it is adopted: queue-worker.ts
 * says why) — costs seconds under emulation, and so does the main thread's own (the engine, the
 * control plane). `fvd serve` starts its queue workers first,
 * while it still parses arguments, so both load side by side on separate cores; the server then
 * adopts them and posts each its queue (daemon/queue-worker.ts waits for that first message).
 *
 * Until adopted a worker is unref'd: a serve that fails before it has a device exits without
 * waiting for them. A worker that failed while starting is not handed out; the server then
 * starts a new one, which reports the failure the usual way.
 *
 * This module imports only node: built-ins, so loading it costs the caller nothing.
 */
import { Worker } from 'node:worker_threads';

/**
 * workerData of a worker started ahead: its queue comes as the first message. The worker sets
 * `started[0]` to 1 (and notifies) once its modules are loaded and it waits for the queue.
 */
export interface Prespawned {
  prespawned: true;
  started: Int32Array;
}

export function isPrespawned(data: unknown): data is Prespawned {
  return typeof data === 'object' && data !== null && (data as Prespawned).prespawned === true;
}

const QUEUE_WORKER_URL = new URL('./queue-worker.js', import.meta.url);

/**
 * A queue thread's V8 limits: the smallest young generation (1 MiB semi-spaces; Node's default
 * lets them grow to 16 MiB each). The fast path allocates nothing per request, so a queue
 * thread's young generation holds little more than start-up garbage; left to grow, its pages
 * stay resident. Measured in a 7.3 guest (Node 20, 2 queues): 3.5 MiB less VmRSS at start
 * (README, "The young generation"). The main thread keeps Node's default: its slow path
 * allocates per request, and --max-semi-space-size=1 there ran a fresh image's 4 KiB requests at
 * 0.48–0.96 of their rate (README).
 */
const QUEUE_WORKER_LIMITS = { maxYoungGenerationSizeMb: 1 };

/** Starts a queue thread (`url`: the queue worker unless a test's) under QUEUE_WORKER_LIMITS. */
export function startQueueWorker(workerData: unknown, url: URL = QUEUE_WORKER_URL): Worker {
  return new Worker(url, { workerData, resourceLimits: QUEUE_WORKER_LIMITS });
}

interface Spare {
  worker: Worker;
  failed: boolean;
  started: Int32Array;
}

export class QueueWorkerPool {
  private readonly spares: Spare[] = [];

  /** Starts `count` workers of `url` now (default: the queue worker), each waiting for its queue. */
  constructor(count: number, url: URL = QUEUE_WORKER_URL) {
    for (let i = 0; i < count; i++) {
      const started = new Int32Array(new SharedArrayBuffer(4));
      const worker = startQueueWorker({ prespawned: true, started } satisfies Prespawned, url);
      const spare: Spare = { worker, failed: false, started };
      // Without these listeners a worker that fails before it is adopted would throw in this thread.
      worker.on('error', () => (spare.failed = true));
      worker.on('exit', () => (spare.failed = true));
      worker.unref();
      this.spares.push(spare);
    }
  }

  /** How many started workers are still waiting for a queue. */
  get waiting(): number {
    return this.spares.filter((s) => !s.failed).length;
  }

  /** Resolves once every worker still waiting has loaded its modules (or failed). */
  async started(): Promise<void> {
    for (const s of this.spares) {
      while (!s.failed && Atomics.load(s.started, 0) === 0) await new Promise((r) => setTimeout(r, 10));
    }
  }

  /**
   * A started worker, given its queue: `data` is posted as its first message (SharedArrayBuffers
   * in it are shared, not copied). Null when none is left (or every spare failed): start one.
   */
  adopt(data: unknown): Worker | null {
    for (let s = this.spares.shift(); s; s = this.spares.shift()) {
      if (s.failed) continue;
      s.worker.removeAllListeners('error');
      s.worker.removeAllListeners('exit');
      s.worker.ref();
      s.worker.postMessage(data);
      return s.worker;
    }
    return null;
  }

  /** Stops the workers nobody adopted (fewer queues than started, or the serve gave up). */
  async close(): Promise<void> {
    const left = this.spares.splice(0);
    await Promise.all(left.map((s) => s.worker.terminate()));
  }
}
