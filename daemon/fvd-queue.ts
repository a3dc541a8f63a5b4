/**
 * The FVD target of a ublk queue (the ops daemon/ublk/queue-loop.ts calls): decides per request
 * whether this worker thread serves it or the engine on the main thread does, and does the
 * fast path's I/O, crypto and figures.
 *
 * Fast path: the request touches only data already local (and, for a write, whose bitmap bits are
 * journaled) — the worker maps it through the shared bitmap/table (daemon/shared-state.ts,
 * fvd/mapping.ts directRoute) and reads or writes the image itself: synchronously first where
 * that cannot block (daemon/direct-io.ts), else on the queue's ring (fixed file 1). A read that
 * reads as zeros as a whole (unmapped chunks, bytes past the base's end) is answered with zeros
 * without any I/O. A read of bytes still only in the base, when the base is a plain local raw file,
 * is read from the base file here too (fixed file 2, opened read-only), and the blocks are hinted
 * to the engine for copy-on-read in background (daemon/cor-hints.ts) without waiting for it.
 * A write of whole blocks still only in such a base is stored here (and, with FVD_QUEUE_COW=all,
 * a partial block's copy-on-write: daemon/queue-cow.ts) and answered here too, its bits set here,
 * its record queued by the engine later (with a pending log, after it went to this queue's own
 * log). Everything else (other copy-on-writes, other bases, allocation, flush, discard, FUA)
 * goes to the engine as a 'slow' message; the
 * engine works directly in this queue's pinned request buffers and hands the result back through
 * the completion ring and the queue's eventfd (handleEvent).
 *
 * Encrypted images (FORMAT.md §11) take the same fast path: the worker encrypts a write's buffer in
 * place before writing it and decrypts a read's buffer in place before committing it, with its own
 * cipher (daemon/fast-crypt.ts), so encryption runs on the queue threads, not the main thread.
 *
 * Zero copy (QueueWorkerData.zeroCopy, a device added with AUTO_BUF_REG and USER_COPY): the kernel
 * copies nothing into the tag buffers. A fast-path transfer of local blocks reads or writes the
 * image straight from the request's own pages (READ_FIXED/WRITE_FIXED on the ring, the pages in
 * the fixed-buffer slot the kernel filled); every other request that carries data still works in
 * the tag's buffer, which the queue loop fills from the request (a WRITE, before anything else)
 * or copies into it (a READ, just before its commit) with user copy (daemon/ublk/queue-loop.ts).
 * Never for encrypted images: their queue threads encrypt and decrypt in the tag buffers.
 *
 * Per request: no allocation, no promise, no closure (the ops are methods; per-tag state lives in
 * typed arrays made at start). Only failures and engine hand-overs post a message.
 */
import fs from 'node:fs';
import { errnoName } from '../ffi/uring.js';
import type { Syscalls } from '../ffi/syscalls.js';
import { IOSQE_FIXED_FILE } from '../ffi/uring.js';
import {
  UBLK_IO_F_FUA,
  UBLK_IO_OP_DISCARD,
  UBLK_IO_OP_FLUSH,
  UBLK_IO_OP_READ,
  UBLK_IO_OP_WRITE,
  UBLK_IO_OP_WRITE_ZEROES,
} from './ublk/abi.js';
import { QueueLoop, type IoDescriptor, type QueueTarget } from './ublk/queue-loop.js';
import { UD_KIND_TARGET_IO, encodeUserData } from './ublk/user-data.js';
import { DIRECT_WOULD_BLOCK, DirectIo, chooseDirectMode, type DirectMode } from './direct-io.js';
import { CompletionRing, StoredRing, type EngineView } from './shared-state.js';
import type { QueueWorkerData, WorkerMessage } from './queue-protocol.js';
import { BASE, STORED, ZERO, directRoute, newRun } from '../fvd/mapping.js';
import { CorHintProducer, NO_SLOT, type CorHintShared } from './cor-hints.js';
import { CorGate } from './cor-gate.js';
import { ACTIVITY_OTHER, ACTIVITY_READ, ACTIVITY_WRITE, QueueActivityWriter } from './queue-activity.js';
import { FastCrypt } from './fast-crypt.js';
import { COW_DECLINED, QueueCow } from './queue-cow.js';
import { QueueLogWriter } from '../fvd/pending-log.js';
import { requestErrnoOf } from './request-errors.js';
import { QueueTrace, ROUTE_BASE, ROUTE_ENGINE, ROUTE_STORED, ROUTE_ZERO, STAGE_BASE_START, STAGE_POSTED, type TraceShared } from '../fvd/trace.js';

