/**
 * The engine's side of the queues (docs/DESIGN.md §2): on the main thread, the requests the queue
 * threads hand over (the slow path), the copy-on-read hints they push, and the figures they
 * report. daemon/server.ts owns the device's life cycle and the workers; it routes their messages
 * here. Only a queue's request buffers and its way back (completion ring, eventfd) are shared, so
 * this file never sees the device, the control ring or the recovery state.
 */
import fs from 'node:fs';
import type { FvdImage } from '../fvd/image.js';
import type { SharedView } from '../fvd/mapping.js';
import { allocPinned, type PinnedBuffer } from '../ffi/uring.js';
import { STAGE_ENGINE_DONE, STAGE_ENGINE_START, type TraceRecorder } from '../fvd/trace.js';
import { UBLK_IO_F_FUA, UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES } from './ublk/abi.js';
import { CorHintConsumer, NO_SLOT, corSlotPoolBytes, createCorHints, type CorHintShared } from './cor-hints.js';
import { STORED_ANSWERED, type CompletionRing, type StoredRing } from './shared-state.js';
import type { BlockClaims } from '../fvd/block-claims.js';
import { BurstLog, requestErrno } from './request-errors.js';
import type { WorkerMessage } from './queue-protocol.js';

const OP_NAMES: Record<number, string> = {
  [UBLK_IO_OP_READ]: 'read',
  [UBLK_IO_OP_WRITE]: 'write',
  [UBLK_IO_OP_FLUSH]: 'flush',
  [UBLK_IO_OP_DISCARD]: 'discard',
  [UBLK_IO_OP_WRITE_ZEROES]: 'write-zeroes',
};

/** Written to a queue's eventfd: wakes its thread to collect completions (or see a flag). */
export const EFD_WAKE = Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]);

export interface ServerStats {
  reads: number;
  writes: number;
  flushes: number;
  discards: number;
  fastPath: number;
  slowPath: number;
  errors: number;
}

/** What the engine side uses of a queue: its request buffers, its way back, its figures. */
export interface EngineQueue {
  /** The worker's pinned request buffers (depth × maxIo bytes), mapped once it fetched. */
  buffer: Buffer | null;
  completions: CompletionRing;
  /** Writes the queue thread stored itself (daemon/queue-cow.ts), to adopt: serveStored. */
  stored: StoredRing | null;
  qid: number;
  eventfd: number;
  fast: number;
  /**
   * Copy-on-read hints pushed, of them carrying their block's data, and of the others those that
   * found no free data slot (the worker's last figures).
   */
  hinted: number;
  carried: number;
  noSlot: number;
  slow: number;
  /** Copy-on-writes the queue thread stored itself (daemon/queue-cow.ts). */
  cow: number;
  /** Writes the queue thread wrote in place into blocks local but not journaled (queue-cow.ts). */
  overwritten: number;
  /** Base reads not hinted for copy-on-read because the queue was busy. */
  corBusy: number;
}

/**
 * What the queue threads store themselves (FVD_QUEUE_COW): 'whole' (default) writes of whole
 * blocks only, 'all' also a partial block's copy-on-write (base bytes read and the block written
 * on the queue thread), 'off' nothing. Partial blocks are not the default: with one guest job all
 * its requests reach one queue, whose thread then does every copy-on-write's 64 KiB read and write
 * itself, where the engine's path spreads the writes over the thread pool — measured slower at
 * 4K random writes on 2 CPUs (README, fvd-cow against fvd-cow-engine).
 */
export function queueCowMode(): 'off' | 'whole' | 'all' {
  const v = process.env.FVD_QUEUE_COW;
  return v === '0' || v === 'off' ? 'off' : v === 'all' ? 'all' : 'whole';
}

/**
 * Test hook (tests/vm/e2e/21-reissue.sh): FVD_TEST_HOLD_WRITE=OFFSET:MS holds every engine write
 * that starts at byte OFFSET for MS ms before it runs, and logs its arrival and its end — so a
 * test can hold a write across a hand-off and see which server executed it. Read once.
 */
const HOLD_WRITE = parseHoldWrite(process.env.FVD_TEST_HOLD_WRITE);

