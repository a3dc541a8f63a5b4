/**
 * `fvd bench`: a simple I/O benchmark modelled on `qemu-img bench`.
 *
 *   fvd bench [-c COUNT] [-d DEPTH] [-s BUFSIZE] [-w] [-o OFFSET] [-S STEP] [--pattern seq|rand]
 *             [--seed N] [--flush-interval N [--no-drain]] [--no-copy-on-read] [--fill BYTE]
 *             [-f fvd|raw] [--json] IMAGE
 *
 * COUNT requests of BUFSIZE bytes are issued with DEPTH of them in flight at once. Each of the
 * DEPTH slots owns one preallocated buffer, so the bench's own loop allocates nothing per request.
 *
 * Access pattern (the same rule as qemu-img bench, so both tools can be driven identically):
 *  - seq (default): the first request is at OFFSET, each next one STEP bytes further (STEP
 *    defaults to BUFSIZE), wrapping modulo the image size (qemu-img 7.2's rule). A large odd
 *    STEP, e.g. a prime number of blocks, gives a scattered permutation of the image's blocks.
 *  - rand: each request at a uniformly random BUFSIZE-aligned slot of [OFFSET, size), from a
 *    seeded PRNG (--seed) so runs are repeatable. qemu-img has no such mode.
 *
 * --flush-interval N (writes only, N >= DEPTH) follows qemu-img: whenever the number of requests
 * not yet submitted is a multiple of N (including the end of the run), the queue is drained and a
 * flush is issued; with --no-drain the flush is issued without draining.
 *
 * Only the request loop is timed (not open or close), as qemu-img does. I/O goes through the
 * buffered node:fs backend (the equivalent of qemu's cache=writeback). `-f raw` drives a plain
 * BlockFile from nodeIo with the same loop, so the engine's overhead over raw is visible with the
 * same harness. `--io uring` runs the same loop over the io_uring backend
 * (storage/uring-file.ts, 'auto' drive: one io_uring_enter per batch, blocking the event loop while
 * it waits, as a queue worker does) instead of node:fs and its libuv thread pool. Write buffers are filled with a non-zero byte (--fill, default 0xa5) so zero
 * detection cannot short-cut the writes.
 */
import { parseInteger, parseSize, formatSize, UsageError } from '../args.js';
import { OUTPUT_OPTIONS, defineCommand, outputFormat, parseCommand } from '../command.js';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { diskSize } from '../disk.js';
import type { IoBackend } from '../../fvd/io.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';

export const spec = defineCommand({
  name: 'bench',
  summary: 'benchmark the engine, like qemu-img bench',
  usage: ['[-c COUNT] [-d DEPTH] [-s BUFSIZE] [-w] [-o OFFSET] [-S STEP] [--pattern seq|rand] [options] IMAGE'],
  options: {
    count: { type: 'string', short: 'c', arg: 'COUNT', help: 'requests in all (default 75000)' },
    depth: { type: 'string', short: 'd', arg: 'DEPTH', help: 'requests in flight (default 64)' },
    'buffer-size': { type: 'string', short: 's', arg: 'SIZE', help: 'request size (default 4K)' },
    step: { type: 'string', short: 'S', arg: 'STEP', help: 'seq: distance between requests (default: the request size)' },
    offset: { type: 'string', short: 'o', arg: 'OFFSET', help: 'first offset (default 0)' },
    write: { type: 'boolean', short: 'w', help: 'write instead of read' },
    pattern: { type: 'string', arg: 'seq|rand', help: 'access pattern (default seq)' },
    seed: { type: 'string', arg: 'N', help: 'rand: PRNG seed (default 1)' },
    'flush-interval': { type: 'string', arg: 'N', help: 'writes: drain and flush every N requests' },
    'no-drain': { type: 'boolean', help: 'with --flush-interval: flush without draining' },
    'no-copy-on-read': { type: 'boolean', help: 'reads: do not copy base data into the image' },
    fill: { type: 'string', arg: 'BYTE', help: 'writes: the byte written (default 0xa5)' },
    format: { type: 'string', short: 'f', arg: 'fvd|raw', help: 'fvd (the engine) or raw (the same loop on a plain file)' },
    io: { type: 'string', arg: 'node|uring', help: 'storage backend: node:fs (default) or io_uring' },
    ...OUTPUT_OPTIONS,
    ...KEY_FILE_OPTION,
  },
});

