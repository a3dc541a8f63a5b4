import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { PendingRecords, decodeSector, encodeRecords, replayJournal, Journal, type JournalSink } from '../../fvd/journal.js';
import { CorruptImageError } from '../../fvd/errors.js';
import { SECTOR } from '../../fvd/format.js';
import type { BlockFile } from '../../fvd/io.js';
import { crc32 } from 'node:zlib';

/** A BlockFile over a plain array that counts flushes and records write order. */
function memFile(size: number) {
  const data = new Uint8Array(size);
  const log: string[] = [];
  const f: BlockFile = {
    path: 'mem', readOnly: false, isBlockDevice: false,
    async read(buf, off) { buf.set(data.subarray(off, off + buf.length)); },
    async write(buf, off) { data.set(buf, off); log.push(`w${off}`); },
    async flush() { log.push('F'); },
    async zeroRange(off, len) { data.fill(0, off, off + len); },
    size: () => size, async truncate() {}, async close() {},
  };
  return { f, data, log };
}

function collect(): JournalSink & { bits: Array<[number, number]>; table: Array<[number, number]> } {
  const s = { bits: [] as Array<[number, number]>, table: [] as Array<[number, number]>,
    bitmapSet(a: number, n: number) { s.bits.push([a, n]); }, tableSet(c: number, id: number) { s.table.push([c, id]); } };
  return s;
}

test('records: adjacent bitmap runs merge, table entries group, round trip through sectors', () => {
  const p = new PendingRecords();
  p.addBitmap(10, 5);
  p.addBitmap(15, 3); // merges
  p.addBitmap(100, 1);
  for (let c = 0; c < 300; c++) p.addTable(c, 1000 + c); // spans several sectors
  p.addTable(5000, 0xffffffff);
  assert.equal(p.bitmap, [10, 8, 100, 1]);
  const bytes = encodeRecords(p, 42);
  assert.ok(bytes.length / SECTOR >= 3);
  const sink = collect();
  for (let i = 0; i < bytes.length / SECTOR; i++) assert.ok(decodeSector('j', bytes.subarray(i * SECTOR, (i + 1) * SECTOR), 42 + i, sink));
  assert.equal(sink.bits, [[10, 8], [100, 1]]);
  assert.is(sink.table.length, 301);
  assert.equal(sink.table[299], [299, 1299]);
  assert.equal(sink.table[300], [5000, 0xffffffff]);
});

test('sectors: wrong seq, bad crc or magic end the log; bad record type is corruption', () => {
  const p = new PendingRecords();
  p.addBitmap(1, 1);
  const s = encodeRecords(p, 7);
  assert.not.ok(decodeSector('j', s, 8, collect()));
  const torn = s.slice();
  torn[100] ^= 0xff;
  assert.not.ok(decodeSector('j', torn, 7, collect()));
  assert.not.ok(decodeSector('j', new Uint8Array(SECTOR), 0, collect()));
  // A checksummed sector with an unknown record type: re-encode with type 9.
  const bad = s.slice();
  new DataView(bad.buffer).setUint16(16, 9, true);
  new DataView(bad.buffer).setUint32(4, crc32(bad.subarray(8)) >>> 0, true);
  assert.throws(() => decodeSector('j', bad, 7, collect()), (e: unknown) => e instanceof CorruptImageError && /unknown journal record type 9/.test((e as Error).message));
});


test('journal: commit = flush, write, flush; wraps around; replay finds exactly the committed run', async () => {
  const nsec = 8;
  const { f, log, data } = memFile(nsec * SECTOR);
  let checkpoints = 0;
  const j = new Journal(f, 0, nsec * SECTOR, 1000, 0, { async checkpoint() { checkpoints++; } }, () => {});
  for (let i = 0; i < 5; i++) {
    j.pending.addBitmap(i * 10, 1);
    await j.commit();
  }
  assert.equal(log.slice(0, 3), ['F', 'w0', 'F']);
  assert.is(j.sequence, 1005);
  let sink = collect();
  let r = await replayJournal(f, 0, nsec * SECTOR, 1000, sink);
  assert.is(r.nextSeq, 1005);
  assert.equal(sink.bits.map((b) => b[0]), [0, 10, 20, 30, 40]);
  // Overflow: 4 more sectors do not fit in 8 with 5 used -> checkpoint instead of a write.
  for (let i = 0; i < 4; i++) j.pending.addTable(i * 200, i); // non-adjacent: one record each, all in one sector
  const big = new PendingRecords();
  for (let i = 0; i < 600; i++) big.addTable(i * 2, i); // forces several sectors
  j.pending.absorb(big);
  await j.commit();
  assert.is(checkpoints, 1);
  assert.is(j.sectorsUsed, 0);
  // After the checkpoint the log restarts at the current sequence and wraps: index 1005 % 8 = 5.
  for (let i = 0; i < 6; i++) {
    j.pending.addBitmap(500 + i, 1);
    await j.commit();
  }
  sink = collect();
  r = await replayJournal(f, 0, nsec * SECTOR, 1005, sink);
  assert.is(r.sectors, 6);
  assert.equal(sink.bits.map((b) => b[0]), [500, 501, 502, 503, 504, 505]);
  // A torn sector in the middle ends the replay there.
  data[((1007 % nsec) * SECTOR) + 200] ^= 1;
  sink = collect();
  r = await replayJournal(f, 0, nsec * SECTOR, 1005, sink);
  assert.is(r.sectors, 2);
});

test('journal: concurrent commits share one group commit', async () => {
  const { f, log } = memFile(64 * SECTOR);
  // Hold the first commit inside its first fdatasync, so the later callers arrive mid-commit.
  let release!: () => void;
  const gate = new Promise<void>((r) => (release = r));
  const realFlush = f.flush;
  let flushes = 0;
  f.flush = async () => {
    if (flushes++ === 0) await gate;
    return realFlush();
  };
  const j = new Journal(f, 0, 64 * SECTOR, 0, 0, { async checkpoint() {} }, () => {});
  j.pending.addBitmap(0, 1);
  const first = j.commit();
  while (flushes === 0) await new Promise((r) => setImmediate(r));
  assert.is.not(j.commit(), first, 'a commit already running does not take new records');
  j.pending.addBitmap(5, 1);
  const a = j.commit();
  j.pending.addBitmap(9, 1);
  const b = j.commit();
  assert.is(a, b, 'callers during a commit share the next one');
  release();
  await Promise.all([first, a, b]);
  assert.is(log.filter((e) => e.startsWith('w')).length, 2);
  assert.is(j.stats.commits, 2);
});

test.run();
