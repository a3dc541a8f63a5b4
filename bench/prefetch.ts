/**
 * Prefetch benchmark: `node build/bench/prefetch.js [--size 256M] [--seconds 4] [--depth 4]`.
 *
 * A raw base with 3 MiB of random data in every 4 MiB (the rest holes, so zero-detected at create),
 * an FVD image over it per run, and the engine API in this process:
 *
 *   offline        prefetch alone (what `fvd prefetch` does): time to fully local, bytes read
 *                  from the base (counted by an IoBackend wrapping nodeIo) vs the base's used size
 *   capped         the same with a bandwidth cap: the rate achieved
 *   fg only        a foreground random 4 KiB read/write load (copy-on-read on) over a hot region
 *                  (--hot, default the first 64 MiB) for --seconds
 *   fg + adaptive  the same load, run until the prefetcher fed its latency (ForegroundMeter) is done
 *   fg + blind     the same with a prefetcher that cannot see the load (no activity source)
 * Base reads beyond the used size in the foreground runs are the guest's own: a guest read of a
 * block the prefetcher holds locked reads the base without copying it (the guest never waits).
 *
 * The base file sits in the page cache after it is written (no root to drop caches), so base
 * reads are cheap here; the figures compare the runs with each other, not with a real disk.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomFillSync } from 'node:crypto';
import { FvdImage } from '../fvd/image.js';
import { nodeIo } from '../fvd/node-file.js';
import type { BlockFile, IoBackend, OpenOptions } from '../fvd/io.js';
import { ForegroundMeter, Prefetcher, type PrefetchOptions } from '../fvd/prefetch.js';
import { formatSize, parseInteger, parseOptions, parseSize } from '../daemon/args.js';

const MiB = 1024 * 1024;

/** Counts bytes read per file path, and per block of one file. */
class CountingIo implements IoBackend {
  readonly bytesByFile = new Map<string, number>();
  perBlock: Uint16Array;
  constructor(private readonly watched: string, private readonly blockSize: number, size: number) {
    this.perBlock = new Uint16Array(Math.ceil(size / blockSize) + 1);
  }
  async open(p: string, options?: OpenOptions): Promise<BlockFile> {
    const f = await nodeIo.open(p, options);
    const key = path.resolve(p);
    const watched = key === path.resolve(this.watched);
    const read = f.read.bind(f);
    f.read = async (buf: Uint8Array, offset: number) => {
      await read(buf, offset);
      this.bytesByFile.set(key, (this.bytesByFile.get(key) ?? 0) + buf.length);
      if (watched) for (let b = Math.floor(offset / this.blockSize); b * this.blockSize < offset + buf.length; b++) this.perBlock[b]!++;
    };
    return f;
  }
  bytes(p: string): number {
    return this.bytesByFile.get(path.resolve(p)) ?? 0;
  }
  maxPerBlock(): number {
    let m = 0;
    for (const v of this.perBlock) if (v > m) m = v;
    return m;
  }
}

interface Row {
  run: string;
  fgOps: number | null;
  fgMeanUs: number | null;
  fgP99Us: number | null;
  baseRead: number;
  maxReadsPerBlock: number;
  prefetched: number;
  toLocal: number | null;
  rate: number | null;
  backoffs: number | null;
}

