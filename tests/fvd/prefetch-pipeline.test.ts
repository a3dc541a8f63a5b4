/**
 * Pipelined prefetch (fvd/prefetch.ts, `depth` chunks in flight) over a slow base whose reads
 * take random times, so chunks complete out of order: the image ends equal to the base byte for
 * byte, `check` clean, each base byte read once (bytes read = the base's allocated size); a read
 * failure mid-pipeline leaves a consistent image that a second prefetch completes; pause() and
 * stop() wait for every chunk in flight; the bandwidth cap holds with many chunks in flight.
 * The crash test with chunks in flight during a persist is in prefetch.test.ts.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { checkImage } from '../../fvd/check.js';
import { FvdError } from '../../fvd/errors.js';
import type { BlockFile, IoBackend, OpenOptions } from '../../fvd/io.js';
import { Prefetcher } from '../../fvd/prefetch.js';
import { Rng } from '../helpers/rng.js';
import { TempDir } from '../helpers/cli.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const BS = 64 * KiB;
const tmp = new TempDir('fvd-prefetch-pipeline-');
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * The base as a remote source looks to the engine: reads of one file take a random 0..maxDelayMs
 * (seeded), it says how much it serves at once (inFlightBytes, as HttpSource/NbdSource do), and
 * it can fail its Nth read. Counts completed reads per block, reads in flight, and completions
 * that overtook a read issued before them.
 */
class SlowSource implements IoBackend {
  inFlight = 0;
  maxInFlight = 0;
  bytes = 0;
  reads = 0;
  outOfOrder = 0;
  failAt = 0;
  readonly perBlock: Uint16Array;
  private issued = 0;
  private readonly pending = new Set<number>();
  constructor(
    private readonly target: string,
    blocks: number,
    private readonly rng: Rng,
    private readonly maxDelayMs: number,
    private readonly inFlightBytes = 4 * MiB,
  ) {
    this.perBlock = new Uint16Array(blocks);
  }
  identify(p: string): Promise<string | null> {
    return nodeIo.identify ? nodeIo.identify(p) : Promise.resolve(null);
  }
  async open(p: string, options?: OpenOptions): Promise<BlockFile> {
    const f = await nodeIo.open(p, options);
    if (path.resolve(p) !== path.resolve(this.target)) return f;
    const self = this;
    return new Proxy(f, {
      get(t, prop) {
        if (prop === 'inFlightBytes') return self.inFlightBytes;
        if (prop !== 'read') {
          const v = Reflect.get(t, prop, t);
          return typeof v === 'function' ? v.bind(t) : v;
        }
        return (buf: Uint8Array, offset: number) => self.read(t, buf, offset);
      },
    });
  }
  private async read(f: BlockFile, buf: Uint8Array, offset: number): Promise<void> {
    const id = ++this.issued;
    this.pending.add(id);
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      await sleep(this.rng.int(this.maxDelayMs + 1));
      if (id === this.failAt) throw new FvdError(`base: bytes ${offset}-${offset + buf.length - 1}: server went away`, 'EIO');
      await f.read(buf, offset);
    } finally {
      this.inFlight--;
      this.pending.delete(id);
    }
    for (const p of this.pending) if (p < id) {
      this.outOfOrder++;
      break;
    }
    this.reads++;
    this.bytes += buf.length;
    for (let b = Math.floor(offset / BS); b * BS < offset + buf.length; b++) this.perBlock[b]!++;
  }
}

/** A sparse raw base: random data in some MiB-aligned regions, holes elsewhere (SEEK_DATA finds them). */
function sparseBase(dir: string, size: number, rng: Rng): { file: string; data: Buffer; allocated: number } {
  const file = path.join(dir, 'base.raw');
  const data = Buffer.alloc(size);
  const fd = fs.openSync(file, 'w');
  let allocated = 0; // bytes written (st_blocks would count extent-tree blocks too)
  fs.ftruncateSync(fd, size);
  for (let off = 0; off < size; off += MiB) {
    if (rng.int(4) === 0) continue; // a hole
    const len = Math.min(MiB, size - off);
    const piece = Buffer.from(rng.bytes(len));
    piece[0] |= 1; // never an all-zero page
    for (let p = 4096; p < len; p += 4096) piece[p] |= 1;
    piece.copy(data, off);
    allocated += len;
    fs.writeSync(fd, piece, 0, len, off);
  }
  fs.closeSync(fd);
  return { file, data, allocated };
}

