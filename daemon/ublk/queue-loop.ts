/**
 * One ublk queue, generic: it knows the ublk I/O protocol, not what serves the requests (after
 * ublksrv's queue and target ops, include/ublksrv.h, and libublk-rs's user_data layout).
 *
 * It maps the queue's descriptor array from /dev/ublkcN, owns the io_uring and the pinned request
 * buffers (one of maxIo bytes per tag), submits FETCH_REQ for every tag, and hands each request
 * that arrives to the target with handleIo(tag, descriptor). The target answers with
 * complete(tag, result) — at once or later — which queues COMMIT_AND_FETCH_REQ for that tag.
 * (A device added with UBLK_F_BATCH_IO speaks batched commands instead: PREP once, multishot
 * fetches, one commit per loop turn — daemon/ublk/batch-io.ts; the target sees no difference.)
 * A target may put its own I/O on the same ring (kind TARGET_IO, files registered after the
 * character device), and may ask another thread to serve a request and be woken through an
 * eventfd whose read the loop keeps armed (kind EVENT → handleEvent).
 *
 * Threads: the kernel (6.12) wants every command of a queue from the task that fetched its tags,
 * so the loop runs on one thread, which blocks in io_uring_enter itself. Per request there is no
 * allocation, no promise and no closure: the descriptor is decoded into one reused object, the
 * target ops are methods, and user_data is plain arithmetic on numbers.
 */
import {
  IoUring,
  IORING_SETUP_COOP_TASKRUN,
  IORING_SETUP_DEFER_TASKRUN,
  IORING_SETUP_SINGLE_ISSUER,
  IORING_SETUP_TASKRUN_FLAG,
  IOSQE_FIXED_FILE,
  allocPinned,
  errnoName,
  type PinnedBuffer,
} from '../../ffi/uring.js';
import { isMapFailed, MAP_POPULATE, MAP_SHARED, PROT_READ, type Syscalls } from '../../ffi/syscalls.js';
import {
  IO_DESC_SIZE,
  UBLK_IO_RES_ABORT,
  UBLK_IO_RES_OK,
  UBLK_QUEUE_DESC_STRIDE,
  UBLK_U_IO_COMMIT_AND_FETCH_REQ,
  UBLK_U_IO_FETCH_REQ,
  autoBufRegSqeAddr,
  encodeIoCmd,
  userCopyPosition,
} from './abi.js';
import { GuestLoad } from './guest-load.js';
import { BatchCommands } from './batch-io.js';
import { UD_KIND_BATCH, UD_KIND_EVENT, UD_KIND_TARGET_IO, UD_KIND_TIMER, UD_KIND_UBLK_CMD, encodeUserData, userDataKind, userDataTag, userDataTargetData } from './user-data.js';
import { SpinPolicy } from './spin-policy.js';

// ---- descriptors -------------------------------------------------------------------------

/**
 * struct ublksrv_io_desc of one request, decoded. The loop reuses one instance for every request:
 * valid only during handleIo; copy what must outlive the call.
 */
export class IoDescriptor {
  /** op_flags as the kernel wrote it: the op in bits 0–7, UBLK_IO_F_* above. */
  opFlags = 0;
  /** UBLK_IO_OP_*. */
  op = 0;
  nrSectors = 0;
  startSector = 0;
}

/** Decodes the descriptor of `tag` from the queue's descriptor array into `out` (no allocation). */
export function readIoDescriptor(descs: DataView, tag: number, out: IoDescriptor): IoDescriptor {
  const at = tag * IO_DESC_SIZE;
  const opFlags = descs.getUint32(at, true);
  out.opFlags = opFlags;
  out.op = opFlags & 0xff;
  out.nrSectors = descs.getUint32(at + 4, true);
  // Two 32-bit halves: no BigInt on the request path (sector numbers stay below 2^53).
  out.startSector = descs.getUint32(at + 8, true) + descs.getUint32(at + 12, true) * 0x100000000;
  return out;
}

// ---- target ops ------------------------------------------------------------------------------

