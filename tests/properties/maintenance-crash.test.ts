/**
 * Power cuts during commit, rebase and resize (tests/helpers/crash-io.ts): the operation runs on
 * a recorded backend; at every crash point (all of them for short runs, a sample plus every flush
 * boundary for long ones) the files are rebuilt with random fates for the writes not yet durable
 * (kept, lost, torn at sector granularity), in the image and its base alike. Then, FORMAT.md §12:
 *
 *  - the image opens, read-only (in-memory replay) and read-write (on-disk replay), and passes
 *    checkImage;
 *  - commit, rebase: the image reads exactly what it read before (neither moves the virtual
 *    disk); resize: it reads the old disk (old size) or the new one (new size), nothing between;
 *  - commit: every sector of the base holds its old or its new content; its size is the old or
 *    the new one;
 *  - running the same operation again on the crashed files completes it: the image (and base)
 *    then read exactly the final contents, and checkImage finds nothing.
 *
 * Replay: FVD_SEED=n fixes the fates' generator; FVD_CRASH_POINTS=n caps the points per run.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { commitImage, rebaseImage, resizeImage } from '../../fvd/maintenance.js';
import { checkImage } from '../../fvd/check.js';
import { HEADER_SIZE, decodeHeader } from '../../fvd/format.js';
import type { IoBackend } from '../../fvd/io.js';
import { MemIo } from '../helpers/mem-io.js';
import { CrashIo } from '../helpers/crash-io.js';
import { Rng, envSeed, randomSeed } from '../helpers/rng.js';
import { firstMismatch, readWholeDisk } from '../helpers/model.js';

const KiB = 1024;
const D = '/mc';
const seed = envSeed() ?? randomSeed();
const maxPoints = Number(process.env.FVD_CRASH_POINTS ?? 260);
console.log(`maintenance-crash: FVD_SEED=${seed} (replay with FVD_SEED=n)`);

interface Case {
  image: string;
  /** The disk the image reads before and after the operation. */
  before: Uint8Array;
  after: Uint8Array;
  /** commit: the base as it reads before and after. */
  base?: { path: string; raw: boolean; before: Uint8Array; after: Uint8Array };
  run(io: IoBackend): Promise<unknown>;
  /** More checks on (a copy of) each crashed state, before the operation runs again. */
  extra?(io: MemIo, ctx: string): Promise<void>;
}

function pattern(n: number, s: number): Uint8Array {
  const b = new Rng(s).bytes(n);
  for (let i = 0; i < n; i += 509) b[i] = b[i]! | 1;
  return b;
}

async function create(io: IoBackend, p: string, o: CreateOptions): Promise<void> {
  await FvdImage.create(io, p, { journalSize: 16 * KiB, ...o });
}

async function writeParts(io: IoBackend, p: string, parts: Array<[number, Uint8Array]>, dirty: boolean): Promise<void> {
  const img = await FvdImage.open(io, p, { copyOnRead: false });
  for (const [off, d] of parts) await img.write(d, off);
  if (dirty) {
    await img.flush();
    await img.abandon(); // left dirty: the operation replays the journal first
  } else {
    await img.close();
  }
}

async function readDisk(io: IoBackend, p: string, raw = false): Promise<Uint8Array> {
  return raw ? (io as MemIo).readFile(p) : readWholeDisk(io, p);
}

/** Each 512-byte sector of `actual` equals that of `a` or of `b` (missing bytes read as zero). */
function sectorsOneOf(actual: Uint8Array, a: Uint8Array, b: Uint8Array): string | undefined {
  const at = (x: Uint8Array, o: number) => {
    const s = new Uint8Array(512);
    s.set(x.subarray(o, Math.min(o + 512, x.length)));
    return s;
  };
  for (let o = 0; o < actual.length; o += 512) {
    const s = at(actual, o);
    if (!Buffer.from(s).equals(Buffer.from(at(a, o))) && !Buffer.from(s).equals(Buffer.from(at(b, o)))) return `sector at ${o} is neither old nor new`;
  }
  return undefined;
}

async function checkClean(io: IoBackend, p: string, what: string): Promise<void> {
  const r = await checkImage(io, p);
  assert.equal(r.errors, [], `${what}: check ${p}`);
}