async function assertImageEquals(img: string, data: Buffer, what: string): Promise<void> {
  const image = await FvdImage.open(nodeIo, img, { readOnly: true });
  const got = Buffer.alloc(data.length);
  await image.read(got, 0);
  await image.close();
  const at = got.findIndex((v, i) => v !== data[i]);
  assert.ok(at < 0, `${what}: first difference at byte ${at}`);
  const report = await checkImage(nodeIo, img);
  assert.is(report.errors.length, 0, `${what}: check: ${report.errors.join('; ')}`);
}

async function setUp(seed: number, size: number): Promise<{ dir: string; img: string; base: ReturnType<typeof sparseBase> }> {
  const dir = tmp.caseDir();
  const base = sparseBase(dir, size, new Rng(seed));
  const img = path.join(dir, 'img.fvd');
  await FvdImage.create(nodeIo, img, { base: 'base.raw', baseFormat: 'raw', blockSize: BS });
  return { dir, img, base };
}

for (const seed of [1, 2, 3]) {
  test(`pipelined prefetch, reads completing out of order (seed ${seed}): image equals the base, check clean, each byte read once`, async () => {
    const size = 24 * MiB + 40 * KiB; // the last block straddles the base's end
    const { dir, img, base } = await setUp(seed, size);
    const src = new SlowSource(path.join(dir, 'base.raw'), Math.ceil(size / BS), new Rng(seed + 100), 15);
    const image = await FvdImage.open(src, img, { copyOnRead: false });
    const pf = new Prefetcher(image, { chunkBytes: 512 * KiB, minBytesPerSec: 0, persistBytes: 3 * MiB, persistMs: 0, seed });
    assert.ok(pf.depth > 1, `default depth over a source serving 4 MiB at once: ${pf.depth}`);
    const end = await pf.start().finished;
    assert.is(end.state, 'done', end.error?.message);
    assert.ok(src.maxInFlight > 1, `at most ${src.maxInFlight} read in flight: not pipelined`);
    assert.ok(src.outOfOrder > 0, 'no read completed before one issued earlier: the test did not reorder');
    assert.ok(end.persists > 1, `${end.persists} persists`);
    assert.ok(Math.max(...src.perBlock) <= 1, 'a base block was read twice');
    assert.is(src.bytes, base.allocated, 'bytes read from the base = its allocated size');
    assert.is(end.bytesDone, base.allocated);
    assert.ok(image.stats().fullyLocal);
    await image.close();
    await assertImageEquals(img, base.data, 'after prefetch');
  });
}

test('a base read failing mid-pipeline: prefetch fails after the other chunks settled, the image is consistent, a second prefetch completes it', async () => {
  const size = 16 * MiB;
  const { dir, img, base } = await setUp(7, size);
  const blocks = size / BS;
  const src = new SlowSource(path.join(dir, 'base.raw'), blocks, new Rng(8), 15);
  src.failAt = 9;
  let image = await FvdImage.open(src, img, { copyOnRead: false });
  const pf = new Prefetcher(image, { chunkBytes: 512 * KiB, minBytesPerSec: 0, depth: 6, seed: 1 });
  const end = await pf.start().finished;
  assert.is(end.state, 'failed');
  assert.match(end.error?.message ?? '', /server went away/);
  assert.is(src.inFlight, 0, 'the prefetcher ended with chunks still in flight');
  assert.ok(src.maxInFlight > 1, 'not pipelined');
  assert.ok(src.reads >= 8 && src.bytes < base.allocated, `${src.reads} reads, ${src.bytes} bytes before the failure`);
  assert.is(end.bytesDone, src.bytes, 'bytes done = bytes of the chunks that completed');
  await image.close();
  await assertImageEquals(img, base.data, 'after the failed prefetch');

  const again = new SlowSource(path.join(dir, 'base.raw'), blocks, new Rng(9), 15);
  image = await FvdImage.open(again, img, { copyOnRead: false });
  const end2 = await new Prefetcher(image, { chunkBytes: 512 * KiB, minBytesPerSec: 0, depth: 6, seed: 2 }).start().finished;
  assert.is(end2.state, 'done', end2.error?.message);
  await image.close();
  for (let b = 0; b < blocks; b++) assert.ok(src.perBlock[b]! + again.perBlock[b]! <= 1, `block ${b} read by both prefetches`);
  assert.is(src.bytes + again.bytes, base.allocated, 'the two prefetches together read the allocated size once');
  await assertImageEquals(img, base.data, 'after the second prefetch');
});

