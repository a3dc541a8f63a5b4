/**
 * The queue threads of one served device, one worker thread per ublk hardware queue, as the main
 * thread sees them: started early (each waits at its gate for /dev/ublkcN), let go once the
 * device's char device is open, their messages routed to the engine side
 * (daemon/engine-requests.ts), and ended. What runs inside a worker is daemon/queue-worker.ts and
 * daemon/fvd-queue.ts; what the two sides exchange is daemon/queue-protocol.ts; the device's life
 * cycle around them (when to start, open, stop) is daemon/server.ts.
 */
import fs from 'node:fs';
import type { Worker } from 'node:worker_threads';
import type { FvdImage } from '../fvd/image.js';
import { FvdError } from '../fvd/errors.js';
import { libc, EFD_CLOEXEC } from '../ffi/libc.js';
import { syscalls } from '../ffi/syscalls.js';
import { errnoName } from '../ffi/uring.js';
import type { TraceShared } from '../fvd/trace.js';
import { hasZeroCopy } from './ublk/features.js';
import { UBLK_F_BATCH_IO } from './ublk/abi.js';
import { CompletionRing, STORED_RING_ENTRIES, StoredRing } from './shared-state.js';
import { EFD_WAKE, queueCowMode, type EngineQueue, type EngineRequests } from './engine-requests.js';
import { QueueActivityReader, newActivityBuffer } from './queue-activity.js';
import { GATE_ABANDON, GATE_OPEN, GATE_WAIT, type QueueWorkerData, type WorkerMessage } from './queue-protocol.js';
import { startQueueWorker, type QueueWorkerPool } from './queue-worker-pool.js';

/**
 * Test hook (tests/vm/e2e/20-queue-cow.sh): FVD_TEST_HOLD_STORED=1 leaves the writes the queue
 * threads stored and answered in their rings until a FLUSH, a FUA write or the queue's exit takes
 * them in — so a SIGKILL finds their records only in the queue logs. Read once.
 */
const HOLD_STORED = process.env.FVD_TEST_HOLD_STORED === '1';

/** One hardware queue: its worker thread, plus what the engine side uses (EngineQueue). */
export interface Queue extends EngineQueue {
  worker: Worker;
  /** The worker's start gate (QueueWorkerData.gate). */
  gate: Int32Array;
  control: Int32Array;
  /** The queue thread (its kernel task id) and whether it runs as an I/O flusher: 1, or -errno. */
  tid: number;
  ioFlusher: number;
  exited: Promise<string | undefined>;
}

/** The device as the queue threads serve it (after ADD_DEV, or of a recovered device). */
export interface QueueGeometry {
  devId: number;
  queues: number;
  depth: number;
  maxIo: number;
  /** The device's UBLK_F_* flags: zero copy and batched commands follow them. */
  deviceFlags: bigint;
}

export class QueueThreads {
  readonly queues: Queue[] = [];
  private readonly activityBuffers: SharedArrayBuffer[] = [];
  /** Every queue's tags fetched (after open), or the first queue's failure. */
  private readonly fetched: Promise<void>[] = [];

  constructor(
    private readonly image: FvdImage,
    private readonly imagePath: string,
    private readonly engine: EngineRequests,
    private readonly log: (line: string) => void,
    /** A queue ended ('exit' message): the server decides whether that is fatal. */
    private readonly onExit: (qid: number, error: string | undefined) => void,
    /** Workers started ahead: one is adopted per queue, the ones left over are stopped. */
    private readonly pool?: QueueWorkerPool,
  ) {}

