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
import { ANSWERED_WAKE_AT, CompletionRing, STORED_RING_ENTRIES, StoredRing } from '../../daemon/shared-state.js';
import { readPendingLog } from '../../fvd/pending-log.js';
import { execFileSync } from 'node:child_process';
import { UBLK_IO_F_FUA, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE } from '../../daemon/ublk/abi.js';

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

/** A fresh image of `blocks` blocks of `bs` over a raw base of 0x42 bytes, in a new directory. */
async function imageOverBase(blocks: number, bs: number): Promise<{ dir: string; file: string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-engreq-'));
  fs.writeFileSync(path.join(dir, 'b.raw'), new Uint8Array(blocks * bs).fill(0x42));
  const file = path.join(dir, 'i.fvd');
  await FvdImage.create(nodeIo, file, { size: blocks * bs, blockSize: bs, base: 'b.raw', baseFormat: 'raw', detectZeroes: false });
  return { dir, file };
}

/** The engine's view of queue `qid`: buffers for DEPTH tags of 64 KiB, its rings, its eventfd. */
function engineQueue(qid: number, stored: SharedArrayBuffer | null, eventfd: number, bufferBytes = DEPTH * 64 * KiB): EngineQueue {
  return {
    buffer: Buffer.alloc(bufferBytes),
    completions: new CompletionRing(CompletionRing.create(DEPTH)),
    stored: stored && new StoredRing(stored),
    qid,
    eventfd, fast: 0, hinted: 0, carried: 0, noSlot: 0, slow: 0, cow: 0, overwritten: 0, corBusy: 0,
  };
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
      const q = engineQueue(0, null, eventfd, DEPTH * maxIo);
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

test('serveStored: a batch of blocks the queue thread stored becomes local, its records go to the pending log in one write, claims go, the writes complete with one wake; survives a crash', async () => {
  const bs = 16 * KiB;
  const { dir, file } = await imageOverBase(10, bs);
  const log = { path: path.join(dir, 'pending.log'), bootId: 'boot-a', fileId: 'file-a' };
  let img = await FvdImage.open(nodeIo, file, { copyOnRead: false, pendingLog: log });
  // The eventfd: a pipe, so the test counts the wakes (8 bytes each).
  const [wakeRead, wakeWrite] = pipeFds();
  const prev = process.env.FVD_QUEUE_COW;
  try {
    const engine = new EngineRequests(img, () => {});
    process.env.FVD_QUEUE_COW = '0';
    assert.is(engine.shareClaims(), null, 'FVD_QUEUE_COW=0: the queue threads get no claims');
    delete process.env.FVD_QUEUE_COW;
    const shared = engine.shareClaims();
    assert.ok(shared, 'a raw-like image over a local raw base: claims for the queue threads');
    const words = new Int32Array(shared!);
    const ring = StoredRing.create(DEPTH + 1);
    const q = engineQueue(0, ring, wakeWrite);
    // The queue thread's part (daemon/queue-cow.ts): claim blocks 3, 4-5 (one write) and 8,
    // store them whole, push them; only the first push asks for a wake message.
    const producer = new StoredRing(ring);
    const fd = fs.openSync(file, 'r+');
    const stores: [number, number, number, number][] = [[5, 3, 3, 4 * KiB], [6, 4, 5, 2 * bs], [7, 8, 8, bs]];
    for (const [tag, first, last] of stores) {
      for (let b = first; b <= last; b++) Atomics.or(words, 0, 1 << b);
      fs.writeSync(fd, new Uint8Array((last - first + 1) * bs).fill(0x70 + tag), 0, (last - first + 1) * bs, img.sharedView().dataOffset + first * bs);
    }
    fs.closeSync(fd);
    const posts = stores.map(([tag, first, last, length]) => producer.push(tag, first, last, length));
    assert.equal(posts, [true, false, false], 'one wake message for the batch');
    const recordsBefore = readPendingLog(log).records.length;
    engine.serveStored(q);
    const results = new Map<number, number>();
    q.completions.drain((tag, r) => void results.set(tag, r));
    assert.equal([results.get(5), results.get(6), results.get(7)], [4 * KiB, 2 * bs, bs], 'every write completed with its length');
    assert.is(fs.readSync(wakeRead, Buffer.alloc(64)), 8, 'one wake of the queue for the batch');
    assert.is(Atomics.load(words, 0) & ((1 << 3) | (1 << 4) | (1 << 5) | (1 << 8)), 0, 'the claims are released');
    const view = img.sharedView();
    for (const b of [3, 4, 5, 8]) {
      assert.ok((view.present[b >>> 3]! & (1 << (b & 7))) !== 0, `block ${b} is local`);
      assert.ok((view.journaled[b >>> 3]! & (1 << (b & 7))) !== 0, `block ${b}: its record is logged, its journaled bit set`);
    }
    assert.is(readPendingLog(log).records.length - recordsBefore, 3, 'a record per write, all in the log');
    assert.ok(producer.push(1, 9, 9, bs), 'drained: the next push asks for a wake again');
    // While held, a block's journaled bit waits for the log write (a queue thread must not write
    // it on its fast path and answer before its record is in the log).
    img.holdPendingLog();
    img.adoptStoredBlocks(0, 0);
    assert.ok((view.present[0]! & 1) !== 0, 'held: present at once');
    assert.is(view.journaled[0]! & 1, 0, 'held: not journaled yet');
    assert.is(readPendingLog(log).records.length - recordsBefore, 3, 'held: nothing written yet');
    img.releasePendingLog();
    assert.is(view.journaled[0]! & 1, 1, 'released: journaled');
    assert.is(readPendingLog(log).records.length - recordsBefore, 4, 'released: the record is in the log');
    engine.unshareClaims();
    // A process crash (SIGKILL) without a flush: the pending log brings the blocks back.
    await img.abandon();
    img = await FvdImage.open(nodeIo, file, { copyOnRead: false, pendingLog: log });
    assert.ok(img.pendingApplied > 0, 'the log was applied');
    const got = new Uint8Array(10 * bs);
    await img.read(got, 0);
    const want = new Uint8Array(10 * bs).fill(0x42);
    want.fill(0x75, 3 * bs, 4 * bs);
    want.fill(0x76, 4 * bs, 6 * bs);
    want.fill(0x77, 8 * bs, 9 * bs);
    want.fill(0, 0, bs); // block 0 was adopted without data written: the image's zeros
    assert.ok(same(got, want), 'after the crash: the stored blocks from the image, the rest from the base');
    // A closed image: the request fails, the claim is released all the same.
    const engine2 = new EngineRequests(img, () => {});
    const words2 = new Int32Array(engine2.shareClaims()!);
    await img.close();
    q.stored!.drain(() => {}); // the push of tag 1 above only showed the flag: dropped
    Atomics.or(words2, 0, 1 << 6);
    producer.push(2, 6, 6, 4 * KiB);
    engine2.serveStored(q);
    q.completions.drain((tag, r) => void results.set(tag, r));
    assert.ok(results.get(2)! < 0, 'a write into a closed image fails');
    assert.is(Atomics.load(words2, 0) & (1 << 6), 0, 'its claim released');
    engine2.unshareClaims();
  } finally {
    if (prev === undefined) delete process.env.FVD_QUEUE_COW;
    else process.env.FVD_QUEUE_COW = prev;
    fs.closeSync(wakeRead);
    fs.closeSync(wakeWrite);
    if (!img.isClosed) await img.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('answered stored writes: the queue thread answered them, the main thread only queues their records; a FLUSH or a FUA write on another queue drains every ring first; a crash after it keeps them', async () => {
  const bs = 16 * KiB;
  const { dir, file } = await imageOverBase(12, bs);
  let img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  const [wakeRead, wakeWrite] = pipeFds();
  const prev = process.env.FVD_STORED_ANSWER;
  try {
    const engine = new EngineRequests(img, () => {});
    assert.equal(engine.answerStored(2), { answers: false, logs: null }, 'no claims yet: nothing to answer');
    const words = new Int32Array(engine.shareClaims()!);
    process.env.FVD_STORED_ANSWER = 'main';
    assert.equal(engine.answerStored(2), { answers: false, logs: null }, 'FVD_STORED_ANSWER=main: the main thread answers');
    delete process.env.FVD_STORED_ANSWER;
    assert.equal(engine.answerStored(2), { answers: true, logs: null }, 'claims and no pending log: the queue threads answer, no queue logs');
    const rings = [StoredRing.create(STORED_RING_ENTRIES), StoredRing.create(STORED_RING_ENTRIES)];
    const q0 = engineQueue(0, rings[0]!, wakeWrite);
    const q1 = engineQueue(1, rings[1]!, wakeWrite);
    engine.watchStored(q0);
    engine.watchStored(q1);
    const view = img.sharedView();
    const fd = fs.openSync(file, 'r+');
    const producer = new StoredRing(rings[0]!);
    /** Queue 0's part: claim, store, publish (daemon/queue-cow.ts), push answered; no main thread. */
    const answer = (b: number, fill: number): void => {
      Atomics.or(words, 0, 1 << b);
      fs.writeSync(fd, new Uint8Array(bs).fill(fill), 0, bs, view.dataOffset + b * bs);
      Atomics.or(view.present, b >>> 3, 1 << (b & 7));
      Atomics.or(view.journaled, b >>> 3, 1 << (b & 7));
      Atomics.and(words, 0, ~(1 << b));
      assert.not.ok(producer.pushAnswered(b, b, bs), 'a few answered entries wake nobody');
    };
    answer(2, 0x72);
    answer(3, 0x73);
    // A FLUSH arrives on queue 1: queue 0's entries are drained into its commit.
    await engine.serveSlow(q1, { type: 'slow', qid: 1, tag: 0, op: UBLK_IO_OP_FLUSH, flags: 0, offset: 0, length: 0, baseBlock: false });
    const results = new Map<number, number>();
    q0.completions.drain((tag, r) => void results.set(tag, r));
    assert.is(results.size, 0, 'answered entries complete nothing on the main thread');
    assert.is(q0.stored!.drain(() => {}), 0, 'the FLUSH drained queue 0');
    // Then one answered write and a FUA write (to another block) on queue 1.
    answer(5, 0x75);
    q1.buffer!.fill(0x66, 0, bs);
    await engine.serveSlow(q1, { type: 'slow', qid: 1, tag: 1, op: UBLK_IO_OP_WRITE, flags: UBLK_IO_F_FUA >>> 8, offset: 9 * bs, length: bs, baseBlock: false });
    // And one answered write that no FLUSH followed: a crash may lose it (a volatile write cache).
    answer(7, 0x77);
    fs.closeSync(fd);
    await img.abandon(); // the daemon dies: no close, no checkpoint
    img = await FvdImage.open(nodeIo, file, { copyOnRead: false, readOnly: true });
    const got = new Uint8Array(12 * bs);
    await img.read(got, 0);
    const want = new Uint8Array(12 * bs).fill(0x42);
    want.fill(0x72, 2 * bs, 3 * bs);
    want.fill(0x73, 3 * bs, 4 * bs);
    want.fill(0x75, 5 * bs, 6 * bs);
    want.fill(0x66, 9 * bs, 10 * bs);
    assert.ok(same(got, want), 'after the crash: the writes a FLUSH or a FUA write followed are there, the unflushed one reads from the base');
  } finally {
    if (prev === undefined) delete process.env.FVD_STORED_ANSWER;
    else process.env.FVD_STORED_ANSWER = prev;
    fs.closeSync(wakeRead);
    fs.closeSync(wakeWrite);
    if (!img.isClosed) await img.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('answered stored writes with a pending log: queue logs for the queues; a drain puts the records in the image\'s log and tells the queue how many', async () => {
  const bs = 16 * KiB;
  const { dir, file } = await imageOverBase(8, bs);
  const log = { path: path.join(dir, 'pending.log'), bootId: 'boot-a', fileId: 'file-a' };
  const img = await FvdImage.open(nodeIo, file, { copyOnRead: false, pendingLog: log });
  try {
    const engine = new EngineRequests(img, () => {});
    engine.shareClaims();
    const { answers, logs } = engine.answerStored(2);
    assert.ok(answers, 'a pending log: the queues answer all the same, through their own logs');
    assert.is(logs!.fds.length, 2, 'one queue log per queue');
    assert.ok(fs.existsSync(path.join(dir, 'pending.q1.log')));
    const drained = new Int32Array(logs!.drained);
    const ring = StoredRing.create(STORED_RING_ENTRIES);
    const q = engineQueue(1, ring, -1);
    const producer = new StoredRing(ring);
    producer.pushAnswered(2, 3, 2 * bs);
    producer.pushAnswered(6, 6, bs);
    const before = readPendingLog(log).records.length;
    engine.serveStored(q);
    assert.equal(readPendingLog(log).records.slice(before).map((r) => [r.a, r.b]), [[2, 2], [6, 1]], 'the records are in the image\'s log');
    assert.equal([drained[0], drained[1]], [0, 2], 'queue 1 is told two of its records are there');
    engine.unshareClaims();
  } finally {
    await img.close();
    assert.not.ok(fs.existsSync(path.join(dir, 'pending.q1.log')), 'a clean close removes the queue logs');
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('StoredRing: answered entries wake the main thread only in numbers, an entry that waits at once; a drain lowers the flag', () => {
  const sab = StoredRing.create(STORED_RING_ENTRIES);
  const producer = new StoredRing(sab);
  const consumer = new StoredRing(sab);
  const wakes = (): number[] => {
    const at: number[] = [];
    for (let i = 1; i <= ANSWERED_WAKE_AT + 10; i++) if (producer.pushAnswered(i, i, 512)) at.push(i);
    return at;
  };
  assert.equal(wakes(), [ANSWERED_WAKE_AT], 'one wake, when ANSWERED_WAKE_AT entries wait');
  const seen: number[] = [];
  assert.is(consumer.drain((tag, first) => void seen.push(first)), ANSWERED_WAKE_AT + 10);
  assert.is(seen[ANSWERED_WAKE_AT + 9], ANSWERED_WAKE_AT + 10, 'in order, none lost');
  assert.equal(wakes(), [ANSWERED_WAKE_AT], 'after a drain: again one wake at the threshold');
  consumer.drain(() => {});
  assert.not.ok(producer.pushAnswered(1, 1, 512));
  assert.ok(producer.push(3, 1, 1, 512), 'an entry whose tag waits for its answer wakes at once, answered ones before it or not');
  assert.not.ok(producer.push(4, 2, 2, 512), 'once: the wake is in flight');
  const tags: number[] = [];
  consumer.drain((tag) => void tags.push(tag));
  assert.is(tags.length, 3, 'the drain takes the answered entry with the waiting ones');
  assert.ok(producer.push(5, 3, 3, 512), 'the drain lowered the flag');
});

/** A pipe's (read, write) descriptors, the read end non-blocking. */
function pipeFds(): [number, number] {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-fifo-'));
  const fifo = path.join(dir, 'wake');
  execFileSync('mkfifo', [fifo]);
  const r = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const w = fs.openSync(fifo, 'w');
  fs.rmSync(dir, { recursive: true });
  return [r, w];
}

test.run();
