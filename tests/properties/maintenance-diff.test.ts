/**
 * Differential test of commit, rebase and resize: random images (layout, block and chunk size,
 * journal size, no base / raw base / FVD base / FVD over raw, base smaller or larger than the
 * disk), then a random sequence of steps — guest writes (closed cleanly, or flushed and abandoned
 * so the next step meets a dirty image), commit (-d sometimes), rebase (safe, onto a new base
 * that shares part of the old content, of another size and format; -b ""; -u onto an identical
 * copy), resize (grow, shrink over zeros, shrink over data with and without --shrink). After
 * every step the image is reopened and compared byte for byte with a model of the virtual disk;
 * after a commit the base is compared too; checkImage must find nothing.
 *
 * Replay: FVD_SEED=n runs only that seed; FVD_STEPS=n sets the steps per seed.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { FvdImage } from '../../fvd/image.js';
import { commitImage, rebaseImage, resizeImage } from '../../fvd/maintenance.js';
import { checkImage } from '../../fvd/check.js';
import { FvdError } from '../../fvd/errors.js';
import { HEADER_SIZE, decodeHeader } from '../../fvd/format.js';
import { MemIo } from '../helpers/mem-io.js';
import { Rng, envSeed, envSteps, randomSeed } from '../helpers/rng.js';
import { firstMismatch, makeData, readWholeDisk } from '../helpers/model.js';

const KiB = 1024;
const DIR = '/diff';

interface World {
  io: MemIo;
  rng: Rng;
  image: string;
  /** The virtual disk as the image must read it. */
  disk: Uint8Array;
  /** The base's content as it must read (null: no base), its path as recorded, its format. */
  base: { rel: string; format: 'raw' | 'fvd'; content: Uint8Array } | null;
  names: number;
  log: string[];
  writeId: number;
}

async function readBase(w: World): Promise<Uint8Array> {
  const p = `${DIR}/${w.base!.rel}`;
  return w.base!.format === 'raw' ? w.io.readFile(p) : readWholeDisk(w.io, p);
}

function fail(w: World, what: string): never {
  throw new Error(`${what}\n  steps:\n    ${w.log.join('\n    ')}`);
}

function compare(w: World, expected: Uint8Array, actual: Uint8Array, what: string): void {
  if (expected.length !== actual.length) fail(w, `${what}: ${actual.length} bytes, model has ${expected.length}`);
  const m = firstMismatch(expected, actual, 0);
  if (m) fail(w, `${what}: ${m}`);
}

/** A new base whose content shares part of `from` (same bytes at the same offsets). */
async function makeBase(w: World, from: Uint8Array, size: number, format: 'raw' | 'fvd'): Promise<{ rel: string; content: Uint8Array }> {
  const r = w.rng;
  if (format === 'fvd') size = Math.ceil(size / 512) * 512; // an FVD disk is whole sectors
  const content = new Uint8Array(size);
  content.set(from.subarray(0, Math.min(size, from.length)));
  const unit = 4 * KiB;
  for (let i = 0, n = r.range(0, 6); i < n; i++) {
    const off = r.int(Math.ceil(size / unit)) * unit;
    const len = Math.min(size - off, r.range(1, 4) * unit);
    if (len <= 0) continue;
    content.set(r.chance(0.3) ? new Uint8Array(len) : r.bytes(len), off);
  }
  const rel = `base${++w.names}.${format}`;
  const p = `${DIR}/${rel}`;
  if (format === 'raw') {
    w.io.writeFile(p, content);
    return { rel, content };
  }
  // FVD: standalone, or over a raw bottom that differs in places (a chain of three).
  let opts = {};
  let below = new Uint8Array(size);
  if (r.chance(0.5)) {
    below = content.slice();
    for (let i = 0, n = r.range(1, 4); i < n; i++) {
      const off = r.int(size / 512) * 512;
      const len = Math.min(size - off, r.range(1, 16) * 512);
      below.set(r.bytes(len), off);
    }
    const bottom = `bottom${w.names}.raw`;
    w.io.writeFile(`${DIR}/${bottom}`, below);
    opts = { base: bottom, baseFormat: 'raw' as const };
  }
  await FvdImage.create(w.io, p, { size, blockSize: r.pick([4, 8, 16]) * KiB, layout: r.chance(0.5) ? 'compact' : 'raw', chunkSize: 64 * KiB, journalSize: 16 * KiB, ...opts });
  const img = await FvdImage.open(w.io, p, { copyOnRead: false });
  for (let off = 0; off < size; off += 512) {
    let end = off;
    while (end < size && !sameSector(content, below, end)) end += 512;
    if (end > off) await img.write(content.subarray(off, end), off);
    off = end;
  }
  await img.close();
  return { rel, content };
}

