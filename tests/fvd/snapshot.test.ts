/**
 * Internal snapshots (FORMAT.md §10), engine level: every on-disk structure checked after a reopen
 * (directory, refcount table, saved state, header fields), copy-on-write of shared chunks, refcounts
 * untouched by guest I/O, freed storage reused, discard of shared chunks, revert over a base
 * (including a fully local image whose base must be opened again), the redo of an interrupted
 * revert, check's refcount verification and repair, names, read-only and raw-like images.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { FvdError } from '../../fvd/errors.js';
import { checkImage } from '../../fvd/check.js';
import { CHUNK_EMPTY, INCOMPAT_COMPACT, INCOMPAT_DIRTY, INCOMPAT_SNAPSHOTS, computeLayout, decodeHeader, encodeHeader, type Header } from '../../fvd/format.js';
import { decodeDirectory, decodeRefcounts, encodeDirectory, encodeRefcounts, stateBytes, usedRefcountEntries } from '../../fvd/snapshot-format.js';
import { MemIo } from '../helpers/mem-io.js';
import { CrashIo } from '../helpers/crash-io.js';
import { patternBytes, sha256File } from '../helpers/cli.js';
import { getField, readDirectory, readHeader, readRefcounts, rewriteDirectory, rewriteField, rewriteRefcounts, setFeatureBits, writeBytes } from '../helpers/tamper.js';
import { rejectsOneLine } from '../helpers/rejects.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const CS = 64 * KiB;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-snap-'));
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
let n = 0;

async function fresh(opts: CreateOptions = {}): Promise<string> {
  const file = path.join(dir, `img${n++}.fvd`);
  await FvdImage.create(nodeIo, file, { layout: 'compact', size: 2 * MiB, chunkSize: CS, blockSize: 4 * KiB, journalSize: 64 * KiB, ...opts });
  return file;
}

async function readAll(img: FvdImage, off = 0, len = img.size - off): Promise<Buffer> {
  const b = Buffer.alloc(len);
  await img.read(b, off);
  return b;
}

async function rejects(p: Promise<unknown>, code: string, re: RegExp, what: string): Promise<FvdError> {
  const e = await rejectsOneLine(p, FvdError, re, what);
  assert.is(e.code, code, `${what}: ${e.message}`);
  return e;
}

const fileSize = (f: string) => fs.statSync(f).size;
/** Storage chunks in the file (the last one may be partly written: metadata ends mid-chunk). */
const chunksIn = (size: number, dataOffset: number) => Math.ceil((size - dataOffset) / CS);
const fileChunks = (f: string) => chunksIn(fileSize(f), Number(getField(f, 'dataOffset')));

test('format: directory and refcount table round-trip; header fields of the feature', () => {
  const h = readHeaderOfFresh();
  const entries = [
    { id: 3, name: 'a', stateOffset: h.dataOffset + 5 * CS, stateLength: stateBytes(h, h.virtualSize), virtualSize: h.virtualSize, dateSec: 1_700_000_000, dateNsec: 123_000_000, stateCrc: 0xdeadbeef, mappedChunks: 7 },
    { id: 9, name: 'ünïcödé name', stateOffset: h.dataOffset + 6 * CS, stateLength: stateBytes(h, h.virtualSize), virtualSize: h.virtualSize, dateSec: 1, dateNsec: 0, stateCrc: 1, mappedChunks: 0 },
  ];
  const bytes = encodeDirectory({ entries, nextId: 10 });
  assert.is(bytes.length % 512, 0);
  assert.equal(decodeDirectory('x', bytes, h, h.dataOffset + 7 * CS), { entries, nextId: 10 });
  const counts = Uint16Array.from([0, 2, 0, 65535, 1, 0, 0]);
  assert.is(usedRefcountEntries(counts), 5);
  assert.equal([...decodeRefcounts('x', encodeRefcounts(counts, 5))], [0, 2, 0, 65535, 1]);
  // Header: the fields survive encode/decode with the bit; without it they must be 0.
  const withSnaps = { ...h, incompatible: h.incompatible | INCOMPAT_SNAPSHOTS, refcountOffset: h.dataOffset, refcountLength: 512, snapshotsOffset: h.dataOffset + CS, snapshotsLength: 1024, revertSnapshotId: 9 };
  const back = decodeHeader('x', encodeHeader(withSnaps), h.dataOffset + 2 * CS);
  assert.equal([back.refcountOffset, back.refcountLength, back.snapshotsOffset, back.snapshotsLength, back.revertSnapshotId], [h.dataOffset, 512, h.dataOffset + CS, 1024, 9]);
  assert.throws(() => decodeHeader('x', encodeHeader({ ...withSnaps, refcountOffset: h.dataOffset + 512 }), h.dataOffset + 2 * CS), /refcount table at .* is not a chunk/);
  assert.throws(() => decodeHeader('x', encodeHeader({ ...withSnaps, snapshotsLength: 1000 }), h.dataOffset + 2 * CS), /invalid snapshot directory length 1000/);
  assert.throws(() => decodeHeader('x', encodeHeader({ ...h, revertSnapshotId: 1 }), h.dataOffset), /without the snapshot feature/);
});

