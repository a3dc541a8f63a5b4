/**
 * The `fvd` command line: create, info, check, map, convert, io, help and argument errors.
 * Every test checks content (what is in the image, what the JSON says), not only exit codes.
 */
import type { MapEntry } from '../../daemon/space.js';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import {
  TempDir,
  assertNoCrash,
  assertOk,
  assertOneLineError,
  assertUnchanged,
  fvd,
  json,
  patternBytes,
  sha256File,
  snapshot,
  type CliResult,
} from '../helpers/cli.js';
import { readHeader, setTableEntry } from '../helpers/tamper.js';
import { readWholeDisk } from '../helpers/model.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-cli-');
const caseDir = () => tmp.caseDir();

interface Info {
  image: string;
  format: string;
  layout: 'raw' | 'compact';
  virtualSize: number;
  diskSize: number;
  blockSize: number;
  chunkSize: number;
  baseChain: Array<{ path: string; format: string; size: number }>;
  bytesLocal: number;
  bytesInBase: number;
  fullyLocal: boolean;
  zeroDetected: boolean;
  dirty: boolean;
  journal: { capacitySectors: number; usedSectors: number; sectorsToReplay: number };
  allocatedChunks?: number;
}
interface Extent {
  offset: number;
  length: number;
  kind: 'local' | 'base' | 'zero';
}

const info = (file: string) => json<Info>(fvd('info', '--json', file));
/**
 * `fvd map --json` prints qemu-img map's entries; these tests read them as kinds: in a base
 * (depth > 0), data stored in the image ("local"), or zeros the image provides without storing
 * anything ("zero": never written, discarded, unmapped), merged.
 */
type QemuMapEntry = MapEntry;
function kinds(entries: QemuMapEntry[]): Extent[] {
  const out: Extent[] = [];
  for (const e of entries) {
    const kind: Extent['kind'] = e.depth > 0 ? 'base' : e.data ? 'local' : 'zero';
    const last = out[out.length - 1];
    if (last && last.kind === kind && last.offset + last.length === e.start) last.length += e.length;
    else out.push({ offset: e.start, length: e.length, kind });
  }
  return out;
}
const map = (file: string) => kinds(json<QemuMapEntry[]>(fvd('map', '--json', file)));

function rawFile(file: string, data: Buffer): Buffer {
  fs.writeFileSync(file, data);
  return data;
}

/** Byte-wise comparison with the first differing offset in the message. */
function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  assert.is(actual.length, expected.length, `${what}: length`);
  if (actual.equals(expected)) return;
  let i = 0;
  while (actual[i] === expected[i]) i++;
  assert.unreachable(`${what}: first difference at byte ${i} (0x${i.toString(16)}): got ${actual[i]}, expected ${expected[i]}`);
}

/** Extents tile [0, size) exactly: start at 0, contiguous, non-empty, merged, known kinds. */
function assertTiles(extents: Extent[], size: number): void {
  let pos = 0;
  extents.forEach((e, i) => {
    assert.is(e.offset, pos, `extent ${i} starts at ${e.offset}, expected ${pos}: ${JSON.stringify(extents)}`);
    assert.ok(e.length > 0, `extent ${i} is empty`);
    assert.ok(['local', 'base', 'zero'].includes(e.kind), `extent ${i} kind ${e.kind}`);
    if (i > 0) assert.is.not(extents[i - 1]!.kind, e.kind, `extents ${i - 1} and ${i} should be merged: ${JSON.stringify(extents)}`);
    pos += e.length;
  });
  assert.is(pos, size, `extents cover ${pos} bytes of ${size}`);
}

const ext = (offset: number, length: number, kind: Extent['kind']): Extent => ({ offset, length, kind });

// ---------------------------------------------------------------------------------------------
// help, unknown commands and options, missing arguments

test('--help / -h / help: exit 0, lists every command', () => {
  for (const h of ['--help', '-h', 'help']) {
    const r = fvd(h);
    assertOk(r);
    assert.match(r.stdout, /^usage: fvd COMMAND/);
    for (const c of ['create', 'info', 'check', 'map', 'convert', 'io', 'snapshot']) assert.match(r.stdout, new RegExp(`^  ${c} `, 'm'), `${h}: ${c}`);
  }
  const none = fvd();
  assertNoCrash(none);
  assert.is(none.code, 1, 'no command is a usage error');
  assert.match(none.stdout + none.stderr, /usage: fvd COMMAND/);
});

test('unknown command: one line, exit 1', () => {
  for (const c of ['frobnicate', 'INFO', 'constructor', '__proto__', 'toString']) {
    const line = assertOneLineError(fvd(c, 'x'), /unknown command/, 1);
    assert.ok(line.includes(`'${c}'`), line);
  }
});

test('unknown options: one line naming the option, exit non-zero, nothing created', () => {
  const dir = caseDir();
  const img = path.join(dir, 'img.fvd');
  const cases: string[][] = [
    ['create', '--bogus', img, '1M'],
    ['create', '-z', img, '1M'],
    ['info', '--bogus', img],
    ['check', '--fix', img],
    ['map', '--bogus', img],
    ['convert', '--bogus', img, path.join(dir, 'out.raw')],
    ['io', '--bogus', '-c', 'read 0 4k', img],
  ];
  for (const args of cases) {
    const line = assertOneLineError(fvd(...args), /unknown option/i);
    assert.ok(line.includes(args[1]!), `names the option: ${line}`);
    assert.ok(line.startsWith(`fvd ${args[0]}:`), `prefixed with the command: ${line}`);
  }
  assert.equal(fs.readdirSync(dir), [], 'no file was created');
});

test('missing arguments and option values: one line each', () => {
  const dir = caseDir();
  const img = path.join(dir, 'img.fvd');
  const cases: Array<[string[], RegExp]> = [
    [['info'], /usage: fvd info/],
    [['map'], /usage: fvd map/],
    [['check'], /usage: fvd check/],
    [['create'], /usage: fvd create/],
    [['create', img], /size is required/],
    [['create', '-b'], /argument missing|-b/],
    [['convert', img], /usage: fvd convert/],
    [['convert'], /usage: fvd convert/],
    [['io', img], /no commands given/],
    [['io', '-c'], /argument missing|-c/],
    [['io', '-c', 'read 0 4k'], /usage: fvd io/],
    [['info', img, img], /usage: fvd info/],
    [['create', img, '1M', 'extra'], /usage: fvd create/],
    // serve's arguments are checked before the device or the image is touched
    [['serve', img, '--prefetch-share', '2000'], /invalid prefetch latency share '2000'/],
    [['serve', img, '--prefetch-share', 'lots'], /invalid prefetch latency share 'lots'/],
    [['serve', img, '--prefetch-rate', 'fast'], /invalid prefetch rate 'fast'/],
  ];
  for (const [args, re] of cases) assertOneLineError(fvd(...args), re);
  assert.equal(fs.readdirSync(dir), [], 'no file was created');
});

// The ublk layer's own error type (daemon/ublk/errors.ts) is a user-facing error like the engine's:
// one line and exit 1, never an internal error with a stack. Only where the driver is missing.
test('serve without the ublk driver: one line naming the driver, exit 1, image untouched', () => {
  if (fs.existsSync('/dev/ublk-control')) return; // the driver is there: nothing to refuse
  const dir = caseDir();
  const img = path.join(dir, 'img.fvd');
  assertOk(fvd('create', img, '1M'));
  const before = snapshot([img]);
  assertOneLineError(fvd('serve', img), [/^fvd serve: the ublk driver is not available/, /modprobe ublk_drv/], 1);
  assertUnchanged(before, 'serve without a driver');
});

