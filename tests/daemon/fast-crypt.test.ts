/**
 * The queue worker's fast path on encrypted images (daemon/fast-crypt.ts), without ublk: the
 * worker's per-request sequence is replayed against a real encrypted engine on a real file, in
 * the worker's own pinned request buffers, with the worker's routing (storedHost), cipher step
 * (FastCrypt) and synchronous transfers (DirectIo), the ring's part done by plain pread/pwrite:
 *
 *   write: route (storedHost) → slow: the engine gets the plaintext buffer
 *                             → fast: encryptWrite → sync transfer of a prefix → rest "on the ring"
 *   read:  route → slow: engine.read into the buffer
 *               → fast: sync prefix → rest "on the ring" (zeros past the end) → decryptRead
 *
 * Every read (fast or slow) must equal a plain in-memory model and the engine's own read; at the
 * end the image is reopened and read whole. Layouts raw-like and compact, with and without a
 * plaintext base (copy-on-read makes base blocks local while it runs), transfer split points
 * random (all synchronous, all on the ring, or cut in the middle).
 *
 * Replay: FVD_SEED=n.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { allocPinned, type PinnedBuffer } from '../../ffi/uring.js';
import { syscalls } from '../../ffi/syscalls.js';
import { DIRECT_WOULD_BLOCK, DirectIo } from '../../daemon/direct-io.js';
import { FastCrypt } from '../../daemon/fast-crypt.js';
import type { EngineView } from '../../daemon/shared-state.js';
import { storedHost } from '../helpers/stored-host.js';
import { STORED, ZERO, directRoute, newRun } from '../../fvd/mapping.js';
import { XtsCipher } from '../../fvd/crypto.js';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { Rng } from '../helpers/rng.js';

const sys = syscalls()!;
const KEY = Buffer.from('fast path key material');
const KDF = { log2N: 10, r: 1 };
const dir = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'fvd-fastcrypt-'));
const M = 1024 * 1024;

/** Byte-exact comparison that reports the first difference (not a diff of thousands of bytes). */
function same(got: Uint8Array, want: Uint8Array, what: string): void {
  if (got.length !== want.length) assert.unreachable(`${what}: length ${got.length}, expected ${want.length}`);
  for (let i = 0; i < got.length; i++)
    if (got[i] !== want[i]) assert.unreachable(`${what}: byte ${i} (sector ${Math.floor(i / 512)}) is ${got[i]}, expected ${want[i]}`);
}

function randomBytes(rng: Rng, n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i += 4) {
    const x = rng.u32();
    b[i] = x;
    b[i + 1] = x >>> 8;
    b[i + 2] = x >>> 16;
    b[i + 3] = x >>> 24;
  }
  return b;
}

test('FastCrypt: in place, per tag, the same bytes as XtsCipher; neighbours untouched; views follow the length', () => {
  const key = randomBytes(new Rng(1), 64);
  const xts = new XtsCipher(key);
  const depth = 4;
  const maxIo = 8192;
  const bufs = new Uint8Array(depth * maxIo);
  const fc = new FastCrypt(key, bufs, depth, maxIo);
  const rng = new Rng(2);
  for (const [tag, len, offset] of [[1, 8192, 512 * 77], [1, 512, 4096], [2, 4096, 0], [1, 8192, 1 << 30]] as const) {
    const plain = randomBytes(rng, len);
    const fill = randomBytes(rng, bufs.length);
    bufs.set(fill);
    bufs.set(plain, tag * maxIo);
    fc.encryptWrite(tag, offset, len);
    const expect = new Uint8Array(len);
    xts.encrypt(plain, expect, offset / 512);
    assert.equal(bufs.subarray(tag * maxIo, tag * maxIo + len), expect, `tag ${tag} ${len}@${offset}: ciphertext`);
    assert.equal(bufs.subarray(0, tag * maxIo), fill.subarray(0, tag * maxIo), 'bytes before the tag untouched');
    assert.equal(bufs.subarray(tag * maxIo + len), fill.subarray(tag * maxIo + len), 'bytes after the request untouched');
    fc.decryptRead(tag, offset, len);
    assert.equal(bufs.subarray(tag * maxIo, tag * maxIo + len), plain, 'decrypts back');
  }
  // The engine's rule: a stored all-zero sector reads as zeros, next to real ciphertext.
  const plain = randomBytes(rng, 1024);
  bufs.set(plain, 0);
  fc.encryptWrite(0, 0, 1024);
  bufs.fill(0, 512, 1024);
  fc.decryptRead(0, 0, 1024);
  assert.equal(bufs.subarray(0, 512), plain.subarray(0, 512));
  assert.ok(bufs.subarray(512, 1024).every((b) => b === 0), 'a hole sector reads as zeros');
  assert.throws(() => new FastCrypt(key, new Uint8Array(100), 1, 512), /geometry/);
});

