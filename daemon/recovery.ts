/**
 * The FVD side of ublk user recovery (docs/DESIGN.md §7): which device left by a dead server
 * belongs to the image being served, when a leftover may be deleted, and the waits of the
 * recovery sequence. daemon/ublk/ knows the commands; the decisions are here.
 *
 * A device is "ours" only when every mark agrees: fvd's tag and the crc32 of the image's file
 * identity in ublksrv_flags (set by ADD_DEV, kept by the kernel), a state file of this boot with
 * the same file identity and device id, and the geometry that state file recorded.
 */
import fs from 'node:fs';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { FvdError } from '../fvd/errors.js';
import { UblkControl } from './ublk/control.js';
import {
  FVD_SERVER_TAG,
  UBLK_F_QUIESCE,
  UBLK_F_USER_RECOVERY,
  UBLK_F_USER_RECOVERY_REISSUE,
  UBLK_S_DEV_DEAD,
  UBLK_S_DEV_FAIL_IO,
  UBLK_S_DEV_LIVE,
  UBLK_S_DEV_QUIESCED,
  type DevInfo,
} from './ublk/abi.js';
import { listStates, recoveringFile, removeState, stateDir, type DeviceState } from './state.js';

/** ADD_DEV flags of a device that outlives its server: held requests are reissued, not failed. */
export const RECOVERY_FLAGS = UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;

/**
 * The UBLK_F_* flags ADD_DEV asks for. A recoverable device also asks for QUIESCE when the kernel
 * offers it (GET_FEATURES; 7.x), so that a hand-off can drain (§7.5); the kernel refuses QUIESCE
 * without USER_RECOVERY, and a device that dies with its server has no use for it.
 */
export function addDevFlags(recovery: boolean, offered: bigint | null): bigint {
  if (!recovery) return 0n;
  return RECOVERY_FLAGS | ((offered ?? 0n) & UBLK_F_QUIESCE);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The current boot's id: a pending log or a waiting device from another boot is not ours. */
export function currentBootId(): string {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return 'unknown-boot';
  }
}

/** The image file's identity ("dev:ino"): the same file whatever path names it. */
export function fileIdOf(image: string): string {
  const st = fs.statSync(image);
  return `${st.dev}:${st.ino}`;
}

/** Where the volatile pending log of that file lives (tmpfs under /run/fvd). */
export function pendingLogPath(fileId: string): string {
  return path.join(stateDir(), `pending-${fileId.replace(':', '-')}.log`);
}

/** ublksrv_flags of a recoverable device: fvd's tag plus the crc32 of the file identity. */
export function serverFlagsFor(fileId: string): bigint {
  return FVD_SERVER_TAG | BigInt(crc32(Buffer.from(fileId)) >>> 0);
}

/**
 * Whether process `pid` still runs. A zombie (exited, not yet reaped by its parent) does not: it
 * closed its files, /dev/ublkcN among them, when it exited, so its device can be taken over.
 */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
  const fields = procStatFields(pid);
  return fields === null || fields[0] !== 'Z'; // no /proc (or hidden): trust kill(0)
}

/**
 * The fields of /proc/PID/stat after "pid (comm)" — [0] is the state (field 3), [19] the start
 * time (field 22) — or null when it cannot be read. comm may hold spaces and parentheses, so the
 * fields start after the last ')'.
 */
export function procStatFields(pid: number): string[] | null {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'latin1');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  } catch {
    return null;
  }
}

/** Waits until process `pid` is gone (pidAlive false), polling every 50 ms; false on time-out. */
export async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const until = Date.now() + timeoutMs;
  while (pidAlive(pid)) {
    if (Date.now() > until) return false;
    await sleep(50);
  }
  return true;
}

/** Every mark agrees that this kernel device is the one this state file describes. */
export function isOurs(info: DevInfo, st: DeviceState): boolean {
  return (
    st.fileId !== undefined &&
    info.devId === st.devId &&
    info.ublksrvFlags === serverFlagsFor(st.fileId) &&
    (info.flags & RECOVERY_FLAGS) === RECOVERY_FLAGS &&
    info.nrHwQueues === st.queues &&
    info.queueDepth === st.depth &&
    (st.maxIo === undefined || info.maxIoBufBytes >= st.maxIo)
  );
}

/** A device that waits (or will wait, once the kernel saw the exit) for a new server. */
function waiting(info: DevInfo): boolean {
  if (info.state === UBLK_S_DEV_QUIESCED || info.state === UBLK_S_DEV_FAIL_IO) return true;
  // LIVE with a dead pid: the kernel has not processed the exit yet.
  return info.state === UBLK_S_DEV_LIVE && !(info.ublksrvPid > 0 && pidAlive(info.ublksrvPid));
}

export interface OwnDevice {
  state: DeviceState;
  info: DevInfo;
}

