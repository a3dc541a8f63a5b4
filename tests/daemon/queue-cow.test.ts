/**
 * Copy-on-write on the queue thread (daemon/queue-cow.ts) and the shared block claims that keep it
 * apart from the engine's copies and writes (fvd/block-claims.ts, fvd/block-locks.ts).
 *
 * The unit tests drive QueueCow in this thread with real synchronous transfers and reopen the
 * image after each write. The differential test runs QueueCow in a real worker thread (as a queue
 * thread does) while this thread's engine writes, reads with copy-on-read, copies hinted blocks
 * and prefetches the same blocks, and compares every read and the reopened image with a model.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { FvdImage } from '../../fvd/image.js';
import { BlockClaims } from '../../fvd/block-claims.js';
import { BlockLocks } from '../../fvd/block-locks.js';
import { nodeIo } from '../../storage/node-file.js';
import { allocPinned } from '../../ffi/uring.js';
import { syscalls } from '../../ffi/syscalls.js';
import { DirectIo, chooseDirectMode } from '../../daemon/direct-io.js';
import { COW_DECLINED, QueueCow } from '../../daemon/queue-cow.js';
import type { CowBatch, CowWorkerData } from '../helpers/queue-cow-worker.js';

const KiB = 1024;
const bs = 16 * KiB;
const maxIo = 64 * KiB;
const DEPTH = 16;
const sys = syscalls();
/** Synchronous transfers need tmpfs (memory mode) or RWF_NOWAIT; /dev/shm is tmpfs here. */
const shm = fs.existsSync('/dev/shm') ? '/dev/shm' : null;

function baseBytes(size: number): Uint8Array {
  const b = new Uint8Array(size);
  for (let i = 0; i < size; i++) b[i] = (i * 37 + (i >> 11)) & 0xff || 1;
  return b;
}

async function makeImage(baseSize: number, size: number, layout: 'raw' | 'compact' = 'raw'): Promise<{ dir: string; file: string; basePath: string; base: Uint8Array }> {
  const dir = fs.mkdtempSync(path.join(shm!, 'fvd-qcow-'));
  const base = baseBytes(baseSize);
  const basePath = path.join(dir, 'b.raw');
  fs.writeFileSync(basePath, base);
  const file = path.join(dir, 'i.fvd');
  await FvdImage.create(nodeIo, file, { base: 'b.raw', baseFormat: 'raw', blockSize: bs, size, layout, detectZeroes: false });
  return { dir, file, basePath, base };
}

async function readAll(file: string, size: number): Promise<Uint8Array> {
  const img = await FvdImage.open(nodeIo, file, { readOnly: true, copyOnRead: false });
  const all = new Uint8Array(size);
  await img.read(all, 0);
  await img.close();
  return all;
}

const isSet = (present: Uint8Array, b: number): boolean => (present[b >>> 3]! & (1 << (b & 7))) !== 0;

/** A queue thread's copy-on-write in this thread, with its own pinned request buffers. */
function queueCow(img: FvdImage, claims: BlockClaims, file: string, basePath: string, partial = true) {
  const imageFd = fs.openSync(file, 'r+');
  const baseFd = fs.openSync(basePath, 'r');
  const mem = allocPinned(DEPTH * maxIo);
  const image = new DirectIo(sys!, imageFd, chooseDirectMode(sys!, imageFd, file));
  const base = new DirectIo(sys!, baseFd, chooseDirectMode(sys!, baseFd, basePath));
  const cow = new QueueCow(img.sharedView(), claims.shared, base, image, mem.bytes, mem.address, maxIo, partial);
  /** Stores a write of `data` at `offset` in tag 0; the claim stays held when a block is returned. */
  const store = (data: Uint8Array, offset: number, tag = 0): number => {
    mem.bytes.set(data, tag * maxIo);
    return cow.store(tag, offset, data.length);
  };
  const close = (): void => {
    image.free();
    base.free();
    mem.free();
    fs.closeSync(imageFd);
    fs.closeSync(baseFd);
  };
  return { cow, store, close };
}