test('io: bad -c commands are refused before anything runs', async () => {
  const dir = caseDir();
  const img = path.join(dir, 'img.fvd');
  assertOk(fvd('create', img, '1M'));
  const before = snapshot([img]);
  const cases: Array<[string, RegExp]> = [
    ['', /empty -c command/],
    ['frob 0 4k', /unknown io command 'frob'/],
    ['read 0', /needs OFFSET and LEN/],
    ['read', /needs OFFSET and LEN/],
    ['write -P 0x100 0 4k', /invalid pattern/],
    ['write -P 0 4k', /needs OFFSET and LEN/],
    ['read -P', /invalid pattern/],
    ['read -Z 0 4k', /unknown option '-Z'/],
    ['discard -P 1 0 4k', /unknown option '-P'/],
    ['flush 0', /takes no arguments/],
    ['read 0 4k 8k', /needs OFFSET and LEN/],
    ['read 1x 4k', /invalid offset/],
  ];
  for (const [c, re] of cases) {
    // the valid write before the bad command must not run either: commands are parsed first
    const r = fvd('io', '-c', 'write -P 0x44 0 4k', '-c', c, img);
    assertOneLineError(r, re);
    assertUnchanged(before, r.cmd);
  }
  assertOk(fvd('io', '-r', '-c', 'read -P 0 0 1M', img));
});

// ---------------------------------------------------------------------------------------------
// create

test('create: sizes with suffixes, rounding to 512, fresh images read zeros', () => {
  const dir = caseDir();
  const cases: Array<[string, number]> = [
    ['64K', 64 * KiB],
    ['64k', 64 * KiB],
    ['1M', MiB],
    ['1.5M', 1.5 * MiB],
    ['2MiB', 2 * MiB],
    ['1G', 1024 * MiB],
    ['1g', 1024 * MiB],
    ['3000', 3072],
    ['1', 512],
    ['4096', 4096],
  ];
  cases.forEach(([text, size], i) => {
    const img = path.join(dir, `s${i}.fvd`);
    const r = fvd('create', img, text);
    assertOk(r);
    assert.match(r.stdout, new RegExp(`^Formatting '${img.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}', fmt=fvd layout=raw size=${size} `));
    const st = info(img);
    assert.is(st.virtualSize, size, `${text}`);
    assert.is(st.layout, 'raw');
    assert.is(st.blockSize, 64 * KiB);
    assert.equal(st.baseChain, []);
    assert.is(st.bytesLocal, size);
    assert.is(st.bytesInBase, 0);
    assert.is(st.dirty, false);
    assert.is(st.format, 'fvd');
    // the raw-like layout keeps the whole data area: file = data offset + size (sparse)
    assert.is(fs.statSync(img).size, readHeader(img).dataOffset + size);
  });
  const small = path.join(dir, 's7.fvd');
  assertOk(fvd('io', '-c', 'read -P 0 0 3072', small));
  assertOk(fvd('io', '-c', 'write -P 9 2560 512', small)); // the last sector of a sub-block disk
  assertOk(fvd('io', '-r', '-c', 'read -P 0 0 2560', '-c', 'read -P 9 2560 512', small));
  const r = fvd('io', '-c', 'read 0 3073', small);
  assertOneLineError(r, /outside the disk/);
});

test('create: invalid sizes are refused with one line and leave no file', () => {
  const dir = caseDir();
  const img = path.join(dir, 'img.fvd');
  for (const [size, re] of [
    ['0', /greater than zero/],
    ['abc', /invalid size 'abc'/],
    ['1X', /invalid size/],
    ['1.3', /whole number/],
    ['99999999999P', /invalid size/],
    ['2P', /out of range/],
  ] as Array<[string, RegExp]>) {
    assertOneLineError(fvd('create', img, size), re);
    assert.not.ok(fs.existsSync(img), `create ${size} left a file behind`);
  }
});

test('create: default size from the base; -F required with -b; -F without -b; unknown base format', async () => {
  const dir = caseDir();
  const base = path.join(dir, 'base.raw');
  const data = rawFile(base, patternBytes(3 * MiB + 1000, 5));
  const img = path.join(dir, 'img.fvd');
  const r = fvd('create', '-b', base, '-F', 'raw', img);
  assertOk(r);
  assert.match(r.stdout, /base=.*base\.raw base_fmt=raw/);
  const st = info(img);
  assert.is(st.virtualSize, 3 * MiB + 1024, 'the base size rounded up to 512');
  assert.is(st.baseChain.length, 1);
  assert.is(st.baseChain[0]!.format, 'raw');
  assert.is(st.baseChain[0]!.size, 3 * MiB + 1000);
  assert.is(path.resolve(st.baseChain[0]!.path), base);
  const expected = Buffer.concat([data, Buffer.alloc(24)]);
  assertSameBytes(await readWholeDisk(nodeIo, img), expected, 'image over its base');
  // a write inside the last, partial block of the base: copy-on-write fills the rest of the block
  // from the base up to its end and with zeros beyond
  assertOk(fvd('io', '-c', `write -P 0x77 ${3 * MiB + 990} 20`, img));
  expected.fill(0x77, 3 * MiB + 990, 3 * MiB + 1010);
  assertSameBytes(await readWholeDisk(nodeIo, img), expected, 'after a write across the end of the base');
  assert.is(info(img).bytesInBase, 3 * MiB, 'the last block is local now');

  // a relative base path is relative to the image's directory, not the cwd
  const rel = path.join(dir, 'rel.fvd');
  assertOk(fvd('create', '-b', 'base.raw', '-F', 'raw', rel, '4M'));
  assert.is(info(rel).virtualSize, 4 * MiB);
  assertSameBytes(await readWholeDisk(nodeIo, rel), Buffer.concat([data, Buffer.alloc(MiB - 1000)]), 'bigger than its base');

  for (const [args, re] of [
    [['create', '-b', base, path.join(dir, 'x.fvd')], /-F raw, -F qcow2 or -F fvd/],
    [['create', '-F', 'raw', path.join(dir, 'x.fvd'), '1M'], /-F given without a base/],
    [['create', '-b', base, '-F', 'vmdk', path.join(dir, 'x.fvd')], /invalid base format 'vmdk'/],
    [['create', '-b', path.join(dir, 'missing.raw'), '-F', 'raw', path.join(dir, 'x.fvd')], /missing\.raw.* not found/],
  ] as Array<[string[], RegExp]>) {
    assertOneLineError(fvd(...args), re);
    assert.not.ok(fs.existsSync(path.join(dir, 'x.fvd')), `${args.join(' ')} left a file behind`);
  }
});

test('create: refuses an existing file without --force, replaces it with --force', () => {
  const dir = caseDir();
  const img = path.join(dir, 'img.fvd');
  assertOk(fvd('create', img, '1M'));
  assertOk(fvd('io', '-c', 'write -P 0x6b 0 64k', img));
  const before = snapshot([img]);
  assertOneLineError(fvd('create', img, '2M'), /already exists.*--force/);
  assertOneLineError(fvd('create', '--layout', 'compact', img, '1M'), /already exists/);
  assertUnchanged(before, 'create without --force');
  assertOk(fvd('io', '-r', '-c', 'read -P 0x6b 0 64k', img));

  const other = path.join(dir, 'data.bin');
  fs.writeFileSync(other, 'precious');
  assertOneLineError(fvd('create', other, '1M'), /already exists/);
  assert.is(fs.readFileSync(other, 'utf8'), 'precious');

  assertOk(fvd('create', '--force', img, '2M'));
  assert.is(info(img).virtualSize, 2 * MiB);
  assertOk(fvd('io', '-r', '-c', 'read -P 0 0 2M', img)); // the old data is gone

  const empty = path.join(dir, 'empty.fvd');
  fs.writeFileSync(empty, '');
  assertOk(fvd('create', empty, '1M')); // an empty file holds nothing to lose
  assert.is(info(empty).virtualSize, MiB);
});

