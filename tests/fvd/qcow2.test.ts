/**
 * The qcow2 reader (fvd/qcow2.ts) against QEMU itself: images made by qemu-img/qemu-io with each
 * feature qemu-img writes, every byte read through fvd compared with `qemu-img convert -O raw`,
 * in pieces whose sizes and offsets do not line up with clusters. Known-zero answers come from
 * the tables and are checked against the data.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Qcow2Image } from '../../fvd/qcow2.js';
import { allowNativeZstd, registerZstdDecoder, zstdDecoderKind } from '../../fvd/qcow2-decompress.js';
import { nodeIo } from '../../storage/node-file.js';
import { FvdError } from '../../fvd/errors.js';
import { registerZstdFallback } from '../../daemon/zstd-fallback.js';
import { ReadCounter } from '../helpers/read-counter.js';
import { Rng } from '../helpers/rng.js';
import { rejectsOneLine } from '../helpers/rejects.js';
import { diskPattern, qemuImg, qemuIo, qemuRead, qemuTest, writeFile } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-qcow2-'));
let n = 0;
const name = (ext: string) => path.join(dir, `f${n++}.${ext}`);
registerZstdFallback();

/** Reads the whole image through fvd in pieces of random sizes (1 byte to 3 clusters), from a seeded Rng. */
async function readAll(img: Qcow2Image, seed: number): Promise<Buffer> {
  const out = Buffer.alloc(img.size);
  const r = new Rng(seed);
  const cs = img.header.clusterSize;
  for (let pos = 0; pos < img.size; ) {
    const len = Math.min(img.size - pos, r.chance(0.3) ? 1 + r.int(3 * cs) : r.chance(0.5) ? cs : 1 + r.int(512 * KiB));
    await img.read(out.subarray(pos, pos + len), pos);
    pos += len;
  }
  return out;
}

/** fvd's reading of `file` equals QEMU's, whole and in random pieces; returns the bytes. */
async function sameAsQemu(file: string, what: string, seed = 1): Promise<Buffer> {
  const want = qemuRead(file);
  const img = await Qcow2Image.open(nodeIo, path.resolve(file));
  try {
    assert.is(img.size, want.length, `${what}: size`);
    const whole = Buffer.alloc(img.size);
    await img.read(whole, 0);
    assert.ok(whole.equals(want), `${what}: one read of the whole disk differs from qemu-img convert`);
    assert.ok((await readAll(img, seed)).equals(want), `${what}: piecewise reads differ from qemu-img convert`);
    await knownZeroIsTrue(img, want, what);
  } finally {
    await img.close();
  }
  return want;
}

/** Every range knownZero calls zero reads as zeros; and some ranges are known zero when the data is. */
async function knownZeroIsTrue(img: Qcow2Image, data: Buffer, what: string): Promise<void> {
  const step = Math.max(img.header.clusterSize, 64 * KiB);
  for (let pos = 0; pos < img.size; pos += step) {
    const len = Math.min(step, img.size - pos);
    if (await img.knownZero(pos, len)) assert.ok(data.subarray(pos, pos + len).every((b) => b === 0), `${what}: knownZero(${pos}, ${len}) but data there`);
  }
}

/**
 * Many reads in flight at once on one image (as convert's read-ahead and a served device issue
 * them), overlapping, in random order, of random sizes: each equals QEMU's bytes there. Shares
 * compressed clusters between reads (the decompressed-cluster cache and the grouped reads).
 */
