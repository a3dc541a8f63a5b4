/**
 * Bad input, engine API and CLI: damaged images (header, geometry, truncation, feature bits, base
 * chain, journal, lookup table), out-of-range and forbidden requests, and concurrent writers.
 *
 * For every refused image: FvdImage.open (read-write and read-only) throws an FvdError whose
 * message is one line naming the file and the problem; `fvd info`, `info --json`, `map`, `io`
 * `convert`, `snapshot -l` and `snapshot -c` fail with one line on stderr and a non-zero exit (never 70 = internal error);
 * `fvd check` (and `check --repair`) exits 2 naming the problem; and the sha256 of every file
 * involved is the same before and after all of it.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { NodeFile, nodeIo } from '../../storage/node-file.js';
import type { IoBackend } from '../../fvd/io.js';
import { LOCK_EX, LOCK_NB, libc } from '../../ffi/libc.js';
import { FvdError } from '../../fvd/errors.js';
import { AUTOCLEAR_FULLY_LOCAL, BASE_FVD, INCOMPAT_DIRTY, INCOMPAT_SNAPSHOTS, PAGE, roundUp, tableBytes } from '../../fvd/format.js';
import { REC_BITMAP_SET, REC_TABLE_SET } from '../../fvd/journal.js';
import {
  CLI,
  TempDir,
  assertNoCrash,
  assertOk,
  assertOneLineError,
  assertUnchanged,
  fvd,
  fvdAsync,
  fvdWithin,
  json,
  patternBytes,
  snapshot,
} from '../helpers/cli.js';
import {
  fixHeaderCrc,
  flipByte,
  getField,
  readDirectory,
  readRefcounts,
  rewriteDirectory,
  rewriteRefcounts,
  injectJournal,
  injectRecords,
  journalSector,
  journalSlot,
  readHeader,
  rewriteField,
  rewriteHeader,
  scribbleJournal,
  setBasePath,
  setDirty,
  setFeatureBits,
  setTableEntry,
  truncate,
  unknownRecordBody,
  writeBytes,
} from '../helpers/tamper.js';
import { rejectsOneLine } from '../helpers/rejects.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-bad-input-');
const caseDir = () => tmp.caseDir();
let convertSeq = 0;

function rawBase(file: string, size: number, seed = 7): Buffer {
  const data = patternBytes(size, seed);
  fs.writeFileSync(file, data);
  return data;
}

async function create(file: string, options: CreateOptions): Promise<void> {
  await FvdImage.create(nodeIo, file, { journalSize: 64 * KiB, ...options });
}

async function writeImage(file: string, data: Uint8Array, offset: number): Promise<void> {
  const img = await FvdImage.open(nodeIo, file);
  try {
    await img.write(data, offset);
  } finally {
    await img.close();
  }
}

async function readImage(file: string, offset = 0, length?: number): Promise<Buffer> {
  const img = await FvdImage.open(nodeIo, file, { readOnly: true });
  try {
    const buf = Buffer.alloc(length ?? img.size - offset);
    await img.read(buf, offset);
    return buf;
  } finally {
    await img.close();
  }
}

/** Resolves to the error an engine open fails with (closing the image if it unexpectedly opens). */
async function openError(file: string, readOnly: boolean): Promise<unknown> {
  try {
    const img = await FvdImage.open(nodeIo, file, { readOnly });
    await img.close();
    return null;
  } catch (err) {
    return err;
  }
}

function assertFvdError(err: unknown, problem: RegExp, names: string[], what: string): FvdError {
  assert.ok(err !== null, `${what}: the image opened, expected a refusal matching ${problem}`);
  assert.instance(err, FvdError, `${what}: expected an FvdError, got ${(err as Error)?.stack ?? err}`);
  const e = err as FvdError;
  assert.not.match(e.message, /[\r\n]/, `${what}: message is not one line: ${JSON.stringify(e.message)}`);
  assert.match(e.message, problem, `${what}: message does not name the problem: ${e.message}`);
  assert.ok(
    names.some((n) => e.message.includes(n)),
    `${what}: message names none of ${JSON.stringify(names)}: ${e.message}`,
  );
  return e;
}

interface RefusalOptions {
  /** Strings of which at least one must appear in the message (default: the image's basename). */
  names?: string[];
  /** Other files that must stay untouched (bases). */
  others?: string[];
  /** The magic is gone, so probing says raw: pass -f fvd to `fvd io`. */
  noMagic?: boolean;
}

/** The full refusal contract for one damaged image. */
async function expectRefused(file: string, problem: RegExp, o: RefusalOptions = {}): Promise<void> {
  const names = o.names ?? [path.basename(file)];
  const files = [file, ...(o.others ?? [])];
  const before = snapshot(files);

  for (const readOnly of [false, true]) {
    const what = `FvdImage.open(${readOnly ? 'read-only' : 'read-write'})`;
    assertFvdError(await openError(file, readOnly), problem, names, what);
    assertUnchanged(before, what);
  }

  // The CLI runs concurrently (they all refuse, so none of them may write); hashes are compared
  // after all of them ended.
  const fmt = o.noMagic ? ['-f', 'fvd'] : [];
  const out = path.join(path.dirname(file), `converted-${++convertSeq}.raw`);
  const refusing = [
    ['info', file],
    ['info', '--json', file],
    ['map', '--json', file],
    ['io', ...fmt, '-c', 'read 0 4k', file],
    ['io', ...fmt, '-c', 'write -P 0x5a 0 4k', '-c', 'flush', file],
    ['convert', ...fmt, file, out],
    ['snapshot', '-l', file],
    ['snapshot', '-c', 'refused', file],
  ];
  const checks = [['check', file], ['check', '--repair', file]];
  // Two writers at once would trip over each other's lock (EBUSY), so the read-write ones run
  // one after the other, next to the read-only ones.
  const isWriter = (a: string[]) => a[0] === 'io' || (a[0] === 'snapshot' && a[1] === '-c');
  const writers = async () => {
    const rs: Awaited<ReturnType<typeof fvdAsync>>[] = [];
    for (const args of refusing.filter(isWriter)) rs.push(await fvdAsync(...args));
    return rs;
  };
  const [readers, written, checkResults, cj] = await Promise.all([
    Promise.all(refusing.filter((a) => !isWriter(a)).map((args) => fvdAsync(...args))),
    writers(),
    (async () => [await fvdAsync(...checks[0]!), await fvdAsync(...checks[1]!)])(),
    fvdAsync('check', '--json', file),
  ]);
  const results = [...readers, ...written];
  for (const r of results) {
    const line = assertOneLineError(r, problem);
    assert.ok(names.some((n) => line.includes(n)), `'${r.cmd}' names none of ${JSON.stringify(names)}: ${line}`);
  }
  assert.not.ok(fs.existsSync(out), 'a refused convert must not leave an output file');

  // check: the report goes to stdout (qemu-img style), exit 2, no crash.
  for (const r of checkResults) {
    assertNoCrash(r);
    assert.is(r.code, 2, `${r.cmd}: expected exit 2 (corrupt), got ${r.code}\n${r.stdout}${r.stderr}`);
    assert.match(r.stdout, problem, `${r.cmd}: report does not name the problem:\n${r.stdout}`);
    assert.ok(r.stderr.split('\n').filter(Boolean).length <= 1, `${r.cmd}: more than one stderr line:\n${r.stderr}`);
  }
  assert.is(cj.code, 2, cj.stdout + cj.stderr);
  const report = JSON.parse(cj.stdout) as { errors: string[]; repaired: boolean };
  assert.is(report.errors.length, 1);
  assert.match(report.errors[0]!, problem);
  assert.is(report.repaired, false);
  assertUnchanged(before, 'the refused CLI commands (info, map, io, convert, check, check --repair)');
}

/** A plain 1 MiB raw-like image with known data in its first 64 KiB. */
async function plainImage(dir: string, name = 'img.fvd', options: CreateOptions = {}): Promise<string> {
  const file = path.join(dir, name);
  await create(file, { size: MiB, ...options });
  await writeImage(file, patternBytes(64 * KiB, 3), 0);
  return file;
}

// ---------------------------------------------------------------------------------------------
// header

test('corrupt magic: refused everywhere (with -f fvd), nothing modified', async () => {
  const file = await plainImage(caseDir());
  flipByte(file, 1);
  await expectRefused(file, /not an FVD image|bad magic/, { noMagic: true });
});

