/**
 * The one mapping primitive (fvd/mapping.ts): hand-built layouts for every kind and the run
 * contract (one kind, one locality, contiguous in the file for STORED), then a real image reopened
 * after writes, whose runs must agree with `fvd map` (daemon/space.ts mapPath).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { BASE, ENGINE, PENDING, STORED, ZERO, directRoute, mapRun, newRun, storageLayout, type MappedRun, type MappingLayout } from '../../fvd/mapping.js';
import { storedHost } from '../helpers/stored-host.js';
import { CHUNK_EMPTY } from '../../fvd/format.js';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { mapPath } from '../../daemon/space.js';
import { TempDir, patternBytes } from '../helpers/cli.js';

const KiB = 1024;
const E = CHUNK_EMPTY;
const tmp = new TempDir('fvd-mapping-');
test.after(() => tmp.cleanup());

/** All runs of [offset, offset + length) as [kind, length, host (STORED) , local]. */
function runs(l: MappingLayout, offset: number, length: number): Array<[number, number, number, boolean]> {
  const out: Array<[number, number, number, boolean]> = [];
  const r = newRun();
  for (let pos = offset; pos < offset + length; ) {
    const got = mapRun(l, pos, offset + length - pos, r);
    assert.is(got, r, 'fills the caller-provided object');
    assert.ok(r.length > 0 && pos + r.length <= offset + length, `run length ${r.length} at ${pos}`);
    out.push([r.kind, r.length, r.kind === STORED ? r.host : -1, r.local]);
    pos += r.length;
  }
  return out;
}

function layout(over: Partial<MappingLayout>): MappingLayout {
  return { dataOffset: 1 * 1024 * KiB, blockSize: 4 * KiB, chunkSize: 16 * KiB, baseLimit: 0, baseBlocks: 0, bitmap: new Uint8Array(8), table: null, storageEnd: Infinity, settling: null, ...over };
}

test('raw-like, no base: one STORED run at data_offset + offset', () => {
  const l = layout({});
  assert.equal(runs(l, 5000, 100 * KiB), [[STORED, 100 * KiB, l.dataOffset + 5000, true]]);
});

test('compact: adjacent ids merge, a gap in ids or an unmapped chunk splits at the chunk boundary', () => {
  const D = 1024 * KiB;
  const cs = 16 * KiB;
  const l = layout({ table: new Uint32Array([3, 4, 9, E, E, 10]) });
  assert.equal(runs(l, 100, 6 * cs - 100), [
    [STORED, 2 * cs - 100, D + 3 * cs + 100, true],
    [STORED, cs, D + 9 * cs, true],
    [ZERO, 2 * cs, -1, true],
    [STORED, cs, D + 10 * cs, true],
  ]);
  // Starting mid-chunk and ending mid-chunk: host follows the offset inside the chunk.
  assert.equal(runs(l, cs + 10, 20), [[STORED, 20, D + 4 * cs + 10, true]]);
  // Id wrap-around: EMPTY is never "the next id" of 0xFFFFFFFE.
  const w = layout({ table: new Uint32Array([0xfffffffe, E]), storageEnd: Infinity });
  assert.equal(runs(w, 0, 2 * cs).map((r) => r[0]), [STORED, ZERO]);
});

test('compact after a crash: a chunk mapped past the end of storage reads ZERO (FORMAT.md §4.3)', () => {
  const D = 1024 * KiB;
  const cs = 16 * KiB;
  const table = new Uint32Array([0, 1, 2]);
  const l = layout({ table, storageEnd: D + 2 * cs });
  assert.equal(runs(l, 0, 3 * cs), [
    [STORED, 2 * cs, D, true],
    [ZERO, cs, -1, true],
  ]);
  // A partly written last chunk (starting inside the file) is storage.
  assert.equal(runs(layout({ table, storageEnd: D + 2 * cs + 1 }), 0, 3 * cs), [[STORED, 3 * cs, D, true]]);
});

