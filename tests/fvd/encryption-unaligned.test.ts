/**
 * Unaligned writes and write-zeroes on encrypted images (docs/FORMAT.md §11.3): the partial edge
 * sectors are read, merged in plaintext and written whole (fvd/encrypted-requests.ts), serialized
 * with every other write by the sector gate (fvd/sector-gate.ts). Each case runs the same
 * operations on an encrypted image and on a plain one and compares both with a model, before and
 * after a reopen; concurrency cases use the completion-reordering MemIo.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { SectorGate } from '../../fvd/sector-gate.js';
import { MemIo } from '../helpers/mem-io.js';
import { Rng } from '../helpers/rng.js';
import { DiskModel, firstMismatch } from '../helpers/model.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const KEY = Buffer.from('unaligned writes key');
const FAST_KDF = { log2N: 10, r: 1, p: 1 };

type Op = { kind: 'write'; off: number; len: number; fill: number } | { kind: 'zero'; off: number; len: number };

/** Writes `len` bytes at `off`; fill ≥ 0: that byte, else distinct bytes derived from the offset. */
function payload(op: { off: number; len: number; fill: number }): Uint8Array {
  const b = new Uint8Array(op.len);
  if (op.fill >= 0) b.fill(op.fill);
  else for (let i = 0; i < op.len; i++) b[i] = ((op.off + i) * 7 + 13) & 0xff;
  return b;
}

interface Setup {
  io: MemIo;
  model: DiskModel;
  paths: string[];
  keys: Array<Uint8Array | undefined>;
}

const BS = 16 * KiB;
const CS = 64 * KiB;
const SIZE = MiB;

/** An encrypted and a plain image with the same geometry, optionally over the same raw base. */
async function setup(layout: 'raw' | 'compact', withBase: boolean, seed = 1): Promise<Setup> {
  const io = new MemIo({ rng: new Rng(seed) });
  const r = new Rng(seed + 100);
  let initial: Uint8Array | undefined;
  const opts: CreateOptions = { size: SIZE, layout, blockSize: BS, chunkSize: CS, journalSize: 64 * KiB };
  if (withBase) {
    initial = r.bytes(SIZE - 3 * BS); // the base ends before the disk does
    io.writeFile('/u/base.raw', initial);
    opts.base = 'base.raw';
    opts.baseFormat = 'raw';
  }
  await FvdImage.create(io, '/u/enc.fvd', { ...opts, encrypt: { key: KEY, kdf: FAST_KDF } });
  await FvdImage.create(io, '/u/plain.fvd', opts);
  const model = new DiskModel(SIZE, initial ? Buffer.concat([initial, new Uint8Array(SIZE - initial.length)]) : undefined);
  return { io, model, paths: ['/u/enc.fvd', '/u/plain.fvd'], keys: [KEY, undefined] };
}

async function readAll(img: FvdImage): Promise<Uint8Array> {
  const b = new Uint8Array(img.size);
  await img.read(b, 0);
  return b;
}

/** The image reads as the model; closed and reopened read-only, it still does. */
async function matchesModelThenReopened(s: Setup, img: FvdImage, what: string): Promise<void> {
  let d = firstMismatch(s.model.data, await readAll(img), 0);
  assert.not.ok(d, `${what}: ${d}`);
  await img.close();
  const again = await FvdImage.open(s.io, s.paths[0]!, { key: KEY, readOnly: true });
  d = firstMismatch(s.model.data, await readAll(again), 0);
  assert.not.ok(d, `${what} after reopen: ${d}`);
  await again.close();
}

async function apply(img: FvdImage, op: Op): Promise<void> {
  if (op.kind === 'write') await img.write(payload(op), op.off);
  else await img.writeZeroes(op.off, op.len);
}

function applyModel(model: DiskModel, op: Op): void {
  if (op.kind === 'write') model.write(payload(op), op.off);
  else model.zero(op.off, op.len);
}