test('create: --layout compact, --chunk-size, --journal-size; bad layout refused', () => {
  const dir = caseDir();
  const img = path.join(dir, 'c.fvd');
  const r = fvd('create', '--layout', 'compact', img, '8M');
  assertOk(r);
  assert.match(r.stdout, /layout=compact .*chunk_size=1048576/);
  let st = info(img);
  assert.is(st.layout, 'compact');
  assert.is(st.chunkSize, MiB);
  assert.is(st.allocatedChunks, 0);
  assert.is(st.bytesLocal, 8 * MiB);
  const h = readHeader(img);
  assert.is(fs.statSync(img).size, h.dataOffset, 'a compact image starts without data');
  assertOk(fvd('io', '-c', 'write -P 0x12 3M 4k', img));
  st = info(img);
  assert.is(st.allocatedChunks, 1);
  assert.is(fs.statSync(img).size, h.dataOffset + 4 * KiB);
  assertOk(fvd('io', '-r', '-c', 'read -P 0x12 3M 4k', '-c', 'read -P 0 0 3M', '-c', 'read -P 0 3076k 5116k', img));

  const c2 = path.join(dir, 'c2.fvd');
  assertOk(fvd('create', '--layout', 'compact', '--chunk-size', '256k', '--journal-size', '32k', c2, '1M'));
  const st2 = info(c2);
  assert.is(st2.chunkSize, 256 * KiB);
  assert.is(st2.journal.capacitySectors, 64);

  // No block size given: a chunk smaller than the default block makes the block that small.
  const c3 = path.join(dir, 'c3.fvd');
  const r3 = fvd('create', '--layout', 'compact', '--chunk-size', '16k', c3, '1M');
  assertOk(r3);
  assert.match(r3.stdout, /block_size=16384 chunk_size=16384/);
  assert.is(readHeader(c3).blockSize, 16 * KiB);

  const j0 = path.join(dir, 'j0.fvd');
  assertOk(fvd('create', '--journal-size', '0', j0, '1M'));
  assert.is(info(j0).journal.capacitySectors, 0);
  assertOk(fvd('io', '-c', 'write -P 0x3 0 4k', '-c', 'flush', j0));
  assertOk(fvd('io', '-r', '-c', 'read -P 0x3 0 4k', j0));

  for (const [args, re] of [
    [['--layout', 'qcow2'], /invalid layout 'qcow2'/],
    [['--layout', 'compact', '--block-size', '64k', '--chunk-size', '4k'], /chunk size 4096 must be .* between the block size \(65536\)/],
    [['--layout', 'compact', '--chunk-size', '3M'], /chunk size/],
    [['--journal-size', '1000'], /journal size 1000/],
    [['--journal-size', '4k'], /journal size 4096/],
  ] as Array<[string[], RegExp]>) {
    const x = path.join(dir, 'x.fvd');
    assertOneLineError(fvd('create', ...args, x, '1M'), re);
    assert.not.ok(fs.existsSync(x), `${args.join(' ')} left a file behind`);
  }
});

test('create: --block-size validation', () => {
  const dir = caseDir();
  for (const [text, size] of [['4k', 4096], ['8K', 8192], ['1M', MiB], ['64M', 64 * MiB]] as Array<[string, number]>) {
    const img = path.join(dir, `b${size}.fvd`);
    assertOk(fvd('create', '--block-size', text, img, '64M'));
    assert.is(info(img).blockSize, size);
  }
  for (const [text, re] of [
    ['3000', /block size 3000 must be a power of two/],
    ['2k', /block size 2048/],
    ['128M', /block size 134217728/],
    ['0', /block size/],
    ['abc', /invalid block size 'abc'/],
    ['12k', /block size 12288/],
  ] as Array<[string, RegExp]>) {
    const img = path.join(dir, 'bad.fvd');
    assertOneLineError(fvd('create', '--block-size', text, img, '1M'), re);
    assert.not.ok(fs.existsSync(img), `--block-size ${text} left a file behind`);
  }
});

test('create: a path in a missing directory, a directory as the image: one line', () => {
  const dir = caseDir();
  assertOneLineError(fvd('create', path.join(dir, 'no', 'such', 'img.fvd'), '1M'), /no such file or directory/i);
  assertOneLineError(fvd('create', dir, '1M'), /already exists|not a regular file|directory/i);
});

// BUG (reported to the lead): a create that fails half-way leaves a broken image behind, which
// then blocks a retry ("already exists; use --force"). Here the raw-like file cannot be extended to
// its full sparse size (EFBIG on ext4 beyond 16 TiB); on a file system where it can, create must
// simply succeed.
test('a failed create leaves no half-written image behind', () => {
  const dir = caseDir();
  const img = path.join(dir, 'huge.fvd');
  const r = fvd('create', img, '1P');
  assertNoCrash(r);
  if (r.code === 0) {
    assert.is(info(img).virtualSize, 1024 ** 5);
    return;
  }
  assertOneLineError(r, /.+/);
  assert.not.ok(fs.existsSync(img), `failed create left ${fs.existsSync(img) ? fs.statSync(img).size : 0} bytes at ${img}: '${r.stderr.trim()}'`);
});

// BUG (reported to the lead): a compact image whose lookup table exceeds 2 GiB (here 600 TiB with
// 1 MiB chunks: 2.4 GB of table) crashes create with an internal error (exit 70, RangeError from
// a single fs.write of the whole table) and leaves a 4 KiB broken file behind. Needs ~2.5 GB of
// memory in the child process.
test('create of a compact image with a > 2 GiB lookup table: no internal error, no debris', () => {
  const dir = caseDir();
  const img = path.join(dir, 'wide.fvd');
  const r = fvd('create', '--layout', 'compact', img, '600T');
  assertNoCrash(r);
  if (r.code === 0) {
    assert.is(info(img).virtualSize, 600 * 1024 ** 4);
    return;
  }
  assertOneLineError(r, /.+/);
  assert.not.ok(fs.existsSync(img), 'failed create left a file behind');
});

// ---------------------------------------------------------------------------------------------
// info

