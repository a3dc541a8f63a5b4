/**
 * F1: queue threads answer reads of blocks still in a plain local raw base themselves (from the
 * base file, on their ring) and hint copy-on-read to the engine (daemon/cor-hints.ts).
 *
 * The worker is simulated against a real engine: `workerRead` routes through the shared view
 * exactly as daemon/fvd-queue.ts does (directRoute), reads STORED bytes from the image file and
 * BASE bytes from the base file (zeros past the base's end), and falls back to the engine for
 * ENGINE. Its answers are compared with a model of the disk while the engine copies hinted
 * blocks in background and guest writes land, including a write racing reads of its block.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CorHintConsumer, CorHintProducer, NO_SLOT, corSlotPoolBytes, createCorHints, slotsPerQueue } from '../../daemon/cor-hints.js';
import type { BlockLocks } from '../../fvd/block-locks.js';
import { FvdImage } from '../../fvd/image.js';
import { BASE, STORED, ZERO, directRoute, newRun, type SharedView } from '../../fvd/mapping.js';
import { nodeIo } from '../../storage/node-file.js';

const KiB = 1024;

test('hints: coalesced while pending, dropped past the cap, again after release; one wake per drain', () => {
  const bs = 64 * KiB;
  const s = createCorHints(3 * bs, bs, 100, 2);
  const q0 = new CorHintProducer(s, 0);
  const q1 = new CorHintProducer(s, 1);
  const main = new CorHintConsumer(s);
  assert.ok(q0.offer(0, 4096), 'the first hint wakes the main thread');
  assert.not.ok(q0.offer(bs, 4096), 'a second push before the drain does not post again');
  assert.not.ok(q1.offer(100, 4096), 'block 0 again, from another queue: coalesced');
  assert.is(q1.coalesced, 1);
  assert.not.ok(q1.offer(2 * bs, 2 * bs), 'block 2 fits the cap, block 3 does not; the flag is still up');
  assert.is(q1.dropped, 1, 'block 3 dropped at the cap');
  assert.is(main.outstanding(), 3 * bs);
  const got: number[] = [];
  assert.is(main.drain((b) => got.push(b)), 3);
  assert.equal(got.sort(), [0, 1, 2]);
  assert.not.ok(q0.offer(0, 4096), 'still pending (not released): coalesced, nothing pushed');
  main.release(0);
  assert.ok(q0.offer(0, 4096), 'released: hinted again, and the drained flag lets it post');
  assert.ok(!q0.offer(99 * bs, 2 * bs), 'the cap is full again (blocks 0, 1, 2 outstanding)');
  assert.is(q0.dropped, 1, 'block 99 dropped; block 100 is past the base: not hinted');
  got.length = 0;
  main.drain((b) => got.push(b));
  assert.equal(got, [0]);
  for (const b of [0, 1, 2]) main.release(b);
  assert.is(main.outstanding(), 0);
});

test('hints: a read of many blocks goes as runs, one ring entry per run of newly claimed blocks', () => {
  const bs = 4 * KiB;
  const s = createCorHints(40 * bs, bs, 1000, 1);
  const q = new CorHintProducer(s, 0);
  const main = new CorHintConsumer(s);
  const got: [number, number, number][] = [];
  assert.ok(q.offer(64 * bs, 32 * bs), 'a 128 KiB read of 4 KiB blocks');
  assert.is(main.drain((b, slot, count) => got.push([b, slot, count])), 1, 'one entry, not 32');
  assert.equal(got, [[64, NO_SLOT, 32]]);
  assert.is(main.outstanding(), 32 * bs, 'every block of the run counts against the cap');
  // Blocks 101 and 104..105 already hinted (pending): the read of 100..107 splits around them.
  main.releaseRun(64, 32);
  q.offer(101 * bs, bs);
  q.offer(104 * bs, 2 * bs);
  got.length = 0;
  main.drain((b, slot, count) => got.push([b, slot, count]));
  assert.equal(got, [[101, NO_SLOT, 1], [104, NO_SLOT, 2]]);
  q.offer(100 * bs + 512, 8 * bs - 1024);
  got.length = 0;
  main.drain((b, slot, count) => got.push([b, slot, count]));
  assert.equal(got, [[100, NO_SLOT, 1], [102, NO_SLOT, 2], [106, NO_SLOT, 2]]);
  assert.is(main.outstanding(), 8 * bs);
  // The cap cuts a run short: 32 more blocks offered, 32 fit (40 - 8).
  q.offer(200 * bs, 40 * bs);
  got.length = 0;
  main.drain((b, slot, count) => got.push([b, slot, count]));
  assert.equal(got, [[200, NO_SLOT, 32]]);
  assert.is(q.dropped, 8);
  // The base ends at block 999: a run offered across the end stops there.
  main.releaseRun(200, 32);
  q.offer(995 * bs, 10 * bs);
  got.length = 0;
  main.drain((b, slot, count) => got.push([b, slot, count]));
  assert.equal(got, [[995, NO_SLOT, 5]]);
  for (const [b, , n] of [[100, 0, 8], [995, 0, 5]] as const) main.releaseRun(b, n);
  assert.is(main.outstanding(), 0);
});

test('hints: the rings never overflow while the main thread releases inside the drain', () => {
  const bs = 4 * KiB;
  const s = createCorHints(8 * bs, bs, 1 << 16, 1);
  const q = new CorHintProducer(s, 0);
  const main = new CorHintConsumer(s);
  const seen = new Set<number>();
  let next = 0;
  for (let round = 0; round < 200; round++) {
    for (let i = 0; i < 20; i++) q.offer(((next++ * 7919) % (1 << 16)) * bs, bs);
    main.drain((b) => {
      assert.not.ok(seen.has(b), `block ${b} delivered once`);
      seen.add(b);
      // Release some at once (found local), others later: the ring must still hold every pushed block.
      if (b % 2 === 0) main.release(b), seen.delete(b);
    });
    for (const b of [...seen]) if (round % 3 === 0) main.release(b), seen.delete(b);
    assert.ok(main.outstanding() <= 8 * bs);
  }
  assert.ok(q.dropped > 0 && q.offered > q.dropped);
});

test('data slots: per-queue ranges, BUSY until the main thread frees them, (block, slot) pairs through the ring', () => {
  const bs = 64 * KiB;
  assert.is(slotsPerQueue(3 * bs, bs), 4, 'no more slots than hints can be outstanding (+1)');
  assert.is(slotsPerQueue(1 << 30, bs), 256, 'at most 256 per queue');
  assert.is(slotsPerQueue(1 << 30, 512 * KiB), 0, 'none for blocks above 256 KiB');
  assert.is(corSlotPoolBytes(1 << 30, bs, 2), 2 * 256 * bs);
  const cap = 3 * bs;
  const len = corSlotPoolBytes(cap, bs, 2);
  const pool = new Uint8Array(len);
  const s = createCorHints(cap, bs, 100, 2, { address: 0x10000000, length: len });
  assert.throws(() => new CorHintConsumer(s), /slot pool/, 'a consumer of carried hints needs the pool');
  const q0 = new CorHintProducer(s, 0);
  const q1 = new CorHintProducer(s, 1);
  const main = new CorHintConsumer(s, pool);
  assert.ok(q0.carriesData);
  const taken0 = [q0.takeSlot(), q0.takeSlot(), q0.takeSlot(), q0.takeSlot()];
  assert.equal(taken0, [0, 1, 2, 3], "queue 0's own slots");
  assert.is(q0.takeSlot(), -1, "queue 0's slots are all BUSY: none left (never another queue's)");
  assert.is(q1.takeSlot(), 4, "queue 1's range starts after queue 0's");
  assert.is(q1.slotAddress(4), 0x10000000 + 4 * bs);
  assert.is(main.busySlots(), 5);
  q0.giveBack(2);
  assert.is(q0.takeSlot(), 2, 'a slot given back (read did not complete) is taken again');
  // Queue 1 fills its slot and pushes block 7 with it; queue 0 pushes block 8 without data.
  pool.fill(0xab, q1.slotOffset(4), q1.slotOffset(4) + bs);
  assert.ok(q1.claim(7));
  assert.not.ok(q0.claim(7), 'claimed by queue 1: coalesced');
  assert.ok(q1.push(7, 4), 'the first push wakes the main thread');
  assert.ok(q0.claim(8));
  assert.not.ok(q0.push(8, NO_SLOT), 'flag still up: no second message');
  assert.is(q1.carried, 1);
  const got: [number, number][] = [];
  main.drain((b, slot) => got.push([b, slot]));
  assert.equal(got.sort((a, b) => a[0] - b[0]), [[7, 4], [8, NO_SLOT]]);
  assert.ok(main.slotData(4).every((x) => x === 0xab) && main.slotData(4).length === bs, "the main thread sees the slot's data");
  assert.is(q1.takeSlot(), 5, 'slot 4 stays BUSY until the main thread frees it');
  main.release(7);
  main.freeSlot(4);
  assert.is(q1.takeSlot(), 4, 'freed by the main thread: reusable by its queue, the lowest free first');
  assert.is(q1.takeSlot(), 6);
  assert.is(q1.takeSlot(), 7);
  assert.is(q1.takeSlot(), -1);
  assert.is(q1.noSlot, 1, 'the miss is counted');
  main.release(8);
  assert.is(main.outstanding(), 0);
  // Without a pool: nothing carries data.
  const plain = createCorHints(cap, bs, 100, 1);
  const p = new CorHintProducer(plain, 0);
  assert.not.ok(p.carriesData);
  assert.is(p.takeSlot(), -1);
});

test('data slots: with the default cap (16 MiB of 64 KiB blocks), every hint the cap admits can carry data while the engine lags', () => {
  // The guest's 4K random reads hint a new block each; the engine's copies take milliseconds, so
  // hundreds stay outstanding. With 32 slots per queue only about a third carried their data.
  const bs = 64 * KiB;
  const cap = 16 << 20;
  const len = corSlotPoolBytes(cap, bs, 1);
  const s = createCorHints(cap, bs, 4096, 1, { address: 0, length: len });
  const q = new CorHintProducer(s, 0);
  const main = new CorHintConsumer(s, new Uint8Array(len));
  let b = 0;
  while (q.claim(b)) {
    const slot = q.takeSlot();
    assert.ok(slot >= 0, `hint ${b} (${b + 1} outstanding, none copied yet) finds a free slot`);
    q.push(b++, slot);
  }
  assert.is(b, cap / bs, 'the cap admitted its whole count of blocks');
  assert.is(q.carried, b);
  assert.is(q.noSlot, 0);
  const held: [number, number][] = [];
  main.drain((blk, slot) => held.push([blk, slot]));
  for (const [blk, slot] of held) {
    main.release(blk);
    main.freeSlot(slot);
  }
  assert.is(main.busySlots(), 0);
});

// --- a simulated queue worker against a real engine ---------------------------------------

interface Fixture {
  dir: string;
  img: FvdImage;
  view: SharedView;
  imageFd: number;
  baseFd: number;
  model: Uint8Array;
  hints: { q: CorHintProducer; main: CorHintConsumer } | null;
  /** The data-slot pool (the worker's and the main thread's view alike here), or null. */
  pool: Uint8Array | null;
  copies: Promise<void>[];
}

