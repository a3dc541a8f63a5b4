/**
 * BlockFile (fvd/io.ts) over io_uring: the backend of `fvd bench --io uring` (daemon/commands/
 * bench.ts), which measures the engine over io_uring against node:fs. Nothing else uses it today:
 * the daemon's engine opens files through storage/storage-io.ts (node:fs, storage/node-file.ts), and
 * its queue workers do guest data I/O on their own rings (daemon/queue-worker.ts).
 *
 * Operations return promises, as the engine expects, but the per-operation state
 * lives in preallocated slots: a free list of slot indices, with `userDataBase + slot` as the
 * CQE user_data. One UringFileDriver (ring + slots) serves every file a UringIoBackend opens.
 *
 * Who drives the ring:
 *  - 'auto' (default): the first operation queued in a macrotask schedules a setImmediate that
 *    submits everything queued so far in ONE io_uring_enter and blocks until those operations
 *    complete. Blocking is deliberate: this is meant for a queue worker thread whose only job is
 *    I/O (like fs.readSync); do not use 'auto' on a thread that must stay responsive.
 *  - 'manual': the owner's event loop calls poll() / submitAndWait(); `onQueued` tells it that
 *    there is work. With a ring shared with ublk commands, give the driver a userDataBase above
 *    the ublk user_data range and route CQEs with handleCqe(), or pass onForeignCqe.
 *
 * Short transfers are continued from where they stopped (pread/pwrite semantics); a read that
 * hits end of file fills the rest of the buffer with zeros, as BlockFile requires.
 */
import fs from 'node:fs';
import util from 'node:util';
import {
  IoUring,
  errnoName,
  type CqeHandler,
  type IoUringOptions,
} from '../ffi/uring.js';
import { syscalls } from '../ffi/syscalls.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE } from '../ffi/libc.js';
import { blockDeviceSize, fileIdentity, openFlags, settleOpen } from './node-file.js';
import { FvdError } from '../fvd/errors.js';
import type { BlockFile, IoBackend, OpenOptions } from '../fvd/io.js';

const OP_READ = 1;
const OP_WRITE = 2;
const OP_FSYNC = 3;
const OP_FALLOCATE = 4;
const OP_NAMES = ['', 'read', 'write', 'fdatasync', 'fallocate'];

/** Linux caps one read/write at MAX_RW_COUNT; longer buffers continue as short transfers. */
const MAX_RW = 0x7ffff000;
const EINTR = 4;
const EIO = 5;
const EAGAIN = 11;
const EBUSY = 16;
const EOPNOTSUPP = 95;

export interface UringDriverOptions {
  /** Ring size when the driver creates its own ring (default 64). */
  entries?: number;
  /** Extra IORING_SETUP_* flags for a driver-created ring. */
  flags?: number;
  /** Use an existing ring (shared with other users) instead of creating one. */
  ring?: IoUring;
  /** Concurrent operations (default: the ring's SQ size). */
  slots?: number;
  /** user_data of slot i is userDataBase + i (default 0); keep the range clear of other users. */
  userDataBase?: number;
  /** 'auto' (default) or 'manual'; see the module comment. */
  drive?: 'auto' | 'manual';
  /** Manual mode: called (once per batch) when an operation was queued and needs a submit. */
  onQueued?: () => void;
  /** CQEs outside our user_data range seen by poll()/submitAndWait() on a shared ring. */
  onForeignCqe?: CqeHandler;
}

/** A Node-style errno error: code 'EIO', errno -5, syscall, path. */
export function uringError(res: number, syscall: string, path: string): NodeJS.ErrnoException {
  let name: string;
  try {
    name = util.getSystemErrorName(-Math.abs(res));
  } catch {
    name = errnoName(res);
  }
  const err: NodeJS.ErrnoException = new Error(`${name}: ${syscall} failed on '${path}' (io_uring)`);
  err.code = name;
  err.errno = -Math.abs(res);
  err.syscall = syscall;
  err.path = path;
  return err;
}

export class UringFileDriver {
  readonly ring: IoUring;
  private readonly ownsRing: boolean;
  private readonly base: number;
  private readonly nSlots: number;
  private readonly auto: boolean;
  private readonly onQueued: (() => void) | undefined;
  private readonly onForeign: CqeHandler | undefined;
  private readonly addressOf: (b: Uint8Array) => bigint;

