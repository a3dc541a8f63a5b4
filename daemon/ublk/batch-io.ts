/**
 * Batched I/O commands of one ublk queue (UBLK_F_BATCH_IO, Linux 7.0+), the other way of talking
 * to the driver than one FETCH_REQ / COMMIT_AND_FETCH_REQ per tag (daemon/ublk/queue-loop.ts uses
 * one or the other, as the device was added):
 *
 * - PREP_IO_CMDS, once before START_DEV: every tag of the queue with its buffer (copy mode: the
 *   tag's buffer address; zero copy: its fixed-buffer slot), all or nothing.
 * - FETCH_IO_CMDS, multishot: the kernel writes the tags of new requests (u16 each) into a
 *   provided buffer and posts one CQE per dispatch, res = bytes of tags, IORING_CQE_F_MORE while
 *   the command stays armed. Two fetch commands, each with a buffer group of its own holding one
 *   buffer consumed incrementally (IOU_PBUF_RING_INC): when one runs out (-ENOBUFS, or a CQE
 *   without F_MORE) the kernel goes on with the other while this one is re-armed. Stopping the
 *   device ends both (-ENODEV, or cancelled when the ring closes).
 * - COMMIT_IO_CMDS: the results of every request completed in one loop turn in one command; its
 *   CQE says how many bytes of elements it took (it stops at the first tag it refuses).
 *
 * Element buffers: the driver copies a command's elements from user memory while the command is
 * issued (copy_from_user inside io_uring_enter; ublk never defers these commands to io-wq), so a
 * commit buffer is free again once the io_uring_enter that consumed its SQE has returned. Two
 * buffers alternate: completions go into one while the other's command waits for its submit;
 * a new commit is cut only after the previous one was consumed (issued), so neither is written
 * while the kernel may still read it. A buffer holds `depth` elements, enough: a tag is committed
 * at most once before the kernel hands it out again, and it does so only after that commit.
 *
 * Per request: no allocation, no promise, no closure — an element is written into preallocated
 * memory; per loop turn at most one SQE.
 */
import {
  IORING_CQE_F_MORE,
  IORING_URING_CMD_MULTISHOT,
  IOSQE_BUFFER_SELECT,
  IOSQE_FIXED_FILE,
  IOU_PBUF_RING_INC,
  allocPinned,
  errnoName,
  type IoUring,
  type PinnedBuffer,
} from '../../ffi/uring.js';
import {
  UBLK_BATCH_ELEM_HEADER,
  UBLK_BATCH_F_HAS_BUF_ADDR,
  UBLK_U_IO_COMMIT_IO_CMDS,
  UBLK_U_IO_FETCH_IO_CMDS,
  UBLK_U_IO_PREP_IO_CMDS,
  encodeBatchElem,
  encodeBatchIo,
  setAddress,
} from './abi.js';
import { UD_KIND_BATCH, encodeUserData } from './user-data.js';

/** user_data tag field of a batched command: fetch commands are 0 and 1 (their buffer group). */
export const BATCH_SLOT_PREP = 2;
export const BATCH_SLOT_COMMIT = 3;
const FETCH_GROUPS = 2;
const PAGE = 4096;
const ENOBUFS = -105;
const ENODEV = -19;
const ECANCELED = -125;

/** What the commands report to (the queue loop). */
export interface BatchHost {
  /** The kernel handed over a new request for `tag`. */
  arrive(tag: number): void;
  log(message: string): void;
}

export interface BatchOptions {
  ring: IoUring;
  qid: number;
  depth: number;
  /** Copy mode: tag t's buffer is at bufferAddress + t × maxIo. Zero copy: null (elements carry the slot). */
  copyBuffers: { bufferAddress: number; maxIo: number } | null;
  host: BatchHost;
}

export class BatchCommands {
  /** Bytes per PREP/COMMIT element: the header, plus the buffer address in copy mode. */
  private readonly elemBytes: number;
  private readonly ring: IoUring;
  private readonly sqe: DataView;
  private readonly qid: number;
  private readonly depth: number;
  private readonly flags: number;
  private readonly bufferAddress: number;
  private readonly maxIo: number;
  private readonly host: BatchHost;
  /** [ring 0 page][ring 1 page][fetch buffer 0][fetch buffer 1][commit buffer 0][commit buffer 1]. */
  private readonly mem: PinnedBuffer;
  private readonly view: DataView;
  private readonly tags: Uint16Array;
  private readonly fetchBytes: number;
  private readonly fetchAt: number;
  private readonly commitBytes: number;
  private readonly commitAt: number;
  /** Per fetch group: bytes of its buffer already delivered (incremental consumption). */
  private readonly fetchOffset = new Int32Array(FETCH_GROUPS);
  private readonly tail = new Uint16Array(FETCH_GROUPS);
  /** The commit buffer completions go into, and how many elements it holds. */
  private current = 0;
  private pending = 0;
  /** The last commit's SQE was consumed by an io_uring_enter (its buffer may be written again). */
  private issued = true;
  private fetchesEnded = 0;
  private prepFailed = false;