async function fixture(layout: 'raw' | 'compact', baseSize: number, size: number, copyOnRead: boolean, capBytes = 1 << 20, carry = true, blockSize = 16 * KiB): Promise<Fixture> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-baseread-'));
  const base = new Uint8Array(baseSize);
  for (let i = 0; i < baseSize; i++) base[i] = (i * 31 + (i >> 12)) & 0xff || 1;
  fs.writeFileSync(path.join(dir, 'b.raw'), base);
  await FvdImage.create(nodeIo, path.join(dir, 'i.fvd'), { base: 'b.raw', baseFormat: 'raw', blockSize, size, layout });
  const img = await FvdImage.open(nodeIo, path.join(dir, 'i.fvd'), { copyOnRead });
  const model = new Uint8Array(size);
  model.set(base);
  const basePath = img.localRawBasePath();
  assert.is(basePath, path.join(dir, 'b.raw'), 'a plain local raw base is read by the queue threads');
  const view = img.sharedView();
  const poolBytes = copyOnRead && carry ? corSlotPoolBytes(capBytes, view.blockSize, 1) : 0;
  const pool = poolBytes > 0 ? new Uint8Array(poolBytes) : null;
  const s = copyOnRead ? createCorHints(capBytes, view.blockSize, view.baseBlocks, 1, pool && { address: 0, length: pool.length }) : null;
  return {
    dir, img, view, model,
    imageFd: fs.openSync(path.join(dir, 'i.fvd'), 'r'),
    baseFd: fs.openSync(basePath!, 'r'),
    hints: s ? { q: new CorHintProducer(s, 0), main: new CorHintConsumer(s, pool) } : null,
    pool,
    copies: [],
  };
}

