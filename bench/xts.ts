/**
 * Throughput of the data cipher (fvd/crypto.ts) on this CPU, one thread:
 *  - XtsCipher encrypt / decrypt (XTS built on two long-lived AES-256-ECB contexts), per request
 *    size;
 *  - the same with one node:crypto `aes-256-xts` cipher object per 512-byte sector (the obvious
 *    implementation, for comparison);
 *  - decrypt of an all-zero (hole) request, which skips AES.
 * Each figure is the best of 5 rounds (a shared machine's noise only ever slows a round down).
 *
 *   node build/bench/xts.js [MiB per case, default 256]
 */
import { createCipheriv, randomBytes } from 'node:crypto';
import { XtsCipher } from '../fvd/crypto.js';

const total = (Number(process.argv[2]) || 256) * 1024 * 1024;
const key = randomBytes(64);
const xts = new XtsCipher(key);

const ROUNDS = 5;

/** Best of ROUNDS: runs `fn(count)` and returns MB/s for `count * size` bytes. */
function best(size: number, count: number, fn: (count: number) => void): string {
  let top = 0;
  for (let r = 0; r < ROUNDS; r++) {
    const t0 = process.hrtime.bigint();
    fn(count);
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    top = Math.max(top, (count * size) / 1e6 / s);
  }
  return `${top.toFixed(0).padStart(6)} MB/s`;
}

function perSectorNative(src: Uint8Array, dst: Uint8Array, sector: number, iv: Buffer): void {
  for (let s = 0; s < src.length / 512; s++) {
    iv.writeUInt32LE((sector + s) >>> 0, 0);
    const c = createCipheriv('aes-256-xts', key, iv);
    dst.set(c.update(src.subarray(s * 512, (s + 1) * 512)), s * 512);
    c.final();
  }
}

console.log(`cipher throughput, ${total / 1024 / 1024} MiB per case, one thread (node ${process.version})`);
for (const size of [4096, 65536, 524288]) {
  const src = randomBytes(size);
  const dst = new Uint8Array(size);
  const n = Math.max(1, Math.floor(total / size / ROUNDS));
  // Warm up the JIT.
  for (let i = 0; i < 200; i++) xts.encrypt(src, dst, i);
  const enc = best(size, n, (c) => {
    for (let i = 0; i < c; i++) xts.encrypt(src, dst, i * (size / 512));
  });
  const dec = best(size, n, (c) => {
    for (let i = 0; i < c; i++) xts.decrypt(dst, i * (size / 512)); // garbage after the first pass: same work
  });
  const zeros = new Uint8Array(size);
  const hole = best(size, n, (c) => {
    for (let i = 0; i < c; i++) xts.decrypt(zeros, i);
  });
  const iv = Buffer.alloc(16);
  const native = best(size, Math.max(1, Math.floor(n / 8)), (c) => {
    for (let i = 0; i < c; i++) perSectorNative(src, dst, i * (size / 512), iv);
  });
  console.log(
    `${String(size / 1024).padStart(4)} KiB requests: encrypt ${enc}  decrypt ${dec}  hole ${hole}  | aes-256-xts object per sector: ${native}`,
  );
}
