/**
 * The per-request trace (fvd/trace.ts, daemon/trace-file.ts, daemon/trace-summary.ts): the
 * summary's statistics on a synthetic run with known stamps, the queue log's ring and file round
 * trip, and the engine's stamps on its slow paths (copy-on-write, copy-on-read) over node:fs.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  F_LENGTH,
  F_OP,
  F_ROUTE,
  F_STAMPS,
  QueueTrace,
  RECORD,
  ROUTE_BASE,
  ROUTE_ENGINE,
  STAGES,
  STAGE_BASE_END,
  STAGE_BASE_START,
  STAGE_COMMIT,
  STAGE_CQE,
  STAGE_ENGINE_DONE,
  STAGE_ENGINE_START,
  STAGE_POSTED,
  STAGE_WRITE_END,
  STAGE_WRITE_START,
  TraceDrain,
  TraceRecorder,
  createTrace,
  installEngineTrace,
  traceNow,
} from '../../fvd/trace.js';
import { summarize } from '../../daemon/trace-summary.js';
import { TraceFile, readTraceFile } from '../../daemon/trace-file.js';
import { UBLK_IO_OP_READ, UBLK_IO_OP_WRITE } from '../../daemon/ublk/abi.js';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-trace-'));
const KiB = 1024;

/** A record with stamps at the given ms (stage -> time). */
function record(op: number, route: number, stamps: Record<number, number>): number[] {
  const r = new Array<number>(RECORD).fill(0);
  r[F_OP] = op;
  r[F_ROUTE] = route;
  r[F_LENGTH] = 4096;
  for (const [s, t] of Object.entries(stamps)) r[F_STAMPS + Number(s)] = t;
  return r;
}

test('summary: per-stage median, p90 and share of a synthetic copy-on-write run', () => {
  // 10 copy-on-write writes: hand-off i+1 µs... base read 100 µs, write 50, the rest fixed.
  const recs: number[] = [];
  for (let i = 0; i < 10; i++) {
    const t = 1000 + i; // ms
    const us = (x: number) => x / 1000;
    let at = t;
    const st: Record<number, number> = { [STAGE_CQE]: at };
    st[STAGE_POSTED] = at += us(10);
    st[STAGE_ENGINE_START] = at += us(i + 1); // 1..10 µs
    st[STAGE_BASE_START] = at += us(5);
    st[STAGE_BASE_END] = at += us(100);
    st[STAGE_WRITE_START] = at += us(5);
    st[STAGE_WRITE_END] = at += us(50);
    st[STAGE_ENGINE_DONE] = at += us(5);
    st[STAGE_COMMIT] = at += us(20);
    recs.push(...record(UBLK_IO_OP_WRITE, ROUTE_ENGINE, st));
  }
  // Plus 4 queue-thread base reads: 30 µs from the CQE to the read, 70 in it; and one
  // unfinished record, which is left out.
  for (let i = 0; i < 4; i++) recs.push(...record(UBLK_IO_OP_READ, ROUTE_BASE, { [STAGE_CQE]: 5, [STAGE_BASE_START]: 5.03, [STAGE_COMMIT]: 5.1 }));
  recs.push(...record(UBLK_IO_OP_READ, ROUTE_BASE, { [STAGE_CQE]: 6 }));
  const kinds = summarize(new Float64Array(recs));
  assert.equal(kinds.map((k) => [k.kind, k.count]), [['write copy-on-write', 10], ['read base (queue thread)', 4]]);
  const cow = kinds[0]!;
  const seg = (name: string) => cow.segments.find((s) => s.name === name)!;
  assert.equal(cow.segments.map((s) => s.name), ['cqe→posted', 'posted→engine', 'engine→base-start', 'base-start→base-end', 'base-end→write-start', 'write-start→write-end', 'write-end→engine-done', 'engine-done→commit']);
  const near = (a: number, b: number) => assert.ok(Math.abs(a - b) < 0.01, `${a} vs ${b}`);
  near(seg('posted→engine').medianUs, 5); // nearest rank of 1..10
  near(seg('posted→engine').p90Us, 9);
  near(seg('base-start→base-end').medianUs, 100);
  // Total per request 10 + (i+1) + 5+100+5+50+5+20 = 196 + i µs: mean 200.5.
  near(cow.totalMeanUs, 200.5);
  near(seg('base-start→base-end').share, 100 / 200.5);
  near(seg('posted→engine').share, 5.5 / 200.5);
  near(cow.segments.reduce((a, s) => a + s.share, 0), 1);
  const base = kinds[1]!;
  assert.equal(base.segments.map((s) => s.name), ['cqe→base-start', 'base-start→commit']);
  near(base.segments[0]!.medianUs, 30);
  near(base.segments[1]!.share, 0.7);
});