/** Waits for the fixture's copies and closes its files and image, keeping its directory. */
async function closeFixture(f: Fixture): Promise<void> {
  await Promise.all(f.copies);
  fs.closeSync(f.imageFd);
  fs.closeSync(f.baseFd);
  await f.img.close();
}

async function done(f: Fixture): Promise<void> {
  await closeFixture(f);
  fs.rmSync(f.dir, { recursive: true });
}

/** The fixture closed and its image opened again without copy-on-read: what a restart reads. */
async function reopen(f: Fixture): Promise<FvdImage> {
  await closeFixture(f);
  return FvdImage.open(nodeIo, path.join(f.dir, 'i.fvd'), { copyOnRead: false });
}

/** The worker's answer to a guest read, as daemon/fvd-queue.ts gives it; returns the route too. */
async function workerRead(f: Fixture, buf: Uint8Array, offset: number): Promise<number> {
  const run = newRun();
  const kind = directRoute(f.view, offset, buf.length, false, run);
  if (kind === STORED) fs.readSync(f.imageFd, buf, 0, buf.length, run.host);
  else if (kind === ZERO) buf.fill(0);
  else if (kind === BASE) {
    buf.fill(0, run.length);
    const bs = f.view.blockSize;
    const b = Math.floor(offset / bs);
    // As readBase: a read inside one block this queue newly hints reads the whole block into a slot.
    if (f.hints && f.pool && Math.floor((offset + run.length - 1) / bs) === b && f.hints.q.claim(b)) {
      const slot = f.hints.q.takeSlot();
      if (slot >= 0) {
        const at = f.hints.q.slotOffset(slot);
        const baseLen = Math.min(bs, f.view.baseLimit - b * bs);
        assert.is(fs.readSync(f.baseFd, f.pool, at, baseLen, b * bs), baseLen);
        f.pool.fill(0, at + baseLen, at + bs);
        buf.set(f.pool.subarray(at + offset - b * bs, at + offset - b * bs + run.length));
      } else {
        assert.is(fs.readSync(f.baseFd, buf, 0, run.length, offset), run.length);
      }
      if (f.hints.q.push(b, slot)) drainHints(f);
      return kind;
    }
    assert.is(fs.readSync(f.baseFd, buf, 0, run.length, offset), run.length, 'the base has the bytes BASE promised');
    if (f.hints && f.hints.q.offer(offset, run.length)) drainHints(f);
  } else await f.img.read(buf, offset);
  return kind;
}