/** What serves a queue's requests (ublksrv's struct ublksrv_tgt_type, the per-queue part). */
export interface QueueTarget {
  /** A request arrived for `tag`; answer it with QueueLoop.complete(tag, result), now or later. */
  handleIo(tag: number, iod: IoDescriptor): void;
  /** An SQE the target queued with kind UD_KIND_TARGET_IO completed (res as in the CQE). */
  handleTargetIo(tag: number, res: number, targetData: number): void;
  /** The queue's eventfd was signalled: another thread has results for this queue. */
  handleEvent(): void;
  /** About once a second, from the loop's thread (figures for the owner). */
  everySecond?(): void;
}

export interface QueueLoopOptions {
  sys: Syscalls;
  devId: number;
  qid: number;
  depth: number;
  maxIo: number;
  /** /dev/ublkcN, opened by the caller (the driver allows a single open); stays the caller's. */
  cdevFd: number;
  /** Files the target reads and writes through the ring: fixed file 1, 2, ... (targetFile(i)). */
  targetFiles: number[];
  /** Kept armed until stop is asked; its wake-ups go to handleEvent. -1: none. */
  eventfd: number;
  /**
   * [0] = 1 asks the loop to end (and not to re-arm the eventfd read). [1] = 1 says QUIESCE_DEV
   * returned (set by the owner, then the eventfd written): the kernel sends no more requests, so
   * the loop ends as soon as it holds none (a hand-off, docs/DESIGN.md §7.5).
   */
  control: Int32Array;
  /**
   * The most polls of the ring's flags before blocking in io_uring_enter (0: block at once); the
   * window adapts below it (daemon/ublk/spin-policy.ts).
   */
  spin: number;
  /**
   * The device was added with UBLK_F_AUTO_BUF_REG and UBLK_F_USER_COPY (zero copy): the kernel
   * copies nothing into or out of the tag buffers. Each request's pages are in the ring's
   * fixed-buffer slot bufIndex(tag) while the target holds it (for READ_FIXED/WRITE_FIXED), and
   * copyIn/copyOut move them to and from the tag's buffer when the target needs the bytes.
   */
  zeroCopy: boolean;
  /**
   * The device was added with UBLK_F_BATCH_IO (7.0+): requests arrive and are committed through
   * batched commands (daemon/ublk/batch-io.ts) instead of one FETCH/COMMIT_AND_FETCH per tag.
   * Never together with recovery (the server refuses the pair), so never quiesced.
   */
  batchIo: boolean;
  /** Something went wrong that the owner should count and report (one call per failure). */
  log(message: string): void;
}

const PAGE = 4096;
/** Where in eventBuf the timer's struct __kernel_timespec lies (the eventfd read uses bytes 0–7). */
const TIMESPEC_AT = 64;
/** Bytes of each idle tag's buffer kept resident by the trim (the usual request fits). */
export const TRIM_KEEP_BYTES = 64 * 1024;
/** How long a tag must have been idle before the part of its buffer above TRIM_KEEP_BYTES goes. */
export const TRIM_IDLE_MS = 5000;
const SYS_pread64 = 17;
const SYS_pwrite64 = 18;
const EIO = -5;
const EINTR = -4;
const EAGAIN = -11;
const EBUSY = -16;
const ETIME = -62;
const ECANCELED = -125;

export class QueueLoop {
  readonly qid: number;
  readonly depth: number;
  readonly maxIo: number;
  readonly ring: IoUring;
  /** The request buffers: tag t owns bytes [t * maxIo, (t + 1) * maxIo). */
  readonly buffers: PinnedBuffer;
  /** Address of the request buffers (for the ring's I/O and the owner's other threads). */
  readonly bufferAddress: number;
  readonly zeroCopy: boolean;
  /** The batched commands when the device has UBLK_F_BATCH_IO, else null (one command per tag). */
  private readonly batch: BatchCommands | null;
  private readonly opts: QueueLoopOptions;
  private readonly descPtr: bigint;
  private readonly descLen: number;
  private readonly descs: DataView;
  private readonly iod = new IoDescriptor();
  private readonly eventBuf: PinnedBuffer;
  private readonly sqe: DataView;
  private target: QueueTarget | null = null;
  // Buffer trim (trimIdleBuffers): per tag, 1 from the request's arrival until its commit; when it
  // was last committed (the loop's clock); 1 while pages above TRIM_KEEP_BYTES may be resident.
  private readonly tagBusy: Uint8Array;
  private readonly tagIdleSince: Float64Array;
  private readonly tagUsed: Uint8Array;
  private aborted = 0;
  /** The polling window before each wait, adapted to whether polls find work. */
  private readonly spinPolicy: SpinPolicy;
  /**
   * Requests in flight (what a quiesced queue waits for) and per loop turn, and the turn's clock
   * (Date.now() after the last wait in io_uring_enter: one read per turn): daemon/ublk/guest-load.ts.
   */
  private readonly guest = new GuestLoad(Date.now());

