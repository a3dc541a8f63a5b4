/**
 * The warden's decisions (daemon/warden.ts), the states `fvd list` shows (daemon/commands/list.ts)
 * and the offline commands' refusal while a dead server's writes are pending
 * (daemon/pending-guard.ts). The device itself is exercised by tests/vm/e2e/18-recovery.sh.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { WARDEN_POLL_MS, decide, type WardenView } from '../../daemon/warden.js';
import { classify, type DeviceProbe } from '../../daemon/commands/list.js';
import { RECOVERY_FLAGS, currentBootId, fileIdOf, pendingLogPath, serverFlagsFor } from '../../daemon/recovery.js';
import { UBLK_S_DEV_DEAD, UBLK_S_DEV_LIVE, UBLK_S_DEV_QUIESCED } from '../../daemon/ublk/abi.js';
import { writeState, type DeviceState } from '../../daemon/state.js';
import { PENDING_BITMAP, encodePendingHeader, encodePendingRecord } from '../../fvd/pending-log.js';
import { CLI, assertOneLineError, fvd, sha256File, withRunDir } from '../helpers/cli.js';
import { setDirty } from '../helpers/tamper.js';
import { unappliedPendingWrites } from '../../daemon/pending-guard.js';

/** A pid that is certainly not running: a child that already exited (and was reaped). */
const DEAD = spawnSync(process.execPath, ['-e', '0']).pid!;

const st: DeviceState = { name: 'a', devId: 3, device: '/dev/ublkb3', image: '/i', pid: DEAD, size: 1, queues: 2, depth: 64, startedAt: '', fileId: '8:77', bootId: 'b', maxIo: 524288, recoveryWait: 5 };
const info = { nrHwQueues: 2, queueDepth: 64, state: UBLK_S_DEV_QUIESCED, maxIoBufBytes: 524288, devId: 3, ublksrvPid: DEAD, flags: RECOVERY_FLAGS, ublksrvFlags: serverFlagsFor('8:77') };
const T0 = 1_000_000;
const view = (v: Partial<WardenView>): WardenView => ({ now: T0, serverAlive: false, deathAt: T0, state: st, info, recovering: false, ...v });
const verdict = (v: Partial<WardenView>) => decide(view(v), DEAD, 3, 5);

test('warden: watches while the server runs, then waits for the deadline, then deletes', () => {
  assert.equal(verdict({ serverAlive: true, state: null, info: null }), { act: 'watch', ms: WARDEN_POLL_MS });
  assert.equal(verdict({ now: T0 + 4900 }), { act: 'watch', ms: 100 });
  assert.is(verdict({ now: T0 + 1000 }).act, 'watch');
  assert.equal(verdict({ now: T0 + 5000 }), { act: 'delete' });
  // 7.x records -1 as the server's pid once it saw the server gone.
  assert.equal(verdict({ now: T0 + 5000, info: { ...info, ublksrvPid: -1 } }), { act: 'delete' });
  // LIVE with the dead pid: the kernel has not processed the exit yet; the device still waits.
  assert.equal(verdict({ now: T0 + 6000, info: { ...info, state: UBLK_S_DEV_LIVE } }), { act: 'delete' });
});

test('warden: a new server taking over, a device gone or someone else\'s device ends it, never deletes', () => {
  const after = T0 + 60_000;
  assert.is(verdict({ now: after, state: { ...st, pid: DEAD + 1 } }).act, 'exit', 'the state file names a new server');
  assert.is(verdict({ now: after, state: null }).act, 'exit', 'stopped cleanly: state file removed');
  assert.is(verdict({ now: after, info: null }).act, 'exit', 'device deleted (fvd stop)');
  assert.is(verdict({ now: after, info: { ...info, ublksrvPid: process.pid, state: UBLK_S_DEV_LIVE } }).act, 'exit', 'live again under a new server');
  assert.is(verdict({ now: after, info: { ...info, ublksrvFlags: serverFlagsFor('8:78') } }).act, 'exit', 'another image\'s device');
  assert.is(verdict({ now: after, info: { ...info, flags: 0n } }).act, 'exit', 'not recoverable: not ours to expire');
  assert.is(verdict({ now: after, info: { ...info, queueDepth: 128 } }).act, 'exit', 'other geometry');
  assert.is(verdict({ now: after, info: { ...info, state: UBLK_S_DEV_DEAD } }).act, 'exit', 'DEAD: left to the next serve');
  assert.is(verdict({ now: after, state: { ...st, devId: 4 } }).act, 'exit', 'a state file of another id');
  // A recovering server's marker holds the deadline off (the image lock covers the rest).
  assert.equal(verdict({ now: after, recovering: true }), { act: 'watch', ms: WARDEN_POLL_MS });
});

test('list: running, waiting with seconds left, waiting without a warden, recovering, stale', () => {
  const p = (x: Partial<DeviceProbe>): DeviceProbe => ({ serverAlive: false, deviceExists: true, recoveringPid: null, warden: null, now: T0, ...x });
  assert.equal(classify(st, p({ serverAlive: true })), { state: 'running' });
  assert.equal(classify(st, p({ warden: { pid: 9, serverPid: DEAD, deadline: T0 + 4200 } })), { state: 'waiting', expiresIn: 5 });
  assert.equal(classify(st, p({ warden: { pid: 9, serverPid: DEAD, deadline: T0 - 1 } })), { state: 'waiting', expiresIn: 0 });
  assert.equal(classify(st, p({})), { state: 'waiting', expiresIn: null });
  assert.equal(classify(st, p({ warden: { pid: 9, serverPid: DEAD + 1, deadline: T0 + 4200 } })), { state: 'waiting', expiresIn: null }, 'an older server\'s warden');
  assert.equal(classify(st, p({ recoveringPid: 42 })), { state: 'recovering', recoveringPid: 42 });
  assert.equal(classify(st, p({ deviceExists: false })), { state: 'stale' });
  assert.equal(classify({ ...st, fileId: undefined }, p({})), { state: 'stale' }, 'no recovery: a dead server\'s device is stale');
});