/**
 * Zero copy: local-block transfers of at least this many bytes use the request's own pages; smaller
 * ones are copied through the tag's buffer like every other request. A zero-copy transfer always
 * takes a ring round trip, where the copy path answers a page-cache hit with one synchronous
 * syscall: measured on a zero-copy device, 4K random writes ran at half the copy path's rate and
 * 128K writes at 1.14× (README "Device", the zero copy item). FVD_ZERO_COPY_MIN=0: every
 * local-block transfer zero copy (as before this threshold).
 */
const ZERO_COPY_MIN = zeroCopyMin(process.env.FVD_ZERO_COPY_MIN);

function zeroCopyMin(env: string | undefined): number {
  const n = env === undefined || env === '' ? NaN : Number(env);
  return Number.isInteger(n) && n >= 0 ? n : 65536;
}

const EIO = 5;
const EOPNOTSUPP = 95;
/** Reads from the base are hinted for copy-on-read only while the guest keeps the queue at most this busy (QueueLoop.load)… */
export const COR_MAX_LOAD = 2;
/** …and has not kept it busier for this long (ms): daemon/cor-gate.ts. */
export const COR_QUIET_MS = 100;

export class FvdQueue implements QueueTarget {
  readonly loop: QueueLoop;
  /** How fast-path transfers are done first (direct-io.ts); 'ring' = always on the ring. */
  readonly directMode: DirectMode;
  private readonly qid: number;
  private readonly maxIo: number;
  private readonly view: EngineView;
  private readonly post: (m: WorkerMessage) => void;
  private readonly imageFd: number;
  /** The image's fixed-file index in the loop's ring. */
  private readonly imageFile: number;
  private readonly direct: DirectIo | null;
  /** The base file (read-only), its fixed-file index and sync transfers; -1 / null without one. */
  private readonly baseFd: number;
  private readonly baseFile: number;
  private readonly baseDirect: DirectIo | null;
  private readonly hints: CorHintProducer | null;
  /**
   * The copy-on-read data-slot pool (cor-hints.ts), this thread's view of the main thread's
   * mapping, or null: hints carry no data.
   */
  private readonly pool: Buffer | null;
  /** Where readBaseBlock is reading to (for its end-of-file zero fill, made once). */
  private blockMem: Uint8Array;
  private blockAt = 0;
  private readonly zeroBlockFrom: (from: number) => void;
  /** The one 'hint' message, reused. */
  private readonly hintMessage: WorkerMessage;
  private readonly storedMessage: WorkerMessage;
  /** Writes stored here, handed to the engine (null: this thread stores none). */
  private readonly stored: StoredRing | null;
  private readonly crypt: FastCrypt | null;
  /** Copy-on-write of base blocks on this thread, or null (docs/DESIGN.md §2.5). */
  private readonly cow: QueueCow | null;
  /** QueueWorkerData.cowAnswers. */
  private readonly cowAnswers: boolean;
  /** This queue's log of the writes it answers (QueueWorkerData.queueLogFd), or null. */
  private readonly queueLog: QueueLogWriter | null;
  private readonly engineDone: CompletionRing;
  private readonly activity: QueueActivityWriter;
  private readonly bufBase: number;
  private readonly bytes: Uint8Array;
  // Per-tag state of an in-flight fast-path transfer, in preallocated typed arrays.
  private readonly tagOp: Int32Array;
  private readonly tagLen: Float64Array;
  private readonly tagDone: Float64Array;
  private readonly tagPhys: Float64Array;
  /** The fixed file a fast-path transfer uses (the image or the base). */
  private readonly tagFile: Int32Array;
  /** The request's length, committed once the transfer (tagLen bytes, maybe fewer) is done. */
  private readonly tagResult: Float64Array;
  /** Guest byte offset: the XTS tweak of an encrypted image. */
  private readonly tagOffset: Float64Array;
  /** Zero copy: 1 while tag's transfer uses the request's own pages (fixed buffer), not the tag buffer. */
  private readonly tagFixed: Uint8Array;
  /** Zero copy: 1 for a READ answered in the tag's buffer, copied into the request at its commit. */
  private readonly tagCopyOut: Uint8Array;
  private readonly zeroCopy: boolean;
  private readonly batchIo: boolean;
  /** Per-tag zero-fill callbacks for reads that meet the end of a compact image file, made once. */
  private readonly zeroFillFrom: ((from: number) => void)[];
  /** directRoute's result, reused for every request. */
  private readonly route = newRun();
  /** Per-request trace (FVD_TRACE), or null; every trace point is one test of this field. */
  private readonly trace: QueueTrace | null;
  private fast = 0;
  private slow = 0;
  /** Base reads not hinted for copy-on-read because the queue was busy (COR_MAX_LOAD). */
  private corBusy = 0;
  private readonly corGate = new CorGate(COR_MAX_LOAD, COR_QUIET_MS);

