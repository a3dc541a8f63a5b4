/**
 * Randomized differential test: the engine against a plain in-memory truth image.
 *
 * Every seed derives a configuration (layout, base kind and size, block/chunk sizes, journal size,
 * zero detection, copy-on-read) and a workload of reads, writes, discards, writeZeroes, flushes,
 * clean reopens, read-only reopens and concurrent batches on non-overlapping ranges (including
 * reads and writes to different parts of the same block, which races copy-on-read and
 * copy-on-write). Compact images also create, revert to and delete internal snapshots (the model
 * keeps a copy of the disk per snapshot; at the end every snapshot is reverted to and compared).
 * Every read is compared with the model.
 *
 * The mem backend reorders completions with a seeded rng (tests/helpers/mem-io.ts), so a seed
 * replays exactly, interleavings included; the fs backend (node:fs in a temp dir) replays the same
 * operations, though the thread pool's interleaving is not under our control.
 *
 * Replay: FVD_SEED=n (runs only that seed; FVD_BACKEND=mem|fs narrows it). FVD_STEPS=n sets the
 * steps per seed; FVD_TRACE=1 prints every operation. Without FVD_SEED, 40 fixed seeds (mem) and 4
 * (fs) run, plus FVD_SEEDS (default 2) fresh random seeds on both backends, printed first;
 * FVD_SEEDS_ONLY=1 skips the fixed seeds (for soaking).
 *
 * Encrypted variant (FORMAT.md §11): the same workloads on encrypted images (key given at every
 * open; check sometimes without it), on their own fixed seeds plus one fresh seed per backend.
 * Encrypted runs also issue writes, write-zeroes and discards that start or end inside a sector,
 * and batches whose pieces share sectors (concurrent read-modify-writes of one sector).
 * Replay with FVD_SEED=n FVD_ENCRYPT=1.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { IoBackend } from '../../fvd/io.js';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { FvdError } from '../../fvd/errors.js';
import { nodeIo } from '../../storage/node-file.js';
import { checkImage } from '../../fvd/check.js';
import { Rng, envSeed, envSteps, randomSeed } from '../helpers/rng.js';
import { MemIo } from '../helpers/mem-io.js';
import { DiskModel, SECTOR, firstMismatch, makeData, makeFvdBase, type DataStyle } from '../helpers/model.js';

type Backend = 'mem' | 'fs';

interface Config {
  vsize: number;
  layout: 'raw' | 'compact';
  base: 'none' | 'raw' | 'fvd';
  baseSize: number;
  /** Base path as written into the image: relative or absolute. */
  relativeBase: boolean;
  blockSize: number;
  chunkSize: number;
  journalSize?: number;
  detectZeroes: boolean;
  copyOnRead: boolean;
}

const KiB = 1024;
const MiB = 1024 * 1024;

function chooseConfig(r: Rng): Config {
  const blockSize = r.pick([4 * KiB, 4 * KiB, 4 * KiB, 8 * KiB, 16 * KiB]);
  const chunkSize = Math.max(blockSize, r.pick([64 * KiB, 64 * KiB, 16 * KiB, 128 * KiB]));
  let vsize = r.range(1, 3) * MiB;
  if (r.chance(0.5)) vsize += r.range(1, 15) * SECTOR; // not a block multiple
  const base = r.pick(['none', 'raw', 'raw', 'raw', 'fvd'] as const);
  let baseSize = 0;
  if (base !== 'none') {
    baseSize = r.pick([
      vsize,
      vsize - r.range(1, 64) * SECTOR, // ends mid-block
      Math.floor(vsize / 2 / SECTOR) * SECTOR + r.range(0, 9) * SECTOR,
      Math.floor(vsize / 3 / blockSize) * blockSize, // block-aligned, much smaller
    ]);
  }
  return {
    vsize,
    layout: r.chance(0.5) ? 'compact' : 'raw',
    base,
    baseSize,
    relativeBase: r.chance(0.5),
    blockSize,
    chunkSize,
    journalSize: r.pick([undefined, 8 * KiB, 16 * KiB, 64 * KiB]),
    detectZeroes: r.chance(0.7),
    copyOnRead: r.chance(0.6),
  };
}