const canRun = sys !== null && shm !== null;

test('claims: one holder at a time; engine locks wait for a queue claim and try-locks take nothing', async () => {
  const claims = BlockClaims.create(100);
  assert.ok(claims.tryClaim(37));
  assert.not.ok(claims.tryClaim(37), 'held');
  assert.ok(claims.tryClaim(36) && claims.tryClaim(38), 'neighbours in the same word are independent');
  claims.release(36);
  claims.release(38);
  const locks = new BlockLocks();
  locks.shareWith(claims);
  // A copy (tryAcquire) over a range with a queue's claim in it takes nothing, not even the free blocks.
  assert.not.ok(locks.tryAcquire(35, 39), 'a try-lock over a claimed block fails');
  assert.not.ok(claims.isClaimed(35) || claims.isClaimed(36) || claims.isClaimed(39), 'and leaves no claim behind');
  // A guest write's lock waits until the queue's claim goes.
  let locked = false;
  const acquiring = locks.acquire(36, 38).then(() => (locked = true));
  await new Promise((r) => setTimeout(r, 30));
  assert.not.ok(locked, 'still waiting for block 37');
  claims.release(37);
  await acquiring;
  assert.ok(claims.isClaimed(36) && claims.isClaimed(37) && claims.isClaimed(38), 'the lock holds the claims');
  assert.not.ok(claims.tryClaim(37), 'a queue thread cannot claim a locked block');
  locks.release(36, 38);
  assert.not.ok(claims.isClaimed(36) || claims.isClaimed(37) || claims.isClaimed(38), 'released with the lock');
  // A lock taken before the claims were attached holds none and releases none.
  const late = new BlockLocks();
  assert.ok(late.tryAcquire(5, 5));
  late.shareWith(claims);
  assert.ok(claims.tryClaim(5), 'the queue claims 5 (the old lock holds no claim)');
  late.release(5, 5);
  assert.ok(claims.isClaimed(5), "releasing the old lock does not drop the queue's claim");
});