  constructor(opts: BatchOptions) {
    const { ring, depth } = opts;
    this.ring = ring;
    this.sqe = ring.sqeView;
    this.qid = opts.qid;
    this.depth = depth;
    this.host = opts.host;
    this.bufferAddress = opts.copyBuffers?.bufferAddress ?? 0;
    this.maxIo = opts.copyBuffers?.maxIo ?? 0;
    this.elemBytes = opts.copyBuffers ? UBLK_BATCH_ELEM_HEADER + 8 : UBLK_BATCH_ELEM_HEADER;
    this.flags = opts.copyBuffers ? UBLK_BATCH_F_HAS_BUF_ADDR : 0;
    this.fetchBytes = Math.ceil((depth * 2) / PAGE) * PAGE;
    this.commitBytes = Math.ceil((depth * this.elemBytes) / PAGE) * PAGE;
    this.fetchAt = FETCH_GROUPS * PAGE;
    this.commitAt = this.fetchAt + FETCH_GROUPS * this.fetchBytes;
    const mem = allocPinned(this.commitAt + 2 * this.commitBytes);
    try {
      for (let group = 0; group < FETCH_GROUPS; group++) {
        const r = ring.registerBufferRing(mem.address + group * PAGE, 1, group, IOU_PBUF_RING_INC);
        if (r < 0) throw new Error(`queue ${opts.qid}: io_uring register buffer ring ${group} (batched I/O): ${errnoName(r)}`);
      }
    } catch (err) {
      mem.free(); // the ring's close unregisters what was registered
      throw err;
    }
    this.mem = mem;
    this.view = new DataView(mem.bytes.buffer, mem.bytes.byteOffset, mem.length);
    // Also the rings' tails: the u16 at byte 14 of a ring's first entry (struct io_uring_buf_ring).
    this.tags = new Uint16Array(mem.bytes.buffer, mem.bytes.byteOffset, mem.length >> 1);
  }

  /** Both fetch commands ended for good, or PREP failed: the queue gets no more requests. */
  get done(): boolean {
    return this.prepFailed || this.fetchesEnded >= FETCH_GROUPS;
  }

  /** Elements waiting for the next commit. */
  get uncommitted(): number {
    return this.pending;
  }

  /** Queues PREP_IO_CMDS for every tag and arms both fetch commands (submitted by the caller). */
  start(): void {
    const { depth, elemBytes } = this;
    const at = this.commitAt;
    for (let tag = 0; tag < depth; tag++) encodeBatchElem(this.view, at + tag * elemBytes, elemBytes, tag, tag, 0, this.tagBuffer(tag));
    this.prepCommand(UBLK_U_IO_PREP_IO_CMDS, BATCH_SLOT_PREP, at, depth);
    this.current = 1; // buffer 0 is PREP's until its submit
    this.issued = false;
    for (let group = 0; group < FETCH_GROUPS; group++) this.armFetch(group);
  }

  /** The request of `tag` is done with `result`: into the commit of this loop turn. */
  add(tag: number, result: number): void {
    const n = this.pending;
    if (n >= this.depth) throw new Error(`queue ${this.qid}: more than ${this.depth} completions in one batch`);
    encodeBatchElem(this.view, this.commitAt + this.current * this.commitBytes + n * this.elemBytes, this.elemBytes, tag, tag, result, this.tagBuffer(tag));
    this.pending = n + 1;
  }

  /**
   * Before an io_uring_enter: the turn's completions become one COMMIT_IO_CMDS SQE — unless the
   * previous commit was not consumed yet (then they wait for the next turn, in their buffer).
   */
  flush(): void {
    const n = this.pending;
    if (n === 0 || !this.issued) return;
    if (!this.prepCommand(UBLK_U_IO_COMMIT_IO_CMDS, BATCH_SLOT_COMMIT, this.commitAt + this.current * this.commitBytes, n)) return;
    this.current ^= 1;
    this.pending = 0;
    this.issued = false;
  }