function describe(c: Config): string {
  return (
    `vsize=${c.vsize} layout=${c.layout} base=${c.base}` +
    (c.base !== 'none' ? `(${c.baseSize}${c.relativeBase ? ', relative' : ''})` : '') +
    ` block=${c.blockSize} chunk=${c.chunkSize} journal=${c.journalSize ?? 'default'}` +
    ` detectZeroes=${c.detectZeroes} copyOnRead=${c.copyOnRead}`
  );
}

/** Raw base content: random, with whole zero blocks, partly zero blocks and zero runs. */
function makeBaseContent(r: Rng, size: number, blockSize: number): Uint8Array {
  const buf = r.bytes(size);
  for (let b = 0; b * blockSize < size; b++) {
    const start = b * blockSize;
    const end = Math.min(size, start + blockSize);
    const x = r.float();
    if (x < 0.3) buf.fill(0, start, end);
    else if (x < 0.4) {
      const cut = start + r.int((end - start) / SECTOR) * SECTOR;
      if (r.chance(0.5)) buf.fill(0, start, cut);
      else buf.fill(0, cut, end);
    }
  }
  return buf;
}

class Failure extends Error {}

interface Ctx {
  seed: number;
  backend: Backend;
  cfg: Config;
  io: IoBackend;
  dir: string;
  imagePath: string;
  r: Rng;
  model: DiskModel;
  img: FvdImage;
  step: number;
  trace: string[];
  writeId: number;
  stats: Record<string, number>;
  /** Encrypted image: its key material, given at every open. */
  key?: Uint8Array;
  /** Internal snapshots (compact layout): name → the disk's content when it was taken. */
  snaps: Map<string, Uint8Array>;
  snapSeq: number;
}

function fail(ctx: Ctx, what: string, detail: string): never {
  throw new Failure(
    `FVD_SEED=${ctx.seed} FVD_BACKEND=${ctx.backend} step ${ctx.step}: ${what}: ${detail}\n` +
      `  config: ${describe(ctx.cfg)}\n  last operations (oldest first):\n    ${ctx.trace.slice(-25).join('\n    ')}`,
  );
}

async function guard<T>(ctx: Ctx, what: string, p: () => Promise<T>): Promise<T> {
  try {
    return await p();
  } catch (err) {
    if (err instanceof Failure) throw err;
    fail(ctx, what, `engine threw ${(err as Error)?.stack ?? String(err)}`);
  }
}

const TRACE = !!process.env.FVD_TRACE;

function note(ctx: Ctx, s: string): void {
  if (TRACE) console.log(`  [${ctx.backend} ${ctx.step}] ${s}`);
  ctx.trace.push(`[${ctx.step}] ${s}`);
  if (ctx.trace.length > 200) ctx.trace.splice(0, 100);
}

/** A sector-aligned range biased towards block, chunk, base-end and disk-end boundaries. */
function pickRange(ctx: Ctx, maxLen = 512 * KiB): [number, number] {
  const { r, cfg } = ctx;
  const sectors = cfg.vsize / SECTOR;
  const lenSectors = (() => {
    switch (r.weighted([50, 30, 15, 5])) {
      case 0: return r.range(1, 8);
      case 1: return r.range(1, (2 * cfg.blockSize) / SECTOR);
      case 2: return r.range(1, (2 * cfg.chunkSize) / SECTOR);
      default: return r.range(1, maxLen / SECTOR);
    }
  })();
  let start: number;
  const a = r.weighted([25, 20, cfg.baseSize && cfg.baseSize < cfg.vsize ? 30 : 5, 10, 15]);
  if (a === 4) start = r.int(sectors);
  else {
    const unit = a === 0 ? cfg.blockSize : a === 1 ? cfg.chunkSize : 0;
    let anchor: number;
    if (unit) anchor = r.int(Math.ceil(cfg.vsize / unit) + 1) * unit;
    else if (a === 2 && cfg.baseSize) anchor = cfg.baseSize;
    else anchor = cfg.vsize;
    const anchorSector = Math.floor(anchor / SECTOR);
    const delta = a === 2 && r.chance(0.5) ? r.range(0, cfg.blockSize / SECTOR) : r.range(-8, 8); // base tail block
    start = anchorSector + delta - (r.chance(0.3) ? Math.floor(lenSectors / 2) : 0);
  }
  start = Math.max(0, Math.min(sectors - 1, start));
  const len = Math.max(1, Math.min(lenSectors, sectors - start));
  return [start * SECTOR, len * SECTOR];
}

