/**
 * The volatile pending log (fvd/pending-log.ts, FORMAT.md §14): format, identity checks, torn
 * records, the journal hook, and the process-crash case it exists for: acknowledged writes that
 * were never flushed read back after the process died, once the log is applied.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { checkImage } from '../../fvd/check.js';
import { crc } from '../../fvd/format.js';
import { Journal, type JournalSink } from '../../fvd/journal.js';
import type { BlockFile } from '../../fvd/io.js';
import {
  PENDING_LOG_HEADER,
  PENDING_RECORD,
  PendingLogWriter,
  QueueLogWriter,
  applyPendingLog,
  existingQueueLogs,
  parsePendingLog,
  queueLogPath,
  readPendingLog,
} from '../../fvd/pending-log.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-pending-'));
const BOOT = '0b8e3c1a-5d7f-4a2b-9c6e-1f0d2e3a4b5c';
let n = 0;

function logId(fileId = '8:1/12345') {
  return { path: path.join(dir, `pending-${n++}.log`), bootId: BOOT, fileId };
}

function collect(): JournalSink & { ops: string[] } {
  const s = { ops: [] as string[], bitmapSet(a: number, c: number) { s.ops.push(`b${a}+${c}`); }, tableSet(c: number, id: number) { s.ops.push(`t${c}=${id}`); } };
  return s;
}

test('format: records round trip; committedSeq hides the committed prefix', () => {
  const id = logId();
  const w = PendingLogWriter.create(id, 10);
  w.bitmapSet(5, 3);
  w.tableSet(2, 77);
  w.bitmapSet(100, 1);
  assert.is(w.lastSeq, 13);
  let log = readPendingLog(id);
  assert.is(log.status, 'valid');
  assert.equal(log.records.map((r) => r.seq), [11, 12, 13]);
  let s = collect();
  assert.is(applyPendingLog(log, s), 3);
  assert.equal(s.ops, ['b5+3', 't2=77', 'b100+1']);
  // A commit that took the first two records (a third was appended meanwhile): only 13 is left.
  w.markCommitted(12);
  log = readPendingLog(id);
  s = collect();
  assert.is(applyPendingLog(log, s), 1);
  assert.equal(s.ops, ['b100+1']);
  assert.is(fs.statSync(id.path).size, PENDING_LOG_HEADER + 3 * PENDING_RECORD, 'not truncated: 13 is not committed');
  // Everything committed: the records are dropped, the sequence continues.
  w.markCommitted(13);
  assert.is(fs.statSync(id.path).size, PENDING_LOG_HEADER);
  w.tableSet(9, 1);
  log = readPendingLog(id);
  assert.equal(log.records.map((r) => r.seq), [14]);
  assert.is(log.committedSeq, 13);
  w.close(true);
  assert.not.ok(fs.existsSync(id.path));
  assert.is(readPendingLog(id).status, 'absent');
});

/** An independent encoding of one record (BigInt u64s), to check the writer's in-place one. */
function referenceRecord(seq: number, kind: number, a: number, b: number): Uint8Array {
  const r = new Uint8Array(PENDING_RECORD);
  const dv = new DataView(r.buffer);
  dv.setBigUint64(0, BigInt(seq), true);
  dv.setUint16(8, kind, true);
  dv.setUint32(12, b, true);
  dv.setBigUint64(16, BigInt(a), true);
  dv.setUint32(28, crc(r.subarray(0, 28)), true);
  return r;
}