function parseHoldWrite(v: string | undefined): { offset: number; ms: number } | null {
  const m = v ? /^(\d+):(\d+)$/.exec(v) : null;
  return m ? { offset: Number(m[1]), ms: Number(m[2]) } : null;
}

export type SlowRequest = Extract<WorkerMessage, { type: 'slow' }>;
export type QueueStats = Extract<WorkerMessage, { type: 'stats' }>;

export class EngineRequests {
  /** Requests the engine served (the fast path's are counted by the queues), and failures. */
  private readonly stats: ServerStats = { reads: 0, writes: 0, flushes: 0, discards: 0, fastPath: 0, slowPath: 0, errors: 0 };
  /** Failed requests, logged once per burst. */
  private readonly failures: BurstLog;
  /** The per-request trace's recorder while tracing (FVD_TRACE; the server owns the file). */
  trace: TraceRecorder | null = null;
  /** Copy-on-read hints from the queue threads (daemon/cor-hints.ts), or null. */
  private hints: CorHintConsumer | null = null;
  /** The data-slot pool of the copy-on-read hints, or null (prepareQueues, releaseCopyOnRead). */
  private corPool: PinnedBuffer | null = null;
  /** Bytes of one tag's slice of a queue's request buffers: the workers' maxIo (prepareQueues). */
  private maxIo = 0;
  /** The image's shared block claims while queue threads copy-on-write (shareClaims), or null. */
  private claims: BlockClaims | null = null;

  constructor(
    private readonly image: FvdImage,
    private readonly log: (line: string) => void,
  ) {
    this.failures = new BurstLog(log);
  }

  /**
   * Called as the workers are spawned, with the geometry they get: maxIo is taken here, not at
   * construction, because a recovery lowers it to the waiting device's before it spawns them.
   * Returns the hints' shared state for the queue threads, or null when they hint nothing:
   * copy-on-read off, a read-only image, or no plain local raw base to read (`localBase` false).
   */
  prepareQueues(view: SharedView, queues: number, maxIo: number, localBase: boolean): CorHintShared | null {
    this.maxIo = maxIo;
    const image = this.image;
    const corOn = localBase && image.copyOnRead && !image.readOnly;
    // Hints carry their block's data in slots of this pool (daemon/cor-hints.ts): mmap'ed, never
    // moved, pages touched only when a slot is first used. Freed by releaseCopyOnRead, once the
    // workers are gone and the image closed (every carried copy finished).
    const poolBytes = corOn ? corSlotPoolBytes(image.maxCopyOnReadBytes, view.blockSize, queues) : 0;
    if (poolBytes > 0 && !this.corPool) this.corPool = allocPinned(poolBytes, { populate: false });
    const pool = poolBytes > 0 ? this.corPool : null;
    const hints = corOn
      ? createCorHints(image.maxCopyOnReadBytes, view.blockSize, view.baseBlocks, queues, pool && { address: pool.address, length: pool.length })
      : null;
    this.hints = hints ? new CorHintConsumer(hints, pool?.bytes ?? null) : null;
    return hints;
  }

  /**
   * Before the workers are spawned: the block claims that let them store writes into blocks of
   * the local raw base themselves (daemon/queue-cow.ts), or null where they may not (the image
   * decides; FVD_QUEUE_COW=0 turns it off, for side-by-side measurements).
   */
  shareClaims(): SharedArrayBuffer | null {
    if (!this.claims) this.claims = queueCowMode() === 'off' ? null : this.image.shareBlockClaims();
    return this.claims?.shared ?? null;
  }

  /** The workers are gone: no claim is held by a queue any more, locks go back to in-process only. */
  unshareClaims(): void {
    if (!this.claims) return;
    this.claims = null;
    this.image.unshareBlockClaims();
    this.storedQueues.length = 0;
  }

