/**
 * The ublk kernel ABI (include/uapi/linux/ublk_cmd.h): what Linux 6.12 has, plus the feature bits
 * and commands added up to 7.x (checked against the 7.x header; each marked with the kernel it
 * first appeared in). Control commands use the ioctl-encoded opcodes (_IOC(dir, 'u', nr, size)),
 * which every kernel since 6.3 accepts and the legacy ones may not.
 */

const IOC = (dir: number, nr: number, size: number) => ((dir << 30) | (size << 16) | (0x75 << 8) | nr) >>> 0;
const R = 2;
const RW = 3;
const CTRL_SIZE = 32;
const IO_SIZE = 16;

export const UBLK_U_CMD_GET_DEV_INFO = IOC(R, 0x02, CTRL_SIZE);
export const UBLK_U_CMD_ADD_DEV = IOC(RW, 0x04, CTRL_SIZE);
export const UBLK_U_CMD_DEL_DEV = IOC(RW, 0x05, CTRL_SIZE);
export const UBLK_U_CMD_START_DEV = IOC(RW, 0x06, CTRL_SIZE);
export const UBLK_U_CMD_STOP_DEV = IOC(RW, 0x07, CTRL_SIZE);
export const UBLK_U_CMD_SET_PARAMS = IOC(RW, 0x08, CTRL_SIZE);
export const UBLK_U_CMD_GET_PARAMS = IOC(R, 0x09, CTRL_SIZE);
export const UBLK_U_CMD_GET_FEATURES = IOC(R, 0x13, CTRL_SIZE);
/** USER_RECOVERY: only accepted once the old server exited and released /dev/ublkcN (else EBUSY). */
export const UBLK_U_CMD_START_USER_RECOVERY = IOC(RW, 0x10, CTRL_SIZE);
/** data[0] = the new server's pid; waits until every tag is fetched again, then the device is LIVE. */
export const UBLK_U_CMD_END_USER_RECOVERY = IOC(RW, 0x11, CTRL_SIZE);
export const UBLK_U_IO_FETCH_REQ = IOC(RW, 0x20, IO_SIZE);
export const UBLK_U_IO_COMMIT_AND_FETCH_REQ = IOC(RW, 0x21, IO_SIZE);

// Commands after 6.12 (each needs its UBLK_F_* bit in GET_FEATURES first; only QUIESCE_DEV is issued).
/** 6.9: DEL_DEV without waiting for the last reference (_IOR, unlike its neighbours). */
export const UBLK_U_CMD_DEL_DEV_ASYNC = IOC(R, 0x14, CTRL_SIZE);
/** UBLK_F_UPDATE_SIZE: data[0] = the new size in 512-byte sectors, on a live device. */
export const UBLK_U_CMD_UPDATE_SIZE = IOC(RW, 0x15, CTRL_SIZE);
/**
 * UBLK_F_QUIESCE (6.16; the device must have it, else EOPNOTSUPP): data[0] = time-out in ms (0 =
 * none), no buffer. The kernel stops dispatching (new requests are requeued and held), waits until
 * every queue has an idle tag, then completes the idle tags' FETCHes with UBLK_IO_RES_ABORT and
 * returns; EBUSY after the time-out. Requests the server holds stay its own to commit. The state
 * turns QUIESCED when the server releases /dev/ublkcN (ublk_ctrl_quiesce_dev, ublk_ch_release_work_fn).
 */
export const UBLK_U_CMD_QUIESCE_DEV = IOC(RW, 0x16, CTRL_SIZE);
/** UBLK_F_SAFE_STOP_DEV: STOP_DEV only while nobody has the block device open. */
export const UBLK_U_CMD_TRY_STOP_DEV = IOC(RW, 0x17, CTRL_SIZE);
/** UBLK_F_SUPPORT_ZERO_COPY: put a request's pages in the ring's fixed-buffer table at index addr. */
export const UBLK_U_IO_REGISTER_IO_BUF = IOC(RW, 0x23, IO_SIZE);
export const UBLK_U_IO_UNREGISTER_IO_BUF = IOC(RW, 0x24, IO_SIZE);
/** UBLK_F_BATCH_IO: the command area holds struct ublk_batch_io (16 bytes), not ublksrv_io_cmd. */
export const UBLK_U_IO_PREP_IO_CMDS = IOC(RW, 0x25, 16);
export const UBLK_U_IO_COMMIT_IO_CMDS = IOC(RW, 0x26, 16);
export const UBLK_U_IO_FETCH_IO_CMDS = IOC(RW, 0x27, 16);