async function crashRun(name: string, make: (io: MemIo) => Promise<Case>): Promise<void> {
  const mem = new MemIo({ rng: new Rng(seed ^ 0x9e3779b9), seekData: true });
  const c = await make(mem);
  assert.ok(c.before.length > 0);
  const cio = new CrashIo(mem);
  cio.startRecording();
  await c.run(cio);
  const N = cio.seq;
  // Sanity: the uninterrupted run produced the final state.
  same(await readDisk(mem, c.image), c.after, `${name}: uninterrupted run`);
  if (c.base) same(await readDisk(mem, c.base.path, c.base.raw), c.base.after, `${name}: base after an uninterrupted run`);

  const rng = new Rng(seed);
  let checked = 0;
  for (const k of cio.crashPoints(maxPoints, rng)) {
    for (let fate = 0; fate < 6; fate++) {
      const rebuilt = fate === 0 && k % 3 === 0 ? cio.rebuildWith(k, () => 'keep') : cio.rebuild(k, rng);
      const io = rebuilt.io;
      io.seekData = fate % 2 === 1; // with and without the known-zero shortcuts
      const ctx = `${name}: power cut at ${k} of ${N} (FVD_SEED=${seed}, fate ${fate})\n  ${rebuilt.choices.slice(-8).join('\n  ')}`;
      try {
        await verifyCrashed(io, c, ctx);
      } catch (err) {
        throw new Error(`${ctx}\n  ${(err as Error).stack ?? err}`);
      }
      checked++;
    }
  }
  assert.ok(checked >= Math.min(maxPoints, N + 1), `${name}: only ${checked} crash states checked`);
  if (process.env.CRR_TRACE) console.log(`${name}: ${N} events, ${checked} crash states`);
}

function same(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.is(actual.length, expected.length, `${what}: length`);
  const m = firstMismatch(expected, actual, 0);
  assert.ok(m === undefined, `${what}: ${m}`);
}

async function verifyCrashed(io: MemIo, c: Case, ctx: string): Promise<void> {
  // Read-only open: replays in memory, writes nothing.
  const bytes = io.readFile(c.image);
  const h = decodeHeader(c.image, bytes.subarray(0, HEADER_SIZE), bytes.length);
  const disk = await readDisk(io, c.image);
  const want = h.virtualSize === c.after.length && c.after.length !== c.before.length ? c.after : c.before;
  same(disk, want, `${ctx}\n  image after the crash`);
  if (c.base) {
    const b = await readDisk(io, c.base.path, c.base.raw);
    assert.ok(b.length === c.base.before.length || b.length === c.base.after.length, `base size ${b.length}`);
    const bad = sectorsOneOf(b, c.base.before, c.base.after);
    assert.ok(bad === undefined, `base after the crash: ${bad}`);
  }
  await checkClean(io, c.image, 'after the crash');
  if (c.extra) await c.extra(MemIo.fromSnapshot(io.snapshot()), ctx);
  // Read-write open and clean close: replay on disk; still the same disk.
  const rw = await FvdImage.open(io, c.image, { copyOnRead: false });
  await rw.close();
  same(await readDisk(io, c.image), want, 'after a read-write open of the crashed image');
  // The operation again: it completes.
  await c.run(io);
  same(await readDisk(io, c.image), c.after, 'after running the operation again');
  if (c.base) same(await readDisk(io, c.base.path, c.base.raw), c.base.after, 'base after running the operation again');
  await checkClean(io, c.image, 'after running the operation again');
  assert.is(io.openCount, 0, 'leaked handles');
}

// ------------------------------------------------------------------------------------------------

for (const layout of ['raw', 'compact'] as const) {
  test(`power cut during commit into a smaller raw base (grows it), ${layout} image`, async () => {
    await crashRun(`commit raw ${layout}`, async (io) => {
      const B = 40 * KiB + 512;
      const V = 96 * KiB;
      io.writeFile(`${D}/base.raw`, pattern(B, 1));
      await create(io, `${D}/img.fvd`, { base: 'base.raw', baseFormat: 'raw', size: V, layout, blockSize: 4 * KiB, chunkSize: 16 * KiB });
      await writeParts(io, `${D}/img.fvd`, [[2048, pattern(6 * KiB, 2)], [38 * KiB, pattern(4 * KiB, 3)], [80 * KiB, pattern(8 * KiB, 4)]], layout === 'compact');
      const before = await readDisk(io, `${D}/img.fvd`);
      return {
        image: `${D}/img.fvd`,
        before,
        after: before,
        base: { path: `${D}/base.raw`, raw: true, before: pattern(B, 1), after: before },
        run: (x) => commitImage(x, `${D}/img.fvd`),
      };
    });
  });
}