test('masterKeyCopy: a copy of the unlocked key (null unencrypted or without the key); the engine and a worker cipher agree', async () => {
  const file = path.join(dir, 'key.fvd');
  await FvdImage.create(nodeIo, file, { size: M, encrypt: { key: KEY, kdf: KDF } });
  const img = await FvdImage.open(nodeIo, file, { key: KEY });
  const k1 = img.masterKeyCopy()!;
  assert.is(k1.length, 64);
  k1.fill(0); // what the daemon does with its copy
  const k2 = img.masterKeyCopy()!;
  assert.not.equal(k2, new Uint8Array(64), 'wiping a copy leaves the engine key intact');
  const plain = randomBytes(new Rng(3), 8192);
  await img.write(plain, 4096 * 5);
  await img.flush();
  const stored = new Uint8Array(8192);
  const fd = fs.openSync(file, 'r');
  const phys = storedHost(img.sharedView(), 4096 * 5, 8192, false);
  assert.ok(phys > 0, 'local data of an encrypted image is routed to the fast path');
  fs.readSync(fd, stored, 0, 8192, phys);
  fs.closeSync(fd);
  const mine = new Uint8Array(8192);
  new XtsCipher(k2).encrypt(plain, mine, (4096 * 5) / 512);
  assert.equal(stored, mine, 'the engine stored what a worker cipher from the copied key produces');
  k2.fill(0);
  await img.close();
  const noKey = await FvdImage.open(nodeIo, file, { withoutKey: true, readOnly: true });
  assert.is(noKey.masterKeyCopy(), null);
  await noKey.close();
  await FvdImage.create(nodeIo, path.join(dir, 'plain.fvd'), { size: M });
  const plainImg = await FvdImage.open(nodeIo, path.join(dir, 'plain.fvd'));
  assert.is(plainImg.masterKeyCopy(), null);
  await plainImg.close();
});

/** The worker's side of one queue, in the worker's own kind of buffers. */
class SimWorker {
  readonly bufs: PinnedBuffer;
  readonly crypt: FastCrypt;
  readonly direct: DirectIo;
  readonly fd: number;
  fast = 0;
  slow = 0;
  /** Reads answered with zeros without I/O (directRoute said ZERO), also counted in fast. */
  zero = 0;
  private readonly route = newRun();

  constructor(
    readonly img: FvdImage,
    readonly view: EngineView,
    file: string,
    readonly depth: number,
    readonly maxIo: number,
    readonly rng: Rng,
  ) {
    this.bufs = allocPinned(depth * maxIo);
    const key = img.masterKeyCopy()!;
    this.crypt = new FastCrypt(key, this.bufs.bytes, depth, maxIo);
    key.fill(0);
    this.fd = fs.openSync(file, 'r+');
    this.direct = new DirectIo(sys, this.fd, 'memory');
  }

  buf(tag: number, length: number): Buffer {
    return this.bufs.bytes.subarray(tag * this.maxIo, tag * this.maxIo + length);
  }

