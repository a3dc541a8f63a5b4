/**
 * Crash-consistency test: power cuts at many points of a random workload, each with several
 * random choices of which unflushed writes survive, are lost, or are torn at 512-byte sector
 * granularity (tests/helpers/crash-io.ts). After each simulated crash the image must open (journal
 * replay), read back every write that was acknowledged before a completed flush (or completed as
 * FUA, or before a completed clean close), hold in every other sector one of the values the model
 * allows (the last durable value or any later write submitted before the crash: never garbage),
 * close cleanly, and pass checkImage without errors (leaked chunks are reported, not failed).
 * Per crash: checkImage and a read-only open of the crashed image (in-memory replay), then a
 * read-write open (on-disk replay) that must read identically, a clean close, checkImage (sometimes
 * with repair) and a reopen that must still read identically. For a quarter of the crashes a second
 * power cut is injected during recovery; whatever survives must read exactly like the first replay.
 * Crash points favour flushes and (multi-sector) metadata writes: journal commits and checkpoints.
 * Half of the compact runs take an internal snapshot a third of the way in, so the rest of the
 * workload copies shared chunks (FORMAT.md §10.7): after every crash the snapshot must exist iff its
 * creation committed, and hold exactly the disk's content at that time.
 *
 * Snapshot operations under power cuts (FORMAT.md §10.6.4): a workload of writes, flushes and
 * snapshot create/revert/delete, with crashes at many points inside each operation. After each,
 * the image must show either the whole operation or none of it (snapshot names and disk content),
 * every listed snapshot must revert to exactly its content, check must find the refcounts right,
 * and a second crash during recovery must not change the outcome.
 *
 * Replay: FVD_SEED=n (runs only that seed, all four layouts/base combinations; FVD_LAYOUT=raw|compact
 * and FVD_BASE=0|1 narrow it). FVD_STEPS=n sets the workload length, FVD_CRASH_POINTS the crash
 * points per run. Without FVD_SEED a fresh random seed runs besides the fixed ones.
 *
 * Encrypted images (FORMAT.md §11) run the same workloads on their own fixed seed, all four
 * combinations; FVD_ENCRYPT=1 makes a replay (or the fresh seed) encrypted.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import path from 'node:path';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { checkImage } from '../../fvd/check.js';
import { decodeHeader } from '../../fvd/format.js';
import { Rng, envSeed, envSteps, randomSeed } from '../helpers/rng.js';
import { MemIo } from '../helpers/mem-io.js';
import { CrashIo, type TearWeights } from '../helpers/crash-io.js';
import { CrashModel, DiskModel, SECTOR, V_INITIAL, firstMismatch, makeData, makeFvdBase, type DataStyle } from '../helpers/model.js';

async function rejects(p: Promise<unknown>): Promise<void> {
  try {
    await p;
  } catch {
    return;
  }
  assert.unreachable('expected a rejection');
}

test('rng: deterministic and roughly uniform', () => {
  const a = new Rng(42), b = new Rng(42), c = new Rng(43);
  const xa = Array.from({ length: 50 }, () => a.u32());
  const xb = Array.from({ length: 50 }, () => b.u32());
  const xc = Array.from({ length: 50 }, () => c.u32());
  assert.equal(xa, xb);
  assert.not.equal(xa, xc);
  const r = new Rng(7);
  const counts = new Array(10).fill(0);
  for (let i = 0; i < 100000; i++) counts[r.int(10)]++;
  for (const n of counts) assert.ok(n > 9000 && n < 11000, `bucket ${n}`);
  const f = new Rng(1).bytes(13);
  assert.equal([...f], [...new Rng(1).bytes(13)]);
});

test('mem-io: sparse reads, writes, zeroRange, truncate, reordering', async () => {
  const io = new MemIo({ rng: new Rng(5) });
  await rejects(io.open('/x/none'));
  const f = await io.open('/x/a', { create: true });
  await f.write(new Uint8Array([1, 2, 3, 4]), 10);
  assert.is(f.size(), 14);
  const b = new Uint8Array(8).fill(9);
  await f.read(b, 8);
  assert.equal([...b], [0, 0, 1, 2, 3, 4, 0, 0]);
  await f.zeroRange(11, 2);
  await f.read(b, 8);
  assert.equal([...b], [0, 0, 1, 0, 0, 4, 0, 0]);
  assert.is(f.size(), 14);
  await f.truncate(12);
  await f.truncate(20);
  await f.read(b, 8);
  assert.equal([...b], [0, 0, 1, 0, 0, 0, 0, 0]);
  // Reordering: many concurrent writes complete in a seed-dependent order.
  const order = async (seed: number): Promise<number[]> => {
    const io2 = new MemIo({ rng: new Rng(seed) });
    const g = await io2.open('/o', { create: true });
    const done: number[] = [];
    await Promise.all(Array.from({ length: 20 }, (_, i) => g.write(new Uint8Array([i]), i).then(() => done.push(i))));
    return done;
  };
  const o1 = await order(1), o1b = await order(1), o2 = await order(2);
  assert.equal(o1, o1b);
  assert.not.equal(o1, [...o1].sort((x, y) => x - y));
  assert.not.equal(o1, o2);
  const ro = await io.open('/x/a', { readOnly: true });
  await rejects(ro.write(new Uint8Array(1), 0));
  await ro.close();
  await rejects(ro.read(new Uint8Array(1), 0));
});

test('crash-io: durability boundaries and tearing', async () => {
  const mem = new MemIo();
  mem.writeFile('/c/f', new Uint8Array(4096).fill(0xaa));
  const cio = new CrashIo(mem);
  cio.startRecording();
  const f = await cio.open('/c/f');
  const s = (v: number, n = 512): Uint8Array => new Uint8Array(n).fill(v);
  await f.write(s(1), 0); // durable after the flush
  const k0 = cio.seq;
  await f.flush();
  const kFlushed = cio.seq;
  await f.write(s(2, 2048), 512); // not durable: kept/lost/torn per sector
  await f.zeroRange(0, 512);
  const kEnd = cio.seq;
  const rng = new Rng(3);
  const sectorOf = (io: MemIo, i: number): number => io.readFile('/c/f')[i * 512]!;
  // Before the flush completed: write #1 may or may not be there.
  const seen0 = new Set<number>();
  for (let i = 0; i < 50; i++) seen0.add(sectorOf(cio.rebuild(k0 + 1, rng).io, 0));
  assert.equal([...seen0].sort(), [0x1, 0xaa].sort());
  // After the flush: write #1 is always there (unless zeroed by the later zeroRange).
  for (let i = 0; i < 50; i++) assert.is(sectorOf(cio.rebuild(kFlushed, rng).io, 0), 1);
  const seenEnd = new Set<number>();
  const torn = new Set<string>();
  for (let i = 0; i < 200; i++) {
    const r = cio.rebuild(kEnd, rng);
    seenEnd.add(sectorOf(r.io, 0));
    const pattern = [1, 2, 3, 4].map((j) => sectorOf(r.io, j)).join(',');
    torn.add(pattern);
    for (let j = 1; j <= 4; j++) assert.ok([2, 0xaa].includes(sectorOf(r.io, j)));
    assert.ok(r.io.readFile('/c/f').length === 4096);
  }
  assert.equal([...seenEnd].sort(), [0, 1]);
  assert.ok(torn.size >= 8, `tearing should produce mixtures, saw ${torn.size}`);
  // Crash point 0: the initial state exactly.
  assert.ok(cio.rebuild(0, rng).io.readFile('/c/f').every((b) => b === 0xaa));
  // Flush semantics: a write completing after the flush was issued is not covered by it.
  const mem2 = new MemIo({ rng: new Rng(9) });
  mem2.writeFile('/c/g', new Uint8Array(0));
  const c2 = new CrashIo(mem2);
  c2.startRecording();
  const g = await c2.open('/c/g');
  const w = g.write(s(7), 0);
  const fl = g.flush();
  await Promise.all([w, fl]);
  const we = c2.events.find((e) => e.kind === 'write')!;
  const fe = c2.events.find((e) => e.kind === 'flush')!;
  assert.ok(we.end! > fe.start);
  let lostSeen = false;
  for (let i = 0; i < 50; i++) if (c2.rebuild(c2.seq, rng).io.readFile('/c/g').length === 0) lostSeen = true;
  assert.ok(lostSeen, 'a write racing a flush must be allowed to be lost');
  // Files created while recording exist after a crash.
  const h = await c2.open('/c/new', { create: true });
  await h.write(s(5), 0);
  assert.ok(c2.rebuild(c2.seq, rng).io.exists('/c/new'));
});

test('model: allowed versions per sector', () => {
  const m = new CrashModel(2048, new Uint8Array(2048).fill(3));
  const d = (v: number): Uint8Array => new Uint8Array(512).fill(v);
  const w1 = m.beginWrite(0, 512, d(1), false, 10, 'w');
  m.ackWrite(w1, 12);
  const f = m.beginFlush(12);
  m.ackFlush(f, 15);
  const w2 = m.beginWrite(0, 512, d(2), false, 15, 'w');
  m.ackWrite(w2, 17);
  const w3 = m.beginWrite(512, 512, d(4), true, 17, 'w');
  m.ackWrite(w3, 19);
  assert.equal(m.allowed(0, 11).ids, [V_INITIAL, w1]);
  assert.equal(m.allowed(0, 14).ids, [V_INITIAL, w1]);
  assert.equal(m.allowed(0, 15).ids, [w1]);
  assert.equal(m.allowed(0, 16).ids, [w1, w2]);
  assert.equal(m.allowed(1, 18).ids, [V_INITIAL, w3]);
  assert.equal(m.allowed(1, 19).ids, [w3]);
  assert.equal(m.check(new Uint8Array(512).fill(1), 0, 20), []);
  assert.equal(m.check(new Uint8Array(512).fill(2), 0, 20), []);
  assert.is(m.check(new Uint8Array(512).fill(3), 0, 20).length, 1);
  assert.is(m.check(new Uint8Array(512).fill(3), 512, 19).length, 1);
  assert.equal(m.check(new Uint8Array(512).fill(3), 1024, 19), []);
});


// ------------------------------------------------------------------------------------------------
// Deterministic regressions for crash bugs the randomized test found (compact layout over a base:
// a block's bitmap bit and its chunk's table entry must become durable together, or the table
// entry first; bits without the mapping make base data read as zeros).

const RB = 4096;
const RC = 65536;

async function regressionImage(journalSize: number): Promise<{ mem: MemIo; cio: CrashIo; img: FvdImage; path: string }> {
  const vsize = 4 * 1024 * 1024;
  const mem = new MemIo();
  mem.writeFile('/reg/base.raw', new Uint8Array(vsize).fill(0x11));
  const cio = new CrashIo(mem);
  const p = '/reg/disk.fvd';
  await FvdImage.create(cio, p, { size: vsize, base: 'base.raw', baseFormat: 'raw', layout: 'compact', blockSize: RB, chunkSize: RC, journalSize });
  cio.startRecording();
  const img = await FvdImage.open(cio, p);
  return { mem, cio, img, path: p };
}

/** Blocks at `offsets` got 0xab in their first sector (maybe lost: unflushed); all else is base 0x11. */
async function expectOldOrNew(io: MemIo, p: string, offsets: number[], what: string): Promise<void> {
  const img = await FvdImage.open(io, p, { readOnly: true });
  const buf = new Uint8Array(RB);
  const bad: string[] = [];
  for (const off of offsets) {
    await img.read(buf, off);
    const first = buf[0]!;
    const restOk = buf.subarray(SECTOR).every((b) => b === 0x11);
    if (!((first === 0xab || first === 0x11) && buf.subarray(0, SECTOR).every((b) => b === first) && restOk)) {
      bad.push(`block at ${off}: first sector ${first.toString(16)}, rest ${restOk ? 'base data' : `not base data (byte ${SECTOR}: ${buf[SECTOR]!.toString(16)})`}`);
    }
  }
  await img.close();
  assert.ok(bad.length === 0, `${what}: ${bad.length} of ${offsets.length} written blocks read neither old nor new data, e.g. ${bad.slice(0, 3).join('; ')}`);
}