for (const [compression, clusterSize] of [['zlib', 4 * KiB], ['zlib', 64 * KiB], ['zstd', 64 * KiB]] as const) {
  qemuTest(`${compression}-compressed, ${clusterSize}-byte clusters: 400 overlapping concurrent reads in random order equal qemu-img convert`, async () => {
    const raw = writeFile(dir, `conc-${compression}-${clusterSize}.raw`, diskPattern(6 * MiB + 5 * KiB, clusterSize + 7));
    const q = name('qcow2');
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${clusterSize},compression_type=${compression}`, raw, q);
    const want = qemuRead(q);
    const img = await Qcow2Image.open(nodeIo, path.resolve(q));
    try {
      const r = new Rng(clusterSize + compression.length);
      const reads = Array.from({ length: 400 }, () => {
        const len = 1 + r.int(r.chance(0.5) ? 2 * clusterSize : 1 * MiB);
        const pos = r.int(img.size - len + 1);
        return { pos, buf: Buffer.alloc(len, 0xa5) };
      });
      await Promise.all(reads.map(({ pos, buf }) => img.read(buf, pos)));
      for (const { pos, buf } of reads) assert.ok(buf.equals(want.subarray(pos, pos + buf.length)), `read at ${pos}+${buf.length} differs from qemu-img convert`);
    } finally {
      await img.close();
    }
  });
}

/**
 * One read over compressed clusters fetches the streams of neighbours with one file read per
 * group: a run stored back to back, one cluster rewritten (its new stream at the end of the file,
 * not contiguous), a zero cluster and an unallocated one between them. Wrong offsets inside a
 * group read give wrong bytes; no grouping gives one file read per cluster.
 */
qemuTest('compressed clusters: neighbours on disk are read together, a rewritten one and zero clusters among them', async () => {
  const cs = 64 * KiB;
  const raw = writeFile(dir, 'groups.raw', diskPattern(2 * MiB, 4242));
  const q = name('qcow2');
  qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs}`, raw, q);
  // A compressed write cannot overwrite a cluster: discard it first, so its new stream lands at the end.
  qemuIo(q, 'discard 192k 64k', 'write -c -P 0x5a 192k 64k', 'write -z 320k 64k', 'discard 704k 64k');
  const want = qemuRead(q);
  assert.is(want[3 * cs], 0x5a, 'the rewritten cluster');
  const counter = new ReadCounter(nodeIo, q);
  const img = await Qcow2Image.open(counter, path.resolve(q));
  try {
    const buf = Buffer.alloc(MiB, 0xa5);
    const before = counter.reads;
    await img.read(buf, 0);
    assert.ok(buf.equals(want.subarray(0, MiB)), 'one read of 1 MiB differs from qemu-img convert');
    // 13 compressed clusters, in at most 4 runs on disk (0-2, 3 elsewhere, 4 and 6-10 behind
    // the old stream of 3, 12-15), plus one L2 table: far fewer reads than clusters.
    assert.ok(counter.reads - before <= 6, `${counter.reads - before} file reads for one read of 13 compressed clusters`);
    // Piecewise and at odd offsets too (groups of two, cached clusters skipped).
    assert.ok((await readAll(img, 7)).equals(want), 'piecewise reads differ from qemu-img convert');
  } finally {
    await img.close();
  }
});

for (const clusterSize of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
  qemuTest(`zlib-compressed (convert -c), ${clusterSize}-byte clusters: every byte equals qemu-img convert`, async () => {
    const raw = writeFile(dir, `c${clusterSize}.raw`, diskPattern(5 * MiB + 3 * KiB + 512, clusterSize));
    const q = name('qcow2');
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${clusterSize}`, raw, q);
    const got = await sameAsQemu(q, `zlib ${clusterSize}`, clusterSize);
    assert.ok(got.equals(fs.readFileSync(raw)), 'and equals the raw source');
  });
}

for (const clusterSize of [4 * KiB, 64 * KiB, 2 * MiB]) {
  qemuTest(`zstd-compressed (compression_type=zstd), ${clusterSize}-byte clusters, decoder ${zstdDecoderKind()}`, async () => {
    const raw = writeFile(dir, `z${clusterSize}.raw`, diskPattern(4 * MiB + 4 * KiB, 7 + clusterSize));
    const q = name('qcow2');
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${clusterSize},compression_type=zstd`, raw, q);
    assert.match(qemuImg('info', q), /compression type: zstd/);
    await sameAsQemu(q, `zstd ${clusterSize}`, clusterSize);
  });
}

qemuTest('zstd: the registered decoder (the system libzstd), on this thread and in decode workers, and the refusal without any decoder', async () => {
  const raw = writeFile(dir, 'zr.raw', diskPattern(2 * MiB, 99));
  const q = name('qcow2');
  qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd', raw, q);
  allowNativeZstd(false); // on Node with zstd of its own, exercise the fallback too
  try {
    assert.is(zstdDecoderKind(), 'registered');
    await sameAsQemu(q, 'zstd via the registered decoder');
    // 2 MiB clusters: above SYNC_DECODE_MAX, decoded whole on this thread into a new buffer.
    const big = name('qcow2');
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=2M,compression_type=zstd', writeFile(dir, 'zr2.raw', diskPattern(6 * MiB, 98)), big);
    await sameAsQemu(big, 'zstd via the registered decoder, 2 MiB clusters');
    registerZstdDecoder(null);
    assert.is(zstdDecoderKind(), null);
    await rejectsOneLine(Qcow2Image.open(nodeIo, q), FvdError, /uses zstd compression, which Node .* cannot decompress/, 'zstd without a decoder');
  } finally {
    allowNativeZstd(true);
    registerZstdFallback();
  }
});

