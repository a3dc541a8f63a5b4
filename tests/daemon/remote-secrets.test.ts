/**
 * Credentials of a remote base given the ways `fvd serve --instance NAME` takes them — the
 * instance configuration's REMOTE_CONFIG= (relative to its directory) and the systemd credential
 * `remote` ($CREDENTIALS_DIRECTORY/remote) — resolved by instanceRemoteConfig and loaded as serve
 * loads them: the server sees the header and the presigned query, and neither appears in the image
 * file, `fvd info` (text, --json), error messages, the STATUS= text, the "prefetch done" log text
 * or the run-time record (state file) that service.ts writes. Skipped (visibly) without nginx.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { loadRemoteConfig } from '../../storage/remote-config.js';
import { StorageIo } from '../../storage/storage-io.js';
import { instanceRemoteConfig, readInstanceConfig } from '../../daemon/instance-config.js';
import { RemoteMonitor, formatRemote, serviceStatus } from '../../daemon/remote-status.js';
import { stateDir, writeState } from '../../daemon/state.js';
import { FaultProxy } from '../helpers/fault-proxy.js';
import { findProgram, nginx, type ServerProcess } from '../helpers/remote-servers.js';
import { TempDir, assertOk, fvdAsync } from '../helpers/cli.js';
import { Rng } from '../helpers/rng.js';

const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-remote-secrets-');
const have = findProgram('nginx') !== null;
const t = have ? test : test.skip;
if (!have) console.log('remote-secrets: nginx not installed (apt-get install nginx-light, or make test installs it): skipped');

const SIZE = 4 * MiB;
const TOKEN = 'Bearer tok-5ecr3t-Zq9';
const SIG = 'X-Amz-Signature=s1g5ecr3tf00d&X-Amz-Expires=600';
const LEAKS = /5ecr3t/;
let data: Buffer;
let srv: { server: ServerProcess; url: string; port: number } | null = null;
let proxy: FaultProxy | null = null;
const saved = { conf: process.env.FVD_CONF_DIR, cred: process.env.CREDENTIALS_DIRECTORY, rc: process.env.FVD_REMOTE_CONFIG, run: process.env.FVD_RUN_DIR };

test.before(async () => {
  if (!have) return;
  data = Buffer.alloc(SIZE);
  new Rng(5).fill(data);
  fs.writeFileSync(tmp.file('t.raw'), data);
  srv = await nginx(tmp.path, tmp.file('nginx'));
  proxy = await new FaultProxy(srv!.url).start();
  proxy.requireAuthorization = TOKEN;
  proxy.requireQuery = SIG;
  // Commands that find no settings of their own get none (not the host's /etc/fvd/remote.conf).
  fs.writeFileSync(tmp.file('empty.conf'), '');
  process.env.FVD_REMOTE_CONFIG = tmp.file('empty.conf');
  process.env.FVD_RUN_DIR = tmp.file('run');
  delete process.env.CREDENTIALS_DIRECTORY;
});
test.after(async () => {
  for (const [k, v] of [['FVD_CONF_DIR', saved.conf], ['CREDENTIALS_DIRECTORY', saved.cred], ['FVD_REMOTE_CONFIG', saved.rc], ['FVD_RUN_DIR', saved.run]] as const) {
    if (v === undefined) delete process.env[k];
    else process.env[k] = v;
  }
  await proxy?.stop();
  await srv?.server.stop();
  tmp.cleanup();
});

const remoteConf = () => `[${proxy!.url}/]\nheader = Authorization: ${TOKEN}\nquery = ${SIG}\nretry-budget = 1s\nstall-timeout = 500ms\n`;

/** An instance directory /etc/fvd-like: NAME.conf with `lines`; the image path it names. */
function instance(lines: string): { etc: string; img: string } {
  const dir = tmp.caseDir();
  const etc = path.join(dir, 'etc');
  fs.mkdirSync(etc);
  const img = path.join(dir, 'vm.fvd');
  fs.writeFileSync(path.join(etc, 'vm.conf'), `IMAGE=${img}\n${lines}`);
  process.env.FVD_CONF_DIR = etc;
  return { etc, img };
}