test('regression: a chunk whose mapping was logged but whose first data write was lost (past the end of the file) reads as zeros; recovery extends the file', async () => {
  // FORMAT.md §4.3 lets a new chunk's TABLE_SET be logged before its data write when the chunk
  // lies past everything ever written; a power cut can keep the log and lose the write, leaving
  // the entry past the end of the file. Build that state: two chunks allocated and logged, the
  // image abandoned dirty, the file cut back to end before the second chunk's storage.
  const mem = new MemIo();
  const p = '/eof/disk.fvd';
  await FvdImage.create(mem, p, { size: 4 * RC, layout: 'compact', blockSize: RB, chunkSize: RC, journalSize: 64 * KiB });
  let img = await FvdImage.open(mem, p);
  await img.write(new Uint8Array(SECTOR).fill(0xab), 0);
  await img.write(new Uint8Array(SECTOR).fill(0xcd), 3 * RC);
  await img.flush();
  await img.abandon();
  const h = decodeHeader(p, mem.readFile(p).subarray(0, SECTOR), mem.readFile(p).length);
  const crashed = mem.readFile(p).subarray(0, h.dataOffset + RC);
  mem.writeFile(p, crashed);

  const check = await checkImage(mem, p);
  assert.equal(check.errors, [], 'a dirty image with a mapping past the end of the file is a legal crash state');
  const buf = new Uint8Array(SECTOR);
  img = await FvdImage.open(mem, p, { readOnly: true });
  await img.read(buf, 3 * RC);
  assert.ok(buf.every((b) => b === 0), 'the lost chunk reads as zeros (read-only, in-memory replay)');
  await img.close();

  img = await FvdImage.open(mem, p);
  assert.is(mem.readFile(p).length, h.dataOffset + 2 * RC, 'recovery extends the file over the mapped chunk');
  await img.read(buf, 0);
  assert.ok(buf.every((b) => b === 0xab));
  await img.close();
  assert.equal((await checkImage(mem, p)).errors, []);
  img = await FvdImage.open(mem, p, { readOnly: true });
  await img.read(buf, 3 * RC);
  assert.ok(buf.every((b) => b === 0));
  await img.close();

  // The same cut on a cleanly closed image is a truncated file, and still refused.
  mem.writeFile(p, mem.readFile(p).subarray(0, h.dataOffset + RC));
  assert.match((await checkImage(mem, p)).errors.join('; '), /beyond the end of the file/);
});

