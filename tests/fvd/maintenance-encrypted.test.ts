/**
 * commit, rebase and resize of ENCRYPTED images (docs/FORMAT.md §11, §12), at the engine level:
 *
 *  - a differential run like tests/properties/maintenance-diff.test.ts over encrypted images: random layout,
 *    geometry and base (none, raw, FVD, FVD over raw), random steps — guest writes (some of them a
 *    recognisable plaintext marker; some left dirty), commit (-d sometimes), safe rebase onto new
 *    bases that also hold the marker, rebase -b "", rebase -u (without the key), resize (growing
 *    without the key, shrinking with and without --shrink). After every step the image is
 *    reopened with the key and compared with the model, its key fields (header bytes 176..303)
 *    must be the ones create wrote, checkImage (with the key) must find nothing, and the image
 *    file must not contain the marker: whatever a rebase or resize copied in is ciphertext. After
 *    a commit the base must read the model's plaintext.
 *  - operations that need the key refuse without it, with a wrong key, or with a key for an
 *    unencrypted image: KeyError, one line, every file byte-identical;
 *  - internal snapshots: commit, rebase and resize refuse with the reason, nothing written.
 *
 * Replay: FVD_SEED=n runs only that seed; FVD_STEPS=n sets the steps per seed.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { commitImage, rebaseImage, resizeImage } from '../../fvd/maintenance.js';
import { checkImage } from '../../fvd/check.js';
import { KeyError } from '../../fvd/crypto.js';
import { FvdError } from '../../fvd/errors.js';
import { HEADER_SIZE, INCOMPAT_ENCRYPTED, decodeHeader } from '../../fvd/format.js';
import type { IoBackend } from '../../fvd/io.js';
import { MemIo } from '../helpers/mem-io.js';
import { Rng, envSeed, envSteps, randomSeed } from '../helpers/rng.js';
import { firstMismatch, makeData, readWholeDisk } from '../helpers/model.js';

const KiB = 1024;
const DIR = '/enc';
const KEY = Buffer.from('the maintenance tests key');
const WRONG = Buffer.from('the maintenance tests kez');
/** Cheap scrypt (1 MiB): the tests open images many times. */
const FAST_KDF = { log2N: 10, r: 8, p: 1 };
/** A plaintext marker that must never appear in an encrypted image file. */
const MARKER = Buffer.from('<<ENCRYPTED-MAINT-MARKER-0123>>!');

/** `len` bytes (a multiple of 32) of the marker repeated. */
function markerData(len: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i += MARKER.length) b.set(MARKER.subarray(0, Math.min(MARKER.length, len - i)), i);
  return b;
}

async function readEncrypted(io: IoBackend, p: string, key: Uint8Array = KEY): Promise<Uint8Array> {
  const img = await FvdImage.open(io, p, { readOnly: true, key });
  try {
    const buf = new Uint8Array(img.size);
    await img.read(buf, 0);
    return buf;
  } finally {
    await img.close();
  }
}

function cryptBytes(io: MemIo, p: string): Uint8Array {
  return io.readFile(p).slice(176, 304);
}

function contains(hay: Uint8Array, needle: Uint8Array): boolean {
  return Buffer.from(hay.buffer, hay.byteOffset, hay.byteLength).includes(Buffer.from(needle));
}

/** Runs `fn`, which must throw `cls` matching `re`, and checks that no file changed. */
async function refusedUnchanged(io: MemIo, fn: () => Promise<unknown>, cls: Function, re: RegExp, what: string): Promise<string> {
  const before = io.snapshot();
  let err: unknown;
  try {
    await fn();
  } catch (e) {
    err = e;
  }
  assert.ok(err instanceof cls, `${what}: expected ${cls.name}, got ${err === undefined ? 'success' : (err as Error).stack}`);
  const msg = (err as Error).message;
  assert.match(msg, re, `${what}: message`);
  assert.not.match(msg, /\n/, `${what}: one line`);
  assert.not.ok(msg.includes(KEY.toString()), `${what}: the key is never in a message`);
  const after = io.snapshot();
  assert.is(after.size, before.size, `${what}: files created or removed`);
  for (const [k, v] of before) assert.ok(Buffer.from(after.get(k)!).equals(Buffer.from(v)), `${what}: ${k} changed`);
  assert.is(io.openCount, 0, `${what}: handles left open`);
  return msg;
}

