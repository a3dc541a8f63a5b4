/**
 * Prefetching (fvd/prefetch.ts): reaching FULLY_LOCAL over raw and FVD bases, content equal to
 * base + guest writes, the base no longer needed, each base block read at most once, guest writes
 * never lost to concurrent prefetching (model, several seeds, reordered completions), stop + crash
 * + reopen, back-off on a busy foreground, latency-driven back-off, the bandwidth cap, and the
 * `fvd prefetch` command line.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { checkImage } from '../../fvd/check.js';
import type { BlockFile, IoBackend, OpenOptions } from '../../fvd/io.js';
import { ForegroundMeter, Prefetcher, defaultChunkBytes, type ForegroundActivity, type PrefetchState } from '../../fvd/prefetch.js';
import { Rng } from '../helpers/rng.js';
import { CrashIo } from '../helpers/crash-io.js';
import { countSet, testBit } from '../../fvd/bitmap.js';
import { MemIo } from '../helpers/mem-io.js';
import { DiskModel, firstMismatch, makeData, makeFvdBase } from '../helpers/model.js';
import { CLI, TempDir, assertNoCrash, assertOneLineError, fvd, patternBytes, type CliResult } from '../helpers/cli.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-prefetch-');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Wraps an IoBackend and counts reads of one file (the base): bytes, per-block read counts, and
 * reads in flight. Optionally delays them (a slow base widens race windows).
 */
class CountingIo implements IoBackend {
  bytes = 0;
  reads = 0;
  inFlight = 0;
  lastReadEnd = 0;
  perBlock: Uint16Array;
  counting = true;
  constructor(
    private readonly inner: IoBackend,
    private readonly target: string,
    readonly blockSize: number,
    blocks: number,
    private readonly delay?: () => number,
  ) {
    this.perBlock = new Uint16Array(blocks + 1);
  }
  reset(): void {
    this.bytes = 0;
    this.reads = 0;
    this.perBlock.fill(0);
  }
  async open(p: string, options?: OpenOptions): Promise<BlockFile> {
    const f = await this.inner.open(p, options);
    if (path.resolve(p) !== path.resolve(this.target)) return f;
    const self = this;
    return new Proxy(f, {
      get(t, prop) {
        if (prop !== 'read') {
          const v = Reflect.get(t, prop, t);
          return typeof v === 'function' ? v.bind(t) : v;
        }
        return async (buf: Uint8Array, offset: number) => {
          self.inFlight++;
          try {
            const d = self.delay?.() ?? 0;
            if (d > 0) await sleep(d);
            await t.read(buf, offset);
          } finally {
            self.inFlight--;
            self.lastReadEnd = performance.now();
          }
          if (!self.counting) return;
          self.reads++;
          self.bytes += buf.length;
          const bs = self.blockSize;
          for (let b = Math.floor(offset / bs); b * bs < offset + buf.length && b < self.perBlock.length; b++) self.perBlock[b]!++;
        };
      },
    });
  }
}

function rawBase(dir: string, size: number, seed: number, holes = true): { file: string; data: Buffer } {
  const data = patternBytes(size, seed);
  // Some all-zero regions: zero-detected at create, so never read by the prefetcher.
  if (holes) for (let off = 0; off < size; off += 1 * MiB) data.fill(0, off + 256 * KiB, Math.min(size, off + 384 * KiB));
  const file = path.join(dir, 'base.raw');
  fs.writeFileSync(file, data);
  return { file, data };
}

async function readAll(img: FvdImage, size: number): Promise<Buffer> {
  const b = Buffer.alloc(size);
  await img.read(b, 0);
  return b;
}

function mismatch(expected: Uint8Array, actual: Uint8Array, what: string): void {
  const m = firstMismatch(expected, actual, 0);
  assert.ok(m === undefined, `${what}: ${m}`);
}