test('regression: a torn multi-sector journal commit never exposes bitmap bits without their table entries', async () => {
  const { mem, cio, img, path: p } = await regressionImage(64 * KiB);
  // 40 one-sector writes to every other block (40 bitmap runs, 3 new chunks) commit together.
  const offsets = Array.from({ length: 40 }, (_, i) => i * 2 * RB);
  await Promise.all(offsets.map((off) => img.write(new Uint8Array(SECTOR).fill(0xab), off)));
  await img.flush();
  const h = decodeHeader(p, mem.readFile(p).subarray(0, SECTOR), mem.readFile(p).length);
  const key = MemIo.key(p);
  const commits = cio.events.filter(
    (e) => e.path === key && e.kind === 'write' && e.offset >= h.journalOffset && e.offset < h.journalOffset + h.journalLength && e.length > SECTOR,
  );
  for (const jw of commits) {
    const n = jw.length / SECTOR;
    for (let prefix = 1; prefix < n; prefix++) {
      // Power cut after the commit's write completed but before its closing flush: only the first
      // `prefix` sectors reached the disk; everything else that was written is there.
      const io = cio.rebuildWith(jw.end! + 1, (e, sectors) => (e === jw ? Array.from({ length: sectors }, (_, i) => i < prefix) : 'keep')).io;
      await expectOldOrNew(io, p, offsets, `journal write @${jw.offset}+${jw.length} torn after ${prefix} sector(s)`);
    }
  }
  await img.close();
});

test('regression: a power cut inside a checkpoint (bitmap written in place, table not yet) loses no mapping', async () => {
  const { mem, cio, img, path: p } = await regressionImage(8 * KiB);
  // One write into a fresh chunk per flush: one journal sector each; the 8 KiB journal fills and
  // a later flush checkpoints (in-place bitmap and table writes, then the header).
  const offsets: number[] = [];
  for (let i = 0; i < 40; i++) {
    offsets.push(i * RC);
    await img.write(new Uint8Array(SECTOR).fill(0xab), i * RC);
    await img.flush();
  }
  const h = decodeHeader(p, mem.readFile(p).subarray(0, SECTOR), mem.readFile(p).length);
  const key = MemIo.key(p);
  const inPlace = cio.events.filter(
    (e) =>
      e.path === key &&
      e.kind === 'write' &&
      ((e.offset >= h.bitmapOffset && e.offset < h.bitmapOffset + h.bitmapLength) || (e.offset >= h.tableOffset && e.offset < h.tableOffset + h.tableLength)),
  );
  assert.ok(inPlace.length > 0, 'the workload should have checkpointed');
  for (const e of inPlace) {
    for (const k of [e.start + 1, e.end! + 1]) {
      await expectOldOrNew(cio.rebuildWith(k, () => 'keep').io, p, offsets, `power cut at ${k} around the in-place metadata write @${e.offset}+${e.length} [${e.start},${e.end}], all issued writes reached the disk`);
      await expectOldOrNew(cio.rebuildWith(k, (x) => (x === e ? 'keep' : 'lose')).io, p, offsets, `power cut at ${k}: only the in-place metadata write @${e.offset}+${e.length} of the unflushed writes reached the disk`);
    }
  }
  await img.close();
});

// ------------------------------------------------------------------------------------------------
// The engine under power cuts.

const KiB = 1024;
const MiB = 1024 * 1024;

interface CrashConfig {
  layout: 'raw' | 'compact';
  base: boolean;
  /** Format of the base when there is one. */
  baseFormat: 'raw' | 'fvd';
  vsize: number;
  baseSize: number;
  blockSize: number;
  chunkSize: number;
  journalSize: number;
  detectZeroes: boolean;
  copyOnRead: boolean;
  /** Key material when the image is encrypted. */
  key?: Uint8Array;
  /** Compact layout: take an internal snapshot a third of the way into the workload. */
  snapshot: boolean;
}

function describeConfig(c: CrashConfig): string {
  return `layout=${c.layout} base=${c.base ? `${c.baseFormat}(${c.baseSize})` : 'none'} vsize=${c.vsize} block=${c.blockSize} chunk=${c.chunkSize} journal=${c.journalSize} detectZeroes=${c.detectZeroes} copyOnRead=${c.copyOnRead}${c.key ? ' encrypted' : ''}${c.snapshot ? ' snapshot' : ''}`;
}

interface Workload {
  cfg: CrashConfig;
  cio: CrashIo;
  model: CrashModel;
  imagePath: string;
  /** Crash points start here: create has returned. */
  firstPoint: number;
  trace: string[];
  /** Interesting crash points (around flushes and metadata writes). */
  hints: number[];
  /** Crash points while a multi-sector metadata write is in flight or just completed. */
  multi: number[];
  /** The snapshot taken during the workload: its creation's span and the content it must hold. */
  snap?: { name: string; start: number; end: number; content: Uint8Array };
}

const DIR = '/crash';