test('info: base chain, bytes local / in base change with writes; human output agrees', async () => {
  const dir = caseDir();
  const base = path.join(dir, 'base.raw');
  rawFile(base, patternBytes(MiB, 9));
  const img = path.join(dir, 'img.fvd');
  assertOk(fvd('create', '--block-size', '64K', '-b', 'base.raw', '-F', 'raw', img, '2M')); // the byte counts below are in 64 KiB blocks
  let st = info(img);
  assert.is(st.image, img);
  assert.is(st.virtualSize, 2 * MiB);
  assert.is(st.layout, 'raw');
  assert.equal(st.baseChain, [{ path: base, format: 'raw', size: MiB }]);
  assert.is(st.bytesInBase, MiB);
  assert.is(st.bytesLocal, MiB, 'beyond the base the disk is local');
  assert.is(st.fullyLocal, false);
  assert.is(st.zeroDetected, true);
  assert.is(st.dirty, false);
  assert.is(st.journal.sectorsToReplay, 0);
  assert.type(st.diskSize, 'number');

  assertOk(fvd('io', '-c', 'write -P 0x11 0 64k', img));
  st = info(img);
  assert.is(st.bytesInBase, MiB - 64 * KiB);
  assert.is(st.bytesLocal, MiB + 64 * KiB);
  assertOk(fvd('io', '-c', 'write -P 0x12 200k 4k', img)); // a partial block: the whole block becomes local
  st = info(img);
  assert.is(st.bytesInBase, MiB - 128 * KiB);
  assertOk(fvd('io', '-c', 'write -P 0x13 1536k 64k', img)); // beyond the base: no change
  assert.is(info(img).bytesInBase, MiB - 128 * KiB);
  assertOk(fvd('io', '-r', '-c', 'read 256k 64k', img)); // a read-only read copies nothing
  assert.is(info(img).bytesInBase, MiB - 128 * KiB);
  assertOk(fvd('io', '-c', 'read 256k 64k', img)); // copy-on-read (default for read-write opens)
  assert.is(info(img).bytesInBase, MiB - 192 * KiB);
  assertOk(fvd('io', '--no-copy-on-read', '-c', 'read 512k 64k', img));
  assert.is(info(img).bytesInBase, MiB - 192 * KiB);

  const human = fvd('info', img);
  assertOk(human);
  const o = human.stdout;
  assert.match(o, new RegExp(`^image: ${img.replace(/[.*+?^${}()|[\]\\/]/g, '\\$&')}$`, 'm'));
  assert.match(o, /^file format: fvd$/m);
  assert.match(o, /^layout: raw-like$/m);
  assert.match(o, /^virtual size: 2 MiB \(2097152 bytes\)$/m);
  assert.match(o, /^block size: 64 KiB$/m);
  assert.match(o, new RegExp(`^base image: .*base\\.raw \\(raw, 1 MiB\\)$`, 'm'));
  assert.match(o, /^in base: 832 KiB \(40\.6%\)$/m);
  // 256 KiB written (three blocks and one copied in on read), the rest never written: zeros
  assert.match(o, /^data: 256 KiB \(12\.5%\) written in this image$/m);
  assert.match(o, /^zero: 960 KiB \(46\.9%\) never written or discarded: reads as zeros, takes no space$/m);
  assert.match(o, /^dirty: no$/m);

  // the content agrees with what info claims
  const expected = Buffer.alloc(2 * MiB);
  patternBytes(MiB, 9).copy(expected);
  expected.fill(0x11, 0, 64 * KiB);
  expected.fill(0x12, 200 * KiB, 204 * KiB);
  expected.fill(0x13, 1536 * KiB, 1600 * KiB);
  assertSameBytes(await readWholeDisk(nodeIo, img), expected, 'image content');
});

test('info: zero detection at create; --no-detect-zeroes', () => {
  const dir = caseDir();
  const base = path.join(dir, 'base.raw');
  const data = patternBytes(MiB, 4);
  data.fill(0, 256 * KiB, 384 * KiB); // two all-zero blocks
  rawFile(base, data);
  const a = path.join(dir, 'a.fvd');
  assertOk(fvd('create', '-b', base, '-F', 'raw', a));
  let st = info(a);
  assert.is(st.zeroDetected, true);
  assert.is(st.bytesInBase, MiB - 128 * KiB);
  const b = path.join(dir, 'b.fvd');
  assertOk(fvd('create', '--no-detect-zeroes', '-b', base, '-F', 'raw', b));
  st = info(b);
  assert.is(st.zeroDetected, false);
  assert.is(st.bytesInBase, MiB);
  assertOk(fvd('io', '-r', '-c', 'read -P 0 256k 128k', a));
  assertOk(fvd('io', '-r', '-c', 'read -P 0 256k 128k', b));
});

test('info: a chain lists every base in order', () => {
  const dir = caseDir();
  const r = path.join(dir, 'r.raw');
  rawFile(r, patternBytes(MiB, 2));
  const b = path.join(dir, 'b.fvd');
  const a = path.join(dir, 'a.fvd');
  assertOk(fvd('create', '-b', 'r.raw', '-F', 'raw', b, '1536k'));
  assertOk(fvd('create', '-b', 'b.fvd', '-F', 'fvd', a, '2M'));
  const st = info(a);
  assert.equal(st.baseChain, [
    { path: b, format: 'fvd', size: 1536 * KiB },
    { path: r, format: 'raw', size: MiB },
  ]);
  // b.fvd's bytes 1M..1536k (beyond its own base) are zeros: detected at create, so local in a.fvd
  assert.is(st.bytesInBase, MiB);
  const human = fvd('info', a).stdout;
  assert.match(human, /^base image: .*b\.fvd \(fvd, 1\.50 MiB\)$/m);
  assert.match(human, /^  based on: .*r\.raw \(raw, 1 MiB\)$/m);
});

test('info: dirty after a crash (abandon), clean after a close; journal replay keeps flushed data', async () => {
  for (const layout of ['raw', 'compact'] as const) {
    const dir = caseDir();
    const base = path.join(dir, 'base.raw');
    rawFile(base, patternBytes(MiB, 3));
    const img = path.join(dir, 'img.fvd');
    assertOk(fvd('create', '--layout', layout, '-b', base, '-F', 'raw', img, '2M'));
    const e = await FvdImage.open(nodeIo, img);
    await e.write(Buffer.alloc(64 * KiB, 0x5d), 128 * KiB);
    await e.write(Buffer.alloc(4 * KiB, 0x5e), 1536 * KiB);
    await e.flush();
    await e.abandon();

    const before = snapshot([img]);
    const st = info(img);
    assert.is(st.dirty, true, `${layout}: dirty after a crash`);
    assert.ok(st.journal.sectorsToReplay >= 1, `${layout}: journal records to replay: ${JSON.stringify(st.journal)}`);
    assert.is(st.bytesInBase, MiB - 64 * KiB, `${layout}: the replayed bitmap counts the write`);
    const human = fvd('info', img).stdout;
    assert.match(human, new RegExp(`^dirty: yes \\(${st.journal.sectorsToReplay} journal sectors to replay\\)$`, 'm'));
    assertOk(fvd('io', '-r', '-c', 'read -P 0x5d 128k 64k', '-c', 'read -P 0x5e 1536k 4k', img));
    assertUnchanged(before, 'info and read-only io on a dirty image');

    const again = await FvdImage.open(nodeIo, img);
    await again.close();
    const clean = info(img);
    assert.is(clean.dirty, false, `${layout}: clean after close`);
    assert.is(clean.journal.sectorsToReplay, 0);
    assert.is(clean.bytesInBase, MiB - 64 * KiB);
    assert.match(fvd('info', img).stdout, /^dirty: no$/m);
    assertOk(fvd('io', '-r', '-c', 'read -P 0x5d 128k 64k', '-c', 'read -P 0x5e 1536k 4k', img));
  }
});

// ---------------------------------------------------------------------------------------------
// check

function check(...args: string[]): CliResult {
  const r = fvd('check', ...args);
  assertNoCrash(r);
  return r;
}

test('check: 0 on fresh images, 2 on a corrupt one (nothing modified, even with --repair)', () => {
  const dir = caseDir();
  const raw = path.join(dir, 'r.fvd');
  const compact = path.join(dir, 'c.fvd');
  assertOk(fvd('create', raw, '4M'));
  assertOk(fvd('create', '--layout', 'compact', compact, '4M'));
  for (const img of [raw, compact]) {
    const before = snapshot([img]);
    const r = check(img);
    assert.is(r.code, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /^No errors were found on the image\.$/m);
    assert.not.match(r.stdout, /ERROR|note:/);
    const rr = check('--repair', img);
    assert.is(rr.code, 0, 'nothing to repair');
    const j = JSON.parse(check('--json', img).stdout);
    assert.equal(j.errors, []);
    assert.is(j.exitCode, 0);
    assert.is(j.repaired, false);
    assertUnchanged(before, 'check of a clean image');
  }
  assertOk(fvd('io', '-c', 'write -P 1 0 1M', '-c', 'write -P 2 1M 1M', compact));
  setTableEntry(compact, 1, 0);
  const before = snapshot([compact]);
  for (const args of [[compact], ['--repair', compact]]) {
    const r = check(...args);
    assert.is(r.code, 2, r.stdout + r.stderr);
    assert.match(r.stdout, /^ERROR: .*c\.fvd: corrupt image: storage chunk 0 is mapped twice$/m);
    assert.match(r.stdout, /1 error\(s\) found; the image is corrupt/);
  }
  const j = JSON.parse(check('--json', compact).stdout);
  assert.is(j.exitCode, 2);
  assert.is(j.errors.length, 1);
  assertUnchanged(before, 'check of a corrupt image');
});

