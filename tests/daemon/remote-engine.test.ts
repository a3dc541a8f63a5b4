/**
 * The engine over remote bases (storage/ sources behind StorageIo), against real servers: nginx
 * serving a raw template and an FVD template, qemu-nbd exporting a sparse raw file.
 *
 * - differential reads and writes against a model (the local template plus the writes);
 * - prefetch to FULLY_LOCAL fetches each byte once: the template's size over HTTP (no hole
 *   information), exactly its allocated bytes over NBD (block status and hole replies);
 * - the server stopped afterwards: the image still reads the same, reopened too;
 * - the server stopped midway: absent blocks fail (EIO, one line), local blocks and writes work,
 *   and reads succeed again once it is back;
 * - reopened while the server is down, as the recovery of a live device does: the base is opened
 *   on its first read (fvd/deferred-base.ts), a template replaced meanwhile refused for good;
 * - the identity recorded at create survives a reopen; a template replaced (new ETag, same size)
 *   or resized is refused; a damaged identity is corruption; an identity cleared by an older
 *   writer leaves the size check.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { Prefetcher } from '../../fvd/prefetch.js';
import { rebaseImage } from '../../fvd/maintenance.js';
import { StorageIo } from '../../storage/storage-io.js';
import { RemoteMonitor, formatRemote } from '../../daemon/remote-status.js';
import { findProgram, nginx, qemuNbd, type ServerProcess } from '../helpers/remote-servers.js';
import { TempDir } from '../helpers/cli.js';
import { Rng } from '../helpers/rng.js';
import { crc32 } from 'node:zlib';

const KiB = 1024;
const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-remote-engine-');
const haveNginx = findProgram('nginx') !== null;
const haveNbd = findProgram('qemu-nbd') !== null;
if (!haveNginx) console.log('remote-engine: nginx not installed: HTTP cases skipped');
if (!haveNbd) console.log('remote-engine: qemu-nbd not installed: NBD cases skipped');
const th = haveNginx ? test : test.skip;
const tn = haveNbd ? test : test.skip;

const SIZE = 12 * MiB;
let root = '';
let template: Buffer;
let web: { server: ServerProcess; url: string } | null = null;
const fast = { budgetMs: 1500, stallMs: 500, initialBackoffMs: 20, maxBackoffMs: 200 };

/** A backend for the tests: no configuration file, short retry budgets. */
function ioWith(): StorageIo {
  return new StorageIo({ sections: [], overrides: { retry: fast, requestBytes: 2 * MiB } });
}

function makeTemplate(seed: number): Buffer {
  const rng = new Rng(seed);
  const b = Buffer.alloc(SIZE);
  rng.fill(b);
  b.fill(0, 3 * MiB, 5 * MiB); // zeros (not holes in the HTTP case: nginx sends them)
  return b;
}

test.before(async () => {
  root = tmp.path;
  template = makeTemplate(1);
  fs.writeFileSync(path.join(root, 't.raw'), template);
  if (haveNginx) web = await nginx(root, path.join(root, 'nginx'));
});
test.after(async () => {
  await web?.server.stop();
  tmp.cleanup();
});

async function readAll(img: FvdImage): Promise<Buffer> {
  const out = Buffer.alloc(img.size);
  await img.read(out, 0);
  return out;
}

/** Copy-on-read makes the image's first MiB local, then a clean close: what the tests reopen. */
async function makeFirstMiBLocal(img: string): Promise<void> {
  const image = await FvdImage.open(ioWith(), img);
  await image.read(Buffer.alloc(MiB), 0);
  await image.idle();
  await image.close();
}

async function prefetchAll(img: FvdImage): Promise<void> {
  const p = new Prefetcher(img, { chunkBytes: 8 * MiB, persistBytes: 0 }).start();
  const end = await p.finished;
  assert.is(end.state, 'done', `prefetch ended ${end.state}: ${end.error?.message}`);
}

