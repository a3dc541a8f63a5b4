/**
 * Operational figures of a served device, written every few seconds by `fvd serve`:
 *  - as JSON next to the device's run-time record (/run/fvd/ublkbN.figures.json), which
 *    `fvd list --output=json` shows;
 *  - optionally (`--metrics-file PATH`, METRICS_FILE=) in the Prometheus text format, for
 *    node_exporter's textfile collector (e.g. /var/lib/prometheus/node-exporter/fvd-NAME.prom),
 *    written to PATH.tmp and renamed over PATH, so the collector never reads half a file.
 * Stable device names: /dev/fvd/NAME, a symlink to /dev/ublkbN made at start and removed at stop
 * (FVD_DEV_LINK_DIR overrides the directory), for hypervisor configurations.
 */
import fs from 'node:fs';
import path from 'node:path';

export interface DeviceFigures {
  name: string;
  device: string;
  image: string;
  virtualSize: number;
  /** Requests the queue workers served themselves, and those handed to the engine. */
  requestsFast: number;
  requestsEngine: number;
  flushes: number;
  errors: number;
  /** Requests timed by the workers (fetch to commit) and their summed latency. */
  latencyCount: number;
  latencySecondsSum: number;
  /** Bytes the guest read and wrote through the device (requests completed, either path). */
  bytesRead: number;
  bytesWritten: number;
  inFlight: number;
  prefetch: { state: string; fraction: number; bytesDone: number; bytesRemaining: number } | null;
  updatedAt: string;
}

export function figuresFile(stateDir: string, devId: number): string {
  return path.join(stateDir, `ublkb${devId}.figures.json`);
}

export function writeAtomically(file: string, text: string): void {
  const tmp = `${file}.tmp`;
  fs.writeFileSync(tmp, text);
  fs.renameSync(tmp, file);
}

const esc = (v: string) => v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');

/** Prometheus text exposition format (version 0.0.4). */
export function prometheusText(f: DeviceFigures): string {
  const l = `name="${esc(f.name)}",device="${esc(f.device)}"`;
  const out: string[] = [];
  const metric = (name: string, type: string, help: string, samples: Array<[string, number]>) => {
    out.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
    for (const [labels, v] of samples) out.push(`${name}{${l}${labels}} ${Number.isFinite(v) ? v : 0}`);
  };
  metric('fvd_up', 'gauge', 'The device is served (1).', [['', 1]]);
  metric('fvd_virtual_size_bytes', 'gauge', 'Virtual disk size.', [['', f.virtualSize]]);
  metric('fvd_requests_total', 'counter', 'Requests completed, by who served them: the queue workers (fast) or the engine (engine hand-offs).', [
    [',path="fast"', f.requestsFast],
    [',path="engine"', f.requestsEngine],
  ]);
  metric('fvd_flushes_total', 'counter', 'Flush requests.', [['', f.flushes]]);
  metric('fvd_errors_total', 'counter', 'Requests failed with an error.', [['', f.errors]]);
  metric('fvd_request_latency_seconds_sum', 'counter', 'Summed request latency inside the daemon (fetch to commit).', [['', f.latencySecondsSum]]);
  metric('fvd_request_latency_seconds_count', 'counter', 'Requests timed for fvd_request_latency_seconds_sum.', [['', f.latencyCount]]);
  metric('fvd_bytes_total', 'counter', 'Bytes the guest read and wrote through the device.', [
    [',op="read"', f.bytesRead],
    [',op="write"', f.bytesWritten],
  ]);
  metric('fvd_requests_in_flight', 'gauge', 'Requests being served.', [['', f.inFlight]]);
  if (f.prefetch) {
    metric('fvd_prefetch_ratio', 'gauge', 'Fraction of the base copied into the image.', [['', f.prefetch.fraction]]);
    metric('fvd_prefetch_bytes_total', 'counter', 'Base bytes copied in by background prefetching.', [['', f.prefetch.bytesDone]]);
    metric('fvd_prefetch_remaining_bytes', 'gauge', 'Base bytes not yet in the image.', [['', f.prefetch.bytesRemaining]]);
  }
  return out.join('\n') + '\n';
}

/** /dev/fvd/NAME → /dev/ublkbN; a link left by a server that is gone is replaced. Returns its path or null. */
export function linkDevice(name: string, device: string, log: (line: string) => void): string | null {
  if (!/^[A-Za-z0-9_.:-]+$/.test(name) || name.startsWith('.')) {
    log(`no /dev/fvd link: the name '${name}' is not a safe file name`);
    return null;
  }
  const dir = process.env.FVD_DEV_LINK_DIR ?? '/dev/fvd';
  const link = path.join(dir, name);
  try {
    fs.mkdirSync(dir, { recursive: true, mode: 0o755 });
    fs.rmSync(link, { force: true });
    fs.symlinkSync(device, link);
    return link;
  } catch (err) {
    log(`no ${link} link: ${(err as Error).message}`);
    return null;
  }
}

/** Removes the link if it still points at our device (another server may have taken the name). */
export function unlinkDevice(link: string | null, device: string): void {
  if (!link) return;
  try {
    if (fs.readlinkSync(link) === device) fs.rmSync(link, { force: true });
  } catch {
    // already gone
  }
}