/** Legacy (non-ioctl) opcodes, for kernels older than CMD_IOCTL_ENCODE. */
export const LEGACY = {
  GET_DEV_INFO: 0x02,
  ADD_DEV: 0x04,
  DEL_DEV: 0x05,
  START_DEV: 0x06,
  STOP_DEV: 0x07,
  SET_PARAMS: 0x08,
  GET_PARAMS: 0x09,
  START_USER_RECOVERY: 0x10,
  END_USER_RECOVERY: 0x11,
  FETCH_REQ: 0x20,
  COMMIT_AND_FETCH_REQ: 0x21,
} as const;

export const UBLK_IO_RES_OK = 0;
export const UBLK_IO_RES_ABORT = -19; // -ENODEV: the device is stopping
export const UBLK_MAX_QUEUE_DEPTH = 4096;
/** Per-queue descriptor area in the /dev/ublkcN mmap: round_up(4096 * 24, 4096). */
export const UBLK_QUEUE_DESC_STRIDE = 98304;
export const IO_DESC_SIZE = 24;

// Feature bits (u64): GET_FEATURES reports what the kernel supports; dev_info.flags carries what a
// device asks for at ADD_DEV and, in the reply, what it got. Names and kernels: ./features.ts.
export const UBLK_F_SUPPORT_ZERO_COPY = 1n << 0n;
export const UBLK_F_URING_CMD_COMP_IN_TASK = 1n << 1n;
export const UBLK_F_NEED_GET_DATA = 1n << 2n;
export const UBLK_F_USER_RECOVERY = 1n << 3n;
export const UBLK_F_USER_RECOVERY_REISSUE = 1n << 4n;
export const UBLK_F_UNPRIVILEGED_DEV = 1n << 5n;
export const UBLK_F_CMD_IOCTL_ENCODE = 1n << 6n;
export const UBLK_F_USER_COPY = 1n << 7n;
export const UBLK_F_ZONED = 1n << 8n;
export const UBLK_F_USER_RECOVERY_FAIL_IO = 1n << 9n;
export const UBLK_F_UPDATE_SIZE = 1n << 10n;
export const UBLK_F_AUTO_BUF_REG = 1n << 11n;
export const UBLK_F_QUIESCE = 1n << 12n;
export const UBLK_F_PER_IO_DAEMON = 1n << 13n;
export const UBLK_F_BUF_REG_OFF_DAEMON = 1n << 14n;
export const UBLK_F_BATCH_IO = 1n << 15n;
export const UBLK_F_INTEGRITY = 1n << 16n;
export const UBLK_F_SAFE_STOP_DEV = 1n << 17n;
export const UBLK_F_NO_AUTO_PART_SCAN = 1n << 18n;
export const UBLK_F_SHMEM_ZC = 1n << 19n;
/** 7.3: dev_info's pad0 (u16 @6) becomes io_desc_size, 24–256; without this flag it is 24. */
export const UBLK_F_IO_DESC_SIZE = 1n << 20n;

export const UBLK_S_DEV_DEAD = 0;
export const UBLK_S_DEV_LIVE = 1;
export const UBLK_S_DEV_QUIESCED = 2;
export const UBLK_S_DEV_FAIL_IO = 3; // 6.13: USER_RECOVERY_FAIL_IO with no server

export const UBLK_IO_OP_READ = 0;
export const UBLK_IO_OP_WRITE = 1;
export const UBLK_IO_OP_FLUSH = 2;
export const UBLK_IO_OP_DISCARD = 3;
export const UBLK_IO_OP_WRITE_SAME = 4;
export const UBLK_IO_OP_WRITE_ZEROES = 5;
export const UBLK_IO_F_FUA = 1 << 13;

export const UBLK_ATTR_READ_ONLY = 1 << 0;
export const UBLK_ATTR_VOLATILE_CACHE = 1 << 2;
export const UBLK_ATTR_FUA = 1 << 3;
export const UBLK_PARAM_TYPE_BASIC = 1 << 0;
export const UBLK_PARAM_TYPE_DISCARD = 1 << 1;
export const UBLK_PARAM_TYPE_DEVT = 1 << 2;