test('check: dirty compact image — plain check reports it and changes nothing; --repair → 3; then 0', async () => {
  const dir = caseDir();
  const img = path.join(dir, 'c.fvd');
  assertOk(fvd('create', '--layout', 'compact', img, '8M'));
  const e = await FvdImage.open(nodeIo, img);
  await e.write(Buffer.alloc(MiB, 0x71), 0);
  await e.write(Buffer.alloc(8 * KiB, 0x72), 5 * MiB);
  await e.flush();
  await e.write(Buffer.alloc(4 * KiB, 0x73), 7 * MiB); // allocates chunk 7's storage, never journaled
  await e.abandon();

  const before = snapshot([img]);
  const r = check(img);
  assert.is(r.code, 0, `a dirty image is not corrupt: ${r.stdout}`);
  assert.match(r.stdout, /^note: image was not closed cleanly: [1-9]\d* journal sector\(s\) to replay$/m);
  assert.match(r.stdout, /^note: 1 unreferenced storage chunk\(s\)/m);
  assertUnchanged(before, 'check without --repair');

  const rep = check('--repair', img);
  assert.is(rep.code, 3, rep.stdout + rep.stderr);
  assert.match(rep.stdout, /repaired/);
  assert.match(rep.stdout, /reclaimed 1 unreferenced storage chunk/);

  const again = check(img);
  assert.is(again.code, 0, again.stdout);
  assert.match(again.stdout, /^No errors were found on the image\.$/m);
  assert.not.match(again.stdout, /note:/);
  const st = info(img);
  assert.is(st.dirty, false);
  assert.is(st.allocatedChunks, 2);
  assert.is(fs.statSync(img).size, readHeader(img).dataOffset + 2 * MiB, 'the leaked chunk was truncated away');
  // flushed data survived the crash and the repair; the unflushed write to chunk 7 did not appear
  assertOk(fvd('io', '-r', '-c', 'read -P 0x71 0 1M', '-c', 'read -P 0x72 5M 8k', '-c', 'read -P 0 7M 1M', '-c', 'read -P 0 1M 4M', img));
  assert.is(check('--repair', img).code, 0, 'nothing left to repair');
});

test('check --json: report fields', () => {
  const dir = caseDir();
  const img = path.join(dir, 'img.fvd');
  assertOk(fvd('create', img, '1M'));
  const r = check('--json', img);
  assert.is(r.code, 0);
  const j = JSON.parse(r.stdout);
  assert.equal(
    Object.keys(j).sort(),
    // qemu-img check's keys, then fvd's
    ['filename', 'format', 'check-errors', 'total-clusters', 'allocated-clusters', 'image-end-offset']
      .concat(['errors', 'exitCode', 'image', 'leaks', 'notes', 'overcounts', 'repaired', 'snapshots', 'undercounts'])
      .sort(),
  );
  assert.is(j.image, img);
  assert.is(j.leaks, 0);
});

// ---------------------------------------------------------------------------------------------
// map

test('map: raw-like image over a raw base — base, local after writes, discards and copy-on-read', async () => {
  const dir = caseDir();
  const base = path.join(dir, 'base.raw');
  rawFile(base, patternBytes(MiB, 6));
  const img = path.join(dir, 'img.fvd');
  assertOk(fvd('create', '--block-size', '64K', '-b', base, '-F', 'raw', img, '2M')); // the extents below are in 64 KiB blocks
  let m = map(img);
  assertTiles(m, 2 * MiB);
  assert.equal(m, [ext(0, MiB, 'base'), ext(MiB, MiB, 'zero')], 'past the base: never written, a hole');

  assertOk(fvd('io', '-c', 'write -P 0x11 130k 4k', img)); // block 2 (128k..192k)
  m = map(img);
  assertTiles(m, 2 * MiB);
  assert.equal(m, [ext(0, 128 * KiB, 'base'), ext(128 * KiB, 64 * KiB, 'local'), ext(192 * KiB, MiB - 192 * KiB, 'base'), ext(MiB, MiB, 'zero')]);

  assertOk(fvd('io', '-c', 'discard 512k 64k', img));
  m = map(img);
  assertTiles(m, 2 * MiB);
  assert.equal(m, [
    ext(0, 128 * KiB, 'base'),
    ext(128 * KiB, 64 * KiB, 'local'),
    ext(192 * KiB, 320 * KiB, 'base'),
    ext(512 * KiB, 64 * KiB, 'zero'), // discarded: a hole, in front of the base
    ext(576 * KiB, MiB - 576 * KiB, 'base'),
    ext(MiB, MiB, 'zero'),
  ]);
  assertOk(fvd('io', '-r', '-c', 'read -P 0 512k 64k', img)); // discarded: zeros, not the base

  assertOk(fvd('io', '-c', 'read 0 64k', img)); // copy-on-read
  m = map(img);
  assertTiles(m, 2 * MiB);
  assert.equal(m[0], ext(0, 64 * KiB, 'local'));
  assert.equal(m[1], ext(64 * KiB, 64 * KiB, 'base'));

  // the content agrees with the map: base extents read as the base
  const content = await readWholeDisk(nodeIo, img);
  const b = patternBytes(MiB, 6);
  for (const e of m) if (e.kind === 'base') assert.ok(content.subarray(e.offset, e.offset + e.length).equals(b.subarray(e.offset, e.offset + e.length)), `base extent ${e.offset}`);

  const human = fvd('map', img);
  assertOk(human);
  const lines = human.stdout.trim().split('\n');
  assert.match(lines[0]!, /^Offset\s+Length\s+What\s+File offset$/);
  assert.is(lines.length, m.length + 1);
  m.forEach((e, i) => {
    const cols = lines[i + 1]!.trim().split(/\s+/);
    assert.equal(cols.slice(0, 2), ['0x' + e.offset.toString(16), '0x' + e.length.toString(16)]);
    if (e.kind === 'base') assert.match(lines[i + 1]!, /\sdata\s+in \S*base\.raw \(depth 1\)\s/);
    else assert.is(cols[2], e.kind === 'local' ? 'data' : 'zero');
  });
});

test('map: compact image — zero for unallocated chunks, local after a write, zero again after a whole-chunk discard', async () => {
  const dir = caseDir();
  const base = path.join(dir, 'base.raw');
  const data = patternBytes(MiB, 8);
  data.fill(0, 256 * KiB, 320 * KiB); // an all-zero block: local (and unallocated) from create
  rawFile(base, data);
  const img = path.join(dir, 'c.fvd');
  assertOk(fvd('create', '--layout', 'compact', '-b', base, '-F', 'raw', img, '4M'));
  let m = map(img);
  assertTiles(m, 4 * MiB);
  assert.equal(m, [ext(0, 256 * KiB, 'base'), ext(256 * KiB, 64 * KiB, 'zero'), ext(320 * KiB, 704 * KiB, 'base'), ext(MiB, 3 * MiB, 'zero')]);

  assertOk(fvd('io', '-c', 'write -P 0x21 2M 4k', '-c', 'write -P 0x22 64k 64k', img));
  m = map(img);
  assertTiles(m, 4 * MiB);
  assert.equal(m, [
    ext(0, 64 * KiB, 'base'),
    ext(64 * KiB, 64 * KiB, 'local'),
    ext(128 * KiB, 128 * KiB, 'base'),
    ext(256 * KiB, 64 * KiB, 'zero'), // chunk 0 is allocated now, but its zero block was never written: a hole
    ext(320 * KiB, 704 * KiB, 'base'),
    ext(MiB, MiB, 'zero'),
    ext(2 * MiB, 4 * KiB, 'local'), // chunk 2: 4 KiB written, the rest of it a hole
    ext(2 * MiB + 4 * KiB, 2 * MiB - 4 * KiB, 'zero'),
  ]);
  assert.is(info(img).allocatedChunks, 2);

  assertOk(fvd('io', '-c', 'discard 2M 1M', '-c', 'discard 3M 64k', img));
  m = map(img);
  assertTiles(m, 4 * MiB);
  assert.equal(m.slice(-1), [ext(MiB, 3 * MiB, 'zero')]);
  assert.is(info(img).allocatedChunks, 1);
  assertOk(fvd('io', '-r', '-c', 'read -P 0 1M 3M', '-c', 'read -P 0x22 64k 64k', '-c', 'read -P 0 256k 64k', img));

  // zero extents really read as zeros, base extents as the base
  const content = await readWholeDisk(nodeIo, img);
  for (const e of m) {
    const got = content.subarray(e.offset, e.offset + e.length);
    if (e.kind === 'zero') assert.ok(got.every((x) => x === 0), `zero extent at ${e.offset}`);
    if (e.kind === 'base') assert.ok(got.equals(data.subarray(e.offset, e.offset + e.length)), `base extent at ${e.offset}`);
  }
});