test('queue copy-on-write: partial and whole blocks, the last base block past the base end; reopened', async () => {
  if (!canRun) return console.log('  skip: needs koffi and /dev/shm');
  const baseSize = 6 * bs + 5 * KiB; // block 6 ends 11 KiB past the base's end
  const size = 10 * bs;
  const { dir, file, basePath, base } = await makeImage(baseSize, size);
  const img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  const claims = img.shareBlockClaims();
  assert.ok(claims, 'a raw-like image over a local raw base shares claims');
  const q = queueCow(img, claims!, file, basePath);
  const model = new Uint8Array(size);
  model.set(base);
  const put = (fill: number, offset: number, length: number): number => {
    const data = new Uint8Array(length).fill(fill);
    model.set(data, offset);
    return q.store(data, offset, 0);
  };
  try {
    // Partial: base | guest | base.
    assert.is(put(0xa1, 2 * bs + 4 * KiB, 4 * KiB), 2);
    assert.ok(claims!.isClaimed(2), 'the claim is held until the engine adopts the block');
    assert.not.ok(isSet(img.sharedView().present, 2), 'not local before the engine says so');
    img.adoptStoredBlocks(2, 2);
    claims!.release(2);
    // Whole block.
    assert.is(put(0xb2, 4 * bs, bs), 4);
    img.adoptStoredBlocks(4, 4);
    claims!.release(4);
    // The base's last block: base bytes, then zeros up to the block's end, the guest's in the middle.
    assert.is(put(0xc3, 6 * bs + 8 * KiB, 2 * KiB), 6);
    img.adoptStoredBlocks(6, 6);
    claims!.release(6);
    // A block local already: the guest's bytes in place (the view had not shown it when routed).
    assert.is(put(0xd4, 2 * bs, 4 * KiB), 2, 'local now: written in place');
    img.adoptStoredBlocks(2, 2);
    claims!.release(2);
    // Declined: a block past the base, a write spanning two blocks, a claimed block.
    assert.is(q.store(new Uint8Array(4 * KiB), 8 * bs), COW_DECLINED, 'past the base: no bit to set');
    assert.is(q.store(new Uint8Array(8 * KiB), bs - 4 * KiB), COW_DECLINED, 'two partial blocks');
    // Whole blocks 7 and 8 (8 is past the base: no bit) are declined; 0 and 1 stored as they are.
    assert.is(q.store(new Uint8Array(2 * bs), 7 * bs), COW_DECLINED, 'whole blocks reaching past the base');
    assert.ok(claims!.tryClaim(1));
    assert.is(put(0x99, 0, 2 * bs), COW_DECLINED, 'whole blocks, one claimed by someone else');
    assert.not.ok(claims!.isClaimed(0), 'the other claim given back');
    claims!.release(1);
    assert.is(put(0xe5, 0, 2 * bs), 0, 'whole blocks 0-1 stored');
    assert.is(q.cow.lastBlock, 1);
    assert.ok(claims!.isClaimed(0) && claims!.isClaimed(1), 'both claims held');
    img.adoptStoredBlocks(0, 1);
    claims!.release(0);
    claims!.release(1);
    assert.ok(claims!.tryClaim(1));
    assert.is(q.store(new Uint8Array(4 * KiB), bs), COW_DECLINED, 'claimed by someone else');
    claims!.release(1);
    assert.not.ok(claims!.isClaimed(8) || claims!.isClaimed(0) || claims!.isClaimed(1), 'a declined store holds nothing');
    assert.is(q.cow.stored, 5, 'blocks stored: 2, 4, 6, 0, 1');
    assert.is(q.cow.overwritten, 1, 'one write in place');
    await img.close();
    const all = await readAll(file, size);
    assert.ok(Buffer.from(all).equals(Buffer.from(model)), 'the reopened image equals the model');
    const want6 = new Uint8Array(bs);
    want6.set(base.subarray(6 * bs));
    want6.fill(0xc3, 8 * KiB, 10 * KiB);
    assert.ok(Buffer.from(all.subarray(6 * bs, 7 * bs)).equals(Buffer.from(want6)), 'zeros past the base end, not stale bytes');
  } finally {
    q.close();
    fs.rmSync(dir, { recursive: true });
  }
});

test('queue copy-on-write: a stored block whose bit was never set reads from the base after a crash', async () => {
  if (!canRun) return console.log('  skip: needs koffi and /dev/shm');
  const { dir, file, basePath, base } = await makeImage(4 * bs, 4 * bs);
  const img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  const claims = img.shareBlockClaims()!;
  const q = queueCow(img, claims, file, basePath);
  try {
    assert.is(q.store(new Uint8Array(4 * KiB).fill(0xee), bs), 1);
    // The daemon dies here: the write was never acknowledged, the bit never set.
    await img.abandon();
    const all = await readAll(file, 4 * bs);
    assert.ok(Buffer.from(all).equals(Buffer.from(base)), 'the unacknowledged write is invisible: the block is the base');
  } finally {
    q.close();
    fs.rmSync(dir, { recursive: true });
  }
});

test('whole blocks only (the default mode): a partial block is declined, a whole one stored; reopened', async () => {
  if (!canRun) return console.log('  skip: needs koffi and /dev/shm');
  const { dir, file, basePath, base } = await makeImage(4 * bs, 4 * bs);
  const img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  const claims = img.shareBlockClaims()!;
  const q = queueCow(img, claims, file, basePath, false);
  try {
    assert.is(q.store(new Uint8Array(4 * KiB).fill(0x31), bs + 4 * KiB), COW_DECLINED, 'partial: the engine copies it');
    assert.not.ok(claims.isClaimed(1), 'and no claim is left');
    assert.is(q.store(new Uint8Array(bs).fill(0x32), 2 * bs), 2, 'a whole block is stored');
    img.adoptStoredBlocks(2, 2);
    claims.release(2);
    await img.close();
    const want = base.slice();
    want.fill(0x32, 2 * bs, 3 * bs);
    assert.ok(Buffer.from(await readAll(file, 4 * bs)).equals(Buffer.from(want)), 'reopened: block 2 the guest\'s, the rest the base');
  } finally {
    q.close();
    fs.rmSync(dir, { recursive: true });
  }
});

