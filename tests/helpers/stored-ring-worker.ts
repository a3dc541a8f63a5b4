/**
 * A queue thread's side of a StoredRing (daemon/shared-state.ts) for the ring's race test in
 * daemon-unit.test.ts: pushes `count` entries over `depth` tags, reusing a tag only once the
 * main thread completed it, posting 'wake' only when push says so; posts 'done' at the end, or
 * 'stuck' when no completion came for 5 s (an entry that no wake message announced).
 */
import { parentPort, workerData } from 'node:worker_threads';
import { CompletionRing, StoredRing } from '../../daemon/shared-state.js';

const { ring, completions, depth, count } = workerData as { ring: SharedArrayBuffer; completions: SharedArrayBuffer; depth: number; count: number };
const stored = new StoredRing(ring);
const done = new CompletionRing(completions);
const free: number[] = Array.from({ length: depth }, (_, t) => t);
const sleeper = new Int32Array(new SharedArrayBuffer(4));
let pushed = 0;
let completed = 0;
let lastProgress = Date.now();
while (completed < count) {
  while (free.length > 0 && pushed < count) {
    const tag = free.pop()!;
    // first = last = the entry's number, length = its tag: the main thread checks both.
    if (stored.push(tag, pushed, pushed, tag)) parentPort!.postMessage('wake');
    pushed++;
  }
  const n = done.drain((tag) => void free.push(tag));
  if (n > 0) {
    completed += n;
    lastProgress = Date.now();
  } else if (Date.now() - lastProgress > 5000) {
    parentPort!.postMessage('stuck');
    process.exit(0);
  } else if ((completed & 7) === 0) {
    Atomics.wait(sleeper, 0, 0, 0.05); // yield now and then; mostly spin, to race the drains
  }
}
parentPort!.postMessage('done');
