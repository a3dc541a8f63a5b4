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

test('growOnline refuses shrinking, a base past the end, a compact image with snapshots or without room for its table: one line, image unchanged', async () => {
  const io = new MemIo();
  await FvdImage.create(io, '/r/raw.fvd', { size: 64 * KiB, blockSize: 4 * KiB, journalSize: 64 * KiB });
  await FvdImage.create(io, '/r/snap.fvd', { size: 64 * KiB, blockSize: 4 * KiB, chunkSize: 16 * KiB, layout: 'compact', journalSize: 64 * KiB });
  const withSnap = await FvdImage.open(io, '/r/snap.fvd');
  await withSnap.write(pattern(16 * KiB, 8), 0);
  await withSnap.snapshots.create('before');
  await withSnap.close();
  // 4 KiB chunks, a 16 KiB journal: the table may grow by at most 16 KiB (4096 entries).
  await FvdImage.create(io, '/r/room.fvd', { size: 64 * KiB, blockSize: 4 * KiB, chunkSize: 4 * KiB, layout: 'compact', journalSize: 16 * KiB });
  io.writeFile('/r/base.raw', pattern(256 * KiB, 4));
  await FvdImage.create(io, '/r/over.fvd', { size: 64 * KiB, blockSize: 4 * KiB, base: 'base.raw', baseFormat: 'raw', journalSize: 64 * KiB });
  const cases: Array<[string, number, RegExp]> = [
    ['/r/raw.fvd', 32 * KiB, /can only grow/],
    ['/r/snap.fvd', 128 * KiB, /has internal snapshots: .*delete the snapshots first/],
    ['/r/room.fvd', 64 * 1024 * KiB, /not enough room for the metadata/],
    ['/r/over.fvd', 128 * KiB, /cannot grow a served image whose base extends past its end/],
  ];
  for (const [p, size, re] of cases) {
    const img = await FvdImage.open(io, p);
    const before = io.readFile(p).slice();
    await rejectsOneLine(img.growOnline(size), FvdError, re, p);
    assert.is(img.size, 64 * KiB);
    assert.ok(Buffer.from(io.readFile(p)).equals(Buffer.from(before)), `${p}: not a byte written`);
    await img.close();
    assert.is(sizeOnDisk(io, p), 64 * KiB, `${p}: size on disk`);
  }
});

// ------------------------------------------------------------------------------------------------
// Compact images: the table grows into the journal's space, and the journal moves (FORMAT.md §12.5).

function headerOf(io: MemIo, p: string) {
  const bytes = io.readFile(p);
  return decodeHeader(p, bytes.subarray(0, HEADER_SIZE), bytes.length);
}

const CHUNK = 4 * KiB;

test('growOnline (compact): the table grows past its page, the journal moves, workers see the entries; data kept after a crash and a clean close', async () => {
  for (const ending of ['crash', 'close'] as const) {
    const io = new MemIo();
    const p = `/k/${ending}.fvd`;
    const V = 512 * KiB; // 128 entries: one table page
    const V2 = 8 * 1024 * KiB; // 2048 entries: two pages
    await FvdImage.create(io, p, { size: V, blockSize: 4 * KiB, chunkSize: CHUNK, layout: 'compact', journalSize: 64 * KiB });
    const h0 = headerOf(io, p);
    const img = await FvdImage.open(io, p);
    const expected = new Uint8Array(V2);
    const w = async (off: number, n: number, seed: number) => {
      const d = pattern(n, seed);
      await img.write(d, off);
      expected.set(d, off);
    };
    await w(0, 40 * KiB, 1);
    await w(V - 12 * KiB, 12 * KiB, 2); // records still queued when the grow starts
    const view = img.sharedView();
    assert.is(view.table!.length, V / CHUNK);
    const r = await img.growOnline(V2);
    assert.equal(r, { oldSize: V, newSize: V2 });
    assert.is(view.table!.length, V2 / CHUNK, 'the shared table grew in place');
    assert.is(view.shared!.length, V2 / CHUNK, 'the shared snapshot flags grew in place');
    assert.ok(view.table!.subarray(V / CHUNK).every((e) => e === 0xffffffff), 'new entries unmapped');
    assert.is(view.liveSize[0], V2);
    const h1 = headerOf(io, p);
    assert.is(h1.virtualSize, V2, 'the new size is durable before the caller tells the kernel');
    assert.is(h1.tableOffset, h0.tableOffset);
    assert.is(h1.tableLength, 8 * KiB);
    assert.is(h1.journalOffset, h0.journalOffset + 4 * KiB, 'the journal moved up by the table growth');
    assert.is(h1.journalLength, h0.journalLength - 4 * KiB, 'and gave up that room');
    assert.ok(h1.journalStartSeq > h0.journalStartSeq + h0.journalLength / 512, 'journal_start_seq past every number of the old region');
    assert.is(h1.dataOffset, h0.dataOffset);
    const tail = new Uint8Array(V2 - V);
    await img.read(tail, V);
    assert.ok(tail.every((x) => x === 0), 'the new range reads zeros');
    // New chunks allocate past the old chunk count; their TABLE_SETs go to the moved journal.
    await w(V, 8 * KiB, 3);
    await w(V2 - 4 * KiB, 4 * KiB, 4);
    await w(3 * 1024 * KiB + 512, 3 * KiB, 5);
    await img.flush();
    if (ending === 'crash') await img.abandon();
    else await img.close();
    same(await readWholeDisk(io, p), expected, `${ending}: reopened`);
    await clean(io, p);
    const again = await FvdImage.open(io, p);
    assert.is(again.size, V2);
    await again.close();
    same(await readWholeDisk(io, p), expected, `${ending}: after a read-write open`);
  }
});