th('HTTP: create records the identity (no bytes fetched); reads and writes match the model; reopened, the identity is the same', async () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  const url = `${web!.url}/t.raw`;
  const io = ioWith();
  await FvdImage.create(io, img, { base: url, baseFormat: 'raw' });
  assert.is(io.remoteStats()!.bytesFetched, 0, 'create must not download the template');
  const image = await FvdImage.open(io, img);
  const etagId = image.baseIdentity!;
  assert.match(etagId, new RegExp(`^size=${SIZE} etag="[0-9a-f]+-[0-9a-f]+"$`));
  assert.is(image.stats().baseChain[0]!.path, url);
  const model = Buffer.from(template);
  const rng = new Rng(42);
  for (let i = 0; i < 60; i++) {
    const off = rng.int(SIZE / 512) * 512;
    const len = Math.min(SIZE - off, (1 + rng.int(512)) * 512);
    if (rng.chance(0.3)) {
      const data = Buffer.alloc(len);
      rng.fill(data);
      await image.write(data, off);
      data.copy(model, off);
    } else {
      const buf = Buffer.alloc(len);
      await image.read(buf, off);
      assert.ok(buf.equals(model.subarray(off, off + len)), `read ${off}+${len} differs from the model`);
    }
  }
  await image.close();
  const again = await FvdImage.open(ioWith(), img, { readOnly: true });
  assert.is(again.baseIdentity, etagId);
  assert.ok((await readAll(again)).equals(model));
  await again.close();
});

th('HTTP: prefetch to fully local fetches every byte exactly once; the server stopped afterwards, the image reads the same', async () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  const io = ioWith();
  await FvdImage.create(io, img, { base: `${web!.url}/t.raw`, baseFormat: 'raw' });
  const image = await FvdImage.open(io, img, { copyOnRead: false });
  await prefetchAll(image);
  assert.is(io.remoteStats()!.bytesFetched, SIZE, 'each byte once (HTTP has no hole information)');
  assert.ok(image.stats().fullyLocal);
  await image.close();
  await web!.server.stop();
  try {
    const io2 = ioWith();
    const local = await FvdImage.open(io2, img, { readOnly: true });
    assert.ok((await readAll(local)).equals(template));
    assert.is(io2.remotes.length, 0, 'a fully local image never contacts the remote');
    await local.close();
  } finally {
    await web!.server.start();
  }
});

th('HTTP: the server stopped midway: absent blocks fail with one line, local blocks and writes work; back, reads succeed', async () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  const io = ioWith();
  await FvdImage.create(io, img, { base: `${web!.url}/t.raw`, baseFormat: 'raw' });
  const image = await FvdImage.open(io, img);
  const first = Buffer.alloc(MiB);
  await image.read(first, 0); // copy-on-read makes it local
  await image.idle();
  await web!.server.stop();
  try {
    const again = Buffer.alloc(MiB);
    await image.read(again, 0);
    assert.ok(again.equals(template.subarray(0, MiB)), 'local blocks still read');
    const w = Buffer.alloc(128 * KiB, 0x5a);
    await image.write(w, 8 * MiB); // whole blocks: no copy from the base needed
    const back = Buffer.alloc(128 * KiB);
    await image.read(back, 8 * MiB);
    assert.ok(back.equals(w));
    const err = await image.read(Buffer.alloc(64 * KiB), 10 * MiB).then(() => null, (e: Error) => e);
    assert.ok(err, 'a read of an absent block must fail while the server is down');
    assert.match(err!.message, /ECONNREFUSED.*gave up after/);
    assert.not.match(err!.message, /\n/);
  } finally {
    await web!.server.start();
  }
  const ok = Buffer.alloc(64 * KiB);
  await image.read(ok, 10 * MiB);
  assert.ok(ok.equals(template.subarray(10 * MiB, 10 * MiB + 64 * KiB)));
  await image.close();
});

