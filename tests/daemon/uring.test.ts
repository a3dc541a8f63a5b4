import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  IoUring,
  allocPinned,
  IORING_FEAT_NODROP,
  IORING_OP_URING_CMD,
  IORING_SETUP_SQE128,
  IOSQE_FIXED_FILE,
  IOSQE_IO_DRAIN,
  SQE_CMD_OFFSET,
} from '../../ffi/uring.js';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE } from '../../ffi/libc.js';
import { SYS_io_uring_register, syscalls } from '../../ffi/syscalls.js';
import { autoBufRegSqeAddr, userCopyPosition } from '../../daemon/ublk/abi.js';
import { UringFileDriver, UringIoBackend } from '../../storage/uring-file.js';

const tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-uring-'));
let fileNo = 0;
const tmpFile = () => path.join(tmpDir, `f${fileNo++}`);

/** Collects CQEs into parallel arrays; one handler object reused across reaps. */
class Cqes {
  ud: number[] = [];
  res: number[] = [];
  readonly handler = (ud: number, res: number) => {
    this.ud.push(ud);
    this.res.push(res);
  };
}

test('hasWork/unsubmitted: what a worker polls before blocking', () => {
  const ring = new IoUring({ entries: 8 });
  try {
    assert.is(ring.unsubmitted, 0);
    assert.not.ok(ring.hasWork(), 'an idle ring has nothing to reap');
    assert.ok(ring.prepNop(7) >= 0);
    assert.is(ring.unsubmitted, 1);
    assert.not.ok(ring.hasWork(), 'a prepared SQE is not work to reap');
    assert.is(ring.submit(0), 1);
    assert.is(ring.unsubmitted, 0);
    for (let i = 0; i < 1e6 && !ring.hasWork(); i++);
    assert.ok(ring.hasWork(), 'the NOP completion is visible without an enter');
    const seen: number[] = [];
    ring.reap((ud) => seen.push(ud));
    assert.equal(seen, [7]);
    assert.not.ok(ring.hasWork());
  } finally {
    ring.close();
  }
});

test('NOP round trip carries a user_data above 2^32', () => {
  const ring = new IoUring({ entries: 8 });
  try {
    assert.is(ring.sqEntries, 8);
    assert.is(ring.cqEntries, 16);
    const ud = 2 ** 40 + 12345;
    assert.ok(ring.prepNop(ud) >= 0);
    assert.is(ring.submit(1), 1);
    assert.is(ring.cqReady(), 1);
    const c = new Cqes();
    assert.is(ring.reap(c.handler), 1);
    assert.equal(c.ud, [ud]);
    assert.equal(c.res, [0]);
    assert.is(ring.cqReady(), 0);
  } finally {
    ring.close();
  }
});

test('a relative timeout completes with -ETIME after its time (what wakes an idle queue loop)', () => {
  const ring = new IoUring({ entries: 4 });
  const ts = allocPinned(4096);
  try {
    ts.bytes.writeBigInt64LE(0n, 0); // tv_sec
    ts.bytes.writeBigInt64LE(50_000_000n, 8); // tv_nsec: 50 ms
    assert.ok(ring.prepTimeout(ts.address, 99) >= 0);
    const t0 = performance.now();
    const c = new Cqes();
    while (c.res.length === 0) {
      assert.ok(ring.submit(1) >= 0);
      ring.reap(c.handler);
    }
    assert.ok(performance.now() - t0 >= 40, `waited ${performance.now() - t0} ms`);
    assert.equal(c.ud, [99]);
    assert.equal(c.res, [-os.constants.errno.ETIME]);
  } finally {
    ts.free();
    ring.close();
  }
});