test('bitmap: BASE below the base end, ZERO past it in the straddling block, local past the bitmap', () => {
  const bs = 4 * KiB;
  // Base of 2.5 blocks: blocks 0..2 have bits; block 1 is local.
  const bitmap = new Uint8Array([0b010]);
  const l = layout({ baseLimit: 2 * bs + 2048, baseBlocks: 3, bitmap });
  assert.equal(runs(l, 0, 5 * bs), [
    [BASE, bs, -1, false],
    [STORED, bs, l.dataOffset + bs, true],
    [BASE, 2048, -1, false],
    [ZERO, 2048, -1, false],
    [STORED, 2 * bs, l.dataOffset + 3 * bs, true],
  ]);
  // FULLY_LOCAL (baseBlocks 0): the bitmap is not looked at.
  assert.equal(runs({ ...l, baseBlocks: 0 }, 0, 5 * bs), [[STORED, 5 * bs, l.dataOffset, true]]);
});

test('compact over a base: an unmapped local chunk reads ZERO, locality splits a STORED run', () => {
  const bs = 4 * KiB;
  const cs = 16 * KiB;
  const D = 1024 * KiB;
  // Blocks 0..7 have bits (base of 2 chunks); blocks 0..5 local, 6..7 in the base.
  const l = layout({ baseLimit: 2 * cs, baseBlocks: 8, bitmap: new Uint8Array([0b00111111]), table: new Uint32Array([0, 1, E, 5]) });
  assert.equal(runs(l, 0, 4 * cs), [
    [STORED, cs + 2 * bs, D, true],
    [BASE, 2 * bs, -1, false],
    [ZERO, cs, -1, true],
    [STORED, cs, D + 5 * cs, true],
  ]);
});

test('settling chunks come back PENDING one at a time and cut the runs around them', () => {
  const cs = 16 * KiB;
  const D = 1024 * KiB;
  const l = layout({ table: new Uint32Array([0, 1, 2, E, E]), settling: (c) => c === 1 || c === 3 });
  assert.equal(runs(l, 0, 5 * cs), [
    [STORED, cs, D, true],
    [PENDING, cs, -1, true],
    [STORED, cs, D + 2 * cs, true],
    [PENDING, cs, -1, true],
    [ZERO, cs, -1, true],
  ]);
});

test('storageLayout: every block local, whatever the bitmap', () => {
  const l = storageLayout(4096, 4 * KiB, 16 * KiB, new Uint32Array([E, 7]));
  assert.equal(runs(l, 0, 32 * KiB), [
    [ZERO, 16 * KiB, -1, true],
    [STORED, 16 * KiB, 4096 + 7 * 16 * KiB, true],
  ]);
});

test('storedHost (directRoute STORED): the fast path only for whole STORED runs; bits journaled for writes; shared chunks', () => {
  const D = 1 << 20;
  const cs = 65536;
  const present = new Uint8Array([0b111]);
  const journaled = new Uint8Array([0b011]);
  const shared = new Uint8Array(4);
  const fullyLocal = new Int32Array(1);
  const v = { dataOffset: D, blockSize: 4096, chunkSize: cs, baseLimit: 4 * 4096, baseBlocks: 4, fullyLocal, present, journaled, table: new Uint32Array([5, 6, E, 9]), shared };
  assert.is(storedHost(v, 0, 8192, true), D + 5 * cs, 'journaled local blocks');
  assert.is(storedHost(v, 8192, 4096, false), D + 5 * cs + 8192, 'a read needs the bit only');
  assert.is(storedHost(v, 8192, 4096, true), -1, 'a write needs the bit journaled');
  assert.is(storedHost(v, 12288, 4096, false), -1, 'a base block');
  fullyLocal[0] = 1;
  assert.is(storedHost(v, 12288, 4096, true), D + 5 * cs + 12288, 'fully local: no bitmap work');
  assert.is(storedHost(v, cs - 4096, 8192, false), D + 5 * cs + cs - 4096, 'adjacent chunks');
  assert.is(storedHost(v, 2 * cs, 4096, false), -1, 'unmapped chunk');
  assert.is(storedHost(v, 3 * cs - 4096, 8192, false), -1, 'chunks not adjacent in storage');
  shared[1] = 1;
  assert.is(storedHost(v, cs - 4096, 8192, true), -1, 'a write into a chunk a snapshot shares');
  assert.is(storedHost(v, cs - 4096, 8192, false), D + 5 * cs + cs - 4096, 'reads of shared chunks stay direct');
});