  /** A transfer cut at a random sector: a synchronous prefix, the rest as the ring would do it. */
  private transfer(write: boolean, tag: number, length: number, phys: number): void {
    const cut = this.rng.pick([0, length, 512 * this.rng.int(length / 512 + 1)]);
    let done = 0;
    if (cut > 0) {
      const base = tag * this.maxIo;
      const r = this.direct.transfer(write, this.bufs.address + base, cut, phys, (from) => this.bufs.bytes.fill(0, base + from, base + cut));
      assert.ok(r === cut || r === DIRECT_WOULD_BLOCK, `sync transfer: ${r}`);
      done = this.direct.done;
    }
    while (done < length) {
      const at = tag * this.maxIo + done;
      const n = write
        ? fs.writeSync(this.fd, this.bufs.bytes, at, length - done, phys + done)
        : fs.readSync(this.fd, this.bufs.bytes, at, length - done, phys + done);
      if (n === 0 && !write) {
        this.bufs.bytes.fill(0, at, tag * this.maxIo + length); // end of a compact image file
        done = length;
      } else done += n;
    }
  }

  /** The guest's data is in the buffer (the kernel copied it); route, then encrypt, then write. */
  async write(tag: number, offset: number, plain: Uint8Array): Promise<'fast' | 'slow'> {
    const len = plain.length;
    this.buf(tag, len).set(plain);
    const phys = storedHost(this.view, offset, len, true);
    if (phys < 0) {
      this.slow++;
      await this.img.write(this.buf(tag, len), offset); // the engine works in the worker's buffer
      return 'slow';
    }
    this.fast++;
    this.crypt.encryptWrite(tag, offset, len);
    this.transfer(true, tag, len, phys);
    return 'fast';
  }

  async read(tag: number, offset: number, len: number): Promise<Uint8Array> {
    this.buf(tag, len).fill(0xa5); // stale bytes of an earlier request
    const kind = directRoute(this.view, offset, len, false, this.route);
    if (kind === ZERO) {
      // The worker answers with zeros: no I/O, no decryption (daemon/fvd-queue.ts).
      this.fast++;
      this.zero++;
      this.buf(tag, len).fill(0);
    } else if (kind !== STORED) {
      this.slow++;
      await this.img.read(this.buf(tag, len), offset);
    } else {
      this.fast++;
      this.transfer(false, tag, len, this.route.host);
      this.crypt.decryptRead(tag, offset, len);
    }
    return this.buf(tag, len);
  }

  close(): void {
    fs.closeSync(this.fd);
    this.direct.free();
    this.bufs.free();
  }
}