  /**
   * Starts one worker per queue, each waiting at its gate for /dev/ublkcN (open): a recovery
   * spawns them before START_USER_RECOVERY, so their start-up overlaps it.
   */
  spawn(g: QueueGeometry, trace: TraceShared | null): void {
    const c = libc();
    if (!c) throw new FvdError('koffi (libc) is required to serve a device', 'EIO');
    const view = this.image.sharedView();
    // A plain local raw base: the queue threads read it themselves and hint copy-on-read.
    const basePath = this.image.localRawBasePath();
    const hints = this.engine.prepareQueues(view, g.queues, g.maxIo, basePath !== null);
    // The same base: the queue threads copy-on-write its blocks themselves (daemon/queue-cow.ts).
    const claims = this.engine.shareClaims();
    // Stored writes answered on the queue threads; with a pending log, each queue thread's own
    // log for them (FORMAT.md §14.4).
    const { answers: cowAnswers, logs: queueLogs } = this.engine.answerStored(g.queues);
    for (let qid = 0; qid < g.queues; qid++) {
      const eventfd = c.eventfd(0, EFD_CLOEXEC);
      if (eventfd < 0) throw new FvdError(`eventfd failed (errno ${c.errno()})`, 'EIO');
      const completions = CompletionRing.create(g.depth + 1);
      const stored = claims !== null ? StoredRing.create(STORED_RING_ENTRIES) : null;
      const control = new SharedArrayBuffer(8); // [0] quit, [1] quiesced (queue-loop.ts)
      const data: QueueWorkerData = {
        devId: g.devId,
        qid,
        depth: g.depth,
        maxIo: g.maxIo,
        imagePath: this.imagePath,
        view,
        completions,
        control,
        eventfd,
        cdevFd: -1,
        gate: new SharedArrayBuffer(8),
        activity: newActivityBuffer(),
        // Encrypted image: the master key for the worker's own fast-path cipher, handed over in
        // shared memory that the worker zeroes once its cipher holds the key (and this thread
        // again when the queue is set up or fails).
        key: sharedKeyForWorker(this.image.masterKeyCopy()),
        basePath,
        hints,
        trace,
        zeroCopy: hasZeroCopy(g.deviceFlags),
        batchIo: (g.deviceFlags & UBLK_F_BATCH_IO) !== 0n,
        claims,
        cowPartial: queueCowMode() === 'all',
        stored,
        cowAnswers,
        queueLogFd: queueLogs?.fds[qid] ?? -1,
        queueLogDrained: queueLogs?.drained ?? null,
      };
      const worker = this.pool?.adopt(data) ?? startQueueWorker(data);
      const wipeKey = () => data.key && new Uint8Array(data.key).fill(0);
      let resolveFetched!: () => void;
      let rejectFetched!: (e: Error) => void;
      this.fetched.push(new Promise<void>((res, rej) => ((resolveFetched = res), (rejectFetched = rej))));
      // A queue that fails to set up reports why; it becomes the one-line error of `serve`.
      const q: Queue = {
        worker,
        gate: new Int32Array(data.gate),
        completions: new CompletionRing(completions),
        stored: stored && new StoredRing(stored),
        qid,
        control: new Int32Array(control),
        eventfd,
        buffer: null,
        tid: 0,
        ioFlusher: 0,
        fast: 0,
        hinted: 0,
        carried: 0,
        noSlot: 0,
        slow: 0,
        cow: 0,
        overwritten: 0,
        corBusy: 0,
        exited: new Promise((resolve) => {
          worker.on('message', (m: WorkerMessage) => {
            if (m.type === 'fetched' || m.type === 'exit') wipeKey();
            if (m.type === 'exit') {
              if (m.error) rejectFetched(new FvdError(`queue ${qid}: ${m.error}`, 'EIO'));
              resolve(m.error);
            }
          });
          worker.on('error', (e) => {
            wipeKey();
            rejectFetched(e);
            resolve(e.message);
          });
          worker.on('exit', () => resolve(undefined));
        }),
      };
      worker.on('message', (m: WorkerMessage) => this.onMessage(q, m, resolveFetched));
      this.queues.push(q);
      this.engine.watchStored(q);
      this.activityBuffers.push(data.activity);
    }
    void this.pool?.close();
  }

  /** Hands the open /dev/ublkcN to the waiting workers and waits until every tag is fetched. */
  async open(cdevFd: number): Promise<void> {
    for (const q of this.queues) releaseGate(q.gate, GATE_OPEN, cdevFd);
    await Promise.all(this.fetched);
    // Logged once per serve: every queue thread tries, and they fail alike.
    const refused = this.queues.find((q) => q.ioFlusher !== 1);
    if (refused) {
      const why = refused.ioFlusher < 0 ? errnoName(refused.ioFlusher) : 'flag not set afterwards';
      this.log(
        `queue threads are not I/O flushers (PR_SET_IO_FLUSHER: ${why}; it needs CAP_SYS_RESOURCE): ` +
          `under memory pressure, reclaim may wait for this device's own writeback`,
      );
    }
  }

