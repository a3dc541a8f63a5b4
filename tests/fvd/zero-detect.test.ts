/**
 * Zero detection at create over sparse raw bases (fvd/zero-scan.ts): the bitmap equals a full
 * scan of the base (a tiny reference below) for random bases — data extents straddling blocks,
 * zeros written inside data extents, a last partial block, a base size that is no block multiple,
 * a disk smaller than its base — while only the data extents are read; the created image reopens
 * with the same map and reads like the base.
 */
import * as assert from 'uvu/assert';
import { test } from 'uvu';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo, NodeFile } from '../../storage/node-file.js';
import { fileDataExtent } from '../../fvd/zero-scan.js';
import { libc } from '../../ffi/libc.js';
import { Rng } from '../helpers/rng.js';
import { TempDir, assertOk, fvd, json } from '../helpers/cli.js';
import { ReadCounter } from '../helpers/read-counter.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const tmp = new TempDir('fvd-zero-detect-');

/** The full scan create did before extents: block b is zero when its bytes below `limit` all are. */
function referenceZeroBlocks(base: Uint8Array, limit: number, blockSize: number): boolean[] {
  const out: boolean[] = [];
  for (let a = 0; a < limit; a += blockSize) out.push(base.subarray(a, Math.min(a + blockSize, limit)).every((v) => v === 0));
  return out;
}

/** Which base blocks the created image holds as local (its bitmap), from its map. */
function localBlocks(img: FvdImage, limit: number, blockSize: number): boolean[] {
  const out: boolean[] = [];
  const ext = img.extents();
  let i = 0;
  for (let a = 0; a < limit; a += blockSize) {
    while (ext[i]!.offset + ext[i]!.length <= a) i++;
    out.push(ext[i]!.kind !== 'base');
  }
  return out;
}

interface SparseBase {
  file: string;
  bytes: Uint8Array;
  /** The ranges written (pwrite allocates them, zeros included). */
  written: [number, number][];
}

/**
 * A sparse file of `size` bytes with `pieces` random writes (random data, some all zeros, some
 * with a zero run inside), of 1 byte to 3 blocks, at unaligned offsets; sometimes one at the end.
 */
function makeSparseBase(dir: string, rng: Rng, size: number, blockSize: number, pieces: number): SparseBase {
  const file = path.join(dir, 'base.raw');
  const bytes = new Uint8Array(size);
  const written: [number, number][] = [];
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    for (let k = 0; k < pieces; k++) {
      const len = 1 + rng.int(3 * blockSize);
      const at = k === 0 && rng.int(2) ? size - len : rng.int(size - len);
      const data = new Uint8Array(len);
      const kind = rng.int(4);
      if (kind !== 0) for (let i = 0; i < len; i++) data[i] = rng.int(256);
      if (kind === 2) data.fill(0, rng.int(len), rng.int(len) + 1); // a zero run inside data
      fs.writeSync(fd, data, 0, len, at);
      bytes.set(data, at);
      written.push([at, at + len]);
    }
  } finally {
    fs.closeSync(fd);
  }
  return { file, bytes, written };
}

/** Bytes of the blocks overlapping the written ranges, below `limit`. */
function dataBlockBytes(written: [number, number][], limit: number, blockSize: number): number {
  const blocks = new Set<number>();
  for (const [a, z] of written) for (let b = Math.floor(a / blockSize); b * blockSize < Math.min(z, limit); b++) blocks.add(b);
  return blocks.size * blockSize;
}

const CASES = [
  { name: 'default blocks, size no block multiple', size: 5 * MiB + 12345, blockSize: 64 * KiB, pieces: 40 },
  { name: '4 KiB blocks, size no sector multiple', size: 3 * MiB + 777, blockSize: 4 * KiB, pieces: 120 },
  { name: '16 KiB blocks, dense', size: 2 * MiB + 4096 + 3, blockSize: 16 * KiB, pieces: 400 },
  { name: '1 MiB blocks, few pieces', size: 9 * MiB + 100, blockSize: 1 * MiB, pieces: 6 },
  { name: 'disk smaller than its base (the limit cuts a block)', size: 6 * MiB + 999, blockSize: 64 * KiB, pieces: 50, disk: 4 * MiB + 1536 },
];

