/**
 * Copy-on-write with the base block read by the queue thread (daemon/fvd-queue.ts preReadBlock,
 * FvdImage.write's `baseBlock`): a write to part of a block still only in a local raw base reaches
 * the engine with the block's base bytes already read, and the engine uses them only if the block
 * is still absent under its lock.
 *
 * The first tests hand the engine a *marker* instead of the base's bytes, so that what lands in
 * the image shows which path was taken. The differential test simulates queue threads exactly as
 * fvd-queue.ts does (the shared view decides, the base file is read at the block's offset, zeros
 * past the base's end) with writes, reads and hinted copy-on-read copies in flight at once, and
 * compares every answer and the reopened image with a model.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';

const KiB = 1024;
const bs = 16 * KiB;

function baseBytes(size: number): Uint8Array {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i++) b[i] = (i * 37 + (i >> 11)) & 0xff || 1;
  return b;
}

async function makeImage(layout: 'raw' | 'compact', baseSize: number, size: number): Promise<{ dir: string; file: string; base: Uint8Array }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-cowpre-'));
  const base = baseBytes(baseSize);
  fs.writeFileSync(path.join(dir, 'b.raw'), base);
  const file = path.join(dir, 'i.fvd');
  await FvdImage.create(nodeIo, file, { base: 'b.raw', baseFormat: 'raw', blockSize: bs, size, layout });
  return { dir, file, base };
}

async function readAll(file: string, size: number): Promise<Uint8Array> {
  const img = await FvdImage.open(nodeIo, file, { readOnly: true, copyOnRead: false });
  const all = new Uint8Array(size);
  await img.read(all, 0);
  await img.close();
  return all;
}

const isSet = (present: Uint8Array, b: number): boolean => (present[b >>> 3]! & (1 << (b & 7))) !== 0;

for (const layout of ['raw', 'compact'] as const) {
  test(`${layout}: an absent block takes the caller's base bytes; a local one ignores them; reopened`, async () => {
    const { dir, file, base } = await makeImage(layout, 8 * bs, 8 * bs);
    const img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
    const marker = new Uint8Array(bs).fill(0x5a);
    const guest = new Uint8Array(4 * KiB).fill(0xc3);
    // Block 2, absent: the block becomes marker | guest | marker.
    await img.write(guest, 2 * bs + 8 * KiB, false, -1, marker.slice());
    assert.ok(isSet(img.sharedView().present, 2), 'the block is local after the write');
    // Block 5 made local first by a plain write; a later pre-read write must not bring the marker in.
    await img.write(new Uint8Array(4 * KiB).fill(0x11), 5 * bs);
    await img.write(guest, 5 * bs + 8 * KiB, false, -1, marker.slice());
    await img.close();
    const all = await readAll(file, 8 * bs);
    const want2 = marker.slice();
    want2.set(guest, 8 * KiB);
    assert.equal(all.subarray(2 * bs, 3 * bs), want2, 'absent block: the caller-read bytes around the guest data');
    const want5 = base.slice(5 * bs, 6 * bs);
    want5.fill(0x11, 0, 4 * KiB);
    want5.set(guest, 8 * KiB);
    assert.equal(all.subarray(5 * bs, 6 * bs), want5, 'local block: only the guest bytes written, no marker');
    assert.equal(all.subarray(0, 2 * bs), base.subarray(0, 2 * bs), 'other blocks untouched');
    fs.rmSync(dir, { recursive: true });
  });
}

test('race: two writes into one absent block, each with its own pre-read copy, both survive', async () => {
  const { dir, file, base } = await makeImage('raw', 8 * bs, 8 * bs);
  const img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  const a = new Uint8Array(4 * KiB).fill(0xa1);
  const b = new Uint8Array(4 * KiB).fill(0xb2);
  // Both queue threads saw the block absent and read it; the engine serves them one at a time
  // under the block lock: the second finds the block local and writes only its own bytes.
  await Promise.all([
    img.write(a, 3 * bs, false, -1, base.slice(3 * bs, 4 * bs)),
    img.write(b, 3 * bs + 12 * KiB, false, -1, base.slice(3 * bs, 4 * bs)),
  ]);
  await img.close();
  const want = base.slice(3 * bs, 4 * bs);
  want.set(a, 0);
  want.set(b, 12 * KiB);
  assert.equal((await readAll(file, 8 * bs)).subarray(3 * bs, 4 * bs), want);
  fs.rmSync(dir, { recursive: true });
});

/** A deterministic pseudo-random sequence. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => ((x ^= x << 13), (x ^= x >>> 17), (x ^= x << 5), (x >>> 0) / 2 ** 32);
}

for (const layout of ['raw', 'compact'] as const) {
  test(`differential (${layout}): pre-read copy-on-write racing writes, reads and copy-on-read agrees with the model`, async () => {
    // A base ending inside a block and shorter than the disk: its last block is base, then zeros.
    const baseSize = 80 * bs + 3 * KiB;
    const size = 96 * bs;
    const { dir, file, base } = await makeImage(layout, baseSize, size);
    const img = await FvdImage.open(nodeIo, file, { copyOnRead: true });
    const baseFd = fs.openSync(path.join(dir, 'b.raw'), 'r');
    const view = img.sharedView();
    const model = new Uint8Array(size);
    model.set(base);
    const r = rng(layout === 'raw' ? 3 : 5);
    let preRead = 0;
    // A queue thread's pre-read (fvd-queue.ts preReadBlock): one block, absent in the view, partial.
    const workerWrite = (data: Uint8Array, offset: number): Promise<void> => {
      const blk = Math.floor(offset / bs);
      let block: Uint8Array | null = null;
      if (blk === Math.floor((offset + data.length - 1) / bs) && blk < view.baseBlocks && !isSet(view.present, blk) && data.length < bs) {
        block = new Uint8Array(bs);
        const inBase = Math.min(bs, view.baseLimit - blk * bs);
        assert.is(fs.readSync(baseFd, block, 0, inBase, blk * bs), inBase);
        preRead++;
      }
      return img.write(data, offset, false, -1, block);
    };
    for (let round = 0; round < 60; round++) {
      // A batch in flight at once, as the queues hand it over: writes to distinct sectors (their
      // order between each other is the guest's to decide, so the model needs no overlap), reads
      // of sectors no write of the batch touches.
      const busy = new Set<number>();
      const ops: Promise<void>[] = [];
      const checks: [Uint8Array, number][] = [];
      for (let i = 0; i < 12; i++) {
        const sectors = 1 + Math.floor(r() * 12);
        const offset = Math.floor(r() * (size / 512 - sectors)) * 512;
        let clash = false;
        for (let s = 0; s < sectors; s++) if (busy.has(offset / 512 + s)) clash = true;
        if (clash) continue;
        for (let s = 0; s < sectors; s++) busy.add(offset / 512 + s);
        if (r() < 0.6) {
          const data = new Uint8Array(sectors * 512).fill(1 + ((round * 12 + i) % 254));
          model.set(data, offset);
          ops.push(workerWrite(data, offset));
        } else {
          const buf = new Uint8Array(sectors * 512);
          checks.push([buf, offset]);
          ops.push(img.read(buf, offset)); // copy-on-read copies blocks in the background
        }
      }
      const expected = checks.map(([buf, offset]) => model.slice(offset, offset + buf.length));
      await Promise.all(ops);
      checks.forEach(([buf, offset], k) => assert.equal(buf, expected[k], `round ${round}: read ${offset}+${buf.length}`));
    }
    await img.idle();
    await img.close();
    fs.closeSync(baseFd);
    assert.ok(preRead > 20, `writes took the pre-read path (${preRead})`);
    assert.equal(await readAll(file, size), model, 'the reopened image equals the model');
    fs.rmSync(dir, { recursive: true });
  });
}

test.run();
