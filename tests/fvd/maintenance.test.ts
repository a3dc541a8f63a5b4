/**
 * commit, rebase and resize through the engine API (fvd/maintenance.ts), in memory: every case
 * reopens the image (and its base) after the operation and compares whole virtual disks, checks
 * the header fields the operation switched, and runs checkImage. Base chains: depth ≥ 3, loops,
 * missing images. docs/FORMAT.md §12.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { commitImage, rebaseImage, resizeImage } from '../../fvd/maintenance.js';
import { checkImage } from '../../fvd/check.js';
import { FvdError } from '../../fvd/errors.js';
import {
  AUTOCLEAR_FULLY_LOCAL,
  BASE_FVD,
  BASE_NONE,
  BASE_RAW,
  HEADER_SIZE,
  PAGE,
  bitmapBytes,
  crc,
  decodeHeader,
  encodeHeader,
  type Header,
} from '../../fvd/format.js';
import type { BlockFile, IoBackend, OpenOptions } from '../../fvd/io.js';
import { MemIo } from '../helpers/mem-io.js';
import { Rng } from '../helpers/rng.js';
import { firstMismatch, readWholeDisk } from '../helpers/model.js';
import { rejectsOneLine } from '../helpers/rejects.js';

const KiB = 1024;
const MiB = 1024 * 1024;

function pattern(n: number, seed: number): Uint8Array {
  const b = new Rng(seed).bytes(n);
  for (let i = 0; i < n; i += 509) b[i] = b[i]! | 1; // no all-zero blocks by accident
  return b;
}

async function create(io: IoBackend, p: string, o: CreateOptions): Promise<void> {
  await FvdImage.create(io, p, { journalSize: 64 * KiB, ...o });
}

/** A whole disk: an FVD image through the engine, a raw file as it is. */
async function readDisk(io: MemIo, p: string): Promise<Uint8Array> {
  return p.endsWith('.raw') ? io.readFile(p) : readWholeDisk(io, p);
}

async function writeAt(io: IoBackend, p: string, parts: Array<[number, Uint8Array]>): Promise<void> {
  const img = await FvdImage.open(io, p, { copyOnRead: false });
  try {
    for (const [off, data] of parts) await img.write(data, off);
  } finally {
    await img.close();
  }
}

async function statsOf(io: IoBackend, p: string) {
  const img = await FvdImage.open(io, p, { readOnly: true });
  try {
    return img.stats();
  } finally {
    await img.close();
  }
}

function headerOf(io: MemIo, p: string): Header {
  const bytes = io.readFile(p);
  return decodeHeader(p, bytes.subarray(0, HEADER_SIZE), bytes.length);
}

function same(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.is(actual.length, expected.length, `${what}: length`);
  const m = firstMismatch(expected, actual, 0);
  assert.ok(m === undefined, `${what}: ${m}`);
}

async function clean(io: IoBackend, p: string): Promise<void> {
  const r = await checkImage(io, p);
  assert.equal(r.errors, [], `check ${p}`);
  assert.is(r.leaks, 0, `check ${p}: leaked chunks`);
}

/** `anyError`: MemIo's own errors (a missing file, a lock held) are not FvdErrors. */
async function rejects(p: Promise<unknown>, re: RegExp, anyError = false): Promise<FvdError> {
  return (await rejectsOneLine(p, anyError ? Error : FvdError, re, `expected a rejection matching ${re}`)) as FvdError;
}

/** Byte-for-byte snapshot of every file, to prove a refused operation changed nothing. */
function files(io: MemIo): Map<string, string> {
  const m = new Map<string, string>();
  for (const [k, v] of io.snapshot()) m.set(k, Buffer.from(v).toString('base64'));
  return m;
}

const LAYOUTS = ['raw', 'compact'] as const;

// ------------------------------------------------------------------------------------------------
// commit

for (const layout of LAYOUTS) {
  for (const baseKind of ['raw', 'fvd'] as const) {
    test(`commit (${layout} image, ${baseKind} base): base gets the data, image is emptied, both reopen`, async () => {
      const io = new MemIo();
      const V = 1 * MiB;
      const baseData = pattern(V, 1);
      baseData.fill(0, 192 * KiB, 256 * KiB);
      let base = '/c/base.raw';
      if (baseKind === 'raw') {
        io.writeFile(base, baseData);
      } else {
        // An FVD base over a raw one: the commit writes into the middle of a 3-level chain.
        io.writeFile('/c/bottom.raw', baseData);
        base = '/c/mid.fvd';
        await create(io, base, { base: 'bottom.raw', baseFormat: 'raw', layout: 'compact', blockSize: 16 * KiB, chunkSize: 64 * KiB });
      }
      const img = '/c/top.fvd';
      await create(io, img, { base: base.slice(3), baseFormat: baseKind, layout, blockSize: 4 * KiB, chunkSize: 64 * KiB });
      await writeAt(io, img, [
        [0, pattern(4 * KiB, 2)],
        [10 * KiB + 512, pattern(3 * KiB, 3)], // partial blocks: copy-on-write
        [200 * KiB, new Uint8Array(8 * KiB)], // zeros over a zero base range: nothing to write
        [300 * KiB, new Uint8Array(8 * KiB)], // zeros over data
        [V - 4 * KiB, pattern(4 * KiB, 4)],
      ]);
      const expected = await readWholeDisk(io, img);
      const r = await commitImage(io, img);
      assert.is(r.emptied, true);
      assert.is(r.baseGrownTo, null);
      assert.ok(r.bytesWritten > 0 && r.bytesWritten < r.bytesExamined, `written ${r.bytesWritten} of ${r.bytesExamined}`);
      same(await readWholeDisk(io, img), expected, 'image after commit');
      same(await readDisk(io, base), expected, 'base after commit');
      if (baseKind === 'fvd') same(io.readFile('/c/bottom.raw'), baseData, 'the bottom of the chain is untouched');
      const st = await statsOf(io, img);
      assert.is(st.bytesInBase, V, 'everything reads from the base');
      assert.is(st.fullyLocal, false);
      assert.is(st.zeroDetected, false);
      const h = headerOf(io, img);
      if (layout === 'compact') {
        assert.is(st.allocatedChunks, 0);
        assert.is(io.readFile(img).length, h.dataOffset, 'compact: all chunks returned');
      } else {
        assert.ok(io.readFile(img).subarray(h.dataOffset).every((x) => x === 0), 'raw-like: data area punched');
      }
      await clean(io, img);
      if (baseKind === 'fvd') await clean(io, base);
      // The emptied image still works: a write goes local again.
      await writeAt(io, img, [[4096, pattern(512, 9)]]);
      expected.set(pattern(512, 9), 4096);
      same(await readWholeDisk(io, img), expected, 'image written after commit');
      assert.is(io.openCount, 0, 'no leaked handles');
    });
  }
}

