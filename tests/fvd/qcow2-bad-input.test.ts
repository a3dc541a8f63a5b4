/**
 * qcow2 bases that fvd must refuse: each image is made by qemu-img, damaged precisely (or made
 * with a feature fvd does not read), then opened and read whole through fvd. Each must fail with
 * one line naming the file and the problem — never data, never a hang — and leave the file
 * byte-identical.
 */
import * as assert from 'uvu/assert';
import { test } from 'uvu';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import zlib from 'node:zlib';
import { Qcow2Image } from '../../fvd/qcow2.js';
import { nodeIo } from '../../storage/node-file.js';
import { FvdError } from '../../fvd/errors.js';
import { registerZstdFallback } from '../../daemon/zstd-fallback.js';
import { rejectsOneLine } from '../helpers/rejects.js';
import { diskPattern, qemuImg, qemuIo, qemuRead, qemuTest, writeFile } from '../helpers/qemu.js';
import { fvd, assertOk, assertOneLineError } from '../helpers/cli.js';
import { extensionAt, l1EntryAt, l2EntryAt, layout, read, readU64, sha256, write, writeU32, writeU64 } from '../helpers/qcow2-tamper.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-qcow2-bad-'));
let n = 0;
const name = (ext = 'qcow2') => path.join(dir, `b${n++}.${ext}`);
registerZstdFallback();

async function openAndReadAll(file: string): Promise<void> {
  const img = await Qcow2Image.open(nodeIo, path.resolve(file));
  try {
    const buf = Buffer.alloc(img.size);
    await img.read(buf, 0);
  } finally {
    await img.close();
  }
}

/** Opening and reading `file` whole fails with one line matching `re`; the file is unchanged. */
async function refused(file: string, re: RegExp, what: string, named = path.basename(file)): Promise<void> {
  const before = sha256(file);
  const err = await rejectsOneLine(openAndReadAll(file), FvdError, re, what);
  assert.ok(err.message.includes(named), `${what}: the message names the file: ${err.message}`);
  assert.is(sha256(file), before, `${what}: the image is byte-identical afterwards`);
}

/** A small image with allocated, compressed-free data in its first clusters. */
function plain(opts: string[] = [], size = '4M'): string {
  const q = name();
  qemuImg('create', '-f', 'qcow2', ...opts, q, size);
  qemuIo(q, 'write -P 0x11 0 192k', 'write -P 0x22 1M 64k');
  return q;
}

/** A compressed image whose first cluster (up to 64 KiB) is compressed: text, not zeros. */
function compressed(opts = ''): string {
  const data = diskPattern(2 * MiB, n);
  data.write('compressible text in the first cluster. '.repeat(1700), 0, 64 * KiB, 'latin1');
  const raw = writeFile(dir, `src${n++}.raw`, data);
  const q = name();
  qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', ...(opts ? ['-o', opts] : []), raw, q);
  assert.is(readU64(q, l2EntryAt(q, 0)) >> 62n, 1n, 'guest cluster 0 is stored compressed');
  return q;
}

// ---------------------------------------------------------------------------------------------
// The header and its features

qemuTest('not qcow2, too short, unknown version, bad cluster_bits, bad header_length', async () => {
  const junk = writeFile(dir, 'junk.qcow2', Buffer.alloc(4096, 0x41));
  await refused(junk, /corrupt qcow2 image: bad magic/, 'bad magic');
  const tiny = name();
  fs.writeFileSync(tiny, read(plain(), 0, 50));
  await refused(tiny, /too short for a qcow2 header/, 'truncated to 50 bytes');
  let q = plain();
  writeU32(q, 4, 4);
  await refused(q, /qcow2 version 4 is not supported/, 'version 4');
  q = plain();
  writeU32(q, 20, 22);
  await refused(q, /cluster_bits 22 outside 9\.\.21/, 'cluster_bits 22');
  q = plain();
  writeU32(q, 100, 100);
  await refused(q, /header_length 100 invalid/, 'header_length not a multiple of 8');
});