/** Marks devices added by fvd (dev_info.ublksrv_flags is opaque to the kernel): "FVD\0" << 32. */
export const FVD_SERVER_TAG = 0x46564400n << 32n;

/** struct ublksrv_ctrl_cmd (32 bytes, in the SQE128 command area). */
export function encodeCtrlCmd(out: DataView, at: number, devId: number, addr: number, len: number, data0: bigint | number = 0): void {
  for (let i = 0; i < 32; i += 4) out.setUint32(at + i, 0, true);
  out.setUint32(at + 0, devId >>> 0, true);
  out.setUint16(at + 4, 0xffff, true); // queue_id: not queue-specific
  out.setUint16(at + 6, len, true);
  out.setBigUint64(at + 8, BigInt(addr), true);
  out.setBigUint64(at + 16, BigInt(data0), true);
}

/**
 * A u64 address (below 2^53) at byte `at`, little-endian, as two 32-bit halves: no BigInt
 * allocation on the per-request path.
 */
export function setAddress(out: DataView, at: number, addr: number): void {
  out.setUint32(at, addr >>> 0, true);
  out.setUint32(at + 4, Math.floor(addr / 0x100000000), true);
}

/** struct ublksrv_io_cmd (16 bytes, in a normal SQE's command area). */
export function encodeIoCmd(out: DataView, at: number, qid: number, tag: number, result: number, addr: number): void {
  out.setUint16(at + 0, qid, true);
  out.setUint16(at + 2, tag, true);
  out.setInt32(at + 4, result, true);
  setAddress(out, at + 8, addr);
}

// ---- batched I/O (UBLK_F_BATCH_IO, 7.0) -----------------------------------------------------

/** struct ublk_batch_io.flags: each element carries a u64 buffer address (copy mode). */
export const UBLK_BATCH_F_HAS_BUF_ADDR = 1 << 1;
/** struct ublk_elem_header: u16 tag, u16 buf_index, s32 result. */
export const UBLK_BATCH_ELEM_HEADER = 8;

/**
 * struct ublk_batch_io (16 bytes, in a normal SQE's command area): u16 q_id, u16 flags, u16
 * nr_elem, u8 elem_bytes, u8 reserved, u64 reserved2. PREP_IO_CMDS and COMMIT_IO_CMDS read
 * nr_elem elements of elem_bytes (8, or 16 with HAS_BUF_ADDR) at sqe->addr; FETCH_IO_CMDS takes
 * flags 0 and elem_bytes 2 (it writes u16 tags into a provided buffer).
 */
export function encodeBatchIo(out: DataView, at: number, qid: number, flags: number, nrElem: number, elemBytes: number): void {
  out.setUint16(at + 0, qid, true);
  out.setUint16(at + 2, flags, true);
  out.setUint16(at + 4, nrElem, true);
  out.setUint8(at + 6, elemBytes);
  out.setUint8(at + 7, 0);
  out.setUint32(at + 8, 0, true);
  out.setUint32(at + 12, 0, true);
}

/**
 * One element of PREP_IO_CMDS / COMMIT_IO_CMDS at byte `at` of `out`: struct ublk_elem_header,
 * then, when elemBytes is 16, the tag's buffer address.
 */
export function encodeBatchElem(out: DataView, at: number, elemBytes: number, tag: number, bufIndex: number, result: number, addr: number): void {
  out.setUint16(at + 0, tag, true);
  out.setUint16(at + 2, bufIndex, true);
  out.setInt32(at + 4, result, true);
  if (elemBytes === 16) setAddress(out, at + 8, addr);
}

// ---- zero copy (AUTO_BUF_REG) and user copy ----------------------------------------------

/**
 * UBLK_F_AUTO_BUF_REG (6.16): FETCH_REQ and COMMIT_AND_FETCH_REQ carry struct ublk_auto_buf_reg in
 * the SQE's own addr field (not in ublksrv_io_cmd, whose addr must then be 0): bits 0–15 the slot
 * of the ring's fixed-buffer table where the kernel puts the pages of the tag's next request before
 * delivering it (the next commit takes them out again), bits 16–23 flags (0: a failed registration
 * fails the request; UBLK_AUTO_BUF_REG_FALLBACK, not used here, would deliver it unregistered),
 * bits 24–63 reserved, 0. Only requests that carry data (READ, WRITE) are registered.
 */