  /** How busy the guest keeps this queue, in requests (GuestLoad.load). */
  get load(): number {
    return this.guest.load;
  }

  /** When this loop turn began (Date.now(), read once per io_uring_enter): a clock without a syscall. */
  get turnTime(): number {
    return this.guest.turnTime;
  }
  private closed = false;

  /** Maps the descriptors, sets up the ring and buffers; on failure releases what it took. */
  constructor(opts: QueueLoopOptions) {
    this.opts = opts;
    this.spinPolicy = new SpinPolicy(opts.spin);
    const { sys, qid, depth, maxIo } = opts;
    this.qid = qid;
    this.depth = depth;
    this.maxIo = maxIo;
    this.descLen = Math.ceil((depth * IO_DESC_SIZE) / PAGE) * PAGE;
    const descPtr = sys.mmap(this.descLen, PROT_READ, MAP_SHARED | MAP_POPULATE, opts.cdevFd, qid * UBLK_QUEUE_DESC_STRIDE);
    if (isMapFailed(descPtr)) throw new Error(`mmap of /dev/ublkc${opts.devId} queue ${qid} descriptors failed: ${errnoName(sys.errno())}`);
    this.descPtr = descPtr;
    this.descs = new DataView(sys.koffi.view(descPtr, this.descLen));
    let ring: IoUring | null = null;
    let buffers: PinnedBuffer | null = null;
    let eventBuf: PinnedBuffer | null = null;
    let batch: BatchCommands | null = null;
    try {
      let entries = 16;
      while (entries < depth + 8) entries *= 2;
      // This thread is the ring's only submitter and always waits inside io_uring_enter(GETEVENTS),
      // so completions can be deferred to that wait instead of interrupting the thread.
      // (Linking each file op to its COMMIT_AND_FETCH was tried and was 4x slower on 6.12.)
      ring = new IoUring({
        entries,
        cqEntries: entries * 2,
        flags: IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
      });
      eventBuf = allocPinned(PAGE);
      const reg = ring.registerFiles([opts.cdevFd, ...opts.targetFiles]);
      if (reg < 0) throw new Error(`io_uring register files: ${errnoName(reg)}`);
      if (opts.zeroCopy) {
        // One empty slot per tag, where the kernel puts that tag's request pages (bufIndex).
        const regBuf = ring.registerSparseBuffers(depth);
        if (regBuf < 0) throw new Error(`io_uring register ${depth} sparse buffers (zero copy): ${errnoName(regBuf)}`);
      }
      // Not populated: pages are faulted in as requests use them (the kernel's copy of write
      // data, our reads into them) instead of depth × maxIo resident from the start, and
      // trimIdleBuffers gives the large ones back.
      buffers = allocPinned(depth * maxIo, { populate: false });
      if (opts.batchIo) batch = new BatchCommands({ ring, qid, depth, copyBuffers: opts.zeroCopy ? null : { bufferAddress: buffers.address, maxIo }, host: this });
    } catch (err) {
      ring?.close();
      buffers?.free();
      eventBuf?.free();
      sys.munmap(descPtr, this.descLen);
      throw err;
    }
    this.batch = batch;
    this.ring = ring;
    this.zeroCopy = opts.zeroCopy;
    this.buffers = buffers;
    this.bufferAddress = buffers.address;
    this.eventBuf = eventBuf;
    this.sqe = ring.sqeView;
    this.tagBusy = new Uint8Array(depth);
    this.tagIdleSince = new Float64Array(depth);
    this.tagUsed = new Uint8Array(depth);
  }