/** Hints of runs of more than one block drained so far (the differential checks some were). */
let runCount = 0;

/** The main thread's side of the hints (daemon/engine-requests.ts copyHinted). */
function drainHints(f: Fixture): void {
  const main = f.hints!.main;
  main.drain((b, slot, count) => {
    if (count > 1) runCount++;
    if (slot === NO_SLOT) f.copies.push(f.img.copyHintRun(b, count).then(() => main.releaseRun(b, count)));
    else f.copies.push(f.img.copyHint(b, main.slotData(slot)).then(() => (main.release(b), main.freeSlot(slot))));
  });
}

/** A deterministic pseudo-random sequence. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => ((x ^= x << 13), (x ^= x >>> 17), (x ^= x << 5), (x >>> 0) / 2 ** 32);
}

// The last case: 4 KiB blocks and reads up to 64 KiB, so most hints are runs of blocks.
for (const [layout, carry, bs, maxSectors, blocks] of [['raw', true, 16 * KiB, 16, 64], ['compact', true, 16 * KiB, 16, 64], ['raw', false, 16 * KiB, 16, 64], ['compact', false, 4 * KiB, 128, 2048]] as const) {
  test(`differential (${layout}, ${bs / KiB} KiB blocks, hints ${carry ? 'carry data' : 'without data'}): worker reads of base blocks, hinted copies and guest writes agree with the model`, async () => {
    // A base ending inside a block, shorter than the disk: the last base block reads zeros past it.
    const baseBlocks = Math.floor((blocks * 5) / 8);
    const baseSize = baseBlocks * bs + 3 * KiB;
    const f = await fixture(layout, baseSize, blocks * bs, true, bs === 16 * KiB ? 4 * bs : 64 * bs, carry, bs);
    const r = rng(layout === 'raw' ? 7 : 11);
    const kinds = [0, 0, 0, 0, 0];
    let nonZeroBaseAnswers = 0;
    const runsBefore = runCount;
    for (let i = 0; i < 600; i++) {
      const sectors = 1 + Math.floor(r() * maxSectors);
      const offset = Math.floor(r() * (blocks * bs / 512 - sectors)) * 512;
      const len = sectors * 512;
      if (r() < 0.2) {
        const data = new Uint8Array(len).fill(1 + (i % 250));
        await f.img.write(data, offset);
        f.model.set(data, offset);
        continue;
      }
      const buf = new Uint8Array(len);
      const kind = await workerRead(f, buf, offset);
      kinds[kind]++;
      if (kind === BASE && buf.some((x) => x !== 0)) nonZeroBaseAnswers++;
      assert.equal(buf, f.model.subarray(offset, offset + len), `read ${offset}+${len} routed ${kind}`);
      if (i % 50 === 0) await Promise.all(f.copies); // let some copies land between reads
    }
    // The straddling last base block, as one request: base bytes, then zeros.
    const last = baseBlocks * bs;
    const lastBuf = new Uint8Array(bs);
    await workerRead(f, lastBuf, last);
    assert.equal(lastBuf, f.model.subarray(last, last + bs), 'the last base block: base bytes, then zeros');
    await Promise.all(f.copies);
    assert.ok(kinds[BASE]! > 20 && nonZeroBaseAnswers > 0, `the worker answered base reads itself (${kinds})`);
    assert.ok(kinds[STORED]! > 20, `hinted copies made blocks local (${kinds})`);
    if (carry) assert.ok(f.hints!.q.carried > 10, `hints carried their data (${f.hints!.q.carried})`);
    if (maxSectors > 16) assert.ok(runCount - runsBefore > 10, `hints of runs of blocks were copied (${runCount - runsBefore})`);
    // Every answer again, once all copies landed.
    const all = new Uint8Array(blocks * bs);
    for (let off = 0; off < all.length; off += bs) await workerRead(f, all.subarray(off, off + bs), off);
    assert.equal(all, f.model);
    await done(f);
  });
}

test('BASE reads hint their blocks: the engine copies them, bounded by the cap', async () => {
  const bs = 16 * KiB;
  const f = await fixture('raw', 32 * bs, 32 * bs, true, 2 * bs);
  const buf = new Uint8Array(4096);
  for (let b = 0; b < 8; b++) assert.is(await workerRead(f, buf, b * bs + 512), BASE);
  await Promise.all(f.copies);
  const present = f.img.sharedView().present;
  const local = [0, 1, 2, 3, 4, 5, 6, 7].filter((b) => (present[b >>> 3]! & (1 << (b & 7))) !== 0).length;
  assert.ok(local >= 2 && local < 8, `some hints were copied, the rest dropped at the cap (${local} local)`);
  assert.ok(f.hints!.q.dropped > 0);
  assert.is(f.hints!.main.outstanding(), 0, 'every hint released after its copy');
  assert.is(await workerRead(f, buf, 512), STORED, 'a copied block is read from the image');
  await done(f);
});

test('copy-on-read off: no hints, the worker still reads the base, nothing becomes local; the last block straddles the base end', async () => {
  const bs = 16 * KiB;
  const f = await fixture('raw', 7 * bs + 1536, 8 * bs, false);
  const buf = new Uint8Array(bs);
  for (let b = 0; b < 8; b++) {
    assert.is(await workerRead(f, buf, b * bs), BASE, `block ${b}: the worker reads the base`);
    assert.equal(buf, f.model.subarray(b * bs, (b + 1) * bs), `block ${b}`);
  }
  assert.is(buf.subarray(1536).some((x) => x !== 0), false, 'past the base end: zeros');
  assert.is(f.img.copyHint(0) instanceof Promise, true);
  await f.img.idle();
  assert.is(f.img.sharedView().present[0], 0, 'copyHint does nothing with copy-on-read off');
  await done(f);
});

test('race: reads of a block while a guest write to it is in flight see old or new; after the write completed, only new', async () => {
  const bs = 16 * KiB;
  for (const layout of ['raw', 'compact'] as const) {
    for (const cor of [false, true]) {
      const f = await fixture(layout, 16 * bs, 16 * bs, cor);
      const off = 5 * bs + 4096;
      const old = f.model.slice(off, off + 4096);
      const neu = new Uint8Array(4096).fill(0xee);
      let completed = false;
      const w = f.img.write(neu, off).then(() => {
        completed = true;
      });
      // Reads issued at every turn of the event loop while the write is in flight, then after.
      for (let i = 0; i < 200 && !completed; i++) {
        const buf = new Uint8Array(4096);
        const before = completed;
        await workerRead(f, buf, off);
        const isOld = buf.every((x, j) => x === old[j]);
        const isNew = buf.every((x) => x === 0xee);
        assert.ok(isOld || isNew, `${layout}: a concurrent read returns old or new, never a mix of others`);
        if (before) assert.ok(isNew, 'issued after the write completed: new data');
        await new Promise((res) => setImmediate(res));
      }
      await w;
      // The write is acknowledged: the shared view must already say local, so no read goes to the base.
      const run = newRun();
      assert.is.not(directRoute(f.view, off, 4096, false, run), BASE, `${layout}: an acknowledged write set the shared bit first`);
      const buf = new Uint8Array(4096);
      await workerRead(f, buf, off);
      assert.equal(buf, neu, `${layout}: read after the write completed`);
      await done(f);
    }
  }
});

/** The image's block locks (private): a test holds them as a guest request would. */
function locksOf(img: FvdImage): BlockLocks {
  return (img as unknown as { locks: BlockLocks }).locks;
}

