/**
 * io_uring from JavaScript through the raw syscalls (no liburing): the SQ ring, CQ ring and SQE
 * array are mmap'ed once and read/written directly through typed arrays over koffi.view memory.
 *
 * Built for the ublk queue hot path:
 *  - no allocation, closure or promise per operation: prep* writes the SQE words in place and
 *    returns the SQE index (or a negative errno), reap() calls one caller-preallocated handler;
 *  - 64-bit SQE/CQE fields are written as two u32 halves so offsets and user_data stay plain
 *    numbers (exact below 2^53) and no BigInt is created;
 *  - the SQ index array is filled once with the identity (slot i -> SQE i), as liburing does, so
 *    a prep touches only its SQE;
 *  - submit() is exactly one io_uring_enter for everything prepared since the last one.
 *
 * Memory ordering: head/tail words shared with the kernel go through Atomics.load/store (V8 emits
 * sequentially consistent accesses, which are at least the acquire/release the kernel pairs with,
 * and they also stop the JIT from caching or reordering them). SQE bodies and CQE bodies are plain
 * accesses, ordered by those. SQPOLL is not supported, so the kernel reads the SQ only inside our
 * io_uring_enter calls.
 *
 * Threading: a ring belongs to the thread that created it. ublk (6.12) additionally requires that
 * every command of a queue is issued from the same task, so never drive a ring with koffi .async.
 *
 * Errors: setup failures throw an Error naming the errno; every I/O-path method returns a negative
 * errno instead of throwing.
 */
import os from 'node:os';
import {
  MADV_DONTNEED,
  MADV_NOHUGEPAGE,
  MAP_ANONYMOUS,
  MAP_POPULATE,
  MAP_PRIVATE,
  MAP_SHARED,
  PROT_READ,
  PROT_WRITE,
  SYS_io_uring_enter,
  SYS_io_uring_register,
  SYS_io_uring_setup,
  isMapFailed,
  syscalls,
  type Syscalls,
} from './syscalls.js';

// --- uapi constants (linux/io_uring.h) -------------------------------------------------------

export const IORING_SETUP_IOPOLL = 1 << 0;
export const IORING_SETUP_SQPOLL = 1 << 1;
export const IORING_SETUP_CQSIZE = 1 << 3;
export const IORING_SETUP_CLAMP = 1 << 4;
export const IORING_SETUP_SUBMIT_ALL = 1 << 7;
export const IORING_SETUP_COOP_TASKRUN = 1 << 8;
export const IORING_SETUP_TASKRUN_FLAG = 1 << 9;
export const IORING_SETUP_SQE128 = 1 << 10;
export const IORING_SETUP_CQE32 = 1 << 11;
export const IORING_SETUP_SINGLE_ISSUER = 1 << 12;
export const IORING_SETUP_DEFER_TASKRUN = 1 << 13;
/** Flags whose submission model this module does not implement (polling threads, no mmap…). */
const UNSUPPORTED_SETUP_FLAGS = IORING_SETUP_IOPOLL | IORING_SETUP_SQPOLL | (1 << 14) | (1 << 15) | (1 << 16);

export const IORING_OP_NOP = 0;
/** Read into / write from a registered (fixed) buffer: sqe->buf_index names it, addr is within it. */
export const IORING_OP_READ_FIXED = 4;
export const IORING_OP_WRITE_FIXED = 5;
export const IORING_OP_FSYNC = 3;
export const IORING_OP_TIMEOUT = 11;
export const IORING_OP_FALLOCATE = 17;
export const IORING_OP_READ = 22;
export const IORING_OP_WRITE = 23;
export const IORING_OP_URING_CMD = 46;

export const IOSQE_FIXED_FILE = 1 << 0;
export const IOSQE_IO_DRAIN = 1 << 1;
export const IOSQE_IO_LINK = 1 << 2;
export const IOSQE_IO_HARDLINK = 1 << 3;
export const IOSQE_ASYNC = 1 << 4;
/** The operation takes its buffer from the provided-buffer group in sqe->buf_group (buf_index). */
export const IOSQE_BUFFER_SELECT = 1 << 5;
export const IOSQE_CQE_SKIP_SUCCESS = 1 << 6;
/** uring_cmd_flags (sqe->rw_flags of a URING_CMD): one SQE, a CQE per event until it ends (6.16+). */
export const IORING_URING_CMD_MULTISHOT = 1 << 1;
/** cqe->flags: the operation is still armed (more CQEs follow; multishot). */
export const IORING_CQE_F_MORE = 1 << 1;