/**
 * Encrypted runs: sometimes moves the ends of a range off sector boundaries (by up to a sector
 * either way), so writes, write-zeroes and discards exercise the read-modify-write of partial
 * sectors (FORMAT.md §11.3). Plain runs draw nothing here, so their seeds replay as before.
 */
function maybeUnalign(ctx: Ctx, off: number, len: number): [number, number] {
  const { r, cfg } = ctx;
  if (!ctx.key || !r.chance(0.35)) return [off, len];
  const a = Math.max(0, off + r.range(-511, 511));
  let end = Math.min(cfg.vsize, off + len + r.range(-511, 511));
  if (end <= a) end = Math.min(cfg.vsize, a + r.range(1, 600));
  if (end <= a) return [off, len];
  if (a % SECTOR || end % SECTOR) ctx.stats.unaligned = (ctx.stats.unaligned ?? 0) + 1;
  return [a, end - a];
}

function dataStyle(r: Rng): DataStyle {
  return r.pick(['random', 'random', 'random', 'random', 'zero', 'mixed', 'mixed', 'fill'] as const);
}

async function doRead(ctx: Ctx, off: number, len: number, expected: Uint8Array, label: string): Promise<void> {
  const buf = new Uint8Array(len);
  buf.fill(0xee);
  await guard(ctx, label, () => ctx.img.read(buf, off));
  const mismatch = firstMismatch(expected, buf, off);
  if (mismatch) fail(ctx, label, mismatch);
  ctx.stats.reads = (ctx.stats.reads ?? 0) + 1;
}

interface BatchOp {
  kind: 'read' | 'write' | 'fua' | 'discard' | 'zeroes' | 'flush';
  off: number;
  len: number;
}

function planBatch(ctx: Ctx): BatchOp[] {
  const { r, cfg } = ctx;
  const ops: BatchOp[] = [];
  const kinds: BatchOp['kind'][] = ['read', 'read', 'read', 'write', 'write', 'write', 'fua', 'discard', 'zeroes'];
  if (r.chance(0.6)) {
    // Split one region (a block, two blocks, or a chunk) into disjoint pieces.
    const unit = r.pick([cfg.blockSize, 2 * cfg.blockSize, cfg.chunkSize]);
    let regionStart = r.int(Math.ceil(cfg.vsize / unit)) * unit;
    if (r.chance(0.3) && cfg.baseSize) regionStart = Math.floor(cfg.baseSize / unit) * unit;
    if (r.chance(0.3)) regionStart += cfg.blockSize / 2; // straddle a block boundary
    const regionEnd = Math.min(cfg.vsize, regionStart + unit);
    if (regionStart >= regionEnd) return ops;
    const cuts = new Set<number>([regionStart, regionEnd]);
    const n = r.range(1, 7);
    for (let i = 0; i < n; i++) {
      // Encrypted runs: some cuts inside sectors, so neighbouring pieces share a sector and
      // their read-modify-writes race (the sector gate must keep both updates).
      if (ctx.key && r.chance(0.3)) cuts.add(regionStart + r.int(regionEnd - regionStart));
      else cuts.add(regionStart + r.int((regionEnd - regionStart) / SECTOR) * SECTOR);
    }
    const points = [...cuts].sort((x, y) => x - y);
    for (let i = 0; i + 1 < points.length; i++) {
      if (r.chance(0.15)) continue;
      ops.push({ kind: r.pick(kinds), off: points[i]!, len: points[i + 1]! - points[i]! });
    }
  } else {
    const taken: Array<[number, number]> = [];
    const n = r.range(2, 8);
    for (let i = 0; i < n; i++) {
      const [off, len] = pickRange(ctx, 128 * KiB);
      if (taken.some(([o, l]) => off < o + l && o < off + len)) continue;
      taken.push([off, len]);
      ops.push({ kind: r.pick(kinds), off, len });
    }
  }
  if (r.chance(0.2)) ops.push({ kind: 'flush', off: 0, len: 0 });
  return r.shuffle(ops);
}