/** Runs the workload; returns everything needed to rebuild crash states. */
async function runWorkload(seed: number, cfg: CrashConfig, steps: number): Promise<Workload> {
  const r = new Rng(seed);
  const mem = new MemIo({ rng: new Rng(seed ^ 0x2545f491) });
  const imagePath = path.join(DIR, 'disk.fvd');
  let initial: Uint8Array = new Uint8Array(0);
  const opts: CreateOptions = {
    size: cfg.vsize,
    layout: cfg.layout,
    blockSize: cfg.blockSize,
    chunkSize: cfg.chunkSize,
    journalSize: cfg.journalSize,
    detectZeroes: cfg.detectZeroes,
    encrypt: cfg.key ? { key: cfg.key, kdf: { log2N: 10, r: 1 } } : undefined,
  };
  if (cfg.base && cfg.baseFormat === 'raw') {
    initial = r.bytes(cfg.baseSize);
    for (let b = 0; b * cfg.blockSize < cfg.baseSize; b++) {
      if (r.chance(0.3)) initial.fill(0, b * cfg.blockSize, Math.min(cfg.baseSize, (b + 1) * cfg.blockSize));
    }
    mem.writeFile(path.join(DIR, 'base.raw'), initial);
    opts.base = 'base.raw';
    opts.baseFormat = 'raw';
  } else if (cfg.base) {
    // An FVD base written through the engine (before recording): random extents over zeros.
    const basePath = path.join(DIR, 'base.fvd');
    initial = await makeFvdBase(mem, basePath, cfg.baseSize, cfg.blockSize, r, 60, 32);
    opts.base = basePath;
    opts.baseFormat = 'fvd';
  }
  const cio = new CrashIo(mem);
  cio.startRecording();
  const model = new CrashModel(cfg.vsize, initial);
  const live = new DiskModel(cfg.vsize, initial);
  const trace: string[] = [];
  const ctxLabel = (s: string) => `FVD_SEED=${seed} ${describeConfig(cfg)}: ${s}`;

  await FvdImage.create(cio, imagePath, opts);
  const firstPoint = cio.seq;
  cio.mark('created');
  const img = await FvdImage.open(cio, imagePath, { copyOnRead: cfg.copyOnRead, key: cfg.key });
  cio.mark('opened');
  let writeId = 0;
  const bs = cfg.blockSize;
  const blocks = Math.ceil(cfg.vsize / bs);

  const pickRange = (): [number, number] => {
    const kind = r.weighted([35, 35, 15, 15]);
    if (kind === 0) {
      // Whole new block(s), often beyond the base or over a base block never touched.
      const b = r.int(blocks);
      const off = b * bs;
      return [off, Math.min(cfg.vsize - off, bs * r.range(1, 3))];
    }
    if (kind === 1) {
      // Partial block: copy-on-write of the rest.
      const off = r.int(cfg.vsize / SECTOR) * SECTOR;
      return [off, Math.min(cfg.vsize - off, r.range(1, (bs / SECTOR) * 2) * SECTOR)];
    }
    if (kind === 2) {
      // Across a chunk boundary.
      const c = r.range(1, Math.max(1, Math.floor(cfg.vsize / cfg.chunkSize)));
      const off = Math.max(0, Math.min(cfg.vsize - SECTOR, c * cfg.chunkSize - r.range(1, 16) * SECTOR));
      return [off, Math.min(cfg.vsize - off, r.range(2, 32) * SECTOR)];
    }
    const off = r.int(cfg.vsize / SECTOR) * SECTOR;
    return [off, Math.min(cfg.vsize - off, r.range(1, 128) * SECTOR)];
  };
  const style = (): DataStyle => r.pick(['random', 'random', 'random', 'zero', 'mixed'] as const);

  const submitWrite = (kind: 'write' | 'fua' | 'discard' | 'zeroes', off: number, len: number): Promise<void> => {
    const seq = cio.seq;
    let data: Uint8Array | undefined;
    if (kind === 'write' || kind === 'fua') data = makeData(r, len, ++writeId, off, style());
    const what = kind === 'write' || kind === 'fua' ? `write#${writeId}` : kind;
    trace.push(`[seq ${seq}] ${what} ${off}+${len}${kind === 'fua' ? ' fua' : ''}`);
    const id = model.beginWrite(off, len, data, kind === 'fua', seq, what);
    if (data) live.write(data, off);
    else live.zero(off, len);
    const p =
      kind === 'discard' ? img.discard(off, len)
        : kind === 'zeroes' ? img.writeZeroes(off, len)
          : img.write(data!, off, kind === 'fua');
    return p.then(() => model.ackWrite(id, cio.seq));
  };
  const submitFlush = (): Promise<void> => {
    const seq = cio.seq;
    trace.push(`[seq ${seq}] flush`);
    const id = model.beginFlush(seq);
    return img.flush().then(() => {
      model.ackFlush(id, cio.seq);
      cio.mark(`flush acked (submitted at ${seq})`);
    });
  };
  const submitRead = (off: number, len: number): Promise<void> => {
    const expected = live.data.slice(off, off + len);
    const buf = new Uint8Array(len);
    return img.read(buf, off).then(() => {
      const m = new DiskModel(len, expected).compare(buf, 0);
      if (m) throw new Error(ctxLabel(`live read ${off}+${len} before any crash: ${m} (relative to ${off})`));
    });
  };

  // Flush frequency varies per run: long stretches without a flush make big group commits.
  const flushWeight = r.pick([2, 8, 16]);
  let snap: Workload['snap'];
  for (let i = 0; i < steps; i++) {
    if (cfg.snapshot && i === Math.floor(steps / 3)) {
      // Every write so far completed: the snapshot holds exactly the live content.
      const start = cio.seq;
      trace.push(`[seq ${start}] snapshot create`);
      await img.snapshots.create('crash-snap');
      snap = { name: 'crash-snap', start, end: cio.seq, content: live.data.slice() };
      cio.mark('snapshot created');
    }
    const op = r.weighted([30, 6, 6, flushWeight, 4, 12, 22, 3, 6]);
    if (op === 8) {
      // Many small writes to scattered blocks at once: many bitmap runs / table entries per commit.
      const ps: Promise<void>[] = [];
      const used = new Set<number>();
      const n = r.range(8, 64);
      for (let j = 0; j < n; j++) {
        const b = r.int(blocks);
        if (used.has(b)) continue;
        used.add(b);
        const off = b * bs + r.int(bs / SECTOR) * SECTOR;
        const len = Math.min(cfg.vsize - off, (b + 1) * bs - off, r.range(1, 4) * SECTOR);
        if (len <= 0) continue;
        ps.push(submitWrite(r.chance(0.9) ? 'write' : 'zeroes', off, len));
      }
      const res = await Promise.allSettled(ps);
      for (const x of res) if (x.status === 'rejected') throw x.reason;
      continue;
    }
    if (op === 0) {
      const [off, len] = pickRange();
      await submitWrite('write', off, len);
    } else if (op === 1) {
      const [off, len] = pickRange();
      await submitWrite('fua', off, len);
    } else if (op === 2) {
      let [off, len] = pickRange();
      if (r.chance(0.4)) {
        // Whole chunks: compact images unmap them and later reuse the storage.
        const c = r.int(Math.ceil(cfg.vsize / cfg.chunkSize));
        off = c * cfg.chunkSize;
        len = Math.min(cfg.vsize - off, cfg.chunkSize * r.range(1, 2));
      }
      await submitWrite(r.chance(0.5) ? 'discard' : 'zeroes', off, len);
    } else if (op === 3 || op === 4) {
      await submitFlush();
    } else if (op === 5) {
      const [off, len] = pickRange();
      await submitRead(off, len);
    } else if (op === 6) {
      // A concurrent batch on disjoint sector ranges (often inside the same block).
      const n = r.range(2, 6);
      const taken: Array<[number, number]> = [];
      const ps: Promise<void>[] = [];
      const around = r.int(blocks) * bs;
      for (let j = 0; j < n; j++) {
        let off: number, len: number;
        if (r.chance(0.5)) {
          off = Math.min(cfg.vsize - SECTOR, around + r.int((2 * bs) / SECTOR) * SECTOR);
          len = Math.min(cfg.vsize - off, r.range(1, bs / SECTOR) * SECTOR);
        } else [off, len] = pickRange();
        if (taken.some(([o, l]) => off < o + l && o < off + len)) continue;
        taken.push([off, len]);
        const k = r.weighted([40, 10, 10, 25]);
        if (k === 3) ps.push(submitRead(off, len));
        else ps.push(submitWrite(k === 0 ? 'write' : k === 1 ? 'fua' : r.chance(0.5) ? 'discard' : 'zeroes', off, len));
      }
      if (r.chance(0.25)) ps.push(submitFlush());
      const res = await Promise.allSettled(ps);
      for (const x of res) if (x.status === 'rejected') throw x.reason;
    } else {
      await img.idle();
    }
  }
  // A clean close at the end counts as a flush: everything acknowledged must survive it.
  await img.idle();
  const closeSeq = cio.seq;
  trace.push(`[seq ${closeSeq}] close`);
  const fid = model.beginFlush(closeSeq);
  await img.close();
  model.ackFlush(fid, cio.seq);
  cio.mark('closed');

  const hints: number[] = [];
  const multi: number[] = [];
  const key = MemIo.key(imagePath);
  const dataOffset = Number(new DataView(mem.readFile(imagePath).buffer).getBigUint64(160, true)); // fvd/format.ts
  for (const e of cio.events) {
    if (e.end === undefined) continue;
    if (e.kind === 'flush') hints.push(e.start, e.start + 1, e.end, e.end + 1);
    else if (e.path === key && e.kind === 'write' && e.offset < dataOffset) {
      hints.push(e.start + 1, e.end);
      // Multi-sector metadata writes (journal group commits, checkpoints) are where tearing bites.
      if (e.length > SECTOR) multi.push(e.start + 1, e.end, e.end + 1);
    }
  }
  return { cfg, cio, model, imagePath, firstPoint, trace, hints, multi, snap };
}

