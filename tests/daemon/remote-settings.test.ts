/**
 * Remote configuration settings reach the source: a configuration FILE written here, loaded as
 * `fvd serve --remote-config FILE` loads it (loadRemoteConfig + StorageIo), then an image whose
 * base is that URL opened and read as the daemon reads it. retry-budget (a persistent 503 gives up
 * within a 1 s budget, and not before ~4 s with a 4 s one: the 30 s default fails both bounds),
 * stall-timeout (a stalled answer retried after 300 ms, the default 10 s would blow the budget),
 * connections (the proxy sees exactly that many requests at once), ca-file (a self-signed https
 * server refused without it, accepted with it). Skipped (visibly) when nginx is not installed.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { loadRemoteConfig } from '../../storage/remote-config.js';
import { StorageIo } from '../../storage/storage-io.js';
import { FaultProxy } from '../helpers/fault-proxy.js';
import { findProgram, nginx, selfSignedRangeServer, type ServerProcess } from '../helpers/remote-servers.js';
import { TempDir } from '../helpers/cli.js';
import { Rng } from '../helpers/rng.js';

const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-remote-settings-');
const have = findProgram('nginx') !== null;
const t = have ? test : test.skip;
if (!have) console.log('remote-settings: nginx not installed (apt-get install nginx-light, or make test installs it): skipped');

const SIZE = 8 * MiB;
let data: Buffer;
let srv: { server: ServerProcess; url: string; port: number } | null = null;

test.before(async () => {
  if (!have) return;
  data = Buffer.alloc(SIZE);
  new Rng(21).fill(data);
  fs.writeFileSync(tmp.file('t.raw'), data);
  srv = await nginx(tmp.path, tmp.file('nginx'));
});
test.after(async () => {
  await srv?.server.stop();
  tmp.cleanup();
});

/** A configuration file as an operator writes it, loaded the way serve loads --remote-config. */
function ioFrom(body: string): { io: StorageIo; file: string } {
  const file = path.join(tmp.caseDir(), 'remote.conf');
  fs.writeFileSync(file, body, { mode: 0o600 });
  return { io: new StorageIo(loadRemoteConfig(file)), file };
}

async function failingReadTime(budget: string, proxy: FaultProxy): Promise<{ ms: number; err: Error | null }> {
  const { io } = ioFrom(`[${proxy.url}/]\nretry-budget = ${budget}\nstall-timeout = 500ms\n`);
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  proxy.inject(null);
  await FvdImage.create(io, img, { base: `${proxy.url}/t.raw`, baseFormat: 'raw', blockSize: 65536 });
  const image = await FvdImage.open(io, img, {});
  try {
    proxy.inject('503'); // every request from now on
    const t0 = performance.now();
    const err = await image.read(Buffer.alloc(65536), MiB).then(() => null, (e: Error) => e);
    return { ms: performance.now() - t0, err };
  } finally {
    proxy.inject(null);
    await image.close().catch(() => undefined);
  }
}

t('retry-budget from the file bounds a read of an image over a failing server, both ways (default 30 s would fail both)', async () => {
  const proxy = await new FaultProxy(srv!.url).start();
  try {
    const short = await failingReadTime('1s', proxy);
    assert.ok(short.err, 'a read against a server answering 503 succeeded');
    assert.match(short.err!.message, /HTTP 503 \(gave up after \d+ attempts/);
    assert.ok(short.ms < 2000, `1 s budget: gave up after ${short.ms.toFixed(0)} ms`);
    const long = await failingReadTime('4s', proxy);
    assert.ok(long.err, 'a read against a server answering 503 succeeded');
    assert.match(long.err!.message, /HTTP 503 \(gave up after \d+ attempts/);
    // A budget is a promise both ways: never longer, and the retries go on until it is spent (the
    // last back-off is shortened to fit, storage/retry.ts; giving up when the next back-off looked
    // too long ended 95 % of such reads before 3.9 s, 39 % before 3 s).
    assert.ok(long.ms >= 3900, `4 s budget: gave up after only ${long.ms.toFixed(0)} ms`);
    assert.ok(long.ms < 5500, `4 s budget: gave up after ${long.ms.toFixed(0)} ms`);
  } finally {
    await proxy.stop();
  }
});

t('stall-timeout from the file: a stalled answer is abandoned and retried after it (the 10 s default would spend the 4 s budget)', async () => {
  const proxy = await new FaultProxy(srv!.url).start();
  try {
    const { io } = ioFrom(`[${proxy.url}/]\nretry-budget = 4s\nstall-timeout = 300ms\n`);
    const src = await io.open(`${proxy.url}/t.raw`, { readOnly: true });
    proxy.inject('stall', 1);
    const buf = Buffer.alloc(4096);
    const t0 = performance.now();
    await src.read(buf, 12345);
    const ms = performance.now() - t0;
    assert.ok(buf.equals(data.subarray(12345, 12345 + 4096)));
    assert.is(io.remoteStats()!.retries, 1);
    assert.ok(ms >= 250 && ms < 2500, `stalled read took ${ms.toFixed(0)} ms with stall-timeout 300ms`);
    await src.close();
  } finally {
    await proxy.stop();
  }
});

t('connections from the file: a large read keeps exactly that many requests in flight', async () => {
  for (const n of [2, 3]) {
    const proxy = await new FaultProxy(srv!.url).start();
    try {
      const { io } = ioFrom(`[${proxy.url}/]\nconnections = ${n}\nrequest-size = 256K\n`);
      const src = await io.open(`${proxy.url}/t.raw`, { readOnly: true });
      proxy.inject('delay', Infinity, 40); // each answer waits: pieces overlap as far as allowed
      const buf = Buffer.alloc(4 * MiB);
      await src.read(buf, MiB);
      assert.ok(buf.equals(data.subarray(MiB, 5 * MiB)));
      assert.is(proxy.maxConcurrent, n, `connections = ${n}: ${proxy.maxConcurrent} requests in flight`);
      assert.is(src.inFlightBytes, n * 256 * 1024);
      await src.close();
    } finally {
      await proxy.stop();
    }
  }
});

const haveOpenssl = findProgram('openssl') !== null;
(have && haveOpenssl ? test : test.skip)('ca-file from the file: a self-signed https base is refused without it, read with it', async () => {
  const dir = tmp.caseDir();
  const tls = (await selfSignedRangeServer(dir, data))!;
  const { origin, cert } = tls;
  try {
    const without = ioFrom(`[${origin}/]\nretry-budget = 2s\n`).io;
    const err = await without.open(`${origin}/t.raw`, { readOnly: true }).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /SELF_SIGNED|self.signed/i);
    // The same file with ca-file added: the image over that base is created and read.
    const { io } = ioFrom(`[${origin}/]\nretry-budget = 2s\nca-file = ${cert}\n`);
    const img = path.join(dir, 'vm.fvd');
    await FvdImage.create(io, img, { base: `${origin}/t.raw`, baseFormat: 'raw', blockSize: 65536 });
    const image = await FvdImage.open(io, img, { readOnly: true });
    const buf = Buffer.alloc(10000);
    await image.read(buf, 777);
    assert.ok(buf.equals(data.subarray(777, 10777)));
    await image.close();
  } finally {
    tls.close();
  }
});

test.run();
