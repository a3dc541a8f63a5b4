/**
 * `fvd check --repair` over a damaged refcount table (FORMAT.md §10.8): refcounts are derivable
 * from the snapshot tables, so check reports the damage as an error (exit 2, image unchanged),
 * other commands refuse the image with a hint, and --repair rebuilds the table (exit 3); after a
 * reopen check is clean, the counts are the true ones, and every snapshot still applies with its
 * content. A damaged saved table on top stays a hard error (not derivable). Power cuts during the
 * repair leave an image that is either still damaged-but-repairable or repaired.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { checkImage } from '../../fvd/check.js';
import { decodeHeader } from '../../fvd/format.js';
import { nodeIo } from '../../storage/node-file.js';
import type { IoBackend } from '../../fvd/io.js';
import { MemIo } from '../helpers/mem-io.js';
import { CrashIo } from '../helpers/crash-io.js';
import { Rng } from '../helpers/rng.js';
import { TempDir, assertOk, assertOneLineError, assertUnchanged, fvd, patternBytes, snapshot, assertNoCrash } from '../helpers/cli.js';
import { flipByte, readDirectory, readHeader, readRefcounts, rewriteRefcounts, writeBytes } from '../helpers/tamper.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const CS = 64 * KiB;

interface Made {
  /** Disk content per snapshot name, and 'active'. */
  contents: Map<string, Buffer>;
}

/** A 1 MiB compact image (64 KiB chunks) with three snapshots over partly shared data. */
async function makeSnapImage(io: IoBackend, file: string): Promise<Made> {
  await FvdImage.create(io, file, { size: MiB, layout: 'compact', chunkSize: CS, blockSize: 4 * KiB, journalSize: 16 * KiB });
  const img = await FvdImage.open(io, file);
  const contents = new Map<string, Buffer>();
  const disk = Buffer.alloc(MiB);
  const write = async (data: Buffer, off: number) => {
    await img.write(data, off);
    data.copy(disk, off);
  };
  try {
    await write(patternBytes(3 * CS, 81), 0);
    await img.snapshots.create('a');
    contents.set('a', Buffer.from(disk));
    await write(patternBytes(CS, 82), 5 * CS);
    await write(patternBytes(CS / 2, 83), CS / 2);
    await img.snapshots.create('b');
    contents.set('b', Buffer.from(disk));
    await write(patternBytes(2 * CS, 84), 8 * CS);
    await img.snapshots.create('c');
    contents.set('c', Buffer.from(disk));
    await write(patternBytes(CS, 85), CS);
    contents.set('active', Buffer.from(disk));
  } finally {
    await img.close();
  }
  return { contents };
}

async function readDisk(io: IoBackend, file: string): Promise<Buffer> {
  const img = await FvdImage.open(io, file, { readOnly: true });
  try {
    const b = Buffer.alloc(img.size);
    await img.read(b, 0);
    return b;
  } finally {
    await img.close();
  }
}

/** On `io` (which it changes): the active disk, then every snapshot applied in turn, read right. */
async function verifyContents(io: IoBackend, file: string, made: Made, what: string): Promise<void> {
  assert.ok((await readDisk(io, file)).equals(made.contents.get('active')!), `${what}: active disk`);
  for (const name of ['a', 'b', 'c']) {
    const img = await FvdImage.open(io, file);
    try {
      await img.snapshots.revert(name);
      const b = Buffer.alloc(img.size);
      await img.read(b, 0);
      assert.ok(b.equals(made.contents.get(name)!), `${what}: snapshot '${name}' content`);
    } finally {
      await img.close();
    }
  }
}

const tmp = new TempDir('fvd-snap-repair-');
test.after(() => tmp.cleanup());

type Tamper = [string, RegExp, (file: string) => void];
const TAMPERS: Tamper[] = [
  ['a flipped byte (checksum)', /refcount table: checksum mismatch/, (f) => flipByte(f, readHeader(f).refcountOffset + 17)],
  ['garbage over the magic', /refcount table: bad magic/, (f) => writeBytes(f, readHeader(f).refcountOffset, Buffer.from('JUNK'))],
  ['a valid table that counts a metadata chunk', /holds snapshot metadata but has a refcount/, (f) => {
    const dirChunk = (readHeader(f).snapshotsOffset - readHeader(f).dataOffset) / CS;
    rewriteRefcounts(f, (c) => {
      while (c.length <= dirChunk) c.push(0);
      c[dirChunk] = 1;
    });
  }],
  ['a valid table that counts a chunk past the end', /storage chunk 200 is referenced but lies beyond the end/, (f) => {
    rewriteRefcounts(f, (c) => {
      while (c.length <= 200) c.push(0);
      c[200] = 3;
    });
  }],
];