for (const c of CASES) {
  test(`zero detection over a sparse raw base equals a full scan, reading only data extents: ${c.name}`, async () => {
    for (let seed = 1; seed <= 4; seed++) {
      const dir = tmp.caseDir();
      const rng = new Rng(seed * 7919 + c.size);
      const base = makeSparseBase(dir, rng, c.size, c.blockSize, c.pieces);
      const limit = Math.min(c.size, c.disk ?? c.size);
      const counter = new ReadCounter(nodeIo, base.file);
      const img = path.join(dir, 'vm.fvd');
      await FvdImage.create(counter, img, { base: 'base.raw', baseFormat: 'raw', blockSize: c.blockSize, ...(c.disk ? { size: c.disk } : {}) });
      const bound = dataBlockBytes(base.written, limit, c.blockSize);
      if (holeSupport(dir)) assert.ok(counter.bytes <= bound, `seed ${seed}: read ${counter.bytes} bytes, data blocks hold ${bound}`);

      const image = await FvdImage.open(nodeIo, img, { readOnly: true });
      try {
        const want = referenceZeroBlocks(base.bytes, limit, c.blockSize);
        const got = localBlocks(image, limit, c.blockSize);
        const diff = want.findIndex((z, b) => z !== got[b]);
        assert.is(diff, -1, `seed ${seed}: block ${diff} zero=${want[diff]} but local=${got[diff]}`);
        assert.ok(want.some((z) => !z) && want.some((z) => z), `seed ${seed}: the base has both zero and data blocks`);
        const all = Buffer.alloc(image.size);
        await image.read(all, 0);
        const expect = Buffer.alloc(image.size);
        expect.set(base.bytes.subarray(0, Math.min(image.size, c.size)));
        assert.ok(all.equals(expect), `seed ${seed}: the image reads like its base`);
      } finally {
        await image.close();
      }
    }
  });
}

test('fileDataExtent: SEEK_DATA/SEEK_HOLE extents of a sparse file, clipped to its size', async () => {
  const dir = tmp.caseDir();
  if (!holeSupport(dir)) return console.log('  (skipped: this file system reports no holes)');
  const p = path.join(dir, 'f.raw');
  const fd = fs.openSync(p, 'w');
  fs.ftruncateSync(fd, 16 * MiB + 100);
  fs.writeSync(fd, Buffer.alloc(8192, 7), 0, 8192, 2 * MiB);
  fs.writeSync(fd, Buffer.alloc(10, 7), 0, 10, 16 * MiB + 90);
  fs.closeSync(fd);
  const f = await NodeFile.open(p, { readOnly: true });
  try {
    assert.equal(fileDataExtent(f, 0), [2 * MiB, 2 * MiB + 8192]);
    assert.equal(fileDataExtent(f, 2 * MiB + 4096), [2 * MiB + 4096, 2 * MiB + 8192]);
    const last = fileDataExtent(f, 2 * MiB + 8192)!;
    assert.ok(last[0] <= 16 * MiB + 90 && last[0] >= 16 * MiB - 4096 && last[1] === 16 * MiB + 100, `last extent ${last}`);
    assert.is(fileDataExtent(f, 16 * MiB + 100), null);
    assert.is(f.nextHole(2 * MiB), 2 * MiB + 8192);
    assert.is(f.nextHole(0), 0);
  } finally {
    await f.close();
  }
});

test('CLI: create over a sparse raw base, then map shows the zero-detected blocks as local', async () => {
  const dir = tmp.caseDir();
  const rng = new Rng(42);
  const base = makeSparseBase(dir, rng, 4 * MiB + 512, 64 * KiB, 10);
  const img = path.join(dir, 'vm.fvd');
  assertOk(fvd('create', '-b', 'base.raw', '-F', 'raw', img));
  const map = json<{ start: number; length: number; data: boolean; zero: boolean; depth: number }[]>(fvd('map', '--output=json', img));
  assert.is(map.reduce((n, e) => n + e.length, 0), 4 * MiB + 512, 'map covers the disk');
  // The default block over a base this small is 4 KiB: zeros are detected at that granularity.
  const block = 4 * KiB;
  const want = referenceZeroBlocks(base.bytes, base.bytes.length, block);
  for (let b = 0; b < want.length; b++) {
    const e = map.find((x) => x.start <= b * block && b * block < x.start + x.length)!;
    assert.is(e.depth === 0, want[b], `block ${b}: zero=${want[b]}, map entry ${JSON.stringify(e)}`);
  }
});

let holeSupportCache: boolean | null = null;
/** Whether SEEK_HOLE finds holes here (koffi present, a file system with holes); else the read bound is not checked. */
function holeSupport(dir: string): boolean {
  if (holeSupportCache !== null) return holeSupportCache;
  if (!libc()) return (holeSupportCache = false);
  const p = path.join(dir, 'probe.raw');
  fs.writeFileSync(p, '');
  fs.truncateSync(p, 8 * MiB);
  const fd = fs.openSync(p, 'r+');
  fs.writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, 4 * MiB);
  fs.closeSync(fd);
  const c = libc()!;
  const f = fs.openSync(p, 'r');
  try {
    holeSupportCache = c.lseek(f, 0, 3) === 4 * MiB && c.lseek(f, 4 * MiB, 4) === 4 * MiB + 4096;
  } finally {
    fs.closeSync(f);
    fs.rmSync(p);
  }
  return holeSupportCache;
}

test.after(() => tmp.cleanup());
test.run();
