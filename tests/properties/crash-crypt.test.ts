/**
 * Power cuts (tests/helpers/crash-io.ts) during the encryption-specific operations:
 *
 * * unaligned writes of an encrypted image (read-modify-write of the edge sectors, FORMAT.md
 *   §11.3): after a crash at any point, every sector reads its old or its new plaintext — never a
 *   mix, never garbage — and a write acknowledged before a completed flush reads new;
 * * `change-key` (FORMAT.md §11.2): see the second part of this file.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { changeKey } from '../../fvd/change-key.js';
import { KeyError } from '../../fvd/crypto.js';
import { MemIo } from '../helpers/mem-io.js';
import { CrashIo } from '../helpers/crash-io.js';
import { Rng } from '../helpers/rng.js';
import { SECTOR } from '../helpers/model.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const KEY = Buffer.from('crash key for unaligned writes');
const FAST_KDF = { log2N: 10, r: 1, p: 1 };

interface Unaligned {
  off: number;
  len: number;
  fill: number;
  /** CrashIo sequence number when the write was acknowledged. */
  acked?: number;
}

async function unalignedCrashSeed(seed: number): Promise<number> {
  const r = new Rng(seed);
  const layout = seed % 2 ? 'raw' : 'compact';
  const withBase = seed % 3 === 0;
  const size = MiB;
  const bs = 16 * KiB;
  const mem = new MemIo({ rng: new Rng(seed ^ 0x1234) });
  const opts: CreateOptions = { size, layout, blockSize: bs, chunkSize: 64 * KiB, journalSize: 16 * KiB, encrypt: { key: KEY, kdf: FAST_KDF } };
  const old = new Uint8Array(size);
  if (withBase) {
    old.set(r.bytes(size / 2));
    mem.writeFile('/c/base.raw', old.slice(0, size / 2));
    opts.base = 'base.raw';
    opts.baseFormat = 'raw';
  }
  const imagePath = '/c/disk.fvd';
  await FvdImage.create(mem, imagePath, opts);
  // The old content: whole-sector data in the upper half, durable before recording starts.
  let img = await FvdImage.open(mem, imagePath, { key: KEY });
  const upper = r.bytes(size / 4);
  await img.write(upper, size / 2);
  old.set(upper, size / 2);
  await img.close();

  // Unaligned writes with disjoint sector sets (so each sector has exactly one old and one new
  // version), in two concurrent batches separated by a flush.
  const writes: Unaligned[] = [];
  const usedSectors = new Set<number>();
  const batches: Unaligned[][] = [[], []];
  for (let i = 0; i < 24; i++) {
    const off = r.int(size - 4 * bs) + (r.chance(0.5) ? 0 : 1);
    const len = r.chance(0.6) ? r.range(1, 700) : r.range(1, 3 * bs);
    const s0 = Math.floor(off / SECTOR);
    const s1 = Math.floor((off + len - 1) / SECTOR);
    let free = true;
    for (let s = s0; s <= s1; s++) if (usedSectors.has(s)) free = false;
    if (!free) continue;
    for (let s = s0; s <= s1; s++) usedSectors.add(s);
    const w = { off, len, fill: 1 + (i % 250) };
    writes.push(w);
    batches[i % 2]!.push(w);
  }
  const fresh = old.slice();
  for (const w of writes) fresh.fill(w.fill, w.off, w.off + w.len);

  const cio = new CrashIo(mem);
  cio.startRecording();
  img = await FvdImage.open(cio, imagePath, { key: KEY, copyOnRead: seed % 4 === 0 });
  const firstPoint = cio.seq;
  const run = (batch: Unaligned[]) =>
    Promise.all(batch.map((w) => img.write(new Uint8Array(w.len).fill(w.fill), w.off).then(() => (w.acked = cio.seq))));
  await run(batches[0]!);
  await img.flush();
  const flushed = cio.seq;
  await run(batches[1]!);
  await img.close();
  const closed = cio.seq;

  let points = 0;
  for (let k = firstPoint; k <= closed; k++) {
    const rebuilt = cio.rebuild(k, new Rng(seed * 1000 + k)).io;
    const rec = await FvdImage.open(rebuilt, imagePath, { key: KEY, readOnly: true });
    const got = new Uint8Array(size);
    await rec.read(got, 0);
    await rec.close();
    for (let s = 0; s < size / SECTOR; s++) {
      const a = s * SECTOR;
      const g = Buffer.from(got.subarray(a, a + SECTOR));
      const isOld = g.equals(Buffer.from(old.subarray(a, a + SECTOR)));
      const isNew = g.equals(Buffer.from(fresh.subarray(a, a + SECTOR)));
      if (!isOld && !isNew) assert.unreachable(`seed ${seed} ${layout}${withBase ? ' base' : ''} k=${k}: sector ${s} is neither old nor new`);
      const mustBeNew = k >= flushed && batches[0]!.some((w) => Math.floor(w.off / SECTOR) <= s && s <= Math.floor((w.off + w.len - 1) / SECTOR));
      if (mustBeNew && !isNew) assert.unreachable(`seed ${seed} k=${k}: sector ${s} lost a write acknowledged before a completed flush`);
      if (k >= closed && !isNew && usedSectors.has(s)) assert.unreachable(`seed ${seed}: sector ${s} not new after a clean close`);
    }
    points++;
  }
  return points;
}