test('power cut during commit into an FVD base over a raw one (the base grows through resize)', async () => {
  await crashRun('commit fvd', async (io) => {
    const B = 48 * KiB;
    const V = 80 * KiB;
    io.writeFile(`${D}/bottom.raw`, pattern(B, 1));
    await create(io, `${D}/mid.fvd`, { base: 'bottom.raw', baseFormat: 'raw', layout: 'compact', blockSize: 8 * KiB, chunkSize: 16 * KiB });
    await writeParts(io, `${D}/mid.fvd`, [[8 * KiB, pattern(8 * KiB, 5)]], false);
    const baseBefore = await readDisk(io, `${D}/mid.fvd`);
    await create(io, `${D}/img.fvd`, { base: 'mid.fvd', baseFormat: 'fvd', size: V, blockSize: 4 * KiB });
    await writeParts(io, `${D}/img.fvd`, [[12 * KiB, pattern(8 * KiB, 6)], [60 * KiB, pattern(4 * KiB, 7)]], true);
    const before = await readDisk(io, `${D}/img.fvd`);
    return {
      image: `${D}/img.fvd`,
      before,
      after: before,
      base: { path: `${D}/mid.fvd`, raw: false, before: baseBefore, after: before },
      run: (x) => commitImage(x, `${D}/img.fvd`),
    };
  });
});

for (const layout of ['raw', 'compact'] as const) {
  test(`power cut during a safe rebase onto a larger base of another format (${layout}); path switch`, async () => {
    await crashRun(`rebase ${layout}`, async (io) => {
      const V = 64 * KiB;
      const old = pattern(32 * KiB, 1);
      io.writeFile(`${D}/old.raw`, old);
      const fresh = pattern(96 * KiB, 2);
      fresh.set(old.subarray(0, 16 * KiB)); // the first 16 KiB agree: nothing to copy there
      await create(io, `${D}/a-much-longer-name-for-the-new-base.fvd`, { size: 96 * KiB, blockSize: 8 * KiB });
      await writeParts(io, `${D}/a-much-longer-name-for-the-new-base.fvd`, [[0, fresh]], false);
      await create(io, `${D}/img.fvd`, { base: 'old.raw', baseFormat: 'raw', size: V, layout, blockSize: 4 * KiB, chunkSize: 16 * KiB });
      await writeParts(io, `${D}/img.fvd`, [[20 * KiB, pattern(4 * KiB, 3)], [48 * KiB, pattern(4 * KiB, 4)]], layout === 'raw');
      const before = await readDisk(io, `${D}/img.fvd`);
      return {
        image: `${D}/img.fvd`,
        before,
        after: before,
        run: (x) => rebaseImage(x, `${D}/img.fvd`, { base: 'a-much-longer-name-for-the-new-base.fvd', baseFormat: 'fvd' }),
      };
    });
  });
}

test('power cut during rebase of a standalone compact image onto a base (bitmap created, table moved)', async () => {
  await crashRun('rebase standalone', async (io) => {
    io.writeFile(`${D}/base.raw`, pattern(64 * KiB, 1));
    await create(io, `${D}/img.fvd`, { size: 64 * KiB, layout: 'compact', blockSize: 4 * KiB, chunkSize: 16 * KiB, journalSize: 8 * KiB });
    await writeParts(io, `${D}/img.fvd`, [[0, pattern(40 * KiB, 2)]], true);
    const before = await readDisk(io, `${D}/img.fvd`);
    return { image: `${D}/img.fvd`, before, after: before, run: (x) => rebaseImage(x, `${D}/img.fvd`, { base: 'base.raw', baseFormat: 'raw' }) };
  });
});

test('power cut during rebase -b "" (everything copied in) and rebase -u', async () => {
  await crashRun('rebase none', async (io) => {
    io.writeFile(`${D}/base.raw`, pattern(64 * KiB, 1));
    await create(io, `${D}/img.fvd`, { base: 'base.raw', baseFormat: 'raw', layout: 'compact', blockSize: 4 * KiB, chunkSize: 16 * KiB });
    await writeParts(io, `${D}/img.fvd`, [[4 * KiB, pattern(4 * KiB, 2)]], false);
    const before = await readDisk(io, `${D}/img.fvd`);
    return { image: `${D}/img.fvd`, before, after: before, run: (x) => rebaseImage(x, `${D}/img.fvd`, { base: '' }) };
  });
  await crashRun('rebase -u', async (io) => {
    io.writeFile(`${D}/base.raw`, pattern(64 * KiB, 1));
    io.writeFile(`${D}/copy.raw`, pattern(64 * KiB, 1).subarray(0, 24 * KiB)); // shorter: the rest reads zero
    const expected = pattern(64 * KiB, 1);
    await create(io, `${D}/img.fvd`, { base: 'base.raw', baseFormat: 'raw', blockSize: 4 * KiB });
    await writeParts(io, `${D}/img.fvd`, [[4 * KiB, pattern(4 * KiB, 2)]], true);
    expected.set(pattern(4 * KiB, 2), 4 * KiB);
    // -u asserts the new base holds the same data; here the old base's tail is made zero first,
    // so that "the same" holds and both outcomes read alike.
    const img = await FvdImage.open(io, `${D}/img.fvd`);
    await img.writeZeroes(24 * KiB, 40 * KiB);
    await img.close();
    expected.fill(0, 24 * KiB);
    const before = await readDisk(io, `${D}/img.fvd`);
    same(before, expected, 'setup');
    return { image: `${D}/img.fvd`, before, after: before, run: (x) => rebaseImage(x, `${D}/img.fvd`, { base: 'copy.raw', baseFormat: 'raw', unsafe: true }) };
  });
});