th('HTTP: reopened while the server is down (the recovery of a live device): with deferUnreachableBase the image opens, local blocks and writes work, absent blocks fail; back, the base opens on the first read; without it the open fails', async () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  fs.writeFileSync(path.join(root, 'deferred.raw'), template);
  await FvdImage.create(ioWith(), img, { base: `${web!.url}/deferred.raw`, baseFormat: 'raw' });
  await makeFirstMiBLocal(img);
  const events: string[] = [];
  const w = Buffer.alloc(128 * KiB, 0x6b);
  await web!.server.stop();
  const io = ioWith();
  let monitor: RemoteMonitor;
  let image: FvdImage;
  try {
    const refused = await FvdImage.open(ioWith(), img).then(() => null, (e: Error) => e);
    assert.match(refused?.message ?? '', /base image .*deferred\.raw.*ECONNREFUSED/);
    image = await FvdImage.open(io, img, { deferUnreachableBase: (event, detail) => events.push(`${event}: ${detail}`) });
    monitor = new RemoteMonitor(io, image);
    const status = monitor.sample();
    assert.is(status?.base, 'unreachable', "the daemon's status says the base is unreachable");
    assert.match(formatRemote(status!), /^remote base unreachable since the recovery .*, 8\.3% local$/);
    assert.is(status?.url, `${web!.url}/deferred.raw`);
    assert.is(events.length, 1);
    assert.match(events[0], /^unreachable: base image .*deferred\.raw.*ECONNREFUSED/);
    assert.not.match(events[0], /\n/);
    const local = Buffer.alloc(MiB);
    await image.read(local, 0);
    assert.ok(local.equals(template.subarray(0, MiB)), 'local blocks read without the base');
    await image.write(w, 8 * MiB);
    const err = await image.read(Buffer.alloc(64 * KiB), 10 * MiB).then(() => null, (e: Error) => e);
    assert.ok(err, 'a read of an absent block must fail while the server is down');
    assert.match(err!.message, /ECONNREFUSED/);
    assert.not.match(err!.message, /\n/);
    assert.is(events.length, 1, 'a failed late open is not reported again');
  } finally {
    await web!.server.start();
  }
  const model = Buffer.from(template);
  w.copy(model, 8 * MiB);
  assert.ok((await readAll(image)).equals(model), 'back: the whole image reads the template plus the write');
  assert.equal(events.slice(1), [`opened: ${web!.url}/deferred.raw`]);
  const after = monitor!.sample();
  assert.is(after?.base, undefined, 'opened: no longer unreachable');
  assert.ok((after?.bytesFetched ?? 0) > 0);
  await image.close();
  const reopened = await FvdImage.open(ioWith(), img);
  assert.ok((await readAll(reopened)).equals(model), 'reopened: the same');
  await reopened.close();
});

th('HTTP: a template replaced while its server was away is refused at the deferred open, for good, with one report; local blocks keep reading', async () => {
  const dir = tmp.caseDir();
  const file = path.join(root, 'replaced.raw');
  fs.writeFileSync(file, template);
  const img = path.join(dir, 'vm.fvd');
  await FvdImage.create(ioWith(), img, { base: `${web!.url}/replaced.raw`, baseFormat: 'raw' });
  await makeFirstMiBLocal(img);
  const events: string[] = [];
  await web!.server.stop();
  let image: FvdImage;
  try {
    image = await FvdImage.open(ioWith(), img, { deferUnreachableBase: (event) => events.push(event) });
    const changed = Buffer.from(template);
    changed[10 * MiB] ^= 1;
    fs.writeFileSync(file, changed);
    const later = new Date(Date.now() + 5000);
    fs.utimesSync(file, later, later); // a new mtime: nginx's ETag changes
  } finally {
    await web!.server.start();
  }
  for (let i = 0; i < 2; i++) {
    const err = await image.read(Buffer.alloc(64 * KiB), 10 * MiB).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /changed since the image was created .*refusing to mix old and new data/);
  }
  assert.equal(events, ['unreachable', 'refused']);
  const local = Buffer.alloc(MiB);
  await image.read(local, 0);
  assert.ok(local.equals(template.subarray(0, MiB)));
  await image.close();
});

th('HTTP: a template replaced on the server (same size, new ETag) or resized is refused at open; rebase -u style re-recording is possible', async () => {
  const dir = tmp.caseDir();
  const file = path.join(root, 'changing.raw');
  fs.writeFileSync(file, template);
  const url = `${web!.url}/changing.raw`;
  const img = path.join(dir, 'vm.fvd');
  await FvdImage.create(ioWith(), img, { base: url, baseFormat: 'raw' });
  const later = new Date(Date.now() + 5000);
  const changed = Buffer.from(template);
  changed[100] ^= 1;
  fs.writeFileSync(file, changed);
  fs.utimesSync(file, later, later); // a new mtime: nginx's ETag changes
  const err = await FvdImage.open(ioWith(), img).then(() => null, (e: Error) => e);
  assert.match(err?.message ?? '', /changed since the image was created \(now size=\d+ etag=.*, was size=\d+ etag=.*\): refusing to mix old and new data/);
  fs.writeFileSync(file, Buffer.concat([template, Buffer.alloc(4096)]));
  const err2 = await FvdImage.open(ioWith(), img).then(() => null, (e: Error) => e);
  assert.match(err2?.message ?? '', /is \d+ bytes but was \d+ bytes/);
});