  /** After an io_uring_enter: nothing left unsubmitted means the last commit's elements were read. */
  submitted(unsubmitted: number): void {
    if (unsubmitted === 0) this.issued = true;
  }

  /** A CQE of kind UD_KIND_BATCH. `rearm`: a fetch that ran out is armed again (not when stopping). */
  onCqe(slot: number, res: number, cqeFlags: number, targetData: number, rearm: boolean): void {
    if (slot < FETCH_GROUPS) {
      if (res > 0) {
        const tags = this.tags;
        const first = (this.fetchAt + slot * this.fetchBytes + this.fetchOffset[slot]!) >> 1;
        const end = first + (res >> 1);
        this.fetchOffset[slot]! += res;
        for (let i = first; i < end; i++) this.host.arrive(tags[i]!);
      }
      if ((cqeFlags & IORING_CQE_F_MORE) !== 0) return;
      if ((res >= 0 || res === ENOBUFS) && rearm) this.armFetch(slot);
      else {
        this.fetchesEnded++;
        if (res < 0 && res !== ENODEV && res !== ECANCELED && res !== ENOBUFS) this.host.log(`queue ${this.qid}: FETCH_IO_CMDS ended: ${errnoName(res)}`);
      }
    } else if (slot === BATCH_SLOT_PREP) {
      if (res !== 0) {
        this.prepFailed = true;
        this.host.log(`queue ${this.qid}: PREP_IO_CMDS failed: ${errnoName(res)}`);
      }
    } else if (res !== targetData * this.elemBytes) {
      const took = res > 0 ? res / this.elemBytes : 0;
      this.host.log(`queue ${this.qid}: COMMIT_IO_CMDS took ${took} of ${targetData} results${res < 0 ? `: ${errnoName(res)}` : ''}`);
    }
  }

  /** Address of fetch group `group`'s buffer, where the kernel writes tags (tests stand in for it there). */
  fetchBufferAddress(group: number): number {
    return this.mem.address + this.fetchAt + group * this.fetchBytes;
  }

  /** Releases the element and fetch memory (after the ring is closed: the kernel is done with it). */
  free(): void {
    this.mem.free();
  }

  private tagBuffer(tag: number): number {
    return this.maxIo === 0 ? 0 : this.bufferAddress + tag * this.maxIo;
  }

  /** A PREP or COMMIT of `n` elements at byte `at` of the memory; false when the SQ is full. */
  private prepCommand(op: number, slot: number, at: number, n: number): boolean {
    const ring = this.ring;
    const len = n * this.elemBytes;
    const idx = ring.prepUringCmd(0, op, null, encodeUserData(slot, UD_KIND_BATCH, slot === BATCH_SLOT_COMMIT ? n : 0), IOSQE_FIXED_FILE, this.mem.address + at, len);
    if (idx < 0) {
      if (slot === BATCH_SLOT_PREP) throw new Error(`queue ${this.qid}: submission queue full`);
      return false;
    }
    encodeBatchIo(this.sqe, ring.cmdOffset(idx), this.qid, this.flags, n, this.elemBytes);
    return true;
  }

  /** Puts fetch group `group`'s buffer (whole again) in its ring and queues its multishot FETCH. */
  private armFetch(group: number): void {
    const r = group * PAGE;
    const addr = this.fetchBufferAddress(group);
    const v = this.view;
    setAddress(v, r, addr);
    v.setUint32(r + 8, this.fetchBytes, true);
    v.setUint16(r + 12, 0, true); // bid
    this.fetchOffset[group] = 0;
    const tail = (this.tail[group]! + 1) & 0xffff;
    this.tail[group] = tail;
    // The entry is written before the tail that publishes it (the kernel reads the tail with acquire).
    Atomics.store(this.tags, (r + 14) >> 1, tail);
    const ring = this.ring;
    const idx = ring.prepUringCmd(0, UBLK_U_IO_FETCH_IO_CMDS, null, encodeUserData(group, UD_KIND_BATCH), IOSQE_FIXED_FILE | IOSQE_BUFFER_SELECT, 0, 0, IORING_URING_CMD_MULTISHOT, group);
    if (idx < 0) throw new Error(`queue ${this.qid}: submission queue full`);
    encodeBatchIo(this.sqe, ring.cmdOffset(idx), this.qid, 0, this.fetchBytes >> 1, 2);
  }
}