test('queue log: records reach the drain in order; a lap loses the oldest and counts them', () => {
  const shared = createTrace(2, 4, 8);
  const q1 = new QueueTrace(shared, 1);
  const drain = new TraceDrain(shared);
  const got: number[] = [];
  const take = (r: Float64Array) => {
    for (let at = 0; at < r.length; at += RECORD) got.push(r[at + F_LENGTH]!);
  };
  for (let i = 0; i < 5; i++) {
    q1.begin(i % 4, UBLK_IO_OP_READ, i);
    q1.commit(i % 4);
  }
  assert.is(drain.drain(take), 5);
  assert.equal(got, [0, 1, 2, 3, 4]);
  got.length = 0;
  for (let i = 5; i < 20; i++) {
    q1.begin(0, UBLK_IO_OP_READ, i);
    q1.commit(0);
  }
  drain.drain(take);
  assert.equal(got, [12, 13, 14, 15, 16, 17, 18, 19]);
  assert.is(drain.lost, 7);
  // The slot of tag 2 of queue 1 is 1 * depth + 2; the commit stamps after the begin.
  assert.is(q1.slot(2), 6);
  q1.begin(2, UBLK_IO_OP_WRITE, 4096);
  const t0 = traceNow();
  q1.commit(2);
  let rec: Float64Array | null = null;
  drain.drain((r) => (rec = r));
  assert.ok(rec![F_STAMPS + STAGE_CQE]! <= t0 && rec![F_STAMPS + STAGE_COMMIT]! >= t0);
});

test('trace file: what the drain wrote reads back; a wrong file is a one-line error', () => {
  const shared = createTrace(1, 2, 16);
  const q = new QueueTrace(shared, 0);
  const file = path.join(dir, 't.bin');
  const tf = new TraceFile(file, shared);
  for (let i = 0; i < 3; i++) {
    q.begin(1, UBLK_IO_OP_WRITE, 512 * (i + 1));
    q.route(1, ROUTE_BASE);
    q.commit(1);
  }
  assert.match(tf.close(), /3 requests/);
  const r = readTraceFile(file);
  assert.is(r.length, 3 * RECORD);
  assert.equal([r[F_LENGTH], r[RECORD + F_LENGTH], r[2 * RECORD + F_ROUTE]], [512, 1024, ROUTE_BASE]);
  fs.writeFileSync(path.join(dir, 'bad.bin'), 'not a trace');
  assert.throws(() => readTraceFile(path.join(dir, 'bad.bin')), /not an fvd trace file/);
});

/** The engine's stamps of `slot` (STAGES numbers), as a map of stage -> passed. */
function passed(rec: TraceRecorder, slot: number): number[] {
  const s: number[] = [];
  for (let i = 0; i < STAGES; i++) if (rec.current[slot * RECORD + F_STAMPS + i]! > 0) s.push(i);
  return s;
}

test('engine: copy-on-write and copy-on-read stamp base read and image write, in order', async () => {
  const base = path.join(dir, 'base.raw');
  fs.writeFileSync(base, Buffer.alloc(1024 * KiB, 7));
  const img = path.join(dir, 'img.fvd');
  await FvdImage.create(nodeIo, img, { base, baseFormat: 'raw', blockSize: 64 * KiB });
  const image = await FvdImage.open(nodeIo, img);
  const shared = createTrace(1, 8);
  const rec = new TraceRecorder(shared);
  installEngineTrace(rec);
  try {
    // A 4 KiB write into a base block: copy-on-write reads the rest of the block first.
    await image.write(Buffer.alloc(4 * KiB, 1), 68 * KiB, false, 1);
    assert.equal(passed(rec, 1), [STAGE_BASE_START, STAGE_BASE_END, STAGE_WRITE_START, STAGE_WRITE_END]);
    const at = 1 * RECORD + F_STAMPS;
    const c = rec.current;
    assert.ok(c[at + STAGE_BASE_START]! <= c[at + STAGE_BASE_END]! && c[at + STAGE_BASE_END]! <= c[at + STAGE_WRITE_START]! && c[at + STAGE_WRITE_START]! <= c[at + STAGE_WRITE_END]!);
    // A read of a block still in the base: the base read is the request's.
    await image.read(Buffer.alloc(4 * KiB), 200 * KiB, 2);
    assert.equal(passed(rec, 2), [STAGE_BASE_START, STAGE_BASE_END]);
    // The block written above is local now: its read stamps no base read.
    await image.read(Buffer.alloc(4 * KiB), 68 * KiB, 3);
    assert.equal(passed(rec, 3), []);
    // Untraced requests (slot -1) touch no record.
    await image.write(Buffer.alloc(4 * KiB, 2), 300 * KiB);
    await image.read(Buffer.alloc(4 * KiB), 400 * KiB);
    for (const s of [0, 4, 5, 6, 7]) assert.equal(passed(rec, s), []);
    await image.idle();
  } finally {
    installEngineTrace(null);
    await image.close();
  }
});

test.run();
