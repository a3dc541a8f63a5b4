/**
 * The ublk control plane: commands on /dev/ublk-control through an SQE128 io_uring.
 *
 * Commands are submitted without waiting and their completion is polled from the event loop, so
 * the main thread stays free while a command blocks in the kernel: START_DEV scans partitions and
 * STOP_DEV drains in-flight I/O, and both need the main thread's engine to serve slow-path
 * requests meanwhile. (The kernel runs control commands from io-wq, not inline.)
 */
import fs from 'node:fs';
import { IoUring, IORING_SETUP_SQE128, allocPinned, errnoName, type PinnedBuffer } from '../../ffi/uring.js';
import {
  LEGACY,
  UBLK_F_CMD_IOCTL_ENCODE,
  UBLK_U_CMD_ADD_DEV,
  UBLK_U_CMD_DEL_DEV,
  UBLK_U_CMD_DEL_DEV_ASYNC,
  UBLK_U_CMD_END_USER_RECOVERY,
  UBLK_U_CMD_GET_DEV_INFO,
  UBLK_U_CMD_GET_FEATURES,
  UBLK_U_CMD_GET_PARAMS,
  UBLK_U_CMD_QUIESCE_DEV,
  UBLK_U_CMD_SET_PARAMS,
  UBLK_U_CMD_START_DEV,
  UBLK_U_CMD_START_USER_RECOVERY,
  UBLK_U_CMD_STOP_DEV,
  UBLK_U_CMD_UPDATE_SIZE,
  decodeDevInfo,
  encodeCtrlCmd,
  encodeDevInfo,
  encodeParams,
  type DevInfo,
  type DeviceParams,
} from './abi.js';
import { UblkError } from './errors.js';

export const CONTROL_PATH = '/dev/ublk-control';

/** A control command failed: carries the negative errno. */
export class UblkCommandError extends UblkError {
  constructor(
    readonly command: string,
    readonly errno: number,
  ) {
    super(`ublk ${command} failed: ${errnoName(errno)}`, 'EIO');
  }
}

