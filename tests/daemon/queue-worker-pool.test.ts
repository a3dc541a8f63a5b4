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
import { spawnSync, type SpawnSyncReturns } from 'node:child_process';
import { pathToFileURL } from 'node:url';
import type { Worker } from 'node:worker_threads';
import { QueueWorkerPool } from '../../daemon/queue-worker-pool.js';
import { GATE_ABANDON, type WorkerMessage } from '../../daemon/queue-protocol.js';

const POOL_MODULE = new URL('../../daemon/queue-worker-pool.js', import.meta.url).href;

/** Runs an ES module script in a child Node (a file, not --input-type, which its workers would inherit). */
function runChild(script: string): SpawnSyncReturns<string> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-pool-child-'));
  try {
    const file = path.join(dir, 'child.mjs');
    fs.writeFileSync(file, script);
    return spawnSync(process.execPath, [file], { encoding: 'utf8', timeout: 30_000 });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

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

test("a queue thread's young generation stays at its smallest (1 MiB semi-spaces): start-up garbage does not grow it", async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-pool-'));
  try {
    // Allocates as a module graph's loading does, then reports how big its young generation grew.
    const probe = path.join(dir, 'probe.mjs');
    fs.writeFileSync(
      probe,
      `import v8 from 'node:v8'; import { parentPort } from 'node:worker_threads';
       parentPort.once('message', () => {
         let keep = []; for (let i = 0; i < 300000; i++) { keep.push({ i, s: 'x' + i }); if (keep.length > 5000) keep = []; }
         parentPort.postMessage(v8.getHeapSpaceStatistics().find((s) => s.space_name === 'new_space').space_size);
       });`,
    );
    const pool = new QueueWorkerPool(1, pathToFileURL(probe));
    const w = pool.adopt({});
    assert.ok(w);
    const newSpace = (await firstMessage(w!)) as unknown as number;
    await w!.terminate();
    // Unlimited, the same work grew it to 8 MiB (Node 20 and 24); limited, 2 MiB.
    assert.ok(newSpace <= 4 * 1024 * 1024, `new space ${newSpace} bytes`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('a started worker waits for its queue with no native addon loaded (an exit then cannot catch it inside one)', () => {
  // In a child process: this one may have loaded koffi itself. Its maps show what any thread loaded.
  const script = `import fs from 'node:fs'; import { QueueWorkerPool } from ${JSON.stringify(POOL_MODULE)};
    const pool = new QueueWorkerPool(2); await pool.started();
    console.log(pool.waiting, fs.readFileSync('/proc/self/maps', 'utf8').includes('koffi') ? 'koffi loaded' : 'no koffi');
    await pool.close();`;
  const r = runChild(script);
  assert.is(r.status, 0, r.stderr);
  assert.is(r.stdout.trim(), '2 no koffi');
});

test('workers nobody adopted keep no process alive (a serve that fails before its device exits)', () => {
  // Exits once both have loaded their modules and wait for a queue (a serve that failed then).
  const script = `import { QueueWorkerPool } from ${JSON.stringify(POOL_MODULE)};
    const pool = new QueueWorkerPool(2); await pool.started(); console.log(pool.waiting, 'started');`;
  const r = runChild(script);
  assert.is(r.error, undefined, `the process did not exit: ${r.error?.message}`);
  assert.is(r.status, 0, r.stderr);
  assert.is(r.stdout.trim(), '2 started');
});

test.run();
