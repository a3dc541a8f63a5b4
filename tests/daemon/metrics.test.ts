/**
 * Operational figures: the Prometheus text `fvd serve --metrics-file` writes (every sample line
 * well-formed, labels escaped, written by atomic rename), and `fvd list --output=json` showing a
 * device's state and the figures its server published (a stale record has none).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { prometheusText, writeAtomically, figuresFile, linkDevice, unlinkDevice, type DeviceFigures } from '../../daemon/metrics.js';
import { TempDir, fvd } from '../helpers/cli.js';
import { spawnSync } from 'node:child_process';
import { CLI } from '../helpers/cli.js';

const tmp = new TempDir('fvd-metrics-');
test.after(() => tmp.cleanup());

const sample = (over: Partial<DeviceFigures> = {}): DeviceFigures => ({
  name: 'vm"1',
  device: '/dev/ublkb3',
  image: '/var/lib/fvd/vm1.fvd',
  virtualSize: 1 << 30,
  requestsFast: 1000,
  requestsEngine: 24,
  flushes: 7,
  errors: 1,
  latencyCount: 1024,
  latencySecondsSum: 0.0512,
  bytesRead: 4096 * 1000,
  bytesWritten: 65536,
  inFlight: 3,
  prefetch: { state: 'running', fraction: 0.25, bytesDone: 1 << 28, bytesRemaining: 3 << 28 },
  updatedAt: new Date().toISOString(),
  ...over,
});

test('prometheusText: HELP/TYPE for each metric, well-formed samples, escaped labels, the figures', () => {
  const text = prometheusText(sample());
  const lines = text.trimEnd().split('\n');
  const names = new Set<string>();
  for (const line of lines) {
    if (line.startsWith('# HELP ') || line.startsWith('# TYPE ')) {
      names.add(line.split(' ')[2]!);
      continue;
    }
    assert.match(line, /^[a-z_]+\{name="vm\\"1",device="\/dev\/ublkb3"(,[a-z]+="[a-z]+")?\} [0-9.e+-]+$/, line);
  }
  for (const n of ['fvd_requests_total', 'fvd_bytes_total', 'fvd_errors_total', 'fvd_request_latency_seconds_sum', 'fvd_request_latency_seconds_count', 'fvd_prefetch_ratio', 'fvd_flushes_total'])
    assert.ok(names.has(n), n);
  assert.match(text, /^fvd_requests_total\{[^}]*,path="engine"\} 24$/m);
  assert.match(text, /^fvd_request_latency_seconds_sum\{[^}]*\} 0\.0512$/m);
  assert.match(text, /^fvd_prefetch_ratio\{[^}]*\} 0\.25$/m);
  assert.match(text, /^fvd_bytes_total\{[^}]*,op="read"\} 4096000$/m);
  assert.match(text, /^fvd_bytes_total\{[^}]*,op="write"\} 65536$/m);
  assert.not.match(prometheusText(sample({ prefetch: null })), /fvd_prefetch/);
});

test('writeAtomically: the file is replaced whole; no .tmp left', () => {
  const f = path.join(tmp.caseDir(), 'fvd.prom');
  writeAtomically(f, 'a\n');
  writeAtomically(f, 'b\n');
  assert.is(fs.readFileSync(f, 'utf8'), 'b\n');
  assert.not.ok(fs.existsSync(`${f}.tmp`));
});

test('/dev/fvd/NAME links: made, replaced when stale, removed only while still ours', () => {
  const dir = tmp.caseDir();
  process.env.FVD_DEV_LINK_DIR = dir;
  const log: string[] = [];
  const l = linkDevice('vm1', '/dev/ublkb3', (x) => log.push(x));
  assert.is(l, path.join(dir, 'vm1'));
  assert.is(fs.readlinkSync(l!), '/dev/ublkb3');
  assert.is(linkDevice('vm1', '/dev/ublkb4', (x) => log.push(x)), l, 'a new server takes the name');
  unlinkDevice(l, '/dev/ublkb3');
  assert.is(fs.readlinkSync(l!), '/dev/ublkb4', 'the old server does not remove the new link');
  unlinkDevice(l, '/dev/ublkb4');
  assert.not.ok(fs.existsSync(l!));
  assert.is(linkDevice('../x', '/dev/ublkb5', (x) => log.push(x)), null);
  assert.match(log.join('\n'), /not a safe file name/);
  delete process.env.FVD_DEV_LINK_DIR;
});

test('fvd list --output=json: state and the published figures of a running device; a stale one has none', () => {
  const run = tmp.caseDir();
  const dev = path.join(run, 'fake-ublkb3');
  fs.writeFileSync(dev, '');
  const rec = (devId: number, pid: number) => ({ name: `d${devId}`, devId, device: devId === 3 ? dev : '/nonexistent', image: '/x.fvd', pid, size: 1 << 30, queues: 2, depth: 128, startedAt: new Date().toISOString() });
  fs.writeFileSync(path.join(run, 'ublkb3.json'), JSON.stringify(rec(3, process.pid)));
  fs.writeFileSync(figuresFile(run, 3), JSON.stringify(sample()));
  fs.writeFileSync(path.join(run, 'ublkb4.json'), JSON.stringify(rec(4, 999999)));
  const r = spawnSync(process.execPath, [CLI, 'list', '--output=json'], { encoding: 'utf8', env: { ...process.env, FVD_RUN_DIR: run } });
  assert.is(r.status, 0, r.stderr);
  const rows = JSON.parse(r.stdout) as Array<{ devId: number; state: string; figures: DeviceFigures | null }>;
  assert.equal(rows.map((x) => [x.devId, x.state]), [[3, 'running'], [4, 'stale']]);
  assert.is(rows[0]!.figures!.requestsEngine, 24);
  assert.is(rows[1]!.figures, null);
  assert.match(fvd('list').stdout, /^NAME\s+DEVICE/);
});

test.run();
