/**
 * BlockFile over node:fs (libuv thread pool): the local-file backend the CLI and the daemon give
 * the engine (through storage/storage-io.ts), and the tests' real-file backend. Hole punching,
 * device sizes and locks come from libc through koffi (ffi/libc.ts); without it, zeroRange writes
 * zeros.
 */
import fs from 'node:fs';
import nodePath from 'node:path';
import type { BlockFile, IoBackend, OpenOptions } from '../fvd/io.js';
import { FvdError } from '../fvd/errors.js';
import {
  libc,
  BLKGETSIZE64,
  BLKZEROOUT,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  LOCK_EX,
  LOCK_NB,
  LOCK_SH,
  SEEK_DATA,
  SEEK_HOLE,
} from '../ffi/libc.js';

const EWOULDBLOCK = 11;
const ENXIO = 6;
/** node:fs takes at most 2 GiB - 1 per call; larger transfers go in pieces. */
const MAX_IO = 1 << 30;
const ZERO_CHUNK = 1024 * 1024;
let zeroBuffer: Uint8Array | null = null;

function ioPromise<T>(fn: (cb: (err: NodeJS.ErrnoException | null, v: T) => void) => void): Promise<T> {
  return new Promise((resolve, reject) => fn((err, v) => (err ? reject(err) : resolve(v))));
}

export class NodeFile implements BlockFile {
  private length: number;

  private constructor(
    private readonly fd: number,
    readonly path: string,
    readonly readOnly: boolean,
    readonly isBlockDevice: boolean,
    length: number,
    readonly fileId: string,
  ) {
    this.length = length;
  }

  static async open(path: string, options: OpenOptions = {}): Promise<NodeFile> {
    // Non-blocking: opening a FIFO for reading would wait for a writer forever (see settleOpen).
    const fd = await ioPromise<number>((cb) => fs.open(path, openFlags(options) | fs.constants.O_NONBLOCK, 0o644, cb));
    const f = settleOpen(fd, path, options);
    return new NodeFile(f.fd, path, !!options.readOnly, f.isBlockDevice, f.size, f.fileId);
  }

  size(): number {
    return this.length;
  }

  async refreshSize(): Promise<number> {
    if (this.isBlockDevice) this.length = blockDeviceSize(this.fd, this.path);
    return this.length;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const n = await ioPromise<number>((cb) => fs.read(this.fd, buf, done, Math.min(buf.length - done, MAX_IO), offset + done, cb));
      if (n === 0) {
        buf.fill(0, done); // past end of file: zeros, like a sparse hole
        return;
      }
      done += n;
    }
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) throw new FvdError(`${this.path}: opened read-only`, 'EROFS');
    if (this.isBlockDevice && offset + buf.length > this.length)
      throw new FvdError(`${this.path}: write at ${offset}+${buf.length} beyond device end ${this.length}`, 'ENOSPC');
    let done = 0;
    while (done < buf.length) {
      done += await ioPromise<number>((cb) => fs.write(this.fd, buf, done, Math.min(buf.length - done, MAX_IO), offset + done, cb));
    }
    if (offset + buf.length > this.length) this.length = offset + buf.length;
  }

  flush(): Promise<void> {
    return ioPromise<void>((cb) => fs.fdatasync(this.fd, (err) => cb(err, undefined)));
  }

  async zeroRange(offset: number, length: number): Promise<void> {
    if (length <= 0) return;
    const c = libc();
    if (c && !this.isBlockDevice) {
      // Past the end there is nothing to punch: those bytes already read as zeros.
      const end = Math.min(offset + length, this.length);
      if (end <= offset || c.fallocate(this.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, end - offset) === 0) return;
    }
    if (c && this.isBlockDevice) {
      const range = new Uint8Array(16);
      const dv = new DataView(range.buffer);
      dv.setBigUint64(0, BigInt(offset), true);
      dv.setBigUint64(8, BigInt(length), true);
      if (c.ioctlPtr(this.fd, BLKZEROOUT, range) === 0) return;
    }
    zeroBuffer ??= new Uint8Array(ZERO_CHUNK);
    for (let pos = offset; pos < offset + length; pos += ZERO_CHUNK) {
      await this.write(zeroBuffer.subarray(0, Math.min(ZERO_CHUNK, offset + length - pos)), pos);
    }
  }

  nextData(offset: number): number | null {
    const c = libc();
    if (!c || this.isBlockDevice) return null;
    if (offset >= this.length) return this.length;
    const r = c.lseek(this.fd, offset, SEEK_DATA);
    if (r >= 0) return r;
    return c.errno() === ENXIO ? this.length : null; // ENXIO: no data at or past offset
  }

  nextHole(offset: number): number | null {
    const c = libc();
    if (!c || this.isBlockDevice) return null;
    if (offset >= this.length) return this.length;
    const r = c.lseek(this.fd, offset, SEEK_HOLE);
    if (r >= 0) return Math.min(r, this.length); // the end of the file counts as a hole
    return null; // ENXIO (offset past the end, the file shrank) or an error: cannot tell
  }

  async truncate(length: number): Promise<void> {
    if (this.isBlockDevice) throw new FvdError(`${this.path}: cannot resize a block device`, 'EINVAL');
    await ioPromise<void>((cb) => fs.ftruncate(this.fd, length, (err) => cb(err, undefined)));
    this.length = length;
  }

  close(): Promise<void> {
    return ioPromise<void>((cb) => fs.close(this.fd, (err) => cb(err, undefined)));
  }
}