th('the identity on disk: after the base path, checksummed; damaged → corrupt; cleared (an older writer) → size check only', async () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'vm.fvd');
  const url = `${web!.url}/t.raw`;
  await FvdImage.create(ioWith(), img, { base: url, baseFormat: 'raw' });
  const first = Buffer.alloc(4096);
  const fd = fs.openSync(img, 'r+');
  fs.readSync(fd, first, 0, 4096, 0);
  const idLen = first.readUInt16LE(316);
  const id = first.subarray(512 + url.length, 512 + url.length + idLen).toString();
  assert.match(id, /^size=\d+ etag=/);
  assert.is(first.readUInt32LE(320), crc32(first.subarray(512 + url.length, 512 + url.length + idLen)) >>> 0);
  assert.is(first.subarray(512, 512 + url.length).toString(), url);
  // damage one identity byte: the image is refused as corrupt
  const bad = Buffer.from(first);
  bad[512 + url.length + 3] ^= 0x20;
  fs.writeSync(fd, bad, 0, 4096, 0);
  const err = await FvdImage.open(ioWith(), img, { readOnly: true }).then(() => null, (e: Error) => e);
  assert.match(err?.message ?? '', /corrupt image: base identity checksum mismatch/);
  // an older writer rewrites the header with bytes 316..507 zero: no identity recorded any more
  const cleared = Buffer.from(first);
  cleared.fill(0, 316, 324);
  cleared.writeUInt32LE(crc32(cleared.subarray(0, 508)) >>> 0, 508);
  fs.writeSync(fd, cleared, 0, 4096, 0);
  fs.closeSync(fd);
  const image = await FvdImage.open(ioWith(), img, { readOnly: true });
  assert.is(image.baseIdentity, null);
  assert.ok((await readAll(image)).equals(template));
  await image.close();
});

th('rebase carries the identity with the path: -u onto the same URL re-records a replaced template; onto a local file clears it; reopened each time', async () => {
  const dir = tmp.caseDir();
  const file = path.join(root, 'rebased.raw');
  fs.writeFileSync(file, template);
  const url = `${web!.url}/rebased.raw`;
  const img = path.join(dir, 'vm.fvd');
  await FvdImage.create(ioWith(), img, { base: url, baseFormat: 'raw' });
  const w = Buffer.alloc(64 * KiB, 0x77);
  const im = await FvdImage.open(ioWith(), img);
  await im.write(w, 0);
  await im.close();
  const id0 = (await FvdImage.open(ioWith(), img, { readOnly: true }).then(async (i) => (await i.close(), i.baseIdentity)))!;
  const later = new Date(Date.now() + 10_000);
  fs.utimesSync(file, later, later); // "replaced" by the same bytes: a new ETag
  assert.match((await FvdImage.open(ioWith(), img).then(() => '', (e: Error) => e.message)), /changed since the image was created/);
  await rebaseImage(ioWith(), img, { base: url, baseFormat: 'raw', unsafe: true });
  const a = await FvdImage.open(ioWith(), img, { readOnly: true });
  assert.is.not(a.baseIdentity, id0);
  assert.match(a.baseIdentity!, /^size=\d+ etag=/);
  const want = Buffer.from(template);
  w.copy(want, 0);
  assert.ok((await readAll(a)).equals(want));
  await a.close();
  // safe rebase onto a local copy: path replaced, identity gone, same contents
  fs.copyFileSync(file, path.join(dir, 'local.raw'));
  await rebaseImage(ioWith(), img, { base: 'local.raw', baseFormat: 'raw' });
  const b = await FvdImage.open(ioWith(), img, { readOnly: true });
  assert.is(b.baseIdentity, null);
  assert.is(b.stats().baseChain[0]!.path, path.join(dir, 'local.raw'));
  assert.ok((await readAll(b)).equals(want));
  await b.close();
  // and back onto the URL: identity recorded again
  await rebaseImage(ioWith(), img, { base: url, baseFormat: 'raw' });
  const c = await FvdImage.open(ioWith(), img, { readOnly: true });
  assert.match(c.baseIdentity!, /^size=\d+ etag=/);
  assert.ok((await readAll(c)).equals(want));
  await c.close();
});

th('source × format: an FVD template served over HTTP is a base like a local one', async () => {
  const dir = tmp.caseDir();
  const tpl = path.join(root, 'golden.fvd');
  await FvdImage.create(nodeIo, tpl, { size: 4 * MiB, layout: 'compact' });
  const g = await FvdImage.open(nodeIo, tpl);
  const data = Buffer.alloc(MiB);
  new Rng(5).fill(data);
  await g.write(data, MiB);
  await g.close();
  const img = path.join(dir, 'vm.fvd');
  const io = ioWith();
  await FvdImage.create(io, img, { base: `${web!.url}/golden.fvd`, baseFormat: 'fvd' });
  const image = await FvdImage.open(ioWith(), img);
  const all = await readAll(image);
  assert.ok(all.subarray(MiB, 2 * MiB).equals(data));
  assert.ok(all.subarray(0, MiB).equals(Buffer.alloc(MiB)));
  await image.close();
});