export const IORING_FSYNC_DATASYNC = 1 << 0;
export const IORING_ENTER_GETEVENTS = 1 << 0;
export const IORING_SQ_CQ_OVERFLOW = 1 << 1;
export const IORING_SQ_TASKRUN = 1 << 2;
export const IORING_FEAT_SINGLE_MMAP = 1 << 0;
export const IORING_FEAT_NODROP = 1 << 1;

export const IORING_REGISTER_FILES = 2;
export const IORING_UNREGISTER_FILES = 3;
export const IORING_REGISTER_EVENTFD = 4;
/** struct io_uring_rsrc_register (32 bytes) as the argument, its size as nr_args (5.13+). */
export const IORING_REGISTER_BUFFERS2 = 15;
/** io_uring_rsrc_register.flags: a table of empty slots, filled later (here: by ublk, 6.16+). */
export const IORING_RSRC_REGISTER_SPARSE = 1 << 0;
export const IORING_UNREGISTER_EVENTFD = 5;
/** struct io_uring_buf_reg (40 bytes): a ring of provided buffers at a user address (5.19+). */
export const IORING_REGISTER_PBUF_RING = 22;
/** io_uring_buf_reg.flags: each CQE consumes only part of a buffer (incremental, 6.12+). */
export const IOU_PBUF_RING_INC = 1 << 1;

const IORING_OFF_SQ_RING = 0;
const IORING_OFF_CQ_RING = 0x8000000;
const IORING_OFF_SQES = 0x10000000;

/** URING_CMD payload starts at SQE byte 48 (sqe->cmd): 16 bytes in a 64 B SQE, 80 in a 128 B one. */
export const SQE_CMD_OFFSET = 48;

const EBUSY = 16;
const EINVAL = 22;
const EBADF = 9;
const TWO32 = 4294967296;

/** What a CQE handler receives; preallocate it once (a closure per reap defeats the purpose). */
export type CqeHandler = (userData: number, res: number, flags: number) => void;

export interface IoUringOptions {
  /** SQ size; the kernel rounds up to a power of two. */
  entries: number;
  /** IORING_SETUP_* flags (SQE128 for ublk control commands, COOP_TASKRUN, …). */
  flags?: number;
  /** CQ size (sets IORING_SETUP_CQSIZE); default is the kernel's 2 × entries. */
  cqEntries?: number;
}

const errnoNames = new Map<number, string>(Object.entries(os.constants.errno).map(([k, v]) => [v, k]));

/** "ENOMEM" for 12 (or -12), for messages. */
export function errnoName(errno: number): string {
  return errnoNames.get(Math.abs(errno)) ?? `errno ${Math.abs(errno)}`;
}

function requireSyscalls(what: string): Syscalls {
  const s = syscalls();
  if (!s) throw new Error(`${what}: koffi could not be loaded, so io_uring is unavailable`);
  return s;
}

export class IoUring {
  /** The ring's file descriptor (-1 after close). */
  fd: number;
  readonly sqEntries: number;
  readonly cqEntries: number;
  /** IORING_SETUP_* flags the ring was created with. */
  readonly setupFlags: number;
  /** IORING_FEAT_* bits the kernel reported. */
  readonly features: number;
  /** 64 or 128 (IORING_SETUP_SQE128). */
  readonly sqeSize: number;
  /**
   * Byte access to the SQE array, for writing URING_CMD payloads in place at
   * `cmdOffset(index)`. Do not keep it past close(): it then points at unmapped memory.
   */
  sqeView: DataView;
  sqeBytes: Uint8Array;

  private readonly sys: Syscalls;
  private sq32: Uint32Array; // SQ ring words (head, tail, flags, array)
  private cq32: Uint32Array; // CQ ring words (head, tail, overflow, CQEs)
  private cqI32: Int32Array; // same memory, for the signed cqe->res
  private sqe32: Uint32Array; // the SQE array
  private readonly sqHeadIdx: number;
  private readonly sqTailIdx: number;
  private readonly sqFlagsIdx: number;
  private readonly sqMask: number;
  private readonly cqHeadIdx: number;
  private readonly cqTailIdx: number;
  private readonly cqOverflowIdx: number;
  private readonly cqMask: number;
  private readonly cqesIdx: number; // word index of CQE 0
  private readonly cqeWords: number; // 4, or 8 with CQE32
  private readonly sqeWords: number; // 16 or 32
  private sqTail = 0; // our producer index (published at submit)
  private sqHead = 0; // last kernel consumer index we saw
  private cqHead = 0; // our consumer index (we are the only consumer)
  private readonly maps: Array<{ ptr: bigint; len: number }> = [];
  private readonly filesArg = new Int32Array(1);