test('held batches: in-place records byte for byte, sequence past 2^32, a batch beyond the first buffer', () => {
  const id = logId();
  const start = 2 ** 32 - 3; // the batch's sequence numbers cross the u32 boundary
  const w = PendingLogWriter.create(id, start);
  w.bitmapSet(2 ** 40 + 7, 1); // unheld, a block number above 2^32
  w.hold();
  const batch = 40; // more than the 16 records the held buffer starts with
  for (let i = 0; i < batch; i++) w.bitmapSet(1000 + i, i + 1);
  assert.is(readPendingLog(id).records.length, 1, 'held records are not in the file before release');
  w.release();
  w.hold();
  w.tableSet(3, 9); // a second, smaller batch in the grown (reused) buffer
  w.release();
  const bytes = fs.readFileSync(id.path);
  const want = [referenceRecord(start + 1, 1, 2 ** 40 + 7, 1)];
  for (let i = 0; i < batch; i++) want.push(referenceRecord(start + 2 + i, 1, 1000 + i, i + 1));
  want.push(referenceRecord(start + 2 + batch, 2, 3, 9));
  assert.is(bytes.length, PENDING_LOG_HEADER + want.length * PENDING_RECORD);
  want.forEach((r, i) => assert.equal(bytes.subarray(PENDING_LOG_HEADER + i * PENDING_RECORD, PENDING_LOG_HEADER + (i + 1) * PENDING_RECORD), Buffer.from(r), `record ${i}`));
  const log = readPendingLog(id);
  assert.equal(log.records.map((r) => r.seq), want.map((_, i) => start + 1 + i));
  assert.is(log.records[0]!.a, 2 ** 40 + 7);
  // The committed mark (8 bytes, written from the same scratch buffer) above 2^32 as well.
  w.markCommitted(start + 5);
  assert.is(readPendingLog(id).committedSeq, start + 5);
  assert.is(readPendingLog(id).records.length, want.length, 'not everything committed: nothing dropped');
  w.close(true);
});

test('a torn record ends the log: the records before it apply, none after', () => {
  const id = logId();
  const w = PendingLogWriter.create(id);
  for (let i = 0; i < 5; i++) w.bitmapSet(i * 10, 1);
  w.close(false);
  const bytes = fs.readFileSync(id.path);
  bytes[PENDING_LOG_HEADER + 2 * PENDING_RECORD + 17] ^= 0x40; // record 3 of 5
  const s = collect();
  assert.is(applyPendingLog(parsePendingLog(bytes, BOOT, id.fileId), s), 2);
  assert.equal(s.ops, ['b0+1', 'b10+1']);
  // A half-written last record (short file) is the end too.
  const short = fs.readFileSync(id.path).subarray(0, PENDING_LOG_HEADER + 4 * PENDING_RECORD + 11);
  assert.is(parsePendingLog(short, BOOT, id.fileId).records.length, 4);
});

test('identity: another boot or another file is refused; a damaged header too', () => {
  const id = logId();
  const w = PendingLogWriter.create(id);
  w.bitmapSet(1, 1);
  w.close(false);
  const bytes = fs.readFileSync(id.path);
  assert.is(parsePendingLog(bytes, BOOT, id.fileId).status, 'valid');
  const other = parsePendingLog(bytes, BOOT.replace('0b8e', '1111'), id.fileId);
  assert.is(other.status, 'boot-mismatch');
  assert.is(applyPendingLog(other, collect()), 0);
  assert.is(parsePendingLog(bytes, BOOT, '8:1/99').status, 'file-mismatch');
  const bad = Buffer.from(bytes);
  bad[20] ^= 1;
  assert.is(parsePendingLog(bad, BOOT, id.fileId).status, 'bad-header');
});

/** A BlockFile that accepts everything (the journal's writes go nowhere). */
function nullFile(size: number, onFlush: () => Promise<void> = async () => {}): BlockFile {
  return {
    path: 'mem', readOnly: false, isBlockDevice: false,
    async read(buf) { buf.fill(0); }, async write() {}, flush: () => onFlush(), async zeroRange() {},
    size: () => size, async truncate() {}, async close() {},
  };
}

test('journal hook: queued records are appended at once; a commit marks them committed', async () => {
  const id = logId();
  const w = PendingLogWriter.create(id);
  // The commit's first fdatasync waits until the test lets it go: by then the batch is taken.
  let entered!: () => void;
  const inFlush = new Promise<void>((r) => (entered = r));
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  let first = true;
  const flush = async () => {
    if (!first) return;
    first = false;
    entered();
    await gate;
  };
  const j = new Journal(nullFile(1 * MiB, flush), 0, 64 * KiB, 1, 0, { async checkpoint() {} }, () => {});
  j.attachPendingLog(w);
  j.pending.addBitmap(3, 2);
  j.pending.addTable(7, 8);
  assert.is(readPendingLog(id).records.length, 2, 'appended synchronously, before any commit');
  const commit = j.commit();
  await inFlush;
  j.pending.addBitmap(50, 1); // queued during the commit: not covered by it
  release();
  await commit;
  const log = readPendingLog(id);
  assert.is(log.committedSeq, 2);
  const s = collect();
  applyPendingLog(log, s);
  assert.equal(s.ops, ['b50+1']);
  await j.commit();
  assert.is(readPendingLog(id).records.length, 0, 'all committed: the log is empty again');
  w.close(true);
});