async function runBatch(ctx: Ctx): Promise<void> {
  const ops = planBatch(ctx);
  if (ops.length === 0) return;
  const label = `batch[${ops.map((o) => (o.kind === 'flush' ? 'flush' : `${o.kind} ${o.off}+${o.len}`)).join(', ')}]`;
  note(ctx, label);
  const promises: Promise<void>[] = [];
  for (const op of ops) {
    switch (op.kind) {
      case 'read': {
        const expected = ctx.model.data.slice(op.off, op.off + op.len);
        promises.push(doRead(ctx, op.off, op.len, expected, `${label}: read ${op.off}+${op.len}`));
        break;
      }
      case 'write':
      case 'fua': {
        const data = makeData(ctx.r, op.len, ++ctx.writeId, op.off, dataStyle(ctx.r));
        ctx.model.write(data, op.off);
        promises.push(guard(ctx, `${label}: write`, () => ctx.img.write(data, op.off, op.kind === 'fua')));
        break;
      }
      case 'discard':
        ctx.model.zero(op.off, op.len);
        promises.push(guard(ctx, `${label}: discard`, () => ctx.img.discard(op.off, op.len)));
        break;
      case 'zeroes':
        ctx.model.zero(op.off, op.len);
        promises.push(guard(ctx, `${label}: writeZeroes`, () => ctx.img.writeZeroes(op.off, op.len)));
        break;
      case 'flush':
        promises.push(guard(ctx, `${label}: flush`, () => ctx.img.flush()));
        break;
    }
  }
  // Wait for all (a failure anywhere is reported once everything settled).
  const results = await Promise.allSettled(promises);
  for (const res of results) if (res.status === 'rejected') throw res.reason;
  ctx.stats.batches = (ctx.stats.batches ?? 0) + 1;
}

async function verifyAll(ctx: Ctx, label: string): Promise<void> {
  let off = 0;
  while (off < ctx.cfg.vsize) {
    const len = Math.min(ctx.cfg.vsize - off, ctx.r.range(1, 256) * 4 * KiB - (ctx.r.chance(0.5) ? SECTOR : 0));
    await doRead(ctx, off, len, ctx.model.data.slice(off, off + len), `${label}: read ${off}+${len}`);
    off += len;
  }
}

/** checkImage on the closed image must find no errors; with repair it must not change the data. */
async function check(ctx: Ctx, label: string, repair = false): Promise<void> {
  note(ctx, `checkImage${repair ? ' --repair' : ''}`);
  const res = await guard(ctx, `${label}: checkImage`, () => checkImage(ctx.io, ctx.imagePath, { repair, key: ctx.key && ctx.r.chance(0.5) ? ctx.key : undefined }));
  if (res.errors.length) fail(ctx, `${label}: checkImage`, `errors: ${res.errors.join('; ')}`);
  // Unreferenced chunks after a clean close are free space by design (reused by later writes).
  ctx.stats.unreferenced = Math.max(ctx.stats.unreferenced ?? 0, res.leaks);
  if (res.overcounts || res.undercounts) fail(ctx, `${label}: checkImage`, `refcounts wrong: ${res.notes.join('; ')}`);
  if (res.snapshots !== ctx.snaps.size) fail(ctx, `${label}: checkImage`, `${res.snapshots} snapshots, the model has ${ctx.snaps.size}`);
  if (repair) {
    const again = await guard(ctx, `${label}: checkImage after repair`, () => checkImage(ctx.io, ctx.imagePath));
    if (again.errors.length) fail(ctx, `${label}: checkImage after repair`, `errors: ${again.errors.join('; ')}`);
  }
}