/**
 * The device this image's dead server left waiting, or null. `devId` ≥ 0 (--dev-id) must name it
 * when there is one: asking for another id while the image's device waits is refused.
 */
export async function findOwnDevice(ctl: UblkControl, fileId: string, bootId: string, devId: number): Promise<OwnDevice | null> {
  for (const st of listStates()) {
    if (st.fileId !== fileId || st.bootId !== bootId) continue;
    if (pidAlive(st.pid)) throw new FvdError(`${st.image} is already served by pid ${st.pid} (${st.device})`, 'EBUSY');
    const info = await ctl.deviceInfo(st.devId);
    if (!info || !isOurs(info, st) || !waiting(info)) continue;
    if (devId >= 0 && devId !== st.devId)
      throw new FvdError(`device ${st.devId} is waiting for this image's server: serve it without --dev-id or with --dev-id ${st.devId}`, 'EBUSY');
    return { state: st, info };
  }
  return null;
}

/**
 * The size a recovery serves (docs/DESIGN.md §8). The waiting device keeps the size its last
 * UPDATE_SIZE (or SET_PARAMS) gave it; the image's header may be larger, and only an online grow
 * interrupted between its header write and UPDATE_SIZE makes it so: then the device is recovered
 * at its own size (`pendingGrow`, the grow is finished once it is LIVE). A device larger than the
 * image is no state fvd ever leaves (an image never shrinks while served): refused in one line.
 */
export function recoverySize(devId: number, deviceSectors: number, imageBytes: number): { deviceBytes: number; pendingGrow: boolean } {
  const deviceBytes = deviceSectors * 512;
  if (deviceBytes > imageBytes)
    throw new FvdError(`device ${devId} has ${deviceSectors} sectors but the image is ${imageBytes / 512}: not recovering it (a device larger than its image)`, 'EINVAL');
  return { deviceBytes, pendingGrow: deviceBytes < imageBytes };
}

/**
 * A server killed without cleanup leaves its device id occupied. Leftovers are deleted only when
 * they are ours (fvd's tag, a state file naming the id) and will never be recovered: no recovery
 * flags, or DEAD. A device that waits for its server is left alone — this image's own one is
 * recovered instead (findOwnDevice, before this runs), another image's waits for its own server,
 * and `fvd stop` deletes it. Someone else's device is never touched.
 */
export async function removeStaleDevice(ctl: UblkControl, devId: number, log: (s: string) => void): Promise<void> {
  const states = new Map<number, DeviceState>();
  for (const st of listStates()) states.set(st.devId, st);
  const candidates = new Set<number>();
  if (devId >= 0) candidates.add(devId);
  for (const st of states.values()) if (!pidAlive(st.pid)) candidates.add(st.devId);
  for (const id of candidates) {
    const info = await ctl.deviceInfo(id);
    if (!info) {
      if (states.has(id)) removeState(id);
      continue;
    }
    const tagged = (info.ublksrvFlags & FVD_SERVER_TAG) === FVD_SERVER_TAG;
    const alive = info.ublksrvPid > 0 && pidAlive(info.ublksrvPid);
    const st = states.get(id);
    const recoverable = (info.flags & UBLK_F_USER_RECOVERY) !== 0n && info.state !== UBLK_S_DEV_DEAD;
    if (tagged && !alive && recoverable) {
      if (id === devId) {
        const image = st?.image ?? 'unknown image';
        throw new FvdError(`device ${id} is waiting for its server (image ${image}): 'fvd stop ${id}' deletes it`, 'EBUSY');
      }
      continue; // another image's device, waiting for its own server
    }
    if (!tagged || alive) {
      if (id === devId) {
        const who = alive ? `pid ${info.ublksrvPid}` : 'another program';
        throw new FvdError(`ublk device id ${id} is in use by ${who}${info.state === UBLK_S_DEV_LIVE ? ' (live)' : ''}`, 'EBUSY');
      }
      continue;
    }
    log(`removing stale device ${id} left by dead fvd server (pid ${info.ublksrvPid})`);
    await ctl.stopDevice(id).catch(() => {});
    await ctl.deleteDevice(id);
    removeState(id);
  }
}

/**
 * Waits until the old server is gone: its pid, then the kernel's view (QUIESCED or FAIL_IO).
 * DEAD means the device cannot be recovered; the caller deletes it and starts afresh.
 */
export async function waitForOldServer(ctl: UblkControl, own: OwnDevice, log: (s: string) => void, timeoutMs = 30_000): Promise<DevInfo | null> {
  const until = Date.now() + timeoutMs;
  if (pidAlive(own.state.pid)) {
    log(`waiting for pid ${own.state.pid} (the previous server) to exit`);
    if (!(await waitForExit(own.state.pid, timeoutMs))) throw new FvdError(`the previous server (pid ${own.state.pid}) did not exit`, 'EBUSY');
  }
  const info = await ctl.waitForState(own.state.devId, [UBLK_S_DEV_QUIESCED, UBLK_S_DEV_FAIL_IO, UBLK_S_DEV_DEAD], Math.max(1000, until - Date.now()));
  return info && info.state !== UBLK_S_DEV_DEAD ? info : null;
}