const base = (() => {
  const data = Buffer.alloc(2 * MiB);
  for (let i = 0; i < data.length; i++) data[i] = (i * 131 + (i >> 9)) & 0xff || 1;
  const file = path.join(dir, 'base.raw');
  fs.writeFileSync(file, data);
  return { file, data };
})();

async function fresh(opts: CreateOptions): Promise<{ file: string; log: ReturnType<typeof logId> }> {
  const file = path.join(dir, `img${n++}.fvd`);
  await FvdImage.create(nodeIo, file, opts);
  const st = fs.statSync(file);
  return { file, log: logId(`${st.dev}:${st.ino}`) };
}

async function readAll(img: FvdImage, off: number, len: number): Promise<Buffer> {
  const b = Buffer.alloc(len);
  await img.read(b, off);
  return b;
}

/** Writes 16 KiB patterns at odd offsets (partial blocks: copy from the base, new chunks). */
async function writePattern(img: FvdImage, count: number, salt: number): Promise<void> {
  for (let i = 0; i < count; i++) await img.write(Buffer.alloc(16 * KiB, (i + salt) & 0xff || 1), i * 96 * KiB + 1536);
}

async function expectPattern(img: FvdImage, count: number, salt: number, what: string): Promise<void> {
  for (let i = 0; i < count; i++) {
    const off = i * 96 * KiB + 1536;
    assert.ok((await readAll(img, off, 16 * KiB)).every((b) => b === ((i + salt) & 0xff || 1)), `${what}: write ${i}`);
    assert.ok((await readAll(img, off - 1536, 1536)).equals(base.data.subarray(off - 1536, off)), `${what}: base head ${i}`);
  }
}

const cases: Array<[string, CreateOptions]> = [
  ['raw-like with a base', { base: base.file, baseFormat: 'raw', layout: 'raw', size: 4 * MiB, blockSize: 16 * KiB, chunkSize: 64 * KiB }],
  ['compact with a base', { base: base.file, baseFormat: 'raw', layout: 'compact', size: 4 * MiB, blockSize: 16 * KiB, chunkSize: 64 * KiB }],
  ['compact without a base (allocation only)', { layout: 'compact', size: 4 * MiB, blockSize: 16 * KiB, chunkSize: 64 * KiB }],
];