test('peek/advance API reads CQEs without a handler', () => {
  const ring = new IoUring({ entries: 4 });
  try {
    for (let i = 0; i < 3; i++) ring.prepNop(100 + i);
    assert.is(ring.submit(3), 3);
    assert.is(ring.cqReady(), 3);
    const seen = [0, 1, 2].map((i) => ring.cqeUserData(i)).sort();
    assert.equal(seen, [100, 101, 102]);
    assert.is(ring.cqeRes(0), 0);
    ring.cqAdvance(3);
    assert.is(ring.cqReady(), 0);
  } finally {
    ring.close();
  }
});

test('batched writes then drained reads in ONE submit round-trip the data', () => {
  const file = tmpFile();
  const fd = fs.openSync(file, 'w+');
  const ring = new IoUring({ entries: 32 });
  const n = 8;
  const bs = 4096;
  const wbuf = allocPinned(n * bs);
  const rbuf = allocPinned(n * bs);
  try {
    for (let i = 0; i < n * bs; i++) wbuf.bytes[i] = (i * 7 + (i >> 12)) & 0xff;
    for (let i = 0; i < n; i++) assert.ok(ring.prepWrite(fd, wbuf.addressAt(i * bs), bs, i * bs, i) >= 0);
    for (let i = 0; i < n; i++) {
      // DRAIN on the first read: it (and everything after it) starts only after the writes finish.
      assert.ok(ring.prepRead(fd, rbuf.addressAt(i * bs), bs, i * bs, 100 + i, i === 0 ? IOSQE_IO_DRAIN : 0) >= 0);
    }
    assert.is(ring.submit(2 * n), 2 * n);
    const c = new Cqes();
    while (c.ud.length < 2 * n) {
      ring.reap(c.handler);
      if (c.ud.length < 2 * n) ring.submit(1);
    }
    assert.ok(c.res.every((r) => r === bs), `results ${c.res}`);
    assert.equal([...c.ud].sort((a, b) => a - b), [...Array(n).keys(), ...[...Array(n).keys()].map((i) => 100 + i)]);
    assert.ok(wbuf.bytes.equals(rbuf.bytes));
    assert.ok(fs.readFileSync(file).equals(wbuf.bytes));
  } finally {
    wbuf.free();
    rbuf.free();
    ring.close();
    fs.closeSync(fd);
  }
});

test('fsync / fdatasync succeed; a bad fd gives -EBADF, not an exception', () => {
  const fd = fs.openSync(tmpFile(), 'w+');
  const ring = new IoUring({ entries: 4 });
  try {
    ring.prepFsync(fd, false, 1);
    ring.prepFsync(fd, true, 2);
    ring.prepFsync(987654, true, 3);
    assert.is(ring.submit(3), 3);
    const c = new Cqes();
    ring.reap(c.handler);
    const byUd = new Map(c.ud.map((u, i) => [u, c.res[i]]));
    assert.is(byUd.get(1), 0);
    assert.is(byUd.get(2), 0);
    assert.is(byUd.get(3), -os.constants.errno.EBADF);
  } finally {
    ring.close();
    fs.closeSync(fd);
  }
});

test('fallocate PUNCH_HOLE|KEEP_SIZE reads back zeros and keeps the size', () => {
  const file = tmpFile();
  fs.writeFileSync(file, Buffer.alloc(64 * 1024, 0xab));
  const fd = fs.openSync(file, 'r+');
  const ring = new IoUring({ entries: 4 });
  try {
    ring.prepFallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 16 * 1024, 16 * 1024, 7);
    assert.is(ring.submit(1), 1);
    const c = new Cqes();
    ring.reap(c.handler);
    assert.equal(c.res, [0]);
    const data = fs.readFileSync(file);
    assert.is(data.length, 64 * 1024);
    assert.ok(data.subarray(16 * 1024, 32 * 1024).every((b) => b === 0));
    assert.ok(data.subarray(0, 16 * 1024).every((b) => b === 0xab));
    assert.ok(data.subarray(32 * 1024).every((b) => b === 0xab));
  } finally {
    ring.close();
    fs.closeSync(fd);
  }
});