async function reopen(ctx: Ctx): Promise<void> {
  await guard(ctx, 'close', () => ctx.img.close());
  if (ctx.r.chance(0.3)) await check(ctx, 'after close', ctx.r.chance(0.3));
  if (ctx.r.chance(0.2)) {
    note(ctx, 'open read-only');
    const ro = await guard(ctx, 'open read-only', () => FvdImage.open(ctx.io, ctx.imagePath, { readOnly: true, key: ctx.key }));
    ctx.img = ro;
    for (let i = 0; i < 3; i++) {
      const [off, len] = pickRange(ctx);
      await doRead(ctx, off, len, ctx.model.data.slice(off, off + len), `read-only read ${off}+${len}`);
    }
    let threw = false;
    try {
      await ro.write(new Uint8Array(SECTOR), 0);
    } catch {
      threw = true;
    }
    if (!threw) fail(ctx, 'read-only write', 'a write to a read-only image succeeded');
    if (ctx.cfg.layout === 'compact') expectSnapshots(ctx, 'read-only open');
    await guard(ctx, 'close read-only', () => ro.close());
  }
  const copyOnRead = ctx.r.chance(0.5) ? ctx.cfg.copyOnRead : !ctx.cfg.copyOnRead;
  const maxCopyOnReadBytes = ctx.r.chance(0.2) ? ctx.r.pick([ctx.cfg.blockSize, 2 * ctx.cfg.blockSize, 64 * KiB]) : undefined;
  note(ctx, `reopen copyOnRead=${copyOnRead} maxCopyOnReadBytes=${maxCopyOnReadBytes ?? 'default'}`);
  ctx.img = await guard(ctx, 'open', () => FvdImage.open(ctx.io, ctx.imagePath, { copyOnRead, key: ctx.key, ...(maxCopyOnReadBytes ? { maxCopyOnReadBytes } : {}) }));
  ctx.stats.reopens = (ctx.stats.reopens ?? 0) + 1;
}

/** The engine's snapshot names must be the model's. */
function expectSnapshots(ctx: Ctx, label: string): void {
  const names = ctx.img.snapshots.list().map((s) => s.name).sort();
  const want = [...ctx.snaps.keys()].sort();
  if (names.join('\n') !== want.join('\n')) fail(ctx, label, `snapshots ${JSON.stringify(names)}, expected ${JSON.stringify(want)}`);
}

/** Create, revert to or delete an internal snapshot (compact images), or a refused request. */
async function snapshotStep(ctx: Ctx): Promise<void> {
  const { r, model } = ctx;
  const names = [...ctx.snaps.keys()];
  const kind = names.length === 0 ? 0 : r.weighted([names.length < 6 ? 40 : 0, 30, 25, 5]);
  if (kind === 0) {
    const name = r.pick([`s${++ctx.snapSeq}`, `snap ${ctx.snapSeq} ü`, `before-${ctx.snapSeq}`]);
    note(ctx, `snapshot create ${JSON.stringify(name)}`);
    await guard(ctx, `snapshot create ${name}`, () => ctx.img.snapshots.create(name));
    ctx.snaps.set(name, model.data.slice());
    ctx.stats.snapCreates = (ctx.stats.snapCreates ?? 0) + 1;
  } else if (kind === 1) {
    const name = r.pick(names);
    note(ctx, `snapshot revert ${JSON.stringify(name)}`);
    await guard(ctx, `snapshot revert ${name}`, () => ctx.img.snapshots.revert(name));
    model.data.set(ctx.snaps.get(name)!);
    ctx.stats.snapReverts = (ctx.stats.snapReverts ?? 0) + 1;
  } else if (kind === 2) {
    const name = r.pick(names);
    note(ctx, `snapshot delete ${JSON.stringify(name)}`);
    await guard(ctx, `snapshot delete ${name}`, () => ctx.img.snapshots.delete(name));
    ctx.snaps.delete(name);
    ctx.stats.snapDeletes = (ctx.stats.snapDeletes ?? 0) + 1;
  } else {
    // Refused requests change nothing: a duplicate name, an unknown name.
    const dup = r.pick(names);
    note(ctx, `snapshot create duplicate ${JSON.stringify(dup)} / revert unknown`);
    for (const p of [() => ctx.img.snapshots.create(dup), () => ctx.img.snapshots.revert(`${dup}-missing`)]) {
      let err: unknown = null;
      try {
        await p();
      } catch (e) {
        err = e;
      }
      if (!(err instanceof FvdError)) fail(ctx, 'refused snapshot request', `expected an FvdError, got ${String(err)}`);
    }
  }
  expectSnapshots(ctx, 'after a snapshot operation');
}

