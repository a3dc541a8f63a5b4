/**
 * The engine over storage that fails (tests/helpers/faulty-io.ts; the device suite does it for
 * real in tests/vm/e2e/12-faults.sh):
 *
 *  - a failed flush (fdatasync) poisons the image (fvd/flush-guard.ts): later writes and flushes
 *    fail, close leaves it dirty without a checkpoint, and the next open shows exactly what was
 *    flushed before the failure — not a bit for a block whose data the failed writeback lost;
 *  - read errors of the image or its base fail those requests and change nothing; a write that
 *    needs a copy from a failing base fails without setting its bit; all works again after;
 *  - a full file system: writes that need new space fail with ENOSPC (which the daemon passes to
 *    the guest as -ENOSPC), overwrites and flushes keep working, nothing is half-done, and writes
 *    succeed again once there is space; create allocates the journal so commits need no space;
 *  - the daemon's error reporting: errno mapping and one log line per burst of failures.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { checkImage } from '../../fvd/check.js';
import { nodeIo } from '../../storage/node-file.js';
import { BurstLog, requestErrno, requestErrnoOf } from '../../daemon/request-errors.js';
import { MemIo } from '../helpers/mem-io.js';
import { FaultyIo } from '../helpers/faulty-io.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 4 * KiB;

function fill(len: number, byte: number): Uint8Array {
  return new Uint8Array(len).fill(byte);
}

function basePattern(size: number): Uint8Array {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i++) b[i] = (i % 251) + 1;
  return b;
}

async function rejects(p: Promise<unknown>, re: RegExp, what: string): Promise<Error> {
  try {
    await p;
  } catch (err) {
    assert.match((err as Error).message, re, what);
    assert.not.match((err as Error).message, /\n/, `${what}: one line`);
    return err as Error;
  }
  assert.unreachable(`${what}: expected a rejection`);
  throw new Error('unreachable');
}

async function readAt(io: MemIo | FaultyIo, p: string, offset: number, len: number): Promise<Uint8Array> {
  const img = await FvdImage.open(io, p, { readOnly: true });
  try {
    const b = new Uint8Array(len);
    await img.read(b, offset);
    return b;
  } finally {
    await img.close();
  }
}

test('a failed flush: nothing more is written; the reopened image shows what was flushed before it, no lost block', async () => {
  const mem = new MemIo();
  const base = basePattern(1 * MiB);
  mem.writeFile('/f/base.raw', base);
  await FvdImage.create(mem, '/f/a.fvd', { base: 'base.raw', baseFormat: 'raw', blockSize: BS, journalSize: 16 * KiB });
  const io = new FaultyIo(mem);
  const img = await FvdImage.open(io, '/f/a.fvd', { copyOnRead: false });
  await img.write(fill(BS, 0x11), 0);
  await img.flush(); // durable: block 0
  await img.write(fill(BS, 0x22), 10 * BS); // bit 10 queued, data in the "page cache"
  io.faults('/f/a.fvd').failFlushes = 1;
  await rejects(img.flush(), /EIO|fdatasync/, 'the failing flush');
  assert.ok(io.lostWrites('/f/a.fvd') > 0, 'the writeback failure lost the unflushed write');
  assert.ok(img.failure, 'the image records the failure');
  // Linux would let the next fdatasync succeed: the engine must not (it would make bit 10 durable
  // for data that is gone, and block 10 would read zeros instead of its base data).
  await rejects(img.flush(), /a flush \(fdatasync\) failed/, 'a later flush');
  await rejects(img.write(fill(BS, 0x33), 20 * BS), /a flush \(fdatasync\) failed/, 'a later write');
  await rejects(img.close(), /closed without a checkpoint/, 'close');
  assert.is(mem.openCount, 0, 'close released the files');

  const report = await checkImage(mem, '/f/a.fvd');
  assert.equal(report.errors, [], 'check: clean (after replaying the journal)');
  assert.ok(Buffer.from(await readAt(mem, '/f/a.fvd', 0, BS)).equals(Buffer.from(fill(BS, 0x11))), 'flushed before the failure: reads back');
  assert.ok(Buffer.from(await readAt(mem, '/f/a.fvd', 10 * BS, BS)).equals(Buffer.from(base.subarray(10 * BS, 11 * BS))), 'unflushed block: its base data, not zeros');
  assert.ok(Buffer.from(await readAt(mem, '/f/a.fvd', 20 * BS, BS)).equals(Buffer.from(base.subarray(20 * BS, 21 * BS))), 'refused write: nothing');
  const again = await FvdImage.open(mem, '/f/a.fvd');
  await again.write(fill(BS, 0x44), 30 * BS);
  await again.close(); // a reopened image works normally
  assert.equal((await checkImage(mem, '/f/a.fvd')).errors, []);
});

test('read errors (image and base): those requests fail, nothing changes, everything works afterwards', async () => {
  const mem = new MemIo();
  const base = basePattern(1 * MiB);
  mem.writeFile('/r/base.raw', base);
  await FvdImage.create(mem, '/r/a.fvd', { base: 'base.raw', baseFormat: 'raw', layout: 'compact', blockSize: BS, chunkSize: 64 * KiB, journalSize: 16 * KiB });
  const io = new FaultyIo(mem);
  const img = await FvdImage.open(io, '/r/a.fvd', { copyOnRead: true });
  await img.write(fill(BS, 0x55), 0);
  await img.flush();
  io.faults('/r/base.raw').readEio = true;
  await rejects(img.read(new Uint8Array(BS), 8 * BS), /EIO/, 'a base read');
  // A partial write of a base block needs the rest of the block from the base: it must fail whole.
  await rejects(img.write(fill(512, 0x66), 12 * BS + 512), /EIO/, 'a write needing copy-on-write');
  assert.ok(Buffer.from(await (async () => { const b = new Uint8Array(BS); await img.read(b, 0); return b; })()).equals(Buffer.from(fill(BS, 0x55))), 'local data still reads');
  io.faults('/r/base.raw').readEio = false;
  io.faults('/r/a.fvd').readEio = true;
  await rejects(img.read(new Uint8Array(BS), 0), /EIO/, 'an image read');
  io.faults('/r/a.fvd').readEio = false;
  await img.flush(); // a read error does not poison the image
  const b = new Uint8Array(BS);
  await img.read(b, 12 * BS);
  assert.ok(Buffer.from(b).equals(Buffer.from(base.subarray(12 * BS, 13 * BS))), 'the failed copy-on-write left the block reading its base');
  await img.close();
  assert.equal((await checkImage(mem, '/r/a.fvd')).errors, []);
  assert.ok(Buffer.from(mem.readFile('/r/base.raw')).equals(Buffer.from(base)), 'the base was never written');
});

test('a full file system: writes needing space fail with ENOSPC and change nothing; overwrites and flushes work; space again, writes again', async () => {
  for (const layout of ['raw', 'compact'] as const) {
    const mem = new MemIo();
    const io = new FaultyIo(mem); // from create on: it knows which pages were ever written
    await FvdImage.create(io, '/n/a.fvd', { size: 2 * MiB, layout, blockSize: BS, chunkSize: 64 * KiB, journalSize: 16 * KiB });
    const img = await FvdImage.open(io, '/n/a.fvd');
    await img.write(fill(64 * KiB, 0x77), 0);
    await img.flush();
    io.faults('/n/a.fvd').full = true;
    const err = await rejects(img.write(fill(BS, 0x78), 1 * MiB), /ENOSPC|no space/, `${layout}: a write into new space`);
    assert.is(requestErrno(err), -28, `${layout}: the daemon completes it with -ENOSPC`);
    await img.write(fill(BS, 0x79), 0); // allocated already
    // Compact: the chunk is mapped before its data write fails; it must still read as zeros, and
    // the image close cleanly with every entry inside the file.
    await rejects(img.write(fill(64 * KiB, 0x7b), 1536 * KiB), /ENOSPC|no space/, `${layout}: a second write into new space`);
    await img.flush();
    assert.not.ok(img.failure, `${layout}: ENOSPC does not poison the image`);
    io.faults('/n/a.fvd').full = false;
    await img.write(fill(BS, 0x7a), 1 * MiB);
    await img.close();
    assert.equal((await checkImage(mem, '/n/a.fvd')).errors, [], `${layout}: check clean`);
    const first = await readAt(mem, '/n/a.fvd', 0, 2 * BS);
    assert.ok(first.subarray(0, BS).every((x) => x === 0x79) && first.subarray(BS).every((x) => x === 0x77), `${layout}: the overwrite and the old data`);
    assert.ok((await readAt(mem, '/n/a.fvd', 1 * MiB, BS)).every((x) => x === 0x7a), `${layout}: the write after space came back`);
    assert.ok((await readAt(mem, '/n/a.fvd', 1536 * KiB, 64 * KiB)).every((x) => x === 0), `${layout}: the failed write left zeros`);
  }
});

test('create allocates the journal (a commit on a full file system needs no new space)', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-faults-'));
  try {
    const f = path.join(dir, 'a.fvd');
    await FvdImage.create(nodeIo, f, { size: 64 * MiB, journalSize: 2 * MiB });
    const st = fs.statSync(f);
    assert.ok(st.blocks * 512 >= 2 * MiB, `allocated ${st.blocks * 512} bytes: the 2 MiB journal is not a hole`);
    assert.ok(st.blocks * 512 < 8 * MiB, 'the data area stays sparse');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('request errnos: ENOSPC and EDQUOT -> -ENOSPC, everything else -> -EIO', () => {
  assert.is(requestErrno(Object.assign(new Error('x'), { code: 'ENOSPC' })), -28);
  assert.is(requestErrno(Object.assign(new Error('x'), { code: 'EDQUOT' })), -28);
  assert.is(requestErrno(Object.assign(new Error('x'), { code: 'EIO' })), -5);
  assert.is(requestErrno(new Error('corrupt')), -5);
  assert.is(requestErrno(undefined), -5);
  assert.is(requestErrnoOf(-28), -28);
  assert.is(requestErrnoOf(-122), -28);
  assert.is(requestErrnoOf(-5), -5);
  assert.is(requestErrnoOf(-30), -5);
});

test('BurstLog: one line per burst, with the count; a lasting burst once per maxMs; flush reports at once', async () => {
  const lines: string[] = [];
  const log = new BurstLog((l) => lines.push(l), 30, 10_000);
  for (let i = 0; i < 50; i++) log.failure(`write at ${i * 4096}+4096: EIO`);
  assert.is(lines.length, 0, 'nothing while the burst lasts');
  await new Promise((r) => setTimeout(r, 120));
  assert.is(lines.length, 1, 'one line after it');
  assert.match(lines[0]!, /^50 requests failed in [\d.]+ s \(first: write at 0\+4096: EIO; last: write at 200704\+4096: EIO\)$/);
  log.failure('read at 0+512: EIO');
  await new Promise((r) => setTimeout(r, 120));
  assert.is(lines[1], 'request failed: read at 0+512: EIO');
  let now = 0;
  const long: string[] = [];
  const lasting = new BurstLog((l) => long.push(l), 1000, 10_000, () => now);
  for (; now <= 25_000; now += 100) lasting.failure('flush: EIO');
  assert.is(long.length, 2, 'a 25 s burst: a line at 10 s and at 20 s');
  lasting.flush();
  assert.is(long.length, 3, 'flush: the rest at once');
  assert.match(long[2]!, /^\d+ requests failed/);
  lasting.flush();
  assert.is(long.length, 3, 'nothing pending: no line');
});

test.run();