test('bad header checksum: a flipped field byte and a flipped CRC byte', async () => {
  const dir = caseDir();
  const a = await plainImage(dir, 'a.fvd');
  flipByte(a, 41, 0x10); // virtual size, CRC left stale
  await expectRefused(a, /header checksum mismatch/);
  const b = await plainImage(dir, 'b.fvd');
  flipByte(b, 509, 0x01);
  await expectRefused(b, /header checksum mismatch/);
});

test('unsupported version and header size (CRC valid)', async () => {
  const dir = caseDir();
  const a = await plainImage(dir, 'a.fvd');
  rewriteField(a, 'version', 2);
  await expectRefused(a, /unsupported FVD version 2/);
  const b = await plainImage(dir, 'b.fvd');
  rewriteField(b, 'headerSize', 1024);
  await expectRefused(b, /header size 1024/);
});

test('truncated files: 0, 100, 4095 bytes, into the metadata, raw-like data area cut short', async () => {
  const dir = caseDir();
  const zero = await plainImage(dir, 'zero.fvd');
  truncate(zero, 0);
  await expectRefused(zero, /not an FVD image|truncated|empty/, { noMagic: true });
  for (const len of [100, 4095]) {
    const f = await plainImage(dir, `t${len}.fvd`);
    truncate(f, len);
    await expectRefused(f, new RegExp(`truncated: ${len} bytes`));
  }
  const meta = await plainImage(dir, 'meta.fvd');
  const h = readHeader(meta);
  assert.ok(h.journalLength > 0 && h.dataOffset > h.journalOffset);
  truncate(meta, h.journalOffset + 8 * KiB);
  await expectRefused(meta, /truncated: .*metadata ends at/);
  const data = await plainImage(dir, 'data.fvd');
  truncate(data, h.dataOffset + MiB / 2);
  await expectRefused(data, /truncated: .*raw-like/);
  const oneShort = await plainImage(dir, 'short.fvd');
  truncate(oneShort, h.dataOffset + MiB - 512);
  await expectRefused(oneShort, /truncated/);
});

test('compact image whose data area was cut short (a mapped chunk lies beyond the end)', async () => {
  const dir = caseDir();
  const file = path.join(dir, 'c.fvd');
  await create(file, { size: 4 * MiB, layout: 'compact' });
  await writeImage(file, patternBytes(MiB, 1), 0);
  await writeImage(file, patternBytes(MiB, 2), 2 * MiB);
  const h = readHeader(file);
  truncate(file, h.dataOffset + MiB); // storage chunk 1 (virtual chunk 2) is gone
  await expectRefused(file, /beyond the end of the file/);
});

// ---------------------------------------------------------------------------------------------
// feature bits

test('unknown incompatible feature bit: refused', async () => {
  const file = await plainImage(caseDir());
  setFeatureBits(file, 'incompatible', 1n << 5n);
  await expectRefused(file, /unsupported incompatible feature bits 0x20/);
  const file2 = await plainImage(caseDir());
  setFeatureBits(file2, 'incompatible', 1n << 63n);
  await expectRefused(file2, /unsupported incompatible feature bits 0x8000000000000000/);
});

test('unknown compatible feature bit: accepted (read-write too), data intact, bit kept', async () => {
  const file = await plainImage(caseDir());
  setFeatureBits(file, 'compatible', 1n << 9n);
  const before = snapshot([file]);
  const info = json<{ virtualSize: number }>(fvd('info', '--json', file));
  assert.is(info.virtualSize, MiB);
  assertUnchanged(before, 'info');
  assert.equal(await readImage(file, 0, 64 * KiB), patternBytes(64 * KiB, 3));
  await writeImage(file, Buffer.alloc(4 * KiB, 0x77), 128 * KiB);
  assert.equal(await readImage(file, 128 * KiB, 4 * KiB), Buffer.alloc(4 * KiB, 0x77));
  assert.is(getField(file, 'compatible') & (1n << 9n), 1n << 9n, 'an unknown compatible bit is preserved');
  assertOk(fvd('io', '-c', 'read -P 0x77 128k 4k', file));
  assert.is(fvd('check', file).code, 0);
});

test('unknown autoclear feature bit: accepted; a read-only open keeps it, a read-write open+close clears it on disk', async () => {
  const dir = caseDir();
  const base = path.join(dir, 'base.raw');
  rawBase(base, MiB);
  const file = path.join(dir, 'img.fvd');
  await create(file, { base: 'base.raw', baseFormat: 'raw' });
  setFeatureBits(file, 'autoclear', (1n << 9n) | (1n << 40n));
  const before = snapshot([file, base]);
  const ro = await FvdImage.open(nodeIo, file, { readOnly: true });
  await ro.close();
  assertOk(fvd('info', file));
  assertOk(fvd('io', '-r', '-c', 'read 0 4k', file));
  assertUnchanged(before, 'read-only opens');
  assert.is(getField(file, 'autoclear'), (1n << 9n) | (1n << 40n));

  const rw = await FvdImage.open(nodeIo, file);
  await rw.close();
  assert.is(getField(file, 'autoclear'), 0n, 'unknown autoclear bits are cleared by a writer');
  assert.is(getField(file, 'incompatible') & INCOMPAT_DIRTY, 0n, 'closed cleanly');
  // The header is still valid and the base still used.
  assert.equal(await readImage(file), patternBytes(MiB, 7));
  assert.is(fvd('check', file).code, 0);
});

test('unknown autoclear bit next to a known one: only the unknown bit is cleared', async () => {
  const file = await plainImage(caseDir());
  setFeatureBits(file, 'autoclear', AUTOCLEAR_FULLY_LOCAL | (1n << 3n));
  assertOk(fvd('io', '-c', 'write -P 0x33 0 4k', file));
  assert.is(getField(file, 'autoclear'), AUTOCLEAR_FULLY_LOCAL);
  assertOk(fvd('io', '-r', '-c', 'read -P 0x33 0 4k', file));
});

// ---------------------------------------------------------------------------------------------
// geometry

test('invalid geometry: block size not a power of two / too small, chunk size, virtual size', async () => {
  const dir = caseDir();
  const a = await plainImage(dir, 'a.fvd');
  rewriteField(a, 'blockSize', 5000);
  await expectRefused(a, /invalid block size 5000/);
  const b = await plainImage(dir, 'b.fvd');
  rewriteField(b, 'blockSize', 2048);
  await expectRefused(b, /invalid block size 2048/);
  const c = await plainImage(dir, 'c.fvd', { layout: 'compact' });
  rewriteField(c, 'chunkSize', 3 * MiB);
  await expectRefused(c, /invalid chunk size/);
  const d = await plainImage(dir, 'd.fvd');
  rewriteField(d, 'virtualSize', MiB + 100);
  await expectRefused(d, /invalid virtual size/);
  const e = await plainImage(dir, 'e.fvd');
  rewriteField(e, 'virtualSize', 0);
  await expectRefused(e, /invalid virtual size 0/);
  const f = await plainImage(dir, 'f.fvd');
  rewriteField(f, 'virtualSize', 1n << 62n);
  await expectRefused(f, /header field virtualSize \(byte 40\) is 4611686018427387904, above 2\^53 - 1/);
  const g = await plainImage(dir, 'g.fvd');
  rewriteField(g, 'virtualSize', 2 ** 51);
  await expectRefused(g, /invalid virtual size 2251799813685248/);
});

test('invalid geometry: overlapping regions, misaligned data offset, data offset inside metadata', async () => {
  const dir = caseDir();
  const a = await plainImage(dir, 'a.fvd', { layout: 'compact' });
  const ha = readHeader(a);
  assert.ok(ha.tableOffset > 0 && ha.journalOffset > ha.tableOffset);
  rewriteField(a, 'journalOffset', ha.tableOffset);
  await expectRefused(a, /journal region at \d+ overlaps/);

  const b = await plainImage(dir, 'b.fvd');
  rewriteField(b, 'journalOffset', 0);
  await expectRefused(b, /journal region at 0 overlaps/);

  const c = await plainImage(dir, 'c.fvd');
  const hc = readHeader(c);
  rewriteField(c, 'dataOffset', hc.dataOffset + 512);
  await expectRefused(c, /data offset \d+ .*(not block-aligned|overlaps)/);

  const d = await plainImage(dir, 'd.fvd');
  rewriteField(d, 'dataOffset', hc.journalOffset); // inside the journal
  await expectRefused(d, /data offset \d+ overlaps metadata/);

  const e = await plainImage(dir, 'e.fvd');
  rewriteField(e, 'tableLength', PAGE); // a raw-like image has no table
  await expectRefused(e, /table length/);

  const f = await plainImage(dir, 'f.fvd');
  rewriteField(f, 'refcountLength', PAGE);
  await expectRefused(f, /refcount\/snapshot/);
});