function bitOf(f: Fixture, b: number): boolean {
  return (f.img.sharedView().present[b >>> 3]! & (1 << (b & 7))) !== 0;
}

test('carried copy: writes the data it is handed (no base read) and sets the bit; survives a reopen', async () => {
  const bs = 16 * KiB;
  for (const layout of ['raw', 'compact'] as const) {
    const f = await fixture(layout, 8 * bs + 1000, 9 * bs, true);
    // Data unlike the base: if the copier read the base instead, the image would hold the base's.
    const data = new Uint8Array(bs).fill(0x5a);
    await f.img.copyHint(3, data);
    assert.ok(bitOf(f, 3), `${layout}: the carried block is local`);
    assert.not.ok(bitOf(f, 2), 'no other block');
    const got = new Uint8Array(bs);
    await f.img.read(got, 3 * bs);
    assert.equal(got, data, `${layout}: the carried data, not the base's`);
    // The last block straddles the base end: base bytes then zeros, as a queue thread fills the slot.
    const last = new Uint8Array(bs);
    last.set(f.model.subarray(8 * bs, 8 * bs + 1000));
    await f.img.copyHint(8, last);
    assert.ok(bitOf(f, 8), 'the straddling last base block is local');
    await f.img.persistSoftBits();
    const img = await reopen(f);
    const again = new Uint8Array(9 * bs);
    await img.read(again, 0);
    const want = f.model.slice(0, 9 * bs);
    want.set(data, 3 * bs);
    assert.equal(again, want, `${layout}: after a reopen: the carried block and the base elsewhere`);
    await img.close();
    fs.rmSync(f.dir, { recursive: true });
  }
});

