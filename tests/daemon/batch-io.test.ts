// Batched ublk commands (daemon/ublk/batch-io.ts) without a device: the SQEs and element buffers
// they build (as the 7.x driver reads them), the commit gating that keeps an element buffer
// unwritten until its command was consumed, and what fetch CQEs deliver. The driver's side runs in
// the device suite (tests/vm/e2e/22-batch-io.sh, Linux 7.0+).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  IoUring,
  IORING_CQE_F_MORE,
  IORING_OP_URING_CMD,
  IORING_URING_CMD_MULTISHOT,
  IOSQE_BUFFER_SELECT,
  IOSQE_FIXED_FILE,
} from '../../ffi/uring.js';
import { syscalls } from '../../ffi/syscalls.js';
import { UBLK_BATCH_F_HAS_BUF_ADDR, UBLK_U_IO_COMMIT_IO_CMDS, UBLK_U_IO_FETCH_IO_CMDS, UBLK_U_IO_PREP_IO_CMDS } from '../../daemon/ublk/abi.js';
import { BATCH_SLOT_COMMIT, BATCH_SLOT_PREP, BatchCommands } from '../../daemon/ublk/batch-io.js';
import { UD_KIND_BATCH, decodeUserData } from '../../daemon/ublk/user-data.js';

const sys = syscalls();
const QID = 3;
const DEPTH = 4;
const MAX_IO = 65536;
const BUF = 0x7f0000000000;
const ENOBUFS = -105;
const ENODEV = -19;
const EINVAL = -22;
const EIO = -5;

interface Sqe {
  op: number;
  flags: number;
  cmdOp: number;
  addr: number;
  len: number;
  cmdFlags: number;
  bufGroup: number;
  userData: { tag: number; kind: number; targetData: number };
  qid: number;
  hdrFlags: number;
  nrElem: number;
  elemBytes: number;
}

/** The SQEs prepared since `from` (not submitted: these tests stand in for the kernel). */
function sqes(ring: IoUring, from: number): Sqe[] {
  const v = ring.sqeView;
  const out: Sqe[] = [];
  for (let i = from; i < ring.unsubmitted; i++) {
    const o = ring.sqeOffset(i);
    const c = ring.cmdOffset(i);
    out.push({
      op: v.getUint8(o),
      flags: v.getUint8(o + 1),
      cmdOp: v.getUint32(o + 8, true),
      addr: Number(v.getBigUint64(o + 16, true)),
      len: v.getUint32(o + 24, true),
      cmdFlags: v.getUint32(o + 28, true),
      bufGroup: v.getUint16(o + 40, true),
      userData: decodeUserData(Number(v.getBigUint64(o + 32, true))),
      qid: v.getUint16(c, true),
      hdrFlags: v.getUint16(c + 2, true),
      nrElem: v.getUint16(c + 4, true),
      elemBytes: v.getUint8(c + 6),
    });
  }
  return out;
}

/** The elements of a PREP/COMMIT SQE, read from its memory as the driver does. */
function elements(s: Sqe): { tag: number; bufIndex: number; result: number; addr: number | null }[] {
  const view = new DataView(sys!.koffi.view(BigInt(s.addr), s.len));
  const out = [];
  for (let at = 0; at < s.len; at += s.elemBytes) {
    out.push({
      tag: view.getUint16(at, true),
      bufIndex: view.getUint16(at + 2, true),
      result: view.getInt32(at + 4, true),
      addr: s.elemBytes === 16 ? Number(view.getBigUint64(at + 8, true)) : null,
    });
  }
  return out;
}

function setup(copy: boolean) {
  const ring = new IoUring({ entries: 16 });
  const arrived: number[] = [];
  const logged: string[] = [];
  const batch = new BatchCommands({
    ring,
    qid: QID,
    depth: DEPTH,
    copyBuffers: copy ? { bufferAddress: BUF, maxIo: MAX_IO } : null,
    host: { arrive: (tag) => arrived.push(tag), log: (m) => logged.push(m) },
  });
  const close = () => {
    ring.close();
    batch.free();
  };
  return { ring, batch, arrived, logged, close };
}

/** Writes `tags` at byte `at` of fetch group `group`'s buffer, as the kernel would. */
function deliver(batch: BatchCommands, group: number, at: number, tags: number[]): void {
  const view = new DataView(sys!.koffi.view(BigInt(batch.fetchBufferAddress(group) + at), tags.length * 2));
  tags.forEach((t, i) => view.setUint16(i * 2, t, true));
}