for (const [name, problem, tamper] of TAMPERS) {
  test(`damaged refcount table (${name}): check → exit 2, others refuse with a hint, --repair rebuilds it, snapshots intact`, async () => {
    const dir = tmp.caseDir();
    const file = path.join(dir, 's.fvd');
    const made = await makeSnapImage(nodeIo, file);
    const good = readRefcounts(file);
    tamper(file);
    const before = snapshot([file]);
    const c = fvd('check', file);
    assertNoCrash(c);
    assert.is(c.code, 2, c.stdout + c.stderr);
    assert.match(c.stdout, problem);
    assert.match(c.stdout, /--repair rebuilds it from the snapshot tables/);
    assert.match(c.stdout, /1 error\(s\) found; the image is corrupt/);
    const j = JSON.parse(fvd('check', '--json', file).stdout) as { errors: string[]; repaired: boolean };
    assert.is(j.errors.length, 1);
    assert.is(j.repaired, false);
    for (const args of [['io', '-c', 'read 0 4k', file], ['snapshot', '-a', 'a', file], ['info', file]]) {
      const line = assertOneLineError(fvd(...args), problem);
      assert.match(line, /repairable: 'fvd check --repair'/);
    }
    assertUnchanged(before, 'check and refused commands over a damaged refcount table');
    const fix = fvd('check', '--repair', file);
    assert.is(fix.code, 3, fix.stdout + fix.stderr);
    assert.match(fix.stdout, /rebuilt the refcount table from the snapshot tables/);
    assert.match(fix.stdout, /repaired/);
    const again = fvd('check', file);
    assert.is(again.code, 0, again.stdout + again.stderr);
    const counts = readRefcounts(file);
    while (good.length < counts.length) good.push(0);
    while (counts.length < good.length) counts.push(0);
    assert.equal(counts, good, 'the rebuilt counts are the ones snapshot create wrote');
    await verifyContents(nodeIo, file, made, name);
    assertOk(fvd('check', file));
  });
}

// A zeroed table is well-formed (checksum right, nothing on a metadata chunk): not "damaged" but
// one undercount per shared chunk. Snapshot 'a' alone maps storage chunk 0 (the active table moved
// off it by copy-on-write), so the stored counts call chunk 0 free: a repair that allocated by
// them wrote its new refcount table over 'a''s data, and the image then checked as corrupt.
for (const [name, zero] of [
  ['entries = 0', (c: number[]) => (c.length = 0)],
  ['every count 0', (c: number[]) => c.fill(0)],
] as Array<[string, (c: number[]) => void]>) {
  test(`zeroed refcount table (${name}): --repair allocates by the true counts, snapshots intact, image usable`, async () => {
    const dir = tmp.caseDir();
    const file = path.join(dir, 's.fvd');
    const made = await makeSnapImage(nodeIo, file);
    const good = readRefcounts(file);
    const img = await FvdImage.open(nodeIo, file, { readOnly: true });
    const table0 = img.inspect().table![0];
    await img.close();
    assert.ok(good[0]! > 0 && table0 !== 0, 'premise: storage chunk 0 is mapped by a snapshot only');
    const leaks = (await checkImage(nodeIo, file)).leaks;
    rewriteRefcounts(file, zero);
    const c = fvd('check', file);
    assertNoCrash(c);
    assert.is(c.code, 2, c.stdout + c.stderr);
    assert.match(c.stdout, /chunk 0: refcount 0, referenced 1/);
    const found = await checkImage(nodeIo, file);
    assert.is(found.leaks, leaks, 'storage a snapshot maps is not reported as unreferenced');
    const fix = fvd('check', '--repair', file);
    assert.is(fix.code, 3, fix.stdout + fix.stderr);
    assert.match(fix.stdout, /rewrote the refcount table/);
    assertOk(fvd('check', file));
    const counts = readRefcounts(file);
    while (good.length < counts.length) good.push(0);
    while (counts.length < good.length) counts.push(0);
    assert.equal(counts, good, 'the repaired counts are the ones snapshot create wrote');
    const meta = [readHeader(file).refcountOffset, readHeader(file).snapshotsOffset].map((o) => (o - readHeader(file).dataOffset) / CS);
    assert.not.ok(meta.some((id) => good[id]), `metadata chunks ${meta} are mapped by no snapshot`);
    // check's contract: an image it repaired reads, writes, snapshots and checks clean. The writes
    // land on chunks shared with 'a', 'b' and 'c' (copy-on-write by the true counts).
    assertOk(fvd('io', '-c', 'write -P 0x5a 64k 128k', file));
    assertOk(fvd('snapshot', '-c', 'd', file));
    assertOk(fvd('io', '-c', 'write -P 0x33 0 192k', file));
    assertOk(fvd('check', file));
    const active = made.contents.get('active')!;
    active.fill(0x5a, 64 * KiB, 192 * KiB);
    active.fill(0x33, 0, 192 * KiB);
    await verifyContents(nodeIo, file, made, name);
    assertOk(fvd('check', file));
  });
}