test('many more operations than ring entries: prep reports -EBUSY when full, every CQE arrives once', () => {
  const ring = new IoUring({ entries: 8 });
  try {
    const total = 5000;
    const seen = new Uint8Array(total);
    let got = 0;
    const handler = (ud: number, res: number) => {
      assert.is(res, 0);
      seen[ud]++;
      got++;
    };
    let next = 0;
    let busy = 0;
    while (got < total) {
      while (next < total) {
        const r = ring.prepNop(next);
        if (r < 0) {
          assert.is(r, -os.constants.errno.EBUSY);
          busy++;
          break;
        }
        next++;
      }
      assert.ok(ring.submit(1) >= 0);
      ring.reap(handler);
    }
    assert.ok(busy > 0, 'the SQ should have filled up at least once');
    assert.ok(seen.every((s) => s === 1));
  } finally {
    ring.close();
  }
});

test('CQ overflow: completions beyond the CQ size are kept by the kernel and reaped later', () => {
  const ring = new IoUring({ entries: 4, cqEntries: 8 });
  try {
    assert.is(ring.cqEntries, 8);
    assert.ok(ring.features & IORING_FEAT_NODROP, 'kernel must have IORING_FEAT_NODROP');
    // 24 completions into an 8-entry CQ without reaping in between.
    for (let round = 0; round < 6; round++) {
      for (let i = 0; i < 4; i++) assert.ok(ring.prepNop(round * 4 + i) >= 0);
      const r = ring.submit(0);
      assert.is(r, 4, `round ${round}: submit returned ${r}`);
    }
    assert.is(ring.cqReady(), 8, 'the CQ is full; the rest sit on the kernel overflow list');
    const c = new Cqes();
    // One reap() call must drain the ring, have the kernel flush its overflow list, and go on.
    assert.is(ring.reap(c.handler), 24);
    assert.equal([...c.ud].sort((a, b) => a - b), [...Array(24).keys()]);
    assert.is(ring.cqOverflowCount(), 0, 'nothing dropped');
  } finally {
    ring.close();
  }
});

test('SQE128 ring: URING_CMD opcode, cmd_op and a 32-byte payload land at the right SQE offsets', () => {
  const ring = new IoUring({ entries: 4, flags: IORING_SETUP_SQE128 });
  try {
    assert.is(ring.sqeSize, 128);
    // Dirty the slots so we can see that unused fields are zeroed.
    ring.sqeBytes.fill(0xee);
    const payload = new Uint8Array(32).map((_, i) => i + 1);
    const cmdOp = 0xc0207504; // UBLK_U_CMD_ADD_DEV
    const ud = 2 ** 33 + 5;
    const idx = ring.prepUringCmd(42, cmdOp, payload, ud, IOSQE_FIXED_FILE);
    assert.ok(idx >= 0);
    const v = ring.sqeView;
    const o = ring.sqeOffset(idx);
    assert.is(o % 128, 0);
    assert.is(v.getUint8(o + 0), IORING_OP_URING_CMD);
    assert.is(v.getUint8(o + 1), IOSQE_FIXED_FILE);
    assert.is(v.getUint16(o + 2, true), 0, 'ioprio');
    assert.is(v.getInt32(o + 4, true), 42, 'fd');
    assert.is(v.getUint32(o + 8, true), cmdOp, 'cmd_op');
    assert.is(v.getUint32(o + 12, true), 0, '__pad1');
    assert.is(v.getBigUint64(o + 16, true), 0n, 'addr');
    assert.is(v.getUint32(o + 24, true), 0, 'len');
    assert.is(v.getBigUint64(o + 32, true), BigInt(ud), 'user_data');
    assert.is(ring.cmdOffset(idx), o + SQE_CMD_OFFSET);
    assert.equal([...ring.sqeBytes.subarray(o + 48, o + 80)], [...payload]);
    assert.ok(ring.sqeBytes.subarray(o + 80, o + 128).every((b) => b === 0), 'rest of the 80-byte cmd area zeroed');
    ring.setSqeFlags(idx, 0);
    assert.is(v.getUint8(o + 1), 0);
    assert.is(v.getUint8(o + 0), IORING_OP_URING_CMD);
  } finally {
    ring.close();
  }
});