function readHeaderOfFresh(): Header {
  return {
    version: 1, incompatible: INCOMPAT_COMPACT, compatible: 0n, autoclear: 0n, virtualSize: 2 * MiB, blockSize: 4 * KiB, chunkSize: CS,
    baseSize: 0, basePathLength: 0, baseFormat: 0, basePathCrc: 0,
    ...computeLayout({ virtualSize: 2 * MiB, blockSize: 4 * KiB, chunkSize: CS, baseSize: 0, compact: true, journalLength: 64 * KiB }),
    journalStartSeq: 5, refcountOffset: 0, refcountLength: 0, snapshotsOffset: 0, snapshotsLength: 0, revertSnapshotId: 0,
  };
}

test('create: directory, refcount table and saved state are on disk after reopen; data unchanged', async () => {
  const file = await fresh();
  let img = await FvdImage.open(nodeIo, file);
  await img.write(patternBytes(CS, 1), 0);
  await img.write(patternBytes(512, 2), 3 * CS + 1024);
  await img.write(patternBytes(CS + 4096, 3), 10 * CS);
  const before = await readAll(img);
  const info = await img.snapshots.create('first');
  assert.is(info.id, 1);
  assert.is(info.size, 4 * CS);
  await img.close();

  const h = readHeader(file);
  assert.ok(h.incompatible & INCOMPAT_SNAPSHOTS, 'SNAPSHOTS bit set');
  assert.not.ok(h.incompatible & INCOMPAT_DIRTY);
  assert.is(h.revertSnapshotId, 0);
  const d = readDirectory(file);
  assert.is(d.entries.length, 1);
  assert.is(d.nextId, 2);
  assert.is(d.entries[0]!.name, 'first');
  assert.is(d.entries[0]!.mappedChunks, 4);
  assert.ok(Math.abs(d.entries[0]!.dateSec - Date.now() / 1000) < 600, 'creation date recorded');
  // The saved table equals the active one, and every storage chunk it maps has refcount 1.
  const counts = readRefcounts(file);
  const saved = fs.readFileSync(file).subarray(d.entries[0]!.stateOffset, d.entries[0]!.stateOffset + h.tableLength);
  const active = fs.readFileSync(file).subarray(h.tableOffset, h.tableOffset + h.tableLength);
  assert.ok(Buffer.compare(saved, active) === 0, 'saved table = active table');
  const mapped: number[] = [];
  for (let c = 0; c < 32; c++) if (active.readUInt32LE(4 * c) !== CHUNK_EMPTY) mapped.push(active.readUInt32LE(4 * c));
  assert.is(mapped.length, 4);
  for (let id = 0; id < counts.length; id++) assert.is(counts[id], mapped.includes(id) ? 1 : 0, `refcount of storage chunk ${id}`);

  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.ok((await readAll(img)).equals(before), 'data unchanged');
  assert.equal(img.snapshots.list().map((s) => [s.id, s.name, s.size]), [[1, 'first', 4 * CS]]);
  assert.is(img.stats().snapshots, 1);
  await img.close();
});