test('directRoute: the kind of a whole request as a queue worker sees it (table)', () => {
  const D = 1 << 20;
  const bs = 4 * KiB;
  const cs = 16 * KiB;
  const names = ['STORED', 'BASE', 'ZERO', 'PENDING', 'ENGINE'];
  type Over = { baseLimit?: number; baseBlocks?: number; present?: number[]; journaled?: number[]; table?: number[]; fullyLocal?: boolean; shared?: number[] };
  const view = (o: Over) => ({
    dataOffset: D, blockSize: bs, chunkSize: cs, baseLimit: o.baseLimit ?? 0, baseBlocks: o.baseBlocks ?? 0,
    fullyLocal: new Int32Array([o.fullyLocal ? 1 : 0]), present: new Uint8Array(o.present ?? [0]), journaled: new Uint8Array(o.journaled ?? o.present ?? [0]),
    table: o.table ? new Uint32Array(o.table) : null, shared: o.shared ? new Uint8Array(o.shared) : null,
  });
  // Raw-like over a base of 2.5 blocks: blocks 0..2 have bits, block 1 is local.
  const raw: Over = { baseLimit: 2 * bs + 2048, baseBlocks: 3, present: [0b010] };
  // Compact over a base ending 2 KiB before the end of chunk 1: blocks 0..7 have bits, 0..5 local;
  // chunk 0 mapped (id 0), chunk 1 unmapped (its local blocks 4, 5 were zero-detected at create),
  // chunk 2 unmapped past the base, chunk 3 mapped (id 5).
  const compact: Over = { baseLimit: 2 * cs - 2048, baseBlocks: 8, present: [0b00111111], table: [0, E, E, 5] };
  const rows: Array<[string, Over, number, number, boolean, number, number?]> = [
    ['raw: a base block not yet local', raw, 0, bs, false, BASE],
    ['raw: a local block', raw, bs, bs, false, STORED, D + bs],
    ['raw: base bytes of the block straddling the base end', raw, 2 * bs, 2048, false, BASE],
    ['raw: bytes past the base end in that block, not local', raw, 2 * bs + 2048, 2048, false, ZERO],
    ['raw: the whole straddling block (BASE then ZERO)', raw, 2 * bs, bs, false, ENGINE],
    ['raw: base then local (mixed)', raw, 0, 2 * bs, false, ENGINE],
    ['raw: past the bitmap', raw, 3 * bs, bs, false, STORED, D + 3 * bs],
    ['raw: write to a journaled local block', raw, bs, bs, true, STORED, D + bs],
    ['raw: write to a base block (copy-on-write)', raw, 0, bs, true, ENGINE],
    ['raw: write to a present, not journaled block', { ...raw, journaled: [0] }, bs, bs, true, ENGINE],
    ['raw: write past the base end, not local', raw, 2 * bs + 2048, 2048, true, ENGINE],
    ['raw fully local: a block with a clear bit', { ...raw, fullyLocal: true }, 0, bs, false, STORED, D],
    ['raw fully local: write to it', { ...raw, fullyLocal: true }, 2 * bs + 2048, 2048, true, STORED, D + 2 * bs + 2048],
    ['compact: mapped local chunk', compact, 0, cs, false, STORED, D],
    ['compact: zero-detected blocks in an unmapped chunk', compact, cs, 2 * bs, false, ZERO],
    ['compact: base blocks in an unmapped chunk', compact, cs + 2 * bs, bs, false, BASE],
    ['compact: zero-detected then base (mixed)', compact, cs, cs, false, ENGINE],
    ['compact: past the base end, then an unmapped chunk: zeros as a whole', compact, 2 * cs - 2048, 2048 + cs, false, ZERO],
    ['compact: unmapped chunk past the base', compact, 2 * cs, cs, false, ZERO],
    ['compact: unmapped then mapped (mixed)', compact, 3 * cs - bs, 2 * bs, false, ENGINE],
    ['compact: write to an unmapped chunk (allocation)', compact, 2 * cs, bs, true, ENGINE],
    ['compact: write to a zero-detected block (allocation)', compact, cs, bs, true, ENGINE],
    ['compact: write to a mapped journaled chunk', compact, 3 * cs, bs, true, STORED, D + 5 * cs],
    ['compact: write to a chunk a snapshot shares', { ...compact, shared: [0, 0, 0, 1] }, 3 * cs, bs, true, ENGINE],
    ['compact fully local: base blocks of an unmapped chunk read zeros', { ...compact, fullyLocal: true }, cs, cs, false, ZERO],
    ['compact, no base: unmapped', { table: [0, E] }, cs, cs, false, ZERO],
    ['compact, no base: mapped', { table: [0, E] }, 0, cs, false, STORED, D],
  ];
  const out = newRun();
  for (const [name, over, off, len, write, kind, host] of rows) {
    // Encrypted images route the same (the worker decrypts STORED data; ZERO is plaintext zeros).
    for (const encrypted of [false, true]) {
      const v = { ...view(over), encrypted };
      const got = directRoute(v, off, len, write, out);
      assert.is(names[got], names[kind], name);
      if (kind !== ENGINE) assert.is(out.length, len, `${name}: covers the request`);
      if (kind === STORED) assert.is(out.host, host, `${name}: host`);
      assert.is(storedHost(v, off, len, write), kind === STORED ? host : -1, `${name}: storedHost`);
    }
  }
});

