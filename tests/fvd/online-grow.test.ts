/**
 * FvdImage.growOnline: the engine of a served image grows while open (`fvd resize` of a served
 * image, docs/DESIGN.md §8). Every case reopens the image afterwards: size, data, checkImage
 * clean; a crash (abandon) right after the grow keeps the new size; the refusals are one line
 * and leave the image as it was.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { FvdImage } from '../../fvd/image.js';
import { checkImage } from '../../fvd/check.js';
import { FvdError } from '../../fvd/errors.js';
import { HEADER_SIZE, decodeHeader } from '../../fvd/format.js';
import { MemIo } from '../helpers/mem-io.js';
import { Rng } from '../helpers/rng.js';
import { firstMismatch, readWholeDisk } from '../helpers/model.js';
import { rejectsOneLine } from '../helpers/rejects.js';

const KiB = 1024;

function pattern(n: number, seed: number): Uint8Array {
  const b = new Rng(seed).bytes(n);
  for (let i = 0; i < n; i += 509) b[i] = b[i]! | 1;
  return b;
}

function same(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.is(actual.length, expected.length, `${what}: length`);
  const m = firstMismatch(expected, actual, 0);
  assert.ok(m === undefined, `${what}: ${m}`);
}

async function clean(io: MemIo, p: string): Promise<void> {
  const r = await checkImage(io, p);
  assert.equal(r.errors, [], `check ${p}`);
}

function sizeOnDisk(io: MemIo, p: string): number {
  const bytes = io.readFile(p);
  return decodeHeader(p, bytes.subarray(0, HEADER_SIZE), bytes.length).virtualSize;
}

for (const V of [100 * KiB, 100 * KiB + 512]) {
  test(`growOnline (raw-like, ${V} bytes): data kept, new range zeros, shared size, reopen clean`, async () => {
    const io = new MemIo();
    const p = '/g/disk.fvd';
    await FvdImage.create(io, p, { size: V, blockSize: 4 * KiB, journalSize: 64 * KiB });
    const data = pattern(V, 1);
    const img = await FvdImage.open(io, p);
    await img.write(data, 0);
    const view = img.sharedView();
    const r = await img.growOnline(300 * KiB);
    assert.equal(r, { oldSize: V, newSize: 300 * KiB });
    assert.is(img.size, 300 * KiB);
    assert.is(view.liveSize[0], 300 * KiB, 'the workers see the new size');
    // Durable before the caller tells the kernel: the header on disk has the new size.
    assert.is(sizeOnDisk(io, p), 300 * KiB);
    const tail = new Uint8Array(300 * KiB - V);
    await img.read(tail, V);
    assert.ok(tail.every((x) => x === 0), 'the new range reads zeros');
    await img.write(pattern(8 * KiB, 2), 280 * KiB);
    await img.close();
    const expected = new Uint8Array(300 * KiB);
    expected.set(data);
    expected.set(pattern(8 * KiB, 2), 280 * KiB);
    same(await readWholeDisk(io, p), expected, 'reopened');
    await clean(io, p);
  });
}

test('growOnline: a crash right after the grow keeps the new size and the flushed data', async () => {
  const io = new MemIo();
  const p = '/c/disk.fvd';
  await FvdImage.create(io, p, { size: 64 * KiB, blockSize: 4 * KiB, journalSize: 64 * KiB });
  const img = await FvdImage.open(io, p);
  await img.growOnline(128 * KiB);
  await img.write(pattern(4 * KiB, 3), 120 * KiB);
  await img.flush();
  await img.abandon();
  const again = await FvdImage.open(io, p);
  assert.is(again.size, 128 * KiB);
  const got = new Uint8Array(4 * KiB);
  await again.read(got, 120 * KiB);
  same(got, pattern(4 * KiB, 3), 'data past the old end');
  await again.close();
  await clean(io, p);
});

test('setLiveSize: a recovery after a grow interrupted before UPDATE_SIZE serves the old size, then the new', async () => {
  const io = new MemIo();
  const p = '/l/disk.fvd';
  await FvdImage.create(io, p, { size: 64 * KiB, blockSize: 4 * KiB, journalSize: 64 * KiB });
  const img = await FvdImage.open(io, p);
  await img.write(pattern(64 * KiB, 4), 0);
  await img.growOnline(128 * KiB);
  await img.abandon(); // the server died before UPDATE_SIZE
  const again = await FvdImage.open(io, p);
  const view = again.sharedView();
  assert.is(again.size, 128 * KiB);
  assert.is(view.liveSize[0], 128 * KiB);
  again.setLiveSize(64 * KiB);
  assert.is(view.liveSize[0], 64 * KiB, 'the workers serve the device size');
  const got = new Uint8Array(64 * KiB);
  await again.read(got, 0);
  same(got, pattern(64 * KiB, 4), 'data below the old end');
  assert.throws(() => again.setLiveSize(128 * KiB + 512), /live size .* out of range/);
  assert.throws(() => again.setLiveSize(1000), /out of range/);
  assert.is(view.liveSize[0], 64 * KiB, 'unchanged by a refused size');
  again.setLiveSize(128 * KiB);
  assert.is(view.liveSize[0], 128 * KiB, 'raised before UPDATE_SIZE');
  await again.close();
  await clean(io, p);
});

test('growOnline: stale bytes past the old end (a crashed shrink) read as zeros after the grow', async () => {
  const io = new MemIo();
  const p = '/s/disk.fvd';
  await FvdImage.create(io, p, { size: 64 * KiB, blockSize: 4 * KiB, journalSize: 64 * KiB });
  const bytes = io.readFile(p);
  const longer = new Uint8Array(bytes.length + 32 * KiB);
  longer.set(bytes);
  longer.fill(0xee, bytes.length);
  io.writeFile(p, longer);
  const img = await FvdImage.open(io, p);
  await img.growOnline(128 * KiB);
  const got = new Uint8Array(64 * KiB);
  await img.read(got, 64 * KiB);
  assert.ok(got.every((x) => x === 0), 'no stale bytes');
  await img.close();
  await clean(io, p);
});

test('growOnline (encrypted raw-like): the new range reads zero plaintext, data kept, reopen with the key clean', async () => {
  const io = new MemIo();
  const p = '/e/disk.fvd';
  const key = new TextEncoder().encode('a passphrase for the tests');
  const kdf = { log2N: 10, r: 8, p: 1 };
  await FvdImage.create(io, p, { size: 64 * KiB, blockSize: 4 * KiB, journalSize: 64 * KiB, encrypt: { key, kdf } });
  const img = await FvdImage.open(io, p, { key });
  await img.write(pattern(64 * KiB, 6), 0);
  await img.growOnline(128 * KiB);
  const tail = new Uint8Array(64 * KiB);
  await img.read(tail, 64 * KiB);
  assert.ok(tail.every((x) => x === 0), 'zero plaintext past the old end');
  await img.write(pattern(4 * KiB, 7), 100 * KiB);
  await img.close();
  const again = await FvdImage.open(io, p, { key, readOnly: true });
  const all = new Uint8Array(128 * KiB);
  await again.read(all, 0);
  await again.close();
  const expected = new Uint8Array(128 * KiB);
  expected.set(pattern(64 * KiB, 6));
  expected.set(pattern(4 * KiB, 7), 100 * KiB);
  same(all, expected, 'reopened');
  await clean(io, p);
});

test('growOnline refuses shrinking, compact images and a base past the end, one line, image unchanged', async () => {
  const io = new MemIo();
  await FvdImage.create(io, '/r/raw.fvd', { size: 64 * KiB, blockSize: 4 * KiB, journalSize: 64 * KiB });
  await FvdImage.create(io, '/r/compact.fvd', { size: 64 * KiB, blockSize: 4 * KiB, chunkSize: 16 * KiB, layout: 'compact', journalSize: 64 * KiB });
  io.writeFile('/r/base.raw', pattern(256 * KiB, 4));
  await FvdImage.create(io, '/r/over.fvd', { size: 64 * KiB, blockSize: 4 * KiB, base: 'base.raw', baseFormat: 'raw', journalSize: 64 * KiB });
  const cases: Array<[string, number, RegExp]> = [
    ['/r/raw.fvd', 32 * KiB, /can only grow/],
    ['/r/compact.fvd', 128 * KiB, /cannot grow a served compact image .*offline/],
    ['/r/over.fvd', 128 * KiB, /cannot grow a served image whose base extends past its end/],
  ];
  for (const [p, size, re] of cases) {
    const before = io.readFile(p).slice();
    const img = await FvdImage.open(io, p);
    await rejectsOneLine(img.growOnline(size), FvdError, re, p);
    assert.is(img.size, 64 * KiB);
    await img.close();
    assert.is(sizeOnDisk(io, p), 64 * KiB, `${p}: size on disk`);
    assert.is(io.readFile(p).length, before.length, `${p}: file length`);
  }
});

test('growOnline over a base that ends before the old end: base data kept, new range zeros', async () => {
  const io = new MemIo();
  io.writeFile('/b/base.raw', pattern(40 * KiB, 5));
  await FvdImage.create(io, '/b/img.fvd', { size: 64 * KiB, blockSize: 4 * KiB, base: 'base.raw', baseFormat: 'raw', journalSize: 64 * KiB });
  const img = await FvdImage.open(io, '/b/img.fvd', { copyOnRead: false });
  await img.growOnline(96 * KiB);
  await img.close();
  const expected = new Uint8Array(96 * KiB);
  expected.set(pattern(40 * KiB, 5));
  same(await readWholeDisk(io, '/b/img.fvd'), expected, 'reopened');
  await clean(io, '/b/img.fvd');
});

test.run();
