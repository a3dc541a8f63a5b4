/**
 * How long reading compressed qcow2 clusters blocks the event loop (what a served device's other
 * requests wait), and how fast it reads: `node build/bench/qcow2-decompress.js`.
 *
 * Templates: 64 MiB of /usr (a tar stream: binaries, libraries, text) made by
 * `qemu-img convert -c` with zlib and zstd, 64 KiB and 2 MiB clusters. Each is read through the
 * engine's reader one cluster per read, then 4 MiB per read (as `fvd convert` reads: 64 clusters
 * of 64 KiB decoded by one read), awaited, while perf_hooks.monitorEventLoopDelay samples the event
 * loop every millisecond; the table shows the delay percentiles (the time the loop was busy past
 * its 1 ms timer) and the read rate. Clusters ≤ 64 KiB decode on the main thread in slices of
 * SYNC_SLICE_MS per loop turn; larger ones on the thread pool, except zstd without Node's own
 * decoder (the CLI's fallback, the system's libzstd, on the main thread, larger clusters whole).
 */
import { execFileSync, execSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { monitorEventLoopDelay } from 'node:perf_hooks';
import { Qcow2Image } from '../fvd/qcow2.js';
import { nodeIo } from '../storage/node-file.js';
import { SYNC_SLICE_MS, zstdDecoderKind } from '../fvd/qcow2-decompress.js';
import { registerZstdFallback } from '../daemon/zstd-fallback.js';

const MiB = 1024 * 1024;
registerZstdFallback();
const dir = fs.mkdtempSync(path.join(process.env.FVD_BENCH_DIR ?? os.tmpdir(), 'fvd-qcow2-dec-'));
try {
  const raw = path.join(dir, 'disk.raw');
  fs.writeFileSync(raw, '');
  execSync(`tar cf - /usr 2>/dev/null | head -c ${64 * MiB} > '${raw}'`, { shell: '/bin/bash' });
  fs.truncateSync(raw, 64 * MiB);
  console.log(`node ${process.version}, zstd decoder: ${zstdDecoderKind()}, main-thread slice ${SYNC_SLICE_MS} ms`);
  console.log('| template | bytes per read | event-loop delay p50 / p99 / max (ms) | MiB/s |');
  console.log('|---|---|---|---|');
  for (const [type, cs] of [
    ['zlib', 64 * 1024],
    ['zstd', 64 * 1024],
    ['zlib', 2 * MiB],
    ['zstd', 2 * MiB],
  ] as const) {
    const q = path.join(dir, `${type}-${cs}.qcow2`);
    execFileSync('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type},cluster_size=${cs}`, raw, q]);
    for (const step of [cs, 4 * MiB]) {
      // A fresh reader each pass: no decompressed cluster is cached from the pass before.
      const img = await Qcow2Image.open(nodeIo, q);
      const buf = Buffer.alloc(step);
      const h = monitorEventLoopDelay({ resolution: 1 });
      h.enable();
      const t0 = performance.now();
      for (let pos = 0; pos < img.size; pos += step) await img.read(buf, pos);
      const ms = performance.now() - t0;
      h.disable();
      await img.close();
      const d = (p: number) => Math.max(0, (h.percentile(p) - 1e6) / 1e6).toFixed(2);
      console.log(`| ${type}, ${cs / 1024} KiB clusters | ${step / 1024} KiB | ${d(50)} / ${d(99)} / ${Math.max(0, (h.max - 1e6) / 1e6).toFixed(2)} | ${((img.size / MiB) / (ms / 1000)).toFixed(0)} |`);
    }
  }
  console.log(`(load average ${os.loadavg().map((l) => l.toFixed(1)).join(' ')} on ${os.cpus().length} CPUs)`);
} finally {
  fs.rmSync(dir, { recursive: true, force: true });
}