function sameSector(a: Uint8Array, b: Uint8Array, off: number): boolean {
  for (let i = off; i < Math.min(off + 512, a.length); i++) if (a[i] !== b[i]) return false;
  return true;
}

async function guestWrites(w: World): Promise<void> {
  const r = w.rng;
  const img = await FvdImage.open(w.io, w.image, { copyOnRead: r.chance(0.3) });
  const V = w.disk.length;
  const n = r.range(1, 12);
  for (let i = 0; i < n; i++) {
    const off = r.int(V / 512) * 512;
    const len = Math.min(V - off, r.range(1, 96) * 512);
    const kind = r.weighted([6, 1, 1]);
    if (kind === 0) {
      const data = makeData(r, len, ++w.writeId, off, r.pick(['random', 'zero', 'mixed'] as const));
      await img.write(data, off);
      w.disk.set(data, off);
    } else {
      await (kind === 1 ? img.discard(off, len) : img.writeZeroes(off, len));
      w.disk.fill(0, off, off + len);
    }
    if (r.chance(0.2)) {
      const probe = new Uint8Array(Math.min(V, 64 * KiB));
      const at = r.int(V - probe.length + 1);
      await img.read(probe, at); // may copy base data in (copy-on-read)
    }
  }
  if (r.chance(0.3)) {
    await img.flush();
    await img.abandon(); // not closed cleanly: the next step replays the journal
    w.log.push(`${n} writes, flushed, abandoned (dirty)`);
  } else {
    await img.close();
    w.log.push(`${n} writes, closed`);
  }
}