// ---------------------------------------------------------------------------------------------
// base chain

test('missing base: refused, names the base', async () => {
  const dir = caseDir();
  const base = path.join(dir, 'base.raw');
  rawBase(base, MiB);
  const file = path.join(dir, 'img.fvd');
  await create(file, { base: 'base.raw', baseFormat: 'raw' });
  fs.renameSync(base, path.join(dir, 'moved.raw'));
  await expectRefused(file, /base image 'base\.raw' not found/, { names: ['base.raw'] });
});

test('base resized after create (grown and shrunk): refused', async () => {
  for (const delta of [64 * KiB, -64 * KiB, 1]) {
    const dir = caseDir();
    const base = path.join(dir, 'base.raw');
    rawBase(base, MiB);
    const file = path.join(dir, 'img.fvd');
    await create(file, { base: 'base.raw', baseFormat: 'raw' });
    fs.truncateSync(base, MiB + delta);
    await expectRefused(file, new RegExp(`base image 'base\\.raw' is ${MiB + delta} bytes but was ${MiB} bytes`), { others: [base] });
  }
});

test('wrong base format recorded: raw base recorded as fvd is refused; create -F fvd on a raw file is refused', async () => {
  const dir = caseDir();
  const base = path.join(dir, 'base.raw');
  rawBase(base, MiB);
  const file = path.join(dir, 'img.fvd');
  await create(file, { base: 'base.raw', baseFormat: 'raw' });
  rewriteField(file, 'baseFormat', BASE_FVD);
  await expectRefused(file, /base image 'base\.raw'.*not an FVD image/, { others: [base], names: ['base.raw'] });

  const before = snapshot([base]);
  const other = path.join(dir, 'other.fvd');
  const r = fvd('create', '-b', base, '-F', 'fvd', other);
  assertOneLineError(r, /not an FVD image/);
  assert.not.ok(fs.existsSync(other), 'a refused create leaves no file');
  assertUnchanged(before, 'create -F fvd');
  let err: unknown = null;
  await FvdImage.create(nodeIo, other, { base: 'base.raw', baseFormat: 'fvd' }).catch((e) => (err = e));
  // 'base.raw' relative to the image's directory
  assertFvdError(err, /not an FVD image/, ['base.raw'], 'FvdImage.create');
  assert.not.ok(fs.existsSync(other));
});

test('invalid base format code, base path checksum mismatch, base format/path disagreement', async () => {
  const dir = caseDir();
  const base = path.join(dir, 'base.raw');
  rawBase(base, MiB);
  const mk = async (name: string) => {
    const f = path.join(dir, name);
    await create(f, { base: 'base.raw', baseFormat: 'raw' });
    return f;
  };
  const a = await mk('a.fvd');
  rewriteField(a, 'baseFormat', 9);
  await expectRefused(a, /invalid base format 9/, { others: [base] });
  const a4 = await mk('a4.fvd');
  rewriteField(a4, 'baseFormat', 4); // the first value past qcow2 (3): unknown to this reader
  await expectRefused(a4, /invalid base format 4/, { others: [base] });
  const b = await mk('b.fvd');
  flipByte(b, 512, 0x01); // the path's first byte; its CRC in the header no longer matches
  await expectRefused(b, /base path checksum mismatch/, { others: [base] });
  const c = await mk('c.fvd');
  rewriteField(c, 'baseFormat', 0);
  await expectRefused(c, /base format and base path disagree/, { others: [base] });
});

test('base chain loop: A → B → A is refused; an image that is its own base is refused', async () => {
  const dir = caseDir();
  const raw = path.join(dir, 'r.raw');
  rawBase(raw, MiB);
  const b = path.join(dir, 'b.fvd');
  const a = path.join(dir, 'a.fvd');
  await create(b, { base: 'r.raw', baseFormat: 'raw' });
  await create(a, { base: 'b.fvd', baseFormat: 'fvd' });
  const info = json<{ baseChain: Array<{ path: string; format: string }> }>(fvd('info', '--json', a));
  assert.equal(info.baseChain.map((e) => [path.basename(e.path), e.format]), [['b.fvd', 'fvd'], ['r.raw', 'raw']]);
  setBasePath(b, 'a.fvd', { format: BASE_FVD, baseSize: MiB });
  await expectRefused(a, /base chain loop/, { others: [b, raw], names: ['a.fvd', 'b.fvd'] });
  await expectRefused(b, /base chain loop/, { others: [a, raw], names: ['a.fvd', 'b.fvd'] });

  const self = path.join(dir, 'self.fvd');
  await create(self, { base: 'r.raw', baseFormat: 'raw' });
  setBasePath(self, 'self.fvd', { format: BASE_FVD, baseSize: MiB });
  await expectRefused(self, /base chain loop/, { others: [raw] });
  // create refuses it up front
  const r = fvd('create', '-b', 'x.fvd', '-F', 'fvd', path.join(dir, 'x.fvd'), '1M');
  assertOneLineError(r, /own base/);
  assert.not.ok(fs.existsSync(path.join(dir, 'x.fvd')));
});

// ---------------------------------------------------------------------------------------------
// journal

test('journal: checksum-valid sector with an unknown record type → corrupt', async () => {
  const file = await plainImage(caseDir());
  injectJournal(file, [unknownRecordBody(7)]);
  await expectRefused(file, /unknown journal record type 7/);
});

test('journal: bitmap record for an out-of-range block → corrupt', async () => {
  const dir = caseDir();
  rawBase(path.join(dir, 'base.raw'), MiB);
  const file = path.join(dir, 'img.fvd');
  await create(file, { base: 'base.raw', baseFormat: 'raw' });
  injectRecords(file, (p) => p.addBitmap(1_000_000, 1));
  await expectRefused(file, /journal bitmap record for blocks 1000000\+1 out of range/, { others: [path.join(dir, 'base.raw')] });

  const file2 = path.join(dir, 'img2.fvd');
  await create(file2, { base: 'base.raw', baseFormat: 'raw', blockSize: 64 * KiB });
  injectRecords(file2, (p) => p.addBitmap(15, 2)); // 16 blocks of 64 KiB: 15+2 runs past the end
  await expectRefused(file2, /out of range/, { others: [path.join(dir, 'base.raw')] });

  // a record with a zero count is malformed too
  const file3 = path.join(dir, 'img3.fvd');
  await create(file3, { base: 'base.raw', baseFormat: 'raw' });
  const body = Buffer.alloc(16);
  body.writeUInt16LE(REC_BITMAP_SET, 0);
  body.writeUInt32LE(0, 4);
  body.writeBigUInt64LE(0n, 8);
  injectJournal(file3, [body]);
  await expectRefused(file3, /out of range/, { others: [path.join(dir, 'base.raw')] });
});

test('journal: table record for an out-of-range chunk / on a raw-like image → corrupt', async () => {
  const dir = caseDir();
  const file = await plainImage(dir, 'c.fvd', { layout: 'compact' });
  injectRecords(file, (p) => p.addTable(999, 0));
  await expectRefused(file, /journal table record for chunk 999 out of range/);

  const raw = await plainImage(dir, 'r.fvd');
  const body = Buffer.alloc(12);
  body.writeUInt16LE(REC_TABLE_SET, 0);
  body.writeUInt16LE(1, 2);
  body.writeUInt32LE(0, 4);
  injectJournal(raw, [body]);
  await expectRefused(raw, /journal table record for chunk 0 out of range/);

  const far = await plainImage(dir, 'far.fvd', { layout: 'compact' });
  injectRecords(far, (p) => p.addTable(0, 5000)); // in range chunk, storage far beyond the file
  await expectRefused(far, /beyond the end of the file/);
});

test('journal: record overrunning its sector → corrupt', async () => {
  const file = await plainImage(caseDir(), 'c.fvd', { layout: 'compact' });
  const body = Buffer.alloc(496);
  body.writeUInt16LE(REC_TABLE_SET, 0);
  body.writeUInt16LE(200, 2); // 8 + 800 bytes: past the sector
  injectJournal(file, [body]);
  await expectRefused(file, /journal record overruns sector/);
});