async function main(): Promise<void> {
  const { values } = parseOptions('bench/prefetch', process.argv.slice(2), {
    size: { type: 'string', default: '1G' },
    hot: { type: 'string', default: '64M' },
    seconds: { type: 'string', default: '3' },
    depth: { type: 'string', default: '4' },
    cap: { type: 'string', default: '64M' },
  });
  const size = parseSize(values.size!, 'size');
  const seconds = parseInteger(values.seconds!, 'seconds', 1, 600);
  const hot = Math.min(size, parseSize(values.hot!, 'hot region'));
  const depth = parseInteger(values.depth!, 'depth', 1, 64);
  const cap = parseSize(values.cap!, 'cap');
  const bs = 64 * 1024;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-bench-prefetch-'));
  try {
    const basePath = path.join(dir, 'base.raw');
    const fd = fs.openSync(basePath, 'w');
    const piece = Buffer.alloc(MiB);
    for (let off = 0; off < size; off += MiB) {
      if ((off / MiB) % 4 === 3) continue; // a hole
      randomFillSync(piece);
      fs.writeSync(fd, piece, 0, Math.min(MiB, size - off), off);
    }
    fs.ftruncateSync(fd, size);
    fs.closeSync(fd);
    const used = fs.statSync(basePath).blocks * 512;
    console.log(`base: ${formatSize(size)} raw, ${formatSize(used)} used (allocated); block 64 KiB; chunk 1 MiB; ${os.cpus().length} CPUs`);

    let n = 0;
    const fresh = async () => {
      const img = path.join(dir, `img${n++}.fvd`);
      await FvdImage.create(nodeIo, img, { base: 'base.raw', baseFormat: 'raw', blockSize: bs });
      return img;
    };
    const rows: Row[] = [];

    const offline = async (name: string, opts: PrefetchOptions) => {
      const img = await fresh();
      const io = new CountingIo(basePath, bs, size);
      const image = await FvdImage.open(io, img, { copyOnRead: false });
      const before = io.bytes(basePath);
      const t0 = performance.now();
      const end = await new Prefetcher(image, opts).start().finished;
      const secs = (performance.now() - t0) / 1000;
      await image.close();
      if (end.state !== 'done') throw new Error(`${name}: prefetch ended ${end.state}: ${end.error?.message}`);
      rows.push({
        run: name, fgOps: null, fgMeanUs: null, fgP99Us: null, baseRead: io.bytes(basePath) - before,
        maxReadsPerBlock: io.maxPerBlock(), prefetched: end.bytesDone, toLocal: secs, rate: end.bytesDone / secs, backoffs: end.backoffs,
      });
      fs.rmSync(img);
    };

    const withForeground = async (name: string, prefetch: 'none' | 'adaptive' | 'blind') => {
      const img = await fresh();
      const io = new CountingIo(basePath, bs, size);
      const image = await FvdImage.open(io, img); // copy-on-read on, as served
      const meter = new ForegroundMeter();
      const pf =
        prefetch === 'none' ? null : new Prefetcher(image, prefetch === 'adaptive' ? { activity: meter.source, maxLatencyShare: 0.1 } : {});
      const lat: number[] = [];
      const t0 = performance.now();
      pf?.start();
      // Without prefetching: a fixed time. With it: until the image is fully local (the load
      // runs during the whole prefetch), at least one second.
      let until = t0 + (pf ? 600_000 : seconds * 1000);
      pf?.finished.then(() => (until = Math.min(until, Math.max(performance.now(), t0 + 1000))));
      let seed = 12345;
      const rand = (k: number) => {
        seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
        return seed % k;
      };
      const worker = async () => {
        const buf = Buffer.alloc(4096, 0xab);
        while (performance.now() < until) {
          const off = rand(hot / 4096) * 4096;
          const s = process.hrtime.bigint();
          if (rand(2)) await image.read(buf, off);
          else await image.write(buf, off);
          const ns = Number(process.hrtime.bigint() - s);
          meter.record(4096, ns);
          lat.push(ns);
        }
      };
      await Promise.all(Array.from({ length: depth }, worker));
      const fgSecs = (performance.now() - t0) / 1000;
      let toLocal: number | null = null;
      let end = pf?.progress();
      if (pf) {
        end = await pf.finished;
        toLocal = (performance.now() - t0) / 1000;
      }
      await image.close();
      lat.sort((a, b) => a - b);
      rows.push({
        run: name,
        fgOps: lat.length / fgSecs,
        fgMeanUs: lat.reduce((a, b) => a + b, 0) / lat.length / 1000,
        fgP99Us: lat[Math.floor(lat.length * 0.99)]! / 1000,
        baseRead: io.bytes(basePath),
        maxReadsPerBlock: io.maxPerBlock(),
        prefetched: end?.bytesDone ?? 0,
        toLocal,
        rate: null,
        backoffs: end?.backoffs ?? null,
      });
      fs.rmSync(img);
    };

    await offline('offline', {});
    await offline(`capped ${formatSize(cap)}/s`, { maxBytesPerSec: cap });
    await withForeground('fg only', 'none');
    await withForeground('fg + adaptive', 'adaptive');
    await withForeground('fg + blind', 'blind');

    const f = (v: number | null, d = 0) => (v === null ? '-' : v.toFixed(d));
    const table = [
      ['run', 'fg IOPS', 'fg mean µs', 'fg p99 µs', 'base read', 'max reads/blk', 'prefetched', 'to fully local s', 'rate', 'back-offs'],
      ...rows.map((r) => [
        r.run, f(r.fgOps), f(r.fgMeanUs), f(r.fgP99Us), formatSize(r.baseRead), String(r.maxReadsPerBlock), formatSize(r.prefetched),
        f(r.toLocal, 2), r.rate === null ? '-' : `${formatSize(Math.round(r.rate))}/s`, f(r.backoffs),
      ]),
    ];
    const widths = table[0]!.map((_, i) => Math.max(...table.map((row) => row[i]!.length)));
    console.log(`foreground: ${depth} workers, random 4 KiB reads/writes (50/50) over the first ${formatSize(hot)}, copy-on-read on; ${seconds} s alone, for the whole prefetch with it`);
    for (const row of table) console.log(row.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  '));
    const off = rows[0]!;
    console.log(
      `offline: base bytes read ${off.baseRead} ${off.baseRead === used ? '=' : '≠'} base used size ${used}; each block read at most once: ${off.maxReadsPerBlock <= 1 ? 'yes' : 'NO'}`,
    );
    if (off.baseRead !== used || off.maxReadsPerBlock > 1) process.exitCode = 1;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