for (const baseKind of ['raw', 'fvd'] as const) {
  test(`commit grows a smaller ${baseKind} base to the image's size (data past the base's end)`, async () => {
    const io = new MemIo();
    const B = 100 * KiB + 512; // not block-aligned: the last base block straddles its end
    const V = 1 * MiB;
    const baseData = pattern(B, 5);
    let base = '/g/base.raw';
    if (baseKind === 'raw') io.writeFile(base, baseData);
    else {
      base = '/g/base.fvd';
      await create(io, base, { size: B, layout: 'raw', blockSize: 4 * KiB });
      await writeAt(io, base, [[0, baseData]]);
    }
    const img = '/g/img.fvd';
    await create(io, img, { base: base.slice(3), baseFormat: baseKind, size: V, layout: 'compact', blockSize: 8 * KiB, chunkSize: 64 * KiB });
    await writeAt(io, img, [
      [96 * KiB, pattern(2 * KiB, 6)],
      [512 * KiB, pattern(64 * KiB, 7)],
      [V - 512, pattern(512, 8)],
    ]);
    const expected = await readWholeDisk(io, img);
    const r = await commitImage(io, img);
    assert.is(r.baseGrownTo, V);
    const h = headerOf(io, img);
    assert.is(h.baseSize, V);
    assert.is(h.baseSizeNext, 0);
    assert.ok(h.bitmapLength >= bitmapBytes(V, h.blockSize));
    same(await readDisk(io, base), expected, 'grown base');
    same(await readWholeDisk(io, img), expected, 'image');
    assert.is((await statsOf(io, img)).bytesInBase, V);
    await clean(io, img);
    if (baseKind === 'fvd') await clean(io, base);
  });
}

test('commit -d (keep): the base gets the data, the image keeps it too', async () => {
  const io = new MemIo();
  io.writeFile('/k/base.raw', pattern(256 * KiB, 1));
  await create(io, '/k/img.fvd', { base: 'base.raw', baseFormat: 'raw', blockSize: 4 * KiB });
  await writeAt(io, '/k/img.fvd', [[8 * KiB, pattern(8 * KiB, 2)]]);
  const before = await statsOf(io, '/k/img.fvd');
  const expected = await readWholeDisk(io, '/k/img.fvd');
  const r = await commitImage(io, '/k/img.fvd', { keep: true });
  assert.is(r.emptied, false);
  same(io.readFile('/k/base.raw'), expected, 'base');
  const after = await statsOf(io, '/k/img.fvd');
  assert.is(after.bytesLocal, before.bytesLocal);
  same(await readWholeDisk(io, '/k/img.fvd'), expected, 'image');
});

test('commit of a fully local image writes everything that differs and clears FULLY_LOCAL', async () => {
  const io = new MemIo();
  const V = 128 * KiB;
  io.writeFile('/f/base.raw', pattern(V, 1));
  await create(io, '/f/img.fvd', { base: 'base.raw', baseFormat: 'raw', blockSize: 4 * KiB, layout: 'compact', chunkSize: 16 * KiB });
  const img = await FvdImage.open(io, '/f/img.fvd', { copyOnRead: false });
  await img.write(pattern(V, 2), 0);
  assert.ok(await img.markFullyLocal());
  await img.close();
  assert.ok(headerOf(io, '/f/img.fvd').autoclear & AUTOCLEAR_FULLY_LOCAL);
  await commitImage(io, '/f/img.fvd');
  same(io.readFile('/f/base.raw'), pattern(V, 2), 'base');
  same(await readWholeDisk(io, '/f/img.fvd'), pattern(V, 2), 'image');
  assert.is(headerOf(io, '/f/img.fvd').autoclear & AUTOCLEAR_FULLY_LOCAL, 0n);
  assert.is((await statsOf(io, '/f/img.fvd')).bytesInBase, V);
});