test('run copy: one hint copies the absent blocks of a run; a block a guest wrote is kept, a run a guest holds locked is skipped; survives a reopen', async () => {
  const bs = 4 * KiB;
  for (const layout of ['raw', 'compact'] as const) {
    const f = await fixture(layout, 64 * bs + 1000, 66 * bs, true, 1 << 20, false, bs);
    // The guest wrote part of block 5 (local now); the run 0..31 copies the others around it.
    const neu = new Uint8Array(1024).fill(0xee);
    await f.img.write(neu, 5 * bs + 1024);
    f.model.set(neu, 5 * bs + 1024);
    await f.img.copyHintRun(0, 32);
    for (let b = 0; b < 32; b++) assert.ok(bitOf(f, b), `${layout}: block ${b} local after the run's copy`);
    assert.not.ok(bitOf(f, 32), 'nothing past the run');
    // A guest request holds block 40's lock: the absent run 33..47 holding it is skipped whole.
    const locks = locksOf(f.img);
    assert.ok(locks.tryAcquire(40, 40));
    await f.img.copyHintRun(33, 15);
    assert.not.ok(bitOf(f, 33) || bitOf(f, 40) || bitOf(f, 47), `${layout}: skipped while a guest request holds a block of it`);
    locks.release(40, 40);
    // Across the base's end (block 64 straddles it, 65 is past the base): stops at the base's blocks.
    await f.img.copyHintRun(60, 10);
    for (let b = 60; b <= 64; b++) assert.ok(bitOf(f, b), `block ${b}`);
    const got = new Uint8Array(66 * bs);
    await f.img.read(got, 0);
    assert.equal(got, f.model, `${layout}: the guest's bytes and the base's`);
    await f.img.persistSoftBits();
    const img = await reopen(f);
    const again = new Uint8Array(66 * bs);
    await img.read(again, 0);
    assert.equal(again, f.model, `${layout}: the same after a reopen`);
    const view = img.sharedView();
    for (const b of [0, 5, 31, 64]) assert.ok((view.present[b >>> 3]! & (1 << (b & 7))) !== 0, `${layout}: block ${b} still local after a reopen`);
    await img.close();
    fs.rmSync(f.dir, { recursive: true });
  }
});

