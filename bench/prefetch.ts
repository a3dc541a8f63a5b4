/**
 * Prefetch benchmark: `node build/bench/prefetch.js [--size 1G] [--seconds 3] [--depth 4] [--reps 3]
 * [--share 0.1] [--cap 64M]`.
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
 *
 * Every foreground run starts the same way: a fresh image whose hot region was read once (copy-on-
 * read made it local), so the runs differ only by the prefetcher. The three foreground runs are
 * repeated --reps times, interleaved and in a rotating order, because this machine is shared and
 * its speed drifts; each repetition's latency rise is against the fg-only run of the
 * same repetition, and the summary gives medians. Base reads beyond the used size in the foreground
 * runs are the guest's own: a guest read of a block the prefetcher holds locked reads the base
 * without copying it (the guest never waits).
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
  rep: number;
  fgOps: number | null;
  fgMeanUs: number | null;
  fgP99Us: number | null;
  /** Mean foreground latency over the fg-only run of the same repetition, minus 1. */
  rise: number | null;
  baseRead: number;
  maxReadsPerBlock: number;
  prefetched: number;
  toLocal: number | null;
  rate: number | null;
  throttles: number | null;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

async function main(): Promise<void> {
  const { values } = parseOptions('bench/prefetch', process.argv.slice(2), {
    size: { type: 'string', default: '1G' },
    hot: { type: 'string', default: '64M' },
    seconds: { type: 'string', default: '3' },
    depth: { type: 'string', default: '4' },
    cap: { type: 'string', default: '64M' },
    reps: { type: 'string', default: '3' },
    share: { type: 'string', default: '0.1' },
    'busy-chunk': { type: 'string', default: '256K' },
  });
  const size = parseSize(values.size!, 'size');
  const seconds = parseInteger(values.seconds!, 'seconds', 1, 600);
  const hot = Math.min(size, parseSize(values.hot!, 'hot region'));
  const depth = parseInteger(values.depth!, 'depth', 1, 64);
  const cap = parseSize(values.cap!, 'cap');
  const reps = parseInteger(values.reps!, 'reps', 1, 50);
  const share = Number(values.share);
  if (!(share >= 0 && share <= 10)) throw new Error(`invalid --share '${values.share}'`);
  const busyChunk = parseSize(values['busy-chunk']!, 'busy chunk');
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
    console.log(
      `base: ${formatSize(size)} raw, ${formatSize(used)} used (allocated); block 64 KiB; chunk 1 MiB idle, ${formatSize(busyChunk)} busy; ` +
        `latency share ${share}; ${os.cpus().length} CPUs`,
    );

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
        run: name, rep: 0, fgOps: null, fgMeanUs: null, fgP99Us: null, rise: null, baseRead: io.bytes(basePath) - before,
        maxReadsPerBlock: io.maxPerBlock(), prefetched: end.bytesDone, toLocal: secs, rate: end.bytesDone / secs, throttles: null,
      });
      fs.rmSync(img);
    };

    const withForeground = async (name: string, rep: number, prefetch: 'none' | 'adaptive' | 'blind') => {
      const img = await fresh();
      const io = new CountingIo(basePath, bs, size);
      const image = await FvdImage.open(io, img); // copy-on-read on, as served
      // Warm-up: the hot region becomes local by copy-on-read, as a guest's working set would.
      const warm = Buffer.alloc(MiB);
      for (let off = 0; off < hot; off += MiB) await image.read(warm.subarray(0, Math.min(MiB, hot - off)), off);
      await image.idle();
      const meter = new ForegroundMeter();
      const pf =
        prefetch === 'none'
          ? null
          : new Prefetcher(image, prefetch === 'adaptive' ? { activity: meter, maxLatencyShare: share, busyChunkBytes: busyChunk } : {});
      const lat: number[] = [];
      const t0 = performance.now();
      pf?.start();
      // A progress line every few seconds on stderr, for long adaptive runs.
      const ticker = pf
        ? setInterval(() => {
            const p = pf.progress();
            process.stderr.write(
              `  ${name} #${rep}: ${(p.fraction * 100).toFixed(1)}% ${formatSize(Math.round(p.rate))}/s ${p.state}` +
                ` baseline ${((p.baselineLatencyNs ?? 0) / 1000).toFixed(0)} µs, ${lat.length} fg ops, ${p.throttles} throttles\n`,
            );
          }, 5000)
        : null;
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
          meter.begin();
          const s = process.hrtime.bigint();
          if (rand(2)) await image.read(buf, off);
          else await image.write(buf, off);
          const ns = Number(process.hrtime.bigint() - s);
          meter.end(4096, ns);
          lat.push(ns);
        }
      };
      await Promise.all(Array.from({ length: depth }, worker));
      const fgSecs = (performance.now() - t0) / 1000;
      if (ticker) clearInterval(ticker);
      let toLocal: number | null = null;
      let end = pf?.progress();
      if (pf) {
        end = await pf.finished;
        toLocal = (performance.now() - t0) / 1000;
      }
      await image.close();
      const mean = lat.reduce((a, b) => a + b, 0) / lat.length / 1000;
      lat.sort((a, b) => a - b);
      const row: Row = {
        run: name,
        rep,
        fgOps: lat.length / fgSecs,
        fgMeanUs: mean,
        fgP99Us: lat[Math.floor(lat.length * 0.99)]! / 1000,
        rise: null,
        baseRead: io.bytes(basePath),
        maxReadsPerBlock: io.maxPerBlock(),
        prefetched: end?.bytesDone ?? 0,
        toLocal,
        rate: null,
        throttles: end?.throttles ?? null,
      };
      rows.push(row);
      fs.rmSync(img);
      return row;
    };

    await offline('offline', {});
    await offline(`capped ${formatSize(cap)}/s`, { maxBytesPerSec: cap });
    // The order rotates every repetition, so a position effect (what ran just before, page cache
    // state) hits every kind of run alike; the rise is computed once all three ran.
    const kinds = [['fg only', 'none'], ['fg + adaptive', 'adaptive'], ['fg + blind', 'blind']] as const;
    for (let r = 1; r <= reps; r++) {
      const got = new Map<string, Row>();
      for (let k = 0; k < kinds.length; k++) {
        const [name, mode] = kinds[(k + r - 1) % kinds.length]!;
        got.set(name, await withForeground(name, r, mode));
      }
      const ref = got.get('fg only')!;
      for (const row of got.values()) if (row !== ref) row.rise = row.fgMeanUs! / ref.fgMeanUs! - 1;
    }

    const f = (v: number | null, d = 0) => (v === null ? '-' : v.toFixed(d));
    const pct = (v: number | null) => (v === null ? '-' : `${v >= 0 ? '+' : ''}${(v * 100).toFixed(1)}%`);
    const header = ['run', 'rep', 'fg IOPS', 'fg mean µs', 'vs fg only', 'fg p99 µs', 'base read', 'max reads/blk', 'prefetched', 'to fully local s', 'rate', 'throttles'];
    const line = (r: Row) => [
      r.run, r.rep ? String(r.rep) : '-', f(r.fgOps), f(r.fgMeanUs), pct(r.rise), f(r.fgP99Us), formatSize(r.baseRead), String(r.maxReadsPerBlock),
      formatSize(r.prefetched), f(r.toLocal, 2), r.rate === null ? '-' : `${formatSize(Math.round(r.rate))}/s`, f(r.throttles),
    ];
    const print = (table: string[][]) => {
      const widths = table[0]!.map((_, i) => Math.max(...table.map((row) => row[i]!.length)));
      for (const row of table) console.log(row.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  '));
    };
    console.log(
      `foreground: ${depth} workers, random 4 KiB reads/writes (50/50) over the first ${formatSize(hot)} (local after a warm-up read), ` +
        `copy-on-read on; ${seconds} s alone, for the whole prefetch with it; ${reps} interleaved repetitions`,
    );
    print([header, ...rows.map(line)]);
    const med = (name: string, key: keyof Row) => {
      const xs = rows.filter((r) => r.run === name && r[key] !== null).map((r) => r[key] as number);
      return xs.length ? median(xs) : null;
    };
    console.log(`\nmedians of ${reps} repetitions:`);
    print([
      ['run', 'fg IOPS', 'fg mean µs', 'vs fg only', 'fg p99 µs', 'to fully local s'],
      ...['fg only', 'fg + adaptive', 'fg + blind'].map((name) => [
        name, f(med(name, 'fgOps')), f(med(name, 'fgMeanUs')), pct(med(name, 'rise')), f(med(name, 'fgP99Us')), f(med(name, 'toLocal'), 2),
      ]),
    ]);
    const off = rows[0]!;
    console.log(
      `offline: base bytes read ${off.baseRead} ${off.baseRead === used ? '=' : '≠'} base used size ${used}; each block read at most once: ${off.maxReadsPerBlock <= 1 ? 'yes' : 'NO'}`,
    );
    const adaptiveRise = med('fg + adaptive', 'rise');
    console.log(`adaptive: median mean-latency rise ${pct(adaptiveRise)} against a bound of ${pct(share)}: ${adaptiveRise !== null && adaptiveRise <= share ? 'met' : 'NOT met'}`);
    if (off.baseRead !== used || off.maxReadsPerBlock > 1) process.exitCode = 1;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