for (const [name, opts] of cases) {
  const hasBase = !!opts.base;
  const expect = async (img: FvdImage, count: number, salt: number, what: string) => {
    if (hasBase) return expectPattern(img, count, salt, what);
    for (let i = 0; i < count; i++) {
      assert.ok((await readAll(img, i * 96 * KiB + 1536, 16 * KiB)).every((b) => b === ((i + salt) & 0xff || 1)), `${what}: write ${i}`);
    }
  };

  test(`${name}: process crash without a flush: the pending log brings back every acknowledged write`, async () => {
    const { file, log } = await fresh(opts);
    let img = await FvdImage.open(nodeIo, file, { copyOnRead: false, pendingLog: log });
    await writePattern(img, 12, 1);
    assert.ok(readPendingLog(log).records.length > 0, 'the writes logged records');
    const saved = fs.readFileSync(log.path);
    await img.abandon(); // SIGKILL: completed writes are in the page cache, records only in the log
    assert.ok(fs.existsSync(log.path), 'the log outlives the process');

    // Without the log the acknowledged writes are lost (the records were never committed): the
    // case the log exists for. The image is copied so the real reopen below sees the crash state.
    const copy = path.join(dir, `copy${n++}.fvd`);
    fs.copyFileSync(file, copy);
    const blind = await FvdImage.open(nodeIo, copy, { readOnly: true });
    let lost = false;
    for (let i = 0; i < 12 && !lost; i++) lost = !(await readAll(blind, i * 96 * KiB + 1536, 16 * KiB)).every((b) => b === ((i + 1) & 0xff || 1));
    assert.ok(lost, 'without the log some write is lost');
    await blind.close();

    img = await FvdImage.open(nodeIo, file, { copyOnRead: false, pendingLog: log });
    assert.ok(img.pendingApplied > 0);
    await expect(img, 12, 1, 'after recovery');
    assert.ok(fs.readFileSync(log.path).length === PENDING_LOG_HEADER, 'a fresh, empty log replaced the applied one');
    // More writes, a second crash, a second recovery over the first one's checkpoint.
    await writePattern(img, 6, 40);
    await img.abandon();
    img = await FvdImage.open(nodeIo, file, { pendingLog: log });
    await expect(img, 6, 40, 'second recovery');
    await img.close();
    assert.not.ok(fs.existsSync(log.path), 'a clean close removes the log');
    // Reopen after the apply: the records are in the image now, no log needed.
    img = await FvdImage.open(nodeIo, file, { readOnly: true });
    await expect(img, 6, 40, 'reopen');
    assert.is(img.stats().wasDirty, false);
    await img.close();
    const report = await checkImage(nodeIo, file);
    assert.equal(report.errors, []);
    assert.is(report.leaks, 0);

    // The log saved before the first crash belongs to another boot: refused, data not restored.
    const other = await fresh(opts);
    img = await FvdImage.open(nodeIo, other.file, { copyOnRead: false, pendingLog: other.log });
    await writePattern(img, 4, 7);
    const otherLog = fs.readFileSync(other.log.path);
    await img.abandon();
    fs.writeFileSync(other.log.path, otherLog);
    img = await FvdImage.open(nodeIo, other.file, { pendingLog: { ...other.log, bootId: 'another-boot' } });
    assert.is(img.pendingApplied, 0, 'bootId mismatch: not applied');
    await img.abandon();
    fs.writeFileSync(other.log.path, saved); // the first image's log under the second's path
    img = await FvdImage.open(nodeIo, other.file, { pendingLog: other.log });
    assert.is(img.pendingApplied, 0, 'fileId mismatch: not applied');
    await img.close();
  });

  test(`${name}: a log whose prefix is already in the journal (flush, then more writes) applies cleanly`, async () => {
    const { file, log } = await fresh(opts);
    let img = await FvdImage.open(nodeIo, file, { copyOnRead: false, pendingLog: log });
    await writePattern(img, 6, 3);
    await img.flush();
    await writePattern(img, 10, 9); // overwrites 0..5 (fast path) and adds 6..9
    // Simulate a log whose committedSeq lags (the process died between the journal's second
    // fdatasync and the committedSeq pwrite): rewrite committedSeq to 0, so every record since
    // the start is applied again over the journal that already has the first ones.
    await img.abandon();
    const bytes = fs.readFileSync(log.path);
    bytes.fill(0, 120, 128);
    fs.writeFileSync(log.path, bytes);
    img = await FvdImage.open(nodeIo, file, { pendingLog: log });
    await expect(img, 10, 9, 'suffix over journal');
    await img.close();
    const report = await checkImage(nodeIo, file);
    assert.equal(report.errors, []);
    assert.is(report.leaks, 0);
  });
}

test('discard on compact: the unmapping is logged and survives a process crash', async () => {
  const { file, log } = await fresh({ layout: 'compact', size: 4 * MiB, blockSize: 16 * KiB, chunkSize: 64 * KiB });
  let img = await FvdImage.open(nodeIo, file, { pendingLog: log });
  await img.write(Buffer.alloc(256 * KiB, 0x33), 0);
  await img.flush();
  await img.discard(64 * KiB, 128 * KiB);
  await img.abandon();
  img = await FvdImage.open(nodeIo, file, { pendingLog: log });
  assert.ok((await readAll(img, 64 * KiB, 128 * KiB)).every((b) => b === 0));
  assert.ok((await readAll(img, 0, 64 * KiB)).every((b) => b === 0x33));
  await img.close();
  assert.equal((await checkImage(nodeIo, file)).errors, []);
});

test('record: false applies and removes a log left behind, and keeps none', async () => {
  const { file, log } = await fresh({ layout: 'compact', size: 4 * MiB, blockSize: 16 * KiB, chunkSize: 64 * KiB });
  let img = await FvdImage.open(nodeIo, file, { pendingLog: log });
  await img.write(Buffer.alloc(64 * KiB, 0x44), 128 * KiB);
  await img.abandon();
  img = await FvdImage.open(nodeIo, file, { pendingLog: { ...log, record: false } });
  assert.ok(img.pendingApplied > 0);
  assert.not.ok(fs.existsSync(log.path), 'the applied log is removed, no new one');
  await img.write(Buffer.alloc(64 * KiB, 0x55), 512 * KiB);
  assert.not.ok(fs.existsSync(log.path));
  await img.close();
  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.ok((await readAll(img, 128 * KiB, 64 * KiB)).every((b) => b === 0x44));
  assert.ok((await readAll(img, 512 * KiB, 64 * KiB)).every((b) => b === 0x55));
  await img.close();
});