  // Slot table, preallocated. A slot is free when it is on the free list.
  private readonly nextFree: Int32Array;
  private freeHead: number;
  private readonly kind: Uint8Array;
  private readonly fd: Int32Array;
  private readonly addr: Float64Array; // buffer address (read/write)
  private readonly offset: Float64Array; // file offset of byte 0 of the op
  private readonly length: Float64Array; // total bytes (read/write/fallocate)
  private readonly done: Float64Array; // bytes transferred so far
  private readonly mode: Int32Array; // fallocate mode
  private readonly buf: Array<Uint8Array | null>;
  private readonly path: Array<string | null>;
  private readonly resolve: Array<(() => void) | null>;
  private readonly reject: Array<((e: Error) => void) | null>;
  private readonly slotWaiters: Array<(slot: number) => void> = [];

  /** Operations issued and not yet completed. */
  inFlight = 0;
  private driveScheduled = false;
  private readonly onCqe: CqeHandler = (ud, res) => {
    if (!this.handleCqe(ud, res)) this.onForeign?.(ud, res, 0);
  };
  private readonly drive = () => this.driveNow();

  constructor(options: UringDriverOptions = {}) {
    if (options.ring) {
      this.ring = options.ring;
      this.ownsRing = false;
    } else {
      const ringOptions: IoUringOptions = { entries: options.entries ?? 64, flags: options.flags ?? 0 };
      this.ring = new IoUring(ringOptions);
      this.ownsRing = true;
    }
    const koffi = syscalls()!.koffi; // IoUring construction already proved koffi loads
    this.addressOf = (b) => koffi.address(b);
    this.base = options.userDataBase ?? 0;
    const n = Math.max(1, Math.min(options.slots ?? this.ring.sqEntries, this.ring.cqEntries));
    this.nSlots = n;
    this.auto = (options.drive ?? 'auto') === 'auto';
    this.onQueued = options.onQueued;
    this.onForeign = options.onForeignCqe;
    this.nextFree = new Int32Array(n);
    for (let i = 0; i < n; i++) this.nextFree[i] = i + 1 < n ? i + 1 : -1;
    this.freeHead = 0;
    this.kind = new Uint8Array(n);
    this.fd = new Int32Array(n);
    this.addr = new Float64Array(n);
    this.offset = new Float64Array(n);
    this.length = new Float64Array(n);
    this.done = new Float64Array(n);
    this.mode = new Int32Array(n);
    this.buf = new Array(n).fill(null);
    this.path = new Array(n).fill(null);
    this.resolve = new Array(n).fill(null);
    this.reject = new Array(n).fill(null);
  }

  // --- operations (used by UringFile) --------------------------------------------------------

  read(fd: number, path: string, buf: Uint8Array, offset: number): Promise<void> {
    return this.start(OP_READ, fd, path, buf, offset, buf.length, 0);
  }

  write(fd: number, path: string, buf: Uint8Array, offset: number): Promise<void> {
    return this.start(OP_WRITE, fd, path, buf, offset, buf.length, 0);
  }

  fdatasync(fd: number, path: string): Promise<void> {
    return this.start(OP_FSYNC, fd, path, null, 0, 0, 0);
  }

  fallocate(fd: number, path: string, mode: number, offset: number, length: number): Promise<void> {
    return this.start(OP_FALLOCATE, fd, path, null, offset, length, mode);
  }

  private start(kind: number, fd: number, path: string, buf: Uint8Array | null, offset: number, length: number, mode: number): Promise<void> {
    const slot = this.freeHead;
    if (slot < 0) {
      // All slots busy: wait for finish() to hand one over (allocates, but only under overload).
      return new Promise<number>((r) => this.slotWaiters.push(r)).then((s) => this.launch(s, kind, fd, path, buf, offset, length, mode));
    }
    this.freeHead = this.nextFree[slot];
    return this.launch(slot, kind, fd, path, buf, offset, length, mode);
  }

