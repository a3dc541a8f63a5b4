/**
 * storage/http-source.ts against a real nginx (Debian nginx-light) on loopback, and through a
 * fault-injecting proxy: reads equal the file (random offsets and lengths, split requests, past
 * the end), several requests in flight, every fault retried or refused within the retry budget
 * (resets, delays, stalls, 5xx, truncated and lengthened bodies, wrong Content-Range, a 200 for a
 * range), never wrong data; the server down at open and back later; a template replaced on the
 * server refused; credentials sent but never shown; https with a custom CA. Skipped (visibly) when
 * nginx is not installed.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { HttpSource, displayUrl } from '../../storage/http-source.js';
import { parseRemoteConfig, settingsFor } from '../../storage/remote-config.js';
import { StorageIo } from '../../storage/storage-io.js';
import { FaultProxy, type Fault } from '../helpers/fault-proxy.js';
import { findProgram, nginx, selfSignedRangeServer, type ServerProcess } from '../helpers/remote-servers.js';
import { TempDir } from '../helpers/cli.js';
import { Rng } from '../helpers/rng.js';
import { assertReadOnly } from '../helpers/read-only.js';

const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-remote-http-');
const have = findProgram('nginx') !== null;
const t = have ? test : test.skip;
if (!have) console.log('remote-http: nginx not installed (apt-get install nginx-light, or make test installs it): skipped');

const SIZE = 6 * MiB + 12345; // not a multiple of anything
let root = '';
let data: Buffer;
let srv: { server: ServerProcess; url: string; port: number } | null = null;
const fast = { budgetMs: 3000, stallMs: 500, initialBackoffMs: 20, maxBackoffMs: 200 };

test.before(async () => {
  if (!have) return;
  root = tmp.caseDir();
  const rng = new Rng(7);
  data = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 4) data.writeUInt32LE(rng.u32(), Math.min(i, SIZE - 4));
  data.fill(0, 2 * MiB, 3 * MiB);
  fs.writeFileSync(path.join(root, 'template.raw'), data);
  srv = await nginx(root, path.join(root, 'nginx'));
});
test.after(async () => {
  await srv?.server.stop();
  tmp.cleanup();
});

async function readAll(src: HttpSource, piece: number): Promise<Buffer> {
  const out = Buffer.alloc(src.size());
  for (let pos = 0; pos < out.length; pos += piece) await src.read(out.subarray(pos, Math.min(out.length, pos + piece)), pos);
  return out;
}

t('nginx: size, identity (size + ETag), and random reads equal the file, including past its end', async () => {
  const src = await HttpSource.open(`${srv!.url}/template.raw`, { requestBytes: 256 * 1024, retry: fast });
  try {
    assert.is(src.size(), SIZE);
    assert.match(src.identity, new RegExp(`^size=${SIZE} etag="[^"]+"$`));
    const rng = new Rng(11);
    for (let i = 0; i < 60; i++) {
      const off = rng.int(SIZE + 4096);
      const len = 1 + rng.int(1.5 * MiB);
      const buf = Buffer.alloc(len, 0xee);
      await src.read(buf, off);
      const want = Buffer.alloc(len);
      if (off < SIZE) data.copy(want, 0, off, Math.min(SIZE, off + len));
      assert.ok(buf.equals(want), `read ${off}+${len} differs`);
    }
    assert.ok((await readAll(src, MiB)).equals(data));
    await assertReadOnly(src);
  } finally {
    await src.close();
  }
});

t('a large read is split into requests of request-size bytes, several in flight, each byte fetched once', async () => {
  const proxy = await new FaultProxy(srv!.url).start();
  try {
    const src = await HttpSource.open(`${proxy.url}/template.raw`, { requestBytes: 512 * 1024, connections: 4, retry: fast });
    const before = proxy.requests;
    proxy.inject('delay', Infinity, 50); // every request waits: the pieces must overlap to finish
    const buf = Buffer.alloc(4 * MiB);
    await src.read(buf, 0);
    assert.ok(buf.equals(data.subarray(0, 4 * MiB)));
    assert.is(proxy.requests - before, 8);
    assert.is(src.stats.bytesFetched, 4 * MiB);
    assert.ok(proxy.maxConcurrent >= 2 && proxy.maxConcurrent <= 4, `in flight at most ${proxy.maxConcurrent}`);
    await src.close();
  } finally {
    await proxy.stop();
  }
});

const transient: Fault[] = ['reset', '503', 'truncate', 'long', 'wrong-range', 'wrong-length', 'stall'];
t('every transient fault, once, is retried and the read returns the right bytes', async () => {
  const proxy = await new FaultProxy(srv!.url).start();
  try {
    const src = await HttpSource.open(`${proxy.url}/template.raw`, { requestBytes: MiB, retry: fast });
    for (const f of transient) {
      proxy.inject(f, 1);
      const retries = src.stats.retries;
      const buf = Buffer.alloc(MiB + 100, 0xee);
      await src.read(buf, 3 * MiB - 50);
      assert.ok(buf.equals(data.subarray(3 * MiB - 50, 4 * MiB + 50)), `wrong bytes after a ${f}`);
      assert.ok(src.stats.retries > retries, `${f} was not retried`);
    }
    await src.close();
  } finally {
    await proxy.stop();
  }
});

t('a fault that persists fails the read within the retry budget with one line; never data', async () => {
  const proxy = await new FaultProxy(srv!.url).start();
  try {
    const src = await HttpSource.open(`${proxy.url}/template.raw`, { retry: { ...fast, budgetMs: 800 } });
    for (const f of [...transient, 'ignore-range'] as Fault[]) {
      proxy.inject(f);
      const t0 = performance.now();
      const buf = Buffer.alloc(64 * 1024, 0xee);
      const err = await src.read(buf, 4096).then(() => null, (e: Error) => e);
      const took = performance.now() - t0;
      assert.ok(err, `${f}: the read succeeded`);
      assert.not.match(err!.message, /\n/);
      assert.ok(took < 800 + 1500, `${f}: took ${took} ms, budget 800 ms`); // no hang beyond the budget
      if (f === 'ignore-range') assert.match(err!.message, /ignored the Range header/);
      else assert.match(err!.message, /gave up after/);
    }
    proxy.inject(null);
    const buf = Buffer.alloc(4096);
    await src.read(buf, 5 * MiB);
    assert.ok(buf.equals(data.subarray(5 * MiB, 5 * MiB + 4096)), 'reads work again once the server behaves');
    await src.close();
  } finally {
    await proxy.stop();
  }
});

t('a read whose first piece fails returns only after its other pieces ended: nothing lands in the buffer afterwards', async () => {
  const proxy = await new FaultProxy(srv!.url).start();
  try {
    const src = await HttpSource.open(`${proxy.url}/template.raw`, { requestBytes: 512 * 1024, connections: 4, retry: fast });
    proxy.queue.push({ fault: 'ignore-range' }, { fault: 'delay', delayMs: 400 });
    const buf = Buffer.alloc(MiB, 0xee);
    const err = await src.read(buf, 0).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /ignored the Range header/);
    const seen = Buffer.from(buf);
    await new Promise((r) => setTimeout(r, 800));
    assert.ok(buf.equals(seen), 'a piece of the failed read wrote into the buffer after the read returned');
    await src.close();
  } finally {
    await proxy.stop();
  }
});

t('server down at open: one-line error within the budget; down while open: reads fail, then recover when it is back', async () => {
  const url = `${srv!.url}/template.raw`;
  const src = await HttpSource.open(url, { retry: fast });
  await srv!.server.stop();
  try {
    const err = await HttpSource.open(url, { retry: { ...fast, budgetMs: 500 } }).then(() => null, (e: Error) => e);
    assert.ok(err);
    assert.match(err!.message, /^http:\/\/127\.0\.0\.1:\d+\/template\.raw: cannot open: ECONNREFUSED \(gave up after \d+ attempts/);
    const r = await src.read(Buffer.alloc(4096), 0).then(() => null, (e: Error) => e);
    assert.match(r?.message ?? '', /ECONN(REFUSED|RESET)/);
    // Back within a read's budget: the read retries until the server answers.
    setTimeout(() => void srv!.server.start(), 300);
    const buf = Buffer.alloc(8192);
    await src.read(buf, 100);
    assert.ok(buf.equals(data.subarray(100, 8292)));
  } finally {
    await srv!.server.start();
    await src.close();
  }
});

t('a template replaced on the server (new ETag) is refused on the open source, and a new open has a new identity', async () => {
  fs.writeFileSync(path.join(root, 'changing.raw'), data.subarray(0, MiB));
  const url = `${srv!.url}/changing.raw`;
  const src = await HttpSource.open(url, { retry: fast });
  const id0 = src.identity;
  await new Promise((r) => setTimeout(r, 1100)); // nginx's ETag is mtime-size: a new second
  const changed = Buffer.from(data.subarray(0, MiB));
  changed[5] ^= 0xff;
  fs.writeFileSync(path.join(root, 'changing.raw'), changed);
  const err = await src.read(Buffer.alloc(4096), 0).then(() => null, (e: Error) => e);
  assert.match(err?.message ?? '', /changed on the server.*412/);
  await src.close();
  const again = await HttpSource.open(url, { retry: fast });
  assert.is.not(again.identity, id0);
  await again.close();
});

t('credentials: the Authorization header and presigned query are sent, but never appear in paths, stats or errors', async () => {
  const proxy = await new FaultProxy(srv!.url).start();
  const secret = 'Bearer s3cr3t-t0k3n';
  const query = 'X-Amz-Signature=deadbeefcafe&X-Amz-Expires=600';
  try {
    proxy.requireAuthorization = secret;
    const url = `${proxy.url}/template.raw`;
    const denied = await HttpSource.open(url, { retry: fast }).then(() => null, (e: Error) => e);
    assert.match(denied?.message ?? '', /access denied \(HTTP 401\)/);
    const conf = parseRemoteConfig('remote.conf', `[${proxy.url}/]\nheader = Authorization: ${secret}\nquery = ${query}\n`);
    proxy.requireQuery = query;
    const io = new StorageIo(conf);
    const src = (await io.open(url, { readOnly: true })) as HttpSource;
    const buf = Buffer.alloc(4096);
    await src.read(buf, 0);
    assert.ok(buf.equals(data.subarray(0, 4096)));
    assert.is(proxy.lastAuthorization, secret);
    assert.ok(proxy.lastUrl.endsWith(`?${query}`));
    assert.is(src.path, url);
    proxy.inject('503');
    const err = await src.read(buf, 0).then(() => null, (e: Error) => e);
    for (const text of [src.path, src.identity, JSON.stringify(src.stats), err!.message]) {
      assert.not.ok(text.includes('s3cr3t') || text.includes('deadbeef'), `secret leaked: ${text}`);
    }
    await src.close();
    // A URL carrying credentials itself is refused, without echoing them.
    const bad = await HttpSource.open(`http://user:pw@127.0.0.1:${proxy.port}/t.raw?X-Amz-Signature=abc`).then(() => null, (e: Error) => e);
    assert.match(bad?.message ?? '', /do not belong in the base URL/);
    assert.not.match(bad!.message, /pw|abc/);
    assert.is(displayUrl('https://u:p@h/x?sig=1#f'), 'https://h/x');
    assert.equal(settingsFor(conf, 'http://elsewhere/x').headers, {});
  } finally {
    await proxy.stop();
  }
});

const haveOpenssl = findProgram('openssl') !== null;
(have && haveOpenssl ? test : test.skip)('https: verification is on; a custom CA file makes a private certificate acceptable', async () => {
  const tls = (await selfSignedRangeServer(tmp.caseDir(), data))!;
  const url = `${tls.origin}/t.raw`;
  const cert = tls.cert;
  try {
    const err = await HttpSource.open(url, { retry: fast }).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /SELF_SIGNED|self.signed/i);
    const src = await HttpSource.open(url, { caFile: cert, retry: fast });
    const buf = Buffer.alloc(10000);
    await src.read(buf, 777);
    assert.ok(buf.equals(data.subarray(777, 10777)));
    await src.close();
  } finally {
    tls.close();
  }
});

test.run();