for (const layout of ['raw', 'compact'] as const) {
  test(`power cut during resize (${layout}): grow over a larger base, then shrink with --shrink`, async () => {
    await crashRun(`resize grow ${layout}`, async (io) => {
      io.writeFile(`${D}/base.raw`, pattern(256 * KiB, 1));
      const V = 40 * KiB + 1024; // the block holding the old end is partly in the disk
      await create(io, `${D}/img.fvd`, { base: 'base.raw', baseFormat: 'raw', size: V, layout, blockSize: 8 * KiB, chunkSize: 16 * KiB });
      await writeParts(io, `${D}/img.fvd`, [[0, pattern(4 * KiB, 2)]], true);
      const before = await readDisk(io, `${D}/img.fvd`);
      const after = new Uint8Array(200 * KiB);
      after.set(before);
      return { image: `${D}/img.fvd`, before, after, run: (x) => resizeImage(x, `${D}/img.fvd`, 200 * KiB) };
    });
    await crashRun(`resize shrink ${layout}`, async (io) => {
      await create(io, `${D}/img.fvd`, { size: 160 * KiB, layout, blockSize: 4 * KiB, chunkSize: 16 * KiB });
      await writeParts(io, `${D}/img.fvd`, [[0, pattern(160 * KiB, 3)]], false);
      const before = await readDisk(io, `${D}/img.fvd`);
      return {
        image: `${D}/img.fvd`,
        before,
        after: before.slice(0, 50 * KiB),
        run: (x) => resizeImage(x, `${D}/img.fvd`, 50 * KiB, { shrink: true }),
        // Whatever a cut shrink left in the storage past the new end, growing again reads zeros there.
        extra: async (x) => {
          const size = (await readDisk(x, `${D}/img.fvd`)).length;
          await resizeImage(x, `${D}/img.fvd`, 200 * KiB);
          const want = new Uint8Array(200 * KiB);
          want.set(before.subarray(0, size));
          same(await readDisk(x, `${D}/img.fvd`), want, 'grown again after the cut shrink');
          await checkClean(x, `${D}/img.fvd`, 'grown again after the cut shrink');
        },
      };
    });
  });
}

/**
 * A dirty compact image (4 KiB chunks, a 16 KiB journal) whose grow from 512 KiB to 8 MiB takes
 * its table from one page to two, so the journal moves; `grow` is the operation under test.
 */
async function tableGrowCase(io: MemIo, grow: (x: IoBackend, image: string, size: number) => Promise<unknown>): Promise<Case> {
  await create(io, `${D}/img.fvd`, { size: 512 * KiB, layout: 'compact', blockSize: 4 * KiB, chunkSize: 4 * KiB, journalSize: 16 * KiB });
  await writeParts(io, `${D}/img.fvd`, [[0, pattern(64 * KiB, 1)], [500 * KiB, pattern(12 * KiB, 2)]], true);
  const before = await readDisk(io, `${D}/img.fvd`);
  const after = new Uint8Array(8 * 1024 * KiB);
  after.set(before);
  return { image: `${D}/img.fvd`, before, after, run: (x) => grow(x, `${D}/img.fvd`, 8 * 1024 * KiB) };
}

test('power cut during a compact grow that moves the journal for a larger table', async () => {
  await crashRun('resize table', (io) => tableGrowCase(io, resizeImage));
});

test('power cut during a served compact grow (growOnline: checkpoint, table into the journal space, one header write)', async () => {
  // The image is open (dirty, records in its journal not yet checkpointed) when it grows, as a
  // served image is; after a cut it reads the old disk or the grown one, and growing again
  // completes it.
  await crashRun('online grow', (io) =>
    tableGrowCase(io, async (x, image, size) => {
      const img = await FvdImage.open(x, image, { copyOnRead: false });
      await img.growOnline(size);
      await img.close();
    }),
  );
});

test.run();