  constructor(options: IoUringOptions) {
    const sys = requireSyscalls('io_uring_setup');
    this.sys = sys;
    const entries = options.entries;
    let flags = options.flags ?? 0;
    if (options.cqEntries !== undefined) flags |= IORING_SETUP_CQSIZE;
    if (flags & UNSUPPORTED_SETUP_FLAGS) {
      throw new Error(`io_uring_setup: flags 0x${(flags & UNSUPPORTED_SETUP_FLAGS).toString(16)} are not supported by IoUring`);
    }
    if (!Number.isInteger(entries) || entries < 1 || entries > 32768) {
      throw new Error(`io_uring_setup: entries must be an integer in 1..32768, got ${entries}`);
    }
    // struct io_uring_params (120 B): in: cq_entries @4, flags @8; out: sq_off @40, cq_off @80.
    const p = Buffer.alloc(120);
    p.writeUInt32LE(options.cqEntries ?? 0, 4);
    p.writeUInt32LE(flags >>> 0, 8);
    const fd = sys.syscall6(SYS_io_uring_setup, entries, Number(sys.koffi.address(p)), 0, 0, 0, 0);
    if (fd < 0) {
      const e = sys.errno();
      throw new Error(`io_uring_setup(${entries}, flags 0x${flags.toString(16)}) failed: ${errnoName(e)}`);
    }
    this.fd = fd;
    try {
      this.setupFlags = flags;
      this.sqEntries = p.readUInt32LE(0);
      this.cqEntries = p.readUInt32LE(4);
      this.features = p.readUInt32LE(20);
      this.sqeSize = flags & IORING_SETUP_SQE128 ? 128 : 64;
      const cqeSize = flags & IORING_SETUP_CQE32 ? 32 : 16;
      const sqOff = (f: number) => p.readUInt32LE(40 + f * 4);
      const cqOff = (f: number) => p.readUInt32LE(80 + f * 4);
      const sqArray = sqOff(6);
      const cqes = cqOff(5);
      let sqLen = sqArray + this.sqEntries * 4;
      let cqLen = cqes + this.cqEntries * cqeSize;
      const single = (this.features & IORING_FEAT_SINGLE_MMAP) !== 0;
      if (single) sqLen = cqLen = Math.max(sqLen, cqLen);
      const sqPtr = this.map(sqLen, IORING_OFF_SQ_RING, 'SQ ring');
      const cqPtr = single ? sqPtr : this.map(cqLen, IORING_OFF_CQ_RING, 'CQ ring');
      const sqesLen = this.sqEntries * this.sqeSize;
      const sqesPtr = this.map(sqesLen, IORING_OFF_SQES, 'SQE array');

      const sqBuf = sys.koffi.view(sqPtr, sqLen);
      const cqBuf = single ? sqBuf : sys.koffi.view(cqPtr, cqLen);
      const sqesBuf = sys.koffi.view(sqesPtr, sqesLen);
      this.sq32 = new Uint32Array(sqBuf);
      this.cq32 = new Uint32Array(cqBuf);
      this.cqI32 = new Int32Array(cqBuf);
      this.sqe32 = new Uint32Array(sqesBuf);
      this.sqeView = new DataView(sqesBuf);
      this.sqeBytes = new Uint8Array(sqesBuf);

      this.sqHeadIdx = sqOff(0) >>> 2;
      this.sqTailIdx = sqOff(1) >>> 2;
      this.sqMask = this.sq32[sqOff(2) >>> 2];
      this.sqFlagsIdx = sqOff(4) >>> 2;
      this.cqHeadIdx = cqOff(0) >>> 2;
      this.cqTailIdx = cqOff(1) >>> 2;
      this.cqMask = this.cq32[cqOff(2) >>> 2];
      this.cqOverflowIdx = cqOff(4) >>> 2;
      this.cqesIdx = cqes >>> 2;
      this.cqeWords = cqeSize >>> 2;
      this.sqeWords = this.sqeSize >>> 2;
      // Identity SQ index array: SQE slot i is always published through array[i].
      const arrayIdx = sqArray >>> 2;
      for (let i = 0; i < this.sqEntries; i++) this.sq32[arrayIdx + i] = i;
      this.sqTail = this.sq32[this.sqTailIdx];
      this.sqHead = this.sq32[this.sqHeadIdx];
      this.cqHead = this.cq32[this.cqHeadIdx];
    } catch (e) {
      this.close();
      throw e;
    }
  }