/** What serve does with the instance: resolve the file, load it, open the image over the base, read. */
async function serveLikeRead(img: string): Promise<{ io: StorageIo; file: string | undefined; err: Error | null }> {
  const file = instanceRemoteConfig(readInstanceConfig('vm'), undefined);
  const io = new StorageIo(file !== undefined ? loadRemoteConfig(file) : undefined);
  const err = await (async () => {
    if (!fs.existsSync(img)) await FvdImage.create(io, img, { base: `${proxy!.url}/t.raw`, baseFormat: 'raw', blockSize: 65536 });
    const image = await FvdImage.open(io, img, { readOnly: true });
    try {
      const buf = Buffer.alloc(8192);
      await image.read(buf, 3 * MiB + 5);
      assert.ok(buf.equals(data.subarray(3 * MiB + 5, 3 * MiB + 5 + 8192)));
    } finally {
      await image.close();
    }
  })().then(() => null, (e: Error) => e);
  return { io, file, err };
}

t('REMOTE_CONFIG= of the instance configuration (relative to it): its header and query reach the server', async () => {
  const { etc, img } = instance('REMOTE_CONFIG=vm.remote\n');
  fs.writeFileSync(path.join(etc, 'vm.remote'), remoteConf(), { mode: 0o600 });
  proxy!.lastAuthorization = undefined;
  const r = await serveLikeRead(img);
  assert.is(r.err, null, r.err?.message);
  assert.is(r.file, path.join(etc, 'vm.remote'));
  assert.is(proxy!.lastAuthorization, TOKEN);
  assert.ok(proxy!.lastUrl.endsWith(`?${SIG}`));
  // Without it the same instance gets no credentials: refused, and the refusal names no secret.
  fs.writeFileSync(path.join(etc, 'vm.conf'), `IMAGE=${img}\n`);
  const none = await serveLikeRead(img);
  assert.is(none.file, undefined);
  assert.match(none.err?.message ?? '', /access denied \(HTTP 40[13]\)/);
  // --remote-config given on the command line wins over REMOTE_CONFIG=.
  assert.is(instanceRemoteConfig({ image: img, remoteConfig: '/x/a.conf' }, '/y/b.conf'), '/y/b.conf');
});

t('the systemd credential `remote` ($CREDENTIALS_DIRECTORY/remote): used when REMOTE_CONFIG= is not set, not over it', async () => {
  const { etc, img } = instance('');
  const creds = path.join(path.dirname(etc), 'creds');
  fs.mkdirSync(creds);
  fs.writeFileSync(path.join(creds, 'remote'), remoteConf(), { mode: 0o400 });
  process.env.CREDENTIALS_DIRECTORY = creds;
  try {
    proxy!.lastAuthorization = undefined;
    const r = await serveLikeRead(img);
    assert.is(r.err, null, r.err?.message);
    assert.is(r.file, path.join(creds, 'remote'));
    assert.is(proxy!.lastAuthorization, TOKEN);
    // REMOTE_CONFIG= set: it is the one used, the credential is not.
    fs.writeFileSync(path.join(etc, 'other.remote'), '[http://elsewhere/]\n');
    fs.writeFileSync(path.join(etc, 'vm.conf'), `IMAGE=${img}\nREMOTE_CONFIG=other.remote\n`);
    assert.is(instanceRemoteConfig(readInstanceConfig('vm'), undefined), path.join(etc, 'other.remote'));
  } finally {
    delete process.env.CREDENTIALS_DIRECTORY;
  }
});