  private onMessage(q: Queue, m: WorkerMessage, fetched: () => void): void {
    switch (m.type) {
      case 'fetched': {
        // Same address space: the engine reads and writes the worker's pinned request buffers.
        q.buffer = Buffer.from(syscalls()!.koffi.view(BigInt(m.bufAddress), m.bufLength));
        q.tid = m.tid;
        q.ioFlusher = m.ioFlusher;
        fetched();
        break;
      }
      case 'slow':
        void this.engine.serveSlow(q, m);
        break;
      case 'stored':
        if (!HOLD_STORED) this.engine.serveStored(q);
        break;
      case 'log': // a worker logs only what went wrong, one message per failed request
        this.engine.queueFailure(m.qid, m.message);
        break;
      case 'info':
        this.log(`queue ${m.qid}: ${m.message}`);
        break;
      case 'hint':
        this.engine.drainHints();
        break;
      case 'stats':
        this.engine.queueStats(q, m);
        // Writes it answered itself wake nobody below a threshold (StoredRing.pushAnswered): their
        // records are taken in at least once a second, as its figures come.
        if (!HOLD_STORED) this.engine.serveStored(q);
        break;
      case 'exit':
        // Anything it stored and pushed is adopted (its 'stored' message came first; this only
        // makes sure no claim outlives the queue). No wake: the queue is gone.
        this.engine.serveStored(q, false);
        if (m.error) this.log(`queue ${m.qid} stopped: ${m.error}`);
        this.onExit(m.qid, m.error);
        break;
    }
  }

  /** The queue threads' kernel task ids (0 before they fetched). */
  threadIds(): number[] {
    return this.queues.map((q) => q.tid);
  }

  /**
   * A reader of the queues' request counts and latencies (cumulative from its creation), the
   * prefetcher's measure of foreground activity.
   */
  activityReader(): QueueActivityReader {
    return new QueueActivityReader(this.activityBuffers);
  }

  /**
   * A hand-off's end of the queues (the device quiesced): each ends once it has committed the
   * requests it holds. The queues' exits, or 'timeout' for one still running after timeoutMs.
   */
  endQuiesced(timeoutMs: number): Promise<(string | undefined)[]> {
    for (const q of this.queues) {
      Atomics.store(q.control, 1, 1);
      fs.writeSync(q.eventfd, EFD_WAKE);
    }
    return this.exits(timeoutMs);
  }

  /**
   * The teardown's end of the queues, after STOP_DEV: a worker still waiting for /dev/ublkcN is
   * told it will not come; one of a device that never started (no STOP_DEV aborts its fetches)
   * gets the quit flag. Workers of a started device leave once every tag is aborted. Returns the
   * queues that did not stop within timeoutMs.
   */
  async end(deviceStarted: boolean, timeoutMs: number): Promise<number[]> {
    for (const q of this.queues) {
      releaseGate(q.gate, GATE_ABANDON, -1);
      if (!deviceStarted) {
        Atomics.store(q.control, 0, 1);
        fs.writeSync(q.eventfd, EFD_WAKE);
      }
    }
    const exits = await this.exits(timeoutMs);
    return exits.flatMap((e, i) => (e === 'timeout' ? [i] : []));
  }

  /** After end: the worker threads terminated and their eventfds closed. */
  async terminate(): Promise<void> {
    for (const q of this.queues) {
      await q.worker.terminate();
      fs.closeSync(q.eventfd);
    }
  }

  private exits(timeoutMs: number): Promise<(string | undefined)[]> {
    return Promise.all(this.queues.map((q) => withTimeout(q.exited, timeoutMs)));
  }
}

/** Moves a worker's start gate out of WAIT (once: a gate already released stays as it is). */
function releaseGate(gate: Int32Array, state: number, fd: number): void {
  if (Atomics.load(gate, 0) !== GATE_WAIT) return;
  gate[1] = fd;
  Atomics.store(gate, 0, state);
  Atomics.notify(gate, 0);
}

/** The key moved into a SharedArrayBuffer for a worker; the copy it came in is wiped. */
export function sharedKeyForWorker(key: Uint8Array | null): SharedArrayBuffer | null {
  if (!key) return null;
  const shared = new SharedArrayBuffer(key.length);
  new Uint8Array(shared).set(key);
  key.fill(0);
  return shared;
}

/** p's value, or 'timeout' once ms have passed. */
export async function withTimeout<T>(p: Promise<T>, ms: number): Promise<T | 'timeout'> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), ms)));
  try {
    return await Promise.race([p, t]);
  } finally {
    clearTimeout(timer);
  }
}