test('journal: random garbage without valid checksums is ignored; the image opens dirty and cleans up', async () => {
  const dir = caseDir();
  rawBase(path.join(dir, 'base.raw'), MiB);
  const file = path.join(dir, 'img.fvd');
  await create(file, { base: 'base.raw', baseFormat: 'raw' });
  await writeImage(file, Buffer.alloc(64 * KiB, 0x42), 64 * KiB);
  scribbleJournal(file);
  rewriteField(file, 'incompatible', getField(file, 'incompatible') | INCOMPAT_DIRTY);
  const before = snapshot([file]);
  const info = json<{ dirty: boolean; journal: { sectorsToReplay: number } }>(fvd('info', '--json', file));
  assert.is(info.dirty, true);
  assert.is(info.journal.sectorsToReplay, 0);
  const chk = fvd('check', file);
  assert.is(chk.code, 0, chk.stdout + chk.stderr);
  assertUnchanged(before, 'info/check of a dirty image');
  const expected = patternBytes(MiB, 7);
  Buffer.alloc(64 * KiB, 0x42).copy(expected, 64 * KiB);
  assert.equal(await readImage(file), expected);
  // a writer opens it, and a clean close clears the dirty flag
  await writeImage(file, Buffer.alloc(4 * KiB, 0x43), 0);
  assert.is(getField(file, 'incompatible') & INCOMPAT_DIRTY, 0n);
  Buffer.alloc(4 * KiB, 0x43).copy(expected, 0);
  assert.equal(await readImage(file), expected);
  assert.is(json<{ dirty: boolean }>(fvd('info', '--json', file)).dirty, false);
});

test('journal: a valid sector with the wrong sequence number is stale and ignored', async () => {
  const file = await plainImage(caseDir());
  const start = Number(getField(file, 'journalStartSeq'));
  injectJournal(file, []); // sets dirty only
  // an unknown-type sector, but one sequence number too old: replay must stop before parsing it
  writeBytes(file, journalSlot(file, start), journalSector(start - 1, unknownRecordBody(9)));
  const img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.is(img.stats().journalSectorsReplayed, 0);
  await img.close();
  assert.is(fvd('check', file).code, 0);
});

// ---------------------------------------------------------------------------------------------
// lookup table

test('compact: table entry pointing beyond the file → corrupt', async () => {
  const file = await plainImage(caseDir(), 'c.fvd', { layout: 'compact' });
  setTableEntry(file, 0, 1000);
  await expectRefused(file, /chunk 0 maps to storage chunk 1000 beyond the end of the file/);
});

test('compact: two table entries sharing a storage chunk → corrupt', async () => {
  const file = path.join(caseDir(), 'c.fvd');
  await create(file, { size: 4 * MiB, layout: 'compact' });
  await writeImage(file, patternBytes(MiB, 1), 0);
  await writeImage(file, patternBytes(MiB, 2), MiB);
  setTableEntry(file, 3, 0);
  await expectRefused(file, /storage chunk 0 is mapped twice/);
});

// BUG (reported to the lead): a header whose lookup table is 2 GiB (virtual size 2^49 with 1 MiB
// chunks; the format allows up to 2^50) passes validation, and then the open reads the whole table
// in one fs.read, which throws a RangeError for lengths >= 2^31: `fvd info` exits 70 with a stack
// trace. Root cause: NodeFile.read/write pass lengths >= 2 GiB to fs.read/fs.write unsplit.
// Needs a 2 GiB sparse file and ~2 GiB of memory in the child process.
test('a header with a 2 GiB lookup table gives a one-line error, not an internal error', async () => {
  const file = await plainImage(caseDir(), 'wide.fvd', { layout: 'compact' });
  let dataOffset = 0;
  rewriteHeader(file, (h) => {
    h.virtualSize = 2 ** 49;
    h.tableLength = tableBytes(h.virtualSize, h.chunkSize);
    h.journalOffset = h.tableOffset + h.tableLength;
    h.dataOffset = roundUp(h.journalOffset + h.journalLength, h.chunkSize);
    dataOffset = h.dataOffset;
  });
  truncate(file, dataOffset);
  const before = snapshot([file]);
  const r = await fvdAsync('info', file);
  assertNoCrash(r);
  if (r.code !== 0) assertOneLineError(r, /wide\.fvd/);
  assertUnchanged(before, 'info');
});

// ---------------------------------------------------------------------------------------------
// requests

async function rejectsWith(p: Promise<unknown>, code: string, re: RegExp, what: string): Promise<void> {
  const e = await rejectsOneLine(p, FvdError, re, what);
  assert.is(e.code, code, `${what}: ${e.message}`);
}

test('out-of-range requests: FvdError EINVAL from the engine, image unchanged', async () => {
  for (const layout of ['raw', 'compact'] as const) {
    const file = await plainImage(caseDir(), 'img.fvd', { layout });
    const before = snapshot([file]);
    const img = await FvdImage.open(nodeIo, file);
    const cases: Array<[string, () => Promise<unknown>]> = [
      ['read past the end', () => img.read(Buffer.alloc(512), MiB)],
      ['read straddling the end', () => img.read(Buffer.alloc(8 * KiB), MiB - 4 * KiB)],
      ['read at a negative offset', () => img.read(Buffer.alloc(512), -512)],
      ['read at a fractional offset', () => img.read(Buffer.alloc(512), 0.5)],
      ['write past the end', () => img.write(Buffer.alloc(512, 1), MiB)],
      ['write straddling the end', () => img.write(Buffer.alloc(8 * KiB, 1), MiB - 4 * KiB)],
      ['write at a negative offset', () => img.write(Buffer.alloc(512, 1), -4096)],
      ['write at a huge offset', () => img.write(Buffer.alloc(512, 1), 2 ** 53)],
      ['discard past the end', () => img.discard(0, MiB + 512)],
      ['discard negative length', () => img.discard(0, -512)],
      ['discard negative offset', () => img.discard(-512, 512)],
      ['write-zeroes past the end', () => img.writeZeroes(MiB - 512, 1024)],
      ['write-zeroes NaN', () => img.writeZeroes(NaN, 512)],
    ];
    for (const [what, f] of cases) await rejectsWith(f(), 'EINVAL', /outside the disk/, `${layout}: ${what}`);
    // the image is still usable and its data intact
    const back = Buffer.alloc(64 * KiB);
    await img.read(back, 0);
    assert.equal(back, patternBytes(64 * KiB, 3));
    await img.close();
    assertUnchanged(before, 'refused requests');
  }
});

test('out-of-range requests through fvd io: one line, non-zero exit, image unchanged', async () => {
  const file = await plainImage(caseDir());
  const before = snapshot([file]);
  for (const c of ['read 1M 512', 'read 1020k 8k', 'write 1M 512', 'write -P 0x11 1020k 8k', 'discard 0 2M', 'zero 1M 1', 'read -512 512', 'write -512 512', 'zero 0 -1', 'read 0 1P', 'read 0 99999999999P', 'write 0x10 512', 'read abc 512']) {
    const r = fvd('io', '-c', c, file);
    assertOneLineError(r, /outside the disk|invalid (offset|length)|not a whole number/);
    assertUnchanged(before, r.cmd);
  }
  // a failing command stops the run: a write after it does not happen
  const r = fvd('io', '-c', 'read 2M 512', '-c', 'write -P 0x99 0 4k', file);
  assertOneLineError(r, /outside the disk/);
  assertUnchanged(before, r.cmd);
});

test('read-only open: write, write-zeroes, discard → EROFS; fvd io -r write refused', async () => {
  const file = await plainImage(caseDir());
  const before = snapshot([file]);
  const img = await FvdImage.open(nodeIo, file, { readOnly: true });
  await rejectsWith(img.write(Buffer.alloc(512, 1), 0), 'EROFS', /read-only/, 'write');
  await rejectsWith(img.writeZeroes(0, 64 * KiB), 'EROFS', /read-only/, 'writeZeroes');
  await rejectsWith(img.discard(0, 64 * KiB), 'EROFS', /read-only/, 'discard');
  await img.flush(); // a no-op, not an error
  await img.close();
  assertUnchanged(before, 'read-only engine');
  for (const c of ['write -P 0x11 0 4k', 'zero 0 64k', 'discard 0 64k']) {
    const r = fvd('io', '-r', '-c', c, file);
    assertOneLineError(r, /read-only/);
    assertUnchanged(before, r.cmd);
  }
  const rr = fvd('io', '-r', '-c', 'read -P 0 64k 64k', file);
  assertOk(rr);
});

