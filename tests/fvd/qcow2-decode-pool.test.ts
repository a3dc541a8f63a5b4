/**
 * Compressed qcow2 clusters decoded in batches on worker threads (fvd/qcow2-decode-pool.ts), as
 * large reads do, and on the calling thread by one reused decoder per kind (fvd/decode-into.ts): batches
 * split a read at cluster boundaries, reads start and end inside clusters, a corrupt cluster fails
 * the read with one line naming it on either path (and later reads go on), a worker that dies
 * fails its read with one line, after which new workers take over. Every byte is compared with
 * `qemu-img convert -O raw`. Until a worker has loaded, reads decode on the calling thread; zstd
 * goes to the workers with Node's own decoder or the CLI's libzstd one (Node 20), whose
 * workers start from their own entry.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Qcow2Image, WORKER_MIN_CLUSTERS } from '../../fvd/qcow2.js';
import { allowReusedDecoders } from '../../fvd/decode-into.js';
import { registerZstdDecoder, workerZstd } from '../../fvd/qcow2-decompress.js';
import { registerZstdFallback } from '../../daemon/zstd-fallback.js';
import { BATCH_BYTES, decodeWorkerCount, exitNextWorkerForTest, poolSize, startDecodeWorkers, stopDecodeWorkers } from '../../fvd/qcow2-decode-pool.js';
import { nodeIo } from '../../storage/node-file.js';
import { FvdError } from '../../fvd/errors.js';
import { rejectsOneLine } from '../helpers/rejects.js';
import { l2EntryAt, layout, readU64, write } from '../helpers/qcow2-tamper.js';
import { diskPattern, qemuImg, qemuRead, qemuTest, writeFile } from '../helpers/qemu.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const cs = 64 * KiB;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-qcow2-pool-'));
let n = 0;

/** A 3 MiB disk (48 clusters of 64 KiB, every one stored compressed) and its bytes as QEMU reads them. */
function template(opts: string): { q: string; want: Buffer } {
  const data = diskPattern(3 * MiB, 17 + n);
  // Text in every cluster's first 4 KiB: no cluster is all zeros or left uncompressed.
  for (let c = 0; c < 48; c++) data.write(`cluster ${c} `.repeat(300), c * cs, 4 * KiB, 'latin1');
  const raw = writeFile(dir, `t${n}.raw`, data);
  const q = path.join(dir, `t${n++}.qcow2`);
  qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs},${opts}`, raw, q);
  const want = qemuRead(q);
  assert.ok(want.equals(data), 'qemu-img reads back the source');
  return { q, want };
}

/** The host offset of guest cluster `c`'s compressed stream. */
function streamAt(q: string, c: number): number {
  const shift = BigInt(62 - (layout(q).clusterBits - 8));
  const v = readU64(q, l2EntryAt(q, c * cs));
  assert.is(v >> 62n, 1n, `guest cluster ${c} is stored compressed`);
  return Number(v & ((1n << shift) - 1n));
}

async function readRange(img: Qcow2Image, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length, 0xa5);
  await img.read(b, offset);
  return b;
}

qemuTest('decode workers: batches of a read split at cluster boundaries, reads starting and ending inside clusters equal qemu-img', async () => {
  const { q, want } = template('compression_type=zlib');
  // 48 clusters in one read: more than one batch (BATCH_BYTES, and split across the workers).
  assert.ok(48 > Math.min(BATCH_BYTES / cs, Math.ceil(48 / poolSize())), 'a whole read takes several batches');
  const img = await Qcow2Image.open(nodeIo, path.resolve(q));
  try {
    await stopDecodeWorkers();
    await startDecodeWorkers();
    assert.ok((await readRange(img, 0, 3 * MiB)).equals(want), 'the whole disk in one read');
    assert.ok(decodeWorkerCount() > 0, 'the read decoded on workers');
    // Inside the first and last cluster: partial members at both ends of the batches.
    assert.ok((await readRange(img, 100, 3 * MiB - 300)).equals(want.subarray(100, 3 * MiB - 200)), 'a read from inside cluster 0 to inside cluster 47');
    // Reads of every length from WORKER_MIN_CLUSTERS to 20 clusters, at odd offsets, so batch
    // boundaries fall at every member index.
    for (let k = WORKER_MIN_CLUSTERS; k <= 20; k++) {
      const off = (k * 7 % 23) * cs + 513 * k;
      const len = Math.min(3 * MiB - off, (k - 1) * cs + 1);
      assert.ok((await readRange(img, off, len)).equals(want.subarray(off, off + len)), `${len} bytes at ${off}`);
    }
    // Many at once: batches of different reads interleave on the workers.
    const offs = Array.from({ length: 12 }, (_, i) => (i * 5 % 40) * cs + 3 * i);
    const got = await Promise.all(offs.map((o) => readRange(img, o, 6 * cs)));
    offs.forEach((o, i) => assert.ok(got[i]!.equals(want.subarray(o, o + 6 * cs)), `concurrent read at ${o}`));
    // Whole reads at once: the calling thread's share of one read decodes in slices, yielding,
    // while the workers finish the others and their shared buffers go back to be reused.
    // Four readers, each reading the whole disk again and again, start at different moments.
    await Promise.all(
      Array.from({ length: 4 }, async (_, k) => {
        const b = Buffer.alloc(3 * MiB);
        for (let i = 0; i < 6; i++) {
          await img.read(b.subarray(k * 4096), k * 4096);
          assert.ok(b.subarray(k * 4096).equals(want.subarray(k * 4096)), `reader ${k}, pass ${i}`);
        }
      }),
    );
  } finally {
    await img.close();
  }
});

qemuTest('a corrupt cluster, on a worker (mid-batch) or on the calling thread, fails the read with one line naming it; other reads go on', async () => {
  const { q, want } = template('compression_type=zlib');
  // Cluster 37: in the workers' share of a whole read (the calling thread takes the first clusters).
  write(q, streamAt(q, 37), Buffer.alloc(64, 0xff));
  const img = await Qcow2Image.open(nodeIo, path.resolve(q));
  const bad = /corrupt qcow2 image: compressed cluster of guest cluster 37 \(offset 2424832, data at \d+\) does not decompress \(zlib: /;
  try {
    const err = await rejectsOneLine(readRange(img, 0, 3 * MiB), FvdError, bad, 'garbage in cluster 37, whole read');
    assert.ok(err.message.includes(path.basename(q)), 'names the file');
    await rejectsOneLine(readRange(img, 30 * cs, 10 * cs), FvdError, bad, 'clusters 30-39');
    // Two clusters: decoded on the calling thread.
    await rejectsOneLine(readRange(img, 36 * cs, 2 * cs), FvdError, bad, 'clusters 36-37');
    // Its neighbours and the rest still read, on both paths (a decoder that failed is replaced).
    assert.ok((await readRange(img, 36 * cs, cs)).equals(want.subarray(36 * cs, 37 * cs)), 'cluster 36');
    assert.ok((await readRange(img, 38 * cs, 10 * cs)).equals(want.subarray(38 * cs, 48 * cs)), 'clusters 38-47');
    assert.ok((await readRange(img, 0, 37 * cs)).equals(want.subarray(0, 37 * cs)), 'clusters 0-36');
  } finally {
    await img.close();
  }
});

qemuTest('the calling thread\'s inflate without node\'s internals (inflateRawSync): same bytes, same errors', async () => {
  const { q, want } = template('compression_type=zlib');
  allowReusedDecoders(false);
  try {
    let img = await Qcow2Image.open(nodeIo, path.resolve(q));
    try {
      for (let pos = 0; pos < 3 * MiB; pos += 2 * cs) assert.ok((await readRange(img, pos, 2 * cs)).equals(want.subarray(pos, pos + 2 * cs)), `clusters at ${pos}`);
    } finally {
      await img.close();
    }
    write(q, streamAt(q, 5), Buffer.alloc(64, 0xff));
    img = await Qcow2Image.open(nodeIo, path.resolve(q));
    try {
      await rejectsOneLine(readRange(img, 4 * cs, 2 * cs), FvdError, /guest cluster 5 .* does not decompress \(zlib: /, 'garbage in cluster 5');
    } finally {
      await img.close();
    }
  } finally {
    allowReusedDecoders(true);
  }
});

qemuTest('decode workers: a worker that dies fails its read with one line; new workers take the next read', async () => {
  const { q, want } = template('compression_type=zlib');
  const img = await Qcow2Image.open(nodeIo, path.resolve(q));
  try {
    await startDecodeWorkers();
    exitNextWorkerForTest(7);
    await rejectsOneLine(readRange(img, 0, 3 * MiB), FvdError, /qcow2 decode worker exited \(code 7\)/, 'a worker exits');
    assert.ok((await readRange(img, 0, 3 * MiB)).equals(want), 'read again (on this thread while a new worker loads)');
    assert.ok(decodeWorkerCount() > 0, 'a new worker started');
    await startDecodeWorkers();
    assert.ok((await readRange(img, 0, 3 * MiB)).equals(want), 'read again by the new worker');
  } finally {
    await img.close();
  }
});

// Node 20 has no zstd of its own: the CLI's decoder (libzstd), on this thread and in workers.
registerZstdFallback();
for (const type of ['zlib', 'zstd']) {
  qemuTest(`${type}: until a decode worker has loaded, a whole read decodes on the calling thread; then on the worker`, async () => {
    const { q, want } = template(`compression_type=${type}`);
    const img = await Qcow2Image.open(nodeIo, path.resolve(q));
    try {
      await stopDecodeWorkers();
      // A worker that takes a batch exits: the first read must not give it one.
      exitNextWorkerForTest(7);
      assert.ok((await readRange(img, 0, 3 * MiB)).equals(want), 'the first read, before any worker has loaded');
      if (type === 'zstd') assert.ok(workerZstd(), 'workers decode zstd (Node\'s own decoder, or the registered one)');
      assert.is(decodeWorkerCount(), 1, 'the read started a worker');
      await startDecodeWorkers();
      await rejectsOneLine(readRange(img, 0, 3 * MiB), FvdError, /qcow2 decode worker exited \(code 7\)/, 'the next read went to the worker');
      assert.ok((await readRange(img, 0, 3 * MiB)).equals(want), 'read again');
    } finally {
      exitNextWorkerForTest(0);
      await img.close();
    }
  });
}

qemuTest('a zstd decoder registered after a worker started: that worker is retired, zstd goes to one started from the decoder\'s entry', async () => {
  const { q, want } = template('compression_type=zstd');
  registerZstdDecoder(null);
  try {
    await stopDecodeWorkers();
    await startDecodeWorkers(); // from the engine's entry: no zstd on Node 20
    assert.is(decodeWorkerCount(), 1);
  } finally {
    registerZstdFallback();
  }
  const img = await Qcow2Image.open(nodeIo, path.resolve(q));
  try {
    assert.ok((await readRange(img, 0, 3 * MiB)).equals(want), 'the first read after registering');
    await startDecodeWorkers();
    assert.is(decodeWorkerCount(), 1, 'the old worker left the pool, a new one took its place');
    exitNextWorkerForTest(7);
    await rejectsOneLine(readRange(img, 0, 3 * MiB), FvdError, /qcow2 decode worker exited \(code 7\)/, 'the next read went to a worker');
    // On Node 20 the retired worker has no zstd: a batch sent there would fail, not decode.
    assert.ok((await readRange(img, 0, 3 * MiB)).equals(want), 'read again, by a new worker');
  } finally {
    exitNextWorkerForTest(0);
    await img.close();
  }
});

test.after(async () => {
  await stopDecodeWorkers();
  fs.rmSync(dir, { recursive: true, force: true });
});

test.run();