tn('NBD: zero blocks found by block status at create (nothing read); prefetch fetches exactly the allocated bytes; the server gone, the image reads the same', async () => {
  const dir = tmp.caseDir();
  const file = path.join(dir, 'sparse.raw');
  const fd = fs.openSync(file, 'w');
  const allocated = [[0, 3 * MiB], [5 * MiB, 9 * MiB]] as const; // the rest are holes
  for (const [a, z] of allocated) fs.writeSync(fd, template, a, z - a, a);
  fs.ftruncateSync(fd, SIZE);
  fs.closeSync(fd);
  const want = Buffer.alloc(SIZE);
  for (const [a, z] of allocated) template.copy(want, a, a, z);
  const sock = path.join(dir, 'nbd.sock');
  const server = (await qemuNbd(file, sock))!;
  const url = `nbd+unix:///disk?socket=${sock}`;
  const img = path.join(dir, 'vm.fvd');
  try {
    const io = ioWith();
    await FvdImage.create(io, img, { base: url, baseFormat: 'raw' });
    assert.is(io.remoteStats()!.bytesFetched, 0);
    const image = await FvdImage.open(io, img, { copyOnRead: false });
    const absent = image.baseProgress().absent * image.blockSize;
    assert.is(absent, 7 * MiB, 'the holes were marked local at create');
    await prefetchAll(image);
    assert.is(io.remoteStats()!.bytesFetched, 7 * MiB, 'bytes fetched = the allocated size, each byte once');
    await image.close();
  } finally {
    await server.stop();
  }
  const local = await FvdImage.open(ioWith(), img, { readOnly: true });
  assert.ok((await readAll(local)).equals(want));
  await local.close();
});

tn('NBD: reopened while qemu-nbd is down (a recovery): the export opens on the first read after it is back; local blocks and writes work meanwhile, absent blocks fail', async () => {
  const dir = tmp.caseDir();
  const file = path.join(dir, 't.raw');
  fs.writeFileSync(file, template);
  const sock = path.join(dir, 'nbd.sock');
  const server = (await qemuNbd(file, sock))!;
  const img = path.join(dir, 'vm.fvd');
  const events: string[] = [];
  try {
    await FvdImage.create(ioWith(), img, { base: `nbd+unix:///disk?socket=${sock}`, baseFormat: 'raw' });
    await makeFirstMiBLocal(img);
    await server.stop();
    const image = await FvdImage.open(ioWith(), img, { deferUnreachableBase: (event) => events.push(event) });
    try {
      assert.equal(events, ['unreachable']);
      const local = Buffer.alloc(MiB);
      await image.read(local, 0);
      assert.ok(local.equals(template.subarray(0, MiB)));
      const w = Buffer.alloc(128 * KiB, 0x3c);
      await image.write(w, 8 * MiB);
      const err = await image.read(Buffer.alloc(64 * KiB), 10 * MiB).then(() => null, (e: Error) => e);
      assert.ok(err, 'a read of an absent block must fail while qemu-nbd is down');
      assert.not.match(err!.message, /\n/);
      await server.start();
      const model = Buffer.from(template);
      w.copy(model, 8 * MiB);
      assert.ok((await readAll(image)).equals(model), 'back: the template plus the write');
      assert.equal(events, ['unreachable', 'opened']);
    } finally {
      await image.close();
    }
  } finally {
    await server.stop();
  }
});

tn('NBD: an export whose size changed is refused at open', async () => {
  const dir = tmp.caseDir();
  const file = path.join(dir, 'b.raw');
  fs.writeFileSync(file, template.subarray(0, 4 * MiB));
  const sock = path.join(dir, 'nbd.sock');
  let server = (await qemuNbd(file, sock))!;
  const img = path.join(dir, 'vm.fvd');
  try {
    await FvdImage.create(ioWith(), img, { base: `nbd+unix:///disk?socket=${sock}`, baseFormat: 'raw' });
    await server.stop();
    fs.appendFileSync(file, Buffer.alloc(MiB));
    server = (await qemuNbd(file, sock))!;
    const err = await FvdImage.open(ioWith(), img).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /is 5242880 bytes but was 4194304 bytes/);
  } finally {
    await server.stop();
  }
});

test.run();