test('start: PREP of every tag with its buffer address (copy mode), then two multishot fetches, each on its buffer group', () => {
  if (!sys) return console.log('# skip - no koffi');
  const { ring, batch, close } = setup(true);
  try {
    batch.start();
    const [prep, f0, f1, extra] = sqes(ring, 0);
    assert.is(extra, undefined, 'three SQEs');
    assert.is(prep!.op, IORING_OP_URING_CMD);
    assert.is(prep!.flags, IOSQE_FIXED_FILE);
    assert.is(prep!.cmdOp, UBLK_U_IO_PREP_IO_CMDS);
    assert.equal([prep!.qid, prep!.hdrFlags, prep!.nrElem, prep!.elemBytes], [QID, UBLK_BATCH_F_HAS_BUF_ADDR, DEPTH, 16]);
    assert.is(prep!.len, DEPTH * 16, 'sqe->len: the elements\' bytes');
    assert.equal(prep!.userData, { tag: BATCH_SLOT_PREP, kind: UD_KIND_BATCH, targetData: 0 });
    assert.equal(elements(prep!), [0, 1, 2, 3].map((t) => ({ tag: t, bufIndex: t, result: 0, addr: BUF + t * MAX_IO })));
    for (const [g, f] of [[0, f0], [1, f1]] as const) {
      assert.is(f!.cmdOp, UBLK_U_IO_FETCH_IO_CMDS);
      assert.is(f!.flags, IOSQE_FIXED_FILE | IOSQE_BUFFER_SELECT);
      assert.is(f!.cmdFlags, IORING_URING_CMD_MULTISHOT, 'uring_cmd_flags: multishot');
      assert.is(f!.bufGroup, g, 'its own buffer group');
      assert.equal([f!.qid, f!.hdrFlags, f!.elemBytes], [QID, 0, 2]);
      assert.is(f!.nrElem, 2048, 'a page of u16 tags');
      assert.equal(f!.userData, { tag: g, kind: UD_KIND_BATCH, targetData: 0 });
    }
  } finally {
    close();
  }
});

test('zero copy: 8-byte elements carrying the fixed-buffer slot, no address, no HAS_BUF_ADDR', () => {
  if (!sys) return console.log('# skip - no koffi');
  const { ring, batch, close } = setup(false);
  try {
    batch.start();
    const [prep] = sqes(ring, 0);
    assert.equal([prep!.hdrFlags, prep!.elemBytes, prep!.len], [0, 8, DEPTH * 8]);
    assert.equal(elements(prep!), [0, 1, 2, 3].map((t) => ({ tag: t, bufIndex: t, result: 0, addr: null })));
    batch.submitted(0);
    batch.add(2, 512);
    batch.flush();
    const [commit] = sqes(ring, 3);
    assert.equal(elements(commit!), [{ tag: 2, bufIndex: 2, result: 512, addr: null }]);
  } finally {
    close();
  }
});

test('commit: one SQE per turn with every result; none cut while the previous command is unconsumed; buffers alternate', () => {
  if (!sys) return console.log('# skip - no koffi');
  const { ring, batch, close } = setup(true);
  try {
    batch.start();
    batch.add(3, 4096);
    batch.add(0, EIO);
    batch.flush();
    assert.is(ring.unsubmitted, 3, 'PREP not consumed yet: its buffer is not reused, no commit cut');
    assert.is(batch.uncommitted, 2);
    batch.submitted(2);
    batch.flush();
    assert.is(ring.unsubmitted, 3, 'a short submit leaves the gate shut');
    batch.submitted(0);
    batch.flush();
    const [c1] = sqes(ring, 3);
    assert.is(c1!.cmdOp, UBLK_U_IO_COMMIT_IO_CMDS);
    assert.equal([c1!.qid, c1!.hdrFlags, c1!.nrElem, c1!.elemBytes, c1!.len], [QID, UBLK_BATCH_F_HAS_BUF_ADDR, 2, 16, 32]);
    assert.equal(c1!.userData, { tag: BATCH_SLOT_COMMIT, kind: UD_KIND_BATCH, targetData: 2 });
    assert.equal(elements(c1!), [
      { tag: 3, bufIndex: 3, result: 4096, addr: BUF + 3 * MAX_IO },
      { tag: 0, bufIndex: 0, result: EIO, addr: BUF },
    ]);
    assert.is(batch.uncommitted, 0);
    // The next completions go to the other buffer; c1's stays as the kernel would read it.
    batch.add(1, 8192);
    batch.flush();
    assert.is(ring.unsubmitted, 4, 'c1 not consumed: no second commit yet');
    batch.submitted(0);
    batch.flush();
    const [c2] = sqes(ring, 4);
    assert.is.not(c2!.addr, c1!.addr, 'the other buffer');
    assert.equal(elements(c2!), [{ tag: 1, bufIndex: 1, result: 8192, addr: BUF + MAX_IO }]);
    assert.equal(elements(c1!).map((e) => e.tag), [3, 0], 'the first commit\'s elements untouched');
    batch.submitted(0);
    batch.flush();
    assert.is(ring.unsubmitted, 5, 'nothing to commit: no SQE');
  } finally {
    close();
  }
});

