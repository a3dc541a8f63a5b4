import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { allocPinned } from '../../ffi/uring.js';
import { syscalls } from '../../ffi/syscalls.js';
import { DIRECT_WOULD_BLOCK, DirectIo, chooseDirectMode, overlayUpperType } from '../../daemon/direct-io.js';

const sys = syscalls()!;
const tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-direct-'));
const shmDir = fs.existsSync('/dev/shm') ? fs.mkdtempSync('/dev/shm/fvd-direct-') : null;
const TMPFS_MAGIC = 0x01021994;
/** Decided once at load so a test that cannot run here reports a skip rather than a pass. */
const hasTmpfs = shmDir !== null && fs.statfsSync(shmDir).type === TMPFS_MAGIC;
/** The directory the read/write tests use: tmpfs when there is one, else the temporary directory. */
const rwDir = shmDir ?? tmpDir;

/**
 * Whether a synchronous transfer in `mode` completes on rwDir's file system, or would block (then
 * the ring does the job and there is nothing synchronous to check). The probe is the read/write
 * test's first transfer (64 KiB written at 8 KiB into a new file), so probe and test agree.
 */
function syncTransferWorks(mode: 'memory' | 'nowait'): boolean {
  const file = path.join(rwDir, `probe-${mode}`);
  const fd = fs.openSync(file, 'w+');
  const buf = allocPinned(65536);
  const io = new DirectIo(sys, fd, mode);
  try {
    return io.transfer(true, buf.address, 65536, 8192, () => {}) !== DIRECT_WOULD_BLOCK;
  } finally {
    io.free();
    buf.free();
    fs.closeSync(fd);
    fs.rmSync(file, { force: true });
  }
}
const syncWorks = { memory: syncTransferWorks('memory'), nowait: syncTransferWorks('nowait') };

function pattern(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

test('the override picks the mode; a probe never picks a blocking mode for an unknown file system', () => {
  const fd = fs.openSync(path.join(tmpDir, 'probe'), 'w+');
  try {
    assert.is(chooseDirectMode(sys, fd, 'x', 'ring'), 'ring');
    assert.is(chooseDirectMode(sys, fd, 'x', 'memory'), 'memory');
    const mode = chooseDirectMode(sys, fd, path.join(tmpDir, 'probe'), '');
    assert.ok(mode === 'nowait' || mode === 'ring' || mode === 'memory', mode);
    const fsType = fs.statfsSync(tmpDir).type;
    if (mode === 'memory') assert.ok(fsType === TMPFS_MAGIC || fsType === 0x858458f6, `memory mode on fs type ${fsType.toString(16)}`);
  } finally {
    fs.closeSync(fd);
  }
});

(hasTmpfs ? test : test.skip)('tmpfs is served synchronously (memory or nowait), never through the ring', () => {
  const fd = fs.openSync(path.join(shmDir!, 'probe'), 'w+');
  try {
    assert.not.equal(chooseDirectMode(sys, fd, path.join(shmDir!, 'probe'), ''), 'ring');
  } finally {
    fs.closeSync(fd);
  }
});

for (const mode of ['memory', 'nowait'] as const) {
  (syncWorks[mode] ? test : test.skip)(`${mode}: write then read back at an offset; a read past the end zero-fills and succeeds`, () => {
    const file = path.join(rwDir, `rw-${mode}`);
    const fd = fs.openSync(file, 'w+');
    const buf = allocPinned(65536);
    const io = new DirectIo(sys, fd, mode);
    try {
      const data = pattern(65536, 7);
      buf.bytes.set(data);
      let r = io.transfer(true, buf.address, 65536, 8192, () => assert.unreachable('zero-fill on a write'));
      assert.is(r, 65536); // the probe at load found this transfer does not block here
      assert.equal(fs.readFileSync(file).subarray(8192), data);

      buf.bytes.fill(0xee);
      r = io.transfer(false, buf.address, 4096, 8192 + 4096, () => assert.unreachable('not at the end'));
      assert.is(r, 4096);
      assert.equal(buf.bytes.subarray(0, 4096), data.subarray(4096, 8192));

      // 8 KiB starting 4 KiB before the end: 4 KiB of data, then zeros.
      buf.bytes.fill(0xee);
      let filledFrom = -1;
      r = io.transfer(false, buf.address, 8192, 8192 + 65536 - 4096, (from) => {
        filledFrom = from;
        buf.bytes.fill(0, from, 8192);
      });
      assert.is(r, 8192);
      assert.is(filledFrom, 4096);
      assert.equal(buf.bytes.subarray(0, 4096), data.subarray(65536 - 4096));
      assert.ok(buf.bytes.subarray(4096, 8192).every((x) => x === 0));
    } finally {
      io.free();
      buf.free();
      fs.closeSync(fd);
    }
  });
}

test('an overlay mount is judged by its upper layer (longest matching mount point wins)', () => {
  const upper = shmDir ?? tmpDir;
  const info = path.join(tmpDir, 'mountinfo');
  const point = path.join(tmpDir, 'over lay');
  fs.mkdirSync(point, { recursive: true });
  const esc = (p: string) => p.replace(/ /g, '\\040');
  fs.writeFileSync(
    info,
    [
      `20 1 0:30 / / rw,relatime - overlay overlay rw,lowerdir=/lower,upperdir=/nonexistent,workdir=/w`,
      `21 20 0:31 / ${esc(point)} rw - overlay overlay rw,lowerdir=/l,upperdir=${esc(upper)},workdir=/w2`,
      `22 20 0:32 / /proc rw - proc proc rw`,
    ].join('\n') + '\n',
  );
  fs.writeFileSync(path.join(point, 'img'), '');
  assert.is(overlayUpperType(path.join(point, 'img'), info), fs.statfsSync(upper).type);
  // Files elsewhere fall to the root overlay, whose upper layer is gone: no answer, not a guess.
  assert.is(overlayUpperType('/proc/self/status', info), null);
  assert.is(overlayUpperType(path.join(tmpDir, 'mountinfo'), info), null);
});

test('a descriptor whose mode is ring is never touched synchronously', () => {
  const buf = allocPinned(4096);
  const io = new DirectIo(sys, -1, 'ring');
  try {
    assert.is(io.transfer(false, buf.address, 4096, 0, () => {}), DIRECT_WOULD_BLOCK);
    assert.is(io.done, 0);
  } finally {
    io.free();
    buf.free();
  }
});

test('a read-only descriptor: a write fails with -EBADF, not a crash or a silent success', () => {
  const file = path.join(tmpDir, 'ro');
  fs.writeFileSync(file, Buffer.alloc(4096, 1));
  const fd = fs.openSync(file, 'r');
  const buf = allocPinned(4096);
  const io = new DirectIo(sys, fd, 'memory');
  try {
    assert.is(io.transfer(true, buf.address, 4096, 0, () => {}), -9);
    assert.is(fs.readFileSync(file)[0], 1);
  } finally {
    io.free();
    buf.free();
    fs.closeSync(fd);
  }
});

test.after(() => {
  fs.rmSync(tmpDir, { recursive: true, force: true });
  if (shmDir) fs.rmSync(shmDir, { recursive: true, force: true });
});

test.run();
