/**
 * Per-request cost of the crypto step a queue worker adds to a fast-path request on an encrypted
 * image (daemon/fast-crypt.ts): encrypt-in-place before a write, decrypt-in-place after a read,
 * in a queue's pinned request buffers (tag rotating as in a queue of depth 64), at 4 KiB and
 * 128 KiB; also a decrypt of a never-written (all-zero) request, which skips AES.
 *
 * For scale, the thread hop the fast path saves: a message round trip main → worker → main
 * (postMessage both ways), which every request of an encrypted image cost before, on top of the
 * same cipher work done on the main thread.
 *
 * Each figure is the best of 5 rounds, in µs per request (noise only ever slows a round down).
 *
 *   node build/bench/fast-crypt.js [requests per round, default 2000]
 */
import { randomBytes } from 'node:crypto';
import { Worker } from 'node:worker_threads';
import { FastCrypt } from '../daemon/fast-crypt.js';
import { allocPinned } from '../ffi/uring.js';

const count = Number(process.argv[2]) || 2000;
const ROUNDS = 5;
const DEPTH = 64;
const MAX_IO = 128 * 1024;

function best(fn: () => void): number {
  let top = Infinity;
  for (let r = 0; r < ROUNDS; r++) {
    const t0 = process.hrtime.bigint();
    fn();
    top = Math.min(top, Number(process.hrtime.bigint() - t0) / 1e3 / count);
  }
  return top;
}

const key = randomBytes(64);
let bytes: Uint8Array;
try {
  bytes = allocPinned(DEPTH * MAX_IO).bytes; // the worker's kind of buffer (page-aligned, off-heap)
} catch {
  bytes = new Uint8Array(DEPTH * MAX_IO); // without koffi: same arithmetic
}
bytes.set(randomBytes(bytes.length));
const fc = new FastCrypt(key, bytes, DEPTH, MAX_IO);
key.fill(0);

const us = (x: number) => `${x.toFixed(1).padStart(7)} µs`;
console.log(`fast-path crypto step per request, one thread, best of ${ROUNDS} x ${count} requests (node ${process.version})`);
for (const size of [4096, 131072]) {
  const sectors = size / 512;
  for (let i = 0; i < 500; i++) fc.encryptWrite(i % DEPTH, i * size, size); // warm up the JIT
  const enc = best(() => {
    for (let i = 0; i < count; i++) fc.encryptWrite(i % DEPTH, (i * 7919 % 100000) * sectors * 512, size);
  });
  const dec = best(() => {
    for (let i = 0; i < count; i++) fc.decryptRead(i % DEPTH, (i * 7919 % 100000) * sectors * 512, size);
  });
  bytes.fill(0, 0, MAX_IO);
  const hole = best(() => {
    for (let i = 0; i < count; i++) fc.decryptRead(0, i * size, size);
  });
  bytes.set(randomBytes(MAX_IO), 0);
  const mbs = (t: number) => `${((size / t) | 0).toString().padStart(5)} MB/s`;
  console.log(
    `${String(size / 1024).padStart(4)} KiB: encrypt ${us(enc)} (${mbs(enc)})  decrypt ${us(dec)} (${mbs(dec)})  hole decrypt ${us(hole)}`,
  );
}

// The thread hop: main → worker → main, one message each way, sequentially.
const worker = new Worker(
  `const { parentPort } = require('node:worker_threads'); parentPort.on('message', (m) => parentPort.postMessage(m));`,
  { eval: true },
);
const msg = { type: 'slow', qid: 0, tag: 1, op: 1, flags: 0, offset: 4096, length: 4096 };
async function hops(n: number): Promise<number> {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    await new Promise<void>((resolve) => {
      worker.once('message', () => resolve());
      worker.postMessage(msg);
    });
  }
  return Number(process.hrtime.bigint() - t0) / 1e3 / n;
}
await hops(200);
let hop = Infinity;
for (let r = 0; r < ROUNDS; r++) hop = Math.min(hop, await hops(count));
console.log(`thread hop saved per request (postMessage round trip main -> worker -> main): ${us(hop)}`);
await worker.terminate();