async function step(w: World): Promise<void> {
  const r = w.rng;
  const V = w.disk.length;
  const op = r.weighted([4, 3, 3, 4]);
  if (op === 0) return guestWrites(w);
  if (op === 1) {
    if (!w.base) return guestWrites(w);
    const keep = r.chance(0.3);
    w.log.push(`commit${keep ? ' -d' : ''} into ${w.base.rel} (${w.base.content.length} bytes, disk ${V})`);
    const res = await commitImage(w.io, w.image, { keep });
    const oldSize = w.base.content.length;
    if (res.baseGrownTo !== (V > oldSize ? V : null)) fail(w, `commit grew the base to ${res.baseGrownTo}, expected ${V > oldSize ? V : null}`);
    const grown = new Uint8Array(Math.max(oldSize, V));
    grown.set(w.base.content);
    grown.set(w.disk);
    w.base.content = grown;
    compare(w, w.base.content, await readBase(w), 'base after commit');
    const st = await statsOf(w);
    if (!keep && st.bytesInBase !== V) fail(w, `commit emptied the image, yet ${st.bytesLocal} bytes are local`);
    return;
  }
  if (op === 2) {
    const kind = r.weighted([6, 1, w.base ? 2 : 0]);
    if (kind === 1) {
      w.log.push(`rebase -b "" (from ${w.base?.rel ?? 'none'})`);
      await rebaseImage(w.io, w.image, { base: '' });
      w.base = null;
      return;
    }
    if (kind === 2) {
      const copy = await makeBaseExact(w, w.base!.content, r.chance(0.5) ? 'raw' : 'fvd');
      w.log.push(`rebase -u onto ${copy.rel} (identical copy of ${w.base!.rel})`);
      await rebaseImage(w.io, w.image, { base: copy.rel, baseFormat: copy.format, unsafe: true });
      w.base = { rel: copy.rel, format: copy.format, content: copy.content };
      return;
    }
    const format = r.chance(0.5) ? 'raw' : 'fvd';
    const from = w.base ? w.base.content : w.disk;
    const size = r.chance(0.2) ? from.length : r.chance(0.5) ? r.range(Math.floor(V / 4), V * 2) : roundTo(r.range(Math.floor(V / 4), V * 2), 512);
    const nb = await makeBase(w, from, size, format);
    w.log.push(`rebase onto ${nb.rel} (${format}, ${size} bytes)`);
    await rebaseImage(w.io, w.image, { base: nb.rel, baseFormat: format });
    w.base = { rel: nb.rel, format, content: nb.content };
    return;
  }
  // resize
  const grow = r.chance(0.5);
  const size = grow ? roundTo(r.range(V + 1, V * 2), 512) : roundTo(r.range(Math.floor(V / 4), V - 1), 512);
  if (size === V) return;
  if (grow) {
    w.log.push(`resize ${V} -> ${size}`);
    await resizeImage(w.io, w.image, size);
    const d = new Uint8Array(size);
    d.set(w.disk);
    w.disk = d;
    return;
  }
  const tailZero = w.disk.subarray(size).every((x) => x === 0);
  const shrink = r.chance(0.5);
  w.log.push(`resize ${V} -> ${size}${shrink ? ' --shrink' : ''} (tail ${tailZero ? 'zero' : 'has data'})`);
  if (!shrink && !tailZero) {
    const before = w.io.snapshot();
    try {
      await resizeImage(w.io, w.image, size);
    } catch (err) {
      if (!(err instanceof FvdError) || !/would discard data/.test(err.message)) throw err;
      for (const [k, v] of w.io.snapshot()) {
        const b = before.get(k);
        if (!b || !Buffer.from(b).equals(Buffer.from(v))) fail(w, `refused resize changed ${k}`);
      }
      return;
    }
    fail(w, 'shrink over data without --shrink was not refused');
  }
  await resizeImage(w.io, w.image, size, { shrink });
  w.disk = w.disk.slice(0, size);
}

async function makeBaseExact(w: World, content: Uint8Array, format: 'raw' | 'fvd'): Promise<{ rel: string; content: Uint8Array; format: 'raw' | 'fvd' }> {
  const rel = `copy${++w.names}.${format}`;
  if (format === 'raw') {
    w.io.writeFile(`${DIR}/${rel}`, content.slice());
    return { rel, content: content.slice(), format };
  }
  if (content.length % 512) return makeBaseExact(w, content, 'raw'); // an FVD disk is whole sectors
  await FvdImage.create(w.io, `${DIR}/${rel}`, { size: content.length, blockSize: 8 * KiB, journalSize: 16 * KiB });
  const img = await FvdImage.open(w.io, `${DIR}/${rel}`);
  await img.write(content, 0);
  await img.close();
  return { rel, content: content.slice(), format };
}

function roundTo(v: number, a: number): number {
  return Math.max(a, Math.round(v / a) * a);
}

async function statsOf(w: World) {
  const img = await FvdImage.open(w.io, w.image, { readOnly: true });
  try {
    return img.stats();
  } finally {
    await img.close();
  }
}

async function verify(w: World, after: string): Promise<void> {
  compare(w, w.disk, await readWholeDisk(w.io, w.image), `image after ${after}`);
  const bytes = w.io.readFile(w.image);
  const h = decodeHeader(w.image, bytes.subarray(0, HEADER_SIZE), bytes.length);
  if (h.virtualSize !== w.disk.length) fail(w, `header virtual size ${h.virtualSize}, model ${w.disk.length}`);
  if (h.basePathOffset !== 0 || h.baseSizeNext !== 0) fail(w, `transient header fields left set: offset ${h.basePathOffset}, next ${h.baseSizeNext}`);
  if (w.base && h.baseSize !== w.base.content.length) fail(w, `header base size ${h.baseSize}, model ${w.base.content.length}`);
  if (!w.base && h.baseFormat !== 0) fail(w, 'header names a base, the model has none');
  const report = await checkImage(w.io, w.image);
  if (report.errors.length) fail(w, `check after ${after}: ${report.errors.join('; ')}`);
  if (w.io.openCount !== 0) fail(w, `${w.io.openCount} file handles left open after ${after}`);
}