test('next_id at 0xffffffff (the id space spent): create takes the smallest unused id and keeps next_id; check stays clean; reopened the same', async () => {
  const file = await fresh();
  let img = await FvdImage.open(nodeIo, file);
  await img.write(patternBytes(CS, 1), 0);
  await img.snapshots.create('a');
  await img.snapshots.create('b');
  await img.snapshots.create('c');
  await img.snapshots.delete('b'); // ids 1 and 3 stay: 2 is free
  await img.close();
  rewriteDirectory(file, (d) => (d.nextId = 0xffffffff));
  img = await FvdImage.open(nodeIo, file);
  const d1 = await img.snapshots.create('d');
  const d2 = await img.snapshots.create('e');
  await img.close();
  assert.equal([d1.id, d2.id], [2, 4], 'the smallest ids no entry uses');
  const d = readDirectory(file);
  assert.is(d.nextId, 0xffffffff, 'next_id stays');
  assert.equal(d.entries.map((e) => [e.id, e.name]).sort((x, y) => Number(x[0]) - Number(y[0])), [[1, 'a'], [2, 'd'], [3, 'c'], [4, 'e']]);
  const report = await checkImage(nodeIo, file);
  assert.is(report.errors.length, 0, report.errors.join('; '));
  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.equal(img.snapshots.list().map((s) => s.name).sort(), ['a', 'c', 'd', 'e']);
  await img.close();
});

test('copy-on-write: a write to a shared chunk copies it, the snapshot keeps the old data; a second snapshot shares again', async () => {
  const file = await fresh();
  let img = await FvdImage.open(nodeIo, file);
  const a = patternBytes(3 * CS, 4);
  await img.write(a, 0);
  await img.snapshots.create('a');
  const size0 = fileChunks(file);
  const b = patternBytes(1000, 5);
  await img.write(b, CS + 100); // partial write into shared chunk 1
  await img.write(patternBytes(CS, 6), 2 * CS); // whole shared chunk 2: written as the copy
  const expectNow = Buffer.from(a);
  Buffer.from(b).copy(expectNow, CS + 100);
  patternBytes(CS, 6).copy(expectNow, 2 * CS);
  assert.ok((await readAll(img, 0, 3 * CS)).equals(expectNow));
  assert.is(fileChunks(file), size0 + 2, 'two chunks copied, one new storage chunk each');
  await img.write(patternBytes(512, 7), CS); // chunk 1 is private now: in place
  patternBytes(512, 7).copy(expectNow, CS);
  assert.is(fileChunks(file), size0 + 2);
  const atB = Buffer.from(expectNow);
  await img.snapshots.create('b');
  const id1 = img.inspect().table![1];
  await img.write(patternBytes(512, 8), CS + 512); // shared with 'b' now: copied again
  assert.is.not(img.inspect().table![1], id1, 'chunk 1 moved to a copy');
  await img.close();

  img = await FvdImage.open(nodeIo, file);
  const now = await readAll(img, 0, 3 * CS);
  patternBytes(512, 8).copy(expectNow, CS + 512);
  assert.ok(now.equals(expectNow), 'active data after reopen');
  await img.snapshots.revert('b');
  assert.ok((await readAll(img, 0, 3 * CS)).equals(atB), 'snapshot b');
  await img.snapshots.revert('a');
  assert.ok((await readAll(img, 0, 3 * CS)).equals(Buffer.from(a)), 'snapshot a');
  await img.close();
  const r = await checkImage(nodeIo, file);
  assert.equal(r.errors, []);
  assert.is(r.overcounts + r.undercounts, 0);
});