  /** Opens the image and the queue (its ring, buffers, descriptors) and the cipher; undone on failure. */
  constructor(d: QueueWorkerData, sys: Syscalls, post: (m: WorkerMessage) => void, spin: number) {
    const { qid, depth, maxIo, view } = d;
    this.qid = qid;
    this.maxIo = maxIo;
    this.view = view;
    this.post = post;
    const key = d.key ? new Uint8Array(d.key) : null;
    let imageFd = -1;
    let baseFd = -1;
    let baseDirect: DirectIo | null = null;
    let loop: QueueLoop | null = null;
    let crypt: FastCrypt | null = null;
    let direct: DirectIo | null = null;
    let directMode: DirectMode;
    try {
      imageFd = fs.openSync(d.imagePath, 'r+');
      // Never written: read-only, so no request can change the base under the image.
      if (d.basePath !== null && !view.encrypted) baseFd = fs.openSync(d.basePath, 'r');
      loop = new QueueLoop({
        sys,
        devId: d.devId,
        qid,
        depth,
        maxIo,
        cdevFd: d.cdevFd,
        targetFiles: baseFd >= 0 ? [imageFd, baseFd] : [imageFd],
        eventfd: d.eventfd,
        control: new Int32Array(d.control),
        spin,
        zeroCopy: d.zeroCopy,
        batchIo: d.batchIo,
        log: (message) => this.log(message),
      });
      if (d.zeroCopy && view.encrypted) throw new Error('zero copy cannot serve an encrypted image (its queue threads encrypt in their own buffers)');
      if (view.encrypted) {
        if (!key) throw new Error('an encrypted image needs its key to be served');
        crypt = new FastCrypt(key, loop.buffers.bytes, depth, maxIo);
      }
      key?.fill(0); // the cipher holds the key now
      directMode = chooseDirectMode(sys, imageFd, d.imagePath);
      if (directMode !== 'ring') direct = new DirectIo(sys, imageFd, directMode);
      if (baseFd >= 0) {
        const baseMode = chooseDirectMode(sys, baseFd, d.basePath!);
        if (baseMode !== 'ring') baseDirect = new DirectIo(sys, baseFd, baseMode);
      }
    } catch (err) {
      key?.fill(0);
      crypt?.destroy();
      loop?.close();
      direct?.free();
      baseDirect?.free();
      if (imageFd >= 0) fs.closeSync(imageFd);
      if (baseFd >= 0) fs.closeSync(baseFd);
      throw err;
    }
    this.loop = loop;
    this.imageFd = imageFd;
    this.imageFile = loop.targetFile(0);
    this.baseFd = baseFd;
    this.baseFile = baseFd >= 0 ? loop.targetFile(1) : -1;
    this.baseDirect = baseDirect;
    this.hints = baseFd >= 0 && d.hints ? new CorHintProducer(d.hints, qid) : null;
    // The pool's memory is the main thread's mmap, the same addresses in every thread; it stays
    // mapped until the server stops, after this worker is gone.
    this.pool = this.hints !== null && this.hints.carriesData && baseDirect !== null ? Buffer.from(sys.koffi.view(BigInt(d.hints!.poolAddress), d.hints!.poolLength)) : null;
    this.hintMessage = { type: 'hint', qid };
    this.storedMessage = { type: 'stored', qid };
    this.crypt = crypt;
    this.trace = d.trace ? new QueueTrace(d.trace, qid) : null;
    this.direct = direct;
    this.directMode = directMode;
    this.engineDone = new CompletionRing(d.completions);
    this.activity = new QueueActivityWriter(d.activity, depth);
    this.bufBase = loop.bufferAddress;
    const bytes = loop.buffers.bytes;
    this.bytes = bytes;
    this.cow = d.claims !== null && d.stored !== null && direct !== null && baseDirect !== null && crypt === null ? new QueueCow(view, d.claims, baseDirect, direct, bytes, this.bufBase, maxIo, d.cowPartial) : null;
    this.stored = this.cow !== null ? new StoredRing(d.stored!) : null;
    this.cowAnswers = this.cow !== null && d.cowAnswers;
    this.queueLog = this.cowAnswers && d.queueLogFd >= 0 && d.queueLogDrained !== null ? new QueueLogWriter(d.queueLogFd, new Int32Array(d.queueLogDrained), qid) : null;
    this.tagOp = new Int32Array(depth);
    this.tagLen = new Float64Array(depth);
    this.tagDone = new Float64Array(depth);
    this.tagPhys = new Float64Array(depth);
    this.tagFile = new Int32Array(depth);
    this.tagResult = new Float64Array(depth);
    this.tagOffset = new Float64Array(depth);
    this.tagFixed = new Uint8Array(depth);
    this.tagCopyOut = new Uint8Array(depth);
    this.zeroCopy = d.zeroCopy;
    this.batchIo = d.batchIo;
    const tagLen = this.tagLen;
    this.zeroFillFrom = Array.from({ length: depth }, (_, tag) => (from: number) => {
      bytes.fill(0, tag * maxIo + from, tag * maxIo + tagLen[tag]!);
    });
    this.blockMem = bytes;
    const bs = d.view.blockSize;
    this.zeroBlockFrom = (from: number) => {
      this.blockMem.fill(0, this.blockAt + from, this.blockAt + bs);
    };
  }

