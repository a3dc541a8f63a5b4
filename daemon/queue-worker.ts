/**
 * One ublk hardware queue, served by one worker thread (the kernel's 6.12 rule: every command of a
 * queue comes from the task that fetched its tags, so this thread blocks in io_uring_enter itself
 * and never hands the ring to another thread).
 *
 * One ring carries everything: FETCH/COMMIT_AND_FETCH commands on /dev/ublkcN (fixed file 0), the
 * image reads and writes of the fast path (fixed file 1), and a read of an eventfd through which
 * the main thread says it finished requests it took over. A batch of commits and file I/O costs
 * one io_uring_enter. Per request: no allocation, no promise, no closure.
 *
 * Fast path: the request touches only data already local (and, for a write, whose bitmap bits are
 * journaled) — the worker maps it through the shared bitmap/table and does the I/O itself.
 * Everything else (copy-on-write, copy-on-read, allocation, flush, discard, FUA) goes to the
 * engine on the main thread, which works directly in this queue's pinned request buffers.
 *
 * Encrypted images (FORMAT.md §11) take the same fast path: the worker encrypts a write's buffer in
 * place before writing it and decrypts a read's buffer in place before committing it, with its own
 * cipher (daemon/fast-crypt.ts), so encryption runs on the queue threads, not the main thread.
 */
import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
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
} from '../ffi/uring.js';
import { syscalls, isMapFailed, setIoFlusher, MAP_POPULATE, MAP_SHARED, PROT_READ } from '../ffi/syscalls.js';
import {
  IO_DESC_SIZE,
  UBLK_IO_F_FUA,
  UBLK_IO_OP_DISCARD,
  UBLK_IO_OP_FLUSH,
  UBLK_IO_OP_READ,
  UBLK_IO_OP_WRITE,
  UBLK_IO_OP_WRITE_ZEROES,
  UBLK_IO_RES_ABORT,
  UBLK_IO_RES_OK,
  UBLK_QUEUE_DESC_STRIDE,
  UBLK_U_IO_COMMIT_AND_FETCH_REQ,
  UBLK_U_IO_FETCH_REQ,
  encodeIoCmd,
} from './ublk/abi.js';
import { DIRECT_WOULD_BLOCK, DirectIo, chooseDirectMode } from './direct-io.js';
import { CompletionRing, mapDirect, type EngineView } from './shared-state.js';
import { ACTIVITY_OTHER, ACTIVITY_READ, ACTIVITY_WRITE, QueueActivityWriter } from './queue-activity.js';
import { FastCrypt } from './fast-crypt.js';
import { requestErrnoOf } from './request-errors.js';

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
  /** /dev/ublkcN, opened once by the main thread: the driver allows a single open. */
  cdevFd: number;
  /** Request count and latency totals for the prefetcher (daemon/queue-activity.ts). */
  activity: SharedArrayBuffer;
  /**
   * Encrypted image: its 64-byte master key, for this worker's own cipher, in shared memory (a
   * structured clone would leave a copy in the message buffer, freed without being wiped); this
   * thread zeroes it as soon as its cipher holds the key. Null otherwise. Never logged or sent back.
   */
  key: SharedArrayBuffer | null;
}

/** Messages to the main thread. */
export type WorkerMessage =
  /** ioFlusher: PR_GET_IO_FLUSHER of this thread after setting it (1), or -errno (ffi/syscalls.ts). */
  | { type: 'fetched'; qid: number; bufAddress: number; bufLength: number; tid: number; ioFlusher: number }
  | { type: 'slow'; qid: number; tag: number; op: number; flags: number; offset: number; length: number }
  | { type: 'log'; qid: number; message: string }
  | { type: 'info'; qid: number; message: string }
  | { type: 'stats'; qid: number; fast: number; slow: number }
  | { type: 'exit'; qid: number; error?: string };

const UD_FILE = 0x10000; // + tag: a fast-path image read or write
const UD_EVENTFD = 0x20000;
const EIO = 5;
const EOPNOTSUPP = 95;
const PAGE = 4096;
// Polls of the ring's flags before blocking in io_uring_enter (FVD_SPIN=0 disables): about
// 0.1 ms. Measured in the guest, side by side: 4K random I/O +5..55%, 128K +0..35% (noisy).
const SPIN = Number(process.env.FVD_SPIN ?? 5000);