test('refcounts, the directory and saved states are never written by guest I/O', async () => {
  const mem = new MemIo();
  const cio = new CrashIo(mem);
  const p = '/snap/io.fvd';
  await FvdImage.create(cio, p, { layout: 'compact', size: 2 * MiB, chunkSize: CS, blockSize: 4 * KiB, journalSize: 16 * KiB });
  let img = await FvdImage.open(cio, p);
  await img.write(patternBytes(4 * CS, 1), 0);
  await img.snapshots.create('s');
  await img.close();
  const h0 = decodeHeader(p, mem.readFile(p).subarray(0, 512), mem.readFile(p).length);
  const d = decodeDirectoryOf(mem, p);
  const regions: Array<[string, number, number]> = [
    ['refcount table', h0.refcountOffset, h0.refcountLength],
    ['directory', h0.snapshotsOffset, h0.snapshotsLength],
    ['saved state', d.stateOffset, d.stateLength],
  ];
  cio.startRecording();
  img = await FvdImage.open(cio, p);
  // Fresh allocations, copies of shared chunks, in-place writes, discards of shared and private
  // chunks, flushes (journal commits) and a checkpoint overflow of the small journal.
  for (let i = 0; i < 40; i++) {
    await img.write(patternBytes(4096, i), ((i * 7) % 30) * CS + (i % 5) * 4096);
    if (i % 3 === 0) await img.flush();
  }
  await img.discard(0, CS);
  await img.discard(CS + 4096, 8192);
  await img.discard(20 * CS, CS);
  await img.close();
  const key = MemIo.key(p);
  for (const e of cio.events) {
    if (e.path !== key || (e.kind !== 'write' && e.kind !== 'zero')) continue;
    for (const [what, off, len] of regions) {
      assert.ok(e.offset + e.length <= off || e.offset >= off + len, `${e.kind} @${e.offset}+${e.length} touches the ${what}`);
    }
  }
  const h1 = decodeHeader(p, mem.readFile(p).subarray(0, 512), mem.readFile(p).length);
  assert.equal([h1.refcountOffset, h1.refcountLength, h1.snapshotsOffset, h1.snapshotsLength], [h0.refcountOffset, h0.refcountLength, h0.snapshotsOffset, h0.snapshotsLength]);
  const r = await checkImage(mem, p);
  assert.equal(r.errors, []);
  assert.is(r.overcounts + r.undercounts, 0);
});

function decodeDirectoryOf(mem: MemIo, p: string): { stateOffset: number; stateLength: number } {
  const bytes = mem.readFile(p);
  const h = decodeHeader(p, bytes.subarray(0, 512), bytes.length);
  const dv = new DataView(bytes.buffer, bytes.byteOffset + h.snapshotsOffset);
  return { stateOffset: Number(dv.getBigUint64(32 + 8, true)), stateLength: Number(dv.getBigUint64(32 + 16, true)) };
}

test('delete frees what only the snapshot referenced; later allocations reuse it', async () => {
  const file = await fresh({ size: 4 * MiB });
  const img = await FvdImage.open(nodeIo, file);
  await img.write(patternBytes(4 * CS, 1), 0);
  await img.snapshots.create('s');
  await img.write(patternBytes(4 * CS, 2), 0); // every chunk copied: 4 chunks only 's' uses
  const grown = fileSize(file);
  await img.snapshots.delete('s');
  assert.is(img.stats().snapshots, 0);
  assert.ok(img.unreferencedChunks >= 4, `freed: ${img.unreferencedChunks}`);
  await img.write(patternBytes(4 * CS, 3), 8 * CS); // reuses the freed storage
  assert.ok(fileSize(file) <= grown, `file grew from ${grown} to ${fileSize(file)}: freed chunks were not reused`);
  const all = await readAll(img, 0, 12 * CS);
  assert.ok(all.subarray(0, 4 * CS).equals(patternBytes(4 * CS, 2)));
  assert.ok(all.subarray(8 * CS).equals(patternBytes(4 * CS, 3)));
  await img.close();
  // The last snapshot is gone: a plain compact image again.
  const h = readHeader(file);
  assert.not.ok(h.incompatible & INCOMPAT_SNAPSHOTS);
  assert.equal([h.refcountOffset, h.refcountLength, h.snapshotsOffset, h.snapshotsLength, h.revertSnapshotId], [0, 0, 0, 0, 0]);
  const r = await checkImage(nodeIo, file);
  assert.equal(r.errors, []);
});