const S = 512;
/** Edge cases: offsets relative to sectors, blocks (16 KiB) and chunks (64 KiB). */
const EDGE_OPS: Op[] = [
  { kind: 'write', off: 0, len: 1, fill: 0xab }, // first byte of a sector
  { kind: 'write', off: 3 * S + 200, len: 1, fill: 0xcd }, // middle of a sector
  { kind: 'write', off: 5 * S + 511, len: 1, fill: 0xef }, // last byte of a sector
  { kind: 'write', off: 7 * S + 300, len: 400, fill: -1 }, // spans two sectors
  { kind: 'write', off: 3, len: 1000, fill: 0xab }, // the CLI example: write -P 0xab 3 1000
  { kind: 'write', off: BS - 100, len: 200, fill: -1 }, // spans a block boundary
  { kind: 'write', off: 3 * BS + 7, len: 2 * BS, fill: -1 }, // two block boundaries, whole sectors between
  { kind: 'write', off: CS - 1, len: 2, fill: 0x5a }, // spans a chunk boundary by one byte each side
  { kind: 'write', off: 2 * CS - 3 * S - 5, len: CS + 6 * S + 17, fill: -1 }, // across a whole chunk
  { kind: 'write', off: SIZE - 1, len: 1, fill: 0x77 }, // last byte of the disk
  { kind: 'write', off: SIZE - 3 * BS - 10, len: 20, fill: -1 }, // across the base's end
  { kind: 'write', off: 3 * S + 200, len: 1, fill: 0x11 }, // again over a sector written before
  { kind: 'zero', off: 7 * S + 10, len: 5 }, // write-zeroes inside one sector
  { kind: 'zero', off: BS - 7, len: 14 }, // across a block boundary, two partial sectors
  { kind: 'zero', off: 4 * BS + 1, len: 3 * BS }, // whole blocks punched, partial edges merged
  { kind: 'zero', off: 2 * CS - 3 * S - 4, len: CS + 100 }, // a whole chunk unmapped, partial edges
  { kind: 'zero', off: 10 * BS + 3, len: 2 * S - 6 }, // partial, partial, nothing whole
];

for (const layout of ['raw', 'compact'] as const) {
  for (const withBase of [false, true]) {
    test(`unaligned writes and write-zeroes: ${layout}${withBase ? ' over a base (copy-on-write)' : ''}, same as a plain image, after reopen`, async () => {
      const s = await setup(layout, withBase);
      const imgs = await Promise.all(s.paths.map((p, i) => FvdImage.open(s.io, p, { key: s.keys[i] })));
      for (const op of EDGE_OPS) {
        applyModel(s.model, op);
        for (const img of imgs) await apply(img, op);
        for (const [i, img] of imgs.entries()) {
          const d = firstMismatch(s.model.data, await readAll(img), 0);
          assert.not.ok(d, `${s.paths[i]} after ${op.kind} ${op.off}+${op.len}: ${d}`);
        }
      }
      for (const img of imgs) await img.close();
      for (const [i, p] of s.paths.entries()) {
        const img = await FvdImage.open(s.io, p, { key: s.keys[i], readOnly: true });
        const d = firstMismatch(s.model.data, await readAll(img), 0);
        assert.not.ok(d, `${p} after reopen: ${d}`);
        await img.close();
      }
    });
  }
}

test('concurrent unaligned writes to bytes of the same sectors: none is lost (reordered completions)', async () => {
  for (let seed = 1; seed <= 12; seed++) {
    const layout = seed % 2 ? 'raw' : 'compact';
    const s = await setup(layout, seed % 3 === 0, seed);
    const img = await FvdImage.open(s.io, s.paths[0]!, { key: KEY, copyOnRead: seed % 4 === 0 });
    const r = new Rng(seed * 31);
    // Disjoint byte ranges inside a few sectors (two of them across a sector boundary), issued
    // together with whole-sector writes elsewhere in the same block.
    const ops: Op[] = [];
    const base = r.int(SIZE / BS) * BS;
    for (let i = 0; i < 24; i++) ops.push({ kind: 'write', off: base + S + i * 40, len: 40, fill: i + 1 });
    for (let i = 0; i < 4; i++) ops.push({ kind: 'write', off: base + 8 * S + i * S, len: S, fill: 0xa0 + i });
    ops.push({ kind: 'zero', off: base + 13 * S + 100, len: 50 });
    ops.push({ kind: 'write', off: base + 13 * S + 200, len: 50, fill: 0x99 });
    for (const op of ops) applyModel(s.model, op);
    await Promise.all(r.shuffle(ops.slice()).map((op) => apply(img, op)));
    await img.idle();
    await matchesModelThenReopened(s, img, `seed ${seed}`);
  }
});