test('growOnline (compact): stale bytes in the storage of the chunk holding an unaligned old end read as zeros after the grow', async () => {
  const io = new MemIo();
  const p = '/t/disk.fvd';
  const V = 100 * KiB + 512;
  await FvdImage.create(io, p, { size: V, blockSize: 4 * KiB, chunkSize: 16 * KiB, layout: 'compact', journalSize: 64 * KiB });
  const first = await FvdImage.open(io, p);
  const last = 6 * 16 * KiB; // the chunk holding the old end: [96 KiB, 112 KiB)
  await first.write(pattern(16 * KiB, 10), 0);
  await first.write(pattern(V - last, 9), last);
  await first.close();
  // What a crashed shrink or an earlier whole-chunk copy could leave past the end in the storage.
  const h = headerOf(io, p);
  const written = io.readFile(p);
  const id = new DataView(written.buffer, written.byteOffset).getUint32(h.tableOffset + 6 * 4, true);
  assert.ok(id !== 0xffffffff, 'the last chunk is mapped');
  const file = new Uint8Array(Math.max(written.length, h.dataOffset + (id + 1) * 16 * KiB));
  file.set(written);
  const stale = h.dataOffset + id * 16 * KiB + (V - last);
  file.fill(0xee, stale, h.dataOffset + (id + 1) * 16 * KiB);
  io.writeFile(p, file);
  const img = await FvdImage.open(io, p);
  const r = await img.growOnline(128 * KiB);
  assert.is(r.newSize, 128 * KiB);
  const got = new Uint8Array(128 * KiB - V);
  await img.read(got, V);
  assert.ok(got.every((x) => x === 0), 'no stale bytes past the old end');
  await img.close();
  const expected = new Uint8Array(128 * KiB);
  expected.set(pattern(16 * KiB, 10), 0);
  expected.set(pattern(V - last, 9), last);
  same(await readWholeDisk(io, p), expected, 'reopened');
  await clean(io, p);
});

test('growOnline (compact) racing writes that allocate chunks and a second grow: every write lands, the grows apply in order', async () => {
  for (let round = 0; round < 6; round++) {
    const rng = new Rng(100 + round);
    const io = new MemIo({ rng: new Rng(200 + round) }); // completions in random order
    const p = `/x/disk${round}.fvd`;
    const V = 256 * KiB;
    await FvdImage.create(io, p, { size: V, blockSize: 4 * KiB, chunkSize: CHUNK, layout: 'compact', journalSize: 32 * KiB });
    const img = await FvdImage.open(io, p);
    const model = new Uint8Array(16 * 1024 * KiB);
    const writes: Promise<void>[] = [];
    // Writes in flight together never overlap (their order would be undefined): each takes a
    // 4 KiB slot of its own, written in part (a sector run) or whole.
    const used = new Set<number>();
    let seed = 1000 * (round + 1);
    const write = (size: number, whole: boolean) => {
      let slot: number;
      do slot = rng.int(size / (4 * KiB));
      while (used.has(slot));
      used.add(slot);
      const n = whole ? 4 * KiB : 512 * (1 + rng.int(7));
      const off = slot * 4 * KiB + (whole ? 0 : 512 * rng.int(8 - n / 512));
      const d = pattern(n, seed++);
      model.set(d, off);
      writes.push(img.write(d, off));
    };
    for (let i = 0; i < 24; i++) write(V, false);
    const flushes = [img.flush()];
    const first = img.growOnline(4 * 1024 * KiB);
    for (let i = 0; i < 24; i++) write(V, false);
    flushes.push(img.flush());
    const second = img.growOnline(16 * 1024 * KiB);
    assert.equal(await first, { oldSize: V, newSize: 4 * 1024 * KiB });
    for (let i = 0; i < 16; i++) write(4 * 1024 * KiB, i % 2 === 0);
    assert.equal(await second, { oldSize: 4 * 1024 * KiB, newSize: 16 * 1024 * KiB });
    for (let i = 0; i < 16; i++) write(16 * 1024 * KiB, i % 2 === 0);
    await Promise.all([...writes, ...flushes]);
    await img.flush();
    if (round % 2) await img.abandon();
    else await img.close();
    same(await readWholeDisk(io, p), model, `round ${round}: reopened`);
    await clean(io, p);
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