test('second read-write open: EBUSY "in use", in the same process and from the CLI', async () => {
  const dir = caseDir();
  const file = await plainImage(dir);
  const holder = await FvdImage.open(nodeIo, file);
  try {
    await rejectsWith(FvdImage.open(nodeIo, file), 'EBUSY', /in use/, 'second open');
    const before = snapshot([file]);
    for (const args of [['io', '-c', 'write -P 0x11 0 4k', file], ['check', '--repair', file], ['io', '-c', 'read 0 4k', file]]) {
      const r = await fvdAsync(...args);
      assertOneLineError(r, /in use/);
      assert.ok(r.stderr.includes(path.basename(file)), r.stderr);
      assertUnchanged(before, r.cmd);
    }
    // readers do not need the lock
    const info = await fvdAsync('info', '--json', file);
    assert.is(info.code, 0, info.stderr);
    assert.is(JSON.parse(info.stdout).dirty, true, 'the holder marked the image dirty');
    // the holder still works
    await holder.write(Buffer.alloc(4 * KiB, 0x21), 0);
  } finally {
    await holder.close();
  }
  // after the holder closes, a writer gets in
  assertOk(fvd('io', '-c', 'read -P 0x21 0 4k', '-c', 'write -P 0x22 0 4k', file));
  assert.equal(await readImage(file, 0, 4 * KiB), Buffer.alloc(4 * KiB, 0x22));
});

test('second read-write open from another process while this one holds it, and vice versa', async () => {
  const file = await plainImage(caseDir());
  const imageUrl = pathToFileURL(path.join(path.dirname(CLI), '..', 'fvd', 'image.js')).href;
  const nodeFileUrl = pathToFileURL(path.join(path.dirname(CLI), '..', 'storage', 'node-file.js')).href;
  const script = `
    const { FvdImage } = await import(${JSON.stringify(imageUrl)});
    const { nodeIo } = await import(${JSON.stringify(nodeFileUrl)});
    const img = await FvdImage.open(nodeIo, process.argv[1]);
    process.stdout.write('held\\n');
    process.stdin.resume();
    process.stdin.on('end', async () => { await img.close(); process.exit(0); });
  `;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script, file], { stdio: ['pipe', 'pipe', 'inherit'] });
  try {
    await new Promise<void>((resolve, reject) => {
      child.stdout.setEncoding('utf8').on('data', (d: string) => d.includes('held') && resolve());
      child.on('exit', (code) => reject(new Error(`holder exited early (${code})`)));
    });
    await rejectsWith(FvdImage.open(nodeIo, file), 'EBUSY', /in use/, 'open while another process holds it');
    const r = await fvdAsync('io', '-c', 'write -P 0x31 0 4k', file);
    assertOneLineError(r, /in use/);
  } finally {
    child.stdin.end();
    await new Promise((r) => child.on('close', r));
  }
  const img = await FvdImage.open(nodeIo, file);
  await img.close();
});

test('CLI on a missing file, a directory, a non-image: one line', async () => {
  const dir = caseDir();
  const missing = path.join(dir, 'nope.fvd');
  for (const cmd of ['info', 'map', 'check']) {
    const r = fvd(cmd, missing);
    assertOneLineError(r, /nope\.fvd/);
    assert.match(r.stderr, /no such file/i);
  }
  assertOneLineError(fvd('io', '-c', 'read 0 512', missing), /no such file/i);
  assertOneLineError(fvd('info', dir), /not a regular file|directory/i);
  const text = path.join(dir, 'notes.txt');
  fs.writeFileSync(text, 'hello, not an image\n'.repeat(300));
  const before = snapshot([text]);
  assertOneLineError(fvd('info', text), /not an FVD image/);
  const chk = fvd('check', text);
  assert.is(chk.code, 2);
  assertUnchanged(before, 'info/check of a text file');
});


// ---------------------------------------------------------------------------------------------
// internal snapshots (FORMAT.md §10)

/** A 1 MiB compact image (64 KiB chunks) with data and two snapshots, 'a' and 'b'. */
async function snapImage(dir: string): Promise<string> {
  const file = path.join(dir, 's.fvd');
  await create(file, { size: MiB, layout: 'compact', chunkSize: 64 * KiB, blockSize: 4 * KiB });
  const img = await FvdImage.open(nodeIo, file);
  try {
    await img.write(patternBytes(3 * 64 * KiB, 81), 0);
    await img.snapshots.create('a');
    await img.write(patternBytes(64 * KiB, 82), 5 * 64 * KiB);
    await img.snapshots.create('b');
  } finally {
    await img.close();
  }
  return file;
}

const chunkOf = (file: string, offset: number) => (offset - readHeader(file).dataOffset) / readHeader(file).chunkSize;

test('snapshots: corrupt directory (checksum, magic) → corrupt, not repairable', async () => {
  const f1 = await snapImage(caseDir());
  flipByte(f1, readHeader(f1).snapshotsOffset + 40);
  await expectRefused(f1, /snapshot directory: checksum mismatch/);
  const f3 = await snapImage(caseDir());
  writeBytes(f3, readHeader(f3).snapshotsOffset, Buffer.from('JUNK'));
  await expectRefused(f3, /snapshot directory: bad magic/);
});

test('snapshots: the feature on a raw-like image, without its regions, or regions beyond the end → corrupt', async () => {
  const raw = await plainImage(caseDir());
  setFeatureBits(raw, 'incompatible', INCOMPAT_SNAPSHOTS);
  await expectRefused(raw, /snapshot feature set on a raw-like image/);
  const bare = await plainImage(caseDir(), 'c.fvd', { layout: 'compact' });
  setFeatureBits(bare, 'incompatible', INCOMPAT_SNAPSHOTS);
  await expectRefused(bare, /invalid refcount table length 0/);
  const cut = await snapImage(caseDir());
  truncate(cut, readHeader(cut).snapshotsOffset);
  await expectRefused(cut, /truncated: the snapshot directory/);
  const plain = await plainImage(caseDir(), 'c.fvd', { layout: 'compact' });
  rewriteField(plain, 'revertSnapshotId', 1);
  await expectRefused(plain, /refcount\/snapshot regions set without the snapshot feature/);
});

test('snapshots: inconsistent structures with valid checksums → corrupt', async () => {
  const dup = await snapImage(caseDir());
  rewriteDirectory(dup, (d) => (d.entries[1]!.name = d.entries[0]!.name));
  await expectRefused(dup, /two snapshots are named "a"/);
  const badName = await snapImage(caseDir());
  rewriteDirectory(badName, (d) => (d.entries[0]!.name = 'a\tb'));
  await expectRefused(badName, /control character/);
  const ids = await snapImage(caseDir());
  rewriteDirectory(ids, (d) => (d.nextId = 2));
  await expectRefused(ids, /invalid or repeated id 2/);
  const mapsMeta = await snapImage(caseDir());
  const refChunk = chunkOf(mapsMeta, readHeader(mapsMeta).refcountOffset);
  setTableEntry(mapsMeta, 10, refChunk);
  await expectRefused(mapsMeta, new RegExp(`chunk 10 maps to storage chunk ${refChunk}, which holds snapshot metadata`));
  const overlap = await snapImage(caseDir());
  rewriteDirectory(overlap, (d) => (d.entries[1]!.stateOffset = d.entries[0]!.stateOffset));
  await expectRefused(overlap, /snapshot metadata overlaps/);
  const marker = await snapImage(caseDir());
  rewriteField(marker, 'revertSnapshotId', 99);
  await expectRefused(marker, /interrupted revert to snapshot id 99, which does not exist/);
});