  /** Fetches every tag: from here on the kernel may send requests. */
  start(): void {
    if (this.qid === 0) {
      const how = this.zeroCopy ? `zero copy of local blocks (the request's pages on the ring) from ${ZERO_COPY_MIN} bytes, ${this.directMode} transfers otherwise` : `${this.directMode} transfers`;
      const commands = this.batchIo ? 'batched commands (UBLK_F_BATCH_IO)' : 'one command per request';
      this.post({ type: 'info', qid: this.qid, message: `fast path: ${how}; ublk I/O: ${commands}` });
    }
    this.loop.start(this);
  }

  /** Serves until the device stops or the main thread asks to quit; then reports the last figures. */
  run(): void {
    this.loop.run();
    this.everySecond();
  }

  /** Releases the queue, the image and the cipher's key. Idempotent through the loop's close. */
  close(): void {
    // The ring first: closing it cancels what is still pending on the image.
    this.loop.close();
    fs.closeSync(this.imageFd);
    if (this.baseFd >= 0) fs.closeSync(this.baseFd);
    this.direct?.free();
    this.baseDirect?.free();
    this.crypt?.destroy(); // the worker's copy of the key goes with the queue
  }

  // ---- target ops (daemon/ublk/queue-loop.ts) --------------------------------------------

  /** A new request arrived for `tag`: serve it here or hand it to the engine. */
  handleIo(tag: number, iod: IoDescriptor): void {
    const op = iod.op;
    const sectors = iod.nrSectors;
    this.activity.begin(tag, performance.now(), op === UBLK_IO_OP_READ ? ACTIVITY_READ : op === UBLK_IO_OP_WRITE ? ACTIVITY_WRITE : ACTIVITY_OTHER, sectors);
    const length = sectors * 512;
    const offset = iod.startSector * 512;
    const trace = this.trace;
    if (trace !== null) trace.begin(tag, op, length);
    if (op === UBLK_IO_OP_READ || op === UBLK_IO_OP_WRITE) {
      const view = this.view;
      if (offset + length > view.liveSize[0]! || length > this.maxIo) {
        this.log(`request beyond the device: op ${op} at ${offset}+${length} (size ${view.liveSize[0]})`);
        this.commit(tag, -EIO);
        return;
      }
      const write = op === UBLK_IO_OP_WRITE;
      const route = this.route;
      const kind = write && iod.opFlags & UBLK_IO_F_FUA ? -1 : directRoute(view, offset, length, write, route);
      if (trace !== null)
        trace.route(tag, kind === STORED ? ROUTE_STORED : kind === ZERO ? ROUTE_ZERO : kind === BASE && this.baseFile >= 0 ? ROUTE_BASE : ROUTE_ENGINE);
      if (this.zeroCopy) {
        if (kind === STORED && length >= ZERO_COPY_MIN) {
          // Local blocks: the image and the request's pages, nothing in between.
          this.beginTransfer(tag, op, this.imageFile, route.host, length, length, offset);
          this.tagFixed[tag] = 1;
          this.fileIo(tag);
          return;
        }
        // Everything else works in the tag's buffer: a WRITE's data goes there first; a READ's
        // answer is copied to the request at its commit.
        if (write) {
          const r = this.loop.copyIn(tag, length);
          if (r < 0) {
            this.log(`zero copy: copying a write's data in failed: ${errnoName(r)}`);
            this.commit(tag, -EIO);
            return;
          }
        } else {
          this.tagCopyOut[tag] = 1;
        }
      }
      if (kind === ZERO) {
        // A read of bytes that read as zeros (directRoute only says ZERO for reads): unmapped
        // chunks of a compact image (zero-detected blocks included), bytes past the base's end
        // not yet local. Answered here: no I/O, no decryption (zeros read as zero plaintext,
        // FORMAT §11), no engine hop. A stale view is safe: the table entry of a chunk goes from
        // EMPTY to an id only after the chunk's storage was zeroed (FORMAT §4.3) and before the
        // engine completes the write that allocated it, so an EMPTY seen here is either current
        // or races a write still in flight (old data is a valid answer then); a read the guest
        // issued after that write completed reaches this thread through a syscall made after the
        // engine's update, and sees the id (docs/DESIGN.md §2.1). A bit goes 0 -> 1 the same
        // way, after the block's data is stored. A discard punches before it unmaps: zeros either way.
        const at = tag * this.maxIo;
        this.bytes.fill(0, at, at + length);
        this.fast++;
        this.commit(tag, length);
        return;
      }
      if (kind === STORED) {
        const phys = route.host;
        this.beginTransfer(tag, op, this.imageFile, phys, length, length, offset);
        // Encrypted image: route first, then encrypt, then write — a write that went to the
        // engine above must reach it as plaintext (the engine encrypts), and once encrypted the
        // buffer is only ever written (the ring finishing a would-block transfer reuses it), so
        // it is encrypted exactly once. Reads are decrypted in finishFast, after the whole
        // transfer (sync, ring, or both) and before the commit.
        if (write && this.crypt !== null) this.crypt.encryptWrite(tag, offset, length);
        const direct = this.direct;
        if (direct) {
          const r = direct.transfer(write, this.bufBase + tag * this.maxIo, length, phys, this.zeroFillFrom[tag]!);
          if (r === length) return this.finishFast(tag);
          if (r < DIRECT_WOULD_BLOCK) {
            this.log(`image ${write ? 'write' : 'read'} failed at ${phys}: ${errnoName(r)}`);
            return this.commit(tag, requestErrnoOf(r));
          }
          this.tagDone[tag] = direct.done; // the ring finishes what would have blocked
        }
        this.fileIo(tag);
        return;
      }
      if (kind === BASE && this.baseFile >= 0) return this.readBase(tag, offset, length, route.length);
      // BASE of another base, and ENGINE: the engine.
    } else if (op !== UBLK_IO_OP_FLUSH && op !== UBLK_IO_OP_DISCARD && op !== UBLK_IO_OP_WRITE_ZEROES) {
      this.commit(tag, -EOPNOTSUPP);
      return;
    }
    this.slow++;
    if (op === UBLK_IO_OP_WRITE && this.cow !== null && (iod.opFlags & UBLK_IO_F_FUA) === 0 && this.stored!.hasRoom()) {
      const cow = this.cow;
      const block = cow.store(tag, offset, length);
      if (block !== COW_DECLINED) {
        // Answered here: with a pending log, once the record is in this queue's log (a failed
        // append leaves the answer to the main thread, which logs it itself). The main thread
        // queues the record before any commit a FLUSH waits for (it drains every queue's ring
        // first); the entry goes before the answer: a FLUSH the guest sends after it finds it.
        if (this.cowAnswers && (this.queueLog === null || this.queueLog.append(block, cow.lastBlock - block + 1))) {
          cow.publish(block, cow.lastBlock);
          if (this.stored!.pushAnswered(block, cow.lastBlock, length)) this.post(this.storedMessage);
          this.commit(tag, length);
          return;
        }
        if (trace !== null) trace.stamp(trace.slot(tag), STAGE_POSTED);
        if (this.stored!.push(tag, block, cow.lastBlock, length)) this.post(this.storedMessage);
        return;
      }
    }
    const baseBlock = op === UBLK_IO_OP_WRITE && this.baseDirect !== null && this.preReadBlock(tag, offset, length);
    if (trace !== null) trace.stamp(trace.slot(tag), STAGE_POSTED);
    this.post({ type: 'slow', qid: this.qid, tag, op, flags: iod.opFlags >>> 8, offset, length, baseBlock });
  }