  /**
   * As the workers are spawned (after shareClaims): whether the queue threads answer the writes
   * they store themselves (DESIGN.md §2.5) and, when they do and the image keeps a pending log,
   * their queue logs (FORMAT.md §14.4: one descriptor per queue) with the shared counts by which
   * this thread tells each queue how many of its records reached the image's log (serveStored).
   * FVD_STORED_ANSWER=main: the main thread answers them (for side-by-side measurements).
   */
  answerStored(queues: number): { answers: boolean; logs: { fds: number[]; drained: SharedArrayBuffer } | null } {
    this.storedAnswered = this.claims !== null && process.env.FVD_STORED_ANSWER !== 'main';
    const fds = this.storedAnswered ? this.image.createQueueLogs(queues) : null;
    if (fds === null) return { answers: this.storedAnswered, logs: null };
    const drained = new SharedArrayBuffer(4 * queues);
    this.logDrained = new Int32Array(drained);
    return { answers: true, logs: { fds, drained } };
  }

  /** queueLogs' counts (null: no queue logs); a failed log write stops them for good. */
  private logDrained: Int32Array | null = null;

  /** What answerStored said (for the closing line). */
  private storedAnswered = false;

  /**
   * Before a commit a guest waits for (FLUSH, FUA write): the records of every write a queue
   * thread answered itself are queued only when its ring entry is drained, and every entry pushed
   * before the guest sent this request is in a ring now (pushed before the answer) — so draining
   * all of them first puts their records in that commit.
   */
  private takeAnsweredWrites(): void {
    for (const q of this.storedQueues) this.serveStored(q);
  }

  /** A queue with a StoredRing: a FLUSH drains it first (serveSlow). */
  watchStored(q: EngineQueue): void {
    if (q.stored !== null) this.storedQueues.push(q);
  }

  /** Queues whose stored writes a FLUSH takes in before it commits (watchStored). */
  private readonly storedQueues: EngineQueue[] = [];

  /** The closing line on copy-on-writes the queue threads stored, or null when there were none. */
  cowSummary(queues: readonly EngineQueue[]): string | null {
    const n = queues.reduce((sum, q) => sum + q.cow, 0);
    const soft = queues.reduce((sum, q) => sum + q.overwritten, 0);
    const who = this.storedAnswered ? 'answered there' : 'answered by the main thread';
    if (n === 0 && soft === 0) return null;
    return `copy-on-write on the queue threads: ${n} blocks, ${soft} writes in place into blocks local already (${who})`;
  }

  /** A queue thread pushed copy-on-read hints: each hinted block is copied in background. */
  drainHints(): void {
    this.hints?.drain(this.copyHinted);
  }

  /**
   * The workers are gone and the image closed (close waits for every carried copy; idle again in
   * case it was closed earlier): nothing uses the slots now, so the pool goes.
   */
  async releaseCopyOnRead(): Promise<void> {
    this.hints = null;
    await this.image.idle();
    this.corPool?.free();
    this.corPool = null;
  }

  /**
   * A hinted block, or run of blocks: copied in background (never waited for by a request), then
   * released. With a data slot the queue thread read the block already: the copy only writes it,
   * and the slot is freed once the write finished or was skipped (copyHint resolves only then).
   */
  private readonly copyHinted = (b: number, slot: number, count: number): void => {
    const hints = this.hints!;
    if (slot === NO_SLOT) {
      void this.image.copyHintRun(b, count).then(() => hints.releaseRun(b, count));
      return;
    }
    void this.image.copyHint(b, hints.slotData(slot)).then(() => {
      hints.release(b);
      hints.freeSlot(slot);
    });
  };

  /** The base block a queue thread read for tag's copy-on-write: the tail of the tag's buffer (FvdQueue.preReadBlock). */
  private baseBlockOf(q: EngineQueue, tag: number): Uint8Array {
    const end = (tag + 1) * this.maxIo;
    return q.buffer!.subarray(end - this.image.blockSize, end);
  }