export function autoBufRegSqeAddr(bufIndex: number): number {
  return bufIndex & 0xffff;
}

/** UBLK_F_USER_COPY: /dev/ublkcN offsets of a request's data (ublk_cmd.h). */
const UBLKSRV_IO_BUF_OFFSET = 0x80000000;
const UBLK_TAG_OFF = 25; // 16 bits of tag
const UBLK_QID_OFF = 41; // 12 bits of queue
/**
 * Where pread/pwrite of /dev/ublkcN reach byte `offset` of the data of request (qid, tag) while the
 * server holds it: pread copies a WRITE's data out, pwrite fills a READ (the other direction is
 * EACCES). Below 2^53, a plain number.
 */
export function userCopyPosition(qid: number, tag: number, offset: number): number {
  return UBLKSRV_IO_BUF_OFFSET + qid * 2 ** UBLK_QID_OFF + tag * 2 ** UBLK_TAG_OFF + offset;
}

export interface DevInfo {
  nrHwQueues: number;
  queueDepth: number;
  state: number;
  maxIoBufBytes: number;
  devId: number;
  ublksrvPid: number;
  flags: bigint;
  ublksrvFlags: bigint;
}

/** struct ublksrv_ctrl_dev_info (64 bytes). */
export function encodeDevInfo(info: Partial<DevInfo>): Uint8Array {
  const b = new Uint8Array(64);
  const dv = new DataView(b.buffer);
  dv.setUint16(0, info.nrHwQueues ?? 1, true);
  dv.setUint16(2, info.queueDepth ?? 128, true);
  dv.setUint32(8, info.maxIoBufBytes ?? 512 * 1024, true);
  dv.setUint32(12, (info.devId ?? -1) >>> 0, true);
  dv.setInt32(16, info.ublksrvPid ?? 0, true);
  dv.setBigUint64(24, info.flags ?? 0n, true);
  dv.setBigUint64(32, info.ublksrvFlags ?? 0n, true);
  return b;
}

export function decodeDevInfo(b: Uint8Array): DevInfo {
  const dv = new DataView(b.buffer, b.byteOffset, 64);
  return {
    nrHwQueues: dv.getUint16(0, true),
    queueDepth: dv.getUint16(2, true),
    state: dv.getUint16(4, true),
    maxIoBufBytes: dv.getUint32(8, true),
    devId: dv.getUint32(12, true),
    ublksrvPid: dv.getInt32(16, true),
    flags: dv.getBigUint64(24, true),
    ublksrvFlags: dv.getBigUint64(32, true),
  };
}

export interface DeviceParams {
  devSectors: number;
  logicalBsShift: number;
  physicalBsShift: number;
  ioOptShift: number;
  ioMinShift: number;
  maxSectors: number;
  attrs: number;
  discardGranularity: number;
  maxDiscardSectors: number;
  maxWriteZeroesSectors: number;
  maxDiscardSegments: number;
}

/** struct ublk_params with BASIC and DISCARD (len 60: the kernel copies min(len, its size)). */
export function encodeParams(p: DeviceParams): Uint8Array {
  const b = new Uint8Array(60);
  const dv = new DataView(b.buffer);
  dv.setUint32(0, 60, true);
  dv.setUint32(4, UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD, true);
  // basic @8
  dv.setUint32(8, p.attrs, true);
  dv.setUint8(12, p.logicalBsShift);
  dv.setUint8(13, p.physicalBsShift);
  dv.setUint8(14, p.ioOptShift);
  dv.setUint8(15, p.ioMinShift);
  dv.setUint32(16, p.maxSectors, true);
  dv.setUint32(20, 0, true); // chunk_sectors
  dv.setBigUint64(24, BigInt(p.devSectors), true);
  dv.setBigUint64(32, 0n, true); // virt_boundary_mask
  // discard @40
  dv.setUint32(40, 0, true); // discard_alignment
  dv.setUint32(44, p.discardGranularity, true);
  dv.setUint32(48, p.maxDiscardSectors, true);
  dv.setUint32(52, p.maxWriteZeroesSectors, true);
  dv.setUint16(56, p.maxDiscardSegments, true);
  return b;
}