// -----------------------------------------------------------------------------------------------
// Differential run

interface World {
  io: MemIo;
  rng: Rng;
  image: string;
  disk: Uint8Array;
  base: { rel: string; format: 'raw' | 'fvd'; content: Uint8Array } | null;
  crypt: Uint8Array;
  names: number;
  log: string[];
  writeId: number;
}

function fail(w: World, what: string): never {
  throw new Error(`${what}\n  steps:\n    ${w.log.join('\n    ')}`);
}

function compare(w: World, expected: Uint8Array, actual: Uint8Array, what: string): void {
  if (expected.length !== actual.length) fail(w, `${what}: ${actual.length} bytes, model has ${expected.length}`);
  const m = firstMismatch(expected, actual, 0);
  if (m) fail(w, `${what}: ${m}`);
}

function roundTo(v: number, a: number): number {
  return Math.max(a, Math.round(v / a) * a);
}

/** A new (plaintext) base sharing part of `from`; some of it is the marker. */
async function makeBase(w: World, from: Uint8Array, size: number, format: 'raw' | 'fvd'): Promise<{ rel: string; content: Uint8Array }> {
  const r = w.rng;
  size = Math.ceil(size / 512) * 512;
  const content = new Uint8Array(size);
  content.set(from.subarray(0, Math.min(size, from.length)));
  for (let i = 0, n = r.range(1, 5); i < n; i++) {
    const off = r.int(size / 4096) * 4096;
    const len = Math.min(size - off, r.range(1, 4) * 4096);
    if (len <= 0) continue;
    const kind = r.weighted([2, 1, 2]);
    content.set(kind === 0 ? r.bytes(len) : kind === 1 ? new Uint8Array(len) : markerData(len), off);
  }
  const rel = `base${++w.names}.${format}`;
  const p = `${DIR}/${rel}`;
  if (format === 'raw') {
    w.io.writeFile(p, content);
    return { rel, content };
  }
  let opts = {};
  if (r.chance(0.5)) {
    const below = content.slice();
    for (let i = 0, n = r.range(1, 4); i < n; i++) {
      const off = r.int(size / 512) * 512;
      below.set(r.bytes(Math.min(size - off, r.range(1, 16) * 512)), off);
    }
    const bottom = `bottom${w.names}.raw`;
    w.io.writeFile(`${DIR}/${bottom}`, below);
    opts = { base: bottom, baseFormat: 'raw' as const };
  }
  await FvdImage.create(w.io, p, { size, blockSize: r.pick([4, 8, 16]) * KiB, layout: r.chance(0.5) ? 'compact' : 'raw', chunkSize: 64 * KiB, journalSize: 16 * KiB, ...opts });
  const img = await FvdImage.open(w.io, p, { copyOnRead: false });
  await img.write(content, 0);
  await img.close();
  return { rel, content };
}

async function readBase(w: World): Promise<Uint8Array> {
  const p = `${DIR}/${w.base!.rel}`;
  return w.base!.format === 'raw' ? w.io.readFile(p) : readWholeDisk(w.io, p);
}