  /** The engine's side of a request a worker handed over; the result goes back by eventfd. */
  async serveSlow(q: EngineQueue, m: SlowRequest): Promise<void> {
    const { tag, op, offset, length } = m;
    const slot = this.trace === null ? -1 : this.trace.slotOf(m.qid, tag);
    let result: number;
    if (slot >= 0) this.trace!.stamp(slot, STAGE_ENGINE_START);
    try {
      const buf = q.buffer!.subarray(tag * this.maxIo, tag * this.maxIo + length);
      switch (op) {
        case UBLK_IO_OP_READ:
          this.stats.reads++;
          await this.image.read(buf, offset, slot);
          break;
        case UBLK_IO_OP_WRITE: {
          this.stats.writes++;
          const fua = ((m.flags << 8) & UBLK_IO_F_FUA) !== 0;
          // A FUA write commits the journal: a block it writes may have been stored and answered
          // on a queue thread, its record still in a ring.
          if (fua) this.takeAnsweredWrites();
          const held = HOLD_WRITE !== null && offset === HOLD_WRITE.offset;
          if (held) await this.holdWrite(offset, length, HOLD_WRITE.ms);
          await this.image.write(buf, offset, fua, slot, m.baseBlock ? this.baseBlockOf(q, tag) : null);
          if (held) this.log(`test hook: write at ${offset}+${length} done`);
          break;
        }
        case UBLK_IO_OP_FLUSH:
          this.stats.flushes++;
          this.takeAnsweredWrites();
          await this.image.flush();
          break;
        case UBLK_IO_OP_DISCARD:
        case UBLK_IO_OP_WRITE_ZEROES:
          this.stats.discards++;
          await this.image.writeZeroes(offset, length);
          break;
      }
      result = op === UBLK_IO_OP_FLUSH ? 0 : length;
    } catch (err) {
      this.stats.errors++;
      // A full device (an image on an LV without room for another chunk) is ENOSPC for the guest.
      result = requestErrno(err);
      this.failures.failure(`${OP_NAMES[op] ?? `op ${op}`} at ${offset}+${length}: ${(err as Error).message}`);
    }
    if (slot >= 0) this.trace!.stamp(slot, STAGE_ENGINE_DONE);
    q.completions.push(tag, result);
    fs.writeSync(q.eventfd, EFD_WAKE);
  }

  private async holdWrite(offset: number, length: number, ms: number): Promise<void> {
    this.log(`test hook: holding the write at ${offset}+${length} for ${ms} ms`);
    await new Promise((resolve) => setTimeout(resolve, ms));
  }

  /**
   * A queue thread stored writes' whole block(s) itself, holding their claims
   * (daemon/queue-cow.ts), and pushed them to its StoredRing: each block becomes local (bits set,
   * record queued), the records of the whole batch go to the pending log in one write, then
   * their journaled bits are set and the claims go — so whoever takes a block next sees it local
   * and recorded — then the guests are answered, with one wake of the queue (`wake` false: the
   * queue has exited, nobody to wake). Synchronous: no file I/O here but that one write.
   */
  serveStored(q: EngineQueue, wake = true): void {
    const ring = q.stored;
    if (ring === null) return;
    this.storedQueue = q;
    this.storedCount = 0;
    this.answeredCount = 0;
    this.image.holdPendingLog();
    ring.drain(this.adoptStored);
    let logError: unknown = null;
    try {
      this.image.releasePendingLog();
    } catch (err) {
      logError = err;
      this.failures.failure(`pending log: ${(err as Error).message}`);
    }
    const drained = this.logDrained;
    if (drained !== null && this.answeredCount > 0) {
      // The answered writes' records are in the image's log now: the queue may write over them
      // in its own (QueueLogWriter). After a failed write they are not: the counts stop for good
      // and the queue logs keep everything.
      if (logError === null) Atomics.store(drained, q.qid, (Atomics.load(drained, q.qid) + this.answeredCount) | 0);
      else this.logDrained = null;
    }
    const claims = this.claims;
    const { storedTags: tags, storedFirst: first, storedLast: last, storedResults: results } = this;
    const n = this.storedCount;
    for (let i = 0; i < n; i++) {
      if (claims !== null) for (let b = first[i]!; b <= last[i]!; b++) claims.release(b);
      let result = results[i]!;
      if (logError !== null && result >= 0) {
        this.stats.errors++;
        result = requestErrno(logError);
      }
      const slot = this.trace === null ? -1 : this.trace.slotOf(q.qid, tags[i]!);
      if (slot >= 0) this.trace!.stamp(slot, STAGE_ENGINE_DONE);
      q.completions.push(tags[i]!, result);
    }
    this.storedQueue = null;
    if (n > 0 && wake) fs.writeSync(q.eventfd, EFD_WAKE);
  }