test('discard: a whole shared chunk is unmapped but kept for the snapshot; a partial discard copies first', async () => {
  const file = await fresh();
  let img = await FvdImage.open(nodeIo, file);
  const a = patternBytes(2 * CS, 9);
  await img.write(a, 0);
  await img.snapshots.create('keep');
  await img.discard(0, CS);
  await img.writeZeroes(CS + 4096, 8192);
  const expect = Buffer.from(a);
  expect.fill(0, 0, CS);
  expect.fill(0, CS + 4096, CS + 4096 + 8192);
  assert.ok((await readAll(img, 0, 2 * CS)).equals(expect));
  assert.is(img.stats().allocatedChunks, 1);
  await img.close();
  img = await FvdImage.open(nodeIo, file);
  assert.ok((await readAll(img, 0, 2 * CS)).equals(expect), 'after reopen');
  await img.snapshots.revert('keep');
  assert.ok((await readAll(img, 0, 2 * CS)).equals(Buffer.from(a)), 'the snapshot still has both chunks');
  await img.close();
});

test('reclaimUnreferenced (check --repair) keeps the storage snapshots use', async () => {
  const file = await fresh();
  let img = await FvdImage.open(nodeIo, file);
  await img.write(patternBytes(4 * CS, 11), 0);
  await img.snapshots.create('s');
  await img.discard(0, 4 * CS); // the active table maps nothing; 's' still maps 4 chunks
  await img.close();
  img = await FvdImage.open(nodeIo, file);
  await img.reclaimUnreferenced();
  await img.snapshots.revert('s');
  assert.ok((await readAll(img, 0, 4 * CS)).equals(patternBytes(4 * CS, 11)));
  await img.close();
  assert.equal((await checkImage(nodeIo, file)).errors, []);
});

test('concurrent writes to one shared chunk copy it once and all land', async () => {
  const mem = new MemIo({ rng: new (await import('../helpers/rng.js')).Rng(3) });
  const p = '/snap/conc.fvd';
  await FvdImage.create(mem, p, { layout: 'compact', size: MiB, chunkSize: CS, blockSize: 4 * KiB });
  const img = await FvdImage.open(mem, p);
  await img.write(patternBytes(CS, 1), 0);
  await img.snapshots.create('s');
  const dataOffset = decodeHeader(p, mem.readFile(p).subarray(0, 512), mem.readFile(p).length).dataOffset;
  const size0 = chunksIn(mem.readFile(p).length, dataOffset);
  const expect = Buffer.from(patternBytes(CS, 1));
  await Promise.all(
    Array.from({ length: 12 }, (_, i) => {
      const data = patternBytes(1024, 100 + i);
      Buffer.from(data).copy(expect, i * 5120);
      return img.write(data, i * 5120);
    }),
  );
  assert.ok((await readAll(img, 0, CS)).equals(expect));
  assert.is(chunksIn(mem.readFile(p).length, dataOffset), size0 + 1, 'one copy');
  await img.snapshots.revert('s');
  assert.ok((await readAll(img, 0, CS)).equals(patternBytes(CS, 1)));
  await img.close();
});

