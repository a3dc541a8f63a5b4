/**
 * The power-cut campaign (`make crash-campaign`; a bounded part in `make test`): thousands of
 * simulated power cuts across everything that writes an image, each followed by recovery — and
 * recovery itself cut, twice.
 *
 * A run is one seeded scenario on an in-memory backend that completes operations in a seeded
 * random order (MemIo with an Rng: unflushed writes reorder), recorded by CrashIo
 * (tests/helpers/crash-io.ts). Its power cuts are points in that record (every flush boundary,
 * topped up with random points); each is rebuilt several times with unflushed writes kept, lost or
 * torn at 512-byte sectors (and a new file's name lost unless its directory was synced). Kinds:
 *
 *   guest     writes, discards, FUA writes and flushes, many in flight — raw-like or compact, no
 *             base / raw base / FVD base, plain or encrypted, compact ones with a snapshot taken
 *             midway. After a cut: the image opens (journal replay), every sector holds a value
 *             the model allows (tests/helpers/model.ts CrashModel: every write acknowledged before
 *             a completed flush, or FUA; otherwise old or new, never garbage), and check is clean.
 *   snapshot  create, delete or revert (apply) of an internal snapshot: after a cut the names and
 *             the disk are exactly the operation's before or after, every snapshot reads its
 *             content, check is clean.
 *   commit / rebase / resize   (offline, plain or encrypted): the image reads its contents before
 *             or after, never a mix; running the command again completes it; check is clean.
 *   repair    check --repair of a damaged refcount table: damaged-but-repairable or repaired,
 *             never worse; the disk intact; repairing again completes it.
 *   create    an image created: once create returned, it exists and opens (the directory was
 *             synced); before, it is missing, or refused, or a whole image.
 *
 * Recovery is cut too: from a cut state, recovery (opening read-write and closing; for the offline
 * commands, running the command again; for repair, repairing again) is recorded and cut at a
 * random point, and from that state again: a chain of three power cuts. Every state in a chain
 * must satisfy the kind's rule, and after a completed recovery read exactly what the first
 * complete recovery read ("whatever survives reads like the first replay").
 *
 * A power cut counts when its state was rebuilt and verified. A loss is any verification that
 * failed: it is reported with the replay line (CRASH_SEED=s CRASH_RUN=r make crash-campaign).
 *
 * What is simulated: the engine's order of writes and flushes against the BlockFile contract
 * (fvd/io.ts: pwrite/fdatasync semantics), as CrashIo records it. Not simulated: the kernel below
 * node:fs and io_uring (page cache, the file system's own journal) — trusted to keep fdatasync's
 * promise; the daemon's queue workers write only data into blocks whose metadata is already
 * durable and flush through the engine's fdatasync (which covers the whole file), so they add no
 * state this model lacks. tests/crash-campaign/real-file.test.ts runs the engine over the real
 * node:fs backend and copies the file at flush boundaries.
 */
import path from 'node:path';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { checkImage } from '../../fvd/check.js';
import { commitImage, rebaseImage, resizeImage } from '../../fvd/maintenance.js';
import { Rng } from '../helpers/rng.js';
import { MemIo } from '../helpers/mem-io.js';
import { CrashIo, type TearWeights } from '../helpers/crash-io.js';
import { CrashModel, SECTOR, firstMismatch, makeData, makeFvdBase } from '../helpers/model.js';

const KiB = 1024;
const DIR = '/cc';
const IMG = path.join(DIR, 'disk.fvd');
const KEY = Buffer.from('crash campaign key');
const KDF = { log2N: 10, r: 1, p: 1 };
const WEIGHTS: TearWeights[] = [
  { keep: 1, lose: 1, tear: 1 },
  { keep: 4, lose: 1, tear: 2 },
  { keep: 1, lose: 4, tear: 1 },
];

export const KINDS = ['guest', 'snapshot', 'commit', 'rebase', 'resize', 'repair', 'create'] as const;
export type Kind = (typeof KINDS)[number];

