/**
 * storage/nbd-source.ts against real NBD servers started here: qemu-nbd exporting a sparse raw
 * file (unix socket and TCP) and a qcow2 image (qemu does the format), and nbdkit with its delay
 * and error filters. Reads equal the file; holes come back as zeros without being transferred;
 * block status tells the zero extents without reading; several requests are in flight; faults are
 * retried within the budget or fail with one line, never data; a restarted server is reconnected
 * to. Skipped (visibly) when qemu-nbd / nbdkit are not installed.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { NbdSource } from '../../storage/nbd-source.js';
import { parseNbdUri } from '../../storage/nbd-protocol.js';
import { findProgram, nbdkit, qemuNbd, qemuNbdTcp } from '../helpers/remote-servers.js';
import { TempDir } from '../helpers/cli.js';
import { Rng } from '../helpers/rng.js';
import { assertReadOnly } from '../helpers/read-only.js';

const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-remote-nbd-');
const haveQemu = findProgram('qemu-nbd') !== null && findProgram('qemu-img') !== null;
const haveKit = findProgram('nbdkit') !== null;
if (!haveQemu) console.log('remote-nbd: qemu-nbd/qemu-img not installed (qemu-utils): qemu-nbd cases skipped');
if (!haveKit) console.log('remote-nbd: nbdkit not installed: nbdkit cases skipped');
const tq = haveQemu ? test : test.skip;
const tk = haveKit ? test : test.skip;
const fast = { budgetMs: 3000, stallMs: 500, initialBackoffMs: 20, maxBackoffMs: 200 };

const SIZE = 8 * MiB;
let dir = '';
let file = '';
let data: Buffer;

test.before(() => {
  dir = tmp.path;
  file = path.join(dir, 'template.raw');
  const rng = new Rng(3);
  data = Buffer.alloc(SIZE);
  for (let i = 0; i < SIZE; i += 4) data.writeUInt32LE(rng.u32(), i);
  // holes: 1 MiB at 2 MiB, 3 MiB at 4 MiB (punched: the file is sparse there)
  data.fill(0, 2 * MiB, 3 * MiB);
  data.fill(0, 4 * MiB, 7 * MiB);
  fs.writeFileSync(file, Buffer.alloc(0));
  const fd = fs.openSync(file, 'w');
  for (const [a, z] of [[0, 2 * MiB], [3 * MiB, 4 * MiB], [7 * MiB, 8 * MiB]] as const) fs.writeSync(fd, data, a, z - a, a);
  fs.ftruncateSync(fd, SIZE);
  fs.closeSync(fd);
});
test.after(() => tmp.cleanup());

async function checkReads(src: NbdSource, seed: number): Promise<void> {
  const rng = new Rng(seed);
  for (let i = 0; i < 40; i++) {
    const off = rng.int(SIZE + 4096);
    const len = 1 + rng.int(MiB + 1000);
    const buf = Buffer.alloc(len, 0xee);
    await src.read(buf, off);
    const want = Buffer.alloc(len);
    if (off < SIZE) data.copy(want, 0, off, Math.min(SIZE, off + len));
    assert.ok(buf.equals(want), `read ${off}+${len} differs`);
  }
}

test('NBD URIs (doc/uri.md): export names, default port, unix sockets; TLS and unknown parameters refused', () => {
  assert.equal(parseNbdUri('nbd://example.com/disk'), { uri: 'nbd://example.com/disk', exportName: 'disk', host: 'example.com', port: 10809 });
  assert.is(parseNbdUri('nbd://example.com:1234//disk').exportName, '/disk');
  assert.is(parseNbdUri('nbd://example.com/hello%20world').exportName, 'hello world');
  assert.is(parseNbdUri('nbd://example.com').exportName, '');
  assert.is(parseNbdUri('nbd://[::1]:99/x').host, '::1');
  assert.equal(parseNbdUri('nbd+unix:///disk?socket=/run/s.sock'), { uri: 'nbd+unix:///disk?socket=/run/s.sock', exportName: 'disk', socketPath: '/run/s.sock' });
  assert.throws(() => parseNbdUri('nbds://h/x'), /TLS is not supported/);
  assert.throws(() => parseNbdUri('nbd+unix:///x'), /needs \?socket=PATH/);
  assert.throws(() => parseNbdUri('nbd://h/x?foo=1'), /unknown query parameter 'foo'/);
});

tq('qemu-nbd, unix socket: reads equal the file; holes arrive as zeros without transfer; block status maps the zeros', async () => {
  const sock = path.join(dir, 'q1.sock');
  const server = (await qemuNbd(file, sock))!;
  try {
    const src = await NbdSource.open(`nbd+unix:///disk?socket=${sock}`, { retry: fast, requestBytes: 256 * 1024 });
    assert.is(src.size(), SIZE);
    assert.is(src.identity, `size=${SIZE}`);
    assert.ok(src.hasBlockStatus);
    // zero extents known without reading: 2..3 MiB and 4..7 MiB
    assert.is(src.nextData(2 * MiB), 3 * MiB);
    assert.is(src.nextData(4 * MiB + 4096), 7 * MiB);
    assert.is(src.nextData(MiB), MiB);
    assert.is(src.stats.bytesFetched, 0);
    const all = Buffer.alloc(SIZE);
    await src.read(all, 0);
    assert.ok(all.equals(data));
    assert.is(src.stats.bytesFetched, 4 * MiB, 'only the allocated 4 MiB crossed the wire');
    await checkReads(src, 5);
    await assertReadOnly(src);
    await src.close();
  } finally {
    await server.stop();
  }
});

tq('qemu-nbd over TCP (nbd://127.0.0.1:port/disk), and a qcow2 export: qemu does the format', async () => {
  const tcp = (await qemuNbdTcp(file))!;
  try {
    const src = await NbdSource.open(`nbd://127.0.0.1:${tcp.port}/disk`, { retry: fast });
    await checkReads(src, 9);
    await src.close();
  } finally {
    await tcp.server.stop();
  }
  const qcow = path.join(dir, 'template.qcow2');
  assert.is(spawnSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', file, qcow]).status, 0);
  const sock = path.join(dir, 'q2.sock');
  const server = (await qemuNbd(qcow, sock, 'qcow2'))!;
  try {
    const src = await NbdSource.open(`nbd+unix:///disk?socket=${sock}`, { retry: fast });
    assert.is(src.size(), SIZE);
    const all = Buffer.alloc(SIZE);
    await src.read(all, 0);
    assert.ok(all.equals(data));
    assert.is(src.nextData(4 * MiB), 7 * MiB, 'unallocated qcow2 clusters are known zero');
    await src.close();
  } finally {
    await server.stop();
  }
});

tq('a wrong export name is one line; a server down at open fails within the budget', async () => {
  const sock = path.join(dir, 'q3.sock');
  const server = (await qemuNbd(file, sock))!;
  try {
    const err = await NbdSource.open(`nbd+unix:///nosuch?socket=${sock}`, { retry: fast }).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /export 'nosuch': /);
  } finally {
    await server.stop();
  }
  const t0 = performance.now();
  const down = await NbdSource.open(`nbd+unix:///disk?socket=${sock}`, { retry: { ...fast, budgetMs: 400 } }).then(() => null, (e: Error) => e);
  assert.match(down?.message ?? '', /cannot open: (ENOENT|ECONNREFUSED) \(gave up after/);
  assert.not.match(down!.message, /\n/);
  assert.ok(performance.now() - t0 < 400 + 1500);
});

tq('server killed while open: reads fail within the budget, then reconnect when it is back', async () => {
  const sock = path.join(dir, 'q4.sock');
  const server = (await qemuNbd(file, sock))!;
  const src = await NbdSource.open(`nbd+unix:///disk?socket=${sock}`, { retry: { ...fast, budgetMs: 600 } });
  try {
    await server.stop();
    const err = await src.read(Buffer.alloc(4096), 0).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /gave up after/);
    await server.start();
    const buf = Buffer.alloc(64 * 1024);
    await src.read(buf, 7 * MiB);
    assert.ok(buf.equals(data.subarray(7 * MiB, 7 * MiB + 64 * 1024)));
  } finally {
    await src.close();
    await server.stop();
  }
});

tk('nbdkit delay filter: several requests in flight on one connection; a stall beyond stall-timeout is retried', async () => {
  const sock = path.join(dir, 'k1.sock');
  const server = (await nbdkit(file, sock, ['--filter=delay', 'rdelay=300ms']))!;
  try {
    const src = await NbdSource.open(`nbd+unix:///?socket=${sock}`, { retry: { ...fast, stallMs: 5000 }, requestBytes: 256 * 1024, mapZeroes: false });
    const buf = Buffer.alloc(2 * MiB);
    await src.read(buf, 0);
    assert.ok(buf.equals(data.subarray(0, 2 * MiB)));
    assert.ok(src.maxInFlight >= 4, `at most ${src.maxInFlight} requests in flight`);
    await src.close();
    // 300 ms per read, 100 ms allowed without progress: each attempt is cut off and retried
    // until the budget ends — a stalled server cannot hang a read. The last cause named depends on
    // where the budget ran out (a stalled reply, a retry still connecting on a busy host).
    const slow = await NbdSource.open(`nbd+unix:///?socket=${sock}`, { retry: { ...fast, stallMs: 100, budgetMs: 800 }, mapZeroes: false });
    const t0 = performance.now();
    const err = await slow.read(Buffer.alloc(4096), 0).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /gave up after/, `a stalled read ended with: ${err?.message}`);
    assert.not.match(err!.message, /\n/);
    assert.ok(slow.stats.retries >= 1, 'the stalled attempt was retried');
    assert.ok(performance.now() - t0 < 800 + 1500);
    await slow.close();
  } finally {
    await server.stop();
  }
});

tk('nbdkit error filter: errors while the trigger file exists fail reads (EIO, one line); removed, reads succeed', async () => {
  const sock = path.join(dir, 'k2.sock');
  const trigger = path.join(dir, 'errors-on');
  const server = (await nbdkit(file, sock, ['--filter=error', 'error=EIO', 'error-pread-rate=100%', `error-pread-file=${trigger}`]))!;
  try {
    const src = await NbdSource.open(`nbd+unix:///?socket=${sock}`, { retry: { ...fast, budgetMs: 500 } });
    fs.writeFileSync(trigger, '');
    const err = await src.read(Buffer.alloc(4096), 0).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /server error EIO/);
    assert.not.match(err!.message, /\n/);
    fs.rmSync(trigger);
    const buf = Buffer.alloc(MiB);
    await src.read(buf, 7 * MiB);
    assert.ok(buf.equals(data.subarray(7 * MiB)));
    await src.close();
  } finally {
    await server.stop();
  }
});

test.run();