test('snapshots: a corrupt saved state — the image opens, check reports it (exit 2, --repair too), apply/delete of that snapshot refused, the other works', async () => {
  const dir = caseDir();
  const file = await snapImage(dir);
  const a = readDirectory(file).entries.find((e) => e.name === 'a')!;
  flipByte(file, a.stateOffset + 4); // storage id of chunk 1 in 'a's saved table
  const before = snapshot([file]);
  const activeBefore = await readImage(file);
  for (const args of [['-a', 'a'], ['-d', 'a']]) {
    assertOneLineError(await fvdAsync('snapshot', ...args, file), /snapshot 'a': saved table\/bitmap checksum mismatch/);
  }
  for (const args of [['check', file], ['check', '--repair', file]]) {
    const r = await fvdAsync(...args);
    assertNoCrash(r);
    assert.is(r.code, 2, `${r.cmd}\n${r.stdout}${r.stderr}`);
    assert.match(r.stdout, /snapshot 'a': saved table\/bitmap checksum mismatch/);
  }
  const list = json<Array<{ name: string }>>(await fvdAsync('snapshot', '-l', '--json', file));
  assert.equal(list.map((s) => s.name), ['a', 'b']);
  assertUnchanged(before, 'refused snapshot operations and check on a corrupt saved state');
  assert.equal(await readImage(file), activeBefore);
  // 'b' is intact and can be applied.
  assertOk(fvd('snapshot', '-a', 'b', file));
  assert.equal(await readImage(file, 5 * 64 * KiB, 64 * KiB), patternBytes(64 * KiB, 82));
});

test('snapshots: a refcount too low is reported by check (exit 2) and corrected by --repair (exit 3)', async () => {
  const file = await snapImage(caseDir());
  const shared = readRefcounts(file).findIndex((c) => c === 2);
  assert.ok(shared >= 0, 'a chunk in both snapshots');
  rewriteRefcounts(file, (c) => (c[shared] = 1));
  const before = snapshot([file]);
  const r = fvd('check', file);
  assert.is(r.code, 2, r.stdout);
  assert.match(r.stdout, new RegExp(`chunk ${shared}: refcount 1, referenced 2`));
  assertUnchanged(before, 'check without --repair');
  const fix = fvd('check', '--repair', file);
  assert.is(fix.code, 3, fix.stdout + fix.stderr);
  assert.is(readRefcounts(file)[shared], 2);
  assert.is(fvd('check', file).code, 0);
});

test('fvd snapshot: bad arguments, names and requests are one line each and change nothing', async () => {
  const dir = caseDir();
  const file = await snapImage(dir);
  const raw = await plainImage(dir, 'raw.fvd');
  const before = snapshot([file, raw]);
  const cases: Array<[string[], RegExp]> = [
    [['snapshot', file], /no action given/],
    [['snapshot', '-c', 'x', '-d', 'a', file], /exactly one of -c, -l, -d, -a/],
    [['snapshot', '-l', '-a', 'a', file], /exactly one of/],
    [['snapshot', '-l'], /usage: fvd snapshot/],
    [['snapshot', '-l', file, file], /usage: fvd snapshot/],
    [['snapshot', '-c', 'x', '--json', file], /--json goes with -l/],
    [['snapshot', '--frobnicate', file], /frobnicate/],
    [['snapshot', '-c', '', file], /must not be empty/],
    [['snapshot', '-c', 'a\u0001b', file], /control character/],
    [['snapshot', '-c', ' a', file], /white space/],
    [['snapshot', '-c', 'n'.repeat(300), file], /300 bytes long \(at most 255\)/],
    [['snapshot', '-c', 'a', file], /a snapshot named "a" already exists/],
    [['snapshot', '-a', 'zz', file], /no snapshot named "zz"/],
    [['snapshot', '-d', 'zz', file], /no snapshot named "zz"/],
    [['snapshot', '-c', 'x', raw], /raw\.fvd: internal snapshots need the compact layout; this image is raw-like/],
    [['snapshot', '-l', raw], /need the compact layout/],
    [['snapshot', '-l', path.join(dir, 'missing.fvd')], /missing\.fvd/],
  ];
  for (const [args, re] of cases) assertOneLineError(fvd(...args), re);
  assertUnchanged(before, 'refused fvd snapshot commands');
});

test('fvd snapshot on an image another process holds (a served image): "in use", nothing changed', async () => {
  const file = await snapImage(caseDir());
  const img = await FvdImage.open(nodeIo, file);
  try {
    for (const args of [['-c', 'x'], ['-d', 'a'], ['-a', 'a']]) assertOneLineError(await fvdAsync('snapshot', ...args, file), /in use/);
    // Listing needs no lock (like info).
    const list = json<Array<{ name: string }>>(await fvdAsync('snapshot', '-l', '--json', file));
    assert.equal(list.map((s) => s.name), ['a', 'b']);
  } finally {
    await img.close();
  }
  const check = await checkImageCli(file);
  assert.is(check, 0);
});

async function checkImageCli(file: string): Promise<number | null> {
  return (await fvdAsync('check', file)).code;
}

// ---------------------------------------------------------------------------------------------
// hostile input (issue 9): refusals that destroyed files, crashes, hangs, unopenable images

test('refused create --force / convert --force leave every file as it was: own base by path, symlink, hard link or chain; a locked target', async () => {
  const dir = caseDir();
  const f = (n: string) => path.join(dir, n);
  rawBase(f('b.raw'), MiB, 11);
  fs.symlinkSync('b.raw', f('link'));
  fs.linkSync(f('b.raw'), f('hard.raw'));
  await create(f('mid.fvd'), { base: 'b.raw', baseFormat: 'raw' });
  await writeImage(f('mid.fvd'), patternBytes(64 * KiB, 12), 0);
  await create(f('top.fvd'), { base: 'mid.fvd', baseFormat: 'fvd' });
  await writeImage(f('top.fvd'), patternBytes(64 * KiB, 13), 128 * KiB);
  fs.symlinkSync('mid.fvd', f('mid-link'));
  fs.linkSync(f('top.fvd'), f('top-hard.fvd'));
  const all = ['b.raw', 'mid.fvd', 'top.fvd'].map(f);
  const before = snapshot(all);
  const cases: Array<[string[], RegExp]> = [
    [['create', '--force', '-b', 'b.raw', '-F', 'raw', f('b.raw')], /own base/],
    [['create', '--force', '-b', 'b.raw', '-F', 'raw', f('link')], /own base/],
    [['create', '--force', '-b', 'b.raw', '-F', 'raw', f('hard.raw')], /own base/],
    [['create', '--force', '-b', 'top.fvd', '-F', 'fvd', f('b.raw')], /own base/],
    [['create', '--force', '-b', 'top.fvd', '-F', 'fvd', f('mid-link')], /own base/],
    [['create', '--force', '--layout', 'compact', '-b', 'top.fvd', '-F', 'fvd', f('mid.fvd'), '2M'], /own base/],
    // a check that fails after the target was named must not remove it
    [['create', '--force', '-b', 'missing.raw', '-F', 'raw', f('b.raw')], /not found/],
    [['create', '--force', '--block-size', '3000', f('mid.fvd'), '1M'], /block size 3000/],
    [['convert', '--force', '-O', 'raw', f('top.fvd'), f('b.raw')], /base image that .*top\.fvd reads through/],
    [['convert', '--force', '-O', 'raw', f('top.fvd'), f('hard.raw')], /reads through/],
    [['convert', '--force', '-O', 'fvd', f('top.fvd'), f('mid-link')], /reads through/],
    [['convert', '--force', '-O', 'raw', f('top.fvd'), f('top-hard.fvd')], /same file/],
    [['convert', '--force', '-O', 'raw', '-f', 'raw', f('link'), f('b.raw')], /same file/],
  ];
  for (const [args, re] of cases) {
    const r = fvd(...args);
    assertOneLineError(r, re);
    assertUnchanged(before, r.cmd);
  }

  // A target another process holds (a served image, or a base it reads through): "in use", and
  // nothing was truncated before the lock was tried.
  const holder = await FvdImage.open(nodeIo, f('top.fvd'));
  try {
    const held = snapshot(all);
    fs.writeFileSync(f('src.raw'), patternBytes(64 * KiB, 14));
    for (const args of [
      ['create', '--force', f('top.fvd'), '1M'],
      ['create', '--force', '-b', 'src.raw', '-F', 'raw', f('mid.fvd')],
      ['create', '--force', '--layout', 'compact', f('b.raw'), '1M'],
      ['convert', '--force', '-O', 'raw', f('src.raw'), f('top.fvd')],
      ['convert', '--force', '-O', 'fvd', '-f', 'raw', f('src.raw'), f('mid.fvd')],
    ]) {
      const r = await fvdAsync(...args);
      assertOneLineError(r, /in use/);
      assertUnchanged(held, r.cmd);
    }
  } finally {
    await holder.close();
  }
  assert.equal(await readImage(f('top.fvd'), 128 * KiB, 64 * KiB), patternBytes(64 * KiB, 13));
  assert.equal(await readImage(f('top.fvd'), 0, 64 * KiB), patternBytes(64 * KiB, 12));
});