  /** A fast-path image read or write on the ring finished (res bytes, 0 at end of file, or -errno). */
  handleTargetIo(tag: number, res: number): void {
    const { tagOp, tagDone, tagLen } = this;
    if (res < 0) {
      this.log(`image ${tagOp[tag] === UBLK_IO_OP_READ ? 'read' : 'write'} failed at ${this.tagPhys[tag]}: ${errnoName(res)}`);
      this.commit(tag, requestErrnoOf(res));
      return;
    }
    if (res === 0 && tagOp[tag] === UBLK_IO_OP_READ) {
      // End of a compact image file inside a mapped chunk: the rest reads as zeros.
      const from = tagDone[tag]!;
      this.bytes.fill(0, tag * this.maxIo + from, tag * this.maxIo + tagLen[tag]!);
      if (this.tagFixed[tag] !== 0) {
        const r = this.loop.copyOut(tag, from, tagLen[tag]! - from);
        if (r < 0) {
          this.log(`zero copy: copying zeros into a read failed: ${errnoName(r)}`);
          this.commit(tag, -EIO);
          return;
        }
      }
      tagDone[tag] = tagLen[tag]!;
    } else {
      tagDone[tag]! += res;
    }
    if (tagDone[tag]! < tagLen[tag]!) this.fileIo(tag); // short transfer: continue
    else this.finishFast(tag);
  }