  private map(len: number, offset: number, what: string): bigint {
    const ptr = this.sys.mmap(len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, this.fd, offset);
    if (isMapFailed(ptr)) throw new Error(`io_uring: mmap of the ${what} (${len} B) failed: ${errnoName(this.sys.errno())}`);
    this.maps.push({ ptr, len });
    return ptr;
  }

  // --- submission ----------------------------------------------------------------------------

  /** SQEs that can still be prepared before submit() must be called. */
  sqSpace(): number {
    this.sqHead = Atomics.load(this.sq32, this.sqHeadIdx);
    return this.sqEntries - ((this.sqTail - this.sqHead) >>> 0);
  }

  /** SQEs prepared (or left by a short submit) that the kernel has not consumed yet. */
  sqPending(): number {
    return (this.sqTail - Atomics.load(this.sq32, this.sqHeadIdx)) >>> 0;
  }

  /**
   * Claims the next SQE and writes all of its first 64 bytes; returns its index or -EBUSY when
   * the SQ is full (submit first). Every field is written, so no stale bytes from the previous
   * use of the slot leak into this operation.
   */
  private fill(op: number, sqeFlags: number, fd: number, off: number, addr: number, len: number, opFlags: number, userData: number, bufIndex = 0): number {
    let tail = this.sqTail;
    if (((tail - this.sqHead) >>> 0) >= this.sqEntries) {
      this.sqHead = Atomics.load(this.sq32, this.sqHeadIdx);
      if (((tail - this.sqHead) >>> 0) >= this.sqEntries) return -EBUSY;
    }
    const index = tail & this.sqMask;
    this.sqTail = (tail + 1) >>> 0;
    const w = this.sqe32;
    const b = index * this.sqeWords;
    w[b] = op | (sqeFlags << 8); // opcode, flags, ioprio = 0
    w[b + 1] = fd;
    w[b + 2] = off >>> 0;
    w[b + 3] = (off - (off >>> 0)) / TWO32;
    w[b + 4] = addr >>> 0;
    w[b + 5] = (addr - (addr >>> 0)) / TWO32;
    w[b + 6] = len;
    w[b + 7] = opFlags;
    w[b + 8] = userData >>> 0;
    w[b + 9] = (userData - (userData >>> 0)) / TWO32;
    w[b + 10] = bufIndex; // buf_index (u16), personality 0
    w[b + 11] = 0; // file_index / splice_fd_in
    w[b + 12] = 0; // addr3 / cmd
    w[b + 13] = 0;
    w[b + 14] = 0;
    w[b + 15] = 0;
    return index;
  }

  prepNop(userData: number, sqeFlags = 0): number {
    return this.fill(IORING_OP_NOP, sqeFlags, -1, 0, 0, 0, 0, userData);
  }

  /**
   * A relative timeout: completes with -ETIME once the struct __kernel_timespec (two i64: seconds,
   * nanoseconds) at `tsAddr` has elapsed. `tsAddr` must stay valid until the CQE arrives.
   */
  prepTimeout(tsAddr: number, userData: number, sqeFlags = 0): number {
    // off = 0: a pure timeout (not "after N completions"); len = 1 timespec; flags 0: relative.
    return this.fill(IORING_OP_TIMEOUT, sqeFlags, -1, 0, tsAddr, 1, 0, userData);
  }

  /** pread(fd, addr, len, offset). `addr` must stay valid until the CQE arrives. */
  prepRead(fd: number, addr: number | bigint, len: number, offset: number, userData: number, sqeFlags = 0): number {
    return this.fill(IORING_OP_READ, sqeFlags, fd, offset, Number(addr), len, 0, userData);
  }