/** What the bench drives: an FvdImage, or a raw BlockFile, behind one shape. */
interface Target {
  readonly size: number;
  read(buf: Uint8Array, offset: number): Promise<void>;
  write(buf: Uint8Array, offset: number): Promise<void>;
  flush(): Promise<void>;
  close(): Promise<void>;
}

export interface BenchResult {
  image: string;
  format: 'fvd' | 'raw';
  io: 'node' | 'uring';
  op: 'read' | 'write';
  count: number;
  depth: number;
  bufferSize: number;
  pattern: 'seq' | 'rand';
  offset: number;
  step: number | null;
  seed: number | null;
  flushInterval: number;
  drain: boolean;
  imageSize: number;
  bytes: number;
  /** Seconds for the timed request loop (including the flushes --flush-interval asks for). */
  elapsedSeconds: number;
  opsPerSecond: number;
  mibPerSecond: number;
  /** CPU seconds the whole process (main thread and libuv pool) used during the timed loop. */
  cpuUserSeconds: number;
  cpuSystemSeconds: number;
  /** Seconds close() took after the timed loop (not part of the numbers above). */
  closeSeconds: number;
}

/** mulberry32: a small, fast, seedable 32-bit PRNG. Returns a function giving [0, 1) doubles. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A byte value: 0x5a, 90. */
function parseByte(text: string): number {
  const t = text.trim();
  const value = /^0x[0-9a-f]{1,2}$/i.test(t) ? parseInt(t.slice(2), 16) : /^\d{1,3}$/.test(t) ? Number(t) : NaN;
  if (!(value >= 0 && value <= 255)) throw new UsageError(`invalid fill byte '${text}': expected 0..255 or 0x00..0xff`);
  return value;
}