/** Reads the whole virtual disk. */
async function readDisk(img: FvdImage): Promise<Uint8Array> {
  const all = new Uint8Array(img.size);
  for (let off = 0; off < img.size; off += 256 * KiB) await img.read(all.subarray(off, Math.min(img.size, off + 256 * KiB)), off);
  return all;
}

/**
 * On a copy of a recovered image: the snapshots listed are exactly `expect` (names), and reverting
 * to each one reads exactly its recorded content. Returns a problem description or null.
 */
async function verifySnapshotContents(io: MemIo, imagePath: string, names: string[], contents: Map<string, Uint8Array>, key?: Uint8Array): Promise<string | null> {
  const copy = MemIo.fromSnapshot(io.snapshot());
  const img = await FvdImage.open(copy, imagePath, { copyOnRead: false, key });
  try {
    for (const name of names) {
      await img.snapshots.revert(name);
      const d = firstMismatch(contents.get(name)!, await readDisk(img), 0);
      if (d) return `snapshot '${name}' does not hold its content: ${d}`;
    }
  } finally {
    await img.close();
  }
  return null;
}

interface CrashStats {
  points: number;
  recoveries: number;
  leaks: number;
  kept: number;
  lost: number;
  torn: number;
  doubleCrashes: number;
  snapshotChecks: number;
}

async function recoverAndCheck(seed: number, w: Workload, k: number, tearSeed: number, weights: TearWeights, stats: CrashStats): Promise<void> {
  const rebuilt = w.cio.rebuild(k, new Rng(tearSeed), weights);
  stats.kept += rebuilt.kept;
  stats.lost += rebuilt.lost;
  stats.torn += rebuilt.torn;
  const io = rebuilt.io;
  const where = () => {
    const marks = w.cio.marks.filter((m) => m.seq <= k).slice(-3).map((m) => `${m.label}@${m.seq}`).join(', ');
    const recent = w.trace.filter((t) => Number(/seq (\d+)/.exec(t)?.[1]) < k).slice(-12);
    return (
      `FVD_SEED=${seed} crash point k=${k} of ${w.cio.seq} (tear seed ${tearSeed}, weights ${JSON.stringify(weights)})\n` +
      `  config: ${describeConfig(w.cfg)}\n  recent marks: ${marks}\n  recent operations:\n    ${recent.join('\n    ')}\n` +
      `  non-durable I/O at the crash (${rebuilt.choices.length}):\n    ${rebuilt.choices.slice(-15).join('\n    ')}`
    );
  };
  const readAll = async (img: FvdImage, label: string): Promise<Uint8Array> => {
    const all = new Uint8Array(w.cfg.vsize);
    const chunk = 64 * KiB;
    for (let off = 0; off < w.cfg.vsize; off += chunk) {
      const len = Math.min(chunk, w.cfg.vsize - off);
      try {
        await img.read(all.subarray(off, off + len), off);
      } catch (err) {
        throw new Error(`${label}: read ${off}+${len} failed after the crash: ${(err as Error).message}\n${where()}`);
      }
    }
    const problems = w.model.check(all, 0, k, 5);
    if (problems.length) throw new Error(`${label}: wrong data after the crash:\n  ${problems.join('\n  ')}\n${where()}`);
    return all;
  };
  const checked = async (label: string, repair = false): Promise<{ errors: string[]; leaks: number }> => {
    let res: Awaited<ReturnType<typeof checkImage>>;
    try {
      res = await checkImage(io, w.imagePath, { repair, key: w.cfg.key });
    } catch (err) {
      throw new Error(`${label}: checkImage threw: ${(err as Error).stack}\n${where()}`);
    }
    if (res.errors.length) throw new Error(`${label}: checkImage errors: ${res.errors.join('; ')}\n${where()}`);
    if (res.overcounts || res.undercounts) throw new Error(`${label}: wrong refcounts: ${res.notes.join('; ')}\n${where()}`);
    return res;
  };
  // 1. The crashed image as found: check (replays the journal in memory) and a read-only open.
  await checked('checkImage of the crashed image');
  let ro: FvdImage;
  try {
    ro = await FvdImage.open(io, w.imagePath, { readOnly: true, key: w.cfg.key });
  } catch (err) {
    throw new Error(`image does not open read-only after the crash: ${(err as Error).message}\n${where()}`);
  }
  const roData = await readAll(ro, 'read-only open');
  const roSnaps = ro.snapshots.count ? ro.snapshots.list().map((s) => s.name) : [];
  await ro.close();
  if (w.snap) {
    // The snapshot exists iff its creation committed (between its start and end), and then holds
    // exactly the content it was taken with, whatever the copy-on-writes since were doing.
    const has = roSnaps.includes(w.snap.name);
    if (k <= w.snap.start && has) throw new Error(`the snapshot exists at a crash before its creation began\n${where()}`);
    if (k >= w.snap.end && !has) throw new Error(`the snapshot is missing at a crash after its creation returned\n${where()}`);
    if (has) {
      const problem = await verifySnapshotContents(io, w.imagePath, [w.snap.name], new Map([[w.snap.name, w.snap.content]]), w.cfg.key);
      if (problem) throw new Error(`${problem}\n${where()}`);
      stats.snapshotChecks++;
    }
  }
  // 1b. Sometimes: a second power cut during recovery (replay, checkpoint, clean close). Recovery
  // changes only metadata, so whatever survives must still read exactly like the replay above.
  if (tearSeed % 4 === 1) {
    const cio2 = new CrashIo(MemIo.fromSnapshot(io.snapshot()));
    cio2.startRecording();
    try {
      const rec = await FvdImage.open(cio2, w.imagePath, { copyOnRead: false, key: w.cfg.key });
      await rec.close();
    } catch (err) {
      throw new Error(`recovery failed: ${(err as Error).message}\n${where()}`);
    }
    const r2 = new Rng(tearSeed);
    for (let j = 0; j < 2; j++) {
      const k2 = r2.range(0, cio2.seq);
      const io2 = cio2.rebuild(k2, r2).io;
      const label = `second crash at k2=${k2} of ${cio2.seq} during recovery`;
      let again: FvdImage;
      try {
        again = await FvdImage.open(io2, w.imagePath, { readOnly: j === 0, key: w.cfg.key });
      } catch (err) {
        throw new Error(`${label}: image does not open: ${(err as Error).message}\n${where()}`);
      }
      const data = await readAll(again, label);
      await again.close();
      const d = firstMismatch(roData, data, 0);
      if (d) throw new Error(`${label}: content differs from the first replay: ${d}\n${where()}`);
      const res2 = await checkImage(io2, w.imagePath, { key: w.cfg.key });
      if (res2.errors.length) throw new Error(`${label}: checkImage errors: ${res2.errors.join('; ')}\n${where()}`);
    }
    stats.doubleCrashes += 2;
  }
  // 2. Read-write open (replays the journal on disk): the same content, then a clean close.
  let img: FvdImage;
  try {
    img = await FvdImage.open(io, w.imagePath, { copyOnRead: (tearSeed & 1) === 0, key: w.cfg.key });
  } catch (err) {
    throw new Error(`image does not open after the crash: ${(err as Error).message}\n${where()}`);
  }
  const rwData = await readAll(img, 'read-write open');
  const diff = firstMismatch(roData, rwData, 0);
  if (diff) throw new Error(`read-write recovery differs from the read-only replay: ${diff}\n${where()}`);
  try {
    await img.idle();
    await img.close();
  } catch (err) {
    throw new Error(`close after recovery failed: ${(err as Error).message}\n${where()}`);
  }
  // 3. Clean now: check (sometimes repairing), reopen read-only, same content.
  const res = await checked('checkImage after recovery', (tearSeed & 6) === 0);
  const again = await FvdImage.open(io, w.imagePath, { readOnly: true, key: w.cfg.key });
  const againData = await readAll(again, 'reopen after recovery');
  await again.close();
  const diff2 = firstMismatch(rwData, againData, 0);
  if (diff2) throw new Error(`content changed across clean close/check/reopen after recovery: ${diff2}\n${where()}`);
  stats.leaks += res.leaks;
  stats.recoveries++;
}

