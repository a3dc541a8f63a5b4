/**
 * io_uring NOP round-trip cost from JS: prep N NOPs, one io_uring_enter(submit N, wait N), reap N.
 * Reports ns per NOP and per io_uring_enter, for batch sizes 1 and 32 (or those given as args),
 * plus the cost of a bare koffi syscall (getpid) as the floor.
 *
 *   node build/bench/uring-nop.js [batch...]
 */
import { IoUring, type CqeHandler } from '../ffi/uring.js';
import { syscalls } from '../ffi/syscalls.js';

const batches = process.argv.slice(2).map(Number).filter((n) => n > 0);
if (batches.length === 0) batches.push(1, 32);

function nsSince(t0: bigint): number {
  return Number(process.hrtime.bigint() - t0);
}

function benchSyscall(iters: number): number {
  const sys = syscalls()!;
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < iters; i++) sys.syscall6(39, 0, 0, 0, 0, 0, 0);
  return nsSince(t0) / iters;
}

function benchNop(ring: IoUring, batch: number, ops: number): { perOp: number; perEnter: number } {
  let reaped = 0;
  const handler: CqeHandler = () => {
    reaped++;
  };
  const rounds = Math.max(1, Math.floor(ops / batch));
  const t0 = process.hrtime.bigint();
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < batch; i++) ring.prepNop(i);
    const s = ring.submit(batch);
    if (s !== batch) throw new Error(`submit returned ${s}`);
    ring.reap(handler);
  }
  const ns = nsSince(t0);
  if (reaped !== rounds * batch) throw new Error(`reaped ${reaped} of ${rounds * batch}`);
  return { perOp: ns / (rounds * batch), perEnter: ns / rounds };
}

const ring = new IoUring({ entries: Math.max(64, ...batches) });
try {
  benchSyscall(50_000); // warm up koffi and the JIT
  for (const b of batches) benchNop(ring, b, 100_000);
  console.log(`koffi syscall(getpid): ${benchSyscall(500_000).toFixed(0)} ns/call`);
  for (const b of batches) {
    const results = [0, 1, 2].map(() => benchNop(ring, b, b === 1 ? 300_000 : 2_000_000));
    const best = results.reduce((a, c) => (c.perOp < a.perOp ? c : a));
    console.log(`NOP batch ${String(b).padStart(3)}: ${best.perOp.toFixed(0).padStart(5)} ns/op, ${best.perEnter.toFixed(0).padStart(6)} ns per submit+wait+reap (best of 3)`);
  }
} finally {
  ring.close();
}