/** Explains a missing driver the way a user can act on. */
export function missingDriverMessage(): string {
  return (
    `the ublk driver is not available (${CONTROL_PATH} is missing): load it with 'modprobe ublk_drv' ` +
    `(needs Linux >= 6.0 built with CONFIG_BLK_DEV_UBLK)`
  );
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export class UblkControl {
  private readonly ring: IoUring;
  private readonly scratch: PinnedBuffer;
  private chain: Promise<unknown> = Promise.resolve();
  private ioctlEncode = true;
  /** What GET_FEATURES reported (UBLK_F_* bits, ./features.ts), or null before Linux 6.5. */
  features: bigint | null = null;

  private constructor(private readonly fd: number) {
    this.ring = new IoUring({ entries: 4, flags: IORING_SETUP_SQE128 });
    this.scratch = allocPinned(4096);
  }

  /** Opens the control device; throws a one-line explanation when the driver is missing. */
  static async open(): Promise<UblkControl> {
    let fd: number;
    try {
      fd = fs.openSync(CONTROL_PATH, 'r+');
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENODEV' || code === 'ENXIO') throw new UblkError(missingDriverMessage(), 'ENOENT');
      throw new UblkError(`cannot open ${CONTROL_PATH}: ${(err as Error).message}`, 'EIO');
    }
    const ctl = new UblkControl(fd);
    try {
      ctl.features = await ctl.getFeatures();
      ctl.ioctlEncode = (ctl.features & UBLK_F_CMD_IOCTL_ENCODE) !== 0n;
    } catch {
      // Before Linux 6.5 there is no GET_FEATURES; such kernels take the legacy opcodes.
      ctl.features = null;
      ctl.ioctlEncode = false;
    }
    return ctl;
  }

  close(): void {
    this.ring.close();
    this.scratch.free();
    fs.closeSync(this.fd);
  }

  /** Runs one command at a time; resolves with the CQE result (≥ 0) or rejects with UblkCommandError. */
  private command(name: string, op: number, legacyOp: number, devId: number, data: Uint8Array | null, dataLen: number, data0: number | bigint = 0): Promise<number> {
    const run = async () => {
      if (data) this.scratch.bytes.set(data, 0);
      const idx = this.ring.prepUringCmd(this.fd, this.ioctlEncode ? op : legacyOp, null, 1);
      if (idx < 0) throw new UblkCommandError(name, idx);
      encodeCtrlCmd(this.ring.sqeView, this.ring.cmdOffset(idx), devId, dataLen ? this.scratch.address : 0, dataLen, data0);
      const sub = this.ring.submit(0);
      if (sub < 0) throw new UblkCommandError(name, sub);
      let res = 0;
      let waited = 0;
      while (this.ring.cqReady() === 0) {
        await sleep(waited < 50 ? 1 : 10);
        waited++;
        if (this.ring.cqReady() === 0) this.ring.submit(0); // flushes deferred completions, if any
      }
      res = this.ring.cqeRes(0);
      this.ring.cqAdvance(1);
      if (res < 0) throw new UblkCommandError(name, res);
      return res;
    };
    const p = this.chain.then(run, run);
    this.chain = p.catch(() => {});
    return p;
  }

  async getFeatures(): Promise<bigint> {
    await this.command('GET_FEATURES', UBLK_U_CMD_GET_FEATURES, 0x13, 0xffffffff, null, 8);
    return this.scratch.bytes.readBigUInt64LE(0);
  }

  async addDevice(info: Partial<DevInfo>): Promise<DevInfo> {
    const devId = info.devId ?? -1;
    await this.command('ADD_DEV', UBLK_U_CMD_ADD_DEV, LEGACY.ADD_DEV, devId, encodeDevInfo(info), 64);
    return decodeDevInfo(this.scratch.bytes.subarray(0, 64));
  }

  async setParams(devId: number, params: DeviceParams): Promise<void> {
    const bytes = encodeParams(params);
    await this.command('SET_PARAMS', UBLK_U_CMD_SET_PARAMS, LEGACY.SET_PARAMS, devId, bytes, bytes.length);
  }

  /** Returns the raw ublk_params bytes (for the devt: disk major/minor). */
  async getParams(devId: number): Promise<Uint8Array> {
    const req = new Uint8Array(112);
    new DataView(req.buffer).setUint32(0, 112, true);
    new DataView(req.buffer).setUint32(4, 0xf, true);
    await this.command('GET_PARAMS', UBLK_U_CMD_GET_PARAMS, LEGACY.GET_PARAMS, devId, req, 112);
    return this.scratch.bytes.slice(0, 112);
  }

  startDevice(devId: number, pid: number): Promise<number> {
    return this.command('START_DEV', UBLK_U_CMD_START_DEV, LEGACY.START_DEV, devId, null, 0, pid);
  }

  stopDevice(devId: number): Promise<number> {
    return this.command('STOP_DEV', UBLK_U_CMD_STOP_DEV, LEGACY.STOP_DEV, devId, null, 0);
  }

  /**
   * Begins the recovery of a device whose server died (USER_RECOVERY, state QUIESCED). The
   * kernel answers EBUSY until the old server's /dev/ublkcN is released; callers retry.
   */
  startUserRecovery(devId: number): Promise<number> {
    return this.command('START_USER_RECOVERY', UBLK_U_CMD_START_USER_RECOVERY, LEGACY.START_USER_RECOVERY, devId, null, 0);
  }

  /** Ends a recovery: like START_DEV it completes once this pid fetched every tag. */
  endUserRecovery(devId: number, pid: number): Promise<number> {
    return this.command('END_USER_RECOVERY', UBLK_U_CMD_END_USER_RECOVERY, LEGACY.END_USER_RECOVERY, devId, null, 0, pid);
  }

  /**
   * QUIESCE_DEV (devices added with UBLK_F_QUIESCE only; no legacy opcode): resolves once the
   * kernel holds new requests and aborted the idle fetches (abi.ts). Rejects with EBUSY when a
   * queue had no idle tag within `timeoutMs` (the kernel still holds new requests then).
   */
  quiesceDevice(devId: number, timeoutMs: number): Promise<number> {
    return this.command('QUIESCE_DEV', UBLK_U_CMD_QUIESCE_DEV, UBLK_U_CMD_QUIESCE_DEV, devId, null, 0, Math.max(1, Math.round(timeoutMs)));
  }

  /**
   * Polls GET_DEV_INFO until the device's state is one of `states` (UBLK_S_DEV_*). Returns the
   * info, or null when the device disappeared; throws after `timeoutMs`.
   */
  async waitForState(devId: number, states: readonly number[], timeoutMs: number): Promise<DevInfo | null> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const info = await this.deviceInfo(devId);
      if (!info || states.includes(info.state)) return info;
      if (Date.now() >= until) throw new UblkError(`ublk device ${devId} stayed in state ${info.state} (waited for ${states.join('|')})`, 'EBUSY');
      await sleep(50);
    }
  }

  /**
   * UBLK_F_UPDATE_SIZE (6.14+): sets the live device's capacity to `sectors` (512-byte) — the
   * kernel stores it as params.basic.dev_sectors and calls set_capacity_and_notify (a uevent; the
   * block device's size changes at once). Older kernels answer EINVAL/EOPNOTSUPP.
   */
  updateSize(devId: number, sectors: number): Promise<number> {
    return this.command('UPDATE_SIZE', UBLK_U_CMD_UPDATE_SIZE, 0x15, devId, null, 0, BigInt(sectors));
  }

  deleteDevice(devId: number): Promise<number> {
    return this.command('DEL_DEV', UBLK_U_CMD_DEL_DEV, LEGACY.DEL_DEV, devId, null, 0);
  }

  /**
   * DEL_DEV without waiting until the last reference to the device is dropped (6.9+): for a
   * device a command of this process still holds (an END_USER_RECOVERY that never completes),
   * whose reference only this process's exit releases; DEL_DEV would wait for it forever.
   */
  deleteDeviceAsync(devId: number): Promise<number> {
    return this.command('DEL_DEV_ASYNC', UBLK_U_CMD_DEL_DEV_ASYNC, 0x14, devId, null, 0);
  }

  /** The device's info, or null when no device has that id. */
  async deviceInfo(devId: number): Promise<DevInfo | null> {
    try {
      await this.command('GET_DEV_INFO', UBLK_U_CMD_GET_DEV_INFO, LEGACY.GET_DEV_INFO, devId, null, 64);
    } catch (err) {
      if (err instanceof UblkCommandError && err.errno === -19 /* ENODEV */) return null;
      throw err;
    }
    return decodeDevInfo(this.scratch.bytes.subarray(0, 64));
  }
}
