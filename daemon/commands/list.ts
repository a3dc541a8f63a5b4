/**
 * fvd list [--output=human|json]: devices served by fvd on this host, with their state and, as
 * JSON, the figures the server publishes every 5 s (requests, engine hand-offs, errors, latency,
 * prefetch progress: daemon/metrics.ts). States:
 *   running     its server runs;
 *   waiting     the server died, the device (--recovery-wait) waits for a new one; `expiresIn`
 *               is the seconds its warden leaves it (null: no warden, it waits until `fvd stop`);
 *   recovering  a new server is taking it over;
 *   stale       the server is gone and so is the device, or it was never recoverable.
 */
import fs from 'node:fs';
import { formatSize } from '../args.js';
import { OUTPUT_OPTIONS, defineCommand, outputFormat, parseCommand, usageError } from '../command.js';
import { listStates, stateDir, type DeviceState } from '../state.js';
import { figuresFile, type DeviceFigures } from '../metrics.js';
import { pidAlive } from '../server.js';
import { readWarden, recoveringPid, type WardenRecord } from '../warden.js';
import { oneLine } from '../../fvd/errors.js';

/** The figures the server last published (every 5 s), or null. */
function readFigures(devId: number): DeviceFigures | null {
  try {
    return JSON.parse(fs.readFileSync(figuresFile(stateDir(), devId), 'utf8')) as DeviceFigures;
  } catch {
    return null;
  }
}

export const spec = defineCommand({
  name: 'list',
  summary: 'list the devices served by fvd on this host',
  usage: ['[--output=human|json]'],
  options: { ...OUTPUT_OPTIONS },
});

export type DeviceStatus =
  | { state: 'running' }
  | { state: 'waiting'; expiresIn: number | null }
  | { state: 'recovering'; recoveringPid: number }
  | { state: 'stale' };

/** What `fvd list` sees of one device, besides its state file. */
export interface DeviceProbe {
  serverAlive: boolean;
  deviceExists: boolean;
  /** A live server's pid in the device's recovering marker, or null. */
  recoveringPid: number | null;
  /** The warden's record, if its warden still runs. */
  warden: WardenRecord | null;
  now: number;
}

export function classify(st: DeviceState, p: DeviceProbe): DeviceStatus {
  if (p.serverAlive && p.deviceExists) return { state: 'running' };
  if (st.fileId === undefined || !p.deviceExists) return { state: 'stale' };
  if (p.recoveringPid !== null) return { state: 'recovering', recoveringPid: p.recoveringPid };
  const deadline = p.warden && p.warden.serverPid === st.pid ? p.warden.deadline : undefined;
  return { state: 'waiting', expiresIn: deadline === undefined ? null : Math.max(0, Math.ceil((deadline - p.now) / 1000)) };
}

function probe(st: DeviceState): DeviceProbe {
  const warden = readWarden(st.devId);
  return {
    serverAlive: pidAlive(st.pid),
    deviceExists: fs.existsSync(st.device),
    recoveringPid: recoveringPid(st.devId),
    warden: warden && pidAlive(warden.pid) ? warden : null,
    now: Date.now(),
  };
}

function describe(s: DeviceStatus, st: DeviceState): string {
  switch (s.state) {
    case 'running':
      return '';
    case 'recovering':
      return `  (recovering: pid ${s.recoveringPid} is taking it over)`;
    case 'waiting':
      return s.expiresIn === null
        ? `  (waiting for a daemon, no expiry: 'fvd stop ${st.devId}' deletes it)`
        : `  (waiting for a daemon: deleted in ${s.expiresIn} s)`;
    case 'stale':
      return '  (stale: server gone)';
  }
}

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length) throw usageError(spec);
  const rows = listStates().map((s) => {
    const status = classify(s, probe(s));
    const running = status.state === 'running';
    return { ...s, ...status, running, figures: running ? readFigures(s.devId) : null };
  });
  if (outputFormat(values) === 'json') {
    console.log(JSON.stringify(rows, null, 2));
    return 0;
  }
  console.log(`${'NAME'.padEnd(16)}${'DEVICE'.padEnd(14)}${'SIZE'.padEnd(11)}${'PID'.padEnd(9)}IMAGE`);
  for (const r of rows)
    console.log(oneLine(`${r.name.padEnd(16)}${r.device.padEnd(14)}${formatSize(r.size).padEnd(11)}${String(r.pid).padEnd(9)}${r.image}${describe(r, r)}`));
  return 0;
}
