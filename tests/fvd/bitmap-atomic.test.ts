/**
 * The shared bitmaps take bits from two threads at once: the engine's setBit/setRange on the main
 * thread and a queue thread's when it answers a stored write itself (daemon/queue-cow.ts publish,
 * which uses setRange too). A plain read-modify-write of a byte would drop the other thread's bit set between its
 * load and its store; this races both on the same bytes and counts every bit.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Worker } from 'node:worker_threads';
import { countSet, newBitmap, setBit, setRange, testBit } from '../../fvd/bitmap.js';

const BITS = 1 << 22; // 512 KiB of bitmap

test('setBit and setRange keep the bits another thread sets in the same bytes at the same time', async () => {
  for (let round = 0; round < 8; round++) {
    const bm = newBitmap(BITS / 8);
    const go = new Int32Array(new SharedArrayBuffer(4));
    // The other thread: every odd bit, with Atomics.or, as a queue thread does.
    const code = `
      const { workerData: { bm, go, bits } } = require('node:worker_threads');
      const g = new Int32Array(go);
      const b8 = new Uint8Array(bm);
      while (Atomics.load(g, 0) === 0);
      for (let b = 1; b < bits; b += 2) Atomics.or(b8, b >>> 3, 1 << (b & 7));
    `;
    const worker = new Worker(code, { eval: true, workerData: { bm: bm.buffer, go: go.buffer, bits: BITS } });
    const exited = new Promise((resolve) => worker.once('exit', resolve));
    await new Promise((resolve) => worker.once('online', resolve));
    Atomics.store(go, 0, 1);
    // This thread: every even bit, half by setBit, half by setRange (a run inside one byte).
    for (let b = 0; b < BITS / 2; b += 2) setBit(bm, b);
    for (let b = BITS / 2; b < BITS; b += 2) setRange(bm, b, 1);
    await exited;
    assert.is(countSet(bm, BITS), BITS, `round ${round}: no bit lost`);
  }
});

test('setRange sets exactly [first, first + count), whole bytes and partial ones, and ignores bits past the end', () => {
  const bytes = 6;
  for (let first = 0; first < bytes * 8 + 4; first++) {
    for (let count = 0; first + count <= bytes * 8 + 20; count++) {
      const bm = newBitmap(bytes);
      setRange(bm, first, count);
      for (let b = 0; b < bytes * 8; b++) {
        if (testBit(bm, b) !== (b >= first && b < first + count)) assert.unreachable(`first ${first} count ${count}: bit ${b}`);
      }
    }
  }
});

test.run();
