/**
 * Block locks (fvd/block-locks.ts) and their shared claims by ranges (fvd/block-claims.ts):
 * word-spanning ranges, the give-back of a range that meets a held claim, a differential run
 * against a plain model, waiters, and a race of range claims against single claims made by
 * another thread on the same words.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Worker } from 'node:worker_threads';
import { BlockLocks } from '../../fvd/block-locks.js';
import { BlockClaims } from '../../fvd/block-claims.js';

const claimedSet = (c: BlockClaims) => {
  const s: number[] = [];
  for (let b = 0; b < c.blocks; b++) if (c.isClaimed(b)) s.push(b);
  return s;
};
const range = (a: number, b: number) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

test('claims by range: across words, exactly the range; a held block makes it take nothing', () => {
  const c = BlockClaims.create(200);
  assert.ok(c.tryClaimRange(30, 70));
  assert.equal(claimedSet(c), range(30, 70));
  assert.ok(c.tryClaimRange(0, 29), 'the neighbours below');
  assert.ok(c.tryClaimRange(71, 71));
  c.releaseRange(30, 70);
  assert.equal(claimedSet(c), [...range(0, 29), 71]);
  // A held block in the third word: the first two words' bits are given back.
  assert.ok(c.tryClaim(90));
  c.releaseRange(0, 29);
  c.releaseRange(71, 71);
  assert.not.ok(c.tryClaimRange(5, 120));
  assert.equal(claimedSet(c), [90]);
  // Whole words and the top bit of a word (the sign bit of its Int32).
  assert.ok(c.tryClaimRange(31, 31));
  assert.ok(c.tryClaimRange(32, 63));
  assert.ok(c.tryClaimRange(64, 89));
  assert.equal(claimedSet(c), range(31, 90));
  c.releaseRange(31, 89);
  c.release(90);
  assert.equal(claimedSet(c), []);
});

/** A seeded generator (xorshift32). */
function rng(seed: number) {
  let x = seed >>> 0 || 1;
  return (n: number) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

test('differential: tryAcquire/release with claims attached and detached, and another thread\'s claims, against a model', () => {
  const N = 300;
  for (const seed of [1, 2, 3, 4, 5]) {
    const r = rng(seed);
    const claims = BlockClaims.create(N - 20); // the top 20 blocks have no claim bits
    const locks = new BlockLocks();
    const lockedM = new Set<number>();
    const lockClaimedM = new Set<number>(); // claims the locks hold
    const otherM = new Set<number>(); // claims "a queue thread" holds
    let attached = false;
    const held: Array<[number, number]> = [];
    for (let step = 0; step < 3000; step++) {
      const op = r(10);
      if (op < 4) {
        const a = r(N);
        const b = Math.min(N - 1, a + r(r(4) === 0 ? 80 : 6));
        const free = range(a, b).every((x) => !lockedM.has(x));
        const claimFree = !attached || range(a, Math.min(b, N - 21)).every((x) => !otherM.has(x));
        const got = locks.tryAcquire(a, b);
        assert.is(got, free && claimFree, `seed ${seed} step ${step}: tryAcquire(${a}, ${b})`);
        if (got) {
          held.push([a, b]);
          for (const x of range(a, b)) {
            lockedM.add(x);
            if (attached && x < N - 20) lockClaimedM.add(x);
          }
        }
      } else if (op < 7 && held.length) {
        const [a, b] = held.splice(r(held.length), 1)[0]!;
        locks.release(a, b);
        for (const x of range(a, b)) {
          lockedM.delete(x);
          // Released while detached (the queue threads are gone): the shared bit stays as it is,
          // which the model books as held elsewhere.
          if (lockClaimedM.delete(x) && !attached) otherM.add(x);
        }
      } else if (op < 9) {
        const x = r(N - 20);
        if (otherM.has(x)) {
          claims.release(x);
          otherM.delete(x);
        } else {
          assert.is(claims.tryClaim(x), !lockClaimedM.has(x), `seed ${seed} step ${step}: other thread's claim of ${x}`);
          if (!lockClaimedM.has(x)) otherM.add(x);
        }
      } else {
        attached = !attached;
        locks.shareWith(attached ? claims : null);
      }
      if (op === 9 || step % 50 === 0) {
        for (let x = 0; x < N; x++) {
          assert.is(locks.isLocked(x), lockedM.has(x), `seed ${seed} step ${step}: lock of ${x}`);
          if (x < N - 20) assert.is(claims.isClaimed(x), lockClaimedM.has(x) || otherM.has(x), `seed ${seed} step ${step}: claim of ${x}`);
        }
        assert.is(locks.size, lockedM.size);
      }
    }
  }
});

test('acquire waits for the holder of any block of its range, and every waiter runs once it is free', async () => {
  const locks = new BlockLocks();
  assert.ok(locks.tryAcquire(2000, 2010)); // past the initial array: it grows
  const order: string[] = [];
  const a = locks.acquire(2005, 2006).then(() => order.push('a'));
  const b = locks.acquire(2010, 2012).then(() => order.push('b'));
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(order, [], 'both wait');
  locks.release(2000, 2010);
  await Promise.all([a, b]);
  assert.equal(order.sort(), ['a', 'b']);
  assert.ok(locks.isLocked(2005) && locks.isLocked(2012));
  assert.not.ok(locks.isLocked(2000));
  assert.is(locks.size, 5);
});

test('race: range claims on this thread against single claims of another thread on the same words never overlap', async () => {
  const BLOCKS = 256;
  const claims = BlockClaims.create(BLOCKS);
  const holders = new Int32Array(new SharedArrayBuffer(BLOCKS * 4));
  const stop = new Int32Array(new SharedArrayBuffer(4));
  const url = new URL('../../fvd/block-claims.js', import.meta.url).href;
  // The other thread: claim one block, check nobody else holds it, let it go.
  const code = `
    const { parentPort, workerData: d } = require('node:worker_threads');
    import(${JSON.stringify(url)}).then(({ BlockClaims }) => {
      const c = new BlockClaims(d.shared, d.blocks);
      const holders = new Int32Array(d.holders), stop = new Int32Array(d.stop);
      let got = 0, refused = 0, overlaps = 0, x = 12345;
      while (Atomics.load(stop, 0) === 0) {
        x = (x * 1103515245 + 12345) >>> 0;
        const b = x % d.blocks;
        if (!c.tryClaim(b)) { refused++; continue; }
        got++;
        if (Atomics.add(holders, b, 1) !== 0) overlaps++;
        for (let i = 0; i < 50; i++);
        Atomics.sub(holders, b, 1);
        c.release(b);
      }
      parentPort.postMessage({ got, refused, overlaps });
    });`;
  const worker = new Worker(code, { eval: true, workerData: { shared: claims.shared, blocks: BLOCKS, holders: holders.buffer, stop: stop.buffer } });
  const done = new Promise<{ got: number; refused: number; overlaps: number }>((res, rej) => (worker.once('message', res), worker.once('error', rej)));
  const r = rng(7);
  let got = 0;
  let refused = 0;
  let overlaps = 0;
  const until = Date.now() + 1500;
  while (Date.now() < until) {
    const a = r(BLOCKS);
    const b = Math.min(BLOCKS - 1, a + r(70));
    if (!claims.tryClaimRange(a, b)) {
      refused++;
      continue;
    }
    got++;
    for (let x = a; x <= b; x++) if (Atomics.add(holders, x, 1) !== 0) overlaps++;
    for (let x = a; x <= b; x++) Atomics.sub(holders, x, 1);
    claims.releaseRange(a, b);
    if (got % 256 === 0) await new Promise((res) => setImmediate(res));
  }
  Atomics.store(stop, 0, 1);
  const other = await done;
  await worker.terminate();
  assert.is(overlaps, 0, 'a block held by both threads (this one)');
  assert.is(other.overlaps, 0, 'a block held by both threads (the other)');
  assert.ok(got > 100 && other.got > 100, `both made progress: ${got}, ${other.got}`);
  assert.ok(refused > 0 && other.refused > 0, `the two met: refused ${refused} here, ${other.refused} there`);
  assert.equal(claimedSet(claims), [], 'nothing left claimed');
});

test.run();