test('commit of a dirty image (not closed cleanly) replays its journal first', async () => {
  const io = new MemIo();
  io.writeFile('/d/base.raw', pattern(256 * KiB, 1));
  await create(io, '/d/img.fvd', { base: 'base.raw', baseFormat: 'raw', blockSize: 4 * KiB, layout: 'compact', chunkSize: 16 * KiB });
  const img = await FvdImage.open(io, '/d/img.fvd', { copyOnRead: false });
  await img.write(pattern(12 * KiB, 2), 40 * KiB);
  await img.flush();
  await img.abandon(); // a crash: DIRTY set, the bits only in the journal
  assert.ok(headerOf(io, '/d/img.fvd').incompatible & 1n);
  const expected = pattern(256 * KiB, 1);
  expected.set(pattern(12 * KiB, 2), 40 * KiB);
  await commitImage(io, '/d/img.fvd');
  same(io.readFile('/d/base.raw'), expected, 'base');
  same(await readWholeDisk(io, '/d/img.fvd'), expected, 'image');
  await clean(io, '/d/img.fvd');
});

test('an interrupted commit (base about to grow): the image opens with the base at either size, check says so, commit again finishes', async () => {
  const io = new MemIo();
  const B = 64 * KiB;
  const V = 256 * KiB;
  io.writeFile('/i/base.raw', pattern(B, 1));
  await create(io, '/i/img.fvd', { base: 'base.raw', baseFormat: 'raw', size: V, blockSize: 4 * KiB, layout: 'compact', chunkSize: 16 * KiB });
  await writeAt(io, '/i/img.fvd', [[100 * KiB, pattern(8 * KiB, 2)]]);
  const expected = await readWholeDisk(io, '/i/img.fvd');
  // The base cannot grow (a full disk, say): commit stops after step A.
  const failing: IoBackend = {
    open: async (p, o) => {
      const f = await io.open(p, o);
      if (MemIo.key(p) !== MemIo.key('/i/base.raw')) return f;
      return Object.assign(Object.create(f) as BlockFile, {
        truncate: () => Promise.reject(Object.assign(new Error('no space left on device'), { code: 'ENOSPC' })),
        size: () => f.size(),
        close: () => f.close(),
      });
    },
  };
  await commitImage(failing, '/i/img.fvd').then(
    () => assert.unreachable('commit should fail'),
    (err: Error) => assert.match(err.message, /no space left/),
  );
  assert.is(io.openCount, 0);
  const h = headerOf(io, '/i/img.fvd');
  assert.is(h.baseSize, B);
  assert.is(h.baseSizeNext, V);
  same(await readWholeDisk(io, '/i/img.fvd'), expected, 'base not grown yet');
  const r = await checkImage(io, '/i/img.fvd');
  assert.equal(r.errors, []);
  assert.match(r.notes.join('\n'), /a commit was interrupted while growing the base to 262144 bytes; run 'fvd commit' again/);
  // The base at the next size is accepted too (read as base_size bytes); any other size is not.
  const grown = new Uint8Array(V);
  grown.set(pattern(B, 1));
  grown.fill(0x5a, B); // bytes past base_size never show
  io.writeFile('/i/base.raw', grown);
  same(await readWholeDisk(io, '/i/img.fvd'), expected, 'base grown, header not switched yet');
  io.writeFile('/i/base.raw', grown.subarray(0, V - 512));
  await rejects(readWholeDisk(io, '/i/img.fvd'), /base image 'base\.raw' is 261632 bytes but was 65536 bytes/);
  io.writeFile('/i/base.raw', grown.subarray(0, B));
  await commitImage(io, '/i/img.fvd');
  same(io.readFile('/i/base.raw'), expected, 'base after the second commit');
  const h2 = headerOf(io, '/i/img.fvd');
  assert.is(h2.baseSize, V);
  assert.is(h2.baseSizeNext, 0);
  assert.equal((await checkImage(io, '/i/img.fvd')).notes, []);
});

/** An IoBackend that refuses read-write opens of one path, like a read-only file or mount. */
function readOnlyFile(inner: IoBackend, p: string): IoBackend {
  return {
    open: (q: string, o?: OpenOptions): Promise<BlockFile> => {
      if (MemIo.key(q) === MemIo.key(p) && !o?.readOnly) {
        const err = new Error(`${q}: permission denied`) as NodeJS.ErrnoException;
        err.code = 'EACCES';
        return Promise.reject(err);
      }
      return inner.open(q, o);
    },
  };
}

test('commit refusals change nothing: no base, read-only base, locked base, wrong base size, locked image', async () => {
  const io = new MemIo();
  io.writeFile('/r/base.raw', pattern(64 * KiB, 1));
  await create(io, '/r/img.fvd', { base: 'base.raw', baseFormat: 'raw', size: 128 * KiB, blockSize: 4 * KiB });
  await writeAt(io, '/r/img.fvd', [[100 * KiB, pattern(4 * KiB, 2)]]);
  await create(io, '/r/plain.fvd', { size: 64 * KiB });
  const before = files(io);
  await rejects(commitImage(io, '/r/plain.fvd'), /plain\.fvd: has no base image to commit into/);
  await rejects(commitImage(readOnlyFile(io, '/r/base.raw'), '/r/img.fvd'), /base image 'base\.raw' is read-only \(EACCES\): cannot commit into it/);
  const holder = await io.open('/r/base.raw', { lock: 'shared' }); // someone reads through it
  await rejects(commitImage(io, '/r/img.fvd'), /base image 'base\.raw' is in use by another process \(locked\)/);
  await holder.close();
  const served = await FvdImage.open(io, '/r/img.fvd');
  await rejects(commitImage(io, '/r/img.fvd'), /img\.fvd: locked/, true);
  await served.close();
  assert.equal(files(io), before, 'refused commits changed a file');
  io.writeFile('/r/base.raw', pattern(60 * KiB, 1));
  const before2 = files(io);
  await rejects(commitImage(io, '/r/img.fvd'), /base image 'base\.raw' is 61440 bytes but was 65536 bytes/);
  io.files.delete(MemIo.key('/r/base.raw'));
  await rejects(commitImage(io, '/r/img.fvd'), /base image 'base\.raw' not found/);
  io.writeFile('/r/base.raw', pattern(60 * KiB, 1));
  assert.equal(files(io), before2);
  assert.is(io.openCount, 0);
});