qemuTest('uncompressed, default options: qemu-io writes, write -z zero clusters, discards', async () => {
  const q = name('qcow2');
  qemuImg('create', '-f', 'qcow2', q, '8M');
  qemuIo(q, 'write -P 0x11 0 200k', 'write -P 0x22 1000k 64k', 'write -z 64k 64k', 'write -P 0x33 7M 1M', 'discard 7M 64k', 'write -P 0x44 3000k 513');
  const got = await sameAsQemu(q, 'plain');
  assert.is(got[0], 0x11);
  assert.is(got[64 * KiB], 0, 'write -z');
  const img = await Qcow2Image.open(nodeIo, q);
  assert.ok(await img.knownZero(64 * KiB, 64 * KiB), 'a zero cluster is known zero from the table');
  assert.ok(await img.knownZero(2 * MiB, 512 * KiB), 'unallocated clusters without a backing file are known zero');
  assert.not.ok(await img.knownZero(0, 64 * KiB), 'an allocated cluster is not');
  await img.close();
});

qemuTest('preallocation=metadata: allocated clusters never written read as zeros', async () => {
  const q = name('qcow2');
  qemuImg('create', '-f', 'qcow2', '-o', 'preallocation=metadata', q, '4M');
  qemuIo(q, 'write -P 0x5a 1M 100k');
  await sameAsQemu(q, 'preallocated');
});

