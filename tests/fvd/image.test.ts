/**
 * Engine behaviour, each on-disk structure checked after a reopen: bitmap, table, journal replay,
 * checkpoints, copy-on-write/read, free writes, discard, locking, header flags.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { FvdError } from '../../fvd/errors.js';
import { AUTOCLEAR_FULLY_LOCAL, decodeHeader, encodeHeader, HEADER_SIZE } from '../../fvd/format.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-image-'));
let n = 0;

/** A raw base with a recognisable pattern, one all-zero 64 KiB block at [128K, 192K). */
function makeBase(size = 2 * MiB): { file: string; data: Buffer } {
  const data = Buffer.alloc(size);
  for (let i = 0; i < size; i++) data[i] = (i * 131 + (i >> 9)) & 0xff || 1;
  data.fill(0, 128 * KiB, 192 * KiB);
  const file = path.join(dir, `base${n++}.raw`);
  fs.writeFileSync(file, data);
  return { file, data };
}

async function fresh(opts: CreateOptions): Promise<string> {
  const file = path.join(dir, `img${n++}.fvd`);
  await FvdImage.create(nodeIo, file, opts);
  return file;
}

async function readAll(img: FvdImage, off: number, len: number): Promise<Buffer> {
  const b = Buffer.alloc(len);
  await img.read(b, off);
  return b;
}

/**
 * Writes one sector (0xee) at 64 KiB + 1000 into the image over `baseData`, reopens it read-only
 * and checks 64..128 KiB: the base's bytes around the sector. Returns the reopened image.
 */
async function writeSectorAndReopen(file: string, baseData: Uint8Array): Promise<FvdImage> {
  const img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  await img.write(Buffer.alloc(512, 0xee), 64 * KiB + 1000);
  await img.close();
  const again = await FvdImage.open(nodeIo, file, { readOnly: true });
  const expect = Buffer.from(baseData.subarray(64 * KiB, 128 * KiB));
  expect.fill(0xee, 1000, 1512);
  assert.ok((await readAll(again, 64 * KiB, 64 * KiB)).equals(expect), 'the sector amid the base bytes after a reopen');
  return again;
}