  /** pwrite(fd, addr, len, offset). */
  prepWrite(fd: number, addr: number | bigint, len: number, offset: number, userData: number, sqeFlags = 0): number {
    return this.fill(IORING_OP_WRITE, sqeFlags, fd, offset, Number(addr), len, 0, userData);
  }

  /**
   * READ_FIXED / WRITE_FIXED: like prepRead/prepWrite, with the memory the registered buffer
   * `bufIndex` and `addr` an address inside it. For a buffer the kernel registered itself (ublk's
   * AUTO_BUF_REG: a request's pages) the buffer starts at 0, so `addr` is the offset in it.
   */
  prepReadFixed(fd: number, addr: number, len: number, offset: number, bufIndex: number, userData: number, sqeFlags = 0): number {
    return this.fill(IORING_OP_READ_FIXED, sqeFlags, fd, offset, addr, len, 0, userData, bufIndex);
  }

  prepWriteFixed(fd: number, addr: number, len: number, offset: number, bufIndex: number, userData: number, sqeFlags = 0): number {
    return this.fill(IORING_OP_WRITE_FIXED, sqeFlags, fd, offset, addr, len, 0, userData, bufIndex);
  }

  /** fsync, or fdatasync when `datasync`. */
  prepFsync(fd: number, datasync: boolean, userData: number, sqeFlags = 0): number {
    return this.fill(IORING_OP_FSYNC, sqeFlags, fd, 0, 0, 0, datasync ? IORING_FSYNC_DATASYNC : 0, userData);
  }

  /** fallocate(fd, mode, offset, length): the kernel takes the length in sqe->addr, the mode in sqe->len. */
  prepFallocate(fd: number, mode: number, offset: number, length: number, userData: number, sqeFlags = 0): number {
    return this.fill(IORING_OP_FALLOCATE, sqeFlags, fd, offset, length, mode, 0, userData);
  }

  /**
   * IORING_OP_URING_CMD: cmd_op at SQE offset 8, payload at offset 48. `payload` (≤16 B, or ≤80 B
   * on an SQE128 ring) is copied in; pass null and write the payload yourself through
   * `sqeView` at `cmdOffset(index)` to avoid even that copy. The payload area is zeroed first.
   * `sqeAddr` and `len` go to sqe->addr and sqe->len (a command's own buffer), `cmdFlags` to
   * uring_cmd_flags (IORING_URING_CMD_*), `bufGroup` to sqe->buf_group (with IOSQE_BUFFER_SELECT).
   */
  prepUringCmd(fd: number, cmdOp: number, payload: Uint8Array | null, userData: number, sqeFlags = 0, sqeAddr = 0, len = 0, cmdFlags = 0, bufGroup = 0): number {
    const room = this.sqeSize - SQE_CMD_OFFSET;
    if (payload !== null && payload.length > room) return -EINVAL;
    const index = this.fill(IORING_OP_URING_CMD, sqeFlags, fd, cmdOp >>> 0, sqeAddr, len, cmdFlags, userData, bufGroup);
    if (index < 0) return index;
    if (this.sqeWords > 16) this.sqe32.fill(0, index * this.sqeWords + 16, (index + 1) * this.sqeWords);
    if (payload !== null) this.sqeBytes.set(payload, index * this.sqeSize + SQE_CMD_OFFSET);
    return index;
  }

  /** Byte offset of SQE `index`'s URING_CMD payload within `sqeView`/`sqeBytes`. */
  cmdOffset(index: number): number {
    return index * this.sqeSize + SQE_CMD_OFFSET;
  }

  /** Byte offset of SQE `index` within `sqeView`/`sqeBytes` (for tests and unusual fields). */
  sqeOffset(index: number): number {
    return index * this.sqeSize;
  }

  /** Replaces the IOSQE_* flags of a prepared, not yet submitted SQE (e.g. IOSQE_FIXED_FILE). */
  setSqeFlags(index: number, sqeFlags: number): void {
    const b = index * this.sqeWords;
    this.sqe32[b] = (this.sqe32[b] & ~0xff00) | ((sqeFlags & 0xff) << 8);
  }