export interface CampaignOptions {
  seed: number;
  /** Stop once at least this many power cuts were verified. */
  cuts: number;
  /** Only this run (replay). */
  run?: number;
  /** Only these kinds. */
  kinds?: Kind[];
  log?: (line: string) => void;
}

export interface Loss {
  run: number;
  kind: string;
  what: string;
  replay: string;
}

export interface CampaignResult {
  seed: number;
  runs: number;
  cuts: number;
  /** Power cuts that hit a recovery (the second and third of a chain). */
  recoveryCuts: number;
  byKind: Map<string, number>;
  losses: Loss[];
  ms: number;
}

/** splitmix-style mixing of campaign seed and run index. */
function runSeed(seed: number, run: number): number {
  let x = (BigInt(seed >>> 0) << 32n) ^ BigInt(run >>> 0);
  x = ((x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n) & ((1n << 64n) - 1n);
  x = ((x ^ (x >> 27n)) * 0x94d049bb133111ebn) & ((1n << 64n) - 1n);
  return Number((x ^ (x >> 31n)) & 0xffffffffn) || 1;
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && Buffer.from(a.buffer, a.byteOffset, a.length).equals(Buffer.from(b.buffer, b.byteOffset, b.length));
}

function copyOf(io: MemIo, rng?: Rng): MemIo {
  return MemIo.fromSnapshot(io.snapshot(), rng ? { rng } : {});
}

/** The whole disk and the snapshot names, through a read-only open (nothing written). */
async function observe(io: MemIo, key?: Uint8Array): Promise<{ disk: Uint8Array; names: string[] }> {
  const img = await FvdImage.open(io, IMG, { readOnly: true, key });
  try {
    const disk = new Uint8Array(img.size);
    await img.read(disk, 0);
    const names = img.stats().snapshots ? img.snapshots.list().map((s) => s.name).sort() : [];
    return { disk, names };
  } finally {
    await img.close();
  }
}

async function checkErrors(io: MemIo, key?: Uint8Array, repair = false): Promise<string[]> {
  const r = await checkImage(io, IMG, { key, repair });
  return r.errors;
}

/** A run's scenario: records its operation and knows what a cut state may look like. */
interface Scenario {
  /** The recorded backend after the operation (or the first part of it) ran. */
  cio: CrashIo;
  key?: Uint8Array;
  /** Problems of a cut state at point k (no recovery run yet); [] = fine. */
  verifyCut(io: MemIo, k: number): Promise<string[]>;
  /** Recovery: what a restart does (open and close, or the command again). */
  recover(io: IoLike): Promise<void>;
  /** Problems of a recovered state; its observation must also equal the first recovery's. */
  verifyRecovered(io: MemIo): Promise<string[]>;
  /** Recovery changes nothing a reader sees: the recovered image reads like the cut state (replayed in memory). */
  recoveryReadsAsCut?: boolean;
}
type IoLike = MemIo | CrashIo;

async function openClose(io: IoLike, key?: Uint8Array): Promise<void> {
  const img = await FvdImage.open(io, IMG, { key, copyOnRead: true });
  const buf = new Uint8Array(img.size);
  await img.read(buf, 0); // copy-on-read writes too: more to cut
  await img.close();
}

// ---------------------------------------------------------------------------------------------
// kinds

interface Geometry {
  layout: 'raw' | 'compact';
  vsize: number;
  blockSize: number;
  chunkSize: number;
  journalSize: number;
  base: 'none' | 'raw' | 'fvd';
  encrypted: boolean;
}

function geometry(r: Rng, kind: Kind): Geometry {
  const layout = kind === 'snapshot' || kind === 'repair' ? 'compact' : r.chance(0.5) ? 'raw' : 'compact';
  const blockSize = r.pick([4 * KiB, 8 * KiB]);
  return {
    layout,
    vsize: r.pick([256, 384, 512]) * KiB,
    blockSize,
    chunkSize: r.pick([1, 2, 4]) * blockSize * 4,
    journalSize: r.pick([8, 16, 64]) * KiB,
    base: kind === 'repair' ? 'none' : r.pick(['none', 'raw', 'raw', 'fvd'] as const),
    encrypted: kind !== 'repair' && kind !== 'snapshot' && r.chance(0.3),
  };
}

function describe(g: Geometry): string {
  return `${g.layout} ${g.vsize / KiB}K block ${g.blockSize / KiB}K chunk ${g.chunkSize / KiB}K journal ${g.journalSize / KiB}K base ${g.base}${g.encrypted ? ' encrypted' : ''}`;
}

/**
 * The base files of `g` in `mem` (written directly: before any recording) and the create options;
 * `initial` is what a new image reads (the base's content, zeros past it).
 */
async function makeBase(r: Rng, mem: MemIo, g: Geometry): Promise<{ opts: CreateOptions; initial: Uint8Array }> {
  const opts: CreateOptions = {
    size: g.vsize,
    layout: g.layout,
    blockSize: g.blockSize,
    chunkSize: g.chunkSize,
    journalSize: g.journalSize,
    encrypt: g.encrypted ? { key: KEY, kdf: KDF } : undefined,
  };
  const initial = new Uint8Array(g.vsize);
  if (g.base === 'raw') {
    const size = r.pick([g.vsize / 2, g.vsize - 3 * SECTOR, g.vsize]);
    const b = r.bytes(size);
    for (let off = 0; off < size; off += g.blockSize) if (r.chance(0.3)) b.fill(0, off, Math.min(size, off + g.blockSize));
    mem.writeFile(path.join(DIR, 'base.raw'), b);
    initial.set(b.subarray(0, Math.min(size, g.vsize)));
    opts.base = 'base.raw';
    opts.baseFormat = 'raw';
  } else if (g.base === 'fvd') {
    const content = await makeFvdBase(mem, path.join(DIR, 'base.fvd'), g.vsize / 2, g.blockSize, r, 20, 16);
    initial.set(content);
    opts.base = 'base.fvd';
    opts.baseFormat = 'fvd';
  }
  return { opts, initial };
}

/** The image (and its base) in `mem`; returns what it reads (its base's content, zeros past it). */
async function makeImage(r: Rng, mem: MemIo, g: Geometry): Promise<Uint8Array> {
  const { opts, initial } = await makeBase(r, mem, g);
  await FvdImage.create(mem, IMG, opts);
  return initial;
}

/** Random writes (flushed or not) into an image, before recording: something to commit or rebase. */
async function scribble(r: Rng, io: IoLike, g: Geometry, n: number, endDirty: boolean): Promise<void> {
  const img = await FvdImage.open(io, IMG, { key: g.encrypted ? KEY : undefined });
  for (let i = 0; i < n; i++) {
    const off = r.int(g.vsize / SECTOR) * SECTOR;
    const len = Math.min(g.vsize - off, r.range(1, 40) * SECTOR);
    await img.write(makeData(r, len, 9000 + i, off, 'random'), off);
  }
  await img.flush();
  if (endDirty) await img.abandon();
  else await img.close();
}

async function guestScenario(r: Rng, g: Geometry): Promise<Scenario> {
  const mem = new MemIo({ rng: r.fork() });
  const initial = await makeImage(r, mem, g);
  const cio = new CrashIo(mem);
  cio.startRecording();
  const key = g.encrypted ? KEY : undefined;
  const model = new CrashModel(g.vsize, initial);
  const img = await FvdImage.open(cio, IMG, { key, copyOnRead: r.chance(0.5) });
  let snap: { start: number; end: number; content: Uint8Array } | null = null;
  const live = initial.slice();
  const steps = r.range(20, 45);
  let id = 0;
  for (let step = 0; step < steps; step++) {
    if (g.layout === 'compact' && !snap && step === Math.floor(steps / 3) && r.chance(0.5)) {
      const start = cio.seq;
      await img.snapshots.create('mid');
      snap = { start, end: cio.seq, content: live.slice() };
      continue;
    }
    // A batch of requests to disjoint ranges in flight together, then maybe a flush.
    const batch: Promise<void>[] = [];
    const taken: [number, number][] = [];
    for (let j = r.range(1, 5); j > 0; j--) {
      const off = r.int(g.vsize / SECTOR) * SECTOR;
      const len = Math.min(g.vsize - off, r.pick([1, 3, 8, 16, 40]) * SECTOR);
      if (taken.some(([a, b]) => off < b && a < off + len)) continue;
      taken.push([off, off + len]);
      const kind = r.weighted([10, 2, 2]);
      const data = kind === 0 ? makeData(r, len, ++id, off, r.pick(['random', 'random', 'zero', 'mixed'] as const)) : undefined;
      const fua = kind === 0 && r.chance(0.1);
      const w = model.beginWrite(off, len, data, fua, cio.seq, kind === 0 ? `write#${id}` : 'zeroes');
      if (data) live.set(data, off);
      else live.fill(0, off, off + len);
      const p = kind === 0 ? img.write(data!, off, fua) : kind === 1 ? img.discard(off, len) : img.writeZeroes(off, len);
      batch.push(p.then(() => model.ackWrite(w, cio.seq)));
    }
    if (r.chance(0.3)) {
      const f = model.beginFlush(cio.seq);
      batch.push(img.flush().then(() => model.ackFlush(f, cio.seq)));
    }
    await Promise.all(batch);
  }
  const f = model.beginFlush(cio.seq);
  await img.flush();
  model.ackFlush(f, cio.seq);
  await img.abandon(); // the crash: whatever was not flushed may be anything the model allows

  const checkState = async (io: MemIo, k: number | null): Promise<string[]> => {
    const problems: string[] = [];
    const { disk, names } = await observe(io, key);
    problems.push(...(k === null ? [] : model.check(disk, 0, k, 3)));
    if (snap) {
      // At a cut: the snapshot exists iff its creation committed (k = null: after a recovery,
      // whose reading must equal the cut's, which was checked).
      if (k !== null && names.includes('mid') && snap.start >= k) problems.push('the snapshot exists before its creation started');
      if (k !== null && !names.includes('mid') && snap.end <= k) problems.push('the snapshot is missing though its creation completed');
      if (names.includes('mid')) {
        const copy = copyOf(io);
        const c = await FvdImage.open(copy, IMG, { key });
        await c.snapshots.revert('mid');
        await c.close();
        const content = (await observe(copy, key)).disk;
        const m = firstMismatch(snap.content, content, 0);
        if (m) problems.push(`snapshot 'mid' reverts to the wrong content: ${m}`);
      }
    }
    problems.push(...(await checkErrors(io, key, false)));
    return problems;
  };
  return {
    cio,
    key,
    verifyCut: (io, k) => checkState(io, k),
    recover: (io) => openClose(io, key),
    verifyRecovered: (io) => checkState(io, null),
    recoveryReadsAsCut: true,
  };
}

async function snapshotScenario(r: Rng, g: Geometry): Promise<Scenario> {
  const mem = new MemIo({ rng: r.fork() });
  await makeImage(r, mem, g);
  await scribble(r, mem, g, 6, false);
  const img0 = await FvdImage.open(mem, IMG);
  await img0.snapshots.create('a');
  await img0.close();
  await scribble(r, mem, g, 6, r.chance(0.5));
  const op = r.pick(['create', 'delete', 'revert'] as const);
  const before = await observe(mem);
  const after = copyOf(mem);
  const runOp = async (io: IoLike) => {
    const img = await FvdImage.open(io, IMG);
    if (op === 'create') await img.snapshots.create('b');
    else if (op === 'delete') await img.snapshots.delete('a');
    else await img.snapshots.revert('a');
    await img.close();
  };
  await runOp(after);
  const want = await observe(after);
  const aContent = op === 'delete' ? null : (await (async () => {
    const c = copyOf(mem);
    const img = await FvdImage.open(c, IMG);
    await img.snapshots.revert('a');
    await img.close();
    return (await observe(c)).disk;
  })());
  const cio = new CrashIo(mem);
  cio.startRecording();
  await runOp(cio);
  const same = (x: { disk: Uint8Array; names: string[] }, y: { disk: Uint8Array; names: string[] }) => equal(x.disk, y.disk) && x.names.join() === y.names.join();
  const state = async (io: MemIo): Promise<string[]> => {
    const o = await observe(io);
    const problems: string[] = [];
    if (!same(o, before) && !same(o, want)) problems.push(`snapshot ${op}: neither before nor after (names ${o.names.join(',')})`);
    if (aContent && o.names.includes('a')) {
      const c = copyOf(io);
      const img = await FvdImage.open(c, IMG);
      await img.snapshots.revert('a');
      await img.close();
      const m = firstMismatch(aContent, (await observe(c)).disk, 0);
      if (m) problems.push(`snapshot 'a' reverts wrong: ${m}`);
    }
    problems.push(...(await checkErrors(io)));
    return problems;
  };
  return { cio, verifyCut: (io) => state(io), recover: (io) => openClose(io), verifyRecovered: (io) => state(io), recoveryReadsAsCut: true };
}

/** commit, rebase, resize: the image reads before or after; the command run again completes it. */
async function maintenanceScenario(r: Rng, g: Geometry, kind: 'commit' | 'rebase' | 'resize'): Promise<Scenario> {
  if (kind === 'commit' && g.base === 'none') g.base = 'raw';
  const mem = new MemIo({ rng: r.fork() });
  await makeImage(r, mem, g);
  await scribble(r, mem, g, r.range(3, 10), r.chance(0.4));
  const key = g.encrypted ? KEY : undefined;
  let runOp: (io: IoLike) => Promise<void>;
  if (kind === 'commit') runOp = async (io) => void (await commitImage(io, IMG, { key }));
  else if (kind === 'resize') {
    const size = r.pick([g.vsize + 128 * KiB, g.vsize * 2, g.vsize - 64 * KiB]);
    runOp = async (io) => void (await resizeImage(io, IMG, size, { key, shrink: true }));
  } else {
    const target = r.pick(['', 'new.raw'] as const);
    if (target) mem.writeFile(path.join(DIR, target), r.bytes(r.pick([g.vsize / 2, g.vsize])));
    runOp = async (io) => void (await rebaseImage(io, IMG, target ? { base: target, baseFormat: 'raw', key } : { base: '', key }));
  }
  const before = await observe(mem, key);
  const done = copyOf(mem);
  await runOp(done);
  const after = await observe(done, key);
  const cio = new CrashIo(mem);
  cio.startRecording();
  await runOp(cio);
  const state = (io: MemIo, final: boolean) => async (): Promise<string[]> => {
    let o: { disk: Uint8Array };
    try {
      o = await observe(io, key);
    } catch (err) {
      return [`${kind}: the image does not open: ${(err as Error).message}`];
    }
    const problems: string[] = [];
    const isAfter = equal(o.disk.subarray(0, Math.min(o.disk.length, after.disk.length)), after.disk.subarray(0, Math.min(o.disk.length, after.disk.length))) && o.disk.length === after.disk.length;
    const isBefore = equal(o.disk, before.disk);
    if (final ? !isAfter : !isAfter && !isBefore) problems.push(`${kind}: the image reads ${final ? 'other than the result' : 'neither before nor after'}: ${firstMismatch(after.disk, o.disk, 0) ?? `size ${o.disk.length}`}`);
    problems.push(...(await checkErrors(io, key)));
    return problems;
  };
  return {
    cio,
    key,
    verifyCut: (io) => state(io, false)(),
    recover: (io) => runOp(io),
    verifyRecovered: (io) => state(io, true)(),
  };
}

/** check --repair of a damaged refcount table. */
async function repairScenario(r: Rng, g: Geometry): Promise<Scenario> {
  const mem = new MemIo({ rng: r.fork() });
  await makeImage(r, mem, g);
  await scribble(r, mem, g, 8, false);
  const img = await FvdImage.open(mem, IMG);
  await img.snapshots.create('s1');
  await img.close();
  await scribble(r, mem, g, 4, false);
  const want = await observe(mem);
  // Damage the refcount table's checksum (its counts are derived from the snapshot tables).
  const file = mem.readFile(IMG);
  const dv = new DataView(file.buffer, file.byteOffset);
  const rcOffset = Number(dv.getBigUint64(128, true));
  file[rcOffset + 4]! ^= 0xff;
  mem.writeFile(IMG, file);
  const cio = new CrashIo(mem);
  cio.startRecording();
  await checkImage(cio, IMG, { repair: true });
  const state = (final: boolean) => async (io: MemIo): Promise<string[]> => {
    const problems: string[] = [];
    const errors = await checkErrors(io);
    if (final && errors.length) problems.push(`after repair: ${errors.join('; ')}`);
    if (!final && errors.length && !errors.every((e) => /refcount/.test(e))) problems.push(`worse than a damaged refcount table: ${errors.join('; ')}`);
    const repaired = copyOf(io);
    const rep = await checkImage(repaired, IMG, { repair: true });
    if (rep.errors.length) problems.push(`repair does not complete: ${rep.errors.join('; ')}`);
    const o = await observe(repaired);
    if (!equal(o.disk, want.disk) || o.names.join() !== want.names.join()) problems.push('the disk or the snapshots changed');
    return problems;
  };
  return { cio, verifyCut: (io) => state(false)(io), recover: async (io) => void (await checkImage(io, IMG, { repair: true })), verifyRecovered: (io) => state(true)(io) };
}

/** create: after it returned the image exists and opens; before, missing, refused or whole. */
async function createScenario(r: Rng, g: Geometry): Promise<Scenario> {
  const mem = new MemIo({ rng: r.fork() });
  const { opts, initial: base } = await makeBase(r, mem, g);
  const cio = new CrashIo(mem);
  cio.startRecording();
  await FvdImage.create(cio, IMG, opts);
  const returned = cio.seq;
  const key = g.encrypted ? KEY : undefined;
  const state = async (io: MemIo, k: number | null): Promise<string[]> => {
    if (!io.exists(IMG)) return k === null || k >= returned ? ['the image is missing after create returned'] : [];
    let o: { disk: Uint8Array };
    try {
      o = await observe(io, key);
    } catch (err) {
      return k === null || k >= returned ? [`the image does not open after create returned: ${(err as Error).message}`] : [];
    }
    const m = firstMismatch(base, o.disk, 0);
    const problems = m ? [`a new image reads other than its base: ${m}`] : [];
    problems.push(...(await checkErrors(io, key)));
    return problems;
  };
  return {
    cio,
    key,
    verifyCut: (io, k) => state(io, k),
    recover: async (io) => {
      if ((io instanceof MemIo ? io : io.inner).exists(IMG)) await openClose(io, key).catch(() => {});
    },
    verifyRecovered: async (io) => (io.exists(IMG) ? state(io, null).then((p) => p.filter((x) => !/does not open/.test(x))) : []),
  };
}

// ---------------------------------------------------------------------------------------------
// the campaign

export async function runCampaign(o: CampaignOptions): Promise<CampaignResult> {
  const t0 = Date.now();
  const log = o.log ?? (() => {});
  const res: CampaignResult = { seed: o.seed, runs: 0, cuts: 0, recoveryCuts: 0, byKind: new Map(), losses: [], ms: 0 };
  const kinds = o.kinds ?? [...KINDS];
  for (let run = o.run ?? 0; o.run !== undefined ? run === o.run : res.cuts < o.cuts; run++) {
    const r = new Rng(runSeed(o.seed, run));
    const kind = kinds[r.weighted(kinds.map((k) => (k === 'guest' ? 5 : k === 'create' ? 1 : 2)))]!;
    const g = geometry(r, kind);
    const replay = `CRASH_SEED=${o.seed} CRASH_RUN=${run} make crash-campaign`;
    const lose = (what: string) => {
      res.losses.push({ run, kind, what: `${describe(g)}: ${what}`, replay });
      log(`LOSS run ${run} ${kind} (${describe(g)}): ${what}\n     replay: ${replay}`);
    };
    let sc: Scenario;
    try {
      sc =
        kind === 'guest' ? await guestScenario(r, g)
          : kind === 'snapshot' ? await snapshotScenario(r, g)
            : kind === 'repair' ? await repairScenario(r, g)
              : kind === 'create' ? await createScenario(r, g)
                : await maintenanceScenario(r, g, kind);
    } catch (err) {
      lose(`the scenario itself failed (no power cut yet): ${(err as Error).stack}`);
      res.runs++;
      continue;
    }
    // Flush boundaries and random points, and always the end: a cut right after the operation returned.
    const points = [...new Set([...sc.cio.crashPoints(r.pick([10, 16, 24]), r), sc.cio.seq])];
    let cuts = 0;
    for (const k of points) {
      for (let v = 0, variants = r.pick([1, 2]); v < variants; v++) {
        const weights = WEIGHTS[r.int(WEIGHTS.length)]!;
        const cut = sc.cio.rebuild(k, r, weights);
        cuts++;
        const where = `cut at ${k} of ${sc.cio.seq} (${cut.kept} kept, ${cut.lost} lost, ${cut.torn} torn)`;
        try {
          const p = await sc.verifyCut(copyOf(cut.io), k);
          if (p.length) {
            lose(`${where}: ${p.slice(0, 3).join(' | ')}`);
            continue;
          }
          // Recovery, complete: what every cut of it must come back to.
          const first = copyOf(cut.io);
          await sc.recover(first);
          const p1 = await sc.verifyRecovered(first);
          if (p1.length) {
            lose(`${where}, recovered: ${p1.slice(0, 3).join(' | ')}`);
            continue;
          }
          const reference = first.exists(IMG) ? await observe(first, sc.key).catch(() => null) : null;
          if (sc.recoveryReadsAsCut && reference) {
            const asCut = await observe(copyOf(cut.io), sc.key);
            if (!equal(asCut.disk, reference.disk) || asCut.names.join() !== reference.names.join()) {
              lose(`${where}: the read-write recovery reads other than the read-only replay: ${firstMismatch(asCut.disk, reference.disk, 0) ?? 'snapshot names'}`);
              continue;
            }
          }
          // Recovery cut, twice (a chain of three power cuts), on a third of the cuts.
          if (r.chance(1 / 3)) {
            let state = cut.io;
            for (let depth = 1; depth <= 2; depth++) {
              const rec = new CrashIo(copyOf(state, r.fork()));
              rec.startRecording();
              await sc.recover(rec).catch(() => {}); // a recovery may itself refuse a cut state's leftovers
              const candidates = rec.crashPoints(6, r);
              const k2 = candidates[r.int(candidates.length)] ?? 0;
              const cut2 = rec.rebuild(k2, r, WEIGHTS[r.int(WEIGHTS.length)]!);
              cuts++;
              res.recoveryCuts++;
              const again = copyOf(cut2.io);
              await sc.recover(again);
              const p2 = await sc.verifyRecovered(again);
              const obs = again.exists(IMG) ? await observe(again, sc.key).catch(() => null) : null;
              if (p2.length) lose(`${where}, recovery cut ${depth} at ${k2} of ${rec.seq}, recovered: ${p2.slice(0, 3).join(' | ')}`);
              else if (reference && obs && (!equal(reference.disk, obs.disk) || reference.names.join() !== obs.names.join()))
                lose(`${where}, recovery cut ${depth}: reads other than the first recovery: ${firstMismatch(reference.disk, obs.disk, 0) ?? `names ${obs.names}`}`);
              state = cut2.io;
            }
          }
        } catch (err) {
          lose(`${where}: ${(err as Error).stack?.split('\n').slice(0, 3).join(' | ')}`);
        }
      }
    }
    res.runs++;
    res.cuts += cuts;
    res.byKind.set(kind, (res.byKind.get(kind) ?? 0) + cuts);
    if (res.runs % 10 === 0) log(`# ${res.runs} runs, ${res.cuts} power cuts (${res.recoveryCuts} during recovery), ${res.losses.length} losses, ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  }
  res.ms = Date.now() - t0;
  return res;
}