for (const layout of ['raw', 'compact'] as const) {
  test(`${layout}: partial write copies the rest of the base block; bitmap survives close/reopen`, async () => {
    const base = makeBase();
    const file = await fresh({ base: base.file, baseFormat: 'raw', layout, size: 4 * MiB, blockSize: 64 * KiB, chunkSize: 256 * KiB });
    const img = await writeSectorAndReopen(file, base.data);
    const ext = img.extents().find((e) => e.offset <= 64 * KiB && e.offset + e.length > 64 * KiB)!;
    assert.is(ext.kind, 'local');
    assert.is(img.stats().wasDirty, false);
    // Untouched blocks still come from the base.
    assert.ok((await readAll(img, 0, 64 * KiB)).equals(base.data.subarray(0, 64 * KiB)));
    await img.close();
  });

  test(`${layout}: flushed writes survive a crash (journal replay); the image reopens dirty`, async () => {
    const base = makeBase();
    const file = await fresh({ base: base.file, baseFormat: 'raw', layout, size: 4 * MiB, blockSize: 16 * KiB, chunkSize: 64 * KiB });
    let img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
    for (let i = 0; i < 20; i++) await img.write(Buffer.alloc(4 * KiB, i + 1), i * 48 * KiB + 512);
    await img.write(Buffer.alloc(8 * KiB, 0x77), 3 * MiB); // beyond the base: a free write
    await img.flush();
    await img.abandon();
    img = await FvdImage.open(nodeIo, file, { readOnly: true });
    const st = img.stats();
    assert.ok(st.wasDirty);
    assert.ok(st.journalSectorsReplayed > 0);
    for (let i = 0; i < 20; i++) {
      const off = i * 48 * KiB + 512;
      assert.ok((await readAll(img, off, 4 * KiB)).every((b) => b === i + 1), `write ${i}`);
      assert.ok((await readAll(img, off - 512, 512)).equals(base.data.subarray(off - 512, off)), `COW head ${i}`);
    }
    assert.ok((await readAll(img, 3 * MiB, 8 * KiB)).every((b) => b === 0x77));
    await img.close();
    // A read-only open replays in memory only: the file still says dirty.
    const h = decodeHeader(file, fs.readFileSync(file).subarray(0, HEADER_SIZE), fs.statSync(file).size);
    assert.ok(h.incompatible & 1n);
    // A read-write open persists the replay and a clean close clears the flag.
    img = await FvdImage.open(nodeIo, file);
    await img.close();
    img = await FvdImage.open(nodeIo, file, { readOnly: true });
    assert.is(img.stats().wasDirty, false);
    assert.ok((await readAll(img, 512, 4 * KiB)).every((b) => b === 1));
    await img.close();
  });

  test(`${layout}: FUA write is durable without a flush`, async () => {
    const base = makeBase();
    const file = await fresh({ base: base.file, baseFormat: 'raw', layout, blockSize: 4 * KiB, chunkSize: 64 * KiB });
    let img = await FvdImage.open(nodeIo, file);
    await img.write(Buffer.alloc(1024, 0x5a), 8 * KiB, true);
    await img.abandon();
    img = await FvdImage.open(nodeIo, file, { readOnly: true });
    assert.ok((await readAll(img, 8 * KiB, 1024)).every((b) => b === 0x5a));
    await img.close();
  });

  test(`${layout}: copy-on-read is soft: lost in a crash (reads base again), persisted by close`, async () => {
    const base = makeBase();
    const file = await fresh({ base: base.file, baseFormat: 'raw', layout, blockSize: 64 * KiB, chunkSize: 256 * KiB });
    let img = await FvdImage.open(nodeIo, file);
    const before = img.stats().bytesInBase;
    assert.ok((await readAll(img, 300 * KiB, 100 * KiB)).equals(base.data.subarray(300 * KiB, 400 * KiB)));
    await img.idle();
    assert.ok(img.stats().bytesInBase < before, 'blocks became local in memory');
    await img.flush();
    assert.is(img.stats().journal.bitmapRuns, 0, 'copy-on-read writes no bitmap record');
    // compact: the chunks it allocated are mapped by TABLE_SET records (storage is not soft)
    assert.is(img.stats().journal.tableEntries > 0, layout === 'compact');
    await img.abandon();
    img = await FvdImage.open(nodeIo, file);
    assert.is(img.stats().bytesInBase, before, 'the soft bits were lost, as designed');
    assert.ok((await readAll(img, 300 * KiB, 100 * KiB)).equals(base.data.subarray(300 * KiB, 400 * KiB)));
    await img.idle();
    await img.close();
    img = await FvdImage.open(nodeIo, file, { readOnly: true });
    assert.ok(img.stats().bytesInBase < before, 'a clean close checkpoints the soft bits');
    assert.ok((await readAll(img, 256 * KiB, 192 * KiB)).equals(base.data.subarray(256 * KiB, 448 * KiB)));
    await img.close();
  });

  test(`${layout}: free writes (beyond the base, zero-detected blocks) log nothing`, async () => {
    const base = makeBase(1 * MiB);
    const file = await fresh({ base: base.file, baseFormat: 'raw', layout, size: 2 * MiB, blockSize: 64 * KiB, chunkSize: 128 * KiB });
    const img = await FvdImage.open(nodeIo, file);
    await img.write(Buffer.alloc(4096, 1), 1 * MiB + 4096); // beyond the base
    await img.write(Buffer.alloc(4096, 2), 128 * KiB + 512); // zero-detected block
    await img.flush();
    assert.is(img.stats().journal.bitmapRuns, 0);
    const zeroBlock = await readAll(img, 128 * KiB, 64 * KiB);
    assert.ok(zeroBlock.subarray(0, 512).every((b) => b === 0) && zeroBlock.subarray(512, 4608).every((b) => b === 2));
    await img.write(Buffer.alloc(4096, 3), 0); // a base block: needs a record
    await img.flush();
    assert.is(img.stats().journal.bitmapRuns, 1);
    await img.close();
  });

  test(`${layout}: discard and write-zeroes read zeros over base data, also after reopen`, async () => {
    const base = makeBase();
    const file = await fresh({ base: base.file, baseFormat: 'raw', layout, blockSize: 16 * KiB, chunkSize: 64 * KiB });
    let img = await FvdImage.open(nodeIo, file);
    await img.discard(100 * KiB + 512, 300 * KiB); // partial edges and whole chunks
    await img.writeZeroes(1 * MiB, 7 * 512);
    await img.close();
    img = await FvdImage.open(nodeIo, file, { readOnly: true });
    assert.ok((await readAll(img, 100 * KiB + 512, 300 * KiB)).every((b) => b === 0));
    assert.ok((await readAll(img, 1 * MiB, 7 * 512)).every((b) => b === 0));
    assert.ok((await readAll(img, 100 * KiB, 512)).equals(base.data.subarray(100 * KiB, 100 * KiB + 512)));
    assert.ok((await readAll(img, 400 * KiB + 512, 1024)).equals(base.data.subarray(400 * KiB + 512, 400 * KiB + 1536)));
    await img.close();
  });

  test(`${layout}: a tiny journal wraps and checkpoints; data survives a crash after it`, async () => {
    const base = makeBase();
    const file = await fresh({ base: base.file, baseFormat: 'raw', layout, blockSize: 4 * KiB, chunkSize: 16 * KiB, journalSize: 8 * KiB });
    let img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
    for (let i = 0; i < 200; i++) {
      // non-adjacent blocks: one record each; and table entries in compact layout
      await img.write(Buffer.alloc(512, (i % 250) + 1), ((i * 37) % 500) * 4 * KiB);
      if (i % 3 === 0) await img.flush();
    }
    await img.flush();
    assert.ok(img.stats().journal.checkpoints > 0, 'the journal filled up and checkpointed');
    await img.abandon();
    img = await FvdImage.open(nodeIo, file, { readOnly: true });
    const expect = new Map<number, number>();
    for (let i = 0; i < 200; i++) expect.set(((i * 37) % 500) * 4 * KiB, (i % 250) + 1);
    for (const [off, v] of expect) assert.ok((await readAll(img, off, 512)).every((b) => b === v), `block at ${off}`);
    await img.close();
  });
}

