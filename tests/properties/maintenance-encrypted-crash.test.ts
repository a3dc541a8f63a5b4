/**
 * Power cuts during commit, rebase and resize of ENCRYPTED images (tests/helpers/crash-io.ts, as
 * in tests/properties/maintenance-crash.test.ts). At every crash point (all of them for short runs, a sample
 * plus every flush boundary for long ones), with random fates for the writes not yet durable:
 *
 *  - the image's key fields (header bytes 176..303) are the ones create wrote, and the key opens it;
 *  - read with the key, it shows the old disk or (resize) the new one, nothing between;
 *  - commit: every sector of the base is its old or its new plaintext;
 *  - the image file holds no plaintext marker (copies into it are ciphertext, even half done);
 *  - checkImage with the key finds nothing; a read-write open replays and reads the same;
 *  - running the operation again (with the key) completes it.
 *
 * Replay: FVD_SEED=n fixes the fates' generator; FVD_CRASH_POINTS=n caps the points per run.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { commitImage, rebaseImage, resizeImage } from '../../fvd/maintenance.js';
import { checkImage } from '../../fvd/check.js';
import type { IoBackend } from '../../fvd/io.js';
import { MemIo } from '../helpers/mem-io.js';
import { CrashIo } from '../helpers/crash-io.js';
import { Rng, envSeed, randomSeed } from '../helpers/rng.js';
import { firstMismatch } from '../helpers/model.js';

const KiB = 1024;
const D = '/emc';
const KEY = Buffer.from('crash test key');
const FAST_KDF = { log2N: 10, r: 8, p: 1 };
const MARKER = Buffer.from('<<ENC-CRASH-PLAINTEXT-MARKER-7>>');
const seed = envSeed() ?? randomSeed();
const maxPoints = Number(process.env.FVD_CRASH_POINTS ?? 80);
console.log(`maintenance-encrypted-crash: FVD_SEED=${seed} (replay with FVD_SEED=n)`);

function markerData(len: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i += MARKER.length) b.set(MARKER.subarray(0, Math.min(MARKER.length, len - i)), i);
  return b;
}

function pattern(n: number, s: number): Uint8Array {
  const b = new Rng(s).bytes(n);
  for (let i = 0; i < n; i += 509) b[i] = b[i]! | 1;
  return b;
}

interface Case {
  image: string;
  before: Uint8Array;
  after: Uint8Array;
  base?: { path: string; before: Uint8Array; after: Uint8Array };
  run(io: IoBackend): Promise<unknown>;
}

async function create(io: IoBackend, p: string, o: CreateOptions): Promise<void> {
  await FvdImage.create(io, p, { journalSize: 16 * KiB, encrypt: { key: KEY, kdf: FAST_KDF }, ...o });
}

async function writeParts(io: IoBackend, p: string, parts: Array<[number, Uint8Array]>, dirty: boolean): Promise<void> {
  const img = await FvdImage.open(io, p, { copyOnRead: false, key: KEY });
  for (const [off, d] of parts) await img.write(d, off);
  if (dirty) {
    await img.flush();
    await img.abandon();
  } else {
    await img.close();
  }
}

async function readDisk(io: IoBackend, p: string): Promise<Uint8Array> {
  const img = await FvdImage.open(io, p, { readOnly: true, key: KEY });
  try {
    const buf = new Uint8Array(img.size);
    await img.read(buf, 0);
    return buf;
  } finally {
    await img.close();
  }
}

function same(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.is(actual.length, expected.length, `${what}: length`);
  const m = firstMismatch(expected, actual, 0);
  assert.ok(m === undefined, `${what}: ${m}`);
}

function sectorsOneOf(actual: Uint8Array, a: Uint8Array, b: Uint8Array): string | undefined {
  const at = (x: Uint8Array, o: number) => {
    const s = new Uint8Array(512);
    s.set(x.subarray(o, Math.min(o + 512, x.length)));
    return Buffer.from(s);
  };
  for (let o = 0; o < actual.length; o += 512) {
    const s = at(actual, o);
    if (!s.equals(at(a, o)) && !s.equals(at(b, o))) return `sector at ${o} is neither old nor new`;
  }
  return undefined;
}

async function checkClean(io: IoBackend, p: string, what: string): Promise<void> {
  assert.equal((await checkImage(io, p, { key: KEY })).errors, [], `${what}: check ${p}`);
}

async function crashRun(name: string, make: (io: MemIo) => Promise<Case>): Promise<void> {
  const mem = new MemIo({ rng: new Rng(seed ^ 0x9e3779b9), seekData: true });
  const c = await make(mem);
  const crypt = Buffer.from(mem.readFile(c.image).subarray(176, 304));
  const cio = new CrashIo(mem);
  cio.startRecording();
  await c.run(cio);
  const N = cio.seq;
  same(await readDisk(mem, c.image), c.after, `${name}: uninterrupted run`);
  if (c.base) same(mem.readFile(c.base.path), c.base.after, `${name}: base after an uninterrupted run`);

  const rng = new Rng(seed);
  let checked = 0;
  const points = cio.crashPoints(maxPoints, rng);
  for (const k of points) {
    for (let fate = 0; fate < 4; fate++) {
      const rebuilt = fate === 0 && k % 3 === 0 ? cio.rebuildWith(k, () => 'keep') : cio.rebuild(k, rng);
      const io = rebuilt.io;
      io.seekData = fate % 2 === 1;
      const ctx = `${name}: power cut at ${k} of ${N} (FVD_SEED=${seed}, fate ${fate})\n  ${rebuilt.choices.slice(-8).join('\n  ')}`;
      try {
        const file = io.readFile(c.image);
        assert.ok(Buffer.from(file.subarray(176, 304)).equals(crypt), 'key fields (bytes 176..303) changed');
        assert.not.ok(Buffer.from(file).includes(MARKER), 'the image file holds plaintext');
        const disk = await readDisk(io, c.image);
        const want = disk.length === c.after.length && c.after.length !== c.before.length ? c.after : c.before;
        same(disk, want, 'image after the crash');
        if (c.base) {
          const b = io.readFile(c.base.path);
          assert.ok(b.length === c.base.before.length || b.length === c.base.after.length, `base size ${b.length}`);
          const bad = sectorsOneOf(b, c.base.before, c.base.after);
          assert.ok(bad === undefined, `base after the crash: ${bad}`);
        }
        await checkClean(io, c.image, 'after the crash');
        const rw = await FvdImage.open(io, c.image, { copyOnRead: false, key: KEY });
        await rw.close();
        same(await readDisk(io, c.image), want, 'after a read-write open of the crashed image');
        await c.run(io);
        same(await readDisk(io, c.image), c.after, 'after running the operation again');
        if (c.base) same(io.readFile(c.base.path), c.base.after, 'base after running the operation again');
        assert.not.ok(Buffer.from(io.readFile(c.image)).includes(MARKER), 'the image file holds plaintext after the rerun');
        await checkClean(io, c.image, 'after running the operation again');
        assert.is(io.openCount, 0, 'leaked handles');
      } catch (err) {
        throw new Error(`${ctx}\n  ${(err as Error).stack ?? err}`);
      }
      checked++;
    }
  }
  assert.ok(checked >= Math.min(maxPoints, N + 1), `${name}: only ${checked} crash states checked`);
  if (process.env.CRR_TRACE) console.log(`${name}: ${N} events, ${points.length} crash points, ${checked} crash states`);
}

for (const layout of ['raw', 'compact'] as const) {
  test(`power cut during commit of an encrypted ${layout} image into a smaller raw base (grows it)`, async () => {
    await crashRun(`commit ${layout}`, async (io) => {
      const B = 40 * KiB + 512;
      const V = 96 * KiB;
      io.writeFile(`${D}/base.raw`, pattern(B, 1));
      await create(io, `${D}/img.fvd`, { base: 'base.raw', baseFormat: 'raw', size: V, layout, blockSize: 4 * KiB, chunkSize: 16 * KiB });
      await writeParts(io, `${D}/img.fvd`, [[2048, pattern(6 * KiB, 2)], [36 * KiB, markerData(8 * KiB)], [80 * KiB, pattern(8 * KiB, 4)]], layout === 'compact');
      const before = await readDisk(io, `${D}/img.fvd`);
      return {
        image: `${D}/img.fvd`,
        before,
        after: before,
        base: { path: `${D}/base.raw`, before: pattern(B, 1), after: before },
        run: (x) => commitImage(x, `${D}/img.fvd`, { key: KEY }),
      };
    });
  });

  test(`power cut during a safe rebase of an encrypted ${layout} image onto a larger FVD base (copies the marker in)`, async () => {
    await crashRun(`rebase ${layout}`, async (io) => {
      const V = 64 * KiB;
      const old = pattern(32 * KiB, 1);
      old.set(markerData(8 * KiB), 8 * KiB); // the old base holds the marker: it is copied in, encrypted
      io.writeFile(`${D}/old.raw`, old);
      const fresh = pattern(96 * KiB, 2);
      fresh.set(old.subarray(0, 4 * KiB));
      await FvdImage.create(io, `${D}/new.fvd`, { size: 96 * KiB, blockSize: 8 * KiB, journalSize: 16 * KiB });
      const nb = await FvdImage.open(io, `${D}/new.fvd`);
      await nb.write(fresh, 0);
      await nb.close();
      await create(io, `${D}/img.fvd`, { base: 'old.raw', baseFormat: 'raw', size: V, layout, blockSize: 4 * KiB, chunkSize: 16 * KiB });
      await writeParts(io, `${D}/img.fvd`, [[20 * KiB, pattern(4 * KiB, 3)], [48 * KiB, pattern(4 * KiB, 4)]], layout === 'raw');
      const before = await readDisk(io, `${D}/img.fvd`);
      return { image: `${D}/img.fvd`, before, after: before, run: (x) => rebaseImage(x, `${D}/img.fvd`, { base: 'new.fvd', baseFormat: 'fvd', key: KEY }) };
    });
  });

  test(`power cut during resize of an encrypted ${layout} image: grow (end block copied in), shrink --shrink`, async () => {
    await crashRun(`resize grow ${layout}`, async (io) => {
      io.writeFile(`${D}/base.raw`, markerData(256 * KiB));
      const V = 40 * KiB + 1024;
      await create(io, `${D}/img.fvd`, { base: 'base.raw', baseFormat: 'raw', size: V, layout, blockSize: 8 * KiB, chunkSize: 16 * KiB });
      await writeParts(io, `${D}/img.fvd`, [[0, pattern(4 * KiB, 2)]], true);
      const before = await readDisk(io, `${D}/img.fvd`);
      const after = new Uint8Array(200 * KiB);
      after.set(before);
      return { image: `${D}/img.fvd`, before, after, run: (x) => resizeImage(x, `${D}/img.fvd`, 200 * KiB, { key: KEY }) };
    });
    await crashRun(`resize shrink ${layout}`, async (io) => {
      await create(io, `${D}/img.fvd`, { size: 160 * KiB, layout, blockSize: 4 * KiB, chunkSize: 16 * KiB });
      await writeParts(io, `${D}/img.fvd`, [[0, pattern(160 * KiB, 3)]], false);
      const before = await readDisk(io, `${D}/img.fvd`);
      // --shrink reads no data: the run has no key at all.
      return { image: `${D}/img.fvd`, before, after: before.slice(0, 50 * KiB), run: (x) => resizeImage(x, `${D}/img.fvd`, 50 * KiB, { shrink: true }) };
    });
  });
}

test.run();