test('queue log: records until the main thread took them all, then it starts over; the stale tail ends it for a reader', () => {
  const id = logId();
  const main = PendingLogWriter.create(id);
  const [fd] = main.createQueueLogs(1);
  assert.is(queueLogPath(id.path, 0), id.path.replace(/\.log$/, '.q0.log'));
  assert.equal(existingQueueLogs(id.path), [queueLogPath(id.path, 0)]);
  const drained = new Int32Array(new SharedArrayBuffer(8));
  const q = new QueueLogWriter(fd!, drained, 1);
  const read = () => parsePendingLog(fs.readFileSync(queueLogPath(id.path, 0)), id.bootId, id.fileId);
  for (let b = 0; b < 3; b++) assert.ok(q.append(10 + b, 1));
  assert.equal(read().records.map((r) => [r.seq, r.a, r.b]), [[1, 10, 1], [2, 11, 1], [3, 12, 1]]);
  Atomics.store(drained, 1, 2); // the main thread has two of the three: keep appending
  assert.ok(q.append(20, 2));
  assert.is(read().records.length, 4);
  Atomics.store(drained, 1, 4); // all four: the next record starts over
  assert.ok(q.append(30, 1));
  assert.is(q.records, 1);
  assert.equal(read().records.map((r) => [r.seq, r.a]), [[5, 30]], 'only the record after the restart: the stale ones behind it have lower sequence numbers');
  // The counts wrap at 2^32 like the main thread's (| 0).
  const w = new QueueLogWriter(fd!, drained, 0);
  Atomics.store(drained, 0, 0);
  assert.ok(w.append(1, 1));
  assert.ok(w.append(2, 1));
  main.close(true);
  assert.not.ok(w.append(3, 1), 'a failed write (closed descriptor) is reported, not thrown');
  assert.equal(existingQueueLogs(id.path), [], 'a clean close removes the queue logs too');
});

test('queue logs: a process crash before the main thread took the records; the next open applies them and removes the logs', async () => {
  const bs = 16 * KiB;
  const base = path.join(dir, `qbase${n++}.raw`);
  fs.writeFileSync(base, Buffer.alloc(8 * bs, 0x42));
  const { file, log } = await fresh({ size: 8 * bs, blockSize: bs, base, baseFormat: 'raw', detectZeroes: false });
  let img = await FvdImage.open(nodeIo, file, { copyOnRead: false, pendingLog: log });
  const fds = img.createQueueLogs(2)!;
  assert.is(fds.length, 2);
  const drained = new Int32Array(new SharedArrayBuffer(8));
  // Queue 1 stored block 5 and answered it (daemon/fvd-queue.ts): data, then its record in its
  // own log, then the bits; the main thread never drained it.
  const view = img.sharedView();
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, Buffer.alloc(bs, 0x55), 0, bs, view.dataOffset + 5 * bs);
  fs.closeSync(fd);
  assert.ok(new QueueLogWriter(fds[1]!, drained, 1).append(5, 1));
  Atomics.or(view.present, 0, 1 << 5);
  Atomics.or(view.journaled, 0, 1 << 5);
  assert.is(readPendingLog(log).records.length, 0, 'nothing in the image\'s own log');
  await img.abandon();
  assert.is(existingQueueLogs(log.path).length, 2, 'the queue logs outlive the process');
  img = await FvdImage.open(nodeIo, file, { copyOnRead: false, pendingLog: log });
  assert.is(img.pendingApplied, 1, 'the queue log\'s record was applied');
  assert.equal(existingQueueLogs(log.path), [], 'spent queue logs are removed');
  assert.ok((await readAll(img, 5 * bs, bs)).every((b) => b === 0x55), 'the answered write is there');
  assert.ok((await readAll(img, 4 * bs, bs)).every((b) => b === 0x42), 'its neighbour is the base');
  await img.close();
  img = await FvdImage.open(nodeIo, file, { readOnly: true });
  assert.ok((await readAll(img, 5 * bs, bs)).every((b) => b === 0x55), 'and after a clean close');
  await img.close();
});

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

test.run();