test('fetch CQEs: tags delivered in order from where the last CQE stopped; a spent buffer re-armed; ENODEV on both ends the queue', () => {
  if (!sys) return console.log('# skip - no koffi');
  const { ring, batch, arrived, logged, close } = setup(true);
  try {
    batch.start();
    deliver(batch, 0, 0, [2, 0]);
    batch.onCqe(0, 4, IORING_CQE_F_MORE, 0, true);
    assert.equal(arrived, [2, 0]);
    deliver(batch, 0, 4, [3]);
    batch.onCqe(0, 2, IORING_CQE_F_MORE, 0, true);
    assert.equal(arrived, [2, 0, 3], 'incremental: the next CQE\'s tags follow the previous ones');
    assert.is(ring.unsubmitted, 3);
    batch.onCqe(0, ENOBUFS, 0, 0, true);
    const [again] = sqes(ring, 3);
    assert.equal([again!.cmdOp, again!.bufGroup, again!.cmdFlags], [UBLK_U_IO_FETCH_IO_CMDS, 0, IORING_URING_CMD_MULTISHOT], 'group 0 re-armed');
    deliver(batch, 0, 0, [1]);
    batch.onCqe(0, 2, IORING_CQE_F_MORE, 0, true);
    assert.equal(arrived, [2, 0, 3, 1], 'the re-armed buffer is read from its start');
    deliver(batch, 1, 0, [0, 2]);
    batch.onCqe(1, 4, 0, 0, false);
    assert.equal(arrived, [2, 0, 3, 1, 0, 2], 'tags of a last CQE still delivered');
    assert.is(ring.unsubmitted, 4, 'stopping: not re-armed');
    assert.not.ok(batch.done, 'one fetch left');
    batch.onCqe(0, ENODEV, 0, 0, true);
    assert.ok(batch.done, 'both fetches ended');
    assert.equal(logged, [], 'the ends of a stop are not failures');
  } finally {
    close();
  }
});

test('failures: a failed PREP ends the queue in one line; a short commit and an unexpected fetch error are logged', () => {
  if (!sys) return console.log('# skip - no koffi');
  const { batch, logged, close } = setup(true);
  try {
    batch.start();
    batch.onCqe(BATCH_SLOT_COMMIT, 32, 0, 2, true);
    assert.equal(logged, [], 'a whole commit says nothing');
    batch.onCqe(BATCH_SLOT_COMMIT, 16, 0, 2, true);
    batch.onCqe(BATCH_SLOT_COMMIT, EINVAL, 0, 1, true);
    assert.equal(logged, [`queue ${QID}: COMMIT_IO_CMDS took 1 of 2 results`, `queue ${QID}: COMMIT_IO_CMDS took 0 of 1 results: EINVAL`]);
    batch.onCqe(1, EIO, 0, 0, true);
    assert.is(logged[2], `queue ${QID}: FETCH_IO_CMDS ended: EIO`);
    assert.not.ok(batch.done);
    batch.onCqe(BATCH_SLOT_PREP, EINVAL, 0, 0, true);
    assert.ok(batch.done, 'no tag prepared: no request will come');
    assert.is(logged[3], `queue ${QID}: PREP_IO_CMDS failed: EINVAL`);
  } finally {
    close();
  }
});

test.run();