test('race: a carried copy of a block a guest write made local, or whose lock a guest write holds, is skipped; the guest data survives a reopen', async () => {
  const bs = 16 * KiB;
  for (const layout of ['raw', 'compact'] as const) {
    const f = await fixture(layout, 16 * bs, 16 * bs, true);
    const base = (b: number) => f.model.slice(b * bs, (b + 1) * bs);
    // (1) The guest wrote block 2 after the queue thread read it: the bit is set, the copy skips.
    const neu = new Uint8Array(4096).fill(0xee);
    await f.img.write(neu, 2 * bs + 4096);
    f.model.set(neu, 2 * bs + 4096);
    await f.img.copyHint(2, base(2)); // copyHint's own bit check
    assert.ok(bitOf(f, 2));
    // (2) The guest holds block 4's lock (a write in flight): the copier's tryAcquire fails, skip.
    const locks = locksOf(f.img);
    assert.ok(locks.tryAcquire(4, 4));
    await f.img.copyHint(4, base(4));
    assert.not.ok(bitOf(f, 4), `${layout}: skipped while a guest request holds the lock`);
    locks.release(4, 4);
    // (3) Writes in flight against carried copies issued at every turn of the event loop.
    let skippedLocked = 0;
    for (const b of [6, 8, 10, 12]) {
      const data = new Uint8Array(4096).fill(b);
      const at = b * bs + (b % 3) * 4096;
      let finished = false;
      const w = f.img.write(data, at).then(() => (finished = true));
      const copies: Promise<void>[] = [];
      for (let i = 0; i < 50 && !finished; i++) {
        if (locks.isLocked(b) && !bitOf(f, b)) skippedLocked++;
        copies.push(f.img.copyHint(b, base(b)));
        await new Promise((res) => setImmediate(res));
      }
      await w;
      await Promise.all(copies);
      f.model.set(data, at);
      // Carried copies after the write completed: the bit is set, skipped.
      await f.img.copyHint(b, new Uint8Array(bs).fill(0x11));
    }
    assert.ok(skippedLocked > 0, `${layout}: some carried copies met a guest write holding the lock (${skippedLocked})`);
    await f.img.copyHint(14, base(14)); // an untouched block: copied
    assert.ok(bitOf(f, 14));
    const got = new Uint8Array(16 * bs);
    await f.img.read(got, 0);
    assert.equal(got, f.model, `${layout}: guest data and base data, never a stale copy over a write`);
    await f.img.persistSoftBits();
    const img = await reopen(f);
    const again = new Uint8Array(16 * bs);
    await img.read(again, 0);
    assert.equal(again, f.model, `${layout}: the same after a reopen`);
    await img.close();
    fs.rmSync(f.dir, { recursive: true });
  }
});

test.run();