test('zero copy: URING_CMD carries the auto-registration slot in the SQE addr; user-copy offsets as ublk_cmd.h', () => {
  const ring = new IoUring({ entries: 4, flags: IORING_SETUP_SQE128 });
  try {
    const idx = ring.prepUringCmd(0, 0xc0107521, null, 3, IOSQE_FIXED_FILE, autoBufRegSqeAddr(77));
    const o = ring.sqeOffset(idx);
    // struct ublk_auto_buf_reg in sqe->addr: index in bits 0-15, flags and reserved 0.
    assert.is(ring.sqeView.getBigUint64(o + 16, true), 77n, 'sqe->addr = the slot');
    const plain = ring.prepUringCmd(0, 0xc0107521, null, 4, IOSQE_FIXED_FILE);
    assert.is(ring.sqeView.getBigUint64(ring.sqeOffset(plain) + 16, true), 0n, 'no slot: addr 0');
  } finally {
    ring.close();
  }
  // UBLKSRV_IO_BUF_OFFSET 0x80000000 + qid << 41 + tag << 25 + offset.
  assert.is(userCopyPosition(0, 0, 0), 0x80000000);
  assert.is(BigInt(userCopyPosition(3, 127, 4096)), 0x80000000n + (3n << 41n) + (127n << 25n) + 4096n);
});

test('sparse fixed-buffer table: READ_FIXED/WRITE_FIXED go through the slot named by buf_index; an empty slot faults', () => {
  const sys = syscalls()!;
  const file = tmpFile();
  fs.writeFileSync(file, Buffer.alloc(8192));
  const fd = fs.openSync(file, 'r+');
  const ring = new IoUring({ entries: 8 });
  const buf = allocPinned(8192);
  try {
    assert.is(ring.registerSparseBuffers(4), 0);
    // Fill slot 2 with our buffer (IORING_REGISTER_BUFFERS_UPDATE, as the kernel fills a slot for
    // ublk's AUTO_BUF_REG): struct io_uring_rsrc_update2 { offset, resv, data, tags, nr, resv2 }.
    const iov = new BigUint64Array([BigInt(buf.address), 8192n]);
    const upd = new BigUint64Array(4);
    upd[0] = 2n; // offset = slot 2
    upd[1] = sys.koffi.address(iov);
    upd[3] = 1n; // nr
    const r = sys.syscall6(SYS_io_uring_register, ring.fd, 16 /* IORING_REGISTER_BUFFERS_UPDATE */, Number(sys.koffi.address(upd)), 32, 0, 0);
    assert.is(r, 1, `buffers update: ${r < 0 ? sys.errno() : r}`);
    buf.bytes.fill(0x42, 4096, 8192);
    assert.ok(ring.prepWriteFixed(fd, buf.address + 4096, 4096, 0, 2, 1) >= 0);
    assert.is(ring.submit(1), 1);
    const c = new Cqes();
    ring.reap(c.handler);
    assert.equal(c.res, [4096]);
    assert.ok(fs.readFileSync(file).subarray(0, 4096).every((b) => b === 0x42), 'the file holds the slot\'s bytes');
    fs.writeSync(fd, Buffer.alloc(4096, 0x17), 0, 4096, 4096);
    assert.ok(ring.prepReadFixed(fd, buf.address, 4096, 4096, 2, 2) >= 0);
    assert.ok(ring.prepReadFixed(fd, buf.address, 4096, 0, 1, 3) >= 0); // slot 1: empty
    assert.is(ring.submit(2), 2);
    const d = new Cqes();
    ring.reap(d.handler);
    const byUd = new Map(d.ud.map((u, i) => [u, d.res[i]]));
    assert.is(byUd.get(2), 4096);
    assert.ok(buf.bytes.subarray(0, 4096).every((b) => b === 0x17), 'read into the slot\'s memory');
    assert.ok((byUd.get(3) ?? 0) < 0, `an empty slot fails (got ${byUd.get(3)})`);
  } finally {
    buf.free();
    ring.close();
    fs.closeSync(fd);
  }
});