t('the secret appears nowhere: image file, fvd info (text, JSON), errors, STATUS= text, log text, run-time record', async () => {
  const { etc, img } = instance('REMOTE_CONFIG=vm.remote\n');
  const confFile = path.join(etc, 'vm.remote');
  fs.writeFileSync(confFile, remoteConf(), { mode: 0o600 });
  const r = await serveLikeRead(img);
  assert.is(r.err, null, r.err?.message);
  const texts: Array<[string, string]> = [];
  // What the daemon builds about the remote while serving: monitor sample, STATUS=, log, state file.
  const io = new StorageIo(loadRemoteConfig(confFile));
  const image = await FvdImage.open(io, img, {});
  try {
    const mon = new RemoteMonitor(io, image);
    await image.prefetchBlocks(0, 15);
    const s = mon.sample()!;
    assert.ok(s.bytesFetched > 0);
    texts.push(['sample', JSON.stringify(s)], ['STATUS=', serviceStatus({ devicePath: '/dev/ublkb3', deviceSize: SIZE, counters: { fastPath: 1, slowPath: 1, flushes: 0, errors: 0 }, writesRefused: false }, undefined, s)]);
    texts.push(['log', `prefetch done: the image is fully local, the base is no longer needed (${formatRemote(s)})`]);
    writeState({ name: 'vm', devId: 3, device: '/dev/ublkb3', image: fs.realpathSync(img), pid: process.pid, size: SIZE, queues: 1, depth: 64, startedAt: new Date().toISOString(), remote: s });
    for (const f of fs.readdirSync(stateDir())) texts.push([`state ${f}`, fs.readFileSync(path.join(stateDir(), f), 'utf8')]);
    texts.push(['stats', JSON.stringify(image.stats())], ['remoteStats', JSON.stringify(io.remoteStats())], ['identity', String(image.baseIdentity)]);
    // Errors: a failing server (retries spent), and one that refuses the credentials.
    proxy!.inject('503');
    const e1 = await image.read(Buffer.alloc(4096), 2 * MiB).then(() => null, (e: Error) => e);
    proxy!.inject(null);
    assert.ok(e1, 'a read from a failing server succeeded');
    texts.push(['503 error', `${e1!.message} ${e1!.stack ?? ''}`]);
  } finally {
    await image.close();
  }
  proxy!.requireAuthorization = 'Bearer someone-else';
  const e2 = await serveLikeRead(img);
  proxy!.requireAuthorization = TOKEN;
  assert.match(e2.err?.message ?? '', /access denied/);
  texts.push(['401 error', `${e2.err!.message} ${e2.err!.stack ?? ''}`]);
  // The command line with the same file (as FVD_REMOTE_CONFIG): info reaches the base, says nothing secret.
  process.env.FVD_REMOTE_CONFIG = confFile;
  try {
    for (const args of [['info', img], ['info', '--json', img]]) {
      const c = await fvdAsync(...args);
      assertOk(c);
      assert.not.match(c.stdout, /base reachable: no|baseUnreachable/);
      assert.match(c.stdout, /served as \/dev\/ublkb3|"remote"/);
      texts.push([args.join(' '), c.stdout + c.stderr]);
    }
    fs.writeFileSync(path.join(etc, 'bad.remote'), `[${proxy!.url}/]\nheader = Authorization ${TOKEN}\n`);
    process.env.FVD_REMOTE_CONFIG = path.join(etc, 'bad.remote');
    const bad = await fvdAsync('info', img);
    assert.match(bad.stderr, /bad\.remote:2: expected header = Name: value/);
    texts.push(['config error', bad.stdout + bad.stderr]);
  } finally {
    process.env.FVD_REMOTE_CONFIG = tmp.file('empty.conf');
  }
  for (const [what, text] of texts) assert.not.match(text, LEAKS, `the secret is in ${what}: ${text}`);
  assert.ok(fs.readFileSync(img).indexOf('5ecr3t') < 0, 'the secret is in the image file');
  fs.rmSync(stateDir(), { recursive: true, force: true });
});

test.run();