  /** The main thread finished requests it took over. */
  handleEvent(): void {
    this.engineDone.drain(this.commitEngineResult);
  }

  everySecond(): void {
    const h = this.hints;
    const hinted = h === null ? 0 : h.offered - h.dropped - h.coalesced;
    this.post({ type: 'stats', qid: this.qid, fast: this.fast, slow: this.slow, hinted, carried: h === null ? 0 : h.carried, noSlot: h === null ? 0 : h.noSlot, cow: this.cow === null ? 0 : this.cow.stored, overwritten: this.cow === null ? 0 : this.cow.overwritten, corBusy: this.corBusy });
  }

  // ---- helpers ---------------------------------------------------------------------------

  private commit(tag: number, result: number): void {
    this.tagFixed[tag] = 0;
    if (this.tagCopyOut[tag] !== 0) {
      this.tagCopyOut[tag] = 0;
      if (result > 0) {
        const r = this.loop.copyOut(tag, 0, result);
        if (r < 0) {
          this.log(`zero copy: copying a read's data out failed: ${errnoName(r)}`);
          result = -EIO;
        }
      }
    }
    if (this.trace !== null) this.trace.commit(tag);
    this.activity.end(tag, performance.now());
    this.loop.complete(tag, result);
  }

  /** commit() as a callback for the completion ring, made once. */
  private readonly commitEngineResult = (tag: number, result: number): void => this.commit(tag, result);