  /**
   * One io_uring_enter that submits every prepared SQE and, when waitNr > 0, waits until at least
   * waitNr CQEs are available. Returns the number of SQEs the kernel consumed, or -errno (-EINTR,
   * -EAGAIN, -EBUSY…); SQEs not consumed stay queued and go with the next submit.
   */
  submit(waitNr = 0): number {
    if (this.fd < 0) return -EBADF;
    Atomics.store(this.sq32, this.sqTailIdx, this.sqTail);
    const toSubmit = (this.sqTail - Atomics.load(this.sq32, this.sqHeadIdx)) >>> 0;
    let flags = 0;
    if (waitNr > 0) {
      // Enough completions already posted and nothing to send: skip the syscall.
      if (toSubmit === 0 && this.cqReady() >= waitNr) return 0;
      flags = IORING_ENTER_GETEVENTS;
    } else if (toSubmit === 0) {
      // Nothing to do unless the kernel holds overflowed CQEs or deferred task work for us.
      if (!this.kernelHasWork()) return 0;
      flags = IORING_ENTER_GETEVENTS;
    }
    const ret = this.sys.syscall6(SYS_io_uring_enter, this.fd, toSubmit, waitNr, flags, 0, 0);
    if (ret < 0) return -this.sys.errno();
    this.sqHead = Atomics.load(this.sq32, this.sqHeadIdx);
    return ret;
  }

  /**
   * True when a wait would return at once: CQEs are posted, or (rings set up with
   * IORING_SETUP_TASKRUN_FLAG) the kernel has task work or overflowed CQEs waiting for an enter.
   * A plain memory read: callers may spin on it before blocking in io_uring_enter.
   */
  hasWork(): boolean {
    return this.cqReady() > 0 || this.kernelHasWork();
  }

  /** Overflowed CQEs or (TASKRUN_FLAG rings) task work the kernel holds until an enter. */
  private kernelHasWork(): boolean {
    return (Atomics.load(this.sq32, this.sqFlagsIdx) & (IORING_SQ_CQ_OVERFLOW | IORING_SQ_TASKRUN)) !== 0;
  }

  /** SQEs prepared and not yet handed to the kernel. */
  get unsubmitted(): number {
    return (this.sqTail - Atomics.load(this.sq32, this.sqHeadIdx)) >>> 0;
  }

  /**
   * One io_uring_enter(GETEVENTS) that submits and waits for nothing: it runs the task work the
   * kernel deferred to this thread (DEFER_TASKRUN), so every completion queued before the call is
   * posted after it, whatever the TASKRUN flag says. 0 or -errno.
   */
  enterForEvents(): number {
    if (this.fd < 0) return -EBADF;
    const ret = this.sys.syscall6(SYS_io_uring_enter, this.fd, 0, 0, IORING_ENTER_GETEVENTS, 0, 0);
    return ret < 0 ? -this.sys.errno() : 0;
  }

  /** Blocks until at least `waitNr` CQEs are available, submitting anything prepared. */
  wait(waitNr = 1): number {
    return this.submit(waitNr);
  }

  // --- completion ----------------------------------------------------------------------------

  /** CQEs posted and not yet consumed. */
  cqReady(): number {
    return (Atomics.load(this.cq32, this.cqTailIdx) - this.cqHead) >>> 0;
  }

  /** user_data of the i-th ready CQE (0 = oldest); valid for i < cqReady(). */
  cqeUserData(i: number): number {
    const c = this.cqesIdx + (((this.cqHead + i) & this.cqMask) * this.cqeWords);
    return this.cq32[c] + this.cq32[c + 1] * TWO32;
  }

  cqeRes(i: number): number {
    return this.cqI32[this.cqesIdx + (((this.cqHead + i) & this.cqMask) * this.cqeWords) + 2];
  }

  cqeFlags(i: number): number {
    return this.cq32[this.cqesIdx + (((this.cqHead + i) & this.cqMask) * this.cqeWords) + 3];
  }

  /** Marks the n oldest ready CQEs consumed (after reading them with cqeUserData/cqeRes/cqeFlags). */
  cqAdvance(n: number): void {
    this.cqHead = (this.cqHead + n) >>> 0;
    Atomics.store(this.cq32, this.cqHeadIdx, this.cqHead);
  }