function crashConfig(r: Rng, layout: 'raw' | 'compact', base: boolean): CrashConfig {
  const vsize = r.range(1, 2) * MiB + (r.chance(0.5) ? r.range(1, 7) * SECTOR : 0);
  return {
    layout,
    base,
    vsize,
    baseSize: base ? r.pick([vsize, vsize - r.range(1, 20) * SECTOR, Math.floor(vsize / 2) + r.range(0, 7) * SECTOR]) : 0,
    blockSize: 4 * KiB,
    chunkSize: 64 * KiB,
    journalSize: r.pick([8 * KiB, 8 * KiB, 16 * KiB, 64 * KiB]),
    detectZeroes: layout === 'raw' ? r.chance(0.7) : r.chance(0.3),
    copyOnRead: r.chance(0.6),
    baseFormat: r.chance(0.25) ? 'fvd' : 'raw',
    snapshot: layout === 'compact' && r.chance(0.5),
  };
}

const CRASH_KEY = Buffer.from('crash test key');

async function runCrashSeed(seed: number, layout: 'raw' | 'compact', base: boolean, steps: number, points: number, encrypted = false): Promise<void> {
  const t0 = Date.now();
  const r = new Rng(seed ^ (layout === 'compact' ? 0x1000 : 0) ^ (base ? 0x2000 : 0));
  const cfg = crashConfig(r, layout, base);
  if (encrypted) cfg.key = CRASH_KEY;
  let w: Workload;
  try {
    w = await runWorkload(seed, cfg, steps);
  } catch (err) {
    throw new Error(`FVD_SEED=${seed} ${describeConfig(cfg)}: workload failed before any crash: ${(err as Error).stack}`);
  }
  const total = w.cio.seq;
  const candidates = new Set<number>([w.firstPoint, total]);
  for (const h of w.hints) if (h >= w.firstPoint && h <= total && r.chance(0.5)) candidates.add(h);
  const list = [...candidates];
  r.shuffle(list);
  const chosen = list.slice(0, Math.floor(points / 3));
  const multi = r.shuffle(w.multi.filter((h) => h >= w.firstPoint && h <= total));
  chosen.push(...multi.slice(0, Math.floor(points / 3)));
  while (chosen.length < points) chosen.push(r.range(w.firstPoint, total));
  chosen.sort((a, b) => a - b);
  const multiSet = new Set(w.multi);
  const stats: CrashStats = { points: chosen.length, recoveries: 0, leaks: 0, kept: 0, lost: 0, torn: 0, doubleCrashes: 0, snapshotChecks: 0 };
  const weightSets: TearWeights[] = [
    { keep: 1, lose: 1, tear: 1 },
    { keep: 4, lose: 1, tear: 2 },
    { keep: 0, lose: 1, tear: 0 },
    { keep: 1, lose: 0, tear: 0 },
  ];
  for (const k of chosen) {
    const tears = multiSet.has(k) ? 4 : r.range(2, 3);
    for (let t = 0; t < tears; t++) {
      const weights = t === 0 ? r.pick(weightSets) : weightSets[0]!;
      await recoverAndCheck(seed, w, k, r.u32(), weights, stats);
    }
  }
  const journalWrites = journalWriteCount(w);
  console.log(
    `  crash FVD_SEED=${seed} ${layout} ${base ? 'base' : 'no-base'}${encrypted ? ' encrypted' : ''}: ${stats.recoveries} recoveries at ${stats.points} points of ${total} ok in ${Date.now() - t0} ms ` +
      `(${stats.doubleCrashes} crashes during recovery; kept ${stats.kept} lost ${stats.lost} torn ${stats.torn}; leaked chunks ${stats.leaks}; ` +
      `${cfg.snapshot ? `snapshot verified after ${stats.snapshotChecks} crashes; ` : ''}${journalWrites}; ${describeConfig(cfg)})`,
  );
}