test('64-byte SQE ring: 16-byte URING_CMD payload fits, 32 bytes is -EINVAL; a regular file rejects the command via its CQE', () => {
  const fd = fs.openSync(tmpFile(), 'w+');
  const ring = new IoUring({ entries: 4 });
  try {
    assert.is(ring.sqeSize, 64);
    assert.is(ring.prepUringCmd(fd, 0xc0107520, new Uint8Array(32), 1), -os.constants.errno.EINVAL);
    const io = new Uint8Array(16);
    new DataView(io.buffer).setUint16(2, 7, true); // ublksrv_io_cmd.tag
    const idx = ring.prepUringCmd(fd, 0xc0107520, io, 9);
    assert.ok(idx >= 0);
    assert.is(ring.sqeView.getUint16(ring.cmdOffset(idx) + 2, true), 7);
    assert.is(ring.submit(1), 1);
    const c = new Cqes();
    ring.reap(c.handler);
    assert.equal(c.ud, [9]);
    assert.ok(c.res[0] < 0, `expected a negative errno, got ${c.res[0]}`);
  } finally {
    ring.close();
    fs.closeSync(fd);
  }
});

test('IORING_REGISTER_FILES + IOSQE_FIXED_FILE reads through the registered index', () => {
  const file = tmpFile();
  fs.writeFileSync(file, Buffer.from('hello fixed file'));
  const fd = fs.openSync(file, 'r');
  const ring = new IoUring({ entries: 4 });
  const buf = allocPinned(4096);
  try {
    assert.is(ring.registerFiles([fd]), 0);
    const idx = ring.prepRead(0, buf.address, 16, 0, 1);
    ring.setSqeFlags(idx, IOSQE_FIXED_FILE);
    assert.is(ring.submit(1), 1);
    const c = new Cqes();
    ring.reap(c.handler);
    assert.equal(c.res, [16]);
    assert.is(buf.bytes.subarray(0, 16).toString(), 'hello fixed file');
    assert.is(ring.unregisterFiles(), 0);
  } finally {
    buf.free();
    ring.close();
    fs.closeSync(fd);
  }
});

test('pinned buffers are page-aligned; setup errors throw, closed rings return -EBADF', () => {
  const b = allocPinned(10000);
  assert.is(b.address % 4096, 0);
  assert.is(b.bytes.length, 10000);
  b.bytes.fill(3);
  b.free();
  b.free(); // idempotent
  assert.throws(() => new IoUring({ entries: 0 }), /entries/);
  assert.throws(() => new IoUring({ entries: 4, cqEntries: 1 << 30 }), /io_uring_setup.*EINVAL/);
  const ring = new IoUring({ entries: 2 });
  const fd = ring.fd;
  assert.ok(fs.fstatSync(fd));
  ring.close();
  assert.throws(() => fs.fstatSync(fd), /EBADF/, 'the ring fd is closed');
  assert.is(ring.submit(1), -os.constants.errno.EBADF);
  ring.close();
});

/** Rss and Size (bytes) of the mapping holding `address`, from /proc/self/smaps. */
function smapsOf(address: number): { rss: number; size: number } {
  let inside = false;
  let size = 0;
  for (const line of fs.readFileSync('/proc/self/smaps', 'utf8').split('\n')) {
    const range = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (range) {
      const lo = parseInt(range[1]!, 16);
      const hi = parseInt(range[2]!, 16);
      inside = lo <= address && address < hi;
      size = hi - lo;
      continue;
    }
    const rss = /^Rss:\s+(\d+) kB/.exec(line);
    if (inside && rss) return { rss: Number(rss[1]) * 1024, size };
  }
  throw new Error(`no mapping holds ${address.toString(16)}`);
}