test('structures larger than a chunk take consecutive chunks (from a free run or past the end)', async () => {
  // 4 KiB chunks, 16 MiB: a 16 KiB table (saved state: 4 chunks), and once 4096 chunks are written
  // an 8 KiB+ refcount table (3 chunks).
  const file = await fresh({ size: 16 * MiB, chunkSize: 4 * KiB, blockSize: 4 * KiB });
  let img = await FvdImage.open(nodeIo, file);
  const data = patternBytes(16 * MiB, 91);
  await img.write(data, 0);
  await img.snapshots.create('full');
  await img.discard(0, 8 * MiB); // shared chunks: unmapped, kept for 'full'
  await img.write(patternBytes(64 * KiB, 92), 0);
  await img.snapshots.create('second');
  await img.snapshots.delete('full'); // frees 2048-16 data chunks: long free runs
  await img.snapshots.create('third'); // its structures now come from a free run
  await img.close();
  const h = readHeader(file);
  const d = readDirectory(file);
  assert.ok(h.refcountLength > 2 * 4 * KiB, `refcount table of ${h.refcountLength} bytes spans chunks`);
  for (const e of d.entries) assert.ok(e.stateLength > 3 * 4 * KiB, 'saved state spans chunks');
  const third = d.entries.find((e) => e.name === 'third')!;
  assert.ok(third.stateOffset < h.dataOffset + 4096 * 4 * KiB, 'the third state was placed in freed space, not past the end');
  img = await FvdImage.open(nodeIo, file);
  const now = Buffer.from(data);
  now.fill(0, 0, 8 * MiB);
  patternBytes(64 * KiB, 92).copy(now, 0);
  assert.ok((await readAll(img)).equals(now));
  await img.snapshots.revert('second');
  assert.ok((await readAll(img)).equals(now));
  await img.close();
  const r = await checkImage(nodeIo, file);
  assert.equal(r.errors, []);
  assert.is(r.overcounts + r.undercounts, 0);
});

// ------------------------------------------------------------------------------------------------
// over a base

function rawBase(size: number, seed: number): { file: string; data: Buffer } {
  const file = path.join(dir, `base${n++}.raw`);
  const data = patternBytes(size, seed);
  fs.writeFileSync(file, data);
  return { file, data };
}

test('revert over a base: the saved bitmap comes back, blocks read from the base again', async () => {
  const base = rawBase(2 * MiB, 21);
  const file = await fresh({ base: base.file, baseFormat: 'raw' });
  let img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  await img.snapshots.create('pristine');
  await img.write(patternBytes(512, 22), 4096 + 100); // copy-on-write from the base
  const mid = await readAll(img);
  await img.snapshots.create('mid');
  await img.write(patternBytes(3 * CS, 23), 5 * CS);
  await img.close();

  img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  await img.snapshots.revert('pristine');
  assert.ok((await readAll(img)).equals(base.data), 'pristine = the base');
  assert.is(img.stats().bytesInBase, 2 * MiB, 'every block reads from the base again');
  await img.close();
  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.ok((await readAll(img)).equals(base.data), 'pristine after reopen');
  await img.close();
  img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  await img.snapshots.revert('mid');
  await img.close();
  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.ok((await readAll(img)).equals(mid), 'mid after reopen');
  await img.close();
});

test('copy-on-read bits are saved in a snapshot (the checkpoint first makes their data durable)', async () => {
  const base = rawBase(MiB, 31);
  const file = await fresh({ base: base.file, baseFormat: 'raw', size: MiB });
  let img = await FvdImage.open(nodeIo, file, { copyOnRead: true });
  await readAll(img, 0, 3 * CS); // copy-on-read: soft bits
  await img.idle();
  await img.snapshots.create('cor');
  await img.close();
  img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  await img.snapshots.revert('cor');
  assert.is(img.stats().bytesInBase, MiB - 3 * CS, 'the copied blocks are local in the snapshot');
  assert.ok((await readAll(img)).equals(base.data));
  await img.close();
});