  /** The fixed-file index of targetFiles[i], for the target's SQEs (with IOSQE_FIXED_FILE). */
  targetFile(i: number): number {
    return 1 + i;
  }

  /** Zero copy: the fixed-buffer slot holding the pages of tag's request while the target holds it. */
  bufIndex(tag: number): number {
    return tag;
  }

  /**
   * Zero copy: the first `length` bytes of the data of tag's WRITE (held by the target) into the
   * tag's buffer, with one pread of /dev/ublkcN (user copy) — the copy the kernel makes itself on
   * other devices. Returns `length`, or -errno (a short copy is -EIO).
   */
  copyIn(tag: number, length: number): number {
    const { sys, cdevFd } = this.opts;
    const r = sys.syscall6(SYS_pread64, cdevFd, this.bufferAddress + tag * this.maxIo, length, userCopyPosition(this.qid, tag, 0), 0, 0);
    if (r < 0) return -sys.errno();
    return r === length ? r : EIO;
  }

  /**
   * Zero copy: bytes [from, from + length) of the tag's buffer into the same bytes of tag's READ
   * (held by the target), with one pwrite of /dev/ublkcN, before its commit. `length` or -errno.
   */
  copyOut(tag: number, from: number, length: number): number {
    const { sys, cdevFd } = this.opts;
    const r = sys.syscall6(SYS_pwrite64, cdevFd, this.bufferAddress + tag * this.maxIo + from, length, userCopyPosition(this.qid, tag, from), 0, 0);
    if (r < 0) return -sys.errno();
    return r === length ? r : EIO;
  }

  /**
   * Fetches every tag and arms the eventfd read, and hands them to the kernel: from here on the
   * kernel may send requests (once the device is started), which run() passes to `target`.
   */
  start(target: QueueTarget): void {
    this.target = target;
    if (this.batch !== null) this.batch.start();
    else {
      // Test hook (tests/vm/e2e/18-recovery.sh, round h): leave the last tag unfetched, as a tag
      // the dead server fetched would be, so END_USER_RECOVERY never completes.
      const fetch = process.env.FVD_TEST_FAULT === 'fetch-short' ? this.depth - 1 : this.depth;
      for (let tag = 0; tag < fetch; tag++) this.ublkCmd(UBLK_U_IO_FETCH_REQ, tag, 0);
    }
    this.armEvent();
    const ts = new DataView(this.eventBuf.bytes.buffer, this.eventBuf.bytes.byteOffset + TIMESPEC_AT, 16);
    ts.setBigInt64(0, 1n, true); // tv_sec
    ts.setBigInt64(8, 0n, true); // tv_nsec
    this.armTimer();
    const sub = this.submit(0);
    if (sub < 0) throw new Error(`queue ${this.qid}: io_uring_enter: ${errnoName(sub)}`);
  }

  /** The request of `tag` is done with `result` (bytes, or -errno): commit it and fetch the next. */
  complete(tag: number, result: number): void {
    this.guest.completed();
    this.tagBusy[tag] = 0;
    this.tagIdleSince[tag] = this.guest.turnTime;
    if (this.batch !== null) this.batch.add(tag, result);
    else this.ublkCmd(UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result);
  }

  /** A new request for `tag` (from its FETCH/COMMIT_AND_FETCH, or a batched fetch): to the target. */
  arrive(tag: number): void {
    this.guest.arrived();
    this.tagBusy[tag] = 1;
    this.tagUsed[tag] = 1;
    this.target!.handleIo(tag, readIoDescriptor(this.descs, tag, this.iod));
  }

  /** Something went wrong that the owner should count and report. */
  log(message: string): void {
    this.opts.log(message);
  }