test('header: a u64 field above 2^53 - 1 is refused at decode, and an absent region must have offset 0 (no crash on a read-write open)', async () => {
  const dir = caseDir();
  const a = await plainImage(dir, 'a.fvd', { layout: 'compact' }); // no base: no bitmap
  rewriteField(a, 'bitmapOffset', 2 ** 53);
  await expectRefused(a, /header field bitmapOffset \(byte 72\) is 9007199254740992, above 2\^53 - 1/);
  const b = await plainImage(dir, 'b.fvd', { layout: 'compact' });
  rewriteField(b, 'bitmapOffset', 2 * PAGE);
  await expectRefused(b, /bitmap region of length 0 at offset 8192/);
  const c = await plainImage(dir, 'c.fvd'); // raw-like: no table
  rewriteField(c, 'tableOffset', 2n ** 64n - 1n);
  await expectRefused(c, /header field tableOffset .* above 2\^53 - 1/);
  const d = await plainImage(dir, 'd.fvd');
  rewriteField(d, 'tableOffset', PAGE);
  await expectRefused(d, /table region of length 0 at offset 4096/);
  const e = await plainImage(dir, 'e.fvd', { journalSize: 0 });
  rewriteField(e, 'journalOffset', 2 ** 53 - 1);
  await expectRefused(e, /journal region of length 0 at offset 9007199254740991/);
  for (const field of ['baseSize', 'snapshotsLength', 'journalStartSeq', 'dataOffset'] as const) {
    const g = await plainImage(dir, `${field}.fvd`);
    rewriteField(g, field, 2n ** 63n);
    await expectRefused(g, new RegExp(`header field ${field} .* above 2\\^53 - 1`));
  }
});

test('header: reserved bytes 172..175 must be zero, with and without snapshots', async () => {
  const a = await plainImage(caseDir(), 'a.fvd', { layout: 'compact' });
  writeBytes(a, 172, Buffer.from([0, 0, 1, 0]));
  fixHeaderCrc(a);
  await expectRefused(a, /reserved header bytes 172\.\.175 are not zero/);
  const b = await snapImage(caseDir());
  writeBytes(b, 175, Buffer.from([0x80]));
  fixHeaderCrc(b);
  await expectRefused(b, /reserved header bytes 172\.\.175 are not zero/);
});

/** Gives a compact image without data a journal of `length` bytes; the data area moves past it (the file grows sparsely). */
function setJournalLength(file: string, length: number): void {
  let dataOffset = 0;
  rewriteHeader(file, (h) => {
    h.journalLength = length;
    h.dataOffset = dataOffset = roundUp(h.journalOffset + length, h.chunkSize);
  });
  truncate(file, dataOffset);
}

test('journal: longer than 1 GiB is refused (it used to be allocated whole, and 8 GiB crashed every command)', async () => {
  const big = path.join(caseDir(), 'big.fvd');
  await create(big, { size: 4 * MiB, layout: 'compact' });
  setJournalLength(big, 8 * 1024 * MiB);
  setDirty(big);
  await expectRefused(big, /journal larger than 1073741824 bytes is not supported/);
});

test('journal: a dirty 1 GiB journal replays in pieces of at most 1 MiB, across windows and the wrap', async () => {
  const dir = caseDir();
  const gib = path.join(dir, 'gib.fvd');
  await create(gib, { size: 4 * MiB, layout: 'compact' });
  setJournalLength(gib, 1024 * MiB);
  const nsec = (1024 * MiB) / 512;
  // 5000 checksum-valid sectors from 1000 before the region's end: the log wraps, and replay
  // needs several windows. Each unmaps chunk k mod 3; the last maps chunk 3 (to storage 0).
  rewriteField(gib, 'journalStartSeq', 7 * nsec - 1000);
  const n = 5000;
  const bodies = Array.from({ length: n }, (_, k) => {
    const body = Buffer.alloc(12);
    body.writeUInt16LE(REC_TABLE_SET, 0);
    body.writeUInt16LE(1, 2);
    body.writeUInt32LE(k === n - 1 ? 3 : k % 3, 4);
    body.writeUInt32LE(k === n - 1 ? 0 : 0xffffffff, 8);
    return body;
  });
  injectJournal(gib, bodies);
  let largest = 0;
  const io: IoBackend = {
    async open(p, o) {
      const file = await nodeIo.open(p, o);
      const read = file.read.bind(file);
      file.read = (buf, off) => ((largest = Math.max(largest, buf.length)), read(buf, off));
      return file;
    },
  };
  const ro = await FvdImage.open(io, gib, { readOnly: true });
  const st = ro.stats();
  await ro.close();
  assert.is(st.journalSectorsReplayed, n, 'every sector replayed, across windows and the wrap');
  assert.is(st.allocatedChunks, 1);
  assert.ok(largest <= MiB, `largest read ${largest} bytes; the journal must be read in pieces`);
  const rw = await FvdImage.open(io, gib);
  await rw.close();
  assert.ok(largest <= MiB, `largest read ${largest} bytes`);
  const after = json<{ dirty: boolean; allocatedChunks: number }>(fvd('info', '--json', gib));
  assert.is(after.dirty, false);
  assert.is(after.allocatedChunks, 1);
  assertOk(fvd('check', gib));
});

test('journal sequence number: above 2^52 is refused (a write could not advance it); at the limit, writes leave a clean, openable image', async () => {
  const dir = caseDir();
  const a = path.join(dir, 'a.fvd');
  await create(a, { size: 4 * MiB, layout: 'compact' });
  rewriteField(a, 'journalStartSeq', 2 ** 53 - 1);
  await expectRefused(a, /invalid journal sequence number 9007199254740991/);

  for (const start of [2 ** 52 - 2, 2 ** 52]) {
    const f = path.join(dir, `s${start}.fvd`);
    await create(f, { size: 4 * MiB, layout: 'compact' });
    rewriteField(f, 'journalStartSeq', start);
    assertOk(fvd('check', f));
    const writes = [0, 1, 2, 3].flatMap((i) => ['-c', `write -P ${0x40 + i} ${i * 1024}k 64k`, '-c', 'flush']);
    assertOk(fvd('io', ...writes, f));
    assert.ok(getField(f, 'journalStartSeq') <= 2n ** 52n, `journal_start_seq ${getField(f, 'journalStartSeq')}`);
    assertOk(fvd('check', f));
    assertOk(fvd('io', '-r', ...[0, 1, 2, 3].flatMap((i) => ['-c', `read -P ${0x40 + i} ${i * 1024}k 64k`]), f));
    // a crash right after the writes: the journal replays and checkpoints within the range
    const img = await FvdImage.open(nodeIo, f);
    await img.write(Buffer.alloc(4 * KiB, 0x55), 3 * MiB);
    await img.flush();
    await img.abandon();
    assertOk(fvd('io', '-c', 'read -P 0x55 3M 4k', f));
    assertOk(fvd('check', f));
    assert.ok(getField(f, 'journalStartSeq') <= 2n ** 52n);
  }
});