test('revert of a fully local image to an older snapshot opens the base again; a missing base is a clear error and changes nothing', async () => {
  const base = rawBase(MiB, 41);
  const file = await fresh({ base: base.file, baseFormat: 'raw', size: MiB });
  let img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  await img.write(patternBytes(512, 42), 0);
  const old = await readAll(img);
  await img.snapshots.create('old');
  while (img.baseProgress().absent) await img.prefetchBlocks(0, img.baseProgress().blocks - 1);
  assert.ok(await img.markFullyLocal());
  await img.snapshots.create('local');
  await img.close();

  // Fully local: the base is not opened, yet reverting to 'old' needs it.
  img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  assert.ok(img.stats().fullyLocal);
  await img.snapshots.revert('old');
  assert.not.ok(img.stats().fullyLocal);
  assert.ok((await readAll(img)).equals(old));
  await img.close();
  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.ok((await readAll(img)).equals(old), 'after reopen: reads the base again');
  assert.ok(img.stats().bytesInBase > 0);
  await img.close();

  // Fully local again via the 'local' snapshot (all bits set); then the base goes away.
  img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  await img.snapshots.revert('local');
  await img.close();
  img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  assert.ok(img.stats().fullyLocal, 'close marks it fully local again');
  await img.close();
  fs.renameSync(base.file, `${base.file}.gone`);
  const sha = sha256File(file);
  img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  await rejects(img.snapshots.revert('old'), 'ENOENT', /base image .* not found/, 'revert needing a missing base');
  await img.close();
  assert.is(sha256File(file), sha, 'the refused revert changed nothing');
  assert.ok((await checkImage(nodeIo, file)).errors.length === 0);
  fs.renameSync(`${base.file}.gone`, base.file);
});

// ------------------------------------------------------------------------------------------------
// interrupted revert, check, refusals

test('an interrupted revert (marker in the header, torn table) is redone at open', async () => {
  const file = await fresh();
  let img = await FvdImage.open(nodeIo, file);
  const a = patternBytes(3 * CS, 51);
  await img.write(a, 0);
  await img.snapshots.create('a');
  await img.write(patternBytes(5 * CS, 52), 0);
  await img.close();
  const id = readDirectory(file).entries[0]!.id;
  // What a power cut between the commit (marker) and the end of the in-place table write leaves:
  // the marker set, the image dirty, the table region half garbage.
  rewriteField(file, 'revertSnapshotId', id);
  setFeatureBits(file, 'incompatible', INCOMPAT_DIRTY);
  const tableOffset = Number(getField(file, 'tableOffset'));
  writeBytes(file, tableOffset, Buffer.alloc(8, 0x00)); // chunks 0 and 1 → storage 0: "mapped twice"

  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.ok((await readAll(img, 0, 5 * CS)).equals(Buffer.concat([a, Buffer.alloc(2 * CS)])), 'read-only open redoes in memory');
  await img.close();
  assert.is(Number(getField(file, 'revertSnapshotId')), id, 'read-only open wrote nothing');
  img = await FvdImage.open(nodeIo, file);
  assert.is(Number(getField(file, 'revertSnapshotId')), 0, 'read-write open completed the revert');
  assert.ok((await readAll(img, 0, 5 * CS)).equals(Buffer.concat([a, Buffer.alloc(2 * CS)])));
  await img.close();
  const r = await checkImage(nodeIo, file);
  assert.equal(r.errors, []);
  assert.is(r.overcounts + r.undercounts, 0);
});

test('check: an overcount is a leak fixed by --repair; an undercount is an error that --repair corrects', async () => {
  const file = await fresh();
  let img = await FvdImage.open(nodeIo, file);
  await img.write(patternBytes(3 * CS, 61), 0);
  await img.snapshots.create('s');
  await img.close();
  const ids = readRefcounts(file).flatMap((c, id) => (c ? [id] : []));
  assert.is(ids.length, 3);

  rewriteRefcounts(file, (c) => (c[ids[0]!] = 2));
  let r = await checkImage(nodeIo, file);
  assert.equal(r.errors, []);
  assert.is(r.overcounts, 1);
  assert.match(r.notes.join('\n'), new RegExp(`chunk ${ids[0]}: refcount 2, referenced 1`));
  r = await checkImage(nodeIo, file, { repair: true });
  assert.ok(r.repaired);
  assert.is(readRefcounts(file)[ids[0]!], 1);
  r = await checkImage(nodeIo, file);
  assert.is(r.overcounts + r.undercounts, 0);

  rewriteRefcounts(file, (c) => (c[ids[1]!] = 0));
  r = await checkImage(nodeIo, file);
  assert.is(r.undercounts, 1);
  assert.match(r.errors.join('\n'), new RegExp(`chunk ${ids[1]}: refcount 0, referenced 1`));
  // Such an image refuses to revert or delete (a write may already have changed the snapshot).
  img = await FvdImage.open(nodeIo, file);
  await rejects(img.snapshots.revert('s'), 'EIO', /refcount is 0 \(run fvd check\)/, 'revert with an undercount');
  await rejects(img.snapshots.delete('s'), 'EIO', /refcount is 0/, 'delete with an undercount');
  await img.close();
  r = await checkImage(nodeIo, file, { repair: true });
  assert.ok(r.repaired);
  assert.equal(r.errors, []);
  r = await checkImage(nodeIo, file);
  assert.equal(r.errors, []);
  assert.is(r.overcounts + r.undercounts, 0);
  img = await FvdImage.open(nodeIo, file);
  await img.snapshots.revert('s');
  assert.ok((await readAll(img, 0, 3 * CS)).equals(patternBytes(3 * CS, 61)));
  await img.close();
});

