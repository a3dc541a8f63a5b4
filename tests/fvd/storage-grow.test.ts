/**
 * A compact image on a block device (an LV) that fills up: without a grower, the allocation that
 * finds no room fails with ENOSPC and the image stays consistent (reopens, check clean, earlier
 * data intact); with one (FVD's add_storage_cmd: fvd serve --grow-cmd), the device is grown before
 * allocation fails, also with many writers racing for the last chunk while a slow grow runs.
 * The "device" is an in-memory file presented as a block device of a settable capacity.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { FvdImage } from '../../fvd/image.js';
import { FvdError } from '../../fvd/errors.js';
import { checkImage } from '../../fvd/check.js';
import { computeLayout, DEFAULT_JOURNAL_SIZE } from '../../fvd/format.js';
import type { BlockFile, IoBackend, OpenOptions } from '../../fvd/io.js';
import { MemIo } from '../helpers/mem-io.js';
import { Rng } from '../helpers/rng.js';

const MiB = 1024 * 1024;
const CHUNK = MiB;
const SIZE = 64 * MiB;
const DATA_OFFSET = computeLayout({ virtualSize: SIZE, blockSize: 64 * 1024, chunkSize: CHUNK, baseSize: 0, compact: true, journalLength: DEFAULT_JOURNAL_SIZE }).dataOffset;

/** MemIo whose file DEV is a block device of `capacity` bytes (grown by the test's "lvextend"). */
class DeviceIo implements IoBackend {
  capacity = DATA_OFFSET + 4 * CHUNK;
  constructor(readonly mem: MemIo) {}
  readonly open = async (p: string, options: OpenOptions = {}): Promise<BlockFile> => {
    const f = await this.mem.open(p, options);
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const dev = this;
    let seen = dev.capacity;
    return {
      isBlockDevice: true,
      readOnly: f.readOnly,
      path: f.path,
      read: (b, o) => f.read(b, o),
      write: (b, o) => {
        if (o + b.length > dev.capacity) throw new Error(`write past the device's end (${o}+${b.length} > ${dev.capacity})`);
        return f.write(b, o);
      },
      flush: () => f.flush(),
      zeroRange: (o, l) => f.zeroRange(o, l),
      size: () => seen,
      refreshSize: async () => (seen = dev.capacity),
      truncate: async () => {
        throw new FvdError('a block device cannot be truncated', 'EINVAL');
      },
      close: () => f.close(),
    };
  };
}

const pattern = (c: number) => new Uint8Array(CHUNK).fill((c * 37 + 11) & 0xff || 1);

async function fresh(rng?: Rng): Promise<DeviceIo> {
  const io = new DeviceIo(new MemIo(rng ? { rng } : {}));
  await (await io.mem.open('/dev/lv', { create: true })).close();
  await FvdImage.create(io, '/dev/lv', { size: SIZE, layout: 'compact' });
  return io;
}

async function verify(io: DeviceIo, chunks: number[]): Promise<void> {
  const report = await checkImage(io, '/dev/lv');
  assert.equal(report.errors, [], 'check clean');
  const img = await FvdImage.open(io, '/dev/lv', { readOnly: true });
  try {
    const buf = new Uint8Array(CHUNK);
    for (const c of chunks) {
      await img.read(buf, c * CHUNK);
      const want = pattern(c)[0];
      assert.ok(buf.every((x) => x === want), `chunk ${c} reads back`);
    }
  } finally {
    await img.close();
  }
}

test('no grower: the allocation that finds no room is ENOSPC; the image stays consistent', async () => {
  const io = await fresh();
  const img = await FvdImage.open(io, '/dev/lv');
  for (let c = 0; c < 4; c++) await img.write(pattern(c), c * CHUNK);
  let err: unknown;
  await img.write(pattern(10), 10 * CHUNK).catch((e) => (err = e));
  assert.instance(err, FvdError);
  assert.is((err as FvdError).code, 'ENOSPC');
  // Allocated chunks still take writes; the failed one left nothing mapped.
  await img.write(pattern(2), 2 * CHUNK);
  assert.is(img.stats().allocatedChunks, 4);
  await img.close();
  await verify(io, [0, 1, 2, 3]);
});

test('with a grower: the device grows before allocation fails; each grow is one call, triggered at the low-water mark', async () => {
  const io = await fresh();
  const img = await FvdImage.open(io, '/dev/lv');
  let grows = 0;
  img.setStorageGrower({
    lowWaterBytes: 2 * CHUNK,
    grow: async () => {
      grows++;
      io.capacity += 4 * CHUNK;
    },
  });
  const chunks = Array.from({ length: 20 }, (_, i) => i * 3);
  for (const c of chunks) await img.write(pattern(c), c * CHUNK);
  await img.close();
  assert.ok(grows >= 4 && grows <= 6, `${grows} grows for 20 chunks, 4 at a time`);
  assert.ok(io.capacity >= DATA_OFFSET + 20 * CHUNK);
  await verify(io, chunks);
});

test('many writers race for the last chunk while a slow grow runs: all succeed (seeded schedules)', async () => {
  for (let seed = 1; seed <= 20; seed++) {
    const io = await fresh(new Rng(seed));
    const img = await FvdImage.open(io, '/dev/lv');
    let inFlight = 0;
    let maxInFlight = 0;
    img.setStorageGrower({
      lowWaterBytes: 0,
      grow: async () => {
        maxInFlight = Math.max(maxInFlight, ++inFlight);
        await new Promise((r) => setTimeout(r, 2));
        io.capacity += 3 * CHUNK;
        inFlight--;
      },
    });
    const chunks = Array.from({ length: 16 }, (_, i) => 40 + i);
    await Promise.all(chunks.map((c) => img.write(pattern(c), c * CHUNK)));
    assert.is(maxInFlight, 1, `seed ${seed}: one grow at a time`);
    await img.close();
    await verify(io, chunks);
  }
});

test('a grower that fails or adds nothing: ENOSPC, not a hang', async () => {
  const io = await fresh();
  const img = await FvdImage.open(io, '/dev/lv');
  let calls = 0;
  img.setStorageGrower({
    lowWaterBytes: CHUNK,
    grow: async () => {
      calls++;
      if (calls % 2) throw new Error('lvextend: insufficient free space');
    },
  });
  for (let c = 0; c < 4; c++) await img.write(pattern(c), c * CHUNK);
  let err: unknown;
  await img.write(pattern(9), 9 * CHUNK).catch((e) => (err = e));
  assert.is((err as FvdError)?.code, 'ENOSPC');
  await img.close();
  await verify(io, [0, 1, 2, 3]);
});

test.run();