/** Counts writes that landed in the journal region and to the header (checkpoints), for coverage. */
function journalWriteCount(w: Workload): string {
  const key = MemIo.key(w.imagePath);
  let header = 0, journalBytes = 0;
  // Journal position from the final header: bytes 104..119 (journal offset, length), see fvd/format.ts.
  const img = w.cio.rebuild(w.cio.seq, new Rng(1), { keep: 1, lose: 0, tear: 0 }).io.readFile(w.imagePath);
  const dv = new DataView(img.buffer, img.byteOffset, img.byteLength);
  const jOff = Number(dv.getBigUint64(104, true));
  const jLen = Number(dv.getBigUint64(112, true));
  for (const e of w.cio.events) {
    if (e.path !== key || e.kind !== 'write') continue;
    if (e.offset < SECTOR) header++;
    else if (e.offset >= jOff && e.offset < jOff + jLen) journalBytes += e.length;
  }
  return `header writes ${header}, journal bytes written ${journalBytes} = ${(journalBytes / Math.max(1, jLen)).toFixed(1)}× the journal`;
}


// ------------------------------------------------------------------------------------------------
// Snapshot operations under power cuts: each create, revert and delete is all-or-nothing.

interface SnapState {
  names: string[];
  content: Uint8Array;
}

interface SnapOp {
  label: string;
  /** cio.seq when the operation was called and when it returned. */
  start: number;
  end: number;
  before: SnapState;
  after: SnapState;
}

interface SnapWorkload {
  cio: CrashIo;
  imagePath: string;
  ops: SnapOp[];
  /** Every snapshot ever taken: its content. */
  contents: Map<string, Uint8Array>;
  describe: string;
}

const SNAP_DIR = '/snapcrash';

async function runSnapshotWorkload(seed: number, withBase: boolean): Promise<SnapWorkload> {
  const r = new Rng(seed ^ 0x51a9 ^ (withBase ? 0x400 : 0));
  const mem = new MemIo({ rng: new Rng(seed ^ 0x7f4a7c15) });
  const blockSize = 4 * KiB;
  const chunkSize = 64 * KiB;
  const vsize = r.range(1, 2) * MiB + (r.chance(0.5) ? r.range(1, 7) * SECTOR : 0);
  const journalSize = r.pick([8 * KiB, 16 * KiB, 64 * KiB]);
  const copyOnRead = withBase && r.chance(0.5);
  const opts: CreateOptions = { size: vsize, layout: 'compact', blockSize, chunkSize, journalSize, detectZeroes: false };
  let initial: Uint8Array = new Uint8Array(0);
  if (withBase) {
    initial = r.bytes(vsize - r.range(0, 20) * SECTOR);
    mem.writeFile(path.join(SNAP_DIR, 'base.raw'), initial);
    opts.base = 'base.raw';
    opts.baseFormat = 'raw';
  }
  const imagePath = path.join(SNAP_DIR, 'disk.fvd');
  await FvdImage.create(mem, imagePath, opts);
  const cio = new CrashIo(mem);
  cio.startRecording();
  let img = await FvdImage.open(cio, imagePath, { copyOnRead });
  const live = new DiskModel(vsize, initial);
  const snaps = new Map<string, Uint8Array>();
  const contents = new Map<string, Uint8Array>();
  const ops: SnapOp[] = [];
  const state = (): SnapState => ({ names: [...snaps.keys()].sort(), content: live.data.slice() });
  let writeId = 0;
  let nameSeq = 0;
  for (let phase = 0; phase < 12; phase++) {
    // Writes into shared chunks (copies, from the base too), whole chunks, discards; then a flush,
    // so that the state before the operation is exactly the live one.
    for (let i = r.range(1, 6); i > 0; i--) {
      const kind = r.weighted([40, 40, 20]);
      let off: number;
      let len: number;
      if (kind === 0) {
        off = r.int(Math.ceil(vsize / chunkSize)) * chunkSize;
        len = Math.min(vsize - off, chunkSize);
      } else {
        off = r.int(vsize / SECTOR) * SECTOR;
        len = Math.min(vsize - off, r.range(1, 64) * SECTOR);
      }
      if (kind === 2) {
        live.zero(off, len);
        await img.discard(off, len);
      } else {
        const data = makeData(r, len, ++writeId, off, 'random');
        live.write(data, off);
        await img.write(data, off);
      }
    }
    await img.flush();
    if (r.chance(0.15)) {
      await img.close();
      img = await FvdImage.open(cio, imagePath, { copyOnRead });
    }
    const names = [...snaps.keys()];
    const kind = names.length === 0 ? 0 : r.weighted([names.length < 3 ? 45 : 0, 30, 25]);
    const before = state();
    const start = cio.seq;
    let label: string;
    if (kind === 0) {
      const name = `s${++nameSeq}`;
      await img.snapshots.create(name);
      snaps.set(name, live.data.slice());
      contents.set(name, live.data.slice());
      label = `create ${name}`;
    } else if (kind === 1) {
      const name = r.pick(names);
      await img.snapshots.revert(name);
      live.data.set(snaps.get(name)!);
      label = `revert ${name}`;
    } else {
      const name = r.pick(names);
      await img.snapshots.delete(name);
      snaps.delete(name);
      label = `delete ${name}`;
    }
    ops.push({ label, start, end: cio.seq, before, after: state() });
  }
  await img.close();
  const describe = `vsize=${vsize} base=${withBase} journal=${journalSize} copyOnRead=${copyOnRead}`;
  return { cio, imagePath, ops, contents, describe };
}

function sameState(names: string[], content: Uint8Array, s: SnapState): boolean {
  return names.join('\n') === s.names.join('\n') && !firstMismatch(s.content, content, 0);
}