test('unpopulated pinned buffers: resident only where touched; discard gives pages back and they read zeros', () => {
  const MiB = 1024 * 1024;
  const populated = allocPinned(8 * MiB);
  const lazy = allocPinned(64 * MiB, { populate: false });
  try {
    assert.ok(smapsOf(populated.address).rss >= 8 * MiB, 'the default still faults every page in at mmap');
    // The kernel may merge the mapping with an anonymous neighbour: compare against what it held at first.
    const { rss: fresh, size } = smapsOf(lazy.address);
    assert.ok(size >= 64 * MiB);
    assert.ok(fresh < 4 * MiB, `a fresh 64 MiB buffer is not resident (Rss ${fresh})`);
    const at = 40 * MiB + 8192;
    lazy.bytes.fill(0x5a, at, at + 100);
    const touched = smapsOf(lazy.address).rss;
    assert.is(touched - fresh, 4096, 'one touched page: 4 KiB (no huge page)');
    assert.is(lazy.discard(at + 100, 4096), 0, 'only whole pages inside the range are discarded');
    assert.is(smapsOf(lazy.address).rss, touched);
    assert.is(lazy.discard(40 * MiB, MiB), MiB);
    assert.is(smapsOf(lazy.address).rss, fresh, 'back to what it was');
    assert.ok(lazy.bytes.subarray(at, at + 100).every((b) => b === 0), 'discarded pages read zeros');
  } finally {
    populated.free();
    lazy.free();
  }
});

// --- storage/uring-file.ts -----------------------------------------------------------------------

