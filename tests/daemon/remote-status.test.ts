/**
 * The remote figures of STATUS= and `fvd info` with a remote source that really fetched bytes
 * (nginx on loopback): RemoteMonitor's bytes fetched, its rate over the sample window and the
 * fraction local of the image's bitmap; formatRemote and serviceStatus (the STATUS= line `fvd
 * serve` sends, which needs ublk to run) built from them; `fvd info` of an image partly made local
 * over a live server (fraction local = the bitmap's), and of one whose server's run-time record
 * holds the monitor's figures. Skipped (visibly) when nginx is not installed.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { loadRemoteConfig } from '../../storage/remote-config.js';
import { StorageIo } from '../../storage/storage-io.js';
import { RemoteMonitor, formatRemote, fractionLocal, serviceStatus } from '../../daemon/remote-status.js';
import { formatSize } from '../../daemon/args.js';
import { writeState, type DeviceState } from '../../daemon/state.js';
import { findProgram, nginx, type ServerProcess } from '../helpers/remote-servers.js';
import { TempDir, assertOk, fvdAsync } from '../helpers/cli.js';
import { Rng } from '../helpers/rng.js';

const MiB = 1024 * 1024;
const BS = 64 * 1024;
const tmp = new TempDir('fvd-remote-status-');
const have = findProgram('nginx') !== null;
const t = have ? test : test.skip;
if (!have) console.log('remote-status: nginx not installed (apt-get install nginx-light, or make test installs it): skipped');

const SIZE = 8 * MiB;
let data: Buffer;
let srv: { server: ServerProcess; url: string; port: number } | null = null;
let conf = '';

test.before(async () => {
  if (!have) return;
  data = Buffer.alloc(SIZE);
  new Rng(33).fill(data);
  fs.writeFileSync(tmp.file('t.raw'), data);
  srv = await nginx(tmp.path, tmp.file('nginx'));
  conf = tmp.file('remote.conf');
  fs.writeFileSync(conf, `[http://127.0.0.1]\nretry-budget = 2s\nstall-timeout = 500ms\n`);
  process.env.FVD_REMOTE_CONFIG = conf;
  process.env.FVD_RUN_DIR = tmp.file('run');
});
test.after(async () => {
  delete process.env.FVD_REMOTE_CONFIG;
  delete process.env.FVD_RUN_DIR;
  await srv?.server.stop();
  tmp.cleanup();
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

t('formatRemote: bytes fetched, rate, fraction local, failures and retries each shown as given', () => {
  const r = { url: 'http://h/t.raw', bytesFetched: 3 * MiB, rate: 1.5 * MiB, fractionLocal: 0.375, retries: 2, failures: 1, updatedAt: '' };
  assert.is(formatRemote(r), 'remote 3 MiB fetched, 1.50 MiB/s, 37.5% local, 1 failed reads, 2 retries');
  assert.is(formatRemote({ ...r, rate: 0, retries: 0, failures: 0, fractionLocal: 1 }), 'remote 3 MiB fetched, 0 B/s, 100.0% local');
  assert.is(formatRemote({ ...r, rate: 1234.4, fractionLocal: 0 }), 'remote 3 MiB fetched, 1.21 KiB/s, 0.0% local, 1 failed reads, 2 retries');
  assert.match(formatRemote({ ...r, base: 'unreachable' }), /^remote base unreachable .*, 37\.5% local$/);
});

t('RemoteMonitor over a live server: bytes fetched, rate over the window, fraction local of the bitmap; STATUS= line from them', async () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  const io = new StorageIo(loadRemoteConfig(conf));
  await FvdImage.create(io, img, { base: `${srv!.url}/t.raw`, baseFormat: 'raw', blockSize: BS });
  const image = await FvdImage.open(io, img, {});
  try {
    const t0 = performance.now();
    const mon = new RemoteMonitor(io, image);
    const first = mon.sample()!;
    assert.ok(first, 'an image over a remote base has remote figures');
    assert.is(first.url, `${srv!.url}/t.raw`);
    assert.is(first.bytesFetched, 0);
    assert.is(first.rate, 0);
    assert.is(first.fractionLocal, 0);
    // 2 MiB of the 8 MiB base made local: 32 blocks of 64 KiB, fetched once each.
    await image.prefetchBlocks(0, 2 * MiB / BS - 1);
    await sleep(600);
    const s = mon.sample()!;
    const t1 = performance.now(); // the monitor's window lies inside t0..t1
    const window = (t1 - t0) / 1000;
    assert.is(s.bytesFetched, 2 * MiB);
    assert.is(io.remoteStats()!.bytesFetched, 2 * MiB);
    assert.is(s.fractionLocal, 0.25);
    assert.is(s.fractionLocal, fractionLocal(image.stats()));
    assert.is(image.stats().bytesInBase, 6 * MiB);
    // The rate is the bytes of the window over its length: at least 2 MiB over all of it, at
    // most 2 MiB over the 0.5 s a window lasts at least.
    assert.ok(s.rate >= (2 * MiB) / window && s.rate <= (2 * MiB) / 0.5, `rate ${s.rate} for 2 MiB in a ${window.toFixed(2)} s window`);
    const text = formatRemote(s);
    assert.is(text, `remote 2 MiB fetched, ${formatSize(Math.round(s.rate))}/s, 25.0% local`);
    assert.not.match(text, / 0 B\/s/);
    // STATUS= of `fvd serve`, from the same figures (the served device needs ublk, not here).
    const status = serviceStatus({ devicePath: '/dev/ublkb7', deviceSize: SIZE, counters: { fastPath: 10, slowPath: 5, flushes: 2, errors: 0 }, writesRefused: false }, undefined, s);
    assert.is(status, `/dev/ublkb7 8 MiB: 15 requests (5 via engine), 2 flushes, 0 errors, ${text}`);
    // Within the window the rate stays; a window with nothing fetched brings it to 0.
    assert.is(mon.sample()!.rate, s.rate);
    await sleep(600);
    const idle = mon.sample()!;
    assert.is(idle.rate, 0);
    assert.is(idle.bytesFetched, 2 * MiB);
    assert.match(formatRemote(idle), /^remote 2 MiB fetched, 0 B\/s, 25\.0% local$/);
    // Another 1 MiB, anywhere: fetched counts up, the fraction follows the bitmap.
    await image.prefetchBlocks(96, 96 + MiB / BS - 1);
    const more = mon.sample()!;
    assert.is(more.bytesFetched, 3 * MiB);
    assert.is(more.fractionLocal, 0.375);
  } finally {
    await image.close();
  }
});

t('fvd info over a live server: the fraction local is the bitmap\'s after part was prefetched (text and JSON); a served record\'s figures shown', async () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  const io = new StorageIo(loadRemoteConfig(conf));
  await FvdImage.create(io, img, { base: `${srv!.url}/t.raw`, baseFormat: 'raw', blockSize: BS });
  const image = await FvdImage.open(io, img, {});
  let fetched = 0;
  try {
    // 3 MiB local: blocks 16..63 (1..4 MiB) .
    fetched = await image.prefetchBlocks(16, 63);
    await image.persistSoftBits();
  } finally {
    await image.close();
  }
  assert.is(fetched, 3 * MiB);
  const info = await fvdAsync('info', img);
  assertOk(info);
  assert.match(info.stdout, /fully local: no \(37\.5% of the base is local\)/);
  assert.match(info.stdout, /^in base: 5 MiB \(62\.5%\)/m);
  const json = JSON.parse((await fvdAsync('info', '--json', img)).stdout);
  assert.is(json.fractionLocal, 0.375);
  assert.is(json.bytesInBase, 5 * MiB);
  assert.is(json.remote, undefined, 'not served: no transfer figures');
  // A server's run-time record (what service.ts writes with each STATUS=), as `fvd info` reads it.
  const remote = { url: `${srv!.url}/t.raw`, bytesFetched: 3 * MiB, rate: 768 * 1024, fractionLocal: 0.375, retries: 1, failures: 0, updatedAt: '2026-01-02T03:04:05.000Z' };
  const st: DeviceState = { name: 'vm', devId: 42, device: '/dev/ublkb42', image: fs.realpathSync(img), pid: process.pid, size: SIZE, queues: 1, depth: 64, startedAt: new Date().toISOString(), remote };
  writeState(st);
  const served = await fvdAsync('info', img);
  assertOk(served);
  assert.match(served.stdout, /^remote \(served as \/dev\/ublkb42\): 3 MiB fetched, 768 KiB\/s, 37\.5% local, 1 retries as of 2026-01-02T03:04:05\.000Z$/m);
  const sj = JSON.parse((await fvdAsync('info', '--json', img)).stdout);
  assert.equal(sj.remote, remote);
  fs.rmSync(process.env.FVD_RUN_DIR!, { recursive: true, force: true });
});

test.run();