qemuTest('compat=0.10 (version 2), 4 KiB clusters, over a raw backing file', async () => {
  const base = writeFile(dir, 'v2base.raw', diskPattern(3 * MiB, 5));
  const q = name('qcow2');
  qemuImg('create', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', '-b', base, '-F', 'raw', q, '4M');
  qemuIo(q, 'write -P 0x77 10k 20k', 'write -z 100k 8k', 'write -P 0x78 3M 12k');
  const img = await Qcow2Image.open(nodeIo, q);
  assert.is(img.header.version, 2);
  await img.close();
  const got = await sameAsQemu(q, 'v2');
  // The raw base is shorter than the disk: past its end, unwritten clusters read as zeros.
  assert.ok(got.subarray(3 * MiB + 12 * KiB).every((b) => b === 0));
});

for (const clusterSize of [16 * KiB, 64 * KiB, 2 * MiB]) {
  qemuTest(`extended_l2=on, ${clusterSize}-byte clusters: subclusters allocated, zero and from the backing file`, async () => {
    const base = writeFile(dir, `xb${clusterSize}.raw`, diskPattern(6 * MiB, 11));
    const q = name('qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `extended_l2=on,cluster_size=${clusterSize}`, '-b', base, '-F', 'raw', q, '6M');
    const sc = clusterSize / 32;
    qemuIo(q, `write -P 0x61 ${sc} ${sc}`, `write -z ${3 * sc} ${2 * sc}`, `write -P 0x62 ${5 * sc + 100} 700`, `write -P 0x63 ${clusterSize - sc} ${2 * sc}`, `write -z 4M ${sc}`);
    const img = await Qcow2Image.open(nodeIo, q);
    assert.ok(img.header.extendedL2);
    assert.ok(await img.knownZero(3 * sc, 2 * sc), 'zero subclusters are known zero');
    assert.not.ok(await img.knownZero(0, sc), 'a subcluster read from a backing file with data is not');
    await img.close();
    await sameAsQemu(q, `extended L2 ${clusterSize}`, clusterSize);
  });
}

qemuTest('extended_l2=on without a backing file, compressed clusters among subclusters', async () => {
  const raw = writeFile(dir, 'xc.raw', diskPattern(3 * MiB, 12));
  const q = name('qcow2');
  qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'extended_l2=on', raw, q);
  qemuIo(q, 'write -P 0x66 4k 4k', 'write -z 200k 2k');
  await sameAsQemu(q, 'extended L2 + compressed');
});

qemuTest('a qcow2 chain: raw ← qcow2 (compressed) ← qcow2 ← qcow2, with writes and zero clusters over backing data', async () => {
  const raw = writeFile(dir, 'chain0.raw', diskPattern(4 * MiB, 21));
  const mid = name('qcow2');
  qemuImg('create', '-f', 'qcow2', '-b', raw, '-F', 'raw', mid, '6M');
  qemuIo(mid, 'write -c -P 0x31 0 64k', 'write -P 0x32 1M 300k', 'write -z 2M 128k', 'write -P 0x33 5M 64k');
  const upper = name('qcow2');
  qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=32k', '-b', path.basename(mid), '-F', 'qcow2', upper);
  qemuIo(upper, 'write -P 0x41 32k 32k', 'write -z 1M 64k', 'write -P 0x42 2M 4k', 'discard 5M 32k');
  const top = name('qcow2');
  qemuImg('create', '-f', 'qcow2', '-o', 'compat=0.10', '-b', upper, '-F', 'qcow2', top);
  qemuIo(top, 'write -P 0x51 3M 1k');
  const got = await sameAsQemu(top, 'chain');
  assert.is(got[1 * MiB + 10], 0, 'write -z in the upper level hides the level below');
  const img = await Qcow2Image.open(nodeIo, top);
  assert.equal(
    img.describe().map((e) => [path.basename(e.path), e.format, e.size]),
    [
      [path.basename(top), 'qcow2', 6 * MiB],
      [path.basename(upper), 'qcow2', 6 * MiB],
      [path.basename(mid), 'qcow2', 6 * MiB],
      [path.basename(raw), 'raw', 4 * MiB],
    ],
  );
  assert.ok(await img.knownZero(1 * MiB, 64 * KiB), 'zero clusters of a lower level are known zero through the chain');
  assert.not.ok(await img.knownZero(0, 64 * KiB));
  await img.close();
});

qemuTest('external data file (data_file, data_file_raw): read through the tables', async () => {
  for (const rawFlag of ['off', 'on']) {
    const q = name('qcow2');
    // Absolute: QEMU resolves a relative data file name against its working directory (fvd: the image's).
    qemuImg('create', '-f', 'qcow2', '-o', `data_file=${q}.data,data_file_raw=${rawFlag}`, q, '4M');
    qemuIo(q, 'write -P 0x71 0 100k', 'write -z 1M 64k', 'write -P 0x72 3M 5k');
    await sameAsQemu(q, `data file raw=${rawFlag}`);
  }
});

qemuTest('internal snapshots, persistent bitmaps, lazy refcounts (closed cleanly): the active state reads', async () => {
  const q = name('qcow2');
  qemuImg('create', '-f', 'qcow2', '-o', 'lazy_refcounts=on', q, '4M');
  qemuIo(q, 'write -P 0x81 0 1M');
  qemuImg('snapshot', '-c', 'snap1', q);
  qemuIo(q, 'write -P 0x82 512k 1M');
  qemuImg('bitmap', '--add', q, 'bm0');
  const got = await sameAsQemu(q, 'snapshots + bitmaps');
  assert.is(got[0], 0x81);
  assert.is(got[600 * KiB], 0x82);
});

qemuTest('a 1 GiB sparse image with 512-byte clusters: a bounded L2 cache still reads right', async () => {
  const q = name('qcow2');
  qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=512', q, '1G');
  const writes: string[] = [];
  for (let i = 0; i < 64; i++) writes.push(`write -P ${(i % 250) + 1} ${i * 16 * MiB + i * 512} 1k`);
  qemuIo(q, ...writes);
  const img = await Qcow2Image.open(nodeIo, q, { l2CacheBytes: 4 * KiB });
  const buf = Buffer.alloc(3 * KiB);
  for (let round = 0; round < 2; round++)
    for (let i = 0; i < 64; i++) {
      const off = i * 16 * MiB + i * 512;
      await img.read(buf, off);
      const want = Buffer.alloc(3 * KiB);
      want.fill((i % 250) + 1, 0, 1024); // what qemu-io wrote there; zeros after it
      assert.ok(buf.equals(want), `write ${i}`);
      assert.ok(img.l2CacheBytes() <= 4 * KiB, `cache bounded (${img.l2CacheBytes()})`);
    }
  assert.ok(await img.knownZero(64 * KiB, 15 * MiB));
  assert.not.ok(await img.knownZero(16 * MiB, 64 * KiB));
  await img.close();
});

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));
test.run();