test('commit and rebase skip ranges known to be zero on both sides (holes) without reading them', async () => {
  const reads = async (seekData: boolean) => {
    const io = new MemIo({ seekData });
    const V = 8 * MiB;
    const base = new Uint8Array(V);
    base.set(pattern(64 * KiB, 1)); // data only in the first 64 KiB
    io.writeFile('/z/base.raw', base);
    // Zero detection marks every other block local: sparse, known zero in the image and base.
    await create(io, '/z/img.fvd', { base: 'base.raw', baseFormat: 'raw', size: 2 * V, blockSize: 64 * KiB });
    await writeAt(io, '/z/img.fvd', [[12 * MiB, pattern(4096, 2)]]);
    io.writeFile('/z/other.raw', new Uint8Array(2 * V));
    let bytesRead = 0;
    const counting: IoBackend = {
      open: async (p, o) => {
        const f = await io.open(p, o);
        return Object.assign(Object.create(f) as BlockFile, {
          read: (b: Uint8Array, off: number) => ((bytesRead += b.length), f.read(b, off)),
          nextData: (off: number) => f.nextData!(off),
          size: () => f.size(),
          close: () => f.close(),
        });
      },
    };
    await commitImage(counting, '/z/img.fvd');
    await rebaseImage(counting, '/z/img.fvd', { base: 'other.raw', baseFormat: 'raw' });
    const expected = new Uint8Array(2 * V);
    expected.set(base);
    expected.set(pattern(4096, 2), 12 * MiB);
    same(await readWholeDisk(io, '/z/img.fvd'), expected, `seekData ${seekData}`);
    return bytesRead;
  };
  const slow = await reads(false);
  const fast = await reads(true);
  // commit and rebase each read two 16 MiB disks in full without it; with it only the 1 MiB
  // windows holding data (the first 64 KiB, the write at 12 MiB).
  assert.ok(slow > 60 * MiB, `without SEEK_DATA: ${slow} bytes read`);
  assert.ok(fast <= 8 * MiB, `with SEEK_DATA: ${fast} bytes read`);
});

// ------------------------------------------------------------------------------------------------
// rebase

for (const layout of LAYOUTS) {
  test(`rebase (${layout}): copies only what differs, switches the base, reads the same without the old base`, async () => {
    const io = new MemIo();
    const V = 512 * KiB;
    const bs = 8 * KiB;
    const oldData = pattern(V, 1);
    const newData = oldData.slice();
    // The new base differs in 5 blocks, 3 of them covered by the image's own writes.
    for (const b of [1, 7, 20, 40, 63]) newData.set(pattern(bs, 100 + b), b * bs);
    io.writeFile('/b/old.raw', oldData);
    io.writeFile('/b/new.raw', newData);
    await create(io, '/b/img.fvd', { base: 'old.raw', baseFormat: 'raw', layout, blockSize: bs, chunkSize: 64 * KiB });
    await writeAt(io, '/b/img.fvd', [[7 * bs, pattern(bs, 3)], [40 * bs + 100, pattern(10, 4)], [63 * bs, pattern(bs, 5)]]);
    const expected = await readWholeDisk(io, '/b/img.fvd');
    const r = await rebaseImage(io, '/b/img.fvd', { base: 'new.raw', baseFormat: 'raw' });
    assert.is(r.bytesCopied, 2 * bs, 'blocks 1 and 20 differ and were not local');
    assert.is(r.oldBase, 'old.raw');
    assert.is(r.newBase, 'new.raw');
    const h = headerOf(io, '/b/img.fvd');
    assert.is(h.baseFormat, BASE_RAW);
    assert.is(h.basePathOffset, 0, 'the path is back at 512');
    assert.is(Buffer.from(io.readFile('/b/img.fvd').subarray(512, 512 + h.basePathLength)).toString(), 'new.raw');
    assert.ok(io.readFile('/b/img.fvd').subarray(512 + h.basePathLength, PAGE).every((x) => x === 0), 'rest of the first page zero');
    io.deleteFile('/b/old.raw');
    same(await readWholeDisk(io, '/b/img.fvd'), expected, 'after rebase, old base gone');
    await clean(io, '/b/img.fvd');
  });
}

test('rebase onto an FVD base of another size, and onto a smaller and a larger base', async () => {
  for (const [B1, B2] of [
    [256 * KiB, 384 * KiB + 512],
    [384 * KiB, 100 * KiB + 512],
    [384 * KiB, 384 * KiB],
  ] as const) {
    const io = new MemIo();
    const V = 320 * KiB;
    io.writeFile('/s/old.raw', pattern(B1, 1));
    await create(io, '/s/new.fvd', { size: B2, blockSize: 4 * KiB, layout: 'compact', chunkSize: 32 * KiB });
    // The new base shares the first 64 KiB with the old one, and differs after.
    await writeAt(io, '/s/new.fvd', [[0, pattern(B1, 1).subarray(0, 64 * KiB)], [80 * KiB, pattern(B2 - 80 * KiB, 7)]]);
    await create(io, '/s/img.fvd', { base: 'old.raw', baseFormat: 'raw', size: V, blockSize: 16 * KiB, layout: 'raw' });
    await writeAt(io, '/s/img.fvd', [[20 * KiB, pattern(40 * KiB, 2)], [V - 8 * KiB, pattern(8 * KiB, 3)]]);
    const expected = await readWholeDisk(io, '/s/img.fvd');
    await rebaseImage(io, '/s/img.fvd', { base: 'new.fvd', baseFormat: 'fvd' });
    const h = headerOf(io, '/s/img.fvd');
    assert.is(h.baseSize, B2);
    assert.is(h.baseFormat, BASE_FVD);
    io.deleteFile('/s/old.raw');
    same(await readWholeDisk(io, '/s/img.fvd'), expected, `rebase ${B1} → ${B2}`);
    const st = await statsOf(io, '/s/img.fvd');
    assert.equal(st.baseChain.map((e) => e.format), ['fvd']);
    await clean(io, '/s/img.fvd');
  }
});