test('compact: table survives reopen; a discarded chunk is reused only after a flush', async () => {
  const file = await fresh({ layout: 'compact', size: 8 * MiB, chunkSize: 64 * KiB, blockSize: 4 * KiB });
  let img = await FvdImage.open(nodeIo, file);
  await img.write(Buffer.alloc(64 * KiB, 1), 0);
  await img.write(Buffer.alloc(64 * KiB, 2), 5 * MiB);
  await img.close();
  img = await FvdImage.open(nodeIo, file);
  assert.is(img.stats().allocatedChunks, 2);
  assert.ok((await readAll(img, 5 * MiB, 64 * KiB)).every((b) => b === 2));
  const size0 = img.stats().fileSize;
  await img.discard(0, 64 * KiB);
  assert.is(img.stats().allocatedChunks, 1);
  await img.write(Buffer.alloc(4 * KiB, 3), 1 * MiB); // before the flush: must not reuse the freed chunk
  assert.ok(img.stats().fileSize > size0, 'freed storage not reused before its unmapping is durable');
  await img.flush();
  const size1 = img.stats().fileSize;
  await img.write(Buffer.alloc(4 * KiB, 4), 2 * MiB); // after: reuses it
  assert.is(img.stats().fileSize, size1);
  assert.ok((await readAll(img, 2 * MiB, 64 * KiB)).subarray(4 * KiB).every((b) => b === 0), 'reused storage reads zeros');
  assert.ok((await readAll(img, 0, 64 * KiB)).every((b) => b === 0));
  await img.close();
});

test('compact on a file: unreferenced chunks are counted and reclaimed', async () => {
  const file = await fresh({ layout: 'compact', size: 4 * MiB, chunkSize: 64 * KiB, blockSize: 4 * KiB });
  let img = await FvdImage.open(nodeIo, file);
  for (let c = 0; c < 6; c++) await img.write(Buffer.alloc(4096, c + 1), c * 64 * KiB);
  await img.flush();
  await img.discard(0, 5 * 64 * KiB); // leaves storage chunk 5 referenced at the end
  await img.close();
  img = await FvdImage.open(nodeIo, file);
  assert.is(img.unreferencedChunks, 5);
  assert.is(await img.reclaimUnreferenced(), 5);
  assert.ok((await readAll(img, 5 * 64 * KiB, 4096)).every((b) => b === 6));
  await img.close();
});

test('create picks the block size when none is given: 4K over a base, by the bitmap budget, 64K without; reopened', async () => {
  const base = makeBase();
  const blockOf = async (opts: CreateOptions) => {
    const img = await FvdImage.open(nodeIo, await fresh(opts), { readOnly: true });
    try { return img.blockSize; } finally { await img.close(); }
  };
  assert.is(await blockOf({ base: base.file, baseFormat: 'raw' }), 4 * KiB);
  assert.is(await blockOf({ base: base.file, baseFormat: 'raw', layout: 'compact' }), 4 * KiB);
  assert.is(await blockOf({ size: 4 * MiB }), 64 * KiB);
  assert.is(await blockOf({ base: base.file, baseFormat: 'raw', blockSize: 64 * KiB }), 64 * KiB, 'a given size is kept');
  // A 200 GiB sparse base: 4 KiB blocks would need a 6.25 MiB bitmap, 16 KiB fits 2 MiB; a
  // smaller chunk size given caps the block (a chunk holds whole blocks).
  const big = path.join(dir, `sparse${n++}.raw`);
  fs.writeFileSync(big, '');
  fs.truncateSync(big, 200 * 1024 * MiB);
  assert.is(await blockOf({ base: big, baseFormat: 'raw' }), 16 * KiB);
  assert.is(await blockOf({ base: big, baseFormat: 'raw', layout: 'compact', chunkSize: 8 * KiB }), 8 * KiB);
  // A 4 KiB-block image over a base behaves: a 512-byte write copies only its 4 KiB block.
  const file = await fresh({ base: base.file, baseFormat: 'raw', size: 4 * MiB });
  const img = await writeSectorAndReopen(file, base.data);
  const local = img.extents().filter((e) => e.kind === 'local' && e.offset < 2 * MiB);
  const zeroBlock = (e: { offset: number }) => e.offset >= 128 * KiB && e.offset < 192 * KiB; // zero-detected at create
  assert.equal(local.filter((e) => !zeroBlock(e)).map((e) => [e.offset, e.length]), [[64 * KiB, 4 * KiB]]);
  await img.close();
});

