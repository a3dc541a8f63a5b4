import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  HEADER_SIZE, INCOMPAT_COMPACT, PAGE, VERSION, computeLayout, decodeHeader, encodeHeader, bitmapBytes, tableBytes, type Header,
  DEFAULT_BLOCK_SIZE, SMALL_BLOCK_BITMAP_BUDGET, defaultBlockSize,
} from '../../fvd/format.js';
import { FvdError } from '../../fvd/errors.js';

function sample(compact = true): Header {
  const layout = computeLayout({ virtualSize: 1 << 30, blockSize: 65536, chunkSize: 1 << 20, baseSize: 3 << 28, compact, journalLength: 1 << 20 });
  return {
    version: VERSION, incompatible: compact ? INCOMPAT_COMPACT : 0n, compatible: 1n, autoclear: 0n, virtualSize: 1 << 30,
    blockSize: 65536, chunkSize: 1 << 20, baseSize: 3 << 28, basePathLength: 4, baseFormat: 1, basePathCrc: 1234,
    ...layout, journalStartSeq: 2 ** 40 + 17, refcountOffset: 0, refcountLength: 0, snapshotsOffset: 0, snapshotsLength: 0,
    basePathOffset: 0, baseSizeNext: 0, revertSnapshotId: 0, baseIdentityLength: 0, baseIdentityCrc: 0,
  };
}

test('header: encode/decode round trip keeps every field', () => {
  for (const compact of [false, true]) {
    const h = sample(compact);
    const bytes = encodeHeader(h);
    assert.is(bytes.length, HEADER_SIZE);
    const fileSize = h.dataOffset + (compact ? 0 : h.virtualSize);
    assert.equal(decodeHeader('x', bytes, fileSize), h);
  }
});

test('layout: regions page aligned, ordered, data block/chunk aligned; 1 TiB metadata is small', () => {
  const l = computeLayout({ virtualSize: 2 ** 40, blockSize: 65536, chunkSize: 1 << 20, baseSize: 2 ** 40, compact: true, journalLength: 16 << 20 });
  assert.is(l.bitmapOffset, PAGE);
  assert.is(l.bitmapLength, 2 * 1024 * 1024); // 2 MiB bitmap per TiB at 64 KiB blocks
  assert.is(l.tableLength, 4 * 1024 * 1024); // 4 MiB table per TiB at 1 MiB chunks
  assert.is(l.tableOffset, l.bitmapOffset + l.bitmapLength);
  assert.is(l.journalOffset, l.tableOffset + l.tableLength);
  assert.ok(l.dataOffset >= l.journalOffset + l.journalLength);
  assert.is(l.dataOffset % (1 << 20), 0);
  assert.is(bitmapBytes(0, 65536), 0);
  assert.is(bitmapBytes(1, 65536), PAGE);
  assert.is(tableBytes(1 << 20, 1 << 20), PAGE);
});

function expectReject(bytes: Uint8Array, fileSize: number, pattern: RegExp) {
  try {
    decodeHeader('img.fvd', bytes, fileSize);
  } catch (err) {
    assert.instance(err, FvdError);
    assert.match((err as Error).message, pattern);
    assert.not.match((err as Error).message, /\n/);
    return;
  }
  assert.unreachable(`accepted, expected ${pattern}`);
}

test('header: rejects bad magic, version, checksum, features, geometry, truncation', () => {
  const h = sample(false);
  const size = h.dataOffset + h.virtualSize;
  const good = encodeHeader(h);
  const bad = good.slice();
  bad[0] = 0;
  expectReject(bad, size, /not an FVD image/);
  expectReject(encodeHeader({ ...h, version: 2 }), size, /unsupported FVD version 2/);
  const flipped = good.slice();
  flipped[44] ^= 1;
  expectReject(flipped, size, /checksum/);
  expectReject(encodeHeader({ ...h, incompatible: 1n << 7n }), size, /incompatible feature/);
  decodeHeader('x', encodeHeader({ ...h, compatible: 1n << 9n, autoclear: 1n << 9n }), size); // unknown compat/autoclear are fine
  expectReject(encodeHeader({ ...h, blockSize: 3000 }), size, /block size/);
  expectReject(encodeHeader({ ...h, chunkSize: 4096 }), size, /chunk size/);
  expectReject(encodeHeader({ ...h, virtualSize: 1000 }), size, /virtual size/);
  expectReject(encodeHeader({ ...h, bitmapLength: 0 }), size, /bitmap length 0, expected a multiple of 4096 of at least 4096/);
  expectReject(encodeHeader({ ...h, bitmapLength: 6144 }), size, /bitmap length/);
  expectReject(encodeHeader({ ...h, journalOffset: h.bitmapOffset }), size, /overlaps/);
  expectReject(encodeHeader({ ...h, dataOffset: h.dataOffset + 512 }), size + 512, /data offset/);
  expectReject(encodeHeader({ ...h, refcountLength: 4096 }), size, /snapshot/);
  expectReject(good, 100, /truncated/);
  expectReject(good, size - 4096, /truncated/);
});