test('an unaligned write racing a whole-sector write of the same sector: the sector is one of the two serial outcomes', async () => {
  for (let seed = 1; seed <= 16; seed++) {
    const s = await setup(seed % 2 ? 'raw' : 'compact', false, seed);
    const img = await FvdImage.open(s.io, s.paths[0]!, { key: KEY });
    const off = 40 * S;
    await img.write(new Uint8Array(S).fill(0x01), off); // the old content
    const whole = new Uint8Array(S).fill(0x02);
    const part = new Uint8Array(30).fill(0x03);
    const ps = [img.write(whole, off), img.write(part, off + 100)];
    await Promise.all(seed % 3 ? ps : ps.reverse());
    const got = new Uint8Array(S);
    await img.read(got, off);
    const wholeLast = whole;
    const partLast = whole.slice();
    partLast.set(part, 100);
    assert.ok(
      Buffer.from(got).equals(Buffer.from(wholeLast)) || Buffer.from(got).equals(Buffer.from(partLast)),
      `seed ${seed}: the sector mixes in old bytes: ${Buffer.from(got.subarray(0, 8)).toString('hex')}…${Buffer.from(got.subarray(96, 136)).toString('hex')}`,
    );
    await img.close();
  }
});

test('unaligned writes racing copy-on-read and prefetch of the same blocks: no stale base data comes back', async () => {
  for (let seed = 1; seed <= 10; seed++) {
    const s = await setup(seed % 2 ? 'raw' : 'compact', true, seed);
    const img = await FvdImage.open(s.io, s.paths[0]!, { key: KEY, copyOnRead: true });
    const r = new Rng(seed * 7);
    const b = r.int(10);
    const blockStart = b * BS;
    const ops: Op[] = [];
    for (let i = 0; i < 6; i++) ops.push({ kind: 'write', off: blockStart + r.int(BS - 600), len: r.range(1, 600), fill: 0x40 + i });
    // Overlapping writes are applied in submission order by the gate only when they do not
    // overlap; keep them disjoint so the model is exact.
    const disjoint: Op[] = [];
    for (const op of ops) if (!disjoint.some((o) => op.off < o.off + o.len && o.off < op.off + op.len)) disjoint.push(op);
    for (const op of disjoint) applyModel(s.model, op);
    const reads: Promise<void>[] = [];
    for (let i = 0; i < 3; i++) reads.push(img.read(new Uint8Array(BS), blockStart));
    const prefetch = img.prefetchBlocks(b, b + 1);
    await Promise.all([...disjoint.map((op) => apply(img, op)), ...reads, prefetch]);
    await img.idle();
    await img.prefetchBlocks(0, SIZE / BS - 1);
    await matchesModelThenReopened(s, img, `seed ${seed}`);
  }
});

test('sector gate: an RMW waits for plain writes in flight and holds back overlapping ones; others pass', async () => {
  const g = new SectorGate();
  assert.ok(g.tryEnter(0, 7)); // a plain write of sectors 0..7 in flight
  let locked = false;
  const lock = g.lock(3, 3).then(() => (locked = true));
  await new Promise((r) => setImmediate(r));
  assert.not.ok(locked, 'the RMW drains the plain write first');
  assert.not.ok(g.tryEnter(100, 100), 'no plain write enters while an RMW drains');
  g.leave();
  await lock;
  assert.ok(locked);
  assert.not.ok(g.tryEnter(2, 4), 'a plain write over the locked sector waits');
  assert.ok(g.tryEnter(4, 9), 'a plain write elsewhere passes');
  g.leave();
  let entered = false;
  const enter = g.enter(3, 3).then(() => (entered = true));
  let second = false;
  const lock2 = g.lock(3, 5).then(() => (second = true));
  await new Promise((r) => setImmediate(r));
  assert.not.ok(entered || second, 'overlapping writers wait for the unlock');
  g.unlock(3, 3);
  await enter;
  assert.ok(entered);
  g.leave();
  await lock2;
  assert.ok(second);
  g.unlock(3, 5);
  assert.ok(g.idle);
});

test.run();