async function openTarget(
  io: IoBackend,
  format: 'fvd' | 'raw',
  path: string,
  write: boolean,
  copyOnRead: boolean,
  key: Uint8Array | undefined,
): Promise<Target> {
  if (format === 'raw') {
    if (key) throw new UsageError('--key-file applies to encrypted FVD images, not to -f raw');
    const file = await io.open(path, { readOnly: !write });
    return {
      size: file.size(),
      read: (buf, off) => file.read(buf, off),
      write: (buf, off) => file.write(buf, off),
      flush: () => file.flush(),
      // Flush on close like FvdImage.close and qemu-img (bdrv_close flushes), so the (untimed)
      // close does the same work, and whole-process CPU numbers compare, for raw as for images.
      close: async () => {
        try {
          if (write) await file.flush();
        } finally {
          await file.close();
        }
      },
    };
  }
  // A read bench with --no-copy-on-read opens read-only, as qemu-img bench does for reads; with
  // copy-on-read (the default for reads) it opens writable so reads from a base populate the image.
  if (write) return FvdImage.open(io, path, { key });
  return FvdImage.open(io, path, copyOnRead ? { copyOnRead: true, key } : { readOnly: true, copyOnRead: false, key });
}

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  const json = outputFormat(values) === 'json';
  if (positionals.length !== 1) {
    throw new UsageError(positionals.length === 0 ? 'missing IMAGE argument' : `expected one IMAGE, got ${positionals.length} arguments`);
  }
  const imagePath = positionals[0]!;

  const count = values.count === undefined ? 75000 : parseInteger(values.count, 'count (-c)', 1, Number.MAX_SAFE_INTEGER);
  const depth = values.depth === undefined ? 64 : parseInteger(values.depth, 'depth (-d)', 1, 4096);
  const bufferSize = values['buffer-size'] === undefined ? 4096 : parseSize(values['buffer-size'], 'buffer size (-s)');
  if (bufferSize < 1 || bufferSize > 256 * 1024 * 1024) {
    throw new UsageError(`invalid buffer size (-s) '${values['buffer-size']}': must be between 1 byte and 256 MiB`);
  }
  if (bufferSize * depth > 1024 * 1024 * 1024) {
    throw new UsageError(`buffer size times depth is ${formatSize(bufferSize * depth)}: at most 1 GiB of buffers`);
  }
  const pattern = values.pattern ?? 'seq';
  if (pattern !== 'seq' && pattern !== 'rand') throw new UsageError(`invalid --pattern '${pattern}': expected seq or rand`);
  if (pattern === 'rand' && values.step !== undefined) throw new UsageError('-S (step) applies to --pattern seq only');
  if (pattern === 'seq' && values.seed !== undefined) throw new UsageError('--seed applies to --pattern rand only');
  const step = values.step === undefined ? bufferSize : parseSize(values.step, 'step (-S)');
  const startOffset = values.offset === undefined ? 0 : parseSize(values.offset, 'offset (-o)');
  const seed = values.seed === undefined ? 1 : parseInteger(values.seed, 'seed', 0, 0xffffffff);
  const write = values.write ?? false;
  const flushInterval = values['flush-interval'] === undefined ? 0 : parseInteger(values['flush-interval'], 'flush interval', 1);
  if (flushInterval && !write) throw new UsageError('--flush-interval is only for write benchmarks (-w)');
  if (flushInterval && flushInterval < depth) throw new UsageError('--flush-interval must be at least the queue depth (-d)');
  if (values['no-drain'] && !flushInterval) throw new UsageError('--no-drain only makes sense with --flush-interval');
  const drain = !values['no-drain'];
  const fill = values.fill === undefined ? 0xa5 : parseByte(values.fill);
  if (values.fill !== undefined && !write) throw new UsageError('--fill is only for write benchmarks (-w)');
  const format = values.format ?? 'fvd';
  if (format !== 'fvd' && format !== 'raw') throw new UsageError(`invalid format (-f) '${format}': expected fvd or raw`);
  if (values['no-copy-on-read'] && format === 'raw') throw new UsageError('--no-copy-on-read applies to fvd images only');
  const copyOnRead = format === 'fvd' && !values['no-copy-on-read'] && !write;
  const ioName = values.io ?? 'node';
  if (ioName !== 'node' && ioName !== 'uring') throw new UsageError(`invalid --io '${ioName}': expected node or uring`);

  // Every request must lie inside the image; check the whole sequence before the image is opened
  // (a write bench opens it read-write, which replays a dirty image's journal) so a bad
  // -o/-s/-S combination is a usage error that changes nothing, not a failure halfway through.
  const size = await diskSize(imagePath, format);
  if (startOffset + bufferSize > size) {
    throw new UsageError(`offset ${startOffset} + buffer size ${bufferSize} is past the end of the ${size}-byte image`);
  }
  if (pattern === 'seq') {
    let off = startOffset;
    for (let i = 0; i < count; i++) {
      if (off + bufferSize > size) {
        throw new UsageError(
          `request ${i} at offset ${off} crosses the end of the ${size}-byte image: choose -o/-s/-S that divide the image size`,
        );
      }
      off = (off + step) % size;
    }
  }

  let io: IoBackend = nodeIo;
  let closeIo = (): void => {};
  if (ioName === 'uring') {
    const { UringIoBackend } = await import('../../storage/uring-file.js');
    let entries = 64;
    while (entries < depth && entries < 4096) entries *= 2;
    let uring: InstanceType<typeof UringIoBackend>;
    try {
      uring = new UringIoBackend({ entries });
    } catch (err) {
      throw new UsageError(`--io uring: io_uring is not available here (${(err as Error).message.split('\n')[0]})`);
    }
    io = uring;
    closeIo = () => uring.close();
  }
  let target: Target;
  try {
    const key = readKeyFile(values['key-file']);
    target = await openTarget(io, format, imagePath, write, copyOnRead, key).finally(() => wipe(key));
  } catch (err) {
    closeIo();
    throw err;
  }
  let result: BenchResult;
  try {
    if (target.size !== size) throw new UsageError(`${imagePath} changed size while it was being opened`);
    const slots = Math.floor((size - startOffset) / bufferSize);

    const buffers: Buffer[] = [];
    for (let i = 0; i < depth; i++) buffers.push(Buffer.alloc(bufferSize, write ? fill : 0));
    const random = prng(seed);

    // Shared submission state, advanced in submission order exactly like qemu-img's bench_cb.
    let submitted = 0;
    let nextOffset = startOffset;
    let failure: unknown = undefined;
    const op = write ? target.write.bind(target) : target.read.bind(target);

    const nextRequestOffset = (): number => {
      if (pattern === 'rand') return startOffset + Math.floor(random() * slots) * bufferSize;
      const off = nextOffset;
      nextOffset = (nextOffset + step) % size;
      return off;
    };

    // One slot: keep issuing requests until `limit` requests have been submitted in total.
    const slot = async (buf: Buffer, limit: () => number): Promise<void> => {
      while (failure === undefined && submitted < limit()) {
        submitted++;
        await op(buf, nextRequestOffset());
      }
    };
    const runSlots = async (limit: () => number): Promise<void> => {
      const runs: Promise<void>[] = [];
      for (let i = 0; i < depth; i++) {
        runs.push(
          slot(buffers[i]!, limit).catch((err: unknown) => {
            if (failure === undefined) failure = err;
          }),
        );
      }
      await Promise.all(runs);
      if (failure !== undefined) throw failure;
    };

    const cpuStart = process.cpuUsage();
    const start = process.hrtime.bigint();
    if (!flushInterval) {
      await runSlots(() => count);
    } else if (drain) {
      // Flush points: whenever count - submitted is a multiple of flushInterval, drain + flush.
      let end = count % flushInterval || flushInterval;
      while (submitted < count) {
        const batchEnd = Math.min(end, count);
        await runSlots(() => batchEnd);
        await target.flush();
        end += flushInterval;
      }
    } else {
      // No drain: the slot whose write completes at a flush point issues the flush and waits for
      // it, so the flush occupies one queue slot while the other slots keep writing (qemu-img's
      // --no-drain counts the flush as one of the requests in flight in the same way).
      let nextFlushAt = count % flushInterval || flushInterval;
      const slotNoDrain = async (buf: Buffer): Promise<void> => {
        while (failure === undefined && submitted < count) {
          submitted++;
          await op(buf, nextRequestOffset());
          if (submitted >= nextFlushAt) {
            nextFlushAt += flushInterval;
            await target.flush();
          }
        }
      };
      const runs: Promise<void>[] = [];
      for (let i = 0; i < depth; i++) {
        runs.push(
          slotNoDrain(buffers[i]!).catch((err: unknown) => {
            if (failure === undefined) failure = err;
          }),
        );
      }
      await Promise.all(runs);
      if (failure !== undefined) throw failure;
    }
    const elapsedSeconds = Number(process.hrtime.bigint() - start) / 1e9;
    const cpu = process.cpuUsage(cpuStart);

    const bytes = count * bufferSize;
    result = {
      image: imagePath,
      format,
      io: ioName,
      op: write ? 'write' : 'read',
      count,
      depth,
      bufferSize,
      pattern,
      offset: startOffset,
      step: pattern === 'seq' ? step : null,
      seed: pattern === 'rand' ? seed : null,
      flushInterval,
      drain,
      imageSize: size,
      bytes,
      elapsedSeconds,
      opsPerSecond: count / elapsedSeconds,
      mibPerSecond: bytes / (1024 * 1024) / elapsedSeconds,
      cpuUserSeconds: cpu.user / 1e6,
      cpuSystemSeconds: cpu.system / 1e6,
      closeSeconds: 0,
    };
  } catch (err) {
    await target.close().catch(() => {});
    closeIo();
    throw err;
  }
  const closeStart = process.hrtime.bigint();
  try {
    await target.close();
  } finally {
    closeIo();
  }
  result.closeSeconds = Number(process.hrtime.bigint() - closeStart) / 1e9;

  if (json) {
    console.log(JSON.stringify(result));
  } else {
    const where = pattern === 'seq' ? `seq step ${formatSize(step)}` : `rand seed ${seed}`;
    const flush = flushInterval ? `, flush every ${flushInterval}${drain ? '' : ' (no drain)'}` : '';
    const via = ioName === 'uring' ? ' (io_uring)' : '';
    console.log(
      `${result.op} ${format}${via} ${imagePath}: ${count} x ${formatSize(bufferSize)}, depth ${depth}, ${where}${flush}: ` +
        `${result.opsPerSecond.toFixed(0)} ops/s, ${result.mibPerSecond.toFixed(1)} MiB/s, ${result.elapsedSeconds.toFixed(3)} s`,
    );
  }
  return 0;
}