test('rebase -b "" makes the image standalone; rebase of a standalone image onto a base', async () => {
  const io = new MemIo();
  io.writeFile('/n/base.raw', pattern(256 * KiB, 1));
  await create(io, '/n/img.fvd', { base: 'base.raw', baseFormat: 'raw', blockSize: 4 * KiB, layout: 'compact', chunkSize: 16 * KiB });
  await writeAt(io, '/n/img.fvd', [[4 * KiB, pattern(4 * KiB, 2)]]);
  const expected = await readWholeDisk(io, '/n/img.fvd');
  const r = await rebaseImage(io, '/n/img.fvd', { base: '' });
  assert.is(r.bytesCopied, 252 * KiB);
  let h = headerOf(io, '/n/img.fvd');
  assert.is(h.baseFormat, BASE_NONE);
  assert.is(h.baseSize, 0);
  assert.is(h.basePathLength, 0);
  assert.ok(io.readFile('/n/img.fvd').subarray(512, PAGE).every((x) => x === 0));
  io.deleteFile('/n/base.raw');
  same(await readWholeDisk(io, '/n/img.fvd'), expected, 'standalone');
  await clean(io, '/n/img.fvd');

  // A standalone image created without any bitmap, onto a base: the bitmap region is created
  // (the table and journal make room) and every block stays local.
  for (const layout of LAYOUTS) {
    const p = `/n/plain-${layout}.fvd`;
    await create(io, p, { size: 192 * KiB, blockSize: 4 * KiB, layout, chunkSize: 16 * KiB });
    await writeAt(io, p, [[0, pattern(192 * KiB, 3)]]);
    const h0 = headerOf(io, p);
    assert.is(h0.bitmapLength, 0);
    io.writeFile('/n/b2.raw', pattern(128 * KiB, 4));
    const r2 = await rebaseImage(io, p, { base: 'b2.raw', baseFormat: 'raw' });
    assert.is(r2.bytesCopied, 0);
    h = headerOf(io, p);
    assert.is(h.bitmapLength, PAGE);
    assert.is(h.bitmapOffset, PAGE);
    assert.is(h.dataOffset, h0.dataOffset);
    // raw-like: data_offset leaves no slack, the journal gives up a page; compact: it moves into
    // the chunk-alignment slack.
    if (layout === 'raw') assert.is(h.journalLength, h0.journalLength - PAGE);
    else assert.is(h.journalLength, h0.journalLength);
    assert.is(h.journalOffset, h0.journalOffset + PAGE);
    assert.ok(h.journalStartSeq > h0.journalStartSeq, 'a moved journal starts past its old sequence numbers');
    same(await readWholeDisk(io, p), pattern(192 * KiB, 3), `${layout}: standalone → based`);
    assert.is((await statsOf(io, p)).bytesInBase, 0);
    await clean(io, p);
    // ... and it keeps working as an overlay: discard reads zeros, new writes stick, reopen.
    await writeAt(io, p, [[8 * KiB, pattern(4 * KiB, 5)]]);
    const exp = pattern(192 * KiB, 3);
    exp.set(pattern(4 * KiB, 5), 8 * KiB);
    same(await readWholeDisk(io, p), exp, `${layout}: written after rebase`);
  }
});

