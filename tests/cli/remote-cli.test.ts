/**
 * The command line over remote bases (nginx on loopback, a credential-checking proxy): create,
 * info (URL without credentials, identity, fraction local), prefetch (bytes fetched = the
 * template's size), a fully local image with the server gone; a server down at create and a URL
 * carrying credentials are one-line refusals that leave no image behind; credentials from the
 * remote configuration are used but never printed; with the server down, info answers from the
 * metadata and says the base is unreachable.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { TempDir, assertOk, assertOneLineError, fvd, fvdAsync } from '../helpers/cli.js';
import { FaultProxy } from '../helpers/fault-proxy.js';
import { findProgram, freePort, nginx, type ServerProcess } from '../helpers/remote-servers.js';
import { Rng } from '../helpers/rng.js';

const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-remote-cli-');
const have = findProgram('nginx') !== null;
const t = have ? test : test.skip;
if (!have) console.log('remote-cli: nginx not installed: skipped');
const SIZE = 6 * MiB;
let web: { server: ServerProcess; url: string } | null = null;
let template: Buffer;

test.before(async () => {
  if (!have) return;
  template = Buffer.alloc(SIZE);
  new Rng(9).fill(template);
  fs.writeFileSync(tmp.file('t.raw'), template);
  web = await nginx(tmp.path, tmp.file('nginx'));
  fs.writeFileSync(tmp.file('remote.conf'), `[http://127.0.0.1]\nretry-budget = 1s\nstall-timeout = 500ms\n`);
  process.env.FVD_REMOTE_CONFIG = tmp.file('remote.conf');
});
test.after(async () => {
  delete process.env.FVD_REMOTE_CONFIG;
  await web?.server.stop();
  tmp.cleanup();
});

t('create over an http:// base, info, prefetch (each byte once), then the server gone: still reads', async () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  const url = `${web!.url}/t.raw`;
  const c = fvd('create', '-b', url, '-F', 'raw', img);
  assertOk(c);
  assert.match(c.stdout, new RegExp(`base=${url.replace(/[/.]/g, '\\$&')} base_fmt=raw`));
  const info = fvd('info', img);
  assertOk(info);
  assert.match(info.stdout, new RegExp(`base image: ${url.replace(/[/.]/g, '\\$&')} \\(raw, 6 MiB\\)`));
  assert.match(info.stdout, /base identity: size=6291456 etag="[0-9a-f]+-[0-9a-f]+"/);
  assert.match(info.stdout, /fully local: no \(0\.0% of the base is local\)/);
  const p = await fvdAsync('prefetch', '-q', img);
  assertOk(p);
  assert.match(p.stdout, new RegExp(`fully local: copied 6 MiB .*, ${SIZE} bytes fetched from ${url.replace(/[/.]/g, '\\$&')} in \\d+ requests \\(0 retries\\)`));
  await web!.server.stop();
  try {
    const r = fvd('io', '-c', `read -P 0 0 4k`, img);
    // the bytes are the template's, not zeros: the pattern check fails (the read itself works)
    assert.match(r.stdout + r.stderr, /Pattern verification failed|pattern/i);
    const conv = fvd('convert', '-O', 'raw', img, path.join(dir, 'flat.raw'));
    assertOk(conv);
    assert.ok(fs.readFileSync(path.join(dir, 'flat.raw')).equals(template));
    const i2 = fvd('info', img);
    assertOk(i2);
    assert.match(i2.stdout, /fully local: yes/);
  } finally {
    await web!.server.start();
  }
});

t('info with the server down: answers from the metadata, says the base is unreachable (text and JSON); io of an absent block fails in one line', async () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  const url = `${web!.url}/t.raw`;
  assertOk(fvd('create', '-b', url, '-F', 'raw', img));
  const before = fs.readFileSync(img);
  await web!.server.stop();
  try {
    const info = fvd('info', img);
    assertOk(info);
    assert.match(info.stdout, new RegExp(`base image: ${url.replace(/[/.]/g, '\\$&')} \\(raw, 6 MiB\\)`));
    assert.match(info.stdout, /^base reachable: no: base image .*t\.raw.*ECONNREFUSED/m);
    assert.match(info.stdout, /fully local: no \(0\.0% of the base is local\)/);
    const json = fvd('info', '--json', img);
    assertOk(json);
    assert.match(String(JSON.parse(json.stdout).baseUnreachable), /ECONNREFUSED/);
    const r = fvd('io', '-c', 'read 0 4k', img);
    assertOneLineError(r, [/ECONNREFUSED/]);
  } finally {
    await web!.server.start();
  }
  const back = fvd('info', '--json', img);
  assertOk(back);
  assert.is(JSON.parse(back.stdout).baseUnreachable, undefined);
  assert.ok(fs.readFileSync(img).equals(before), 'info and a failed read leave the image as it was');
});

t('info with the server down answers within its own 5 s probe, not the configured retry budget (60 s here)', async () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  assertOk(fvd('create', '-b', `${web!.url}/t.raw`, '-F', 'raw', img));
  const conf = path.join(dir, 'patient.conf');
  fs.writeFileSync(conf, `[http://127.0.0.1]\nretry-budget = 60s\nstall-timeout = 60s\n`);
  const saved = process.env.FVD_REMOTE_CONFIG;
  process.env.FVD_REMOTE_CONFIG = conf;
  await web!.server.stop();
  try {
    const t0 = performance.now();
    const info = fvd('info', img);
    const seconds = (performance.now() - t0) / 1000;
    assertOk(info);
    assert.match(info.stdout, /^base reachable: no: .*ECONNREFUSED/m);
    // A bound, not a benchmark: the configured budget would take 60 s.
    assert.ok(seconds < 30, `fvd info took ${seconds.toFixed(1)} s with the server down`);
  } finally {
    process.env.FVD_REMOTE_CONFIG = saved;
    await web!.server.start();
  }
});

t('a server down at create: one line, no image left behind; a URL with credentials: refused without echoing them', async () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  const port = await freePort();
  const r = fvd('create', '-b', `http://127.0.0.1:${port}/t.raw`, '-F', 'raw', img);
  assertOneLineError(r, [/cannot open: ECONNREFUSED \(gave up after \d+ attempts/]);
  assert.not.ok(fs.existsSync(img));
  const r2 = fvd('create', '-b', `http://admin:hunter2@127.0.0.1:${port}/t.raw?X-Amz-Signature=abc123`, '-F', 'raw', img);
  assertOneLineError(r2, [/credentials or a query string do not belong in the base URL/]);
  assert.not.match(r2.stderr, /hunter2|abc123/);
  assert.not.ok(fs.existsSync(img));
});

t('credentials from the remote configuration: used for every request, never printed by create, info or prefetch', async () => {
  const dir = tmp.caseDir();
  const proxy = await new FaultProxy(web!.url).start();
  const secret = 'Bearer topsecret-42';
  proxy.requireAuthorization = secret;
  const conf = path.join(dir, 'remote.conf');
  fs.writeFileSync(conf, `[${proxy.url}/]\nheader = Authorization: ${secret}\nretry-budget = 1s\n`, { mode: 0o600 });
  const saved = process.env.FVD_REMOTE_CONFIG;
  process.env.FVD_REMOTE_CONFIG = conf;
  try {
    const img = path.join(dir, 'vm.fvd');
    const url = `${proxy.url}/t.raw`;
    for (const r of [await fvdAsync('create', '-b', url, '-F', 'raw', img), await fvdAsync('info', '--json', img), await fvdAsync('prefetch', '-q', img)]) {
      assertOk(r);
      assert.not.match(r.stdout + r.stderr, /topsecret/);
    }
    assert.ok(fs.readFileSync(img).indexOf('topsecret') < 0, 'the secret is in the image file');
    process.env.FVD_REMOTE_CONFIG = tmp.file('remote.conf'); // no credentials for the proxy
    const img2 = path.join(dir, 'vm2.fvd');
    const denied = await fvdAsync('create', '-b', url, '-F', 'raw', img2);
    assertOneLineError(denied, [/access denied \(HTTP 401\)/]);
  } finally {
    process.env.FVD_REMOTE_CONFIG = saved;
    await proxy.stop();
  }
});

test.run();