  /**
   * Serves requests until every tag was aborted (the device stopped), control[0] is set, or the
   * device is quiesced (control[1]) and no request is left here.
   *
   * Quiesced: QUIESCE_DEV returned, so the kernel dispatches nothing new, and what it dispatched
   * before (and the aborts of the idle fetches) is queued as task work of this thread, which with
   * DEFER_TASKRUN runs only inside our io_uring_enter. One enter after seeing the flag therefore
   * delivers all of it; from then on the requests held here are all there will be. Once they are
   * committed (COMMIT_AND_FETCH, submitted before leaving) the loop ends; fetches still pending
   * carry no request, and closing the ring cancels them. Nothing is left for the kernel to reissue.
   */
  run(): void {
    const { ring, depth, opts } = this;
    const control = opts.control;
    const spin = opts.spin;
    const onCqe = this.onCqe;
    let lastSecond = Date.now();
    let quiesced = false;
    const batch = this.batch;
    while (this.aborted < depth && Atomics.load(control, 0) === 0 && !(batch !== null && batch.done)) {
      if (!quiesced && Atomics.load(control, 1) !== 0) {
        quiesced = true;
        const r = ring.enterForEvents();
        if (r < 0 && r !== EINTR && r !== EAGAIN && r !== EBUSY) throw new Error(`queue ${this.qid}: io_uring_enter: ${errnoName(r)}`);
        ring.reap(onCqe);
      }
      if (quiesced && this.guest.inFlight === 0) {
        // The last commits go to the kernel now: they complete their requests.
        const r = this.submit(0);
        if (r < 0 && r !== EINTR && r !== EAGAIN && r !== EBUSY) throw new Error(`queue ${this.qid}: io_uring_enter: ${errnoName(r)}`);
        if (ring.unsubmitted === 0) break;
      }
      if (spin > 0 && !ring.hasWork()) {
        // Hand over what is prepared without sleeping, then poll the ring's flags for a while:
        // a new request or completion usually comes within microseconds under load, and a
        // sleep/wake-up round trip costs more than the polling. How long: the whole window
        // while the guest keeps several requests going (the next one is on its way); at one
        // request at a time, spinPolicy's window (daemon/ublk/spin-policy.ts), which closes while
        // polls find nothing — adapting under load too closed it between bursts and cost
        // 0.6–0.8x the IOPS at QD16 (README).
        batch?.flush();
        if (ring.unsubmitted > 0) this.submit(0);
        const adaptive = this.guest.load <= 1;
        const allowed = adaptive ? this.spinPolicy.next() : spin;
        let s = 0;
        while (s < allowed && !ring.hasWork()) s++;
        if (adaptive && allowed > 0) this.spinPolicy.record(s < allowed);
      }
      const r = this.submit(1);
      if (r < 0 && r !== EINTR && r !== EAGAIN && r !== EBUSY) throw new Error(`queue ${this.qid}: io_uring_enter: ${errnoName(r)}`);
      const now = Date.now();
      this.guest.newTurn(now);
      ring.reap(onCqe);
      if (now - lastSecond > 1000) {
        lastSecond = now;
        this.target!.everySecond?.();
        this.trimIdleBuffers(now);
      }
    }
  }

