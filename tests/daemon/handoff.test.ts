/**
 * Live restart from the command line (docs/DESIGN.md §7.5): `fvd stop --handoff` sends the server
 * SIGHUP (not SIGTERM) and waits for it to exit; a server without --recovery-wait is refused with
 * one line and keeps running; a server that is gone cannot be handed over. The "server" here is a
 * stand-in process that exits 0 on SIGHUP, so the signal it got is visible in how it ended; the
 * real server's hand-off runs in the guest (tests/vm/e2e/18-recovery.sh, 6-systemd.sh).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { CLI, TempDir } from '../helpers/cli.js';
import { readInstanceConfig } from '../../daemon/instance-config.js';

const tmp = new TempDir('fvd-handoff-');
test.after(() => tmp.cleanup());

/** A stand-in server: exits 0 on SIGHUP, dies by SIGTERM's default action otherwise. */
function standIn(): Promise<ChildProcess> {
  const child = spawn(process.execPath, ['-e', "process.on('SIGHUP', () => process.exit(0)); console.log('up'); setInterval(() => {}, 1000)"], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve) => child.stdout!.once('data', () => resolve(child)));
}

function exited(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
}

function record(run: string, devId: number, pid: number, recoveryWait?: number): void {
  const st = {
    name: `d${devId}`, devId, device: `/dev/ublkb${devId}`, image: '/x.fvd', pid, size: 1 << 30, queues: 2, depth: 128,
    startedAt: new Date().toISOString(),
    ...(recoveryWait !== undefined ? { fileId: '1:2', bootId: 'b', maxIo: 524288, recoveryWait, generation: 0 } : {}),
  };
  fs.writeFileSync(path.join(run, `ublkb${devId}.json`), JSON.stringify(st));
}

const stop = (run: string, ...args: string[]) => spawnSync(process.execPath, [CLI, 'stop', ...args], { encoding: 'utf8', env: { ...process.env, FVD_RUN_DIR: run } });

test('fvd stop --handoff: SIGHUP to a server with --recovery-wait, waits for its exit, exit 0', async () => {
  const run = tmp.caseDir();
  const child = await standIn();
  record(run, 5, child.pid!, 30);
  const r = stop(run, '--handoff', 'd5');
  assert.is(r.status, 0, r.stderr);
  assert.match(r.stdout, /^handed over \/dev\/ublkb5 \(d5\): it waits for the next 'fvd serve' of \/x\.fvd\n$/);
  assert.equal(await exited(child), { code: 0, signal: null }, 'the server got SIGHUP, not SIGTERM');
  assert.ok(fs.existsSync(path.join(run, 'ublkb5.json')), 'the record stays for the next server');
});

test('fvd stop --handoff: refused in one line for a server without --recovery-wait, which keeps running', async () => {
  const run = tmp.caseDir();
  const child = await standIn();
  try {
    record(run, 6, child.pid!);
    const r = stop(run, '--handoff', '6');
    assert.is.not(r.status, 0);
    assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, /served without --recovery-wait: its device cannot outlive its server/);
    await new Promise((res) => setTimeout(res, 200));
    assert.is(child.exitCode, null, 'still running');
    assert.is(child.signalCode, null);
  } finally {
    child.kill('SIGKILL');
    await exited(child);
  }
});

test('fvd stop --handoff of a device whose server is gone: one-line error', () => {
  const run = tmp.caseDir();
  record(run, 7, 999999, 30);
  const r = stop(run, '--handoff', 'd7');
  assert.is.not(r.status, 0);
  assert.is(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /no server to hand over \(pid 999999 is gone\)/);
});

test('instance config: RECOVERY_WAIT is read (fvd serve --instance applies 60 s when it is absent)', () => {
  const dir = tmp.caseDir();
  process.env.FVD_CONF_DIR = dir;
  try {
    fs.writeFileSync(path.join(dir, 'rw.conf'), 'IMAGE=/i.fvd\nRECOVERY_WAIT=0\n');
    assert.equal(readInstanceConfig('rw'), { image: '/i.fvd', recoveryWait: '0' });
  } finally {
    delete process.env.FVD_CONF_DIR;
  }
});

test.run();
