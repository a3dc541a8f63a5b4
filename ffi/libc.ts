/**
 * The few libc calls node:fs lacks, bound with koffi (about 0.3 µs a call).
 * Loaded lazily: code paths that never need them (most of the engine) work where koffi is absent.
 */
import { loadLibc } from './koffi.js';

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const SEEK_END = 2;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;
export const LOCK_SH = 1;
export const LOCK_EX = 2;
export const LOCK_NB = 4;
export const LOCK_UN = 8;
/** _IOR(0x12, 114, size_t): a block device's size in bytes. */
export const BLKGETSIZE64 = 0x80081272;
/** _IO(0x12, 119): discard a byte range of a block device (range = u64[2]). */
export const BLKDISCARD = 0x1277;
/** _IO(0x12, 127): zero-out a byte range of a block device. */
export const BLKZEROOUT = 0x127f;
/** prctl options: a process's "dumpable" flag (core dumps, ptrace, /proc/PID/mem by its user). */
export const PR_GET_DUMPABLE = 3;
export const PR_SET_DUMPABLE = 4;

export interface Libc {
  fallocate(fd: number, mode: number, offset: number, length: number): number;
  lseek(fd: number, offset: number, whence: number): number;
  flock(fd: number, operation: number): number;
  ioctlPtr(fd: number, request: number, arg: Uint8Array): number;
  eventfd(initval: number, flags: number): number;
  /** prctl(2) with one argument (the others 0). */
  prctl(option: number, arg2: number): number;
  errno(): number;
}

export const EFD_CLOEXEC = 0o2000000;

let cached: Libc | null | undefined;

/** libc bindings, or null where koffi cannot be loaded (callers fall back to slower paths). */
export function libc(): Libc | null {
  if (cached !== undefined) return cached;
  const loaded = loadLibc();
  if (!loaded) return (cached = null);
  const { koffi, libc: lib } = loaded;
  try {
    const fallocate = lib.func('int fallocate(int fd, int mode, int64_t off, int64_t len)');
    const lseek = lib.func('int64_t lseek(int fd, int64_t off, int whence)');
    const flock = lib.func('int flock(int fd, int op)');
    const ioctl = lib.func('int ioctl(int fd, unsigned long req, _Inout_ uint8_t *arg)');
    const eventfd = lib.func('int eventfd(unsigned int initval, int flags)');
    const prctl = lib.func('int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)');
    cached = {
      fallocate: (fd, mode, off, len) => fallocate(fd, mode, off, len),
      lseek: (fd, off, whence) => Number(lseek(fd, off, whence)),
      flock: (fd, op) => flock(fd, op),
      ioctlPtr: (fd, req, arg) => ioctl(fd, req, arg),
      eventfd: (init, flags) => eventfd(init, flags),
      prctl: (option, arg2) => prctl(option, arg2, 0, 0, 0),
      errno: () => koffi.errno(),
    };
  } catch {
    cached = null;
  }
  return cached;
}