test('map: image without a base is all local (raw-like) or all zero (compact)', () => {
  const dir = caseDir();
  const r = path.join(dir, 'r.fvd');
  const c = path.join(dir, 'c.fvd');
  assertOk(fvd('create', r, '3M'));
  assertOk(fvd('create', '--layout', 'compact', c, '3M'));
  assert.equal(map(r), [ext(0, 3 * MiB, 'zero')], 'never written: a hole');
  assert.equal(map(c), [ext(0, 3 * MiB, 'zero')]);
  assertOk(fvd('io', '-c', 'write 1M 1', c));
  // One byte written: data from 1M for at most a page (the file system's granularity; a compact
  // image's file may end right after the byte), zeros around it.
  const oneByte = (m: Extent[]) => {
    assert.equal(m.map((e) => e.kind), ['zero', 'local', 'zero'], JSON.stringify(m));
    assert.equal([m[0]!.length, m[1]!.offset], [MiB, MiB]);
    assert.ok(m[1]!.length >= 1 && m[1]!.length <= 4 * KiB, `data extent of ${m[1]!.length} bytes`);
  };
  oneByte(map(c));
  assertOk(fvd('io', '-c', 'write 1M 1', r));
  oneByte(map(r));
});

// ---------------------------------------------------------------------------------------------
// convert

test('convert: FVD over a raw base → raw, byte-identical; inputs untouched', async () => {
  const dir = caseDir();
  const base = path.join(dir, 'base.raw');
  const data = rawFile(base, patternBytes(MiB, 11));
  const img = path.join(dir, 'img.fvd');
  assertOk(fvd('create', '-b', base, '-F', 'raw', img, '2M'));
  assertOk(fvd('io', '-c', 'write -P 0xaa 70k 4k', '-c', 'zero 256k 64k', '-c', 'discard 300k 100k', '-c', 'write -P 0xbb 1536k 64k', img));
  const expected = Buffer.alloc(2 * MiB);
  data.copy(expected);
  expected.fill(0xaa, 70 * KiB, 74 * KiB);
  expected.fill(0, 256 * KiB, 320 * KiB);
  expected.fill(0, 300 * KiB, 400 * KiB);
  expected.fill(0xbb, 1536 * KiB, 1600 * KiB);
  assertSameBytes(await readWholeDisk(nodeIo, img), expected, 'the image itself');

  const before = snapshot([img, base]);
  const out = path.join(dir, 'out.raw');
  assertOk(fvd('convert', img, out));
  assertSameBytes(fs.readFileSync(out), expected, 'convert → raw');
  const out2 = path.join(dir, 'out2.raw');
  assertOk(fvd('convert', '-f', 'fvd', '-O', 'raw', img, out2));
  assert.is(sha256File(out2), sha256File(out));
  assertUnchanged(before, 'convert');

  // refuses to overwrite; --force does
  fs.writeFileSync(out2, 'x');
  assertOneLineError(fvd('convert', img, out2), /already exists.*--force/);
  assert.is(fs.readFileSync(out2, 'utf8'), 'x');
  assertOk(fvd('convert', '--force', img, out2));
  assert.is(sha256File(out2), sha256File(out));
  assertOneLineError(fvd('convert', '--force', img, img), /same file/);
  assertOneLineError(fvd('convert', path.join(dir, 'missing.fvd'), path.join(dir, 'o.raw')), /missing\.fvd: no such file/);
  assertOneLineError(fvd('convert', '-O', 'qcow2', img, path.join(dir, 'o.raw')), /fvd reads qcow2 images but does not write them/);
  assert.not.ok(fs.existsSync(path.join(dir, 'o.raw')));
  assertUnchanged(before, 'refused converts');
});

test('convert: raw → FVD (raw-like and compact) → raw round trip is identical', async () => {
  const dir = caseDir();
  const src = path.join(dir, 'src.raw');
  const data = patternBytes(3 * MiB + 512, 13);
  data.fill(0, MiB, 2 * MiB + 4096); // a zero hole, skipped by convert
  data.fill(0, 3 * MiB); // and a zero tail
  rawFile(src, data);
  for (const layout of ['raw', 'compact'] as const) {
    const mid = path.join(dir, `mid-${layout}.fvd`);
    assertOk(fvd('convert', '-O', 'fvd', '--layout', layout, '--block-size', '4k', src, mid));
    const st = info(mid);
    assert.is(st.virtualSize, data.length);
    assert.is(st.layout, layout);
    assert.is(st.blockSize, 4096);
    assert.equal(st.baseChain, []);
    assertSameBytes(await readWholeDisk(nodeIo, mid), data, `${layout} FVD content`);
    // zero pieces are skipped, so a compact copy leaves their chunks unallocated
    const m = map(mid);
    assertTiles(m, data.length);
    assert.equal(m, [ext(0, MiB, 'local'), ext(MiB, MiB, 'zero'), ext(2 * MiB, MiB, 'local'), ext(3 * MiB, 512, 'zero')]);
    const back = path.join(dir, `back-${layout}.raw`);
    assertOk(fvd('convert', mid, back));
    assert.is(sha256File(back), sha256File(src), `${layout}: round trip`);
  }
});

test('convert: a chain FVD → FVD → raw flattens correctly (to raw and to a standalone FVD)', async () => {
  const dir = caseDir();
  const r = path.join(dir, 'r.raw');
  const data = rawFile(r, patternBytes(MiB, 17));
  const b = path.join(dir, 'b.fvd');
  const a = path.join(dir, 'a.fvd');
  assertOk(fvd('create', '-b', 'r.raw', '-F', 'raw', b, '1536k'));
  assertOk(fvd('io', '-c', 'write -P 0x11 0 64k', '-c', 'write -P 0x12 1100k 8k', '-c', 'discard 640k 64k', b));
  assertOk(fvd('create', '--layout', 'compact', '-b', 'b.fvd', '-F', 'fvd', a, '3M'));
  assertOk(fvd('io', '-c', 'write -P 0x21 32k 64k', '-c', 'zero 900k 10k', '-c', 'write -P 0x22 2M 4k', a));
  const expected = Buffer.alloc(3 * MiB);
  data.copy(expected);
  expected.fill(0x11, 0, 64 * KiB);
  expected.fill(0x12, 1100 * KiB, 1108 * KiB);
  expected.fill(0, 640 * KiB, 704 * KiB);
  expected.fill(0x21, 32 * KiB, 96 * KiB);
  expected.fill(0, 900 * KiB, 910 * KiB);
  expected.fill(0x22, 2 * MiB, 2 * MiB + 4 * KiB);
  const before = snapshot([a, b, r]);
  const out = path.join(dir, 'flat.raw');
  assertOk(fvd('convert', a, out));
  assertSameBytes(fs.readFileSync(out), expected, 'chain → raw');
  const flat = path.join(dir, 'flat.fvd');
  assertOk(fvd('convert', '-O', 'fvd', a, flat));
  const st = info(flat);
  assert.equal(st.baseChain, []);
  assert.is(st.virtualSize, 3 * MiB);
  assertSameBytes(await readWholeDisk(nodeIo, flat), expected, 'chain → standalone FVD');
  assertUnchanged(before, 'convert of a chain');
  // the standalone copy does not need the chain any more
  fs.rmSync(b);
  fs.rmSync(r);
  assertSameBytes(await readWholeDisk(nodeIo, flat), expected, 'standalone FVD without the old chain');
});