test('warden process: ends by itself when its server stops cleanly, and does nothing for a state file of another pid', () =>
  withRunDir('fvd-warden-', async (tmp) => {
    const env = { ...process.env };
    const server = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)'], { stdio: 'ignore' });
    writeState({ ...st, devId: 7, device: path.join(tmp.path, 'dev'), pid: server.pid!, recoveryWait: 1 });
    const warden = spawn(process.execPath, [CLI, '__warden', String(server.pid), '', '7'], { env, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    warden.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const exited = new Promise<number | null>((r) => warden.on('close', (c) => r(c)));
    await new Promise((r) => setTimeout(r, 1500));
    assert.is(warden.exitCode, null, 'the warden watches while its server runs');
    fs.rmSync(path.join(tmp.path, 'ublkb7.json')); // what a clean stop does before the server exits
    server.kill('SIGTERM');
    const code = await Promise.race([exited, new Promise((r) => setTimeout(() => r('hang'), 10_000))]);
    assert.is(code, 0, stderr);
    assert.is(stderr, '', 'a clean stop is not worth a line');
    // A warden told to watch a pid the state file does not name (a taken-over device) leaves at once.
    writeState({ ...st, devId: 8, pid: process.pid });
    const r = spawnSync(process.execPath, [CLI, '__warden', String(DEAD), '', '8'], { env, encoding: 'utf8', timeout: 10_000 });
    assert.is(r.status, 0, r.stderr);
  }));

test('offline commands refuse, leaving the image unchanged, while a dead server\'s pending log or waiting device exists', () =>
  // FVD_RUN_DIR for pendingLogPath here and the CLI's environment
  withRunDir('fvd-pending-', (tmp) => {
    const img = path.join(tmp.path, 'a.fvd');
    assert.is(fvd('create', img, '4M').code, 0);
    const fileId = fileIdOf(img);
    const log = pendingLogPath(fileId);
    const rec = encodePendingRecord({ seq: 1, kind: PENDING_BITMAP, a: 0, b: 1 });
    fs.writeFileSync(log, Buffer.concat([encodePendingHeader(currentBootId(), fileId, 0), rec]));
    // A clean image's log is spent (the engine applies logs to DIRTY images only): e.g. a new file
    // that reuses a deleted image's inode. Offline commands run.
    assert.is(unappliedPendingWrites(img, fileId, currentBootId()), null);
    assert.is(fvd('check', '--repair', img).code, 0, 'a clean image with a stale log is not refused');
    // The dead server's image: DIRTY (it was open read-write), records not committed.
    setDirty(img);
    assert.equal(unappliedPendingWrites(img, fileId, currentBootId()), { logPath: log, records: 1 });
    const before = sha256File(img);
    const cmds = [
      ['check', '--repair', img],
      ['resize', img, '8M'],
      ['snapshot', '-c', 's1', img],
      ['commit', img],
      ['rebase', '-u', '-b', '', img],
      ['convert', '-O', 'raw', img, path.join(tmp.path, 'out.raw')],
      ['io', '-c', 'write -P 1 0 4k', img],
    ];
    for (const c of cmds) {
      const r = fvd(...c);
      assertOneLineError(r, [/holds 1 records of writes a dead server acknowledged/, /fvd serve/]);
      assert.is(sha256File(img), before, `${c[0]} left the image unchanged`);
    }
    assert.ok(!fs.existsSync(path.join(tmp.path, 'out.raw')), 'convert wrote nothing');
    // Records already committed (seq ≤ committed_seq) are not pending: the commands run.
    fs.writeFileSync(log, Buffer.concat([encodePendingHeader(currentBootId(), fileId, 1), rec]));
    assert.is(unappliedPendingWrites(img, fileId, currentBootId()), null);
    assert.is(fvd('check', '--repair', img).code, 3, 'the repair runs (3: it cleared DIRTY)');
    fs.rmSync(log);
    // A device waiting for this image's dead server.
    const dev = path.join(tmp.path, 'ublkb5');
    fs.writeFileSync(dev, '');
    writeState({ ...st, devId: 5, device: dev, image: img, fileId, bootId: currentBootId() });
    const now = sha256File(img);
    assertOneLineError(fvd('resize', img, '8M'), [/is waiting for this image's server/, /fvd stop 5/]);
    assert.is(sha256File(img), now);
    assert.is(fvd('check', img).code, 0, 'a plain check only reads');
  }));

test('fvd stop leaves a device alone while a new server is taking it over', () =>
  withRunDir('fvd-stop-', (tmp) => {
    writeState({ ...st, devId: 6, device: path.join(tmp.path, 'ublkb6') });
    fs.writeFileSync(path.join(tmp.path, 'ublkb6.recovering'), `${process.pid}\n`);
    assertOneLineError(fvd('stop', '6'), [/being taken over by a new server \(pid \d+\)/]);
    assert.ok(fs.existsSync(path.join(tmp.path, 'ublkb6.json')), 'its state file stays');
  }));

test.run();
