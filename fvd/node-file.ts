/**
 * BlockFile over node:fs (libuv thread pool), for the CLI and tests. Hole punching, device sizes
 * and locks come from libc through koffi (ffi/libc.ts); without it, zeroRange writes zeros.
 */
import fs from 'node:fs';
import nodePath from 'node:path';
import type { BlockFile, IoBackend, OpenOptions } from './io.js';
import { FvdError } from './errors.js';
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
  ) {
    this.length = length;
  }

  static async open(path: string, options: OpenOptions = {}): Promise<NodeFile> {
    const flags = options.create ? 'w+' : options.readOnly ? 'r' : 'r+';
    const fd = await ioPromise<number>((cb) => fs.open(path, flags, 0o644, cb));
    try {
      const st = fs.fstatSync(fd);
      if (!st.isFile() && !st.isBlockDevice()) throw new FvdError(`${path}: not a regular file or block device`, 'EINVAL');
      let size = st.size;
      if (st.isBlockDevice()) size = blockDeviceSize(fd, path);
      if (options.lock) takeLock(fd, path, options.lock);
      return new NodeFile(fd, path, !!options.readOnly, st.isBlockDevice(), size);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  size(): number {
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

  async truncate(length: number): Promise<void> {
    if (this.isBlockDevice) throw new FvdError(`${this.path}: cannot resize a block device`, 'EINVAL');
    await ioPromise<void>((cb) => fs.ftruncate(this.fd, length, (err) => cb(err, undefined)));
    this.length = length;
  }

  close(): Promise<void> {
    return ioPromise<void>((cb) => fs.close(this.fd, (err) => cb(err, undefined)));
  }
}

/** A block device's capacity in bytes (BLKGETSIZE64); shared with the daemon's io_uring files. */
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