async function runSeed(seed: number, steps: number): Promise<void> {
  const r = new Rng(seed);
  // Half the runs answer SEEK_DATA (zero bytes as holes): the known-zero shortcuts run too.
  const io = new MemIo({ rng: new Rng(seed ^ 0x5bd1e995), seekData: r.chance(0.5) });
  const bs = r.pick([4, 8, 16]) * KiB;
  const layout = r.chance(0.5) ? ('compact' as const) : ('raw' as const);
  const chunk = Math.max(bs, r.pick([16, 32, 64]) * KiB);
  const journal = r.pick([8, 16, 64]) * KiB;
  const V = roundTo(r.range(64 * KiB, 768 * KiB), 512);
  const w: World = { io, rng: r, image: `${DIR}/disk.fvd`, disk: new Uint8Array(V), base: null, names: 0, log: [], writeId: 0 };
  const baseKind = r.weighted([1, 2, 2]);
  w.log.push(`FVD_SEED=${seed}: ${layout} disk ${V}, block ${bs}, chunk ${chunk}, journal ${journal}`);
  if (baseKind > 0) {
    const format = baseKind === 1 ? 'raw' : 'fvd';
    const size = r.range(Math.floor(V / 3), V * 2);
    const nb = await makeBase(w, r.bytes(size), size, format);
    w.base = { rel: nb.rel, format, content: nb.content };
    w.disk.set(nb.content.subarray(0, Math.min(V, nb.content.length)));
    w.log.push(`base ${nb.rel} (${format}, ${size} bytes)`);
  }
  await FvdImage.create(io, w.image, {
    size: V,
    layout,
    blockSize: bs,
    chunkSize: chunk,
    journalSize: journal,
    detectZeroes: r.chance(0.5),
    ...(w.base ? { base: w.base.rel, baseFormat: w.base.format } : {}),
  });
  await verify(w, 'create');
  for (let i = 0; i < steps; i++) {
    try {
      await step(w);
    } catch (err) {
      if (err instanceof Error && err.message.includes('\n  steps:')) throw err;
      fail(w, `step ${i + 1} threw: ${(err as Error)?.stack ?? err}`);
    }
    await verify(w, w.log[w.log.length - 1]!);
  }
}

const fixed = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];
const only = envSeed();
const steps = envSteps(14);
const fresh = randomSeed();
const seeds = only !== undefined ? [only] : [...fixed, fresh];
if (only === undefined) console.log(`maintenance-diff: fresh seed FVD_SEED=${fresh} (replay with FVD_SEED=n); ${steps} steps per seed`);

for (const seed of seeds) {
  test(`commit/rebase/resize against the model, FVD_SEED=${seed}`, async () => {
    await runSeed(seed, steps);
  });
}

test('the model catches a wrong answer (the check can fail)', async () => {
  // Same world as seed 1, then the image is silently changed behind the model's back.
  const io = new MemIo();
  const w: World = { io, rng: new Rng(1), image: `${DIR}/disk.fvd`, disk: new Uint8Array(64 * KiB), base: null, names: 0, log: [], writeId: 0 };
  await FvdImage.create(io, w.image, { size: 64 * KiB, journalSize: 8 * KiB });
  const img = await FvdImage.open(io, w.image);
  await img.write(new Uint8Array(512).fill(7), 4096);
  await img.close();
  let caught = '';
  await verify(w, 'tampering').catch((e: Error) => (caught = e.message));
  assert.match(caught, /image after tampering: first mismatch at byte 4096/);
});

test.run();