  /**
   * Calls handler(userData, res, flags) for every ready CQE, oldest first, and consumes them;
   * returns how many. If the kernel parked CQEs on its overflow list (CQ was full), they are
   * flushed into the ring and reaped too, so nothing is lost. A CQE is consumed before its handler
   * runs: a throwing handler loses nothing but the rest of this call's batch stays queued.
   * The handler may prep and submit, but must not call reap() itself.
   */
  reap(handler: CqeHandler): number {
    let n = 0;
    for (;;) {
      const tail = Atomics.load(this.cq32, this.cqTailIdx);
      let head = this.cqHead;
      try {
        while (head !== tail) {
          const c = this.cqesIdx + (head & this.cqMask) * this.cqeWords;
          head = (head + 1) >>> 0;
          n++;
          handler(this.cq32[c] + this.cq32[c + 1] * TWO32, this.cqI32[c + 2], this.cq32[c + 3]);
        }
      } finally {
        this.cqHead = head;
        Atomics.store(this.cq32, this.cqHeadIdx, head);
      }
      if (this.fd < 0 || (Atomics.load(this.sq32, this.sqFlagsIdx) & IORING_SQ_CQ_OVERFLOW) === 0) return n;
      // CQ overflowed: now that there is room, ask the kernel to move the parked CQEs in.
      if (this.sys.syscall6(SYS_io_uring_enter, this.fd, 0, 0, IORING_ENTER_GETEVENTS, 0, 0) < 0) return n;
      if (this.cqReady() === 0) return n;
    }
  }

  /** CQEs the kernel had to drop (only without IORING_FEAT_NODROP); diagnostics. */
  cqOverflowCount(): number {
    return Atomics.load(this.cq32, this.cqOverflowIdx);
  }

  // --- registration --------------------------------------------------------------------------

  /** IORING_REGISTER_FILES: afterwards use the index as fd with IOSQE_FIXED_FILE. 0 or -errno. */
  registerFiles(fds: ArrayLike<number>): number {
    const arr = Int32Array.from(fds);
    return this.register(IORING_REGISTER_FILES, arr, arr.length);
  }

  unregisterFiles(): number {
    return this.register(IORING_UNREGISTER_FILES, null, 0);
  }

  /**
   * IORING_REGISTER_BUFFERS2 with IORING_RSRC_REGISTER_SPARSE: a fixed-buffer table of `n` empty
   * slots, for buffers the kernel registers itself. 0 or -errno.
   */
  registerSparseBuffers(n: number): number {
    const arg = new BigUint64Array(4); // nr | flags << 32, resv2, data, tags
    arg[0] = BigInt(n) | (BigInt(IORING_RSRC_REGISTER_SPARSE) << 32n);
    return this.register(IORING_REGISTER_BUFFERS2, arg, arg.byteLength);
  }

  /**
   * IORING_REGISTER_PBUF_RING: the provided-buffer group `groupId` is the ring of `entries` (a
   * power of two) struct io_uring_buf at `ringAddress` (page-aligned, entries × 16 bytes, kept
   * until the ring closes); `flags` IOU_PBUF_RING_*. 0 or -errno.
   */
  registerBufferRing(ringAddress: number, entries: number, groupId: number, flags = 0): number {
    const arg = new BigUint64Array(5); // ring_addr, ring_entries | bgid << 32 | flags << 48, resv[3]
    arg[0] = BigInt(ringAddress);
    arg[1] = BigInt(entries) | (BigInt(groupId) << 32n) | (BigInt(flags) << 48n);
    return this.register(IORING_REGISTER_PBUF_RING, arg, 1);
  }

  /** IORING_REGISTER_EVENTFD: the eventfd is signalled on each CQE (to wake a libuv-side reader). */
  registerEventfd(eventfd: number): number {
    this.filesArg[0] = eventfd;
    return this.register(IORING_REGISTER_EVENTFD, this.filesArg, 1);
  }

  /**
   * io_uring_register(fd, opcode, arg, nr), 0 (or a count) or -errno. `arg` is the array or struct
   * the opcode reads, passed by its address; `nr` is its element count, or for the *2 opcodes
   * (struct io_uring_rsrc_register) its byte size.
   */
  private register(opcode: number, arg: ArrayBufferView | null, nr: number): number {
    if (this.fd < 0) return -EBADF;
    const addr = arg === null ? 0 : Number(this.sys.koffi.address(arg));
    const ret = this.sys.syscall6(SYS_io_uring_register, this.fd, opcode, addr, nr, 0, 0);
    return ret < 0 ? -this.sys.errno() : ret;
  }