test('a reopened image after writes: the runs agree with fvd map', async () => {
  const dir = tmp.caseDir();
  const basePath = path.join(dir, 'base.raw');
  // A base shorter than the disk, not a whole number of blocks; zero regions detected at create.
  const baseSize = 300 * KiB + 512;
  const base = patternBytes(baseSize, 7);
  base.fill(0, 64 * KiB, 128 * KiB);
  fs.writeFileSync(basePath, base);
  for (const layoutName of ['compact', 'raw'] as const) {
    const file = path.join(dir, `${layoutName}.fvd`);
    await FvdImage.create(nodeIo, file, { base: 'base.raw', baseFormat: 'raw', size: 1024 * KiB, layout: layoutName, blockSize: 16 * KiB, chunkSize: 64 * KiB });
    let img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
    // Out of order, so compact storage ids are not in virtual order; across a chunk boundary.
    await img.write(patternBytes(48 * KiB, 1), 600 * KiB);
    await img.write(patternBytes(32 * KiB, 2), 16 * KiB);
    await img.write(patternBytes(16 * KiB, 3), 256 * KiB);
    await img.write(patternBytes(80 * KiB, 4), 176 * KiB);
    await img.close();
    img = await FvdImage.open(nodeIo, file, { readOnly: true });
    const { header, table, present, baseBlocks } = img.inspect();
    const fullyLocal = img.stats().fullyLocal;
    await img.close();
    const l: MappingLayout = {
      dataOffset: header.dataOffset, blockSize: header.blockSize, chunkSize: header.chunkSize,
      baseLimit: Math.min(header.baseSize, header.virtualSize), baseBlocks: fullyLocal ? 0 : baseBlocks,
      bitmap: present, table, storageEnd: fs.statSync(file).size, settling: null,
    };
    const { map } = await mapPath(file, 'fvd');
    const r: MappedRun = newRun();
    const kinds = new Set<number>();
    for (const e of map) {
      for (let pos = e.start; pos < e.start + e.length; ) {
        mapRun(l, pos, e.start + e.length - pos, r);
        kinds.add(r.kind);
        const where = `${layoutName} @${pos} (map ${JSON.stringify(e)})`;
        if (e.depth === 0 && e.data) assert.ok(r.kind === STORED && r.host === e.offset! + (pos - e.start), where);
        else if (e.depth === 0) assert.ok(r.local && (r.kind === ZERO || r.kind === STORED), where);
        else assert.ok(!r.local && (r.kind === BASE || r.kind === ZERO), where);
        pos += r.length;
      }
    }
    assert.ok(kinds.has(STORED) && kinds.has(BASE), `${layoutName}: stored and base runs seen`);
    if (layoutName === 'compact') assert.ok(kinds.has(ZERO), 'compact: unmapped chunks seen');
  }
});

test.run();