/** open(2) flags for OpenOptions: `create` adds O_CREAT, never O_TRUNC (see OpenOptions.create). */
export function openFlags(options: OpenOptions): number {
  const c = fs.constants;
  return (options.readOnly ? c.O_RDONLY : c.O_RDWR) | (options.create ? c.O_CREAT : 0);
}

/**
 * Finishes opening `fd`, which the caller opened with openFlags(options) | O_NONBLOCK: refuses
 * anything but a regular file or a block device (a FIFO, socket or character device is never
 * waited on), reopens the same file without O_NONBLOCK, takes the lock, and only then reads the
 * size — a writer that held the lock may have grown the file until the moment it let go. Closes
 * the descriptor on failure. Shared with storage/uring-file.ts.
 */
export function settleOpen(fd: number, path: string, options: OpenOptions): { fd: number; isBlockDevice: boolean; size: number; fileId: string } {
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile() && !st.isBlockDevice()) throw new FvdError(`${path}: not a regular file or block device`, 'EINVAL');
    fd = withoutNonblock(fd, options);
    if (options.lock) takeLock(fd, path, options.lock);
    const isBlockDevice = st.isBlockDevice();
    const size = isBlockDevice ? blockDeviceSize(fd, path) : fs.fstatSync(fd).size;
    return { fd, isBlockDevice, size, fileId: `${st.dev}:${st.ino}` };
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/**
 * The same open file without O_NONBLOCK (io_uring would otherwise complete some requests with
 * EAGAIN on file systems without non-blocking support), through /proc/self/fd, which names the
 * file the descriptor holds, not a path that may have changed since. Without /proc: `fd` as is
 * (O_NONBLOCK has no effect on regular files and block devices for node:fs).
 */
function withoutNonblock(fd: number, options: OpenOptions): number {
  let again: number;
  try {
    again = fs.openSync(`/proc/self/fd/${fd}`, openFlags({ readOnly: options.readOnly }));
  } catch {
    return fd;
  }
  fs.closeSync(fd);
  return again;
}

/** "dev:ino" of the file at `path` (symbolic links followed), or null if it cannot be stat'ed. */
export async function fileIdentity(path: string): Promise<string | null> {
  try {
    const st = await fs.promises.stat(path);
    return `${st.dev}:${st.ino}`;
  } catch {
    return null;
  }
}

/** A block device's capacity in bytes (BLKGETSIZE64); shared with storage/uring-file.ts. */
export function blockDeviceSize(fd: number, path: string): number {
  const c = libc();
  if (!c) throw new FvdError(`${path}: block devices need koffi (libc) to read their size`, 'EINVAL');
  const out = new Uint8Array(8);
  if (c.ioctlPtr(fd, BLKGETSIZE64, out) !== 0) throw new FvdError(`${path}: cannot read the device size (errno ${c.errno()})`, 'EIO');
  return Number(new DataView(out.buffer).getBigUint64(0, true));
}

/** flock for OpenOptions.lock: EBUSY "in use" when another open file holds it. */
export function takeLock(fd: number, path: string, mode: 'exclusive' | 'shared'): void {
  const c = libc();
  if (!c) return; // without libc we cannot lock; the daemon refuses to run without koffi anyway
  if (c.flock(fd, (mode === 'exclusive' ? LOCK_EX : LOCK_SH) | LOCK_NB) === 0) return;
  const errno = c.errno();
  if (errno === EWOULDBLOCK) throw new FvdError(`${path}: image is in use by another process (locked)`, 'EBUSY');
  throw new FvdError(`${path}: cannot lock (errno ${errno})`, 'EIO');
}

export const nodeIo: IoBackend = {
  open: (path, options) => NodeFile.open(path, options),
  identify: fileIdentity,
  syncDirectoryOf: (p) => syncDirectoryOf(p),
};

/** fsync of the directory holding `p` (a directory opened read-only can be fsync'ed on Linux). */
export async function syncDirectoryOf(p: string): Promise<void> {
  const fd = await ioPromise<number>((cb) => fs.open(nodePath.dirname(nodePath.resolve(p)), 'r', cb));
  try {
    await ioPromise<void>((cb) => fs.fsync(fd, (err) => cb(err, undefined)));
  } finally {
    fs.closeSync(fd);
  }
}