test('rebase -u switches the header only; works without the old base', async () => {
  const io = new MemIo();
  const bs = 4 * KiB;
  io.writeFile('/u/old.raw', pattern(64 * KiB, 1));
  await create(io, '/u/img.fvd', { base: 'old.raw', baseFormat: 'raw', blockSize: bs });
  await writeAt(io, '/u/img.fvd', [[bs, pattern(bs, 2)]]);
  io.deleteFile('/u/old.raw');
  await rejects(rebaseImage(io, '/u/img.fvd', { base: 'new.raw', baseFormat: 'raw' }), /base image 'new\.raw' not found/);
  const moved = pattern(64 * KiB, 1);
  io.writeFile('/u/new.raw', moved);
  await rejects(rebaseImage(io, '/u/img.fvd', { base: 'new.raw', baseFormat: 'raw' }), /old\.raw' not found.*rebase -u/);
  const r = await rebaseImage(io, '/u/img.fvd', { base: 'new.raw', baseFormat: 'raw', unsafe: true });
  assert.is(r.bytesCopied, 0);
  const expected = moved.slice();
  expected.set(pattern(bs, 2), bs);
  same(await readWholeDisk(io, '/u/img.fvd'), expected, 'unsafe rebase onto the moved base');
  // Unsafe onto a shorter base: blocks past its end that came from the old base read zeros.
  io.writeFile('/u/short.raw', moved.subarray(0, 16 * KiB));
  await rebaseImage(io, '/u/img.fvd', { base: 'short.raw', baseFormat: 'raw', unsafe: true });
  const exp2 = expected.slice();
  exp2.fill(0, 16 * KiB);
  same(await readWholeDisk(io, '/u/img.fvd'), exp2, 'unsafe rebase onto a shorter base');
  await clean(io, '/u/img.fvd');
});

test('rebase refusals change nothing: own base, loop, missing, no format, paths too long', async () => {
  const io = new MemIo();
  io.writeFile('/l/r.raw', pattern(64 * KiB, 1));
  await create(io, '/l/a.fvd', { base: 'r.raw', baseFormat: 'raw', blockSize: 4 * KiB });
  await create(io, '/l/b.fvd', { base: 'a.fvd', baseFormat: 'fvd', blockSize: 4 * KiB });
  await create(io, '/l/c.fvd', { base: 'b.fvd', baseFormat: 'fvd', blockSize: 4 * KiB });
  const before = files(io);
  await rejects(rebaseImage(io, '/l/a.fvd', { base: 'a.fvd', baseFormat: 'fvd' }), /own base/);
  await rejects(rebaseImage(io, '/l/a.fvd', { base: 'c.fvd', baseFormat: 'fvd' }), /base chain loop/);
  await rejects(rebaseImage(io, '/l/a.fvd', { base: 'b.fvd', baseFormat: 'fvd' }), /base chain loop/);
  await rejects(rebaseImage(io, '/l/a.fvd', { base: 'none.raw', baseFormat: 'raw' }), /base image 'none\.raw' not found/);
  await rejects(rebaseImage(io, '/l/a.fvd', { base: 'r.raw' }), /without its format/);
  await rejects(rebaseImage(io, '/l/a.fvd', { base: 'x'.repeat(4000), baseFormat: 'raw' }), /base path must be 1 to 3584 bytes/);
  const long = `${'d/'.repeat(900)}r.raw`; // 1805 bytes: fits alone, not next to the old path
  await rejects(rebaseImage(io, '/l/a.fvd', { base: long, baseFormat: 'raw' }), /do not fit side by side|not found/);
  await rejects(rebaseImage(io, '/l/missing.fvd', { base: 'r.raw', baseFormat: 'raw' }), /no such file/, true);
  const served = await FvdImage.open(io, '/l/c.fvd');
  await rejects(rebaseImage(io, '/l/a.fvd', { base: '' }), /a\.fvd: locked/, true); // a base of a served image
  await served.close();
  assert.equal(files(io), before);
  assert.is(io.openCount, 0);
});

// ------------------------------------------------------------------------------------------------
// resize

for (const layout of LAYOUTS) {
  test(`resize (${layout}): grow reads zeros in the new range, shrink drops only with shrink, reopen`, async () => {
    const io = new MemIo();
    const p = `/z/${layout}.fvd`;
    await create(io, p, { size: 100 * KiB + 512, blockSize: 4 * KiB, layout, chunkSize: 16 * KiB });
    await writeAt(io, p, [[0, pattern(100 * KiB + 512, 1)]]);
    let expected: Uint8Array = pattern(100 * KiB + 512, 1);
    let r = await resizeImage(io, p, 300 * KiB);
    assert.equal([r.oldSize, r.newSize], [100 * KiB + 512, 300 * KiB]);
    const grown = new Uint8Array(300 * KiB);
    grown.set(expected);
    expected = grown;
    same(await readWholeDisk(io, p), expected, 'grown');
    assert.is(headerOf(io, p).virtualSize, 300 * KiB);
    await writeAt(io, p, [[250 * KiB, pattern(8 * KiB, 2)]]);
    expected.set(pattern(8 * KiB, 2), 250 * KiB);
    await clean(io, p);
    // Shrinking over data is refused without `shrink`; over zeros it is allowed.
    const before = files(io);
    await rejects(resizeImage(io, p, 200 * KiB), /would discard data \(byte 256000 is not zero\); use --shrink/);
    assert.equal(files(io), before);
    r = await resizeImage(io, p, 258 * KiB);
    expected = expected.slice(0, 258 * KiB);
    same(await readWholeDisk(io, p), expected, 'shrunk over zeros');
    r = await resizeImage(io, p, 50 * KiB + 512, { shrink: true });
    expected = expected.slice(0, 50 * KiB + 512);
    same(await readWholeDisk(io, p), expected, 'shrunk with shrink');
    const h = headerOf(io, p);
    if (layout === 'raw') assert.is(io.readFile(p).length, h.dataOffset + 50 * KiB + 512);
    else assert.ok(io.readFile(p).length <= h.dataOffset + 4 * 16 * KiB, 'compact: freed chunks cut off');
    await clean(io, p);
    // Growing again must not bring back the dropped data.
    await resizeImage(io, p, 300 * KiB);
    const again = new Uint8Array(300 * KiB);
    again.set(expected);
    same(await readWholeDisk(io, p), again, 'grown after shrink');
    await clean(io, p);
  });
}

test('resize over a larger base: the new range reads zeros, not the base (straddling block too)', async () => {
  for (const layout of LAYOUTS) {
    for (const V of [64 * KiB, 64 * KiB + 1536]) {
      const io = new MemIo();
      const baseData = pattern(512 * KiB, 1);
      io.writeFile('/o/base.raw', baseData);
      await create(io, '/o/img.fvd', { base: 'base.raw', baseFormat: 'raw', size: V, blockSize: 8 * KiB, layout, chunkSize: 32 * KiB });
      await resizeImage(io, '/o/img.fvd', 400 * KiB);
      const expected = new Uint8Array(400 * KiB);
      expected.set(baseData.subarray(0, V));
      same(await readWholeDisk(io, '/o/img.fvd'), expected, `${layout} ${V}: grown over the base`);
      const h = headerOf(io, '/o/img.fvd');
      assert.ok(h.bitmapLength >= bitmapBytes(400 * KiB, h.blockSize));
      await clean(io, '/o/img.fvd');
      // shrink below and grow again: still zeros
      await resizeImage(io, '/o/img.fvd', 32 * KiB + 512, { shrink: true });
      await resizeImage(io, '/o/img.fvd', 400 * KiB);
      const exp2 = new Uint8Array(400 * KiB);
      exp2.set(baseData.subarray(0, 32 * KiB + 512));
      same(await readWholeDisk(io, '/o/img.fvd'), exp2, `${layout} ${V}: shrunk and grown over the base`);
      await clean(io, '/o/img.fvd');
    }
  }
});

test('resize (compact) grows the lookup table into the journal; refuses when nothing is left', async () => {
  const io = new MemIo();
  const p = '/t/img.fvd';
  // 4 KiB chunks: one table page maps 4 MiB; growing to 64 MiB needs 16 pages.
  await create(io, p, { size: 4 * MiB, blockSize: 4 * KiB, chunkSize: 4 * KiB, layout: 'compact', journalSize: 128 * KiB });
  await writeAt(io, p, [[0, pattern(4 * MiB, 1)]]);
  const h0 = headerOf(io, p);
  const r = await resizeImage(io, p, 64 * MiB);
  assert.ok(r.journalShrunkTo !== null && r.journalShrunkTo < 128 * KiB);
  const h = headerOf(io, p);
  assert.is(h.tableLength, 16 * PAGE);
  assert.is(h.tableOffset, h0.tableOffset);
  assert.is(h.dataOffset, h0.dataOffset);
  const expected = new Uint8Array(64 * MiB);
  expected.set(pattern(4 * MiB, 1));
  same(await readWholeDisk(io, p), expected, 'grown');
  await writeAt(io, p, [[60 * MiB, pattern(64 * KiB, 2)]]);
  expected.set(pattern(64 * KiB, 2), 60 * MiB);
  same(await readWholeDisk(io, p), expected, 'written in the new range');
  await clean(io, p);
  const before = files(io);
  await rejects(resizeImage(io, p, 1024 * MiB), /not enough room for the metadata/);
  assert.equal(files(io), before);
});

test('resize refusals: bad size, too many chunks, locked image', async () => {
  const io = new MemIo();
  await create(io, '/q/img.fvd', { size: MiB, layout: 'compact', chunkSize: 64 * KiB });
  const before = files(io);
  await rejects(resizeImage(io, '/q/img.fvd', 0), /out of range/);
  await rejects(resizeImage(io, '/q/img.fvd', -5), /out of range/);
  await rejects(resizeImage(io, '/q/img.fvd', 2 ** 51), /out of range/);
  const held = await FvdImage.open(io, '/q/img.fvd');
  await rejects(resizeImage(io, '/q/img.fvd', 2 * MiB), /img\.fvd: locked/, true);
  await held.close();
  assert.equal(files(io), before);
  assert.is((await resizeImage(io, '/q/img.fvd', MiB - 100)).newSize, MiB, 'rounded up to 512: unchanged');
});

// ------------------------------------------------------------------------------------------------
// base chains

test('a chain of depth 4 (raw ← fvd ← fvd ← fvd, mixed layouts and block sizes) reads through every level', async () => {
  const io = new MemIo();
  const V = 256 * KiB;
  const model = pattern(V, 1);
  io.writeFile('/h/l0.raw', model);
  const levels = ['l1.fvd', 'l2.fvd', 'l3.fvd'];
  let below = 'l0.raw';
  let fmt: 'raw' | 'fvd' = 'raw';
  const rng = new Rng(7);
  for (const [i, name] of levels.entries()) {
    await create(io, `/h/${name}`, { base: below, baseFormat: fmt, blockSize: [4, 16, 8][i]! * KiB, layout: i % 2 ? 'compact' : 'raw', chunkSize: 32 * KiB });
    const parts: Array<[number, Uint8Array]> = [];
    for (let k = 0; k < 6; k++) {
      const off = rng.int(V / 512) * 512;
      const d = pattern(Math.min(V - off, rng.range(1, 40) * 512), 10 * i + k);
      parts.push([off, d]);
      model.set(d, off);
    }
    await writeAt(io, `/h/${name}`, parts);
    below = name;
    fmt = 'fvd';
  }
  same(await readWholeDisk(io, '/h/l3.fvd'), model, 'depth-4 chain');
  const st = await statsOf(io, '/h/l3.fvd');
  assert.equal(st.baseChain.map((e) => [e.path, e.format]), [['/h/l2.fvd', 'fvd'], ['/h/l1.fvd', 'fvd'], ['/h/l0.raw', 'raw']]);
  // commit the top into l2, then l2 into l1: the chain still reads the same
  await commitImage(io, '/h/l3.fvd');
  await commitImage(io, '/h/l2.fvd');
  same(await readWholeDisk(io, '/h/l3.fvd'), model, 'after two commits');
  same(await readWholeDisk(io, '/h/l1.fvd'), model, 'l1 holds everything above the raw base');
  // rebase the top straight onto l1 (l2 is empty now): nothing to copy
  const r = await rebaseImage(io, '/h/l3.fvd', { base: 'l1.fvd', baseFormat: 'fvd' });
  assert.is(r.bytesCopied, 0);
  io.deleteFile('/h/l2.fvd');
  same(await readWholeDisk(io, '/h/l3.fvd'), model, 'after dropping the middle');
});

/** Points an image's header at another base, like a hand-edited or damaged chain (MemIo files). */
function setBase(io: MemIo, p: string, base: string, format: number, baseSize: number): void {
  const bytes = io.readFile(p);
  const h = decodeHeader(p, bytes.subarray(0, HEADER_SIZE), bytes.length);
  const path = Buffer.from(base);
  bytes.fill(0, 512, PAGE);
  bytes.set(path, 512);
  bytes.set(encodeHeader({ ...h, baseFormat: format, baseSize, basePathLength: path.length, basePathCrc: crc(path) }), 0);
  io.writeFile(p, bytes);
}

test('chain errors: missing middle image, missing bottom, loops of length 1, 2 and 3', async () => {
  const io = new MemIo();
  io.writeFile('/e/r.raw', pattern(64 * KiB, 1));
  await create(io, '/e/a.fvd', { base: 'r.raw', baseFormat: 'raw' });
  await create(io, '/e/b.fvd', { base: 'a.fvd', baseFormat: 'fvd' });
  await create(io, '/e/c.fvd', { base: 'b.fvd', baseFormat: 'fvd' });
  const open = (p: string, readOnly: boolean) => FvdImage.open(io, p, { readOnly }).then((i) => i.close());
  const saved = io.readFile('/e/b.fvd');
  io.deleteFile('/e/b.fvd');
  for (const ro of [true, false]) await rejects(open('/e/c.fvd', ro), /^base image 'b\.fvd' not found \(looked for \/e\/b\.fvd\)$/);
  await rejects(commitImage(io, '/e/c.fvd'), /base image 'b\.fvd' not found/);
  io.writeFile('/e/b.fvd', saved);
  const raw = io.readFile('/e/r.raw');
  io.deleteFile('/e/r.raw');
  for (const ro of [true, false]) await rejects(open('/e/c.fvd', ro), /^base image 'b\.fvd': base image 'a\.fvd': base image 'r\.raw' not found/);
  io.writeFile('/e/r.raw', raw);
  for (const ro of [true, false]) await open('/e/c.fvd', ro);
  // Rebase never builds a loop (it opens the new chain with the image in it) ...
  await rejects(rebaseImage(io, '/e/a.fvd', { base: 'c.fvd', baseFormat: 'fvd', unsafe: true }), /base chain loop/);
  // ... so build them by hand, as a damaged or hand-edited chain would be.
  const loops: Array<[string, string[]]> = [
    ['length 1', ['a.fvd']],
    ['length 2', ['b.fvd', 'a.fvd']],
    ['length 3', ['c.fvd', 'b.fvd', 'a.fvd']],
  ];
  for (const [what, members] of loops) {
    const mem = MemIo.fromSnapshot(io.snapshot());
    setBase(mem, '/e/a.fvd', members[0]!, BASE_FVD, 64 * KiB); // a → (members[0] → ... →) a
    for (const top of ['/e/a.fvd', '/e/b.fvd', '/e/c.fvd']) {
      for (const ro of [true, false]) {
        const before = files(mem);
        await rejects(
          FvdImage.open(mem, top, { readOnly: ro }).then((i) => i.close()),
          /base chain loop: '\/e\/[abc]\.fvd' is its own base/,
        ).catch((err) => {
          throw new Error(`${what}, opening ${top}${ro ? ' read-only' : ''}: ${(err as Error).message}`);
        });
        assert.equal(files(mem), before, `${what}: a refused open changed a file`);
      }
      await rejects(commitImage(mem, top), /base chain loop/);
      await rejects(resizeImage(mem, top, 32 * KiB), /base chain loop/);
    }
    // rebase -u onto a good base (it never reads the old chain) repairs the loop.
    await rebaseImage(mem, '/e/a.fvd', { base: 'r.raw', baseFormat: 'raw', unsafe: true });
    for (const top of ['/e/a.fvd', '/e/b.fvd', '/e/c.fvd']) await FvdImage.open(mem, top).then((i) => i.close());
    assert.is(mem.openCount, 0);
  }
  assert.is(io.openCount, 0);
});

test('a chain of more than 64 images (the top included) is refused with a clear error', async () => {
  const io = new MemIo();
  io.writeFile('/deep/l0.raw', pattern(4096, 1));
  let below = 'l0.raw';
  let fmt: 'raw' | 'fvd' = 'raw';
  for (let i = 1; i <= 65; i++) {
    // create itself refuses a 65th level (below): build the last two over l0, then repoint them.
    await create(io, `/deep/l${i}.fvd`, { base: i < 64 ? below : 'l0.raw', baseFormat: i < 64 ? fmt : 'raw', journalSize: 8 * KiB });
    if (i >= 64) setBase(io, `/deep/l${i}.fvd`, below, BASE_FVD, 4096);
    below = `l${i}.fvd`;
    fmt = 'fvd';
  }
  // l63 .. l0.raw: 64 images, the limit; from l64 down: 65.
  await FvdImage.open(io, '/deep/l63.fvd', { readOnly: true }).then((i) => i.close());
  await rejects(FvdImage.open(io, '/deep/l64.fvd', { readOnly: true }), /^base chain longer than 64 images \(at 'l0\.raw'\)$/);
  await rejects(FvdImage.open(io, '/deep/l65.fvd'), /^base chain longer than 64 images \(at 'l1\.fvd'\)$/);
  await rejects(FvdImage.create(io, '/deep/l66.fvd', { base: 'l64.fvd', baseFormat: 'fvd' }), /base chain longer than 64 images/);
  await rejects(rebaseImage(io, '/deep/l1.fvd', { base: 'l64.fvd', baseFormat: 'fvd' }), /base chain loop|base chain longer/);
  assert.is(io.openCount, 0);
});

test.run();
