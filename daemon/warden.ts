/**
 * The warden (docs/DESIGN.md §7): a device added with --recovery-wait SEC outlives its server,
 * and the kernel has no timeout for a device that waits for one. `fvd serve` therefore starts
 * this small detached process (`fvd __warden`, not listed in the help), which watches the server
 * and, SEC seconds after the server died without a new server taking the device over, deletes
 * the device (held I/O fails with EIO) and its state file.
 *
 * It deletes only the device its own server left: the state file still names that pid, every
 * mark of daemon/recovery.ts agrees, the kernel still records that pid as the device's server,
 * the device waits (QUIESCED/FAIL_IO), no new server is recovering it (marker, image lock).
 * Anything else ends the warden, never the device.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { UblkControl } from './ublk/control.js';
import { UBLK_S_DEV_FAIL_IO, UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED, type DevInfo } from './ublk/abi.js';
import { isOurs, pidAlive, procStatFields } from './recovery.js';
import { listStates, recoveringFile, removeState, wardenFile, type DeviceState } from './state.js';
import { takeLock } from '../storage/node-file.js';

/** How often the warden looks at the server and, once it is gone, at the device. */
export const WARDEN_POLL_MS = 500;

/** What the warden knows at one look. */
export interface WardenView {
  now: number;
  /** The watched server still runs (same pid, same start time). */
  serverAlive: boolean;
  /** When the warden first saw the server gone, or null. */
  deathAt: number | null;
  /** The device's state file, or null when there is none. */
  state: DeviceState | null;
  /** GET_DEV_INFO of the device, or null when it is gone. */
  info: DevInfo | null;
  /** A new server recovering the device (its marker names a live pid). */
  recovering: boolean;
}

export type WardenVerdict = { act: 'watch'; ms: number } | { act: 'exit'; why: string } | { act: 'delete' };

/**
 * The warden's decision from one look: keep watching (for how long), give up (why), or delete.
 * `pid` is the watched server, `devId` its device, `waitSec` its --recovery-wait.
 */
export function decide(v: WardenView, pid: number, devId: number, waitSec: number): WardenVerdict {
  const st = v.state;
  if (v.serverAlive) return { act: 'watch', ms: WARDEN_POLL_MS };
  if (!st) return { act: 'exit', why: 'the state file is gone (stopped cleanly or deleted)' };
  if (st.devId !== devId || st.pid !== pid) return { act: 'exit', why: `taken over by pid ${st.pid}` };
  if (!v.info) return { act: 'exit', why: 'the device is gone' };
  if (!isOurs(v.info, st)) return { act: 'exit', why: 'the device is not the one the server left' };
  // The kernel sets ublksrv_pid to -1 when it sees its server gone (7.x); a positive pid other than
  // ours is a new server's (END_USER_RECOVERY).
  if (v.info.ublksrvPid > 0 && v.info.ublksrvPid !== pid) return { act: 'exit', why: `the device is served by pid ${v.info.ublksrvPid}` };
  const waits =
    v.info.state === UBLK_S_DEV_QUIESCED || v.info.state === UBLK_S_DEV_FAIL_IO || (v.info.state === UBLK_S_DEV_LIVE && !pidAlive(pid));
  if (!waits) return { act: 'exit', why: `the device is in state ${v.info.state}, not waiting` };
  if (v.recovering) return { act: 'watch', ms: WARDEN_POLL_MS };
  const left = (v.deathAt ?? v.now) + waitSec * 1000 - v.now;
  if (left > 0) return { act: 'watch', ms: Math.min(left, WARDEN_POLL_MS) };
  return { act: 'delete' };
}

/** The warden's record next to the state file: when the device expires (for `fvd list`). */
export interface WardenRecord {
  pid: number;
  serverPid: number;
  /** ms since the epoch; absent while the server runs. */
  deadline?: number;
}

export function readWarden(devId: number): WardenRecord | null {
  try {
    return JSON.parse(fs.readFileSync(wardenFile(devId), 'utf8')) as WardenRecord;
  } catch {
    return null;
  }
}

export function recoveringPid(devId: number): number | null {
  try {
    const pid = Number(fs.readFileSync(recoveringFile(devId), 'utf8').trim());
    return pid > 0 && pidAlive(pid) ? pid : null;
  } catch {
    return null;
  }
}

/** The process's start time (/proc/PID/stat field 22), so a reused pid is not taken for the server. */
export function startTimeOf(pid: number): string | null {
  return procStatFields(pid)?.[19] ?? null;
}

/**
 * Starts the warden of the device this server serves: detached (own session, not waited for),
 * stdout ignored, stderr the server's (its one line lands in the server's log).
 */
