/**
 * fvd prefetch [--max-rate SIZE] [--chunk SIZE] [--interval SEC] [--quiet] [--key-file PATH|-] IMAGE
 * Offline prefetch: copies every block still only in the base into the image, then records
 * FULLY_LOCAL, so the base is no longer needed. Progress goes to stderr (one redrawn line on a
 * TTY, a line every --interval seconds otherwise); the summary goes to stdout. Nothing runs in the
 * foreground here, so the prefetcher only honours the bandwidth cap. Over a remote base it keeps
 * several chunks in flight (Prefetcher's default depth). SIGINT/SIGTERM stop it after the chunks
 * in flight and close the image cleanly (copied blocks are kept); exit 130.
 */
import { FvdImage } from '../../fvd/image.js';
import { storageIo } from '../../storage/storage-io.js';
import { Prefetcher, defaultChunkBytes, type PrefetchProgress } from '../../fvd/prefetch.js';
import { UsageError, formatSize, parseSize } from '../args.js';
import { defineCommand, parseCommand, usageError } from '../command.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { oneLine } from '../../fvd/errors.js';
import { refuseWhilePending } from '../pending-guard.js';

export const spec = defineCommand({
  name: 'prefetch',
  summary: 'copy the rest of the base into the image until it is fully local (progress, rate, ETA)',
  usage: ['[--max-rate SIZE] [--chunk SIZE] [--interval SEC] [-q] [--key-file PATH|-] IMAGE'],
  options: {
    'max-rate': { type: 'string', arg: 'SIZE', help: 'bandwidth cap per second (e.g. 100M)' },
    chunk: { type: 'string', arg: 'SIZE', help: 'copy unit (default 1M; 2M over NBD, 8M over HTTP)' },
    interval: { type: 'string', default: '5', arg: 'SEC', help: 'seconds between progress lines when stderr is not a terminal' },
    quiet: { type: 'boolean', short: 'q', default: false, help: 'no progress' },
    ...KEY_FILE_OPTION,
  },
  details: 'SIGINT/SIGTERM stop after the chunks in flight (copied blocks are kept); exit 130.',
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 1) throw usageError(spec);
  const path = positionals[0]!;
  refuseWhilePending(path, 'prefetch');
  const maxRate = values['max-rate'] !== undefined ? parseSize(values['max-rate'].replace(/\/s$/i, ''), 'rate') : 0;
  if (values['max-rate'] !== undefined && maxRate <= 0) throw new UsageError(`invalid rate '${values['max-rate']}': must be positive`);
  const chunkGiven = values.chunk !== undefined;
  const chunk = parseSize(values.chunk ?? '1M', 'chunk size');
  if (chunk < 512 || chunk > 256 * 1024 * 1024) throw new UsageError(`invalid chunk size '${values.chunk}': 512 bytes to 256 MiB`);
  const interval = Number(values.interval);
  if (!/^\d+(\.\d+)?$/.test(values.interval!.trim()) || !(interval > 0) || interval > 86400)
    throw new UsageError(`invalid interval '${values.interval}': seconds, more than 0`);

  // Copy-on-read off: nothing reads here but the prefetcher, which does its own copies.
  const key = readKeyFile(values['key-file']);
  const io = storageIo();
  const image = await FvdImage.open(io, path, { copyOnRead: false, key }).finally(() => wipe(key));
  let prefetcher: Prefetcher | null = null;
  let code = 0;
  const onSignal = () => void prefetcher?.stop();
  try {
    const st = image.stats();
    if (st.baseSize === 0) {
      console.log(oneLine(`${path}: no base image; nothing to prefetch`));
      return 0;
    }
    if (st.fullyLocal) {
      console.log(oneLine(`${path}: already fully local; nothing to prefetch`));
      return 0;
    }
    prefetcher = new Prefetcher(image, { chunkBytes: chunkGiven ? chunk : defaultChunkBytes(st.baseChain.map((b) => b.path)), maxBytesPerSec: maxRate || undefined });
    const bar = values.quiet ? null : new ProgressBar(process.stderr, interval * 1000);
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    prefetcher.start();
    bar?.show(prefetcher.progress(), true);
    const timer = bar ? setInterval(() => bar.show(prefetcher!.progress()), 200) : null;
    const end = await prefetcher.finished;
    if (timer) clearInterval(timer);
    bar?.show(end, true);
    bar?.finish();
    const secs = end.elapsedMs / 1000;
    const avg = secs > 0 ? end.bytesDone / secs : 0;
    const r = io.remoteStats();
    const copied =
      `copied ${formatSize(end.bytesDone)} from the base in ${secs.toFixed(1)} s (${formatSize(Math.round(avg))}/s)` +
      (r ? `, ${r.bytesFetched} bytes fetched from ${r.url} in ${r.requests} requests (${r.retries} retries)` : '');
    if (end.state === 'done') {
      console.log(oneLine(`${path}: fully local: ${copied}; the base image is no longer needed`));
    } else if (end.state === 'stopped') {
      console.log(oneLine(`${path}: interrupted: ${copied}; ${formatSize(end.bytesRemaining)} still in the base`));
      code = 130;
    } else {
      throw new UsageError(`${path}: prefetch failed after ${formatSize(end.bytesDone)}: ${end.error?.message ?? 'unknown error'}`);
    }
    return code;
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    await prefetcher?.stop();
    await image.close();
  }
}

/** One redrawn line on a TTY; a line every `intervalMs` (and at start and end) otherwise. */
class ProgressBar {
  private readonly tty: boolean;
  private last = 0;
  private drawn = false;
  constructor(
    private readonly out: NodeJS.WriteStream,
    private readonly intervalMs: number,
  ) {
    this.tty = !!out.isTTY;
  }

  show(p: PrefetchProgress, force = false): void {
    const now = performance.now();
    if (!force && now - this.last < (this.tty ? 200 : this.intervalMs)) return;
    this.last = now;
    const line = formatProgress(p, this.tty ? Math.max(10, Math.min(30, (this.out.columns ?? 80) - 60)) : 20);
    if (this.tty) {
      this.out.write(`\r${line}\x1b[K`);
      this.drawn = true;
    } else {
      this.out.write(`${line}\n`);
    }
  }

  finish(): void {
    if (this.tty && this.drawn) this.out.write('\n');
  }
}

export function formatProgress(p: PrefetchProgress, width = 20): string {
  const frac = Math.min(1, Math.max(0, p.fraction));
  const filled = Math.round(frac * width);
  const bar = '#'.repeat(filled) + '.'.repeat(width - filled);
  const state = p.state === 'paused' ? `paused (${p.pauseReason})` : p.state;
  return (
    `prefetch [${bar}] ${(frac * 100).toFixed(1).padStart(5)}%  ${formatSize(p.bytesDone)} / ${formatSize(p.bytesDone + p.bytesRemaining)}` +
    `  ${formatSize(Math.round(p.rate))}/s  ETA ${formatEta(p.etaSeconds)}  ${state}`
  );
}

function formatEta(s: number | null): string {
  if (s === null || !Number.isFinite(s)) return '--:--';
  const t = Math.ceil(s);
  const h = Math.floor(t / 3600);
  const m = Math.floor((t % 3600) / 60);
  const sec = t % 60;
  return h ? `${h}:${String(m).padStart(2, '0')}:${String(sec).padStart(2, '0')}` : `${m}:${String(sec).padStart(2, '0')}`;
}