async function differential(seed: number, layout: 'raw' | 'compact', withBase: boolean): Promise<void> {
  const rng = new Rng(seed);
  const size = 2 * M;
  const name = `d-${seed}-${layout}-${withBase ? 'base' : 'nobase'}`;
  const file = path.join(dir, `${name}.fvd`);
  const model = new Uint8Array(size);
  const opts: Parameters<typeof FvdImage.create>[2] = { size, layout, blockSize: 4096, chunkSize: 65536, encrypt: { key: KEY, kdf: KDF } };
  if (withBase) {
    const base = randomBytes(rng, size - 512 * 1024); // shorter than the disk: the rest reads zeros
    fs.writeFileSync(path.join(dir, `${name}.raw`), base);
    model.set(base);
    Object.assign(opts, { base: `${name}.raw`, baseFormat: 'raw', detectZeroes: false });
  }
  await FvdImage.create(nodeIo, file, opts);
  let img = await FvdImage.open(nodeIo, file, { key: KEY, copyOnRead: true });
  const depth = 4;
  const maxIo = 128 * 1024;
  const w = new SimWorker(img, img.sharedView(), file, depth, maxIo, rng);
  const where = (step: number, what: string) => `FVD_SEED=${seed} ${layout} ${withBase ? 'base' : 'no base'} step ${step}: ${what}`;
  const pickRange = (): [number, number] => {
    const align = rng.pick([512, 4096]);
    const len = align * rng.range(1, Math.min(maxIo, 64 * 1024) / align) * (rng.chance(0.2) ? 2 : 1);
    const offset = align * rng.int((size - len) / align + 1);
    return [offset, len];
  };
  try {
    for (let step = 0; step < 400; step++) {
      const tag = rng.int(depth);
      const op = rng.weighted([40, 35, 10, 5, 5, 5]);
      if (op === 0) {
        const [offset, len] = pickRange();
        const plain = randomBytes(rng, len);
        await w.write(tag, offset, plain);
        model.set(plain, offset);
      } else if (op === 1) {
        const [offset, len] = pickRange();
        const got = await w.read(tag, offset, len);
        same(got, model.subarray(offset, offset + len), where(step, `worker read ${offset}+${len}`));
      } else if (op === 2) {
        const [offset, len] = pickRange();
        const got = new Uint8Array(len);
        await img.read(got, offset);
        same(got, model.subarray(offset, offset + len), where(step, `engine read ${offset}+${len}`));
      } else if (op === 3) {
        await img.flush(); // journals the bits of slow writes: later writes there go fast
      } else if (op === 4) {
        const [offset, len] = pickRange();
        await img.writeZeroes(offset, len); // punched storage: the zero-sector rule on fast reads
        model.fill(0, offset, offset + len);
      } else {
        // The same plaintext through the engine and through a worker must store the same bytes.
        const [offset, len] = pickRange();
        const plain = randomBytes(rng, len);
        await img.write(plain, offset);
        await img.flush();
        const phys = storedHost(w.view, offset, len, true);
        if (phys >= 0) {
          const engineBytes = new Uint8Array(len);
          fs.readSync(w.fd, engineBytes, 0, len, phys);
          assert.is(await w.write(tag, offset, plain), 'fast');
          const workerBytes = new Uint8Array(len);
          fs.readSync(w.fd, workerBytes, 0, len, phys);
          same(workerBytes, engineBytes, where(step, `stored bytes of ${offset}+${len}`));
          assert.not.equal(workerBytes, plain, 'ciphertext is stored');
        }
        model.set(plain, offset);
      }
    }
    // (Raw-like without a base: everything is local and journaled from the start, all fast.)
    assert.ok(w.fast > 50 && (w.slow > 0 || (layout === 'raw' && !withBase)), `both paths taken (fast ${w.fast}, slow ${w.slow})`);
    // Compact: unmapped chunks (raw-like: the base ends on a block boundary, its tail is local storage).
    if (layout === 'compact') assert.ok(w.zero > 0, `reads answered with zeros by the worker (${w.zero})`);
    // A marker written on the fast path is not stored as plaintext.
    const marker = new TextEncoder().encode('fast path marker text 0123456789abcdef'.repeat(16).slice(0, 512));
    const at = 8 * 65536;
    await w.write(0, at, marker.subarray(0, 512)); // make it local (maybe via the engine) and journaled
    await img.flush();
    assert.is(await w.write(0, at, marker.subarray(0, 512)), 'fast');
    model.set(marker.subarray(0, 512), at);
    assert.is(Buffer.from(fs.readFileSync(file)).indexOf(Buffer.from(marker.subarray(0, 64))), -1, 'no plaintext marker in the image');
  } finally {
    w.close();
    await img.close();
  }
  img = await FvdImage.open(nodeIo, file, { key: KEY, readOnly: true });
  const all = new Uint8Array(size);
  await img.read(all, 0);
  await img.close();
  same(all, model, `FVD_SEED=${seed} ${layout} ${withBase ? 'base' : 'no base'}: the reopened image`);
}

const only = process.env.FVD_SEED ? [Number(process.env.FVD_SEED)] : [11, 12, 13];
for (const seed of only) {
  for (const layout of ['raw', 'compact'] as const) {
    for (const withBase of [false, true]) {
      test(`differential worker vs engine FVD_SEED=${seed} ${layout} ${withBase ? 'over a plaintext base' : 'no base'}`, () => differential(seed, layout, withBase));
    }
  }
}

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
test.run();