test('a write into a softly copied block (bit present, not journaled): in place, partial too; flushed, it survives a crash', async () => {
  if (!canRun) return console.log('  skip: needs koffi and /dev/shm');
  const { dir, file, basePath, base } = await makeImage(4 * bs, 4 * bs);
  const img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  const claims = img.shareBlockClaims()!;
  const q = queueCow(img, claims, file, basePath, false); // the default mode: whole blocks only
  const view = img.sharedView();
  try {
    // Blocks 1-2 copied by the prefetcher: present, their bits not journaled (soft).
    await img.prefetchBlocks(1, 2);
    assert.ok(isSet(view.present, 1) && !isSet(view.journaled, 1), 'a soft copy');
    // A partial write to block 1 (declined on an absent block in this mode) and a whole one to 2.
    assert.is(q.store(new Uint8Array(4 * KiB).fill(0x71), bs + 4 * KiB), 1, 'partial, in place');
    q.cow.publish(1, 1);
    img.journalAnsweredBlocks(1, 1);
    assert.is(q.store(new Uint8Array(bs).fill(0x72), 2 * bs), 2, 'whole, in place');
    q.cow.publish(2, 2);
    img.journalAnsweredBlocks(2, 2);
    assert.is(q.cow.overwritten, 2);
    assert.is(q.cow.stored, 0, 'nothing copied from the base');
    assert.ok(isSet(view.journaled, 1) && isSet(view.journaled, 2), 'published: journaled');
    assert.not.ok(claims.isClaimed(1) || claims.isClaimed(2), 'claims released');
    assert.is(q.store(new Uint8Array(4 * KiB), 3 * bs + 4 * KiB), COW_DECLINED, 'partial on an absent block: still the engine');
    assert.not.ok(claims.isClaimed(3), 'and no claim left');
    await img.flush();
    // The daemon dies after the FLUSH: the records are in its commit, so the writes and the soft
    // copy's base bytes around the partial one are there.
    await img.abandon();
    const want = base.slice();
    want.fill(0x71, bs + 4 * KiB, bs + 8 * KiB);
    want.fill(0x72, 2 * bs, 3 * bs);
    assert.ok(Buffer.from(await readAll(file, 4 * bs)).equals(Buffer.from(want)), 'reopened after the crash: both writes');
  } finally {
    q.close();
    fs.rmSync(dir, { recursive: true });
  }
});

test('whole blocks stored while the image becomes fully local: adopted without an error; reopened', async () => {
  if (!canRun) return console.log('  skip: needs koffi and /dev/shm');
  const { dir, file, basePath, base } = await makeImage(4 * bs, 4 * bs);
  const img = await FvdImage.open(nodeIo, file, { copyOnRead: false });
  const claims = img.shareBlockClaims()!;
  const q = queueCow(img, claims, file, basePath);
  try {
    // Every block local by soft copies (prefetch), FULLY_LOCAL not yet recorded: a 2-block write
    // is routed to the engine side (bits not journaled) and stored here as whole blocks.
    await img.prefetchBlocks(0, 3);
    assert.is(q.store(new Uint8Array(2 * bs).fill(0x6b), bs), 1, 'whole blocks 1-2 stored');
    // The prefetcher finishes meanwhile: the image becomes fully local before the adoption.
    claims.release(1);
    claims.release(2);
    assert.ok(await img.markFullyLocal(), 'fully local');
    img.adoptStoredBlocks(1, 2); // must not fail the guest's write
    await img.close();
    const want = base.slice();
    want.fill(0x6b, bs, 3 * bs);
    assert.ok(Buffer.from(await readAll(file, 4 * bs)).equals(Buffer.from(want)), 'reopened: the write is there');
  } finally {
    q.close();
    fs.rmSync(dir, { recursive: true });
  }
});

