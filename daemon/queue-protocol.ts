/**
 * What the main thread and a queue worker thread (daemon/queue-worker.ts) agree on: the worker's
 * start data (QueueWorkerData, shared memory included), its start gate, and the messages it posts.
 * The main thread's side is daemon/queue-threads.ts (spawn, gate, message routing) and
 * daemon/engine-requests.ts (the engine's answers); the worker's is daemon/fvd-queue.ts.
 */
import type { CorHintShared } from './cor-hints.js';
import type { EngineView } from './shared-state.js';
import type { TraceShared } from '../fvd/trace.js';

/** A worker's start gate (QueueWorkerData.gate): the main thread moves it out of WAIT once. */
export const GATE_WAIT = 0;
export const GATE_OPEN = 1;
export const GATE_ABANDON = 2;

export interface QueueWorkerData {
  devId: number;
  qid: number;
  depth: number;
  maxIo: number;
  imagePath: string;
  view: EngineView;
  completions: SharedArrayBuffer;
  /** [0] = 1 asks the worker to quit (before START_DEV, or on a failed start). */
  control: SharedArrayBuffer;
  eventfd: number;
  /**
   * /dev/ublkcN, opened once by the main thread (the driver allows a single open): -1 until the
   * main thread opens it and releases `gate` (daemon/queue-worker.ts waits there).
   */
  cdevFd: number;
  /** Int32 [0] GATE_WAIT / GATE_OPEN / GATE_ABANDON, [1] the /dev/ublkcN descriptor once open. */
  gate: SharedArrayBuffer;
  /** Request count and latency totals for the prefetcher (daemon/queue-activity.ts). */
  activity: SharedArrayBuffer;
  /**
   * Encrypted image: its 64-byte master key, for this worker's own cipher, in shared memory (a
   * structured clone would leave a copy in the message buffer, freed without being wiped); this
   * thread zeroes it as soon as its cipher holds the key. Null otherwise. Never logged or sent back.
   */
  key: SharedArrayBuffer | null;
  /**
   * The base, when it is a plain local raw file the worker may read itself (FvdImage.localRawBasePath),
   * or null: base reads go to the engine.
   */
  basePath: string | null;
  /** Copy-on-read hints for blocks read from the base here; null when copy-on-read is off. */
  hints: CorHintShared | null;
  /** The per-request trace's buffers (FVD_TRACE, fvd/trace.ts), or null: not traced. */
  trace: TraceShared | null;
  /** The device has AUTO_BUF_REG and USER_COPY: serve local blocks with zero copy (daemon/fvd-queue.ts). */
  zeroCopy: boolean;
  /** The device has UBLK_F_BATCH_IO: batched fetch and commit commands (daemon/ublk/batch-io.ts). */
  batchIo: boolean;
  /**
   * The image's shared block claims (fvd/block-claims.ts) when this thread may copy-on-write
   * blocks of the local raw base itself (daemon/queue-cow.ts), else null.
   */
  claims: SharedArrayBuffer | null;
  /** With claims: also a partial block's copy-on-write, not only writes of whole blocks (FVD_QUEUE_COW=all). */
  cowPartial: boolean;
  /** With claims: the StoredRing (shared-state.ts) this thread hands its stored writes over by. */
  stored: SharedArrayBuffer | null;
  /**
   * With claims: this thread answers its stored writes itself, the main thread only queues their
   * records (DESIGN.md §2.5; with a pending log, once this thread put each record in its queue
   * log: queueLogFd). False: the main thread answers them (FVD_STORED_ANSWER=main).
   */
  cowAnswers: boolean;
  /**
   * With cowAnswers and a pending log: this queue's log (FORMAT.md §14.4), where each answered
   * write's record goes before the answer, and the main thread's counts of the records it took
   * into the image's log (index qid); -1 / null without.
   */
  queueLogFd: number;
  queueLogDrained: SharedArrayBuffer | null;
}

/** Messages to the main thread. */
export type WorkerMessage =
  /** ioFlusher: PR_GET_IO_FLUSHER of this thread after setting it (1), or -errno (ffi/syscalls.ts). */
  | { type: 'fetched'; qid: number; bufAddress: number; bufLength: number; tid: number; ioFlusher: number }
  /**
   * baseBlock: a write whose block's base bytes this thread read into the tail of the tag's buffer
   * (FvdQueue.preReadBlock): the last blockSize bytes of the tag's maxIo-byte slice.
   */
  | { type: 'slow'; qid: number; tag: number; op: number; flags: number; offset: number; length: number; baseBlock: boolean }
  /**
   * Writes stored here as whole base blocks wait in the queue's StoredRing (tag, blocks, length),
   * whose shared claims this thread holds: the engine marks them local, releases the claims, and
   * completes the requests (daemon/queue-cow.ts, EngineRequests.serveStored) — or, answered here
   * already (cowAnswers), only queues their records.
   */
  | { type: 'stored'; qid: number }
  | { type: 'log'; qid: number; message: string }
  | { type: 'info'; qid: number; message: string }
  /**
   * hinted: copy-on-read hints pushed (claimed blocks), carried: of them with their block's data,
   * noSlot: of the others, those that found no free data slot.
   */
  | { type: 'stats'; qid: number; fast: number; slow: number; hinted: number; carried: number; noSlot: number; cow: number; overwritten: number; corBusy: number }
  /** Copy-on-read hints are waiting in the shared rings (daemon/cor-hints.ts). */
  | { type: 'hint'; qid: number }
  | { type: 'exit'; qid: number; error?: string };