// ---------------------------------------------------------------------------------------------
// io

test('io: write -P then read -P; a mismatching pattern fails with exit 1 at the right offset', async () => {
  const dir = caseDir();
  const img = path.join(dir, 'img.fvd');
  assertOk(fvd('create', img, '1M'));
  const w = fvd('io', '-c', 'write -P 0xab 0 64k', img);
  assertOk(w);
  assert.match(w.stdout, /^wrote 65536\/65536 bytes at offset 0$/m);
  const r = fvd('io', '-c', 'read -P 0xab 0 64k', img);
  assertOk(r);
  assert.match(r.stdout, /^read 65536\/65536 bytes at offset 0$/m);
  const content = await readWholeDisk(nodeIo, img);
  assert.ok(content.subarray(0, 64 * KiB).every((x) => x === 0xab));
  assert.ok(content.subarray(64 * KiB).every((x) => x === 0));

  const bad = fvd('io', '-c', 'read -P 0xab 0 128k', img);
  assertNoCrash(bad);
  assert.is(bad.code, 1);
  assert.match(bad.stdout + bad.stderr, /Pattern verification failed at offset 65536, 65536 bytes/);
  const bad2 = fvd('io', '-c', 'read -P 0xac 4k 4k', img);
  assert.is(bad2.code, 1);
  assert.match(bad2.stdout + bad2.stderr, /Pattern verification failed at offset 4096, 4096 bytes/);

  // the first failure stops the run: the write after it does not happen
  const stop = fvd('io', '-c', 'read -P 0x01 0 4k', '-c', 'write -P 0x02 0 4k', img);
  assert.is(stop.code, 1);
  assertOk(fvd('io', '-c', 'read -P 0xab 0 4k', img));

  // default write pattern 0xcd; decimal patterns
  assertOk(fvd('io', '-c', 'write 128k 512', '-c', 'write -P 7 256k 1', img));
  assertOk(fvd('io', '-r', '-c', 'read -P 0xcd 128k 512', '-c', 'read -P 7 256k 1', '-c', 'read -P 0 257k 1', img));
});

test('io: discard and zero read back zeros (over a base too), neighbours intact', async () => {
  for (const layout of ['raw', 'compact'] as const) {
    const dir = caseDir();
    const base = path.join(dir, 'base.raw');
    const data = rawFile(base, patternBytes(MiB, 21));
    const img = path.join(dir, 'img.fvd');
    assertOk(fvd('create', '--layout', layout, '-b', base, '-F', 'raw', img, '2M'));
    assertOk(
      fvd('io', '-c', 'write -P 0xab 0 256k', '-c', 'discard 64k 64k', '-c', 'zero 130k 10k', '-c', 'discard 512k 64k', '-c', 'zero 700k 3k', '-c', 'discard 1M 1M', img),
    );
    const expected = Buffer.alloc(2 * MiB);
    data.copy(expected);
    expected.fill(0xab, 0, 256 * KiB);
    expected.fill(0, 64 * KiB, 128 * KiB);
    expected.fill(0, 130 * KiB, 140 * KiB);
    expected.fill(0, 512 * KiB, 576 * KiB);
    expected.fill(0, 700 * KiB, 703 * KiB);
    assertOk(
      fvd('io', '-r', '-c', 'read -P 0 64k 64k', '-c', 'read -P 0 130k 10k', '-c', 'read -P 0xab 128k 2k', '-c', 'read -P 0xab 140k 116k', '-c', 'read -P 0 512k 64k', '-c', 'read -P 0 700k 3k', '-c', 'read -P 0 1M 1M', img),
    );
    assertSameBytes(await readWholeDisk(nodeIo, img), expected, `${layout}: content after discard/zero`);
  }
});

test('io: flush and FUA writes; data reaches the image file', async () => {
  const dir = caseDir();
  const img = path.join(dir, 'img.fvd');
  assertOk(fvd('create', img, '1M'));
  const r = fvd('io', '-c', 'write -P 0x31 0 4k', '-c', 'flush', '-c', 'write -F -P 0x32 4k 4k', '-c', 'flush', img);
  assertOk(r);
  assert.match(r.stdout, /wrote 4096\/4096 bytes at offset 0/);
  assert.match(r.stdout, /wrote 4096\/4096 bytes at offset 4096/);
  const dataOffset = readHeader(img).dataOffset;
  const raw = fs.readFileSync(img).subarray(dataOffset, dataOffset + 8 * KiB);
  assert.ok(raw.subarray(0, 4096).every((x) => x === 0x31) && raw.subarray(4096).every((x) => x === 0x32), 'raw-like layout: guest byte X at data offset + X');
  assert.is(json<Info>(fvd('info', '--json', img)).dirty, false);
});

// BUG (reported to the lead): an io request of 2 GiB or more crashes with an internal error
// (exit 70, RangeError from fs.read: NodeFile.read/write pass lengths >= 2^31 unsplit). Either
// serve it or refuse it with one line. Needs ~2.2 GB of memory in the child process.
test('fvd io with a request of 2 GiB or more: no internal error', () => {
  const dir = caseDir();
  const img = path.join(dir, 'big.fvd');
  assertOk(fvd('create', img, '3G'));
  for (const fmt of ['fvd', 'raw']) {
    const r = fvd('io', '-f', fmt, '-r', '-c', 'read -P 0 2200M 8k', '-c', 'read 0 2200M', img);
    assertNoCrash(r);
    if (r.code !== 0) assertOneLineError(r, /.+/);
    else assert.match(r.stdout, /read 2306867200\/2306867200 bytes at offset 0/);
  }
});

test('io -f raw on a raw file: reads, writes, zero, range checks', () => {
  const dir = caseDir();
  const f = path.join(dir, 'disk.raw');
  fs.writeFileSync(f, Buffer.alloc(256 * KiB, 0x55));
  assertOk(fvd('io', '-f', 'raw', '-c', 'write -P 0x66 4k 4k', '-c', 'zero 64k 64k', f));
  const b = fs.readFileSync(f);
  assert.is(b.length, 256 * KiB);
  assert.ok(b.subarray(0, 4 * KiB).every((x) => x === 0x55));
  assert.ok(b.subarray(4 * KiB, 8 * KiB).every((x) => x === 0x66));
  assert.ok(b.subarray(64 * KiB, 128 * KiB).every((x) => x === 0));
  assert.ok(b.subarray(128 * KiB).every((x) => x === 0x55));
  const before = snapshot([f]);
  assertOneLineError(fvd('io', '-f', 'raw', '-c', 'write 255k 2k', f), /outside the disk/);
  assertOneLineError(fvd('io', '-f', 'vmdk', '-c', 'read 0 1', f), /invalid format 'vmdk'/);
  assertUnchanged(before, 'refused raw io');
});

// ---------------------------------------------------------------------------------------------
// snapshot

