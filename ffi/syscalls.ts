/**
 * Raw libc bindings for io_uring (ffi/uring.ts) and sd_notify (ffi/sd-notify.ts), bound with koffi.
 *
 * Kept apart from ffi/libc.ts (the file helpers of storage/node-file.ts) so that opening files
 * never pulls in socket or mmap bindings. Loaded lazily; `syscalls()` returns null where koffi
 * cannot load.
 *
 * Calling convention: every binding returns what libc returns (-1 on failure); read `errno()`
 * immediately after, before any other koffi call, to get the cause.
 */
import { loadLibc } from './koffi.js';

export const SYS_io_uring_setup = 425;
export const SYS_io_uring_enter = 426;
export const SYS_io_uring_register = 427;

export const PROT_READ = 0x1;
export const PROT_WRITE = 0x2;
export const MAP_SHARED = 0x01;
export const MAP_PRIVATE = 0x02;
export const MAP_ANONYMOUS = 0x20;
export const MAP_POPULATE = 0x8000;
/** madvise(2) advice: drop the pages (private anonymous memory then reads as zeros, faulted in anew). */
export const MADV_DONTNEED = 4;
/** madvise(2) advice: no transparent huge pages in this range (4 KiB-granular residency). */
export const MADV_NOHUGEPAGE = 15;

/** prctl(2) options (linux/prctl.h, Linux 5.6): mark the calling thread as one that cleans memory. */
export const PR_SET_IO_FLUSHER = 57;
export const PR_GET_IO_FLUSHER = 58;

export const AF_UNIX = 1;
export const SOCK_DGRAM = 2;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;

export interface Syscalls {
  /**
   * syscall(2) with a fixed arity: a fixed-arity alias of the variadic function is ABI-compatible on
   * x86-64 and arm64 and lets koffi skip variadic marshalling. Pointer arguments are plain numbers
   * (user-space addresses are < 2^47, exact in a double).
   */
  syscall6(nr: number, a1: number, a2: number, a3: number, a4: number, a5: number, a6: number): number;
  /** Returns the mapping's address, or MAP_FAILED (see isMapFailed). */
  mmap(length: number, prot: number, flags: number, fd: number, offset: number): bigint;
  munmap(addr: bigint, length: number): number;
  /** madvise(2) of [addr, addr + length) (page-aligned); 0 or -1. */
  madvise(addr: number, length: number, advice: number): number;
  socket(domain: number, type: number, protocol: number): number;
  bind(fd: number, addr: Uint8Array, addrlen: number): number;
  sendto(fd: number, buf: Uint8Array, len: number, flags: number, addr: Uint8Array, addrlen: number): number;
  recv(fd: number, buf: Uint8Array, len: number, flags: number): number;
  close(fd: number): number;
  /** prctl(2) with a fixed arity (the variadic libc function, aliased as syscall6 is). */
  prctl(option: number, a2: number, a3: number, a4: number, a5: number): number;
  /** The calling thread's id (what /proc/PID/task/ lists). */
  gettid(): number;
  errno(): number;
  /** koffi itself, for view()/address() in the modules built on these bindings. */
  koffi: KoffiSubset;
}

/** The part of koffi's API this project uses (koffi 3.x: pointers are BigInt). */
export interface KoffiSubset {
  view(ptr: bigint, length: number): ArrayBuffer;
  address(value: ArrayBufferView | ArrayBuffer): bigint;
  errno(): number;
  load(path: string): { func(decl: string): (...args: unknown[]) => unknown };
}

/** MAP_FAILED is (void *)-1; koffi may hand it back as 2^64-1 or as -1. */
export function isMapFailed(ptr: bigint | null): boolean {
  return ptr === null || ptr === 0n || ptr === -1n || ptr === 0xffff_ffff_ffff_ffffn;
}

let cached: Syscalls | null | undefined;

export function syscalls(): Syscalls | null {
  if (cached !== undefined) return cached;
  const loaded = loadLibc();
  if (!loaded) return (cached = null);
  const koffi = loaded.koffi as KoffiSubset;
  const lib = loaded.libc;
  try {
    const syscall = lib.func('long syscall(long nr, long a1, long a2, long a3, long a4, long a5, long a6)');
    const mmap = lib.func('void *mmap(void *addr, size_t len, int prot, int flags, int fd, int64_t off)');
    const munmap = lib.func('int munmap(void *addr, size_t len)');
    // The address as an integer: callers hold addresses as numbers (exact below 2^53).
    const madvise = lib.func('int madvise(uintptr_t addr, size_t len, int advice)');
    const socket = lib.func('int socket(int domain, int type, int protocol)');
    const bind = lib.func('int bind(int fd, const uint8_t *addr, uint32_t addrlen)');
    const sendto = lib.func(
      'intptr_t sendto(int fd, const uint8_t *buf, size_t len, int flags, const uint8_t *addr, uint32_t addrlen)',
    );
    const recv = lib.func('intptr_t recv(int fd, _Out_ uint8_t *buf, size_t len, int flags)');
    const close = lib.func('int close(int fd)');
    const prctl = lib.func('int prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)');
    const gettid = lib.func('int gettid(void)');
    cached = {
      syscall6: syscall as Syscalls['syscall6'],
      mmap: (len, prot, flags, fd, off) => mmap(null, len, prot, flags, fd, off) as bigint,
      munmap: (addr, len) => munmap(addr, len) as number,
      madvise: (addr, len, advice) => madvise(addr, len, advice) as number,
      socket: (d, t, p) => socket(d, t, p) as number,
      bind: (fd, addr, len) => bind(fd, addr, len) as number,
      sendto: (fd, buf, len, flags, addr, alen) => Number(sendto(fd, buf, len, flags, addr, alen)),
      recv: (fd, buf, len, flags) => Number(recv(fd, buf, len, flags)),
      close: (fd) => close(fd) as number,
      prctl: (o, a2, a3, a4, a5) => prctl(o, a2, a3, a4, a5) as number,
      gettid: () => gettid() as number,
      errno: () => koffi.errno(),
      koffi,
    };
  } catch {
    cached = null;
  }
  return cached;
}

/**
 * PR_SET_IO_FLUSHER on the calling thread (only that thread: it sets the task's PF_MEMALLOC_NOIO
 * and PF_LOCAL_THROTTLE): its allocations never wait on I/O, so memory reclaim cannot block the
 * thread that the I/O it would wait for needs. Needs CAP_SYS_RESOURCE. Returns the flag as the
 * kernel reads it back for this thread afterwards (PR_GET_IO_FLUSHER): 1 when set, else -errno of
 * whichever call failed.
 */
export function setIoFlusher(sys: Syscalls): number {
  if (sys.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) < 0) return -sys.errno();
  return ioFlusher(sys);
}

/** PR_GET_IO_FLUSHER of the calling thread: 1, 0, or -errno (EPERM without CAP_SYS_RESOURCE). */
export function ioFlusher(sys: Syscalls): number {
  const r = sys.prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0);
  return r < 0 ? -sys.errno() : r;
}
