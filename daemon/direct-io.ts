/**
 * Synchronous fast-path transfers for a queue worker: try the image read or write right here with
 * one preadv2/pwritev2 syscall, and fall back to the io_uring only when that would block.
 *
 * Why: a request served through the ring costs two ring round trips — the file op's completion,
 * then COMMIT_AND_FETCH — and on files whose driver cannot do non-blocking I/O (tmpfs, for one)
 * io_uring hands every op to an io-wq kernel thread. A page-cache hit copied synchronously lets
 * the commit ride in the same io_uring_enter as the next wait. This is the check io_uring itself
 * makes inline (IOCB_NOWAIT), moved to where it saves a round trip.
 *
 * Modes, chosen once per image file by `chooseDirectMode`:
 *   nowait  the file supports RWF_NOWAIT: try with it; -EAGAIN (not cached, would allocate, …)
 *           means "use the ring" for the rest of that request.
 *   memory  tmpfs/ramfs without RWF_NOWAIT (6.12's tmpfs has none; also an overlay whose upper
 *           layer is tmpfs): memory-backed, a plain pread/pwrite cannot wait for a device, so it
 *           is always done synchronously.
 *   ring    anything else: every transfer goes through the ring (never block the queue thread).
 * FVD_FAST_IO=ring|memory|nowait overrides the choice (benchmarks, tests).
 */
import fs from 'node:fs';
import { allocPinned, type PinnedBuffer } from '../ffi/uring.js';
import type { Syscalls } from '../ffi/syscalls.js';

const SYS_fstatfs = 138;
const SYS_preadv2 = 327;
const SYS_pwritev2 = 328;
const RWF_NOWAIT = 0x8;
const EAGAIN = 11;
const EINTR = 4;
const EOPNOTSUPP = 95;
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;
const OVERLAYFS_MAGIC = 0x794c7630;

export type DirectMode = 'nowait' | 'memory' | 'ring';

/** A transfer that must continue on the ring (the bytes done so far are in `DirectIo.done`). */
export const DIRECT_WOULD_BLOCK = -1;

export class DirectIo {
  mode: DirectMode;
  /** Bytes transferred by the last `transfer` call (valid for every outcome). */
  done = 0;
  private readonly iov: PinnedBuffer;
  private readonly iovWords: DataView;
  private readonly flags: number;

  constructor(
    private readonly sys: Syscalls,
    private readonly fd: number,
    mode: DirectMode,
  ) {
    this.mode = mode;
    this.flags = mode === 'nowait' ? RWF_NOWAIT : 0;
    this.iov = allocPinned(4096);
    this.iovWords = new DataView(this.iov.bytes.buffer, this.iov.bytes.byteOffset, 16);
  }

  /**
   * Reads (write = false) or writes `length` bytes between address `addr` and file offset `pos`.
   * Returns the byte count on success (a read that meets the end of the file zero-fills the rest
   * of the caller's buffer — see `zeroFill` — and still returns `length`), DIRECT_WOULD_BLOCK when
   * the ring must finish the job from `this.done`, or -errno on an I/O error.
   */
  transfer(write: boolean, addr: number, length: number, pos: number, zeroFill: (from: number) => void): number {
    let done = 0;
    if (this.mode === 'ring') {
      this.done = 0;
      return DIRECT_WOULD_BLOCK;
    }
    const nr = write ? SYS_pwritev2 : SYS_preadv2;
    while (done < length) {
      writeIovec(this.iovWords, addr + done, length - done);
      const r = this.sys.syscall6(nr, this.fd, this.iov.address, 1, pos + done, 0, this.flags);
      if (r > 0) {
        done += r;
        continue;
      }
      if (r === 0) {
        if (write) break; // cannot happen for a regular file; let the ring report what it sees
        zeroFill(done);
        done = length;
        break;
      }
      const errno = this.sys.errno();
      if (errno === EINTR) continue;
      this.done = done;
      if (errno === EAGAIN) return DIRECT_WOULD_BLOCK;
      if (errno === EOPNOTSUPP) {
        this.mode = 'ring'; // the probe was optimistic (e.g. reads can wait, writes cannot): stop trying
        return DIRECT_WOULD_BLOCK;
      }
      return -errno;
    }
    this.done = done;
    return done === length ? length : DIRECT_WOULD_BLOCK;
  }

  free(): void {
    this.iov.free();
  }
}

/** One struct iovec { u64 base; u64 len } at the start of `view` (values below 2^53). */
function writeIovec(view: DataView, addr: number, length: number): void {
  view.setUint32(0, addr % 0x100000000, true);
  view.setUint32(4, Math.floor(addr / 0x100000000), true);
  view.setUint32(8, length % 0x100000000, true);
  view.setUint32(12, Math.floor(length / 0x100000000), true);
}

/**
 * Picks the fast-path transfer mode for an open image file (see the module comment). `imagePath`
 * lets an overlayfs file be judged by its upper layer, where an opened-for-write file lives.
 */
export function chooseDirectMode(sys: Syscalls, fd: number, imagePath: string, override = process.env.FVD_FAST_IO): DirectMode {
  if (override === 'ring' || override === 'memory' || override === 'nowait') return override;
  const probe = allocPinned(4096);
  try {
    // A one-byte RWF_NOWAIT read at offset 0: the kernel checks the flag against the file
    // (EOPNOTSUPP) before reading. (A zero-length read returns 0 before that check.)
    writeIovec(new DataView(probe.bytes.buffer, probe.bytes.byteOffset, 16), probe.address + 64, 1);
    const r = sys.syscall6(SYS_preadv2, fd, probe.address, 1, 0, 0, RWF_NOWAIT);
    if (r >= 0 || sys.errno() === EAGAIN) return 'nowait';
    if (sys.syscall6(SYS_fstatfs, fd, probe.address + 256, 0, 0, 0, 0) !== 0) return 'ring';
    let fsType = probe.bytes.readUInt32LE(256);
    if (fsType === OVERLAYFS_MAGIC) fsType = overlayUpperType(imagePath) ?? fsType;
    return fsType === TMPFS_MAGIC || fsType === RAMFS_MAGIC ? 'memory' : 'ring';
  } finally {
    probe.free();
  }
}

/** The file system type of the upper layer of the overlay mount holding `file`, if readable. */
export function overlayUpperType(file: string, mountinfo = '/proc/self/mountinfo'): number | null {
  try {
    const real = fs.realpathSync(file);
    let best: { point: string; upper: string } | null = null;
    for (const line of fs.readFileSync(mountinfo, 'utf8').split('\n')) {
      // id parent major:minor root mount-point options [optional...] - fstype source super-options
      const [left, right] = line.split(' - ');
      if (!left || !right) continue;
      const point = unescapeMount(left.split(' ')[4] ?? '');
      const [fsType, , superOptions] = right.split(' ');
      if (fsType !== 'overlay' || !superOptions) continue;
      if (!(real === point || real.startsWith(point === '/' ? '/' : point + '/'))) continue;
      const upper = /(?:^|,)upperdir=([^,]+)/.exec(superOptions)?.[1];
      if (upper && (!best || point.length > best.point.length)) best = { point, upper: unescapeMount(upper) };
    }
    return best ? fs.statfsSync(best.upper).type : null;
  } catch {
    return null;
  }
}

/** mountinfo escapes space, tab, newline and backslash as \ooo octal. */
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}