async function step(ctx: Ctx): Promise<void> {
  const { r, model } = ctx;
  const snapshots = ctx.cfg.layout === 'compact' ? 4 : 0;
  switch (r.weighted([25, 25, 6, 6, 5, 3, 2, 18, 3, 1, snapshots])) {
    case 0: {
      const [off, len] = pickRange(ctx);
      note(ctx, `read ${off}+${len}`);
      await doRead(ctx, off, len, model.data.slice(off, off + len), `read ${off}+${len}`);
      break;
    }
    case 1: {
      const [off, len] = maybeUnalign(ctx, ...pickRange(ctx));
      const style = dataStyle(r);
      const fua = r.chance(0.1);
      const data = makeData(r, len, ++ctx.writeId, off, style);
      note(ctx, `write#${ctx.writeId} ${off}+${len} ${style}${fua ? ' fua' : ''}`);
      model.write(data, off);
      await guard(ctx, `write ${off}+${len}`, () => ctx.img.write(data, off, fua));
      break;
    }
    case 2: {
      const [off, len] = maybeUnalign(ctx, ...pickRange(ctx));
      note(ctx, `discard ${off}+${len}`);
      model.zero(off, len);
      await guard(ctx, `discard ${off}+${len}`, () => ctx.img.discard(off, len));
      break;
    }
    case 3: {
      const [off, len] = maybeUnalign(ctx, ...pickRange(ctx));
      note(ctx, `writeZeroes ${off}+${len}`);
      model.zero(off, len);
      await guard(ctx, `writeZeroes ${off}+${len}`, () => ctx.img.writeZeroes(off, len));
      break;
    }
    case 4:
      note(ctx, 'flush');
      await guard(ctx, 'flush', () => ctx.img.flush());
      break;
    case 5:
      await reopen(ctx);
      break;
    case 6:
      note(ctx, 'idle');
      await guard(ctx, 'idle', () => ctx.img.idle());
      break;
    case 7:
      await runBatch(ctx);
      break;
    case 8: {
      // Overlapping concurrent reads of one range (two copy-on-reads of the same blocks) racing a
      // write to a different part of the same block(s).
      const bs = ctx.cfg.blockSize;
      const first = r.int(Math.ceil(ctx.cfg.vsize / bs)) * bs;
      const end = Math.min(ctx.cfg.vsize, first + bs * r.range(1, 2));
      const cut = first + r.range(1, Math.max(1, (end - first) / SECTOR - 1)) * SECTOR;
      if (cut >= end) break;
      const [ra, rb, wa, wb] = r.chance(0.5) ? [first, cut, cut, end] : [cut, end, first, cut];
      const data = makeData(r, wb - wa, ++ctx.writeId, wa, dataStyle(r));
      const label = `reads ${ra}+${rb - ra} x2 racing write#${ctx.writeId} ${wa}+${wb - wa}`;
      note(ctx, label);
      const expected = model.data.slice(ra, rb);
      model.write(data, wa);
      const results = await Promise.allSettled([
        doRead(ctx, ra, rb - ra, expected, `${label}: read 1`),
        guard(ctx, `${label}: write`, () => ctx.img.write(data, wa)),
        doRead(ctx, ra, rb - ra, expected, `${label}: read 2`),
      ]);
      for (const res of results) if (res.status === 'rejected') throw res.reason;
      break;
    }
    case 9:
      note(ctx, 'verify all');
      await verifyAll(ctx, 'verify all');
      break;
    default:
      await snapshotStep(ctx);
  }
}

const ENC_KEY = Buffer.from('differential test key');