test('power cut during unaligned writes of an encrypted image: each sector old or new, flushed writes kept', async () => {
  let points = 0;
  for (let seed = 1; seed <= 6; seed++) points += await unalignedCrashSeed(seed);
  assert.ok(points > 100, `crash points tried: ${points}`);
});

// -----------------------------------------------------------------------------------------------
// change-key: one header-sector write, then fdatasync. At every crash point (the sector write
// kept, lost — or, for a multi-sector write, torn: there is none) the image opens with exactly one
// of the two keys and reads the same data; once change-key returned, only with the new one.

const OLD_KEY = Buffer.from('old key before the power cut');
const NEW_KEY = Buffer.from('new key after the power cut');

async function opens(io: MemIo, p: string, key: Uint8Array): Promise<Uint8Array | null> {
  let img: FvdImage;
  try {
    img = await FvdImage.open(io, p, { key, readOnly: true });
  } catch (err) {
    if (err instanceof KeyError) return null;
    throw err;
  }
  const all = new Uint8Array(img.size);
  await img.read(all, 0);
  await img.close();
  return all;
}

test('power cut during change-key: the image opens with exactly one of the old and new keys, data intact', async () => {
  let points = 0;
  for (const [seed, dirty] of [[1, false], [2, true], [3, false]] as const) {
    const mem = new MemIo({ rng: new Rng(seed) });
    const p = '/ck/disk.fvd';
    await FvdImage.create(mem, p, { size: MiB, layout: seed === 3 ? 'compact' : 'raw', journalSize: 16 * KiB, encrypt: { key: OLD_KEY, kdf: FAST_KDF } });
    const data = new Rng(seed + 7).bytes(MiB);
    const img = await FvdImage.open(mem, p, { key: OLD_KEY });
    await img.write(data, 0);
    await img.flush();
    // `dirty`: the image was not closed cleanly (DIRTY set, journal to replay): change-key leaves
    // that as it is, and the next open replays under the new key.
    if (dirty) await img.abandon();
    else await img.close();
    const cio = new CrashIo(mem);
    cio.startRecording();
    const first = cio.seq;
    await changeKey(cio, p, OLD_KEY, NEW_KEY);
    const done = cio.seq;
    for (let k = first; k <= done; k++) {
      for (const t of [0, 1, 2]) {
        const io = cio.rebuild(k, new Rng(seed * 100 + k * 3 + t)).io;
        const withOld = await opens(io, p, OLD_KEY);
        const withNew = await opens(io, p, NEW_KEY);
        assert.ok((withOld === null) !== (withNew === null), `seed ${seed} k=${k}: exactly one key opens it (old ${!!withOld}, new ${!!withNew})`);
        const got = (withOld ?? withNew)!;
        assert.ok(Buffer.from(got).equals(Buffer.from(data)), `seed ${seed} k=${k}: the data reads the same`);
        if (k >= done) assert.ok(withNew, `seed ${seed} k=${k}: change-key returned, so the new key must open it`);
        points++;
      }
    }
  }
  assert.ok(points >= 18, `crash states tried: ${points}`);
});

test.run();
