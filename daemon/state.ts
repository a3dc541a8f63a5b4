/**
 * Run-time records of served devices (/run/fvd/ublkbN.json), for `fvd list`, `fvd stop` and for
 * finding devices left behind by a server that was killed.
 */
import fs from 'node:fs';
import path from 'node:path';

export interface DeviceState {
  name: string;
  devId: number;
  device: string;
  image: string;
  pid: number;
  size: number;
  queues: number;
  depth: number;
  startedAt: string;
  /** One per queue: the thread serving it and whether it is an I/O flusher (PR_SET_IO_FLUSHER). */
  queueThreads?: { tid: number; ioFlusher: boolean }[];
  /** Recovery (serve --recovery-wait): the image file's identity "dev:ino", as daemon/recovery.ts checks it. */
  fileId?: string;
  /** Recovery: the boot the device was added in (a state file of another boot names nothing). */
  bootId?: string;
  /** Recovery: the largest request, part of the geometry a recovering server must match. */
  maxIo?: number;
  /** Recovery: seconds the device is meant to wait for a new server (0 or absent: no recovery). */
  recoveryWait?: number;
  /** Recovery: how many times a new server took the device over (0 for the first). */
  generation?: number;
  /** A remote base's transfer figures, refreshed with STATUS= (for `fvd info`). */
  remote?: RemoteStatus;
}

export interface RemoteStatus {
  url: string;
  bytesFetched: number;
  /** Bytes per second over the last status interval. */
  rate: number;
  /** Share of the base's bytes that are local (0..1). */
  fractionLocal: number;
  retries: number;
  failures: number;
  updatedAt: string;
  /**
   * Set while a base deferred by a recovery is not open (fvd/deferred-base.ts): 'unreachable'
   * (reads of blocks not yet local fail until the server is back) or 'refused' (changed on the
   * server: they fail for good).
   */
  base?: 'unreachable' | 'refused';
}

export function stateDir(): string {
  return process.env.FVD_RUN_DIR ?? '/run/fvd';
}

function stateFile(devId: number): string {
  return path.join(stateDir(), `ublkb${devId}.json`);
}

export function writeState(st: DeviceState): void {
  fs.mkdirSync(stateDir(), { recursive: true, mode: 0o755 });
  const file = stateFile(st.devId);
  fs.writeFileSync(file + '.tmp', JSON.stringify(st, null, 2) + '\n');
  fs.renameSync(file + '.tmp', file);
}

/** The expiry record of the device's warden (daemon/warden.ts), next to its state file. */
export function wardenFile(devId: number): string {
  return path.join(stateDir(), `ublkb${devId}.warden.json`);
}

/** The marker of a new server recovering the device (its pid), so nobody takes it for abandoned. */
export function recoveringFile(devId: number): string {
  return path.join(stateDir(), `ublkb${devId}.recovering`);
}

/** The control socket of the device's server (daemon/control-socket.ts), next to its state file. */
export function controlSocketFile(devId: number): string {
  return path.join(stateDir(), `ublkb${devId}.sock`);
}

export function removeState(devId: number): void {
  fs.rmSync(stateFile(devId), { force: true });
  // the figures `fvd serve` keeps next to it (daemon/metrics.ts)
  fs.rmSync(path.join(stateDir(), `ublkb${devId}.figures.json`), { force: true });
  fs.rmSync(wardenFile(devId), { force: true });
  fs.rmSync(recoveringFile(devId), { force: true });
  fs.rmSync(controlSocketFile(devId), { force: true });
}

export function listStates(): DeviceState[] {
  let names: string[];
  try {
    names = fs.readdirSync(stateDir());
  } catch {
    return [];
  }
  const out: DeviceState[] = [];
  for (const n of names) {
    if (!/^ublkb\d+\.json$/.test(n)) continue;
    try {
      out.push(JSON.parse(fs.readFileSync(path.join(stateDir(), n), 'utf8')) as DeviceState);
    } catch {
      // a half-written or foreign file: not ours to interpret
    }
  }
  return out.sort((a, b) => a.devId - b.devId);
}