export function spawnWarden(devId: number, log: (s: string) => void): void {
  const cli = fileURLToPath(new URL('./cli.js', import.meta.url));
  const start = startTimeOf(process.pid) ?? '';
  try {
    const child = spawn(process.execPath, [cli, '__warden', String(process.pid), start, String(devId)], {
      detached: true,
      stdio: ['ignore', 'ignore', 'inherit'],
    });
    child.on('error', (err) => log(`cannot start the warden: ${err.message}`));
    child.unref();
  } catch (err) {
    log(`cannot start the warden: ${(err as Error).message}; the device waits until 'fvd stop ${devId}' if this server dies`);
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function look(pid: number, start: string, devId: number, deathAt: number | null, info: DevInfo | null): WardenView {
  const now = Date.now();
  // While the server runs, one kill(0) and one small /proc read per look: nothing else is read.
  if (pidAlive(pid) && (start === '' || startTimeOf(pid) === start)) return { now, serverAlive: true, deathAt, state: null, info, recovering: false };
  const state = listStates().find((s) => s.devId === devId) ?? null;
  return { now, serverAlive: false, deathAt, state, info, recovering: recoveringPid(devId) !== null };
}

/**
 * `fvd __warden PID START DEVID`: runs until the device is taken over, stopped or expired.
 * `fvd __warden --instance NAME` (fvd-expire@NAME.service, after the unit stopped): the same for
 * the device of instance NAME whose server is gone, counting from now; nothing to do otherwise.
 */
export async function runWarden(args: string[]): Promise<number> {
  if (args[0] === '--instance') {
    const st = listStates().find((s) => s.name === args[1] && !pidAlive(s.pid) && (s.recoveryWait ?? 0) > 0);
    if (!st) return 0;
    args = [String(st.pid), '', String(st.devId)];
  }
  const [pidArg, start = '', devArg] = args;
  const pid = Number(pidArg);
  const devId = Number(devArg);
  if (!(pid > 0) || !(devId >= 0)) throw new Error('usage: fvd __warden PID START DEVID');
  const say = (s: string) => {
    try {
      process.stderr.write(`fvd warden of /dev/ublkb${devId}: ${s}\n`);
    } catch {
      // the server's log may be gone with it; nothing to tell then
    }
  };
  process.on('SIGPIPE', () => {});
  const wait = listStates().find((s) => s.devId === devId && s.pid === pid)?.recoveryWait ?? 0;
  if (wait <= 0) return 0;
  let deathAt: number | null = null;
  let ctl: UblkControl | null = null;
  try {
    for (;;) {
      let v = look(pid, start, devId, deathAt, null);
      if (!v.serverAlive) {
        if (deathAt === null) {
          deathAt = v.now;
          v.deathAt = deathAt;
          writeRecord({ pid: process.pid, serverPid: pid, deadline: deathAt + wait * 1000 }, devId);
        }
        // The driver is asked only about a device whose state file still names this server.
        if (v.state?.pid === pid) {
          ctl ??= await UblkControl.open();
          v = { ...v, info: await ctl.deviceInfo(devId) };
        }
      }
      let verdict = decide(v, pid, devId, wait);
      if (verdict.act === 'watch') {
        await sleep(verdict.ms);
        continue;
      }
      if (verdict.act === 'delete') verdict = await deleteUnderLock(ctl!, v.state!, pid, devId, wait, deathAt!, start, say);
      if (verdict.act === 'exit') {
        if (v.state && verdict.why !== 'deleted') say(`not deleting it: ${verdict.why}`);
        return 0;
      }
    }
  } finally {
    ctl?.close();
    const rec = readWarden(devId);
    if (rec?.pid === process.pid) fs.rmSync(wardenFile(devId), { force: true });
  }
}

function writeRecord(rec: WardenRecord, devId: number): void {
  const file = wardenFile(devId);
  fs.writeFileSync(file + '.tmp', JSON.stringify(rec) + '\n');
  fs.renameSync(file + '.tmp', file);
}

/**
 * The deadline passed: with the image's lock held (a recovering server holds it from its open
 * until it stops, so the lock's holder is never a server mid-takeover), look once more, then
 * STOP_DEV + DEL_DEV.
 */
async function deleteUnderLock(
  ctl: UblkControl,
  st: DeviceState,
  pid: number,
  devId: number,
  wait: number,
  deathAt: number,
  start: string,
  say: (s: string) => void,
): Promise<WardenVerdict> {
  let fd: number;
  try {
    fd = fs.openSync(st.image, 'r');
  } catch (err) {
    return { act: 'exit', why: `cannot open the image to lock it (${(err as Error).message})` };
  }
  try {
    const sb = fs.fstatSync(fd);
    if (`${sb.dev}:${sb.ino}` !== st.fileId) return { act: 'exit', why: `${st.image} is no longer the image the device served` };
    try {
      takeLock(fd, st.image, 'exclusive');
    } catch {
      return { act: 'exit', why: 'the image is locked: a new server is taking the device over' };
    }
    const v = { ...look(pid, start, devId, deathAt, null), info: await ctl.deviceInfo(devId) };
    const verdict = decide(v, pid, devId, wait);
    if (verdict.act !== 'delete') return verdict.act === 'exit' ? verdict : { act: 'exit', why: 'a new server is recovering it' };
    await ctl.stopDevice(devId).catch(() => {});
    await ctl.deleteDevice(devId);
    removeState(devId);
    say(`deleted: no server took it over within ${wait} s of pid ${pid}'s death (held I/O fails with EIO)`);
    return { act: 'exit', why: 'deleted' };
  } finally {
    fs.closeSync(fd);
  }
}