async function setup(seed: number, backend: Backend, encrypted: boolean): Promise<Ctx> {
  const r = new Rng(seed);
  const cfg = chooseConfig(r.fork());
  let io: IoBackend;
  let dir: string;
  if (backend === 'mem') {
    io = new MemIo({ rng: new Rng(seed ^ 0x5bd1e995) });
    dir = `/mem/diff-${seed}`;
  } else {
    io = nodeIo;
    dir = fs.mkdtempSync(path.join(os.tmpdir(), `fvd-diff-${seed}-`));
  }
  const imagePath = path.join(dir, 'disk.fvd');
  const setupRng = r.fork();
  let initial: Uint8Array | undefined;
  const opts: CreateOptions = {
    size: cfg.vsize,
    layout: cfg.layout,
    blockSize: cfg.blockSize,
    chunkSize: cfg.chunkSize,
    detectZeroes: cfg.detectZeroes,
  };
  if (cfg.journalSize !== undefined) opts.journalSize = cfg.journalSize;
  if (encrypted) opts.encrypt = { key: ENC_KEY, kdf: { log2N: 10, r: 1 } };
  if (cfg.base === 'raw') {
    initial = makeBaseContent(setupRng, cfg.baseSize, cfg.blockSize);
    const basePath = path.join(dir, 'base.raw');
    if (io instanceof MemIo) io.writeFile(basePath, initial);
    else fs.writeFileSync(basePath, initial);
    opts.base = cfg.relativeBase ? 'base.raw' : basePath;
    opts.baseFormat = 'raw';
  } else if (cfg.base === 'fvd') {
    // An FVD base written through the engine: random extents over a zero background.
    const basePath = path.join(dir, 'base.fvd');
    initial = await makeFvdBase(io, basePath, cfg.baseSize, cfg.blockSize, setupRng, 40, 64);
    opts.base = cfg.relativeBase ? 'base.fvd' : basePath;
    opts.baseFormat = 'fvd';
  }
  const model = new DiskModel(cfg.vsize, initial);
  const ctx: Ctx = {
    seed, backend, cfg, io, dir, imagePath, r, model, step: 0, trace: [], writeId: 0, stats: {}, snaps: new Map(), snapSeq: 0,
    img: undefined as unknown as FvdImage,
    key: encrypted ? ENC_KEY : undefined,
  };
  await guard(ctx, 'create', () => FvdImage.create(io, imagePath, opts));
  ctx.img = await guard(ctx, 'open', () => FvdImage.open(io, imagePath, { copyOnRead: cfg.copyOnRead, key: ctx.key }));
  return ctx;
}

async function runSeed(seed: number, backend: Backend, steps: number, encrypted = false): Promise<void> {
  const t0 = Date.now();
  const ctx = await setup(seed, backend, encrypted);
  try {
    for (ctx.step = 1; ctx.step <= steps; ctx.step++) await step(ctx);
    ctx.step = steps + 1;
    note(ctx, 'final verify');
    await guard(ctx, 'idle', () => ctx.img.idle());
    await verifyAll(ctx, 'final verify');
    await guard(ctx, 'final close', () => ctx.img.close());
    await check(ctx, 'final', ctx.r.chance(0.5));
    ctx.img = await guard(ctx, 'final open', () => FvdImage.open(ctx.io, ctx.imagePath, { copyOnRead: false, readOnly: true, key: ctx.key }));
    await verifyAll(ctx, 'final verify after reopen');
    if (ctx.cfg.layout === 'compact') expectSnapshots(ctx, 'final read-only open');
    await guard(ctx, 'final close', () => ctx.img.close());
    if (ctx.snaps.size) {
      // Every snapshot still holds exactly what the disk held when it was taken.
      ctx.img = await guard(ctx, 'open for snapshot verification', () => FvdImage.open(ctx.io, ctx.imagePath, { copyOnRead: false, key: ctx.key }));
      for (const [name, data] of ctx.snaps) {
        note(ctx, `final revert ${JSON.stringify(name)}`);
        await guard(ctx, `final revert ${name}`, () => ctx.img.snapshots.revert(name));
        ctx.model.data.set(data);
        await verifyAll(ctx, `final verify of snapshot ${JSON.stringify(name)}`);
      }
      await guard(ctx, 'close after snapshot verification', () => ctx.img.close());
      await check(ctx, 'after snapshot verification', true);
    }
    if (ctx.io instanceof MemIo && ctx.io.openCount !== 0) {
      fail(ctx, 'end', `${ctx.io.openCount} file handles still open after close`);
    }
  } finally {
    if (backend === 'fs') fs.rmSync(ctx.dir, { recursive: true, force: true });
  }
  console.log(
    `  differential FVD_SEED=${seed} ${backend}${encrypted ? ' encrypted' : ''}: ${steps} steps ok in ${Date.now() - t0} ms ` +
      `(${describe(ctx.cfg)}; ${Object.entries(ctx.stats).map(([k, v]) => `${k}=${v}`).join(' ')})`,
  );
}