test('UringFile: write/read/flush/zeroRange/truncate round trip, zero-filled read past EOF', async () => {
  const backend = new UringIoBackend({ entries: 16 });
  const file = tmpFile();
  const f = await backend.open(file, { create: true });
  try {
    assert.is(f.isBlockDevice, false);
    assert.is(f.size(), 0);
    const data = Buffer.alloc(256 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = (i * 31) & 0xff;
    await f.write(data, 4096);
    assert.is(f.size(), 4096 + data.length);
    await f.flush();
    const back = Buffer.alloc(data.length);
    await f.read(back, 4096);
    assert.ok(back.equals(data));
    // Tiny (on-heap) typed array.
    const small = new Uint8Array(3);
    await f.read(small, 4097);
    assert.equal([...small], [...data.subarray(1, 4)]);
    // Straddling end of file: the tail reads as zeros.
    const tail = Buffer.alloc(8192, 0x55);
    await f.read(tail, 4096 + data.length - 4096);
    assert.ok(tail.subarray(0, 4096).equals(data.subarray(data.length - 4096)));
    assert.ok(tail.subarray(4096).every((b) => b === 0));
    await f.zeroRange(4096 + 65536, 65536);
    await f.flush();
    const z = Buffer.alloc(65536 + 8192);
    await f.read(z, 4096 + 65536 - 4096);
    assert.ok(z.subarray(0, 4096).equals(data.subarray(65536 - 4096, 65536)));
    assert.ok(z.subarray(4096, 4096 + 65536).every((b) => b === 0));
    assert.ok(z.subarray(4096 + 65536).equals(data.subarray(131072, 131072 + 4096)));
    assert.is(f.size(), 4096 + data.length, 'zeroRange keeps the size');
    await f.truncate(1000);
    assert.is(f.size(), 1000);
    assert.is(fs.statSync(file).size, 1000);
  } finally {
    await f.close();
    backend.close();
  }
});

test('UringFile: far more concurrent operations than slots, each lands at its own offset', async () => {
  const backend = new UringIoBackend({ entries: 4 });
  const f = await backend.open(tmpFile(), { create: true });
  try {
    const n = 200;
    await Promise.all(Array.from({ length: n }, (_, i) => f.write(Buffer.alloc(512, i & 0xff), i * 512)));
    const bufs = Array.from({ length: n }, () => Buffer.alloc(512));
    await Promise.all(bufs.map((b, i) => f.read(b, i * 512)));
    bufs.forEach((b, i) => assert.ok(b.every((x) => x === (i & 0xff)), `block ${i}`));
    assert.is(backend.driver.inFlight, 0);
  } finally {
    await f.close();
    backend.close();
  }
});

test('UringFile: errors reject with errno codes; read-only files refuse writes', async () => {
  const file = tmpFile();
  fs.writeFileSync(file, 'abc');
  const backend = new UringIoBackend({ entries: 4 });
  const ro = await backend.open(file, { readOnly: true });
  try {
    assert.is(ro.readOnly, true);
    await ro.write(Buffer.from('x'), 0).then(
      () => assert.unreachable('write on a read-only file'),
      (e) => assert.is(e.code, 'EROFS'),
    );
    // Bypass the read-only check: the kernel's own error comes back as a rejection.
    const fd = fs.openSync(file, 'r');
    await backend.driver.write(fd, file, Buffer.from('x'), 0).then(
      () => assert.unreachable('kernel should refuse'),
      (e: NodeJS.ErrnoException) => {
        assert.is(e.code, 'EBADF');
        assert.is(e.errno, -os.constants.errno.EBADF);
      },
    );
    fs.closeSync(fd);
    await backend.open(path.join(tmpDir, 'missing'), { readOnly: true }).then(
      () => assert.unreachable('missing file opened'),
      (e: NodeJS.ErrnoException) => assert.is(e.code, 'ENOENT'),
    );
  } finally {
    await ro.close();
    backend.close();
  }
});

test('UringIoBackend.open: exclusive locks conflict, character devices are refused, zeroRange past EOF is a no-op', async () => {
  const backend = new UringIoBackend({ entries: 4 });
  const file = tmpFile();
  const a = await backend.open(file, { create: true, lock: 'exclusive' });
  try {
    await backend.open(file, { lock: 'exclusive' }).then(
      (b) => (b.close(), assert.unreachable('second exclusive lock granted')),
      (e) => assert.is(e.code, 'EBUSY'),
    );
    await backend.open('/dev/null').then(
      (b) => (b.close(), assert.unreachable('/dev/null opened')),
      (e) => assert.is(e.code, 'EINVAL'),
    );
    await a.write(Buffer.alloc(4096, 1), 0);
    await a.zeroRange(2048, 1 << 20);
    assert.is(a.size(), 4096);
    assert.is(fs.statSync(file).size, 4096);
    const back = Buffer.alloc(4096);
    await a.read(back, 0);
    assert.ok(back.subarray(0, 2048).every((x) => x === 1) && back.subarray(2048).every((x) => x === 0));
  } finally {
    await a.close();
    backend.close();
  }
});

test('UringFileDriver manual mode: nothing moves until the owner polls', async () => {
  let queued = 0;
  const driver = new UringFileDriver({ entries: 8, drive: 'manual', userDataBase: 1000, onQueued: () => queued++ });
  const file = tmpFile();
  const fd = fs.openSync(file, 'w+');
  try {
    let done = false;
    const p = driver.write(fd, file, Buffer.from('manual'), 0).then(() => (done = true));
    assert.ok(queued > 0);
    await new Promise((r) => setImmediate(r));
    assert.is(done, false, 'no auto drive in manual mode');
    assert.is(driver.inFlight, 1);
    while (driver.inFlight > 0) driver.submitAndWait(1);
    await p;
    assert.is(done, true);
    assert.is(fs.readFileSync(file, 'utf8'), 'manual');
  } finally {
    driver.close();
    fs.closeSync(fd);
  }
});

test.after(() => fs.rmSync(tmpDir, { recursive: true, force: true }));

test.run();