test('locking, read-only and range errors are clear FvdErrors', async () => {
  const file = await fresh({ size: 1 * MiB });
  const img = await FvdImage.open(nodeIo, file);
  await assert_rejects(FvdImage.open(nodeIo, file), /in use/);
  await assert_rejects(img.read(Buffer.alloc(512), 1 * MiB), /outside the disk/);
  await assert_rejects(img.write(Buffer.alloc(1024), 1 * MiB - 512), /outside the disk/);
  await assert_rejects(img.discard(-512, 512), /outside the disk/);
  const ro = await FvdImage.open(nodeIo, file, { readOnly: true }); // read-only opens do not lock
  await assert_rejects(ro.write(Buffer.alloc(512), 0), /read-only/);
  await ro.close();
  await img.close();
});

test('unknown autoclear bits are cleared by a read-write open; FULLY_LOCAL lets the base go', async () => {
  const base = makeBase(1 * MiB);
  const file = await fresh({ base: base.file, baseFormat: 'raw', blockSize: 64 * KiB });
  const bytes = fs.readFileSync(file);
  const h = decodeHeader(file, bytes.subarray(0, HEADER_SIZE), bytes.length);
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, encodeHeader({ ...h, autoclear: (1n << 5n) | AUTOCLEAR_FULLY_LOCAL }), 0, HEADER_SIZE, 0);
  fs.closeSync(fd);
  fs.renameSync(base.file, base.file + '.gone');
  const img = await FvdImage.open(nodeIo, file); // no base needed when fully local
  assert.ok(img.stats().fullyLocal);
  await img.close();
  const after = decodeHeader(file, fs.readFileSync(file).subarray(0, HEADER_SIZE), fs.statSync(file).size);
  assert.is(after.autoclear, AUTOCLEAR_FULLY_LOCAL);
});

test('once every base block is local, close marks the image FULLY_LOCAL and the base can go', async () => {
  const base = makeBase(1 * MiB);
  const file = await fresh({ base: base.file, baseFormat: 'raw', blockSize: 64 * KiB, size: 2 * MiB });
  let img = await FvdImage.open(nodeIo, file);
  await readAll(img, 0, 512 * KiB);
  await img.idle();
  await img.close();
  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.is(img.stats().fullyLocal, false, 'half the base is still only in the base');
  await img.close();
  img = await FvdImage.open(nodeIo, file);
  await readAll(img, 512 * KiB, 512 * KiB);
  await img.idle();
  await img.close();
  fs.renameSync(base.file, base.file + '.gone');
  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.ok(img.stats().fullyLocal);
  assert.ok((await readAll(img, 0, 1 * MiB)).equals(base.data));
  await img.close();
});

test('an FVD base chain reads through every level', async () => {
  const raw = makeBase(1 * MiB);
  const mid = await fresh({ base: raw.file, baseFormat: 'raw', blockSize: 4 * KiB });
  let m = await FvdImage.open(nodeIo, mid);
  await m.write(Buffer.alloc(4 * KiB, 0xaa), 8 * KiB);
  await m.close();
  const top = await fresh({ base: path.basename(mid), baseFormat: 'fvd', blockSize: 4 * KiB });
  const t = await FvdImage.open(nodeIo, top);
  await t.write(Buffer.alloc(512, 0xbb), 8 * KiB + 512);
  const got = await readAll(t, 0, 16 * KiB);
  const expect = Buffer.from(raw.data.subarray(0, 16 * KiB));
  expect.fill(0xaa, 8 * KiB, 12 * KiB);
  expect.fill(0xbb, 8 * KiB + 512, 9 * KiB);
  assert.ok(got.equals(expect));
  assert.equal(t.stats().baseChain.map((b) => b.format), ['fvd', 'raw']);
  await t.close();
  // the mid image is the top's read-only base: unchanged by the top's writes
  m = await FvdImage.open(nodeIo, mid, { readOnly: true });
  assert.ok((await readAll(m, 8 * KiB, 4 * KiB)).every((b) => b === 0xaa));
  await m.close();
});

async function assert_rejects(p: Promise<unknown>, re: RegExp) {
  try {
    await p;
  } catch (err) {
    assert.instance(err, FvdError);
    assert.match((err as Error).message, re);
    return;
  }
  assert.unreachable(`expected rejection ${re}`);
}

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
test.run();
