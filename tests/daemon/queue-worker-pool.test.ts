/**
 * Queue workers started ahead (daemon/queue-worker-pool.ts) with the real queue worker: one
 * adopted worker runs the queue it is posted, a failed one is not handed out, and workers nobody
 * adopted keep no process alive.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { pathToFileURL } from 'node:url';
import type { Worker } from 'node:worker_threads';
import { QueueWorkerPool } from '../../daemon/queue-worker-pool.js';
import { GATE_ABANDON, type WorkerMessage } from '../../daemon/fvd-queue.js';

const POOL_MODULE = new URL('../../daemon/queue-worker-pool.js', import.meta.url).href;

/** The first message a worker posts, or its error. */
function firstMessage(w: Worker): Promise<WorkerMessage> {
  return new Promise((resolve, reject) => {
    w.once('message', resolve);
    w.once('error', reject);
  });
}

test('an adopted worker runs the queue posted to it (given up at its gate: it reports its exit)', async () => {
  const pool = new QueueWorkerPool(2);
  const gate = new SharedArrayBuffer(8);
  new Int32Array(gate)[0] = GATE_ABANDON; // the start was given up before the device opened
  const w = pool.adopt({ qid: 7, gate });
  assert.ok(w, 'a started worker is handed out');
  const m = await firstMessage(w!);
  assert.equal(m, { type: 'exit', qid: 7 });
  assert.is(pool.waiting, 1, 'the other one still waits');
  await pool.close();
  assert.is(pool.waiting, 0);
  assert.is(pool.adopt({ qid: 8, gate }), null, 'none left after close');
});

test('more queues than started workers: adopt says so (the server starts the rest itself)', async () => {
  const pool = new QueueWorkerPool(1);
  const gate = new SharedArrayBuffer(8);
  new Int32Array(gate)[0] = GATE_ABANDON;
  const w = pool.adopt({ qid: 0, gate });
  assert.ok(w);
  assert.is(pool.adopt({ qid: 1, gate }), null);
  await firstMessage(w!);
});

test('a worker that failed while starting is not handed out, and its error does not reach this thread', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-pool-'));
  try {
    const broken = path.join(dir, 'broken.mjs');
    fs.writeFileSync(broken, "throw new Error('cannot load');\n");
    const pool = new QueueWorkerPool(1, pathToFileURL(broken));
    for (let i = 0; i < 200 && pool.waiting > 0; i++) await new Promise((r) => setTimeout(r, 25));
    assert.is(pool.waiting, 0, 'the failed worker no longer counts');
    assert.is(pool.adopt({ qid: 0 }), null);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('workers nobody adopted keep no process alive (a serve that fails before its device exits)', () => {
  const script = `import { QueueWorkerPool } from ${JSON.stringify(POOL_MODULE)}; new QueueWorkerPool(2); console.log('started');`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 30_000 });
  assert.is(r.error, undefined, `the process did not exit: ${r.error?.message}`);
  assert.is(r.status, 0, r.stderr);
  assert.is(r.stdout.trim(), 'started');
});

test.run();