async function waitFor(cond: () => boolean, ms: number, what: string): Promise<void> {
  const end = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > end) assert.unreachable(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

// -----------------------------------------------------------------------------------------------

for (const layout of ['raw', 'compact'] as const) {
  test(`${layout} image over a raw base: prefetch reaches fully local, reads each base block once, base no longer needed`, async () => {
    const dir = tmp.caseDir();
    const size = 6 * MiB + 24 * KiB; // the last block straddles the base's end
    const base = rawBase(dir, size, 11);
    const bs = 64 * KiB;
    const img = path.join(dir, 'img.fvd');
    const opts: CreateOptions = { base: 'base.raw', baseFormat: 'raw', layout, blockSize: bs, chunkSize: 256 * KiB, size: 8 * MiB };
    await FvdImage.create(nodeIo, img, opts);
    const model = new DiskModel(8 * MiB, base.data);
    // Guest writes first (partial blocks: copy-on-write), then prefetch the rest.
    let image = await FvdImage.open(nodeIo, img, { copyOnRead: false });
    const rng = new Rng(3);
    for (let i = 0; i < 12; i++) {
      const off = rng.int(8 * MiB - 8 * KiB);
      const data = makeData(rng, rng.range(1, 8 * KiB), i, off, 'random');
      await image.write(data, off);
      model.write(data, off);
    }
    await image.close();

    const blocks = Math.ceil(size / bs);
    const io = new CountingIo(nodeIo, path.join(dir, 'base.raw'), bs, blocks);
    image = await FvdImage.open(io, img, { copyOnRead: false });
    const start = image.baseProgress();
    assert.ok(start.absent > 0 && start.absent < start.blocks, `absent ${start.absent} of ${start.blocks}`);
    const expectBytes = (() => {
      let n = 0;
      for (let b = 0; b < blocks; b++) if (image.nextAbsentBlock(b) === b) n += Math.min(bs, size - b * bs);
      return n;
    })();
    io.reset();
    const pf = new Prefetcher(image, { chunkBytes: 256 * KiB, seed: 1, minBytesPerSec: 0 });
    const states: PrefetchState[] = [];
    pf.on('state', (s: PrefetchState) => states.push(s));
    pf.start();
    const end = await pf.finished;
    assert.is(end.state, 'done', `state ${end.state} ${end.error?.message ?? ''}`);
    assert.is(end.bytesRemaining, 0);
    assert.is(end.fraction, 1);
    assert.is(end.bytesDone, expectBytes);
    assert.is(io.bytes, expectBytes, 'bytes read from the base = bytes absent at start');
    assert.ok(Math.max(...io.perBlock) <= 1, 'a base block was read twice');
    assert.ok(states.includes('done'));
    assert.ok(image.stats().fullyLocal);
    assert.is(image.baseProgress().absent, 0);
    // Reads no longer touch the base.
    io.reset();
    mismatch(model.data, await readAll(image, 8 * MiB), 'after prefetch');
    assert.is(io.reads, 0, 'a read consulted the base after fully local');
    await image.close();

    // The base can go away: the image opens and reads right; info says fully local.
    fs.renameSync(base.file, path.join(dir, 'moved.raw'));
    image = await FvdImage.open(nodeIo, img);
    assert.ok(image.stats().fullyLocal);
    mismatch(model.data, await readAll(image, 8 * MiB), 'after reopen without base');
    const w = Buffer.alloc(3000, 0x5a);
    await image.write(w, 100_000);
    model.write(w, 100_000);
    await image.close();
    image = await FvdImage.open(nodeIo, img, { readOnly: true });
    mismatch(model.data, await readAll(image, 8 * MiB), 'read-only reopen');
    await image.close();
    const info = fvd('info', img);
    assert.is(info.code, 0, info.stderr);
    assert.match(info.stdout, /fully local: yes/);
    assert.is((await checkImage(nodeIo, img)).errors.length, 0);
  });
}

test('image over an FVD base: prefetch reaches fully local; the base can be renamed away', async () => {
  const dir = tmp.caseDir();
  const rng = new Rng(21);
  const size = 4 * MiB;
  const basePath = path.join(dir, 'base.fvd');
  const initial = await makeFvdBase(nodeIo, basePath, size, 16 * KiB, rng, 60, 64);
  const img = path.join(dir, 'img.fvd');
  await FvdImage.create(nodeIo, img, { base: 'base.fvd', baseFormat: 'fvd', blockSize: 16 * KiB, layout: 'compact', chunkSize: 64 * KiB });
  const model = new DiskModel(size, initial);
  let image = await FvdImage.open(nodeIo, img);
  const w = makeData(rng, 40 * KiB, 1, 0, 'random');
  await image.write(w, 1 * MiB + 100);
  model.write(w, 1 * MiB + 100);
  const pf = new Prefetcher(image, { chunkBytes: 128 * KiB, seed: 2, minBytesPerSec: 0 }).start();
  const end = await pf.finished;
  assert.is(end.state, 'done', end.error?.message);
  assert.ok(image.stats().fullyLocal);
  mismatch(model.data, await readAll(image, size), 'after prefetch');
  await image.close();
  fs.renameSync(basePath, path.join(dir, 'gone.fvd'));
  image = await FvdImage.open(nodeIo, img, { readOnly: true });
  assert.ok(image.stats().fullyLocal);
  assert.is(image.stats().baseChain.length, 0);
  mismatch(model.data, await readAll(image, size), 'after reopen without base');
  await image.close();
});

// -----------------------------------------------------------------------------------------------

/**
 * Guest writes and reads race the prefetcher: W workers, each owning the stripes s with
 * s % W == id (a stripe is two blocks, so writes cross block boundaries and partial blocks need
 * copy-on-write), issue sequential random ops; the model is therefore exact for each worker's
 * own reads. Completions are reordered per seed by MemIo, and base reads are delayed.
 */
for (const seed of [1, 2, 3, 4, 5, 6]) {
  test(`guest writes always win against concurrent prefetching (seed ${seed})`, async () => {
    const rng = new Rng(seed);
    const mem = new MemIo({ rng: rng.fork(), maxTurns: 6, macroTurnChance: 0.2 });
    const bs = 4 * KiB;
    const size = 1 * MiB;
    const stripe = 2 * bs;
    const layout = seed % 2 ? 'raw' : 'compact';
    let initial: Uint8Array;
    const baseFormat = seed % 3 === 0 ? 'fvd' : 'raw';
    if (baseFormat === 'fvd') initial = await makeFvdBase(mem, '/d/base', size, bs, rng.fork(), 80, 16);
    else {
      initial = rng.bytes(size);
      const f = await mem.open('/d/base', { create: true });
      await f.write(initial, 0);
      await f.close();
    }
    await FvdImage.create(mem, '/d/img', { base: 'base', baseFormat, blockSize: bs, chunkSize: 16 * KiB, layout, detectZeroes: false });
    const baseRng = rng.fork();
    const io = new CountingIo(mem, '/d/base', bs, size / bs, () => (baseRng.chance(0.3) ? baseRng.int(3) : 0));
    const image = await FvdImage.open(io, '/d/img', { copyOnRead: rng.chance(0.5) });
    const model = new DiskModel(size, initial);
    const pf = new Prefetcher(image, { chunkBytes: 4 * bs, seed, minBytesPerSec: 0 }).start();
    const W = 6;
    const stripes = size / stripe;
    let writes = 0;
    const worker = async (id: number, wr: Rng) => {
      for (let i = 0; i < 120; i++) {
        const s = id + W * wr.int(Math.floor((stripes - id - 1) / W) + 1);
        const off = s * stripe + wr.int(stripe - 1);
        const len = wr.range(1, s * stripe + stripe - off);
        if (wr.chance(0.6)) {
          const data = makeData(wr, len, seed * 100000 + id * 1000 + i, off, 'random');
          model.write(data, off); // sequential per worker: the model is updated at submit
          await image.write(data, off);
          writes++;
        } else {
          const got = new Uint8Array(len);
          await image.read(got, off);
          const m = firstMismatch(model.data.subarray(off, off + len), got, off);
          assert.ok(m === undefined, `worker ${id} op ${i}: ${m}`);
        }
        if (wr.chance(0.05)) await image.flush();
      }
    };
    await Promise.all(Array.from({ length: W }, (_, id) => worker(id, rng.fork())));
    const end = await pf.finished;
    assert.is(end.state, 'done', end.error?.message);
    assert.ok(writes > 200);
    mismatch(model.data, await readAll(image, size), 'whole disk after prefetch');
    await image.close();
    const again = await FvdImage.open(mem, '/d/img', { readOnly: true });
    assert.ok(again.stats().fullyLocal);
    mismatch(model.data, await readAll(again, size), 'after reopen');
    await again.close();
  });
}

// -----------------------------------------------------------------------------------------------

test('stop mid-way, crash, reopen: data right, nothing corrupt; prefetch then completes', async () => {
  const rng = new Rng(77);
  const mem = new MemIo({ rng: rng.fork() });
  const bs = 16 * KiB;
  const size = 4 * MiB;
  const initial = rng.bytes(size);
  const f = await mem.open('/c/base', { create: true });
  await f.write(initial, 0);
  await f.close();
  for (const layout of ['raw', 'compact'] as const) {
    const img = `/c/img-${layout}`;
    await FvdImage.create(mem, img, { base: 'base', baseFormat: 'raw', blockSize: bs, layout, chunkSize: 64 * KiB });
    const model = new DiskModel(size, initial);
    let image = await FvdImage.open(mem, img);
    const pf = new Prefetcher(image, { chunkBytes: 64 * KiB, maxBytesPerSec: 8 * MiB, seed: 5, minBytesPerSec: 0 }).start();
    for (let i = 0; i < 30; i++) {
      const off = rng.int(size - 20 * KiB);
      const data = makeData(rng, rng.range(1, 20 * KiB), i, off, 'random');
      await image.write(data, off);
      model.write(data, off);
      await sleep(2);
    }
    await image.flush(); // every guest write acknowledged before this must survive the crash
    await waitFor(() => pf.progress().bytesDone > 256 * KiB, 10_000, 'some prefetching');
    await pf.stop();
    const p = pf.progress();
    assert.is(p.state, 'stopped');
    assert.ok(p.bytesRemaining > 0, 'stopped too late to test anything');
    await image.abandon(); // crash: the prefetched (soft) bits were never written
    image = await FvdImage.open(mem, img);
    assert.ok(image.stats().wasDirty);
    assert.not.ok(image.stats().fullyLocal);
    mismatch(model.data, await readAll(image, size), `${layout}: after crash`);
    await image.close();
    const report = await checkImage(mem, img);
    assert.is(report.errors.length, 0, report.errors.join('; '));
    image = await FvdImage.open(mem, img);
    const pf2 = new Prefetcher(image, { chunkBytes: 256 * KiB, seed: 6, minBytesPerSec: 0 }).start();
    assert.is((await pf2.finished).state, 'done');
    mismatch(model.data, await readAll(image, size), `${layout}: after second prefetch`);
    await image.close();
    assert.is((await checkImage(mem, img)).errors.length, 0);
  }
});

test('persistSoftBits: journaled copy-on-read bits survive a crash; unpersisted ones are merely re-read', async () => {
  const rng = new Rng(31);
  const mem = new MemIo({ rng: rng.fork() });
  const bs = 16 * KiB;
  const size = 1 * MiB;
  const initial = rng.bytes(size);
  mem.writeFile('/s/base', initial);
  await FvdImage.create(mem, '/s/img', { base: 'base', baseFormat: 'raw', blockSize: bs, detectZeroes: false });
  let image = await FvdImage.open(mem, '/s/img');
  assert.not.ok(image.isClosed);
  await readAll(image, 256 * KiB); // copy-on-read: 16 soft blocks
  await image.idle();
  assert.is(await image.persistSoftBits(), 16);
  assert.is(await image.persistSoftBits(), 0, 'nothing new to persist');
  const r = new Uint8Array(128 * KiB);
  await image.read(r, 512 * KiB); // 8 more soft blocks, not persisted
  await image.idle();
  assert.is(image.stats().bytesInBase, size - 24 * bs);
  await image.abandon(); // crash: every completed write is on disk, nothing of the in-memory state
  assert.ok(image.isClosed);
  image = await FvdImage.open(mem, '/s/img', { readOnly: true });
  assert.ok(image.stats().wasDirty);
  assert.is(image.stats().bytesInBase, size - 16 * bs, 'the persisted bits came back from the journal, the others did not');
  assert.equal(image.extents().slice(0, 2), [
    { offset: 0, length: 256 * KiB, kind: 'local' },
    { offset: 256 * KiB, length: size - 256 * KiB, kind: 'base' },
  ]);
  mismatch(initial, await readAll(image, size), 'after crash');
  try {
    await image.persistSoftBits();
    assert.unreachable('persist on a read-only image');
  } catch (err) {
    assert.match((err as Error).message, /read-only/);
  }
  await image.close();
  assert.is((await checkImage(mem, '/s/img')).errors.length, 0);
});

for (const [layout, depth] of [['raw', 1], ['compact', 1], ['raw', 3], ['compact', 4]] as const) {
  test(`${layout}, ${depth} chunk(s) in flight: prefetch progress persisted before a power cut is kept, and the image reads right at every cut`, async () => {
    const rng = new Rng((layout === 'raw' ? 91 : 92) + 10 * depth);
    const mem = new MemIo({ rng: rng.fork() });
    const bs = 16 * KiB;
    const size = 2 * MiB;
    const blocks = size / bs;
    const initial = rng.bytes(size);
    mem.writeFile('/p/base', initial);
    await FvdImage.create(mem, '/p/img', { base: 'base', baseFormat: 'raw', blockSize: bs, layout, chunkSize: 64 * KiB, detectZeroes: false });
    const model = new DiskModel(size, initial);
    let image = await FvdImage.open(mem, '/p/img');
    for (let i = 0; i < 8; i++) {
      const off = rng.int(size - 20 * KiB);
      const data = makeData(rng, rng.range(1, 20 * KiB), i, off, 'random');
      await image.write(data, off);
      model.write(data, off);
    }
    await image.close();

    const cio = new CrashIo(mem);
    cio.startRecording();
    image = await FvdImage.open(cio, '/p/img', { copyOnRead: false });
    // Each persist: the crash point from which on these bits must survive (when it resolved), and
    // the bits (as it was called: it journals the bits set then; with chunks in flight, more may
    // be set before it resolves, and those need not survive).
    const persisted: { seq: number; bits: Uint8Array; count: number }[] = [];
    const persistSoftBits = image.persistSoftBits.bind(image);
    image.persistSoftBits = async () => {
      const bits = image.inspect().present.slice();
      const n = await persistSoftBits();
      persisted.push({ seq: cio.seq, bits, count: countSet(bits, blocks) });
      return n;
    };
    const pf = new Prefetcher(image, { chunkBytes: 64 * KiB, persistBytes: 256 * KiB, persistMs: 0, seed: 3, minBytesPerSec: 0, depth });
    // Chunks that completed while a persist ran (depth > 1): the race this variant is for.
    let landedDuringPersist = 0;
    pf.on('persisted', () => void (image.inspect().present.some((v, i) => (v & ~persisted.at(-1)!.bits[i]!) !== 0) && landedDuringPersist++));
    pf.start();
    const end = await pf.finished;
    assert.is(end.state, 'done', end.error?.message);
    assert.ok(persisted.length >= 4, `${persisted.length} persists`);
    assert.is(end.persists, persisted.length);
    assert.ok(depth === 1 || landedDuringPersist > 0, 'no chunk completed while a persist ran');
    await image.close();

    const points = new Set<number>([0, cio.seq]);
    for (const p of persisted) for (const d of [0, 1, 2, 5]) points.add(Math.max(0, p.seq - d));
    for (let i = 0; i < 10; i++) points.add(rng.int(cio.seq + 1));
    let checkedProgress = 0;
    for (const k of [...points].sort((a, b) => a - b)) {
      const r = cio.rebuild(k, rng.fork());
      const where = `crash at ${k} of ${cio.seq}`;
      const img = await FvdImage.open(r.io, '/p/img');
      mismatch(model.data, await readAll(img, size), where);
      const last = persisted.filter((p) => p.seq <= k).pop();
      if (last) {
        const present = img.inspect().present;
        for (let b = 0; b < blocks; b++) if (testBit(last.bits, b)) assert.ok(img.stats().fullyLocal || testBit(present, b), `${where}: persisted block ${b} lost`);
        assert.ok(img.baseProgress().absent <= blocks - last.count, `${where}: more absent than before the persist`);
        checkedProgress++;
      }
      await img.close();
      const report = await checkImage(r.io, '/p/img');
      assert.is(report.errors.length, 0, `${where}: ${report.errors.join('; ')}`);
    }
    assert.ok(checkedProgress >= persisted.length, 'every persist was crash-tested');
  });
}

test('stop() before start and after done; pause()/resume() hold and release the base reads', async () => {
  const dir = tmp.caseDir();
  rawBase(dir, 8 * MiB, 5, false);
  const img = path.join(dir, 'img.fvd');
  await FvdImage.create(nodeIo, img, { base: 'base.raw', baseFormat: 'raw' });
  const io = new CountingIo(nodeIo, path.join(dir, 'base.raw'), 64 * KiB, 128);
  const image = await FvdImage.open(io, img, { copyOnRead: false });
  const idle = new Prefetcher(image);
  await idle.stop();
  assert.is(idle.progress().state, 'stopped');
  const pf = new Prefetcher(image, { chunkBytes: 128 * KiB, maxBytesPerSec: 8 * MiB, seed: 3, minBytesPerSec: 0 }).start();
  await waitFor(() => io.bytes > 0, 5000, 'first read');
  await pf.pause();
  const held = io.bytes;
  assert.is(pf.progress().state, 'paused');
  assert.is(pf.progress().pauseReason, 'user');
  await sleep(300);
  assert.is(io.bytes, held, 'read while paused');
  pf.resume();
  const end = await pf.finished;
  assert.is(end.state, 'done');
  assert.is(io.bytes, 8 * MiB);
  await pf.stop();
  assert.is(pf.progress().state, 'done');
  await image.close();
});

// -----------------------------------------------------------------------------------------------

test('back-off: a busy foreground (no latency figures) pauses prefetching; it resumes when idle', async () => {
  const dir = tmp.caseDir();
  rawBase(dir, 16 * MiB, 9, false);
  const img = path.join(dir, 'img.fvd');
  await FvdImage.create(nodeIo, img, { base: 'base.raw', baseFormat: 'raw' });
  const io = new CountingIo(nodeIo, path.join(dir, 'base.raw'), 64 * KiB, 256);
  const image = await FvdImage.open(io, img, { copyOnRead: false });
  const act: ForegroundActivity = { ops: 0, bytes: 0, latencyNs: 0 };
  let busy = false;
  const gen = setInterval(() => {
    if (busy) {
      act.ops += 5;
      act.bytes += 5 * 4096;
    }
  }, 5);
  try {
    const pf = new Prefetcher(image, {
      chunkBytes: 256 * KiB, maxBytesPerSec: 4 * MiB, idleResumeMs: 300, seed: 4, minBytesPerSec: 0, activity: () => act,
    }).start();
    await waitFor(() => io.bytes >= 512 * KiB, 5000, 'prefetching to start');
    assert.is(pf.progress().state, 'running');
    busy = true;
    await waitFor(() => pf.progress().state === 'paused', 3000, 'a busy pause');
    assert.is(pf.progress().pauseReason, 'busy');
    await sleep(50); // the chunk in flight (if any) completes
    const held = io.bytes;
    await sleep(800);
    assert.is(io.bytes, held, 'base read while the guest was busy');
    assert.is(pf.progress().state, 'paused');
    assert.is(pf.progress().etaSeconds, null);
    busy = false;
    const stoppedAt = performance.now();
    await waitFor(() => pf.progress().state === 'running', 5000, 'resume after idle');
    assert.ok(performance.now() - stoppedAt >= 250, 'resumed before idleResumeMs of quiet');
    const end = await pf.finished;
    assert.is(end.state, 'done');
    assert.ok(end.backoffs >= 1);
    assert.is(io.bytes, 16 * MiB);
  } finally {
    clearInterval(gen);
    await image.close();
  }
});

for (const polled of [false, true]) {
  test(`latency budget on a real engine (${polled ? 'polled counters, as the daemon feeds it' : 'per-request meter'}): a foreground that prefetch I/O slows holds it back; one it does not slow does not`, async () => {
    // Synthetic foreground: a request every 2 ms whose latency is 10× higher while (or just after)
    // the base is being read — the interference the prefetcher must notice — or constant. Fed per
    // request through a ForegroundMeter, or as cumulative counters the prefetcher polls (what the
    // daemon's queue workers publish, daemon/queue-activity.ts).
    async function run(sensitive: boolean): Promise<{ throttles: number; baseline: number; state: string; overlapped: number; bytes: number }> {
      const dir = tmp.caseDir();
      rawBase(dir, 16 * MiB, 13, false);
      const img = path.join(dir, 'img.fvd');
      await FvdImage.create(nodeIo, img, { base: 'base.raw', baseFormat: 'raw' });
      const io = new CountingIo(nodeIo, path.join(dir, 'base.raw'), 64 * KiB, 256);
      const image = await FvdImage.open(io, img, { copyOnRead: false });
      const meter = new ForegroundMeter();
      const totals: ForegroundActivity = { ops: 0, bytes: 0, latencyNs: 0, inFlight: 0 };
      const gen = setInterval(() => {
        const hurt = sensitive && (io.inFlight > 0 || performance.now() - io.lastReadEnd < 30);
        const latencyNs = hurt ? 1_000_000 : 100_000;
        if (polled) {
          totals.ops++;
          totals.bytes += 4096;
          totals.latencyNs += latencyNs;
        } else {
          meter.begin();
          meter.end(4096, latencyNs);
        }
      }, 2);
      try {
        const pf = new Prefetcher(image, {
          chunkBytes: 256 * KiB, busyChunkBytes: 64 * KiB, maxBytesPerSec: 8 * MiB, maxLatencyShare: 0.2, seed: 8, minBytesPerSec: 0,
          activity: polled ? () => totals : meter,
        });
        let announced = 0;
        pf.on('baseline', (ns: number) => (announced = ns));
        pf.start();
        await Promise.race([pf.finished, sleep(1500)]);
        await pf.stop();
        const p = pf.progress();
        assert.ok(announced > 0, "the first baseline was announced ('baseline' event)");
        return { throttles: p.throttles, baseline: p.baselineLatencyNs ?? 0, state: p.state, overlapped: pf.budget.overlapped, bytes: p.bytesDone };
      } finally {
        clearInterval(gen);
        await image.close();
      }
    }
    const calm = await run(false);
    const hurt = await run(true);
    // Each request slowed by a copy costs the hurt run ~900 µs of budget that takes ~45 undisturbed
    // requests (90 ms) to earn back, so it copies a small fraction of what the calm run copies in
    // the same 1.5 s (the calm one is held only by the cap, its first baseline and a probe).
    assert.ok(hurt.throttles >= 1 && hurt.overlapped > 0, `hurt: ${hurt.throttles} throttles, ${hurt.overlapped} overlapped`);
    assert.ok(hurt.bytes * 4 < calm.bytes, `hurt copied ${hurt.bytes} bytes, calm ${calm.bytes}`);
    assert.ok(hurt.baseline > 0 && hurt.baseline < 500_000, `baseline ${hurt.baseline} ns should be the idle latency`);
  });
}

test('polled source: a request in flight keeps an overdrawn budget closed; its completion and idleness reopen it', async () => {
  const dir = tmp.caseDir();
  rawBase(dir, 16 * MiB, 21, false);
  const img = path.join(dir, 'img.fvd');
  await FvdImage.create(nodeIo, img, { base: 'base.raw', baseFormat: 'raw' });
  const io = new CountingIo(nodeIo, path.join(dir, 'base.raw'), 64 * KiB, 256);
  const image = await FvdImage.open(io, img, { copyOnRead: false });
  // Requests of 100 µs every 2 ms until a baseline exists and prefetching runs; then ten slow
  // ones (10 ms each: a debt of ~99 ms) and one that stays in flight, and nothing else.
  const totals: ForegroundActivity = { ops: 0, bytes: 0, latencyNs: 0, inFlight: 0 };
  let steady = true;
  const gen = setInterval(() => {
    if (!steady) return;
    totals.ops++;
    totals.latencyNs += 100_000;
  }, 2);
  try {
    const pf = new Prefetcher(image, { chunkBytes: 256 * KiB, maxBytesPerSec: 4 * MiB, seed: 5, minBytesPerSec: 0, activity: () => totals });
    const baseline = new Promise((r) => pf.once('baseline', r));
    pf.start();
    await baseline;
    await waitFor(() => io.bytes > 0, 5000, 'prefetching to start after the baseline');
    steady = false;
    totals.ops += 10;
    totals.latencyNs += 10 * 10_000_000;
    totals.inFlight = 1;
    await sleep(150); // the prefetcher polls (after its chunk, or within ~50–100 ms while waiting)
    await waitFor(() => io.inFlight === 0, 2000, 'the chunk in flight to finish');
    const held = io.bytes;
    // Far longer than idleMs (50): were the request in flight not counted, the foreground would be
    // idle, the debt forgiven and prefetching would go on.
    await sleep(400);
    assert.is(io.bytes, held, 'base read while an overdrawn foreground still had a request in flight');
    totals.inFlight = 0;
    const end = await pf.finished;
    assert.is(end.state, 'done');
    assert.is(io.bytes, 16 * MiB);
  } finally {
    clearInterval(gen);
    await image.close();
  }
});

test('bandwidth cap is honoured', async () => {
  const dir = tmp.caseDir();
  rawBase(dir, 16 * MiB, 17, false);
  const img = path.join(dir, 'img.fvd');
  await FvdImage.create(nodeIo, img, { base: 'base.raw', baseFormat: 'raw' });
  const image = await FvdImage.open(nodeIo, img, { copyOnRead: false });
  const cap = 8 * MiB;
  const t0 = performance.now();
  const end = await new Prefetcher(image, { chunkBytes: 256 * KiB, maxBytesPerSec: cap, seed: 1, minBytesPerSec: 0 }).start().finished;
  const secs = (performance.now() - t0) / 1000;
  await image.close();
  assert.is(end.state, 'done');
  // Ideal: (16 MiB - one free chunk) / 8 MiB/s ≈ 1.97 s. Never faster than the cap allows (a slow
  // machine only makes it slower, so this lower bound cannot flake).
  assert.ok(secs >= 1.8, `too fast for the cap: ${secs.toFixed(2)} s`);
  assert.ok(end.rate <= cap * 1.3, `reported rate ${end.rate}`);
});

// -----------------------------------------------------------------------------------------------
// fvd prefetch

/** Through `fvd` once daemon/cli.ts registers the command; until then a shim with its dispatch. */
const registered = /\bprefetch\b/.test(fvd('--help').stdout);
const SHIM = `
const [cmd, ...rest] = process.argv.slice(1);
const base = ${JSON.stringify(path.dirname(CLI))};
const { UsageError } = await import(base + '/args.js');
const { FvdError } = await import(base + '/../fvd/errors.js');
try { const m = await import(base + '/commands/prefetch.js'); process.exitCode = await m.run(rest); }
catch (e) {
  if (e instanceof UsageError || e instanceof FvdError) { console.error('fvd prefetch: ' + e.message); process.exitCode = 1; }
  else if (e && typeof e.code === 'string' && e.syscall) { console.error('fvd prefetch: ' + (e.path ? e.path + ': ' : '') + e.message.replace(/^[A-Z]+: /, '')); process.exitCode = 1; }
  else { console.error('fvd prefetch: internal error: ' + (e && e.stack)); process.exitCode = 70; }
}`;
function prefetchCli(...args: string[]): CliResult {
  if (registered) return fvd('prefetch', ...args);
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', SHIM, 'prefetch', ...args], { encoding: 'utf8', timeout: 120_000 });
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, cmd: `fvd prefetch ${args.join(' ')}` };
}