  /** Records a fast-path transfer of `len` bytes at `phys` of `file`; `result` is committed when done. */
  private beginTransfer(tag: number, op: number, file: number, phys: number, len: number, result: number, offset: number): void {
    this.tagOp[tag] = op;
    this.tagFile[tag] = file;
    this.tagPhys[tag] = phys;
    this.tagLen[tag] = len;
    this.tagResult[tag] = result;
    this.tagDone[tag] = 0;
    this.tagOffset[tag] = offset;
    this.fast++;
  }

  /** Queues the rest of tag's fast-path transfer (from tagDone) on the ring. */
  private fileIo(tag: number): void {
    const off = this.tagDone[tag]!;
    const addr = this.bufBase + tag * this.maxIo + off;
    const len = this.tagLen[tag]! - off;
    const pos = this.tagPhys[tag]! + off;
    const ring = this.loop.ring;
    const userData = encodeUserData(tag, UD_KIND_TARGET_IO);
    if (this.tagFixed[tag] !== 0) {
      // Zero copy: `off` is an offset in the request's pages (the slot starts at 0).
      const bufIndex = this.loop.bufIndex(tag);
      const fixed =
        this.tagOp[tag] === UBLK_IO_OP_READ
          ? ring.prepReadFixed(this.tagFile[tag]!, off, len, pos, bufIndex, userData, IOSQE_FIXED_FILE)
          : ring.prepWriteFixed(this.tagFile[tag]!, off, len, pos, bufIndex, userData, IOSQE_FIXED_FILE);
      if (fixed < 0) throw new Error(`queue ${this.qid}: submission queue full`);
      return;
    }
    const idx =
      this.tagOp[tag] === UBLK_IO_OP_READ
        ? ring.prepRead(this.tagFile[tag]!, addr, len, pos, userData, IOSQE_FIXED_FILE)
        : ring.prepWrite(this.tagFile[tag]!, addr, len, pos, userData, IOSQE_FIXED_FILE);
    if (idx < 0) throw new Error(`queue ${this.qid}: submission queue full`);
  }

  /**
   * A read of blocks still only in the base (directRoute said BASE), the base a local raw file:
   * the first `inBase` bytes are the base file's at the same offset, the rest (past the base's
   * end) zeros. The blocks are hinted for copy-on-read, not waited for. Why a view that lags
   * behind the engine is safe here: docs/DESIGN.md §2.2.
   */
  private readBase(tag: number, offset: number, length: number, inBase: number): void {
    const at = tag * this.maxIo;
    if (inBase < length) this.bytes.fill(0, at + inBase, at + length);
    if (this.trace !== null) this.trace.stamp(this.trace.slot(tag), STAGE_BASE_START);
    const hints = this.hints;
    // Copy-on-read yields to a busy guest: while the guest keeps this queue busier than
    // COR_MAX_LOAD requests (QueueLoop.load), and for COR_QUIET_MS after, the block is not hinted
    // (it stays in the base, which is a local file here; the prefetcher copies it when the guest
    // is quieter). Each hinted copy writes a whole block for a read of a few KiB, on the same CPUs
    // as the guest's requests: at 4K random reads, QD16, it cut the IOPS of a fresh image 3-8x
    // (README, fvd-cow-nocor).
    if (hints !== null && !this.corGate.allows(this.loop.load, this.loop.turnTime)) {
      this.corBusy++;
    } else if (hints !== null) {
      const bs = this.view.blockSize;
      const b = Math.floor(offset / bs);
      // Inside one block, and this queue hints it now: read the whole block once, into a data
      // slot the hint carries, so the main thread only writes it (DESIGN.md §2.2).
      if (this.pool !== null && Math.floor((offset + inBase - 1) / bs) === b && b < this.view.baseBlocks) {
        // Not claimed: coalesced with a pending hint or dropped at the cap; served as usual.
        if (hints.claim(b) && this.readBlockForHint(tag, b, offset, length, inBase)) return;
      } else if (hints.offer(offset, inBase)) {
        this.post(this.hintMessage);
      }
    }
    this.beginTransfer(tag, UBLK_IO_OP_READ, this.baseFile, offset, inBase, length, offset);
    const direct = this.baseDirect;
    if (direct) {
      const r = direct.transfer(false, this.bufBase + at, inBase, offset, this.zeroFillFrom[tag]!);
      if (r === inBase) return this.commit(tag, length);
      if (r < DIRECT_WOULD_BLOCK) {
        this.log(`base read failed at ${offset}: ${errnoName(r)}`);
        return this.commit(tag, requestErrnoOf(r));
      }
      this.tagDone[tag] = direct.done;
    }
    this.fileIo(tag);
  }