// A deterministic regression for the first bug this test found: with a base that ends inside a
// block, a write that starts past the base end but inside that block took the "beyond the base"
// fast path without marking the block local, so reads starting before the base end (or a later
// copy-on-write of the block) saw zeros instead of the data.
for (const layout of ['raw', 'compact'] as const) {
  test(`regression: ${layout} write past a mid-block base end is visible through the whole block`, async () => {
    const io = new MemIo();
    io.writeFile('/reg/base.raw', new Uint8Array(4608).fill(0x11)); // ends 512 bytes into block 1
    await FvdImage.create(io, '/reg/disk.fvd', { size: 16384, base: 'base.raw', baseFormat: 'raw', layout, blockSize: 4096, chunkSize: 65536 });
    const img = await FvdImage.open(io, '/reg/disk.fvd', { copyOnRead: false });
    const model = new DiskModel(16384, new Uint8Array(4608).fill(0x11));
    const w1 = new Uint8Array(512).fill(0xab);
    await img.write(w1, 5120); // past the base end, inside block 1
    model.write(w1, 5120);
    const whole = new Uint8Array(4096);
    await img.read(whole, 4096);
    const m1 = model.compare(whole, 4096);
    const w2 = new Uint8Array(512).fill(0xcd);
    await img.write(w2, 4096); // starts inside the base: copy-on-write of block 1
    model.write(w2, 4096);
    const after = new Uint8Array(8192);
    await img.read(after, 0);
    const m2 = model.compare(after, 0);
    await img.close();
    assert.ok(!m1, `read of block 1 after a write past the base end: ${m1}`);
    assert.ok(!m2, `after a copy-on-write of the same block: ${m2}`);
  });
}

const FIXED_SEEDS = Array.from({ length: 40 }, (_, i) => i + 1);
const FS_SEEDS = [1, 2, 3, 4];
const only = envSeed();
const onlyBackend = process.env.FVD_BACKEND as Backend | undefined;
const steps = envSteps(1000);
/** FVD_SEEDS=n: how many fresh random seeds to run (default 2); FVD_SEEDS=0 runs only fixed seeds. */
const freshCount = Number(process.env.FVD_SEEDS ?? 2);
const fresh = Array.from({ length: freshCount }, () => randomSeed());

const plan: Array<[number, Backend]> = [];
if (only !== undefined) {
  for (const b of ['mem', 'fs'] as const) if (!onlyBackend || onlyBackend === b) plan.push([only, b]);
} else {
  console.log(`differential: fresh seeds ${fresh.map((s) => `FVD_SEED=${s}`).join(' ')} (replay with FVD_SEED=n); steps per seed ${steps}`);
  if (!process.env.FVD_SEEDS_ONLY) {
    for (const s of FIXED_SEEDS) if (onlyBackend !== 'fs') plan.push([s, 'mem']);
    for (const s of FS_SEEDS) if (onlyBackend !== 'mem') plan.push([s, 'fs']);
  }
  for (const s of fresh) for (const b of ['mem', 'fs'] as const) if (!onlyBackend || onlyBackend === b) plan.push([s, b]);
}

// Chosen to cover both layouts with no base, a raw base and an FVD base.
const ENC_SEEDS = [101, 102, 104, 107, 109, 110, 112, 114, 118, 119, 120, 121, 128, 130];
const ENC_FS_SEEDS = [107, 128];
const encPlan: Array<[number, Backend]> = [];
if (only !== undefined) {
  if (process.env.FVD_ENCRYPT) encPlan.push(...plan.splice(0));
} else {
  if (!process.env.FVD_SEEDS_ONLY) {
    for (const s of ENC_SEEDS) if (onlyBackend !== 'fs') encPlan.push([s, 'mem']);
    for (const s of ENC_FS_SEEDS) if (onlyBackend !== 'mem') encPlan.push([s, 'fs']);
  }
  for (const s of fresh.slice(0, 1)) for (const b of ['mem', 'fs'] as const) if (!onlyBackend || onlyBackend === b) encPlan.push([s ^ 0x5eed, b]);
}

for (const [seed, backend] of plan) {
  test(`differential FVD_SEED=${seed} ${backend}`, async () => {
    await runSeed(seed, backend, steps);
  });
}
for (const [seed, backend] of encPlan) {
  test(`differential FVD_SEED=${seed} ${backend} encrypted (FVD_ENCRYPT=1)`, async () => {
    await runSeed(seed, backend, steps, true);
  });
}

test.run();