  /**
   * Unmaps the rings and closes the fd (in-flight operations are cancelled by the kernel).
   * The typed arrays are swapped for empty ones so a stray access after close reads undefined
   * instead of faulting on unmapped memory. Idempotent.
   */
  close(): void {
    for (const m of this.maps.splice(0)) this.sys.munmap(m.ptr, m.len);
    const empty = new ArrayBuffer(0);
    this.sq32 = new Uint32Array(empty);
    this.cq32 = new Uint32Array(empty);
    this.cqI32 = new Int32Array(empty);
    this.sqe32 = new Uint32Array(empty);
    this.sqeView = new DataView(empty);
    this.sqeBytes = new Uint8Array(empty);
    if (this.fd >= 0) {
      // libc close, not fs.closeSync: Node's worker threads warn when fs closes an fd fs never opened.
      this.sys.close(this.fd);
      this.fd = -1;
    }
  }
}

// --- stable, page-aligned buffers --------------------------------------------------------------

/** allocPinned options. */
export interface PinnedOptions {
  /**
   * true (default): fault every page in at mmap (MAP_POPULATE), so first use never page-faults
   * (rings, descriptors, small scratch). false: pages are faulted in on first touch (by us or by
   * the kernel copying into them) and may be given back with discard(); no transparent huge pages,
   * so residency follows what is touched at 4 KiB granularity (ublk request buffers).
   */
  populate?: boolean;
}

const PAGE_SIZE = 4096;

/**
 * Anonymous mmap'ed memory: page-aligned and never moved by V8's GC, as ublk per-tag buffers and
 * O_DIRECT I/O need. Not freed by GC: call free() once nothing (kernel included) uses it.
 */
export class PinnedBuffer {
  /** Start address as a number (exact: user-space addresses are < 2^47). */
  readonly address: number;
  readonly length: number;
  /** The memory as a Buffer (zero-copy). Invalid after free(). */
  bytes: Buffer;
  private ptr: bigint;
  private readonly sys: Syscalls;

  constructor(length: number, options: PinnedOptions = {}) {
    const sys = requireSyscalls('PinnedBuffer');
    if (!Number.isInteger(length) || length <= 0) throw new Error(`PinnedBuffer: bad length ${length}`);
    const populate = options.populate ?? true;
    const ptr = sys.mmap(length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | (populate ? MAP_POPULATE : 0), -1, 0);
    if (isMapFailed(ptr)) throw new Error(`PinnedBuffer: mmap of ${length} B failed: ${errnoName(sys.errno())}`);
    this.sys = sys;
    this.ptr = ptr;
    this.address = Number(ptr);
    this.length = length;
    this.bytes = Buffer.from(sys.koffi.view(ptr, length));
    // Advice only: where THP is off or the call fails, pages are 4 KiB anyway.
    if (!populate) sys.madvise(this.address, Math.ceil(length / PAGE_SIZE) * PAGE_SIZE, MADV_NOHUGEPAGE);
  }

  /** Address of byte `offset`, e.g. tag × bufSize for a per-tag slice. */
  addressAt(offset: number): number {
    return this.address + offset;
  }

  /**
   * Gives the whole pages inside [offset, offset + length) back to the kernel (MADV_DONTNEED):
   * they read as zeros afterwards and are faulted in again on the next touch. Only for memory
   * nothing is using or about to use (the caller's to guarantee). Returns the bytes discarded,
   * or -errno.
   */
  discard(offset: number, length: number): number {
    if (this.ptr === 0n) return 0;
    const start = Math.ceil(Math.max(0, offset) / PAGE_SIZE) * PAGE_SIZE;
    const end = Math.floor(Math.min(this.length, offset + length) / PAGE_SIZE) * PAGE_SIZE;
    if (end <= start) return 0;
    if (this.sys.madvise(this.address + start, end - start, MADV_DONTNEED) < 0) return -this.sys.errno();
    return end - start;
  }

  free(): void {
    if (this.ptr === 0n) return;
    this.bytes = Buffer.alloc(0);
    this.sys.munmap(this.ptr, this.length);
    this.ptr = 0n;
  }
}

/** Page-aligned buffer of `length` bytes (rounded up to whole pages by the kernel), zero-filled. */
export function allocPinned(length: number, options?: PinnedOptions): PinnedBuffer {
  return new PinnedBuffer(length, options);
}