function run(d: QueueWorkerData): void {
  const sys = syscalls();
  if (!sys) throw new Error('koffi is not available');
  const { qid, depth, maxIo, view } = d;
  // Reclaim must not wait for I/O that only this thread can complete: the kernel's writeback of
  // this very device (ublksrv does the same). Per thread, so set here, before the first fetch.
  const ioFlusher = setIoFlusher(sys);
  const done = new CompletionRing(d.completions);
  const control = new Int32Array(d.control);
  const activity = new QueueActivityWriter(d.activity, depth);

  const cdevFd = d.cdevFd;
  const imageFd = fs.openSync(d.imagePath, 'r+');
  const descLen = Math.ceil((depth * IO_DESC_SIZE) / PAGE) * PAGE;
  const descPtr = sys.mmap(descLen, PROT_READ, MAP_SHARED | MAP_POPULATE, cdevFd, qid * UBLK_QUEUE_DESC_STRIDE);
  if (isMapFailed(descPtr)) throw new Error(`mmap of /dev/ublkc${d.devId} queue ${qid} descriptors failed: ${errnoName(sys.errno())}`);
  const desc = new DataView(sys.koffi.view(descPtr, descLen));

  let entries = 16;
  while (entries < depth + 8) entries *= 2;
  // This thread is the ring's only submitter and always waits inside io_uring_enter(GETEVENTS),
  // so completions can be deferred to that wait instead of interrupting the thread.
  // (Linking each file op to its COMMIT_AND_FETCH was tried and was 4x slower on 6.12.)
  const ring = new IoUring({
    entries,
    cqEntries: entries * 2,
    flags: IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
  });
  let bufs: PinnedBuffer | null = null;
  let direct: DirectIo | null = null;
  let crypt: FastCrypt | null = null;
  const key = d.key ? new Uint8Array(d.key) : null;
  const efdBuf = allocPinned(PAGE);
  try {
    const reg = ring.registerFiles([cdevFd, imageFd]);
    if (reg < 0) throw new Error(`io_uring register files: ${errnoName(reg)}`);
    bufs = allocPinned(depth * maxIo);
    const bufBase = bufs.address;
    const sqe = ring.sqeView;

    // Per-tag state of an in-flight fast-path transfer, in preallocated typed arrays.
    const tagOp = new Int32Array(depth);
    const tagLen = new Float64Array(depth);
    const tagDone = new Float64Array(depth);
    const tagPhys = new Float64Array(depth);
    const tagOffset = new Float64Array(depth); // guest byte offset: the XTS tweak of an encrypted image
    if (view.encrypted) {
      if (!key) throw new Error('an encrypted image needs its key to be served');
      crypt = new FastCrypt(key, bufs.bytes, depth, maxIo);
    }
    key?.fill(0); // the cipher holds the key now
    // Fast-path transfers are tried synchronously first where that cannot block (direct-io.ts).
    const directMode = chooseDirectMode(sys, imageFd, d.imagePath);
    if (directMode !== 'ring') direct = new DirectIo(sys, imageFd, directMode);
    // Per-tag zero-fill callbacks for reads that meet the end of a compact image file, made once.
    const zeroFillFrom = Array.from({ length: depth }, (_, tag) => (from: number) => {
      bufs!.bytes.fill(0, tag * maxIo + from, tag * maxIo + tagLen[tag]!);
    });
    let aborted = 0;
    let fast = 0;
    let slow = 0;

    const uringCmd = (op: number, tag: number, result: number) => {
      const idx = ring.prepUringCmd(0, op, null, tag, IOSQE_FIXED_FILE);
      if (idx < 0) throw new Error(`queue ${qid}: submission queue full`);
      encodeIoCmd(sqe, ring.cmdOffset(idx), qid, tag, result, bufBase + tag * maxIo);
    };
    const commit = (tag: number, result: number) => {
      activity.end(tag, performance.now());
      uringCmd(UBLK_U_IO_COMMIT_AND_FETCH_REQ, tag, result);
    };
    const armEventfd = () => {
      if (ring.prepRead(d.eventfd, efdBuf.address, 8, 0, UD_EVENTFD) < 0) throw new Error(`queue ${qid}: submission queue full`);
    };
    const fileIo = (tag: number) => {
      const off = tagDone[tag]!;
      const addr = bufBase + tag * maxIo + off;
      const len = tagLen[tag]! - off;
      const idx =
        tagOp[tag] === UBLK_IO_OP_READ
          ? ring.prepRead(1, addr, len, tagPhys[tag]! + off, UD_FILE + tag, IOSQE_FIXED_FILE)
          : ring.prepWrite(1, addr, len, tagPhys[tag]! + off, UD_FILE + tag, IOSQE_FIXED_FILE);
      if (idx < 0) throw new Error(`queue ${qid}: submission queue full`);
    };
    /** A fast-path transfer finished: a read of an encrypted image is decrypted before the kernel sees it. */
    const finishFast = (tag: number) => {
      if (crypt !== null && tagOp[tag] === UBLK_IO_OP_READ) crypt.decryptRead(tag, tagOffset[tag]!, tagLen[tag]!);
      commit(tag, tagLen[tag]!);
    };
    const log = (message: string) => parentPort!.postMessage({ type: 'log', qid, message } satisfies WorkerMessage);
    if (qid === 0) parentPort!.postMessage({ type: 'info', qid, message: `fast path: ${directMode} transfers` } satisfies WorkerMessage);

    /** A new request arrived for `tag`: serve it here or hand it to the engine. */
    const onRequest = (tag: number) => {
      const at = tag * IO_DESC_SIZE;
      const opFlags = desc.getUint32(at, true);
      const op = opFlags & 0xff;
      const sectors = desc.getUint32(at + 4, true);
      activity.begin(tag, performance.now(), op === UBLK_IO_OP_READ ? ACTIVITY_READ : op === UBLK_IO_OP_WRITE ? ACTIVITY_WRITE : ACTIVITY_OTHER, sectors);
      const length = sectors * 512;
      const offset = (desc.getUint32(at + 8, true) + desc.getUint32(at + 12, true) * 0x100000000) * 512;
      if (op === UBLK_IO_OP_READ || op === UBLK_IO_OP_WRITE) {
        if (offset + length > view.size || length > maxIo) {
          log(`request beyond the device: op ${op} at ${offset}+${length} (size ${view.size})`);
          commit(tag, -EIO);
          return;
        }
        const write = op === UBLK_IO_OP_WRITE;
        const phys = write && opFlags & UBLK_IO_F_FUA ? -1 : mapDirect(view, offset, length, write);
        if (phys >= 0) {
          tagOp[tag] = op;
          tagLen[tag] = length;
          tagDone[tag] = 0;
          tagPhys[tag] = phys;
          tagOffset[tag] = offset;
          fast++;
          // Encrypted image: route first, then encrypt, then write — a write that went to the
          // engine above must reach it as plaintext (the engine encrypts), and once encrypted the
          // buffer is only ever written (the ring finishing a would-block transfer reuses it), so
          // it is encrypted exactly once. Reads are decrypted in finishFast, after the whole
          // transfer (sync, ring, or both) and before the commit.
          if (write && crypt !== null) crypt.encryptWrite(tag, offset, length);
          if (direct) {
            const r = direct.transfer(write, bufBase + tag * maxIo, length, phys, zeroFillFrom[tag]!);
            if (r === length) return finishFast(tag);
            if (r < DIRECT_WOULD_BLOCK) {
              log(`image ${write ? 'write' : 'read'} failed at ${phys}: ${errnoName(r)}`);
              return commit(tag, requestErrnoOf(r));
            }
            tagDone[tag] = direct.done; // the ring finishes what would have blocked
          }
          fileIo(tag);
          return;
        }
      } else if (op !== UBLK_IO_OP_FLUSH && op !== UBLK_IO_OP_DISCARD && op !== UBLK_IO_OP_WRITE_ZEROES) {
        commit(tag, -EOPNOTSUPP);
        return;
      }
      slow++;
      parentPort!.postMessage({ type: 'slow', qid, tag, op, flags: opFlags >>> 8, offset, length } satisfies WorkerMessage);
    };

    const onFileDone = (tag: number, res: number) => {
      if (res < 0) {
        log(`image ${tagOp[tag] === UBLK_IO_OP_READ ? 'read' : 'write'} failed at ${tagPhys[tag]}: ${errnoName(res)}`);
        commit(tag, requestErrnoOf(res));
        return;
      }
      if (res === 0 && tagOp[tag] === UBLK_IO_OP_READ) {
        // End of a compact image file inside a mapped chunk: the rest reads as zeros.
        bufs!.bytes.fill(0, tag * maxIo + tagDone[tag]!, tag * maxIo + tagLen[tag]!);
        tagDone[tag] = tagLen[tag]!;
      } else {
        tagDone[tag]! += res;
      }
      if (tagDone[tag]! < tagLen[tag]!) fileIo(tag); // short transfer: continue
      else finishFast(tag);
    };

    const onSlowDone = (tag: number, result: number) => commit(tag, result);

    const onCqe = (ud: number, res: number) => {
      if (ud < UD_FILE) {
        if (res === UBLK_IO_RES_OK) onRequest(ud);
        else if (res === UBLK_IO_RES_ABORT) aborted++;
        else {
          log(`ublk command for tag ${ud} failed: ${errnoName(res)}`);
          aborted++;
        }
      } else if (ud < UD_EVENTFD) {
        onFileDone(ud - UD_FILE, res);
      } else {
        done.drain(onSlowDone);
        if (Atomics.load(control, 0) === 0) armEventfd();
      }
    };

    for (let tag = 0; tag < depth; tag++) uringCmd(UBLK_U_IO_FETCH_REQ, tag, 0);
    armEventfd();
    const sub = ring.submit(0);
    if (sub < 0) throw new Error(`queue ${qid}: io_uring_enter: ${errnoName(sub)}`);
    parentPort!.postMessage({ type: 'fetched', qid, bufAddress: bufBase, bufLength: depth * maxIo, tid: sys.gettid(), ioFlusher } satisfies WorkerMessage);

    let lastStats = Date.now();
    while (aborted < depth && Atomics.load(control, 0) === 0) {
      if (SPIN > 0 && !ring.hasWork()) {
        // Hand over what is prepared without sleeping, then poll the ring's flags for a while:
        // a new request or completion usually comes within microseconds under load, and a
        // sleep/wake-up round trip costs more than the polling.
        if (ring.unsubmitted > 0) ring.submit(0);
        for (let s = 0; s < SPIN && !ring.hasWork(); s++);
      }
      const r = ring.submit(1);
      if (r < 0 && r !== -4 /* EINTR */ && r !== -11 /* EAGAIN */ && r !== -16 /* EBUSY */)
        throw new Error(`queue ${qid}: io_uring_enter: ${errnoName(r)}`);
      ring.reap(onCqe);
      const now = Date.now();
      if (now - lastStats > 1000) {
        lastStats = now;
        parentPort!.postMessage({ type: 'stats', qid, fast, slow } satisfies WorkerMessage);
      }
    }
    parentPort!.postMessage({ type: 'stats', qid, fast, slow } satisfies WorkerMessage);
  } finally {
    // Closing the ring cancels what is still pending; the descriptors and /dev/ublkcN must be
    // released before DEL_DEV can finish.
    ring.close();
    sys.munmap(descPtr, descLen);
    fs.closeSync(imageFd);
    bufs?.free();
    efdBuf.free();
    direct?.free();
    key?.fill(0);
    crypt?.destroy(); // the worker's copy of the key goes with the queue
  }
}

try {
  run(workerData as QueueWorkerData);
  parentPort!.postMessage({ type: 'exit', qid: (workerData as QueueWorkerData).qid } satisfies WorkerMessage);
} catch (err) {
  parentPort!.postMessage({ type: 'exit', qid: (workerData as QueueWorkerData).qid, error: (err as Error).message } satisfies WorkerMessage);
}
