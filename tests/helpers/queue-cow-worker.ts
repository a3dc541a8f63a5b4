/**
 * A queue thread's copy-on-write for tests/daemon/queue-cow.test.ts: a real worker thread running
 * daemon/queue-cow.ts against the image the test's main thread serves with the engine, so that
 * the claims are exercised across threads as in the daemon. Per batch of writes it stores each
 * one it can and reports, per write, its [first, last] block (claims held, for the main thread to
 * adopt and release; with `answer`, published here already — bits set, claims released — as a
 * queue that answers its stored writes does, for the main thread to journal) or -1 (declined: the
 * main thread gives it to the engine).
 */
import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import { allocPinned } from '../../ffi/uring.js';
import { syscalls } from '../../ffi/syscalls.js';
import { DirectIo, chooseDirectMode } from '../../daemon/direct-io.js';
import { COW_DECLINED, QueueCow } from '../../daemon/queue-cow.js';
import type { SharedView } from '../../fvd/mapping.js';

export interface CowWorkerData {
  view: SharedView;
  claims: SharedArrayBuffer;
  imagePath: string;
  basePath: string;
  maxIo: number;
  depth: number;
  /** Publish each stored write here (QueueCow.publish), as a queue answering it itself. */
  answer: boolean;
}

/** A batch: writes [offset, length, fill byte], each in its own tag. */
export type CowBatch = [offset: number, length: number, fill: number][];

const d = workerData as CowWorkerData;
const sys = syscalls()!;
const imageFd = fs.openSync(d.imagePath, 'r+');
const baseFd = fs.openSync(d.basePath, 'r');
const mem = allocPinned(d.depth * d.maxIo);
const image = new DirectIo(sys, imageFd, chooseDirectMode(sys, imageFd, d.imagePath));
const base = new DirectIo(sys, baseFd, chooseDirectMode(sys, baseFd, d.basePath));
const cow = new QueueCow(d.view, d.claims, base, image, mem.bytes, mem.address, d.maxIo);

parentPort!.on('message', (batch: CowBatch | null) => {
  if (batch === null) {
    image.free();
    base.free();
    mem.free();
    fs.closeSync(imageFd);
    fs.closeSync(baseFd);
    parentPort!.postMessage({ stored: cow.stored, overwritten: cow.overwritten, declined: cow.declined });
    parentPort!.close();
    return;
  }
  const blocks = batch.map(([offset, length, fill], tag) => {
    mem.bytes.fill(fill, tag * d.maxIo, tag * d.maxIo + length);
    const first = cow.store(tag, offset, length);
    if (first === COW_DECLINED) return first;
    if (d.answer) cow.publish(first, cow.lastBlock);
    return [first, cow.lastBlock];
  });
  parentPort!.postMessage(blocks);
});