test('header: the base identity fields (bytes 316..323) round-trip and are validated (FORMAT.md §2.2)', () => {
  const h = sample(false);
  const size = h.dataOffset + h.virtualSize;
  const withId = { ...h, baseIdentityLength: 40, baseIdentityCrc: 0xdeadbeef };
  const bytes = encodeHeader(withId);
  assert.is(new DataView(bytes.buffer).getUint16(316, true), 40);
  assert.is(new DataView(bytes.buffer).getUint32(320, true), 0xdeadbeef);
  assert.equal(decodeHeader('x', bytes, size), withId);
  expectReject(encodeHeader({ ...h, baseIdentityLength: 1025, baseIdentityCrc: 1 }), size, /invalid base identity length 1025/);
  expectReject(encodeHeader({ ...h, basePathLength: 3000, baseIdentityLength: 600, baseIdentityCrc: 1 }), size, /invalid base identity length 600/);
  expectReject(encodeHeader({ ...h, baseIdentityLength: 0, baseIdentityCrc: 7 }), size, /invalid base identity length 0/);
  expectReject(encodeHeader({ ...h, baseFormat: 0, basePathLength: 0, baseSize: 0, bitmapLength: 0, bitmapOffset: 0, baseIdentityLength: 5, baseIdentityCrc: 1 }), size, /base identity length 5/);
});

test('header: base_path_offset and base_size_next round-trip and are validated; the bitmap may exceed its minimum', () => {
  const h = sample(false);
  const size = h.dataOffset + h.virtualSize;
  const moved = { ...h, basePathOffset: 2048, baseSizeNext: (3 << 28) + 4096 };
  assert.equal(decodeHeader('x', encodeHeader(moved), size), moved);
  const bytes = encodeHeader(moved);
  assert.is(new DataView(bytes.buffer).getUint32(304, true), 2048);
  assert.is(Number(new DataView(bytes.buffer).getBigUint64(308, true)), (3 << 28) + 4096);
  expectReject(encodeHeader({ ...h, basePathOffset: 100 }), size, /invalid base path offset 100/);
  expectReject(encodeHeader({ ...h, basePathOffset: 2047 }), size, /invalid base path offset/);
  expectReject(encodeHeader({ ...h, basePathOffset: 4096 }), size, /invalid base path offset/);
  expectReject(encodeHeader({ ...h, baseSizeNext: 3 << 28 }), size, /invalid next base size/); // not larger
  expectReject(encodeHeader({ ...h, baseSizeNext: 2 ** 51 }), size, /invalid next base size/);
  const none = { ...h, baseFormat: 0, basePathLength: 0, basePathCrc: 0, baseSize: 0 };
  expectReject(encodeHeader({ ...none, basePathOffset: 1024 }), size, /invalid base path offset/);
  expectReject(encodeHeader({ ...none, baseSizeNext: 4096 }), size, /invalid next base size/);
  // A bitmap larger than needed (create sizes it for the larger of base and disk; rebase without
  // a base keeps it) is fine, provided the regions still fit.
  const big = { ...h, bitmapLength: h.bitmapLength + PAGE, journalOffset: h.journalOffset + PAGE }; // raw-like: no table
  assert.ok(big.journalOffset + big.journalLength <= big.dataOffset);
  assert.equal(decodeHeader('x', encodeHeader(big), size), big);
  decodeHeader('x', encodeHeader({ ...none, bitmapLength: h.bitmapLength }), size);
  const l = computeLayout({ virtualSize: 1 << 30, blockSize: 65536, chunkSize: 1 << 20, baseSize: 1 << 20, compact: false, journalLength: 1 << 20 });
  assert.is(l.bitmapLength, bitmapBytes(1 << 30, 65536), 'sized for the disk when it is larger than the base');
  assert.is(computeLayout({ virtualSize: 1 << 30, blockSize: 65536, chunkSize: 1 << 20, baseSize: 0, compact: false, journalLength: 1 << 20 }).bitmapLength, 0);
});

test('default block size: 64K without a base; over a base the smallest whose bitmap fits the budget', () => {
  const GiB = 2 ** 30;
  assert.is(defaultBlockSize(false, 0), DEFAULT_BLOCK_SIZE);
  assert.is(defaultBlockSize(false, 4096 * GiB), DEFAULT_BLOCK_SIZE);
  assert.is(defaultBlockSize(true, 1), 4096);
  assert.is(defaultBlockSize(true, 10 * GiB), 4096);
  assert.is(defaultBlockSize(true, 64 * GiB), 4096, '64 GiB at 4 KiB is exactly the 2 MiB budget');
  assert.is(defaultBlockSize(true, 64 * GiB + 512), 8192);
  assert.is(defaultBlockSize(true, 128 * GiB), 8192);
  assert.is(defaultBlockSize(true, 200 * GiB), 16384);
  assert.is(defaultBlockSize(true, 512 * GiB), 32768);
  assert.is(defaultBlockSize(true, 1024 * GiB), 65536);
  assert.is(defaultBlockSize(true, 100 * 1024 * GiB), 65536, 'never above 64 KiB, the bitmap then grows past the budget');
  for (const covers of [GiB, 64 * GiB, 64 * GiB + 1, 300 * GiB, 1024 * GiB]) {
    const b = defaultBlockSize(true, covers);
    assert.ok(bitmapBytes(covers, b) <= SMALL_BLOCK_BITMAP_BUDGET, `${covers}: fits`);
    if (b > 4096) assert.ok(bitmapBytes(covers, b / 2) > SMALL_BLOCK_BITMAP_BUDGET, `${covers}: ${b / 2} would not fit`);
  }
});

test.run();