  // serveStored's batch (reused: no allocation per request once grown to the queue's depth).
  private storedQueue: EngineQueue | null = null;
  private storedCount = 0;
  /** Entries of the batch the queue thread answered itself (STORED_ANSWERED). */
  private answeredCount = 0;
  private readonly storedTags: number[] = [];
  private readonly storedFirst: number[] = [];
  private readonly storedLast: number[] = [];
  private readonly storedResults: number[] = [];

  /** One entry of serveStored's batch: its blocks become local (bits set, record held). */
  private readonly adoptStored = (tag: number, block: number, lastBlock: number, length: number): void => {
    if (tag === STORED_ANSWERED) return this.journalAnswered(block, lastBlock);
    const q = this.storedQueue!;
    const slot = this.trace === null ? -1 : this.trace.slotOf(q.qid, tag);
    if (slot >= 0) this.trace!.stamp(slot, STAGE_ENGINE_START);
    let result = length;
    this.stats.writes++;
    try {
      this.image.adoptStoredBlocks(block, lastBlock);
    } catch (err) {
      this.stats.errors++;
      result = requestErrno(err);
      this.failures.failure(`write into blocks ${block}-${lastBlock}: ${(err as Error).message}`);
    }
    const i = this.storedCount++;
    this.storedTags[i] = tag;
    this.storedFirst[i] = block;
    this.storedLast[i] = lastBlock;
    this.storedResults[i] = result;
  };

  /**
   * A write the queue thread answered itself (bits set, claims released): its record is queued.
   * It can only fail on a closed or read-only image (the write was acknowledged: logged).
   */
  private journalAnswered(block: number, lastBlock: number): void {
    this.stats.writes++;
    this.answeredCount++;
    try {
      this.image.journalAnsweredBlocks(block, lastBlock);
    } catch (err) {
      this.stats.errors++;
      this.failures.failure(`record of blocks ${block}-${lastBlock} written on a queue thread: ${(err as Error).message}`);
    }
  }

  /** A request a queue thread failed itself (its 'log' message: one per failed request). */
  queueFailure(qid: number, message: string): void {
    this.failures.failure(`queue ${qid}: ${message}`);
    this.stats.errors++;
  }

  /** The requests failed so far go to the log now (before the closing lines of a stop). */
  flushFailures(): void {
    this.failures.flush();
  }

  /** A queue's figures, as its thread last reported them. */
  queueStats(q: EngineQueue, m: QueueStats): void {
    q.fast = m.fast;
    q.slow = m.slow;
    q.hinted = m.hinted;
    q.carried = m.carried;
    q.noSlot = m.noSlot;
    q.cow = m.cow;
    q.overwritten = m.overwritten;
    q.corBusy = m.corBusy;
  }

  /** Figures for STATUS= and `fvd list`: the engine's, plus the queues' path counts. */
  counters(queues: readonly EngineQueue[]): ServerStats {
    let fast = 0;
    let slow = 0;
    for (const q of queues) {
      fast += q.fast;
      slow += q.slow;
    }
    return { ...this.stats, fastPath: fast, slowPath: slow };
  }

  /** The closing line on copy-on-read hints, or null when there were none. */
  hintSummary(queues: readonly EngineQueue[]): string | null {
    const sum = (f: (q: EngineQueue) => number): number => queues.reduce((n, q) => n + f(q), 0);
    const hinted = sum((q) => q.hinted);
    const busy = sum((q) => q.corBusy);
    if (hinted === 0 && busy === 0) return null;
    // The rest: no free slot, or a read that spanned blocks or whose base read would block.
    return `copy-on-read hints: ${hinted}, ${sum((q) => q.carried)} of them carried their block's data, ${sum((q) => q.noSlot)} found no free data slot; ${busy} base reads not hinted while the queue was busy`;
  }
}