test('fvd prefetch: progress and summary on a fresh image; then fully local; nothing to do twice', () => {
  const dir = tmp.caseDir();
  const base = rawBase(dir, 8 * MiB, 23);
  const img = path.join(dir, 'img.fvd');
  assert.is(fvd('create', '-b', 'base.raw', '-F', 'raw', img).code, 0);
  const r = prefetchCli('--max-rate', '16M', '--interval', '0.1', img);
  assertNoCrash(r);
  assert.is(r.code, 0, r.stderr);
  const lines = r.stderr.trim().split('\n');
  assert.ok(lines.length >= 3, `expected several progress lines (not a TTY):\n${r.stderr}`);
  for (const l of lines) assert.match(l, /^prefetch \[[#.]+\]\s+\d+\.\d%  \S+ \S+ \/ \S+ \S+  \S+ \S+\/s  ETA \S+  (running|done|paused)/);
  assert.match(lines[lines.length - 1]!, /100\.0% .* done$/);
  assert.match(r.stdout, /fully local: copied 7 MiB from the base in \d+\.\d s \(.*\/s\); the base image is no longer needed/);
  assert.match(fvd('info', img).stdout, /fully local: yes/);
  const again = prefetchCli(img);
  assert.is(again.code, 0, again.stderr);
  assert.match(again.stdout, /already fully local; nothing to prefetch/);
  fs.renameSync(base.file, path.join(dir, 'elsewhere.raw'));
  const io = fvd('io', '-c', 'read -P 0 0 64k', img);
  assertNoCrash(io);
  const plain = path.join(dir, 'plain.fvd');
  assert.is(fvd('create', plain, '1M').code, 0);
  const none = prefetchCli('-q', plain);
  assert.is(none.code, 0, none.stderr);
  assert.match(none.stdout, /no base image; nothing to prefetch/);
  assert.is(none.stderr, '');
});

test('copy unit per base chain (fvd prefetch and serve alike): 1 MiB local, 8 MiB over HTTP, 2 MiB over NBD', () => {
  assert.is(defaultChunkBytes(['/var/lib/fvd/t.raw']), MiB);
  assert.is(defaultChunkBytes([]), MiB);
  assert.is(defaultChunkBytes(['http://h/t.raw']), 8 * MiB);
  assert.is(defaultChunkBytes(['https://h/b/t.qcow2?X-Amz-Signature=1']), 8 * MiB);
  assert.is(defaultChunkBytes(['nbd://h:10809/t']), 2 * MiB);
  assert.is(defaultChunkBytes(['NBD+UNIX:///t?socket=/run/n.sock']), 2 * MiB);
  assert.is(defaultChunkBytes(['nbds://h/t']), 2 * MiB);
  // A chain that reaches NBD anywhere is read through the NBD client's request size.
  assert.is(defaultChunkBytes(['mid.fvd', 'http://h/m.fvd', 'nbd://h/t']), 2 * MiB);
});

test('fvd prefetch: bad arguments are one-line errors', () => {
  const dir = tmp.caseDir();
  rawBase(dir, 1 * MiB, 29);
  const img = path.join(dir, 'img.fvd');
  assert.is(fvd('create', '-b', 'base.raw', '-F', 'raw', img).code, 0);
  assertOneLineError(prefetchCli(), [/usage: fvd prefetch/]);
  assertOneLineError(prefetchCli(img, img), [/usage/]);
  assertOneLineError(prefetchCli('--max-rate', 'fast', img), [/invalid rate 'fast'/]);
  assertOneLineError(prefetchCli('--max-rate', '0', img), [/rate/]);
  assertOneLineError(prefetchCli('--chunk', '1', img), [/chunk size/]);
  assertOneLineError(prefetchCli('--interval', '-1', img), [/interval/]);
  assertOneLineError(prefetchCli('--bogus', img), [/--bogus/]);
  assertOneLineError(prefetchCli(path.join(dir, 'missing.fvd')), [/missing\.fvd/]);
  fs.renameSync(path.join(dir, 'base.raw'), path.join(dir, 'away.raw'));
  assertOneLineError(prefetchCli(img), [/base image 'base\.raw' not found/]);
});

test.after(() => tmp.cleanup());
test.run();
