/**
 * The engine's side of the queues (daemon/engine-requests.ts) finds each request's bytes in its
 * tag's slice of the queue's request buffers, slices of the maxIo the workers were spawned with.
 * A recovering server lowers maxIo to the waiting device's before it spawns them (server.ts
 * recover), so the slice width must come from prepareQueues, not from the command line: written
 * data of every tag lands at its own offset, reads land in their own tag's slice, and the image
 * reads the same after a reopen.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { EngineRequests, type EngineQueue } from '../../daemon/engine-requests.js';
import { CompletionRing } from '../../daemon/shared-state.js';
import { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE } from '../../daemon/ublk/abi.js';

const KiB = 1024;
const DEPTH = 8;

function pattern(tag: number, len: number): Uint8Array {
  const b = new Uint8Array(len);
  for (let i = 0; i < len; i++) b[i] = (tag * 37 + i * 13 + (i >> 9)) & 0xff;
  return b;
}

/** Byte equality without uvu's diff (quadratic on 64 KiB arrays). */
function same(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(b);
}

for (const maxIo of [64 * KiB, 128 * KiB]) {
  test(`engine requests: each tag's bytes at tag × maxIo of the buffers (maxIo ${maxIo / KiB} KiB, as prepareQueues says)`, async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-engreq-'));
    const file = path.join(dir, 'i.fvd');
    const len = 64 * KiB;
    await FvdImage.create(nodeIo, file, { size: 4 << 20, blockSize: 64 * KiB });
    const img = await FvdImage.open(nodeIo, file, {});
    const eventfd = fs.openSync('/dev/null', 'w');
    try {
      const engine = new EngineRequests(img, () => {});
      assert.is(engine.prepareQueues(img.sharedView(), 1, maxIo, false), null, 'no base: no copy-on-read hints');
      const q: EngineQueue = {
        buffer: Buffer.alloc(DEPTH * maxIo),
        completions: new CompletionRing(CompletionRing.create(DEPTH)),
        eventfd, fast: 0, hinted: 0, carried: 0, noSlot: 0, slow: 0, cow: 0, corBusy: 0,
      };
      const results = new Map<number, number>();
      const drain = () => q.completions.drain((tag, r) => void results.set(tag, r));
      for (let tag = 0; tag < DEPTH; tag++) q.buffer!.set(pattern(tag, len), tag * maxIo);
      await Promise.all(Array.from({ length: DEPTH }, (_, tag) =>
        engine.serveSlow(q, { type: 'slow', qid: 0, tag, op: UBLK_IO_OP_WRITE, flags: 0, offset: tag * len, length: len, baseBlock: false })));
      drain();
      for (let tag = 0; tag < DEPTH; tag++) assert.is(results.get(tag), len, `write of tag ${tag} completed`);
      // Reads of the other tags' data, each into its own slice.
      q.buffer!.fill(0);
      await Promise.all(Array.from({ length: DEPTH }, (_, tag) =>
        engine.serveSlow(q, { type: 'slow', qid: 0, tag, op: UBLK_IO_OP_READ, flags: 0, offset: (DEPTH - 1 - tag) * len, length: len, baseBlock: false })));
      drain();
      for (let tag = 0; tag < DEPTH; tag++) {
        assert.ok(same(q.buffer!.subarray(tag * maxIo, tag * maxIo + len), pattern(DEPTH - 1 - tag, len)), `tag ${tag} read its offset into its slice`);
      }
      await img.close();
      const again = await FvdImage.open(nodeIo, file, { readOnly: true });
      const got = new Uint8Array(len);
      for (let tag = 0; tag < DEPTH; tag++) {
        await again.read(got, tag * len);
        assert.ok(same(got, pattern(tag, len)), `after a reopen: tag ${tag}'s data at ${tag * len}`);
      }
      await again.close();
    } finally {
      fs.closeSync(eventfd);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
}

test('serveCow: the block a queue thread stored becomes local (journaled after a flush), its claim goes, the write completes; reopened', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-engreq-'));
  const bs = 16 * KiB;
  fs.writeFileSync(path.join(dir, 'b.raw'), new Uint8Array(8 * bs).fill(0x42));
  const file = path.join(dir, 'i.fvd');
  await FvdImage.create(nodeIo, file, { size: 8 * bs, blockSize: bs, base: 'b.raw', baseFormat: 'raw', detectZeroes: false });
  const img = await FvdImage.open(nodeIo, file, {});
  const eventfd = fs.openSync('/dev/null', 'w');
  const prev = process.env.FVD_QUEUE_COW;
  try {
    const engine = new EngineRequests(img, () => {});
    process.env.FVD_QUEUE_COW = '0';
    assert.is(engine.shareClaims(), null, 'FVD_QUEUE_COW=0: the queue threads get no claims');
    delete process.env.FVD_QUEUE_COW;
    const shared = engine.shareClaims();
    assert.ok(shared, 'a raw-like image over a local raw base: claims for the queue threads');
    const words = new Int32Array(shared!);
    const q: EngineQueue = {
      buffer: Buffer.alloc(DEPTH * 64 * KiB),
      completions: new CompletionRing(CompletionRing.create(DEPTH)),
      eventfd, fast: 0, hinted: 0, carried: 0, noSlot: 0, slow: 0, cow: 0, corBusy: 0,
    };
    // The queue thread's part (daemon/queue-cow.ts): claim block 3, store it whole, hand it over.
    Atomics.or(words, 0, 1 << 3);
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, new Uint8Array(bs).fill(0x77), 0, bs, img.sharedView().dataOffset + 3 * bs);
    fs.closeSync(fd);
    engine.serveCow(q, { type: 'cow', qid: 0, tag: 5, block: 3, lastBlock: 3, length: 4 * KiB });
    const results = new Map<number, number>();
    q.completions.drain((tag, r) => void results.set(tag, r));
    assert.is(results.get(5), 4 * KiB, 'the write completed with its length');
    assert.is(Atomics.load(words, 0) & (1 << 3), 0, 'the claim is released');
    assert.ok((img.sharedView().present[0]! & (1 << 3)) !== 0, 'the block is local');
    await img.flush();
    assert.ok((img.sharedView().journaled[0]! & (1 << 3)) !== 0, 'and its bit journaled');
    engine.unshareClaims();
    await img.close();
    // A closed image: the request fails, the claim is released all the same.
    Atomics.or(words, 0, 1 << 4);
    engine.serveCow(q, { type: 'cow', qid: 0, tag: 6, block: 4, lastBlock: 4, length: 4 * KiB });
    // (unshared: this engine holds no claims any more; the queue's bit is the queue's to drop)
    q.completions.drain((tag, r) => void results.set(tag, r));
    assert.ok(results.get(6)! < 0, 'a write into a closed image fails');
    const again = await FvdImage.open(nodeIo, file, { readOnly: true, copyOnRead: false });
    const got = new Uint8Array(2 * bs);
    await again.read(got, 3 * bs);
    await again.close();
    assert.ok(same(got.subarray(0, bs), new Uint8Array(bs).fill(0x77)), 'after a reopen: block 3 from the image');
    assert.ok(same(got.subarray(bs), new Uint8Array(bs).fill(0x42)), 'block 4 from the base');
  } finally {
    if (prev === undefined) delete process.env.FVD_QUEUE_COW;
    else process.env.FVD_QUEUE_COW = prev;
    fs.closeSync(eventfd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