  private launch(slot: number, kind: number, fd: number, path: string, buf: Uint8Array | null, offset: number, length: number, mode: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.kind[slot] = kind;
      this.fd[slot] = fd;
      // Touching .buffer moves a small on-heap typed array off the V8 heap, so its address
      // stays fixed while the kernel uses it; the slot keeps it alive.
      this.addr[slot] = buf === null ? 0 : (void buf.buffer, Number(this.addressOf(buf)));
      this.offset[slot] = offset;
      this.length[slot] = length;
      this.done[slot] = 0;
      this.mode[slot] = mode;
      this.buf[slot] = buf;
      this.path[slot] = path;
      this.resolve[slot] = resolve;
      this.reject[slot] = reject;
      this.inFlight++;
      this.issue(slot);
    });
  }

  /** Preps the (remaining part of the) slot's operation; the next submit sends it. */
  private issue(slot: number): void {
    const ud = this.base + slot;
    const ring = this.ring;
    let r = this.prep(slot, ud);
    if (r === -EBUSY) {
      // SQ full (only possible on a shared ring): push what is queued, then retry once.
      ring.submit(0);
      r = this.prep(slot, ud);
    }
    if (r < 0) {
      this.finish(slot, r);
      return;
    }
    if (this.auto) {
      if (!this.driveScheduled) {
        this.driveScheduled = true;
        setImmediate(this.drive);
      }
    } else if (this.onQueued) {
      this.onQueued();
    }
  }

  private prep(slot: number, ud: number): number {
    const ring = this.ring;
    const done = this.done[slot];
    switch (this.kind[slot]) {
      case OP_READ:
        return ring.prepRead(this.fd[slot], this.addr[slot] + done, Math.min(this.length[slot] - done, MAX_RW), this.offset[slot] + done, ud);
      case OP_WRITE:
        return ring.prepWrite(this.fd[slot], this.addr[slot] + done, Math.min(this.length[slot] - done, MAX_RW), this.offset[slot] + done, ud);
      case OP_FSYNC:
        return ring.prepFsync(this.fd[slot], true, ud);
      default:
        return ring.prepFallocate(this.fd[slot], this.mode[slot], this.offset[slot], this.length[slot], ud);
    }
  }

  /**
   * Routes one CQE: returns false when user_data is not one of our slots (shared ring).
   * Exposed so an owner that reaps a shared ring itself can hand our CQEs over.
   */
  handleCqe(userData: number, res: number): boolean {
    const slot = userData - this.base;
    if (slot < 0 || slot >= this.nSlots || this.resolve[slot] === null) return false;
    const kind = this.kind[slot];
    if (res === -EINTR || res === -EAGAIN) {
      this.issue(slot);
      return true;
    }
    if (res < 0 || kind === OP_FSYNC || kind === OP_FALLOCATE) {
      this.finish(slot, res < 0 ? res : 0);
      return true;
    }
    if (res === 0) {
      if (kind === OP_WRITE) {
        this.finish(slot, -EIO); // a write that makes no progress would loop forever
      } else {
        this.buf[slot]!.fill(0, this.done[slot]); // end of file: the rest reads as zeros
        this.finish(slot, 0);
      }
      return true;
    }
    const done = this.done[slot] + res;
    this.done[slot] = done;
    if (done < this.length[slot]) this.issue(slot);
    else this.finish(slot, 0);
    return true;
  }

  private finish(slot: number, res: number): void {
    const resolve = this.resolve[slot]!;
    const reject = this.reject[slot]!;
    const syscall = OP_NAMES[this.kind[slot]];
    const path = this.path[slot]!;
    this.buf[slot] = null;
    this.path[slot] = null;
    this.resolve[slot] = null;
    this.reject[slot] = null;
    this.inFlight--;
    // Hand the slot straight to a waiting operation, else back on the free list.
    const waiter = this.slotWaiters.shift();
    if (waiter) waiter(slot);
    else {
      this.nextFree[slot] = this.freeHead;
      this.freeHead = slot;
    }
    if (res < 0) reject(uringError(res, syscall, path));
    else resolve();
  }

  // --- driving the ring ----------------------------------------------------------------------

  /** Submits what is queued without blocking and handles ready CQEs; returns CQEs reaped. */
  poll(): number {
    const r = this.ring.submit(0);
    if (r < 0 && r !== -EINTR && r !== -EAGAIN && r !== -EBUSY) this.failAll(r);
    return this.ring.reap(this.onCqe);
  }

  /**
   * Submits what is queued and blocks until `min` CQEs are ready (clamped to our in-flight count
   * on a ring we own, so it cannot wait forever), then handles them; returns CQEs reaped.
   */
  submitAndWait(min = 1): number {
    if (this.ownsRing) min = Math.min(min, this.inFlight);
    const r = this.ring.submit(min);
    if (r < 0 && r !== -EINTR && r !== -EAGAIN && r !== -EBUSY) this.failAll(r);
    return this.ring.reap(this.onCqe);
  }

  private driveNow(): void {
    this.driveScheduled = false;
    // Continuations (short transfers, retries) re-issue from inside reap; keep going until our
    // operations are all done, so nothing is left waiting for a drive that is not scheduled.
    while (this.inFlight > 0 && this.ring.fd >= 0) this.submitAndWait(this.inFlight);
  }

  /** io_uring_enter itself failed (e.g. ring closed): nothing queued will complete. */
  private failAll(res: number): void {
    for (let slot = 0; slot < this.nSlots; slot++) if (this.resolve[slot] !== null) this.finish(slot, res);
  }

  /** Closes the ring if the driver created it; pending operations fail with EBADF. */
  close(): void {
    if (this.ownsRing) this.ring.close();
    this.failAll(-9);
  }
}