test('pause() and stop() wait for every chunk in flight; nothing is read while paused', async () => {
  const size = 16 * MiB;
  const { dir, img } = await setUp(11, size);
  const src = new SlowSource(path.join(dir, 'base.raw'), size / BS, new Rng(12), 20);
  const image = await FvdImage.open(src, img, { copyOnRead: false });
  const pf = new Prefetcher(image, { chunkBytes: 256 * KiB, minBytesPerSec: 0, depth: 5, seed: 3 }).start();
  while (src.inFlight < 3) await sleep(1);
  await pf.pause();
  assert.is(src.inFlight, 0, 'pause() resolved with reads in flight');
  const held = src.reads;
  await sleep(150);
  assert.is(src.reads, held, 'read while paused');
  pf.resume();
  while (src.inFlight < 3) await sleep(1);
  await pf.stop();
  assert.is(src.inFlight, 0, 'stop() resolved with reads in flight');
  assert.is(pf.progress().state, 'stopped');
  assert.ok(Math.max(...src.perBlock) <= 1, 'a base block was read twice');
  await image.close();
  assert.is((await checkImage(nodeIo, img)).errors.length, 0);
});

test('bandwidth cap with 8 chunks in flight: the chunks started together count against it', async () => {
  const size = 16 * MiB;
  const { dir, img } = await setUp(13, size);
  const src = new SlowSource(path.join(dir, 'base.raw'), size / BS, new Rng(14), 2);
  const image = await FvdImage.open(src, img, { copyOnRead: false });
  const cap = 8 * MiB;
  const t0 = performance.now();
  const pf = new Prefetcher(image, { chunkBytes: MiB, depth: 8, maxBytesPerSec: cap, seed: 1, minBytesPerSec: 0 }).start();
  // At no time more than cap × elapsed + the first chunk (which starts at once) was read. Without
  // the reservation at start, 8 chunks would go at once. A slow machine only reads less: no flake.
  let worst = 0;
  const sampler = setInterval(() => {
    const allowed = (cap * (performance.now() - t0)) / 1000 + MiB;
    worst = Math.max(worst, src.bytes + src.inFlight * MiB - allowed);
  }, 10);
  const end = await pf.finished;
  clearInterval(sampler);
  await image.close();
  assert.is(end.state, 'done', end.error?.message);
  assert.ok(worst <= 0, `read or reading ${worst} bytes more than the cap allows`);
  const secs = (performance.now() - t0) / 1000;
  assert.ok(secs >= ((end.bytesDone - MiB) / cap) * 0.95, `too fast for the cap: ${secs.toFixed(2)} s`);
});

test('a persist runs in background: chunks keep starting and completing while it waits for its fdatasync; FULLY_LOCAL only after it ended', async () => {
  const size = 16 * MiB;
  const { dir, img, base } = await setUp(15, size);
  const src = new SlowSource(path.join(dir, 'base.raw'), size / BS, new Rng(16), 2);
  const image = await FvdImage.open(src, img, { copyOnRead: false });
  // The first persist is held until 4 chunks started after it (at most 2 s: a loop that waits
  // for the persist starts none, and the assertion below fails instead of the test hanging).
  let started = 0;
  const prefetchBlocks = image.prefetchBlocks.bind(image);
  image.prefetchBlocks = (b0, b1, scratch) => {
    started++;
    return prefetchBlocks(b0, b1, scratch);
  };
  const persistSoftBits = image.persistSoftBits.bind(image);
  let during = -1;
  let persistsInFlight = 0;
  let overlapping = 0;
  image.persistSoftBits = async () => {
    if (persistsInFlight++ > 0) overlapping++;
    try {
      const n = persistSoftBits(); // bits are collected now, before the wait
      if (during < 0) {
        const at = started;
        const t0 = performance.now();
        while (started < at + 4 && performance.now() - t0 < 2000) await sleep(1);
        during = started - at;
      } else await sleep(20); // every persist slow: the last one is still in flight at the end
      return await n;
    } finally {
      persistsInFlight--;
    }
  };
  const markFullyLocal = image.markFullyLocal.bind(image);
  let markedDuringPersist = false;
  image.markFullyLocal = () => {
    if (persistsInFlight > 0) markedDuringPersist = true;
    return markFullyLocal();
  };
  const end = await new Prefetcher(image, { chunkBytes: 256 * KiB, depth: 2, minBytesPerSec: 0, persistBytes: MiB, persistMs: 0, seed: 1 }).start().finished;
  assert.is(end.state, 'done', end.error?.message);
  assert.ok(during >= 4, `only ${during} chunks started while the first persist ran`);
  assert.is(overlapping, 0, 'two persists at once');
  assert.not.ok(markedDuringPersist, 'FULLY_LOCAL recorded while a persist was in flight');
  assert.ok(end.persists >= 2, `${end.persists} persists`);
  await image.close();
  await assertImageEquals(img, base.data, 'after prefetch');
});

test.after(() => tmp.cleanup());
test.run();