test('damaged refcount table and a damaged saved table: not repairable (exit 2, unchanged, says why)', async () => {
  const file = path.join(tmp.caseDir(), 's.fvd');
  await makeSnapImage(nodeIo, file);
  flipByte(file, readHeader(file).refcountOffset + 17);
  const b = readDirectory(file).entries.find((e) => e.name === 'b')!;
  flipByte(file, b.stateOffset + 4);
  const before = snapshot([file]);
  for (const args of [['check', file], ['check', '--repair', file]]) {
    const r = fvd(...args);
    assertNoCrash(r);
    assert.is(r.code, 2, `${r.cmd}\n${r.stdout}${r.stderr}`);
    assert.match(r.stdout, /refcount table: checksum mismatch, and it cannot be rebuilt: snapshot 'b': saved table\/bitmap checksum mismatch/);
  }
  assertUnchanged(before, 'check over a refcount table that cannot be rebuilt');
});

test('power cut during check --repair of a damaged refcount table: damaged-but-repairable or repaired, never worse', async () => {
  let points = 0;
  for (const seed of [1, 2]) {
    const mem = new MemIo({ rng: new Rng(seed) });
    const p = '/r/s.fvd';
    const made = await makeSnapImage(mem, p);
    const bytes = mem.readFile(p).slice();
    const h = decodeHeader(p, bytes.subarray(0, 512), bytes.length);
    bytes[h.refcountOffset + 17]! ^= 0x40;
    mem.writeFile(p, bytes);
    const cio = new CrashIo(mem);
    cio.startRecording();
    const first = cio.seq;
    const r = await checkImage(cio, p, { repair: true });
    assert.ok(r.repaired && r.errors.length === 0, JSON.stringify(r));
    const end = cio.seq;
    for (let k = first; k <= end; k++) {
      const io = cio.rebuild(k, new Rng(seed * 7919 + k)).io;
      const what = `seed ${seed} k=${k} of ${end}`;
      const found = await checkImage(io, p);
      const damaged = found.errors.length === 1 && /refcount table: checksum mismatch/.test(found.errors[0]!);
      assert.ok(damaged || found.errors.length === 0, `${what}: ${found.errors.join('; ')}`);
      if (k === end) assert.not.ok(damaged, `${what}: repair returned, the table must be rebuilt`);
      const fixed = await checkImage(io, p, { repair: true });
      assert.equal(fixed.errors, [], `${what}: repair after the crash`);
      const clean = await checkImage(io, p);
      assert.equal(clean.errors, [], `${what}: clean after repair`);
      assert.is(clean.overcounts + clean.undercounts, 0, `${what}: counts right`);
      await verifyContents(io, p, made, what);
      points++;
    }
  }
  assert.ok(points > 10, `crash points: ${points}`);
});


// Found by the image fuzzer (FUZZ_SEED=2904838557, mutant 75): a leaked count at the largest value
// a refcount holds. check calls an overcount a leak (exit 0), so snapshot -c must succeed too: with
// fewer than 65535 snapshots such a count cannot be true, and create recounts instead of refusing.
test('a leaked refcount at 65535 on a chunk the active disk maps: check is clean, snapshot -c succeeds and writes the true counts', async () => {
  const file = path.join(tmp.caseDir(), 's.fvd');
  const made = await makeSnapImage(nodeIo, file);
  const good = readRefcounts(file);
  // A storage chunk the active disk maps (fvd map's offsets) that snapshots share too.
  const extents = JSON.parse(fvd('map', '--output=json', file).stdout) as Array<{ data: boolean; offset?: number }>;
  const dataOffset = readHeader(file).dataOffset;
  const mapped = extents.filter((e) => e.data && e.offset !== undefined).map((e) => (e.offset! - dataOffset) / CS);
  const id = mapped.find((i) => (good[i] ?? 0) >= 2)!;
  assert.ok(id !== undefined, `a shared chunk the active disk maps: ${mapped.join(',')} / ${good.join(',')}`);
  rewriteRefcounts(file, (c) => (c[id] = 65535));
  const c = fvd('check', '--json', file);
  assert.is(c.code, 0, c.stdout + c.stderr);
  assert.is((JSON.parse(c.stdout) as { overcounts: number }).overcounts, 1);
  assertOk(fvd('snapshot', '-c', 'd', file));
  const counts = readRefcounts(file);
  assert.is(counts[id], good[id]! + 1, `chunk ${id}: its true count plus snapshot d`);
  const after = JSON.parse(fvd('check', '--json', file).stdout) as { overcounts: number; errors: string[] };
  assert.equal([after.overcounts, after.errors.length], [0, 0], 'the leak went with the recount');
  made.contents.set('d', made.contents.get('active')!);
  await verifyContents(nodeIo, file, made, 'after the recount');
  const img = await FvdImage.open(nodeIo, file);
  try {
    await img.snapshots.revert('d');
  } finally {
    await img.close();
  }
  assert.ok((await readDisk(nodeIo, file)).equals(made.contents.get('active')!), 'snapshot d is the active disk');
});

test.run();