test('FIFOs are refused with one line, never waited on: as the image, as its base, as a create or rebase base, as a convert output', async () => {
  const dir = caseDir();
  const f = (n: string) => path.join(dir, n);
  const mkfifo = (p: string) => assert.is(spawnSync('mkfifo', [p]).status, 0, `mkfifo ${p}`);
  mkfifo(f('fifo.fvd'));
  rawBase(f('base.raw'), MiB);
  await create(f('img.fvd'), { base: 'base.raw', baseFormat: 'raw' });
  rawBase(f('gone.raw'), MiB);
  await create(f('gone.fvd'), { base: 'gone.raw', baseFormat: 'raw' });
  fs.rmSync(f('gone.raw'));
  mkfifo(f('gone.raw'));
  mkfifo(f('out.raw'));
  const files = ['base.raw', 'img.fvd', 'gone.fvd'].map(f);
  const before = snapshot(files);
  const within = (...args: string[]) => fvdWithin(60_000, ...args);
  const refused: string[][] = [
    ...[f('fifo.fvd'), f('gone.fvd')].flatMap((img) => [
      ['info', img],
      ['info', '--json', img],
      ['map', img],
      ['io', '-c', 'read 0 4k', img],
      ['io', '-f', 'fvd', '-c', 'read 0 4k', img],
      ['io', '-c', 'write 0 4k', img],
      ['convert', img, f(`o-${path.basename(img)}.raw`)],
      ['snapshot', '-l', img],
      ['prefetch', img],
    ]),
    ['io', '-f', 'raw', '-r', '-c', 'read 0 4k', f('fifo.fvd')],
    ['create', '-b', 'gone.raw', '-F', 'raw', f('new.fvd'), '1M'],
    ['rebase', '-b', 'gone.raw', '-F', 'raw', f('img.fvd')],
    ['convert', '--force', '-O', 'raw', f('img.fvd'), f('out.raw')],
    ['convert', '--force', '-O', 'fvd', f('img.fvd'), f('out.raw')],
  ];
  // In parallel, so that hangs cost one timeout; two writers of gone.fvd would meet at its lock,
  // so the writers run one after the other.
  const isWriter = (a: string[]) => a[0] === 'prefetch' || (a[0] === 'io' && !a.includes('-r'));
  const sequentially = async (list: string[][]) => {
    const out = [];
    for (const args of list) out.push(await within(...args));
    return out;
  };
  const [readers, writers, checks] = await Promise.all([
    Promise.all(refused.filter((a) => !isWriter(a)).map((args) => within(...args))),
    sequentially(refused.filter(isWriter)),
    Promise.all([within('check', f('fifo.fvd')), within('check', f('gone.fvd'))]),
  ]);
  for (const r of [...readers, ...writers]) assertOneLineError(r, /not a regular file or block device/);
  for (const r of checks) {
    assertNoCrash(r);
    assert.is(r.code, 2, `${r.cmd}: ${r.stdout}${r.stderr}`);
    assert.match(r.stdout, /not a regular file or block device/);
  }
  assert.not.ok(fs.existsSync(f('new.fvd')), 'a refused create leaves no file');
  assertUnchanged(before, 'commands refused on FIFOs');
});

test('a refused request leaves a dirty image byte-identical (checked before the read-write open): io, bench, snapshot', async () => {
  const dir = caseDir();
  const file = path.join(dir, 's.fvd');
  await create(file, { size: 2 * MiB, layout: 'compact', chunkSize: 64 * KiB, blockSize: 4 * KiB });
  await writeImage(file, patternBytes(128 * KiB, 21), 0);
  const img = await FvdImage.open(nodeIo, file);
  await img.snapshots.create('a');
  await img.close();
  // Dirty, with a record a replay applies (and a read-write open would write back in place).
  injectRecords(file, (p) => p.addTable(1, 0xffffffff));
  const before = snapshot([file]);
  const cases: Array<[string[], RegExp]> = [
    [['io', '-c', 'read 3M 4k', file], /outside the disk/],
    [['io', '-c', 'write -P 1 0 4k', '-c', 'read 2M 512', file], /outside the disk/],
    [['io', '-c', 'zero 1M 2M', file], /outside the disk/],
    [['bench', '-w', '-c', '4', '-s', '4k', '-o', '4M', file], /past the end/],
    [['bench', '-w', '-c', '1000', '-s', '48k', file], /crosses the end/],
    [['snapshot', '-d', 'nosuch', file], /no snapshot named "nosuch"/],
    [['snapshot', '-a', 'nosuch', file], /no snapshot named "nosuch"/],
    [['snapshot', '-c', 'a', file], /already exists/],
  ];
  for (const [args, re] of cases) {
    const r = fvd(...args);
    assertOneLineError(r, re);
    assertUnchanged(before, r.cmd);
  }
  // still dirty, and the replay is what it was
  const r = fvd('info', '--json', file);
  assert.is(json<{ dirty: boolean }>(r).dirty, true);
  assertOk(fvd('io', '-c', 'read -P 0 64k 64k', file));
});

test('control characters in paths and header strings: every message is one line, escaped', async () => {
  const dir = caseDir();
  const weird = path.join(dir, 'a\nb.fvd');
  for (const args of [['info', weird], ['map', weird], ['io', '-c', 'read 0 512', weird], ['convert', weird, path.join(dir, 'o.raw')], ['snapshot', '-l', weird], ['commit', weird]]) {
    assertOneLineError(fvd(...args), /a\\nb\.fvd/);
  }
  const x = path.join(dir, 'x.fvd');
  assertOneLineError(fvd('create', '-b', 'no\nsuch\x1b[2J', '-F', 'raw', x, '1M'), /base image 'no\\nsuch\\x1b\[2J' not found/);
  assert.not.ok(fs.existsSync(x));
  assertOneLineError(fvd('create', '--layout', 'compact\r', x, '1M'), /invalid layout 'compact\\r'/);
  assertOneLineError(fvd('bogus\ncommand'), /unknown command 'bogus\\ncommand'/);

  // check's report on a corrupt image whose name holds control characters: one line per finding
  const odd = path.join(dir, 'c\rd\te.fvd');
  await create(odd, { size: MiB });
  flipByte(odd, 41, 0x10);
  const chk = fvd('check', odd);
  assert.is(chk.code, 2);
  const lines = chk.stdout.split('\n').filter(Boolean);
  assert.is(lines.length, 2, chk.stdout);
  for (const l of lines) assert.match(l, /c\\rd\\te\.fvd/);

  // a hostile base path in a header: the engine's own message is one line
  rawBase(path.join(dir, 'base.raw'), MiB);
  const img = path.join(dir, 'img.fvd');
  await create(img, { base: 'base.raw', baseFormat: 'raw' });
  setBasePath(img, 'no\nsuch\u0085.raw');
  await expectRefused(img, /base image 'no\\nsuch\\x85\.raw' not found/, { names: ['no\\nsuch\\x85.raw'] });
});

test('concurrent writers: the size is read after the lock is taken (a writer that grows the file and lets go in between)', async () => {
  const c = libc();
  if (!c) {
    console.log('  skip: needs koffi (libc flock)');
    return;
  }
  const file = path.join(caseDir(), 'f.img');
  fs.writeFileSync(file, Buffer.alloc(64 * KiB, 1));
  const holder = fs.openSync(file, 'r+');
  assert.is(c.flock(holder, LOCK_EX | LOCK_NB), 0);
  const realFlock = c.flock;
  let released = false;
  // The other writer finishes exactly while this open is on its way to the lock: it grows the
  // file, then closes it (releasing its lock) just before this open's flock runs.
  c.flock = (fd, op) => {
    if (fd !== holder && !released) {
      fs.writeSync(holder, Buffer.alloc(MiB, 2), 0, MiB, 64 * KiB);
      fs.closeSync(holder);
      released = true;
    }
    return realFlock(fd, op);
  };
  try {
    const opened = await NodeFile.open(file, { lock: 'exclusive' });
    assert.ok(released, 'the lock was taken after the other writer let go');
    assert.is(opened.size(), 64 * KiB + MiB, 'size read before the lock was taken');
    await opened.close();
  } finally {
    c.flock = realFlock;
    if (!released) fs.closeSync(holder);
  }
});

test('concurrent writers: two fvd io writers started together on a fresh compact image: each writes or says "in use"; the image stays clean', async () => {
  const dir = caseDir();
  for (let round = 0; round < 12; round++) {
    const file = path.join(dir, `r${round}.fvd`);
    await create(file, { size: 8 * MiB, layout: 'compact' });
    const writers = [
      ['io', '-c', 'write -P 0x11 0 64k', '-c', 'flush', file],
      ['io', '-c', 'write -P 0x22 3M 64k', '-c', 'flush', file],
    ];
    const rs = await Promise.all(writers.map((a) => fvdAsync(...a)));
    rs.forEach((r) => (r.code === 0 ? assertOk(r) : assertOneLineError(r, /in use/)));
    assert.ok(rs.some((r) => r.code === 0), 'one of them got the lock');
    const chk = fvd('check', file);
    assert.is(chk.code, 0, `round ${round}: ${chk.stdout}${chk.stderr}`);
    if (rs[0]!.code === 0) assertOk(fvd('io', '-r', '-c', 'read -P 0x11 0 64k', file));
    if (rs[1]!.code === 0) assertOk(fvd('io', '-r', '-c', 'read -P 0x22 3M 64k', file));
  }
});

test.after(() => tmp.cleanup());

test.run();