  /**
   * Releases the ring (which cancels what is still pending), the descriptor mapping and the
   * buffers: /dev/ublkcN must be free of them before DEL_DEV can finish. Idempotent.
   */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.ring.close();
    this.batch?.free();
    this.opts.sys.munmap(this.descPtr, this.descLen);
    this.buffers.free();
    this.eventBuf.free();
  }

  /**
   * Gives back the pages above TRIM_KEEP_BYTES of every tag idle for TRIM_IDLE_MS or more (not in
   * flight, used since its last trim): the steady footprint is then depth × 64 KiB however large
   * the requests once were. Returns the bytes given back.
   *
   * Race-free without locks: it runs on this thread, between two io_uring_enter calls, and only
   * on tags with no request. Nothing else writes an idle tag's buffer: the engine and this
   * thread's target work in a buffer only while its request is in flight (from handleIo to
   * complete), and ublk copies a new WRITE's data into the buffer in the task work of the thread
   * that fetched the tag — this one, run only inside its io_uring_enter (DEFER_TASKRUN), never
   * concurrently with this loop — before the request's CQE reaches us. So a discarded page is
   * faulted in again by whichever writes it next, and a request never sees zeros it did not ask for.
   * The other direction: the kernel copies a READ's data out of the buffer when it processes the
   * COMMIT_AND_FETCH, in the next io_uring_enter after complete(); a tag committed in this turn
   * has been idle for 0 ms, so that enter happens long before the tag qualifies.
   */
  trimIdleBuffers(now: number): number {
    const { depth, maxIo, tagBusy, tagIdleSince, tagUsed } = this;
    if (maxIo <= TRIM_KEEP_BYTES) return 0;
    let trimmed = 0;
    for (let tag = 0; tag < depth; tag++) {
      if (tagBusy[tag] !== 0 || tagUsed[tag] === 0 || now - tagIdleSince[tag]! < TRIM_IDLE_MS) continue;
      tagUsed[tag] = 0;
      const r = this.buffers.discard(tag * maxIo + TRIM_KEEP_BYTES, maxIo - TRIM_KEEP_BYTES);
      if (r < 0) {
        this.opts.log(`queue ${this.qid}: madvise of tag ${tag}'s buffer: ${errnoName(r)}`);
        continue;
      }
      trimmed += r;
    }
    return trimmed;
  }

  /** io_uring_enter with this turn's batched commit (if any) queued first. */
  private submit(waitNr: number): number {
    const batch = this.batch;
    if (batch === null) return this.ring.submit(waitNr);
    batch.flush();
    const r = this.ring.submit(waitNr);
    batch.submitted(this.ring.unsubmitted);
    return r;
  }

  private ublkCmd(op: number, tag: number, result: number): void {
    const ring = this.ring;
    // Zero copy: the slot for the tag's next request in the SQE, no buffer address in the command.
    const zc = this.zeroCopy;
    const idx = ring.prepUringCmd(0, op, null, encodeUserData(tag, UD_KIND_UBLK_CMD), IOSQE_FIXED_FILE, zc ? autoBufRegSqeAddr(this.bufIndex(tag)) : 0);
    if (idx < 0) throw new Error(`queue ${this.qid}: submission queue full`);
    encodeIoCmd(this.sqe, ring.cmdOffset(idx), this.qid, tag, result, zc ? 0 : this.bufferAddress + tag * this.maxIo);
  }

  private armEvent(): void {
    if (this.opts.eventfd < 0) return;
    if (this.ring.prepRead(this.opts.eventfd, this.eventBuf.address, 8, 0, encodeUserData(0, UD_KIND_EVENT)) < 0)
      throw new Error(`queue ${this.qid}: submission queue full`);
  }

  /**
   * A one-second timeout on the ring, so that an idle loop (blocked in io_uring_enter) still
   * comes round for everySecond and trimIdleBuffers; re-armed until stop is asked.
   */
  private armTimer(): void {
    if (this.ring.prepTimeout(this.eventBuf.address + TIMESPEC_AT, encodeUserData(0, UD_KIND_TIMER)) < 0)
      throw new Error(`queue ${this.qid}: submission queue full`);
  }

  /** The CQE handler, made once (an arrow property: reap() calls it without a bound copy per call). */
  private readonly onCqe = (userData: number, res: number, flags: number): void => {
    const tag = userDataTag(userData);
    switch (userDataKind(userData)) {
      case UD_KIND_UBLK_CMD:
        if (res === UBLK_IO_RES_OK) this.arrive(tag);
        else if (res === UBLK_IO_RES_ABORT) this.aborted++;
        else {
          this.opts.log(`ublk command for tag ${tag} failed: ${errnoName(res)}`);
          this.aborted++;
        }
        break;
      case UD_KIND_TARGET_IO:
        this.target!.handleTargetIo(tag, res, userDataTargetData(userData));
        break;
      case UD_KIND_EVENT:
        this.target!.handleEvent();
        if (Atomics.load(this.opts.control, 0) === 0) this.armEvent();
        break;
      case UD_KIND_BATCH:
        this.batch!.onCqe(tag, res, flags, userDataTargetData(userData), Atomics.load(this.opts.control, 0) === 0);
        break;
      case UD_KIND_TIMER:
        // -ETIME: it expired (run() does the periodic work); anything else ends the timer.
        if (res === ETIME && Atomics.load(this.opts.control, 0) === 0) this.armTimer();
        else if (res !== ETIME && res !== ECANCELED) this.opts.log(`queue ${this.qid}: timer: ${errnoName(res)}`);
        break;
    }
  };
}