test('no claims where queue threads may not copy-on-write: compact layout, read-only', async () => {
  if (!canRun) return console.log('  skip: needs koffi and /dev/shm');
  const c = await makeImage(4 * bs, 4 * bs, 'compact');
  const compact = await FvdImage.open(nodeIo, c.file, {});
  assert.is(compact.shareBlockClaims(), null, 'compact');
  await compact.close();
  const ro = await FvdImage.open(nodeIo, c.file, { readOnly: true });
  assert.is(ro.shareBlockClaims(), null, 'read-only');
  await ro.close();
  fs.rmSync(c.dir, { recursive: true });
});

/** A deterministic pseudo-random sequence. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => ((x ^= x << 13), (x ^= x >>> 17), (x ^= x << 5), (x >>> 0) / 2 ** 32);
}

for (const answer of [false, true]) test(`differential${answer ? ' (the queue answers its stored writes, the main thread journals them later)' : ''}: a queue thread copy-on-writes while the engine writes, copies on read, copies hints and prefetches`, async () => {
  if (!canRun) return console.log('  skip: needs koffi and /dev/shm');
  const baseSize = 2000 * bs + 3 * KiB;
  const size = 2016 * bs;
  const { dir, file, basePath, base } = await makeImage(baseSize, size);
  const img = await FvdImage.open(nodeIo, file, { copyOnRead: true });
  const claims = img.shareBlockClaims()!;
  const data: CowWorkerData = { view: img.sharedView(), claims: claims.shared, imagePath: file, basePath, maxIo, depth: DEPTH, answer };
  const worker = new Worker(new URL('../helpers/queue-cow-worker.js', import.meta.url), { workerData: data });
  const model = new Uint8Array(size);
  model.set(base);
  const r = rng(11);
  let stored = 0;
  let declinedToEngine = 0;
  try {
    for (let round = 0; round < 80; round++) {
      const busy = new Set<number>();
      const free = (offset: number, sectors: number): boolean => {
        for (let s = 0; s < sectors; s++) if (busy.has(offset / 512 + s)) return false;
        for (let s = 0; s < sectors; s++) busy.add(offset / 512 + s);
        return true;
      };
      // The queue thread's writes: inside one block each, mostly partial, on distinct sectors.
      const batch: CowBatch = [];
      for (let i = 0; i < 8 && batch.length < DEPTH; i++) {
        const b = Math.floor(r() * 2002);
        const x = r();
        const whole = x < 0.15;
        const sectors = x < 0.08 ? (2 * bs) / 512 : whole ? bs / 512 : 1 + Math.floor(r() * 16);
        const offset = whole ? b * bs : b * bs + Math.floor(r() * (bs / 512 - sectors + 1)) * 512;
        if (offset + sectors * 512 > size || !free(offset, sectors)) continue;
        const fill = 1 + ((round * 16 + i) % 254);
        batch.push([offset, sectors * 512, fill]);
        model.fill(fill, offset, offset + sectors * 512);
      }
      // The engine's work at the same time: guest writes and reads elsewhere, copy-on-read of
      // what they read, hinted copies and a prefetch pass over the very blocks the queue writes.
      const ops: Promise<unknown>[] = [];
      const checks: [Uint8Array, number, Uint8Array][] = [];
      for (let i = 0; i < 8; i++) {
        const sectors = 1 + Math.floor(r() * 40);
        const offset = Math.floor(r() * (size / 512 - sectors)) * 512;
        if (!free(offset, sectors)) continue;
        if (r() < 0.5) {
          const w = new Uint8Array(sectors * 512).fill(200 + (i % 50));
          model.set(w, offset);
          ops.push(img.write(w, offset));
        } else {
          const buf = new Uint8Array(sectors * 512);
          checks.push([buf, offset, model.slice(offset, offset + buf.length)]);
          ops.push(img.read(buf, offset));
        }
      }
      const later = (ms: number, f: () => Promise<unknown>): Promise<unknown> => new Promise((res) => setTimeout(res, ms)).then(f);
      // Copies of the queue's blocks, some at once, some a moment later (while the queue thread
      // may be storing them, or holds their claims waiting for this thread to adopt them).
      for (const [offset] of batch) {
        // A guest write through the engine into the same block, on other sectors, a moment later.
        const blk = Math.floor(offset / bs);
        const wSectors = 1 + Math.floor(r() * 4);
        const wOffset = blk * bs + Math.floor(r() * (bs / 512 - wSectors)) * 512;
        if (r() < 0.4 && free(wOffset, wSectors)) {
          const w = new Uint8Array(wSectors * 512).fill(100 + (round % 100));
          model.set(w, wOffset);
          ops.push(later(Math.floor(r() * 3), () => img.write(w, wOffset)));
        }
        const x = r();
        if (x < 0.2) ops.push(img.copyHint(Math.floor(offset / bs)));
        else if (x < 0.6) ops.push(later(Math.floor(x * 3), () => img.copyHint(Math.floor(offset / bs))));
      }
      if (batch.length > 0) {
        const b = Math.floor(batch[0]![0] / bs);
        ops.push(later(1, () => img.prefetchBlocks(Math.max(0, b - 2), b + 2)));
      }
      // The worker's answers: adopt each stored block (as daemon/engine-requests.ts serveCow), hand
      // each declined write to the engine (as the slow path does).
      const answered = new Promise<void>((resolve) => {
        worker.once('message', (blocks: ([number, number] | typeof COW_DECLINED)[]) => {
          const mine: Promise<unknown>[] = [];
          blocks.forEach((blk, k) => {
            const [offset, length, fill] = batch[k]!;
            if (blk === COW_DECLINED) {
              declinedToEngine++;
              mine.push(img.write(new Uint8Array(length).fill(fill), offset));
              return;
            }
            const [first, last] = blk;
            assert.is(first, Math.floor(offset / bs));
            assert.is(last, Math.floor((offset + length - 1) / bs));
            stored += last - first + 1;
            if (answer) {
              // Local and unclaimed already; the record is queued a moment later, while the
              // engine's writes, copies and prefetch of the same blocks run.
              mine.push(later(Math.floor(r() * 3), async () => img.journalAnsweredBlocks(first, last)));
              return;
            }
            img.adoptStoredBlocks(first, last);
            for (let b = first; b <= last; b++) claims.release(b);
          });
          void Promise.all(mine).then(() => resolve());
        });
      });
      worker.postMessage(batch);
      await Promise.all([...ops, answered]);
      for (const [buf, offset, want] of checks) assert.ok(Buffer.from(buf).equals(Buffer.from(want)), `round ${round}: read ${offset}+${buf.length}`);
    }
    const done = new Promise<{ stored: number; overwritten: number; declined: number }>((resolve) => worker.once('message', resolve));
    worker.postMessage(null);
    const figures = await done;
    console.log(`  stored ${stored} (${figures.overwritten} in place), declined ${declinedToEngine} (${figures.declined} after a claim)`);
    await img.idle();
    if (answer) {
      // A guest FLUSH, then the daemon dies: every answered write's record was in that commit.
      await img.flush();
      await img.abandon();
    } else {
      await img.close();
    }
    assert.ok(stored > 50, `the queue thread stored blocks (${stored})`);
    assert.ok(figures.overwritten > 10, `and wrote into blocks made local before it in place (${figures.overwritten})`);
    assert.ok(declinedToEngine > 10, `and declined some to the engine (${declinedToEngine}, ${figures.declined} after a claim)`);
    const all = await readAll(file, size);
    for (let b = 0; b < size / bs; b++)
      assert.ok(Buffer.from(all.subarray(b * bs, (b + 1) * bs)).equals(Buffer.from(model.subarray(b * bs, (b + 1) * bs))), `block ${b} of the reopened image equals the model`);
  } finally {
    await worker.terminate();
    fs.rmSync(dir, { recursive: true });
  }
});

test.run();