/**
 * Marks device `devId` as being taken over by this process: the old server's warden
 * (daemon/warden.ts) must not expire the device in the meantime.
 */
export function markRecovering(devId: number): void {
  fs.writeFileSync(recoveringFile(devId), `${process.pid}\n`);
}

/** The takeover of `devId` is over (done, or failed): the warden's rules apply again. */
export function unmarkRecovering(devId: number): void {
  fs.rmSync(recoveringFile(devId), { force: true });
}

/** The one line of a continued recovery that cannot be completed: why, and what to do. */
export function unrecoverable(id: number, why: string): FvdError {
  return new FvdError(
    `device ${id} cannot be recovered (${why}): most likely the server whose recovery was interrupted had already mapped or fetched part of it, ` +
      `and this kernel lets no other server finish that; the device is stopped and deleted (held I/O fails). ` +
      `If it is still there, 'fvd stop ${id}' deletes it; then serve the image again`,
    'EIO',
  );
}

/**
 * Live restart (docs/DESIGN.md §7.5): asks the live server `st` to leave its device to the next
 * server (SIGHUP: journal committed, exit without deleting the device) and waits until it is gone.
 */
export async function handOffServer(st: DeviceState, timeoutMs: number): Promise<void> {
  if (!((st.recoveryWait ?? 0) > 0) || st.fileId === undefined)
    throw new FvdError(`${st.device} (${st.name}) is served without --recovery-wait: its device cannot outlive its server, so it cannot be handed over (stop it and serve again)`, 'EINVAL');
  process.kill(st.pid, 'SIGHUP');
  if (!(await waitForExit(st.pid, timeoutMs)))
    throw new FvdError(`${st.device}: server pid ${st.pid} did not hand the device over within ${timeoutMs / 1000} s`, 'EBUSY');
}

/** The live server of the image file `fileId` in this boot, if any (for `serve --takeover`). */
export function liveServerOf(fileId: string, bootId: string): DeviceState | null {
  for (const st of listStates()) if (st.fileId === fileId && st.bootId === bootId && pidAlive(st.pid)) return st;
  return null;
}

/**
 * What a refused START_USER_RECOVERY means for a device of ours (docs/DESIGN.md §7, "An interrupted
 * recovery"), from its errno and the device's info read right after:
 * - 'retry': EBUSY, the old server's /dev/ublkcN is not released yet.
 * - 'continue': EINVAL while the device is QUIESCED with both recovery flags and fvd's tag. Linux
 *   6.12 accepts START_USER_RECOVERY only while at least one queue has all its tags fetched, and a
 *   START resets that count; so once a server dies between its START and the fetch of a whole
 *   queue, every later START is refused. What that START did stands (queues reset, no server), so
 *   the next server takes up its recovery where it stopped: fetch every tag, END_USER_RECOVERY.
 * - 'fail': anything else.
 */
export function startRefusal(errno: number, info: DevInfo | null): 'retry' | 'continue' | 'fail' {
  if (errno === -16 /* EBUSY */) return 'retry';
  if (errno !== -22 /* EINVAL */ || !info) return 'fail';
  const ours = (info.flags & RECOVERY_FLAGS) === RECOVERY_FLAGS && (info.ublksrvFlags & FVD_SERVER_TAG) === FVD_SERVER_TAG;
  return ours && info.state === UBLK_S_DEV_QUIESCED ? 'continue' : 'fail';
}

/**
 * START_USER_RECOVERY, retried while the kernel still holds the old server's /dev/ublkcN (EBUSY).
 * 'continue': refused because an earlier server's recovery was interrupted (startRefusal); the
 * caller continues that recovery instead of starting one.
 */
export async function startRecoveryRetrying(ctl: UblkControl, devId: number, timeoutMs = 10_000): Promise<'started' | 'continue'> {
  const until = Date.now() + timeoutMs;
  let delay = 10;
  for (;;) {
    try {
      await ctl.startUserRecovery(devId);
      return 'started';
    } catch (err) {
      const errno = (err as { errno?: number }).errno ?? 0;
      const what = startRefusal(errno, errno === -22 ? await ctl.deviceInfo(devId) : null);
      if (what === 'continue') return 'continue';
      if (what === 'fail') throw err;
      if (Date.now() > until)
        throw new FvdError(
          `device ${devId} cannot be recovered now: START_USER_RECOVERY still refused (EBUSY) after ${timeoutMs / 1000} s: /dev/ublkc${devId} is still held (by the previous server's process, not yet exited, or by another process); the device keeps waiting`,
          'EBUSY',
        );
      await sleep(delay);
      delay = Math.min(delay * 2, 500);
    }
  }
}