let zeros: Uint8Array | null = null;
const ZERO_CHUNK = 1 << 20;

/**
 * One open file. Semantics match storage/node-file.ts (NodeFile), so the engine behaves the same
 * over either backend: size() is tracked in memory (no syscall), writes past a block device's end
 * fail with ENOSPC, zeroRange past a regular file's end is a no-op (those bytes already read as
 * zeros).
 */
export class UringFile implements BlockFile {
  private closed = false;
  private length: number;

  constructor(
    private readonly driver: UringFileDriver,
    private readonly fd: number,
    readonly path: string,
    readonly readOnly: boolean,
    readonly isBlockDevice: boolean,
    readonly fileId?: string,
  ) {
    this.length = isBlockDevice ? blockDeviceSize(fd, path) : fs.fstatSync(fd).size;
  }

  read(buf: Uint8Array, offset: number): Promise<void> {
    const bad = this.check(offset, buf.length, false);
    if (bad) return bad;
    return this.driver.read(this.fd, this.path, buf, offset);
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    const bad = this.check(offset, buf.length, true);
    if (bad) return bad;
    const end = offset + buf.length;
    if (this.isBlockDevice && end > this.length) {
      throw new FvdError(`${this.path}: write at ${offset}+${buf.length} beyond device end ${this.length}`, 'ENOSPC');
    }
    await this.driver.write(this.fd, this.path, buf, offset);
    if (end > this.length) this.length = end;
  }

  flush(): Promise<void> {
    if (this.closed) return Promise.reject(new FvdError(`${this.path}: file is closed`, 'EINVAL'));
    return this.driver.fdatasync(this.fd, this.path);
  }

  async zeroRange(offset: number, length: number): Promise<void> {
    const bad = this.check(offset, length, true);
    if (bad) return bad;
    if (!this.isBlockDevice) {
      length = Math.min(offset + length, this.length) - offset;
      if (length <= 0) return;
    }
    // A regular file frees the space (hole punch); a block device gets ZERO_RANGE, which the
    // kernel guarantees reads back as zeros (falling back to writing them).
    const mode = FALLOC_FL_KEEP_SIZE | (this.isBlockDevice ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE);
    try {
      await this.driver.fallocate(this.fd, this.path, mode, offset, length);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).errno !== -EOPNOTSUPP) throw e;
      // File system without hole punching: write the zeros.
      zeros ??= new Uint8Array(ZERO_CHUNK);
      for (let at = 0; at < length; at += ZERO_CHUNK) {
        const n = Math.min(ZERO_CHUNK, length - at);
        await this.driver.write(this.fd, this.path, n === ZERO_CHUNK ? zeros : zeros.subarray(0, n), offset + at);
      }
    }
  }

  size(): number {
    return this.length;
  }

  truncate(length: number): Promise<void> {
    if (this.isBlockDevice) return Promise.reject(new FvdError(`${this.path}: cannot resize a block device`, 'EINVAL'));
    if (this.readOnly) return Promise.reject(new FvdError(`${this.path}: opened read-only`, 'EROFS'));
    return new Promise((resolve, reject) =>
      fs.ftruncate(this.fd, length, (err) => {
        if (err) return reject(err);
        this.length = length;
        resolve();
      }),
    );
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }

  private check(offset: number, length: number, writing: boolean): Promise<void> | null {
    if (this.closed) return Promise.reject(new FvdError(`${this.path}: file is closed`, 'EINVAL'));
    if (writing && this.readOnly) return Promise.reject(new FvdError(`${this.path}: opened read-only`, 'EROFS'));
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(offset + length)) {
      return Promise.reject(new FvdError(`${this.path}: bad offset ${offset}`, 'EINVAL'));
    }
    if (length === 0) return Promise.resolve();
    return null;
  }
}

/** IoBackend whose files do their I/O through one shared io_uring (see UringFileDriver). */
export class UringIoBackend implements IoBackend {
  readonly driver: UringFileDriver;

  constructor(options: UringDriverOptions = {}) {
    this.driver = new UringFileDriver(options);
  }

  async open(path: string, options: OpenOptions = {}): Promise<BlockFile> {
    // As NodeFile.open: never waits on a FIFO, never truncates, locks before reading the size.
    const f = settleOpen(fs.openSync(path, openFlags(options) | fs.constants.O_NONBLOCK, 0o644), path, options);
    return new UringFile(this.driver, f.fd, path, options.readOnly ?? false, f.isBlockDevice, f.fileId);
  }

  identify(path: string): Promise<string | null> {
    return fileIdentity(path);
  }

  /** Closes the ring (files should be closed first). */
  close(): void {
    this.driver.close();
  }
}