async function checkSnapshotCrash(seed: number, w: SnapWorkload, op: SnapOp, k: number, tearSeed: number, weights: TearWeights): Promise<boolean> {
  const rebuilt = w.cio.rebuild(k, new Rng(tearSeed), weights);
  const io = rebuilt.io;
  const where = () =>
    `FVD_SEED=${seed} snapshot operation '${op.label}' [${op.start}, ${op.end}], crash point k=${k} (tear seed ${tearSeed}, weights ${JSON.stringify(weights)}; ${w.describe})\n` +
    `  non-durable I/O at the crash (${rebuilt.choices.length}):\n    ${rebuilt.choices.slice(-12).join('\n    ')}`;
  const look = async (from: MemIo, label: string, readOnly: boolean): Promise<{ names: string[]; content: Uint8Array }> => {
    let img: FvdImage;
    try {
      img = await FvdImage.open(from, w.imagePath, { readOnly, copyOnRead: false });
    } catch (err) {
      throw new Error(`${label}: the image does not open: ${(err as Error).message}\n${where()}`);
    }
    const names = img.snapshots.list().map((s) => s.name).sort();
    const content = await readDisk(img);
    await img.close();
    return { names, content };
  };
  const ro = await look(io, 'read-only open after the crash', true);
  const isBefore = sameState(ro.names, ro.content, op.before);
  const isAfter = sameState(ro.names, ro.content, op.after);
  if (!isBefore && !isAfter) {
    const d = firstMismatch(op.before.content, ro.content, 0) ?? 'same content';
    const d2 = firstMismatch(op.after.content, ro.content, 0) ?? 'same content';
    throw new Error(
      `half an operation: snapshots ${JSON.stringify(ro.names)} (before ${JSON.stringify(op.before.names)}, after ${JSON.stringify(op.after.names)}); ` +
        `content vs before: ${d}; vs after: ${d2}\n${where()}`,
    );
  }
  if (k <= op.start && !isBefore) throw new Error(`the operation shows before it began\n${where()}`);
  if (k >= op.end && !isAfter) throw new Error(`the operation is missing after it returned\n${where()}`);
  // Every listed snapshot holds its content (on a copy: recovery, then a revert to each).
  const problem = await verifySnapshotContents(io, w.imagePath, ro.names, w.contents);
  if (problem) throw new Error(`${problem}\n${where()}`);
  // A second power cut during recovery (redo of a revert, replay, checkpoint) changes nothing.
  if (tearSeed % 3 === 0) {
    const cio2 = new CrashIo(MemIo.fromSnapshot(io.snapshot()));
    cio2.startRecording();
    const rec = await FvdImage.open(cio2, w.imagePath, { copyOnRead: false });
    await rec.close();
    const r2 = new Rng(tearSeed);
    const k2 = r2.range(0, cio2.seq);
    const again = await look(cio2.rebuild(k2, r2).io, `second crash at k2=${k2} of ${cio2.seq} during recovery`, r2.chance(0.5));
    if (!sameState(again.names, again.content, { names: ro.names, content: ro.content }))
      throw new Error(`a second crash at k2=${k2} of ${cio2.seq} during recovery changed the outcome\n${where()}`);
  }
  const res = await checkImage(io, w.imagePath, { repair: (tearSeed & 4) === 0 });
  if (res.errors.length || res.overcounts || res.undercounts)
    throw new Error(`checkImage after the crash: ${[...res.errors, ...res.notes].join('; ')}\n${where()}`);
  const rw = await look(io, 'after recovery and check', true);
  if (!sameState(rw.names, rw.content, { names: ro.names, content: ro.content })) throw new Error(`recovery changed the outcome\n${where()}`);
  return isAfter;
}

async function runSnapshotCrashSeed(seed: number, withBase: boolean, pointsPerOp: number): Promise<void> {
  const t0 = Date.now();
  let w: SnapWorkload;
  try {
    w = await runSnapshotWorkload(seed, withBase);
  } catch (err) {
    throw new Error(`FVD_SEED=${seed} snapshot workload failed before any crash: ${(err as Error).stack}`);
  }
  const r = new Rng(seed ^ 0xc0ffee);
  const key = MemIo.key(w.imagePath);
  let recoveries = 0;
  let committed = 0;
  const weightSets: TearWeights[] = [
    { keep: 1, lose: 1, tear: 1 },
    { keep: 4, lose: 1, tear: 2 },
    { keep: 0, lose: 1, tear: 0 },
    { keep: 1, lose: 0, tear: 0 },
  ];
  for (const op of w.ops) {
    // The header writes (commit points) and the flushes around them, plus random points.
    const points = new Set<number>([op.start, op.end]);
    for (const e of w.cio.events) {
      if (e.start < op.start || e.start >= op.end || e.end === undefined) continue;
      if ((e.path === key && e.kind === 'write' && e.offset < SECTOR) || e.kind === 'flush') for (const p of [e.start, e.start + 1, e.end, e.end + 1]) points.add(p);
    }
    const list = r.shuffle([...points].filter((p) => p >= op.start && p <= op.end)).slice(0, pointsPerOp);
    while (list.length < pointsPerOp && op.end > op.start) list.push(r.range(op.start, op.end));
    for (const k of list) {
      for (let t = 0; t < 2; t++) {
        if (await checkSnapshotCrash(seed, w, op, k, r.u32(), t === 0 ? r.pick(weightSets) : weightSets[0]!)) committed++;
        recoveries++;
      }
    }
  }
  console.log(
    `  snapshot crash FVD_SEED=${seed} ${withBase ? 'base' : 'no-base'}: ${recoveries} recoveries in ${w.ops.length} operations ` +
      `(${w.ops.map((o) => o.label.split(' ')[0]).join(',')}) ok in ${Date.now() - t0} ms; ${committed} showed the operation, ${recoveries - committed} not (${w.describe})`,
  );
}

const only = envSeed();
const steps = envSteps(200);
const FIXED = [11, 12, 14];
/** FVD_SEEDS=n: how many fresh random seeds (default 1); FVD_SEEDS_ONLY=1 skips the fixed ones. */
const fresh = Array.from({ length: Number(process.env.FVD_SEEDS ?? 1) }, () => randomSeed());
const seeds = only !== undefined ? [only] : [...(process.env.FVD_SEEDS_ONLY ? [] : FIXED), ...fresh];
if (only === undefined) console.log(`crash: fresh seeds ${fresh.map((s) => `FVD_SEED=${s}`).join(' ')} (replay with FVD_SEED=n); workload steps ${steps}`);
const POINTS = Number(process.env.FVD_CRASH_POINTS ?? 40);

/** FVD_LAYOUT=raw|compact and FVD_BASE=0|1 narrow a replay. */
const layouts = (['raw', 'compact'] as const).filter((l) => !process.env.FVD_LAYOUT || process.env.FVD_LAYOUT === l);
const bases = [false, true].filter((b) => !process.env.FVD_BASE || (process.env.FVD_BASE === '1') === b);
const ENC_FIXED = [13];
const encrypt = !!process.env.FVD_ENCRYPT;
const encSeeds = only !== undefined ? [] : process.env.FVD_SEEDS_ONLY ? [] : ENC_FIXED;
const SNAP_POINTS = Number(process.env.FVD_SNAPSHOT_POINTS ?? 10);
for (const seed of seeds) {
  if (layouts.includes('compact')) {
    for (const base of bases) {
      test(`snapshot operations under power cuts FVD_SEED=${seed} ${base ? 'with base' : 'no base'}`, async () => {
        await runSnapshotCrashSeed(seed, base, SNAP_POINTS);
      });
    }
  }
  for (const layout of layouts) {
    for (const base of bases) {
      test(`crash FVD_SEED=${seed} ${layout} ${base ? 'with base' : 'no base'}${encrypt ? ' encrypted' : ''}`, async () => {
        await runCrashSeed(seed, layout, base, steps, POINTS, encrypt);
      });
    }
  }
}
for (const seed of encSeeds) {
  for (const layout of layouts) {
    for (const base of bases) {
      test(`crash FVD_SEED=${seed} ${layout} ${base ? 'with base' : 'no base'} encrypted (FVD_ENCRYPT=1)`, async () => {
        await runCrashSeed(seed, layout, base, steps, POINTS, true);
      });
    }
  }
}

test.run();
