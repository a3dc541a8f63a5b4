/**
 * Worker-thread entry of one ublk hardware queue (daemon/server.ts spawns one per queue): wires
 * the generic queue loop (daemon/ublk/queue-loop.ts) to the FVD target (daemon/fvd-queue.ts) and
 * reports to the main thread.
 *
 * One thread per queue, because the kernel (6.12) wants every command of a queue from the task
 * that fetched its tags: this thread blocks in io_uring_enter itself and never hands the ring to
 * another thread.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { syscalls, setIoFlusher } from '../ffi/syscalls.js';
import { FvdQueue } from './fvd-queue.js';
import { GATE_OPEN, GATE_WAIT, type QueueWorkerData, type WorkerMessage } from './queue-protocol.js';
import { isPrespawned } from './queue-worker-pool.js';

// The most polls of the ring's flags before blocking in io_uring_enter (FVD_SPIN=0 disables):
// about 0.1 ms. Measured in the guest, side by side: 4K random I/O +5..55%, 128K +0..35% (noisy).
// Shorter while polls find nothing (daemon/ublk/spin-policy.ts).
const SPIN = Number(process.env.FVD_SPIN ?? 5000);

const post = (m: WorkerMessage) => parentPort!.postMessage(m);

function run(d: QueueWorkerData): void {
  // A recovering server starts its workers before START_USER_RECOVERY (until then /dev/ublkcN
  // may not be opened), so their start-up — loading this module graph, seconds under emulation —
  // overlaps that wait instead of lengthening the pause the guest sees.
  const gate = new Int32Array(d.gate);
  Atomics.wait(gate, 0, GATE_WAIT);
  if (Atomics.load(gate, 0) !== GATE_OPEN) return; // the start was given up before the device opened
  d.cdevFd = gate[1]!;
  const sys = syscalls();
  if (!sys) throw new Error('koffi is not available');
  // Reclaim must not wait for I/O that only this thread can complete: the kernel's writeback of
  // this very device (ublksrv does the same). Per thread, so set here, before the first fetch.
  const ioFlusher = setIoFlusher(sys);
  const queue = new FvdQueue(d, sys, post, SPIN);
  try {
    // Test hook (tests/vm/e2e/18-recovery.sh, round h): hold the queue here, its descriptors
    // mapped and no tag fetched, so the test can kill the server at the point where Linux 6.12
    // lets no later server map the device (DESIGN.md §7, "An interrupted recovery").
    if (process.env.FVD_TEST_FAULT === 'pause-after-map') {
      post({ type: 'info', qid: d.qid, message: 'test hook: descriptors mapped, pausing before the fetches' });
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 600_000);
    }
    queue.start();
    const { loop } = queue;
    post({ type: 'fetched', qid: d.qid, bufAddress: loop.bufferAddress, bufLength: d.depth * d.maxIo, tid: sys.gettid(), ioFlusher });
    queue.run();
  } finally {
    queue.close();
  }
}

// Started ahead by `fvd serve` (daemon/queue-worker-pool.ts): this module graph is loaded while
// the main thread loads its own; the queue comes as the first message. Nothing native (koffi) is
// loaded before it: a serve that fails first exits with this thread unadopted, and a process
// exit that tears down a thread inside a native addon's registration aborts Node.
let d: QueueWorkerData;
if (isPrespawned(workerData)) {
  const { started } = workerData;
  const queue = new Promise<QueueWorkerData>((resolve) => parentPort!.once('message', resolve));
  Atomics.store(started, 0, 1);
  Atomics.notify(started, 0);
  d = await queue;
} else {
  d = workerData as QueueWorkerData;
}
try {
  run(d);
  post({ type: 'exit', qid: d.qid });
} catch (err) {
  post({ type: 'exit', qid: d.qid, error: (err as Error).message });
}