async function guestWrites(w: World): Promise<void> {
  const r = w.rng;
  const img = await FvdImage.open(w.io, w.image, { key: KEY, copyOnRead: r.chance(0.3) });
  const V = w.disk.length;
  const n = r.range(1, 10);
  for (let i = 0; i < n; i++) {
    const off = r.int(V / 512) * 512;
    const len = Math.min(V - off, r.range(1, 96) * 512);
    const kind = r.weighted([3, 3, 1, 1]);
    if (kind <= 1) {
      const data = kind === 0 ? markerData(len) : makeData(r, len, ++w.writeId, off, r.pick(['random', 'zero', 'mixed'] as const));
      await img.write(data, off);
      w.disk.set(data, off);
    } else {
      await (kind === 2 ? img.discard(off, len) : img.writeZeroes(off, len));
      w.disk.fill(0, off, off + len);
    }
    if (r.chance(0.2)) await img.read(new Uint8Array(Math.min(V, 64 * KiB)), 0); // copy-on-read, encrypted
  }
  if (r.chance(0.3)) {
    await img.flush();
    await img.abandon();
    w.log.push(`${n} writes, flushed, abandoned (dirty)`);
  } else {
    await img.close();
    w.log.push(`${n} writes, closed`);
  }
}

async function step(w: World): Promise<void> {
  const r = w.rng;
  const io = w.io;
  const V = w.disk.length;
  const op = r.weighted([4, 3, 3, 4]);
  if (op === 0) return guestWrites(w);
  if (op === 1) {
    if (!w.base) return guestWrites(w);
    const keep = r.chance(0.3);
    if (r.chance(0.3)) await refusedUnchanged(io, () => commitImage(io, w.image, { keep }), KeyError, /commit needs its key/, 'commit without the key');
    w.log.push(`commit${keep ? ' -d' : ''} into ${w.base.rel} (${w.base.content.length} bytes, disk ${V})`);
    await commitImage(io, w.image, { keep, key: KEY });
    const grown = new Uint8Array(Math.max(w.base.content.length, V));
    grown.set(w.base.content);
    grown.set(w.disk);
    w.base.content = grown;
    // The base holds the plaintext (read as it is, without any key).
    compare(w, w.base.content, await readBase(w), 'base after commit');
    return;
  }
  if (op === 2) {
    const kind = r.weighted([5, 2, w.base ? 4 : 0]);
    if (kind === 1) {
      w.log.push(`rebase -b "" (from ${w.base?.rel ?? 'none'})`);
      await rebaseImage(io, w.image, { base: '', key: KEY });
      w.base = null;
      return;
    }
    if (kind === 2) {
      // -u reads and writes no data: no key needed.
      const rel = `copy${++w.names}.raw`;
      io.writeFile(`${DIR}/${rel}`, w.base!.content.slice());
      const withKey = r.chance(0.3);
      w.log.push(`rebase -u onto ${rel} (identical copy of ${w.base!.rel})${withKey ? ' with the key' : ' without the key'}`);
      await rebaseImage(io, w.image, { base: rel, baseFormat: 'raw', unsafe: true, key: withKey ? KEY : undefined });
      w.base = { rel, format: 'raw', content: w.base!.content.slice() };
      return;
    }
    const format = r.chance(0.5) ? 'raw' : 'fvd';
    const from = w.base ? w.base.content : w.disk;
    const size = r.chance(0.2) ? Math.ceil(from.length / 512) * 512 : roundTo(r.range(Math.floor(V / 4), V * 2), 512);
    const nb = await makeBase(w, from, size, format);
    if (r.chance(0.3))
      await refusedUnchanged(io, () => rebaseImage(io, w.image, { base: nb.rel, baseFormat: format }), KeyError, /safe rebase .* needs its key/, 'safe rebase without the key');
    w.log.push(`rebase onto ${nb.rel} (${format}, ${nb.content.length} bytes)`);
    await rebaseImage(io, w.image, { base: nb.rel, baseFormat: format, key: KEY });
    w.base = { rel: nb.rel, format, content: nb.content };
    return;
  }
  const grow = r.chance(0.5);
  const size = grow ? roundTo(r.range(V + 1, V * 2), 512) : roundTo(r.range(Math.floor(V / 4), V - 1), 512);
  if (size === V) return;
  if (grow) {
    // Without the key when possible: only a partly-in-disk end block still in the base needs it.
    let how = 'without the key';
    const before = io.snapshot();
    try {
      await resizeImage(io, w.image, size);
    } catch (err) {
      if (!(err instanceof KeyError) || !/growing it \(the block holding the old end, \d+ bytes, still reads from the base/.test(err.message)) throw err;
      for (const [k, v] of io.snapshot()) if (!Buffer.from(v).equals(Buffer.from(before.get(k) ?? new Uint8Array(0)))) fail(w, `refused grow changed ${k}`);
      await resizeImage(io, w.image, size, { key: KEY });
      how = 'with the key (end block in the base)';
    }
    w.log.push(`resize ${V} -> ${size} ${how}`);
    const d = new Uint8Array(size);
    d.set(w.disk);
    w.disk = d;
    return;
  }
  const tailZero = w.disk.subarray(size).every((x) => x === 0);
  const shrink = r.chance(0.5);
  w.log.push(`resize ${V} -> ${size}${shrink ? ' --shrink (without the key)' : ''} (tail ${tailZero ? 'zero' : 'has data'})`);
  if (!shrink) {
    await refusedUnchanged(io, () => resizeImage(io, w.image, size), KeyError, /shrinking it without --shrink .* needs its key/, 'shrink without the key');
    if (!tailZero) {
      await refusedUnchanged(io, () => resizeImage(io, w.image, size, { key: KEY }), FvdError, /would discard data/, 'shrink over data');
      return;
    }
    await resizeImage(io, w.image, size, { key: KEY });
  } else {
    await resizeImage(io, w.image, size, { shrink: true });
  }
  w.disk = w.disk.slice(0, size);
}

async function verify(w: World, after: string): Promise<void> {
  compare(w, w.disk, await readEncrypted(w.io, w.image), `image after ${after}`);
  const bytes = w.io.readFile(w.image);
  const h = decodeHeader(w.image, bytes.subarray(0, HEADER_SIZE), bytes.length);
  if (!(h.incompatible & INCOMPAT_ENCRYPTED)) fail(w, 'ENCRYPTED bit lost');
  if (!Buffer.from(bytes.subarray(176, 304)).equals(Buffer.from(w.crypt))) fail(w, `key fields (bytes 176..303) changed by ${after}`);
  if (h.virtualSize !== w.disk.length) fail(w, `header virtual size ${h.virtualSize}, model ${w.disk.length}`);
  if (h.basePathOffset !== 0 || h.baseSizeNext !== 0) fail(w, `transient header fields left set`);
  if (contains(bytes, MARKER)) fail(w, `the image file holds plaintext (the marker) after ${after}`);
  const report = await checkImage(w.io, w.image, { key: KEY });
  if (report.errors.length) fail(w, `check after ${after}: ${report.errors.join('; ')}`);
  if (w.io.openCount !== 0) fail(w, `${w.io.openCount} file handles left open after ${after}`);
}

async function runSeed(seed: number, steps: number): Promise<void> {
  const r = new Rng(seed);
  const io = new MemIo({ rng: new Rng(seed ^ 0x5bd1e995), seekData: r.chance(0.5) });
  const bs = r.pick([4, 8, 16]) * KiB;
  const layout = r.chance(0.5) ? ('compact' as const) : ('raw' as const);
  const chunk = Math.max(bs, r.pick([16, 32, 64]) * KiB);
  const V = roundTo(r.range(64 * KiB, 512 * KiB), 512);
  const w: World = { io, rng: r, image: `${DIR}/disk.fvd`, disk: new Uint8Array(V), base: null, crypt: new Uint8Array(0), names: 0, log: [], writeId: 0 };
  const baseKind = r.weighted([1, 2, 2]);
  w.log.push(`FVD_SEED=${seed}: encrypted ${layout} disk ${V}, block ${bs}, chunk ${chunk}`);
  if (baseKind > 0) {
    const format = baseKind === 1 ? 'raw' : 'fvd';
    const size = r.range(Math.floor(V / 3), V * 2);
    const nb = await makeBase(w, r.bytes(size), size, format);
    w.base = { rel: nb.rel, format, content: nb.content };
    w.disk.set(nb.content.subarray(0, Math.min(V, nb.content.length)));
    w.log.push(`base ${nb.rel} (${format}, ${nb.content.length} bytes)`);
  }
  await FvdImage.create(io, w.image, {
    size: V,
    layout,
    blockSize: bs,
    chunkSize: chunk,
    journalSize: r.pick([8, 16, 64]) * KiB,
    detectZeroes: r.chance(0.5),
    encrypt: { key: KEY, kdf: FAST_KDF },
    ...(w.base ? { base: w.base.rel, baseFormat: w.base.format } : {}),
  });
  w.crypt = cryptBytes(io, w.image);
  await verify(w, 'create');
  for (let i = 0; i < steps; i++) {
    try {
      await step(w);
    } catch (err) {
      if (err instanceof Error && err.message.includes('\n  steps:')) throw err;
      fail(w, `step ${i + 1} threw: ${(err as Error)?.stack ?? err}`);
    }
    await verify(w, w.log[w.log.length - 1]!);
    if (process.env.CRR_TRACE) console.log(w.log[w.log.length - 1]);
  }
}

const only = envSeed();
const steps = envSteps(12);
const fresh = randomSeed();
const seeds = only !== undefined ? [only] : [1, 2, 3, 4, 5, 6, 7, 8, fresh];
if (only === undefined) console.log(`maintenance-encrypted: fresh seed FVD_SEED=${fresh} (replay with FVD_SEED=n); ${steps} steps per seed`);

for (const seed of seeds) {
  test(`encrypted commit/rebase/resize against the model, FVD_SEED=${seed}`, async () => {
    await runSeed(seed, steps);
  });
}

test('the marker check can fail: a plaintext write into the data area is found', async () => {
  const io = new MemIo();
  await FvdImage.create(io, `${DIR}/p.fvd`, { size: 64 * KiB, journalSize: 8 * KiB });
  const img = await FvdImage.open(io, `${DIR}/p.fvd`);
  await img.write(markerData(4096), 8192);
  await img.close();
  assert.ok(contains(io.readFile(`${DIR}/p.fvd`), MARKER), 'an unencrypted image holds the marker');
});

// -----------------------------------------------------------------------------------------------
// Directed cases

async function encImage(io: MemIo, p: string, o: CreateOptions): Promise<void> {
  await FvdImage.create(io, p, { journalSize: 16 * KiB, encrypt: { key: KEY, kdf: FAST_KDF }, ...o });
}

test('commit: the base receives plaintext, the emptied image reads it through the base; key fields kept', async () => {
  const io = new MemIo({ seekData: true });
  const base = new Uint8Array(128 * KiB).fill(0x5a);
  io.writeFile(`${DIR}/b.raw`, base);
  for (const layout of ['raw', 'compact'] as const) {
    io.writeFile(`${DIR}/b.raw`, base);
    await encImage(io, `${DIR}/c.fvd`, { base: 'b.raw', baseFormat: 'raw', layout, size: 192 * KiB, blockSize: 8 * KiB, chunkSize: 32 * KiB });
    const crypt = cryptBytes(io, `${DIR}/c.fvd`);
    const img = await FvdImage.open(io, `${DIR}/c.fvd`, { key: KEY });
    await img.write(markerData(8 * KiB), 16 * KiB);
    await img.write(markerData(4 * KiB), 160 * KiB); // past the base: it grows
    await img.writeZeroes(40 * KiB, 8 * KiB); // zeros over base data
    await img.close();
    const expected = await readEncrypted(io, `${DIR}/c.fvd`);
    assert.not.ok(contains(io.readFile(`${DIR}/c.fvd`), MARKER), `${layout}: ciphertext before`);
    const res = await commitImage(io, `${DIR}/c.fvd`, { key: KEY });
    assert.is(res.baseGrownTo, 192 * KiB);
    const b = io.readFile(`${DIR}/b.raw`);
    assert.ok(Buffer.from(b).equals(Buffer.from(expected)), `${layout}: the base = the image's plaintext`);
    assert.ok(contains(b, MARKER), `${layout}: the base holds the marker in plaintext`);
    assert.ok(Buffer.from(cryptBytes(io, `${DIR}/c.fvd`)).equals(Buffer.from(crypt)), `${layout}: key fields kept`);
    assert.ok(Buffer.from(await readEncrypted(io, `${DIR}/c.fvd`)).equals(Buffer.from(expected)), `${layout}: reads the same`);
    const img2 = await FvdImage.open(io, `${DIR}/c.fvd`, { key: KEY, readOnly: true });
    assert.is(img2.stats().bytesLocal, 0, `${layout}: emptied`);
    await img2.close();
    assert.equal((await checkImage(io, `${DIR}/c.fvd`, { key: KEY })).errors, []);
  }
});

test('rebase -b "": base data (the marker) is copied in encrypted; resize grow without the key; shrink needs it', async () => {
  const io = new MemIo({ seekData: true });
  io.writeFile(`${DIR}/m.raw`, markerData(96 * KiB));
  await encImage(io, `${DIR}/r.fvd`, { base: 'm.raw', baseFormat: 'raw', layout: 'compact', size: 96 * KiB, blockSize: 4 * KiB, chunkSize: 16 * KiB });
  const crypt = cryptBytes(io, `${DIR}/r.fvd`);
  // -u without any key: onto an identical copy, then back (metadata only).
  io.writeFile(`${DIR}/m2.raw`, markerData(96 * KiB));
  await rebaseImage(io, `${DIR}/r.fvd`, { base: 'm2.raw', baseFormat: 'raw', unsafe: true });
  assert.ok(Buffer.from(await readEncrypted(io, `${DIR}/r.fvd`)).equals(Buffer.from(markerData(96 * KiB))), 'after -u');
  await rebaseImage(io, `${DIR}/r.fvd`, { base: 'm.raw', baseFormat: 'raw', unsafe: true });
  io.deleteFile(`${DIR}/m2.raw`);
  const r = await rebaseImage(io, `${DIR}/r.fvd`, { base: '', key: KEY });
  assert.is(r.bytesCopied, 96 * KiB);
  io.deleteFile(`${DIR}/m.raw`);
  const file = io.readFile(`${DIR}/r.fvd`);
  assert.not.ok(contains(file, MARKER), 'no plaintext copied in');
  assert.ok(Buffer.from(await readEncrypted(io, `${DIR}/r.fvd`)).equals(Buffer.from(markerData(96 * KiB))), 'reads the marker with the key');
  // Grow with no key at all (metadata and zeroing only).
  await resizeImage(io, `${DIR}/r.fvd`, 200 * KiB);
  const want = new Uint8Array(200 * KiB);
  want.set(markerData(96 * KiB));
  assert.ok(Buffer.from(await readEncrypted(io, `${DIR}/r.fvd`)).equals(Buffer.from(want)), 'grown: the new range reads zeros');
  // Shrinking over zeros: needs the key to prove them zero (zero plaintext is not zero ciphertext).
  await refusedUnchanged(io, () => resizeImage(io, `${DIR}/r.fvd`, 96 * KiB), KeyError, /needs its key/, 'shrink without the key');
  await refusedUnchanged(io, () => resizeImage(io, `${DIR}/r.fvd`, 64 * KiB, { key: KEY }), FvdError, /byte 65536 is not zero/, 'shrink over data');
  await resizeImage(io, `${DIR}/r.fvd`, 96 * KiB, { key: KEY });
  await resizeImage(io, `${DIR}/r.fvd`, 32 * KiB, { shrink: true }); // --shrink: no key needed
  assert.ok(Buffer.from(await readEncrypted(io, `${DIR}/r.fvd`)).equals(Buffer.from(markerData(32 * KiB))));
  assert.ok(Buffer.from(cryptBytes(io, `${DIR}/r.fvd`)).equals(Buffer.from(crypt)), 'key fields kept through every switch');
  assert.equal((await checkImage(io, `${DIR}/r.fvd`, { key: KEY })).errors, []);
});

test('a grown image whose old end block reads from the base needs the key; with it that block is copied in encrypted', async () => {
  const io = new MemIo();
  io.writeFile(`${DIR}/m.raw`, markerData(64 * KiB));
  await encImage(io, `${DIR}/g.fvd`, { base: 'm.raw', baseFormat: 'raw', size: 20 * KiB + 512, blockSize: 8 * KiB });
  await refusedUnchanged(io, () => resizeImage(io, `${DIR}/g.fvd`, 64 * KiB), KeyError, /g\.fvd: the image is encrypted: growing it \(the block holding the old end, 20992 bytes, still reads from the base and must be copied in\) needs its key/, 'grow');
  await resizeImage(io, `${DIR}/g.fvd`, 64 * KiB, { key: KEY });
  const want = new Uint8Array(64 * KiB);
  want.set(markerData(20 * KiB + 512));
  assert.ok(Buffer.from(await readEncrypted(io, `${DIR}/g.fvd`)).equals(Buffer.from(want)));
  assert.not.ok(contains(io.readFile(`${DIR}/g.fvd`), MARKER));
});

test('bad keys: missing, wrong, or given for an unencrypted image — KeyError, nothing written', async () => {
  const io = new MemIo();
  io.writeFile(`${DIR}/b.raw`, markerData(64 * KiB));
  await encImage(io, `${DIR}/e.fvd`, { base: 'b.raw', baseFormat: 'raw', size: 128 * KiB, blockSize: 4 * KiB });
  let img = await FvdImage.open(io, `${DIR}/e.fvd`, { key: KEY });
  await img.write(new Uint8Array(8 * KiB).fill(7), 0);
  await img.flush();
  await img.abandon(); // dirty: a refused operation must not even replay the journal on disk
  await FvdImage.create(io, `${DIR}/p.fvd`, { base: 'b.raw', baseFormat: 'raw', size: 64 * KiB, journalSize: 8 * KiB });
  io.writeFile(`${DIR}/n.raw`, new Uint8Array(64 * KiB));
  const e = `${DIR}/e.fvd`;
  const p = `${DIR}/p.fvd`;
  const ops: Array<[string, (path: string, key?: Uint8Array) => Promise<unknown>, boolean]> = [
    ['commit', (f, key) => commitImage(io, f, { key }), true],
    ['commit -d', (f, key) => commitImage(io, f, { key, keep: true }), true],
    ['rebase', (f, key) => rebaseImage(io, f, { base: 'n.raw', baseFormat: 'raw', key }), true],
    ['rebase -b ""', (f, key) => rebaseImage(io, f, { base: '', key }), true],
    ['rebase -u', (f, key) => rebaseImage(io, f, { base: 'n.raw', baseFormat: 'raw', unsafe: true, key }), false],
    ['resize grow', (f, key) => resizeImage(io, f, 256 * KiB, { key }), false],
    ['resize shrink', (f, key) => resizeImage(io, f, 32 * KiB, { key }), true],
    ['resize --shrink', (f, key) => resizeImage(io, f, 32 * KiB, { key, shrink: true }), false],
  ];
  for (const [name, run, needsKey] of ops) {
    if (needsKey) await refusedUnchanged(io, () => run(e), KeyError, /e\.fvd: the image is encrypted: .*needs its key \(--key-file PATH, or --key-file - for stdin\)/, `${name} without a key`);
    await refusedUnchanged(io, () => run(e, WRONG), KeyError, /e\.fvd: wrong key/, `${name} with a wrong key`);
    await refusedUnchanged(io, () => run(p, KEY), KeyError, /p\.fvd: the image is not encrypted, but a key was given/, `${name} with a key for an unencrypted image`);
  }
  // Damaged key fields are reported without the key too (as info/check do).
  const good = io.readFile(e);
  const bad = good.slice();
  bad[176] = 9;
  io.writeFile(e, bad);
  await refusedUnchanged(io, () => rebaseImage(io, e, { base: '', unsafe: true }), FvdError, /./, 'damaged crypt_method');
  io.writeFile(e, good);
  img = await FvdImage.open(io, e, { key: KEY, readOnly: true });
  await img.close();
});

test('internal snapshots: commit, rebase and resize refuse with the reason, nothing written', async () => {
  const io = new MemIo();
  io.writeFile(`${DIR}/b.raw`, markerData(64 * KiB));
  await FvdImage.create(io, `${DIR}/s.fvd`, { base: 'b.raw', baseFormat: 'raw', layout: 'compact', size: 64 * KiB, blockSize: 4 * KiB, chunkSize: 16 * KiB, journalSize: 8 * KiB });
  const img = await FvdImage.open(io, `${DIR}/s.fvd`);
  await img.write(new Uint8Array(4 * KiB).fill(1), 0);
  await img.snapshots.create('one');
  await img.close();
  const s = `${DIR}/s.fvd`;
  const why = /delete the snapshots first \(fvd snapshot -d NAME\)/;
  await refusedUnchanged(io, () => commitImage(io, s), FvdError, /s\.fvd: commit refuses an image with internal snapshots: its snapshots read every block they do not hold through the base, so writing into the base would change what each snapshot holds/, 'commit');
  await refusedUnchanged(io, () => commitImage(io, s, { keep: true }), FvdError, why, 'commit -d');
  await refusedUnchanged(io, () => rebaseImage(io, s, { base: '' }), FvdError, /rebase refuses an image with internal snapshots: .*switching the base would change what each snapshot holds/, 'rebase');
  await refusedUnchanged(io, () => rebaseImage(io, s, { base: 'b.raw', baseFormat: 'raw', unsafe: true }), FvdError, why, 'rebase -u');
  await refusedUnchanged(io, () => resizeImage(io, s, 128 * KiB), FvdError, /resize refuses an image with internal snapshots: a snapshot can only be applied to a disk of the size it was taken at/, 'resize grow');
  await refusedUnchanged(io, () => resizeImage(io, s, 32 * KiB, { shrink: true }), FvdError, why, 'resize shrink');
  // A base with snapshots is refused as a base (named so), before anything is written.
  await FvdImage.create(io, `${DIR}/top.fvd`, { base: 's.fvd', baseFormat: 'fvd', size: 64 * KiB, journalSize: 8 * KiB });
  const top = await FvdImage.open(io, `${DIR}/top.fvd`);
  await top.write(new Uint8Array(4 * KiB).fill(2), 8 * KiB);
  await top.close();
  await refusedUnchanged(io, () => commitImage(io, `${DIR}/top.fvd`), FvdError, /base image 's\.fvd': commit refuses a base with internal snapshots/, 'commit into a base with snapshots');
  // Deleting the snapshot lifts the refusal.
  const again = await FvdImage.open(io, s);
  await again.snapshots.delete('one');
  await again.close();
  await resizeImage(io, s, 128 * KiB);
  await commitImage(io, s);
  const b = io.readFile(`${DIR}/b.raw`);
  assert.is(b.length, 128 * KiB);
  assert.ok(b.subarray(0, 4 * KiB).every((x) => x === 1));
});

test.run();