test('snapshot: create, list (table and --json), apply, delete; info and check count them', async () => {
  const dir = caseDir();
  const file = path.join(dir, 'vm.fvd');
  assertOk(fvd('create', '--layout', 'compact', '--chunk-size', '64k', file, '4M'));
  assertOk(fvd('io', '-c', 'write -P 0x11 0 256k', file));
  const empty = fvd('snapshot', '-l', file);
  assertOk(empty);
  assert.match(empty.stdout, /no snapshots/);
  assertOk(fvd('snapshot', '-c', 'clean install', file));
  assertOk(fvd('io', '-c', 'write -P 0x22 64k 64k', '-c', 'write -P 0x33 1M 64k', file));
  assertOk(fvd('snapshot', '-c', 'after', file));
  const t0 = Date.now();

  const table = fvd('snapshot', '-l', file);
  assertOk(table);
  const lines = table.stdout.trimEnd().split('\n');
  assert.is(lines[0], 'Snapshot list:');
  assert.match(lines[1]!, /^ID\s+TAG\s+SIZE\s+DATE$/);
  assert.match(lines[2]!, /^1\s+clean install\s+256 KiB\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/);
  assert.match(lines[3]!, /^2\s+after\s+320 KiB\s+\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$/);
  assert.is(lines.length, 4);
  const list = json<Array<{ id: number; name: string; size: number; date: string; virtualSize: number }>>(fvd('snapshot', '-l', '--json', file));
  assert.equal(list.map((s) => [s.id, s.name, s.size, s.virtualSize]), [[1, 'clean install', 256 * KiB, 4 * MiB], [2, 'after', 320 * KiB, 4 * MiB]]);
  for (const s of list) assert.ok(Math.abs(Date.parse(s.date) - t0) < 600_000, `date ${s.date}`);
  const inf = json<Info & { snapshotCount: number; snapshots: Array<{ name: string }> }>(fvd('info', '--json', file));
  assert.is(inf.snapshotCount, 2);
  assert.equal(inf.snapshots.map((x) => x.name), ['clean install', 'after'], "qemu-img info's snapshot list");
  assert.match(fvd('info', file).stdout, /^snapshots: 2$/m);

  const expectAfter = Buffer.alloc(4 * MiB);
  expectAfter.fill(0x11, 0, 256 * KiB).fill(0x22, 64 * KiB, 128 * KiB).fill(0x33, MiB, MiB + 64 * KiB);
  assertOk(fvd('snapshot', '-a', 'clean install', file));
  const clean = Buffer.alloc(4 * MiB);
  clean.fill(0x11, 0, 256 * KiB);
  assertSameBytes(await readWholeDisk(nodeIo, file), clean, 'after applying "clean install"');
  assertOk(fvd('snapshot', '-a', 'after', file));
  assertSameBytes(await readWholeDisk(nodeIo, file), expectAfter, 'after applying "after"');
  assertOk(fvd('snapshot', '-d', 'clean install', file));
  assert.equal(json<Array<{ name: string }>>(fvd('snapshot', '-l', '--json', file)).map((s) => s.name), ['after']);
  const chk = fvd('check', '--json', file);
  assert.is(chk.code, 0, chk.stdout);
  const report = JSON.parse(chk.stdout) as { snapshots: number; overcounts: number; undercounts: number; errors: string[] };
  assert.equal([report.snapshots, report.overcounts, report.undercounts, report.errors], [1, 0, 0, []]);
  assertOk(fvd('snapshot', '-d', 'after', file));
  assert.is(info(file).layout, 'compact');
  assert.is(json<Info & { snapshotCount: number }>(fvd('info', '--json', file)).snapshotCount, 0);
  assertSameBytes(await readWholeDisk(nodeIo, file), expectAfter, 'data after deleting every snapshot');
  // Not qemu's '-l' only: raw-like images say so in one line.
  const raw = path.join(dir, 'raw.fvd');
  assertOk(fvd('create', raw, '1M'));
  assertOneLineError(fvd('snapshot', '-c', 'x', raw), /need the compact layout; this image is raw-like/);
  assert.is(json<Info & { snapshotCount?: number }>(fvd('info', '--json', raw)).snapshotCount, undefined);
});

test('snapshot: a compact image over a base smaller than the disk (bitmap sized for the disk): create, apply, delete, check', async () => {
  const dir = caseDir();
  const base = rawFile(path.join(dir, 'b.raw'), patternBytes(MiB, 31));
  const file = path.join(dir, 's.fvd');
  assertOk(fvd('create', '--layout', 'compact', '--block-size', '4k', '-b', 'b.raw', '-F', 'raw', file, '256M'));
  const h = readHeader(file);
  assert.ok(h.bitmapLength > 4096, 'the bitmap covers the disk, more than the base needs');
  assertOk(fvd('io', '-c', 'write -P 0x31 2M 64k', '-c', 'write -P 0x32 8k 4k', file));
  assertOk(fvd('snapshot', '-c', 'one', file));
  assertOk(fvd('io', '-c', 'write -P 0x33 2M 64k', '-c', 'write -P 0x34 512k 4k', file));
  assert.is(fvd('check', file).code, 0);
  assertOk(fvd('snapshot', '-a', 'one', file));
  const expect = Buffer.alloc(256 * MiB);
  base.copy(expect);
  expect.fill(0x32, 8 * KiB, 12 * KiB).fill(0x31, 2 * MiB, 2 * MiB + 64 * KiB);
  assertSameBytes(await readWholeDisk(nodeIo, file), expect, 'after applying "one"');
  assertOk(fvd('check', file));
  assertOk(fvd('snapshot', '-d', 'one', file));
  assertOk(fvd('check', file));
  assertSameBytes(await readWholeDisk(nodeIo, file), expect, 'after deleting "one"');
});

// Reads and writes of the io command go in pieces: no buffer of the whole request (a length of
// 4 GiB or more was a RangeError). The image is sparse; nothing large is written.
test('io: requests over 4 GiB are served in pieces; a pattern mismatch past 4 GiB is reported at its offset', () => {
  const dir = caseDir();
  const img = path.join(dir, 'big.fvd');
  assertOk(fvd('create', img, '16G'));
  let r = fvd('io', '-r', '-c', 'read 0 5G', '-c', 'read -P 0 1G 5G', img);
  assertOk(r);
  assert.match(r.stdout, /^read 5368709120\/5368709120 bytes at offset 0$/m);
  assertOk(fvd('io', '-c', 'write -P 0x5c 4295032832 4k', img)); // 4 GiB + 64 KiB
  r = fvd('io', '-r', '-c', 'read -P 0 0 5G', img);
  assert.is(r.code, 1, r.stdout + r.stderr);
  assert.match(r.stdout, /^Pattern verification failed at offset 4295032832, 1073676288 bytes$/m);
  assertOk(fvd('io', '-c', 'zero 0 5G', '-c', 'read -P 0 4G 128k', img));
});

test('empty numeric options are usage errors, never the default', () => {
  const dir = caseDir();
  const src = path.join(dir, 'src.fvd');
  assertOk(fvd('create', src, '1M'));
  const x = path.join(dir, 'x.fvd');
  for (const [args, re] of [
    [['create', '--block-size', '', x, '1M'], /invalid block size ''/],
    [['create', '--layout', 'compact', '--chunk-size', '', x, '1M'], /invalid chunk size ''/],
    [['create', '--journal-size', '', x, '1M'], /invalid journal size ''/],
    [['create', x, ''], /invalid size ''|size is required/],
    [['convert', '-O', 'fvd', '--block-size', '', src, x], /invalid block size ''/],
    [['prefetch', '--max-rate', '', src], /invalid rate ''/],
    [['bench', '-s', '', src], /invalid buffer size/],
    [['bench', '-c', '', src], /invalid count/],
  ] as Array<[string[], RegExp]>) {
    assertOneLineError(fvd(...args), re);
    assert.not.ok(fs.existsSync(x), `${args.join(' ')} left a file behind`);
  }
});

test.after(() => tmp.cleanup());

test.run();