  /**
   * Copy-on-write help for the engine: a write to part of one block that (as this thread's view
   * says) is still only in the local raw base. The engine must store the whole block, the guest's
   * bytes amid the base's; this reads the base's block into the last blockSize bytes of the
   * request's own buffer (the guest's data is at its start), so that the main thread does not
   * (a base read there is a hand-off to the thread pool and back, 40-60 % of a copy-on-write's
   * time in the trace). Only a synchronous read: one that would block is left to the engine.
   * Returns true when the block is there (zeros past the base's end). A stale view only costs a
   * needless read: the engine decides under the block's lock whether the block is still absent
   * (FvdImage.write's baseBlock); the base never changes, so the bytes are current whenever read.
   * Base reads here show in the trace's cqe→posted segment.
   */
  private preReadBlock(tag: number, offset: number, length: number): boolean {
    const view = this.view;
    const bs = view.blockSize;
    if (length > this.maxIo - bs || view.fullyLocal[0] !== 0) return false;
    const b = Math.floor(offset / bs);
    if (b >= view.baseBlocks || b !== Math.floor((offset + length - 1) / bs)) return false;
    if ((view.present[b >>> 3]! & (1 << (b & 7))) !== 0) return false; // local: no base bytes needed
    if (offset === b * bs && length === bs) return false; // the whole block: nothing from the base
    // Would block, or failed: the engine reads (and reports) it.
    const at = tag * this.maxIo + this.maxIo - bs;
    return this.readBaseBlock(b, this.bytes, at, this.bufBase + at);
  }

  /**
   * Reads block b (below the base's blocks) as the disk holds it while absent — the base's bytes,
   * zeros past the base's end — synchronously into `mem` at `at` (address `addr`). False when the
   * read would block, came back short or failed: nothing usable is there then.
   */
  private readBaseBlock(b: number, mem: Uint8Array, at: number, addr: number): boolean {
    const bs = this.view.blockSize;
    const start = b * bs;
    const inBase = Math.min(bs, this.view.baseLimit - start);
    if (inBase <= 0) return false;
    this.blockMem = mem;
    this.blockAt = at;
    if (this.baseDirect!.transfer(false, addr, inBase, start, this.zeroBlockFrom) !== inBase) return false;
    if (inBase < bs) mem.fill(0, at + inBase, at + bs);
    return true;
  }

  /**
   * Block b, just claimed for a hint: reads its base bytes into a free data slot synchronously,
   * zeros the rest of the slot, answers the request from it and pushes the hint with the slot.
   * Returns false when that could not be done (no free slot, the read would block, was short or
   * failed): the hint is pushed without data and the caller serves the request as usual.
   */
  private readBlockForHint(tag: number, b: number, offset: number, length: number, inBase: number): boolean {
    const hints = this.hints!;
    const pool = this.pool!;
    const bs = this.view.blockSize;
    const slot = hints.takeSlot();
    if (slot >= 0) {
      const slotAt = hints.slotOffset(slot);
      if (this.readBaseBlock(b, pool, slotAt, hints.slotAddress(slot))) {
        const from = slotAt + (offset - b * bs);
        pool.copy(this.bytes, tag * this.maxIo, from, from + inBase);
        if (hints.push(b, slot)) this.post(this.hintMessage);
        this.fast++;
        this.commit(tag, length);
        return true;
      }
      hints.giveBack(slot); // would block, short or failed: the ordinary read below says which
    }
    if (hints.push(b, NO_SLOT)) this.post(this.hintMessage);
    return false;
  }

  /** A fast-path transfer finished: a read of an encrypted image is decrypted before the kernel sees it. */
  private finishFast(tag: number): void {
    if (this.crypt !== null && this.tagOp[tag] === UBLK_IO_OP_READ) this.crypt.decryptRead(tag, this.tagOffset[tag]!, this.tagLen[tag]!);
    this.commit(tag, this.tagResult[tag]!);
  }

  private log(message: string): void {
    this.post({ type: 'log', qid: this.qid, message });
  }
}