test('names: invalid, duplicate and unknown names are refused, nothing written', async () => {
  const file = await fresh();
  let img = await FvdImage.open(nodeIo, file);
  await img.write(patternBytes(CS, 71), 0);
  await img.snapshots.create('ok name ✓');
  await img.close();
  const sha = sha256File(file);
  img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  const cases: Array<[string, RegExp]> = [
    ['', /must not be empty/],
    ['x'.repeat(256), /256 bytes long \(at most 255\)/],
    ['é'.repeat(128), /256 bytes long/],
    ['tab\there', /control character/],
    ['new\nline', /control character/],
    [' lead', /white space/],
    ['trail ', /white space/],
    ['bad\ud800', /not valid Unicode/],
  ];
  for (const [name, re] of cases) await rejects(img.snapshots.create(name), 'EINVAL', re, `create ${JSON.stringify(name)}`);
  await rejects(img.snapshots.create('ok name ✓'), 'EINVAL', /already exists/, 'duplicate');
  await rejects(img.snapshots.revert('nope'), 'ENOENT', /no snapshot named "nope"/, 'revert unknown');
  await rejects(img.snapshots.delete('nope'), 'ENOENT', /no snapshot named "nope"/, 'delete unknown');
  await img.close();
  assert.is(sha256File(file), sha, 'refused requests changed nothing');
  img = await FvdImage.open(nodeIo, file);
  await img.snapshots.create('x'.repeat(255)); // the longest name is fine
  await img.close();
  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.equal(img.snapshots.list().map((s) => s.name), ['ok name ✓', 'x'.repeat(255)]);
  await img.close();
});

test('read-only images list snapshots but refuse changes (EROFS); raw-like images refuse every snapshot operation', async () => {
  const file = await fresh();
  let img = await FvdImage.open(nodeIo, file);
  await img.snapshots.create('s');
  await img.close();
  const sha = sha256File(file);
  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.equal(img.snapshots.list().map((s) => s.name), ['s']);
  await rejects(img.snapshots.create('t'), 'EROFS', /read-only/, 'create');
  await rejects(img.snapshots.delete('s'), 'EROFS', /read-only/, 'delete');
  await rejects(img.snapshots.revert('s'), 'EROFS', /read-only/, 'revert');
  await img.close();
  assert.is(sha256File(file), sha);

  const raw = await fresh({ layout: 'raw' });
  img = await FvdImage.open(nodeIo, raw);
  await img.close();
  const rsha = sha256File(raw); // after an open/close cycle, so only the refused requests differ
  img = await FvdImage.open(nodeIo, raw);
  for (const op of [() => img.snapshots.create('s'), () => img.snapshots.revert('s'), () => img.snapshots.delete('s'), async () => img.snapshots.list()]) {
    await rejects(op(), 'EINVAL', /internal snapshots need the compact layout; this image is raw-like/, 'raw-like');
  }
  assert.is(img.stats().snapshots, 0);
  await img.close();
  assert.is(sha256File(raw), rsha, 'refused operations wrote nothing');
});

test.run();