qemuTest('unknown incompatible feature bits are refused, named from the feature name table', async () => {
  let q = plain();
  writeU64(q, 72, readU64(q, 72) | (1n << 5n));
  await refused(q, /incompatible features fvd does not know: bit 5/, 'bit 5');
  // QEMU writes a feature name table; rename bit 0's entry ("dirty bit") to bit 9 and set bit 9.
  q = plain();
  const table = extensionAt(q, 0x6803f857);
  assert.ok(table, 'qemu-img writes a feature name table');
  let entry = -1;
  for (let e = table!.at; e < table!.at + table!.length; e += 48) if (read(q, e, 2).equals(Buffer.from([0, 0]))) entry = e;
  assert.ok(entry > 0);
  write(q, entry + 1, Buffer.from([9]));
  writeU64(q, 72, readU64(q, 72) | (1n << 9n));
  await refused(q, /does not know: 'dirty bit' \(bit 9\)/, 'named bit 9');
});

qemuTest('the corrupt bit, and a dirty image with lazy refcounts (qemu-io aborted after a write)', async () => {
  let q = plain();
  writeU64(q, 72, readU64(q, 72) | 2n);
  await refused(q, /marked corrupt: repair it with 'qemu-img check -r all'/, 'corrupt bit');
  q = name();
  qemuImg('create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', q, '1M');
  try {
    qemuIo(q, 'write -P 0x33 0 64k', 'abort');
  } catch {
    // qemu-io ends in abort(): that is the point (the image stays dirty)
  }
  assert.is(readU64(q, 72) & 1n, 1n, 'qemu-io left the dirty bit set');
  await refused(q, /marked dirty \(lazy refcounts.*qemu-img check -r all/, 'dirty');
});

qemuTest('encrypted qcow2: LUKS (qemu-img create -o encrypt.format=luks) and AES are refused', async () => {
  const q = name();
  qemuImg('create', '-f', 'qcow2', '--object', 'secret,id=sec0,data=123456', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0', q, '1M');
  await refused(q, /qcow2 image is encrypted \(LUKS\): encrypted qcow2 templates are not supported/, 'LUKS');
  const a = name();
  qemuImg('create', '-f', 'qcow2', '--object', 'secret,id=sec0,data=123456', '-o', 'encryption=on,encrypt.key-secret=sec0', a, '1M');
  await refused(a, /encrypted \(AES\)/, 'AES');
});

qemuTest('compression type: an unknown one is refused; the bit and the field must agree', async () => {
  let q = compressed('compression_type=zstd');
  write(q, 104, Buffer.from([2]));
  await refused(q, /compression type 2 is not supported/, 'type 2');
  q = compressed('compression_type=zstd');
  write(q, 104, Buffer.from([0]));
  await refused(q, /compression type bit set but compression_type is 0/, 'bit without field');
});

qemuTest('L1 table: absurd size, too small for the disk, past the end of the file, misaligned', async () => {
  let q = plain();
  writeU32(q, 36, 0x01000000);
  await refused(q, /L1 table of 16777216 entries is larger than 33554432 bytes/, 'absurd l1_size');
  q = plain([], '8G');
  writeU32(q, 36, 1);
  await refused(q, /L1 table of 1 entries is too small for a 8589934592-byte disk/, 'l1_size too small');
  q = plain();
  writeU64(q, 40, BigInt(fs.statSync(q).size + 65536));
  await refused(q, /L1 table at .* past the end of the file/, 'L1 past EOF');
  q = plain();
  writeU64(q, 40, readU64(q, 40) + 512n);
  await refused(q, /L1 table offset \d+ is not cluster-aligned/, 'L1 misaligned');
});

qemuTest('L1 entries: L2 table misaligned, on the L1 table, past the end, reserved bits', async () => {
  const cases: [(v: bigint, q: string) => bigint, RegExp, string][] = [
    [(v) => v + 512n, /L1 entry 0: L2 table offset \d+ is not cluster-aligned/, 'misaligned'],
    [(_v, q) => BigInt(layout(q).l1Offset), /overlaps the L1 table/, 'on the L1 table'],
    [(_v, q) => BigInt(Math.ceil(fs.statSync(q).size / 65536) * 65536 + 65536), /L2 table at \d+ lies past the end of the file/, 'past EOF'],
    [(v) => v | (1n << 60n), /L1 entry 0: reserved bits set/, 'reserved bit 60'],
  ];
  for (const [change, re, what] of cases) {
    const q = plain();
    const at = l1EntryAt(q, 0);
    writeU64(q, at, change(readU64(q, at), q));
    await refused(q, re, `L1 ${what}`);
  }
});

qemuTest('L2 entries: data past the end, misaligned, reserved bits, zero flag in a version 2 image', async () => {
  const cases: [(v: bigint, q: string) => bigint, RegExp, string, string[]][] = [
    [(v, q) => (v & ~0x00fffffffffffe00n) | BigInt(Math.ceil(fs.statSync(q).size / 65536 + 4) * 65536), /data offset \d+ is past the end of the file/, 'past EOF', []],
    [(v) => v + 4096n, /data offset \d+ is not cluster-aligned/, 'misaligned', []],
    [(v) => v | (1n << 57n), /reserved bits set in its L2 entry/, 'reserved bit 57', []],
    [(v) => v | 2n, /reserved bits set in its L2 entry/, 'reserved bit 1', []],
    [(v) => v | 1n, /zero flag in a version 2 image/, 'zero flag in v2', ['-o', 'compat=0.10']],
  ];
  for (const [change, re, what, opts] of cases) {
    const q = plain(opts);
    const at = l2EntryAt(q, 64 * KiB);
    writeU64(q, at, change(readU64(q, at), q));
    await refused(q, re, `L2 ${what}`);
  }
  // Offset 0 with the "refcount one" bit and no data file: QEMU reads the cluster as unallocated
  // (zeros here), not as the header; so does fvd.
  const q = plain();
  writeU64(q, l2EntryAt(q, 0), 1n << 63n);
  const img = await Qcow2Image.open(nodeIo, q);
  const b = Buffer.alloc(64 * KiB);
  await img.read(b, 0);
  await img.close();
  assert.ok(b.every((x) => x === 0));
  assert.ok(qemuRead(q).subarray(0, 64 * KiB).every((x) => x === 0), 'QEMU reads the same entry as zeros');
});

qemuTest('extended L2: a subcluster both allocated and zero; allocated subclusters in an unallocated cluster', async () => {
  let q = plain(['-o', 'extended_l2=on']);
  let at = l2EntryAt(q, 64 * KiB);
  writeU32(q, at + 8, 1); // zero bit of subcluster 0, whose allocation bit is set
  await refused(q, /subclusters marked both allocated and zero/, 'alloc and zero');
  q = plain(['-o', 'extended_l2=on']);
  at = l2EntryAt(q, 2 * MiB); // unallocated cluster in an existing L2 table
  writeU32(q, at + 12, 1);
  await refused(q, /allocated subclusters in an unallocated cluster/, 'alloc bit without offset');
});

qemuTest('compressed clusters: descriptor past the end, in the header, garbage data, wrong size, zstd garbage', async () => {
  // Past the end of the file.
  let q = compressed();
  let l = layout(q);
  let at = l2EntryAt(q, 0);
  const shift = BigInt(62 - (l.clusterBits - 8));
  let v = readU64(q, at);
  writeU64(q, at, (v & ~((1n << shift) - 1n)) | BigInt(fs.statSync(q).size + 10_000));
  await refused(q, /compressed data at \d+ is past the end of the file/, 'past EOF');
  q = compressed();
  at = l2EntryAt(q, 0);
  v = readU64(q, at);
  writeU64(q, at, (v & ~((1n << shift) - 1n)) | 100n);
  await refused(q, /compressed data at 100 is inside the header cluster/, 'in the header');
  // Garbage where the stream is.
  q = compressed();
  at = l2EntryAt(q, 0);
  v = readU64(q, at);
  const host = Number(v & ((1n << shift) - 1n));
  write(q, host, Buffer.alloc(64, 0xff));
  await refused(q, /compressed cluster of guest cluster 0 .* does not decompress \(zlib: /, 'garbage');
  // A valid deflate stream of the wrong size: 1000 bytes instead of a cluster.
  q = compressed();
  at = l2EntryAt(q, 0);
  const stream = zlib.deflateRawSync(Buffer.alloc(1000, 7));
  write(q, Number(readU64(q, at) & ((1n << shift) - 1n)), stream);
  await refused(q, /decompresses to 1000 bytes, not 65536|does not decompress/, 'short stream');
  // A stream that produces more than one cluster.
  q = compressed('cluster_size=4096');
  l = layout(q);
  at = l2EntryAt(q, 0);
  const sh = BigInt(62 - (l.clusterBits - 8));
  const big = zlib.deflateRawSync(Buffer.alloc(70_000, 9));
  write(q, Number(readU64(q, at) & ((1n << sh) - 1n)), big);
  await refused(q, /does not decompress \(zlib: more than one cluster of output\)|decompresses to/, 'long stream');
  // zstd: garbage frame.
  q = compressed('compression_type=zstd');
  at = l2EntryAt(q, 0);
  write(q, Number(readU64(q, at) & ((1n << shift) - 1n)), Buffer.alloc(64, 0xee));
  await refused(q, /does not decompress \(zstd: bad zstd frame magic/, 'zstd garbage');
});

qemuTest('truncated files: the L1 table, L2 tables or data gone are errors, never zeros for lost metadata', async () => {
  const src = compressed();
  const size = fs.statSync(src).size;
  const l = layout(src);
  // Just after the L1 table / in the middle / shortly before the end.
  const cuts = [l.l1Offset + 8, Math.floor(size / 2), size - 20_000];
  for (const cut of cuts) {
    const q = name();
    fs.copyFileSync(src, q);
    fs.truncateSync(q, cut);
    await refused(q, /corrupt qcow2 image: .*(past the end of the file|does not decompress|decompresses to)/, `truncated at ${cut} of ${size}`);
  }
});

// ---------------------------------------------------------------------------------------------
// Backing files

qemuTest('backing files: format not recorded, a format fvd does not read, missing, json:, a network protocol', async () => {
  const base = writeFile(dir, 'bk.raw', diskPattern(MiB, 3));
  let q = name();
  qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'raw', q, '1M');
  const ext = extensionAt(q, 0xe2792aca)!;
  writeU32(q, ext.at - 8, 0x12345678); // the extension becomes an unknown one: no format recorded
  await refused(q, /names backing file '.*bk\.raw' without its format \(QEMU would probe it; fvd does not\): record it with 'qemu-img rebase -u/, 'no format');
  q = name();
  qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'raw', q, '1M');
  write(q, extensionAt(q, 0xe2792aca)!.at, Buffer.from('qed'));
  writeU32(q, extensionAt(q, 0xe2792aca)!.at - 4, 3);
  await refused(q, /backing file '.*' has format 'qed', which fvd does not read \(raw or qcow2\)/, 'format qed');
  q = name();
  const gone = writeFile(dir, 'gone.raw', Buffer.alloc(512));
  qemuImg('create', '-f', 'qcow2', '-b', gone, '-F', 'raw', q, '1M');
  fs.rmSync(gone);
  await refused(q, /backing file '.*gone\.raw' not found \(looked for /, 'missing');
  for (const bad of ['json:{"x":1}', 'nbd://127.0.0.1/x']) {
    q = name();
    qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'raw', q, '1M');
    const off = Number(readU64(q, 8));
    write(q, off, Buffer.from(bad));
    writeU32(q, 16, Buffer.byteLength(bad));
    await refused(q, /is not a local file \(QEMU protocol or options\)/, bad);
  }
});

qemuTest('backing chains: a loop is refused, and so is one longer than 64 images', async () => {
  const a = name();
  const b = name();
  qemuImg('create', '-f', 'qcow2', a, '1M');
  qemuImg('create', '-f', 'qcow2', '-b', a, '-F', 'qcow2', b, '1M');
  qemuImg('rebase', '-u', '-f', 'qcow2', '-b', b, '-F', 'qcow2', a); // a → b → a
  await refused(a, /base chain loop: '.*' is its own backing file/, 'loop');
  // 70 levels: c00 → c01 → … → c69 (same-length names, patched into copies of one image).
  const d = path.join(dir, 'deep');
  fs.mkdirSync(d);
  const tmpl = path.join(d, 'tmpl.qcow2');
  fs.writeFileSync(path.join(d, 'c70.qcow2'), '');
  qemuImg('create', '-f', 'qcow2', path.join(d, 'c70.qcow2'), '1M');
  qemuImg('create', '-f', 'qcow2', '-u', '-b', 'c00.qcow2', '-F', 'qcow2', tmpl, '1M');
  const off = Number(readU64(tmpl, 8));
  for (let i = 0; i < 70; i++) {
    const f = path.join(d, `c${String(i).padStart(2, '0')}.qcow2`);
    fs.copyFileSync(tmpl, f);
    write(f, off, Buffer.from(`c${String(i + 1).padStart(2, '0')}.qcow2`));
  }
  await refused(path.join(d, 'c00.qcow2'), /base chain longer than 64 images/, 'depth', 'c64.qcow2');
});

// ---------------------------------------------------------------------------------------------
// fvd check -f qcow2: the same reader's checks, asked for before a template is used

qemuTest('check -f qcow2: a sound template exits 0 with qemu-img check\'s cluster counts; damage exits 2 naming it; refusals exit 1; never written', () => {
  // Sound: a compressed template under a qcow2 overlay with its own clusters.
  const base = compressed('compression_type=zstd');
  const top = name();
  qemuImg('create', '-f', 'qcow2', '-b', path.basename(base), '-F', 'qcow2', top);
  qemuIo(top, 'write -P 0x33 256k 128k', 'write -z 1M 64k');
  for (const q of [base, top]) {
    const before = sha256(q);
    const r = fvd('check', '-f', 'qcow2', '--json', q);
    assertOk(r);
    const ours = JSON.parse(r.stdout) as Record<string, number> & { errors: string[]; bytesInBacking: number };
    const theirs = JSON.parse(qemuImg('check', '--output=json', q)) as Record<string, number>;
    for (const k of ['total-clusters', 'allocated-clusters']) assert.is(ours[k], theirs[k], `${path.basename(q)}: ${k}`);
    assert.equal(ours.errors, []);
    assert.is(ours.bytesInBacking > 0, q === top, 'the overlay reads the ranges its backing file provides');
    assert.match(fvd('check', '-f', 'qcow2', q).stdout, /^No errors were found on the image\.\n\d+\/32 = /);
    assert.is(sha256(q), before, 'check writes nothing');
  }

  // Damage: garbage in a compressed stream, found in the BACKING file through the overlay; an L2
  // entry pointing past the end of the file; an L1 entry misaligned.
  const host = Number(readU64(base, l2EntryAt(base, 0)) & ((1n << BigInt(62 - (layout(base).clusterBits - 8))) - 1n));
  write(base, host, Buffer.alloc(64, 0xff));
  const l2 = plain();
  writeU64(l2, l2EntryAt(l2, 64 * KiB), readU64(l2, l2EntryAt(l2, 64 * KiB)) + 4096n);
  const l1 = plain();
  writeU64(l1, l1EntryAt(l1, 0), readU64(l1, l1EntryAt(l1, 0)) + 512n);
  const damaged: [string, RegExp][] = [
    [top, new RegExp(`${path.basename(base)}: corrupt qcow2 image: compressed cluster of guest cluster 0 .* does not decompress \\(zstd: `)],
    [l2, /corrupt qcow2 image: .*data offset \d+ is not cluster-aligned/],
    [l1, /corrupt qcow2 image: L1 entry 0: L2 table offset \d+ is not cluster-aligned/],
  ];
  for (const [q, re] of damaged) {
    const before = sha256(q);
    const r = fvd('check', '-f', 'qcow2', q);
    assert.is(r.code, 2, `${path.basename(q)}: exit 2 (corrupt): ${r.stdout}${r.stderr}`);
    assert.match(r.stdout, re);
    assert.match(r.stdout, /^ERROR: [^\n]+\n[^\n]+: the qcow2 image is corrupt\n$/);
    const j = JSON.parse(fvd('check', '-f', 'qcow2', '--output=json', q).stdout) as { corruptions: number; exitCode: number };
    assert.equal([j.corruptions, j.exitCode], [1, 2]);
    assert.is(sha256(q), before, 'check writes nothing');
  }

  // Not damage but a refusal (exit 1, one line): an encrypted template; and bad arguments.
  const enc = name();
  qemuImg('create', '-f', 'qcow2', '--object', 'secret,id=s,data=123456', '-o', 'encrypt.format=luks,encrypt.key-secret=s', enc, '1M');
  assertOneLineError(fvd('check', '-f', 'qcow2', enc), /encrypt/i, 1);
  assertOneLineError(fvd('check', '-f', 'qcow2', '--repair', l2), /fvd never writes qcow2 images: --repair is for FVD images/, 1);
  assertOneLineError(fvd('check', '-f', 'raw', l2), /a raw file has no metadata to check/, 1);
  assertOneLineError(fvd('check', l2), /not an FVD image \(bad magic; it is a qcow2 image\)/);
});

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
test.run();
