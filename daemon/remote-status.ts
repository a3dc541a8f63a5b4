/**
 * Figures about a remote base for `fvd serve`'s STATUS=, its log and the run-time record that
 * `fvd info` reads: bytes fetched from the server, the recent rate, and how much of the base is
 * local by now.
 */
import type { FvdImage, ImageStats } from '../fvd/image.js';
import type { StorageIo } from '../storage/storage-io.js';
import { formatSize } from './args.js';
import type { RemoteStatus } from './state.js';
import type { PrefetchProgress } from '../fvd/prefetch.js';

export class RemoteMonitor {
  private lastBytes = 0;
  private lastAt = performance.now();
  private rate = 0;

  constructor(
    private readonly io: StorageIo,
    private readonly image: FvdImage,
  ) {
    this.lastBytes = io.remoteStats()?.bytesFetched ?? 0;
  }

  /** Null when the image has no remote base (or never opened one and is not waiting for it). */
  sample(): RemoteStatus | null {
    const deferred = this.image.deferredBaseState();
    const transport = this.io.remoteStats();
    if (!transport && !deferred) return null;
    const stats = this.image.stats();
    // A deferred base never reached its server: no transport figures yet, only its URL.
    const r = transport ?? { url: stats.baseChain[0]?.path ?? '', bytesFetched: 0, retries: 0, failures: 0 };
    const now = performance.now();
    const dt = (now - this.lastAt) / 1000;
    if (dt >= 0.5) {
      this.rate = (r.bytesFetched - this.lastBytes) / dt;
      this.lastBytes = r.bytesFetched;
      this.lastAt = now;
    }
    const status: RemoteStatus = { url: r.url, bytesFetched: r.bytesFetched, rate: this.rate, fractionLocal: fractionLocal(stats), retries: r.retries, failures: r.failures, updatedAt: new Date().toISOString() };
    if (deferred) status.base = deferred;
    return status;
  }
}

/** The share of the base's bytes (those under the virtual disk) that are local. */
export function fractionLocal(s: ImageStats): number {
  const inBase = Math.min(s.baseSize, s.virtualSize);
  if (s.fullyLocal || inBase === 0) return 1;
  return Math.max(0, 1 - s.bytesInBase / inBase);
}

export function formatRemote(r: RemoteStatus): string {
  if (r.base === 'unreachable') return `remote base unreachable since the recovery (reads of blocks not yet local fail until it is back), ${(r.fractionLocal * 100).toFixed(1)}% local`;
  if (r.base === 'refused') return `remote base refused: changed on the server (reads of blocks not yet local fail), ${(r.fractionLocal * 100).toFixed(1)}% local`;
  return (
    `remote ${formatSize(r.bytesFetched)} fetched, ${formatSize(Math.round(r.rate))}/s, ${(r.fractionLocal * 100).toFixed(1)}% local` +
    (r.failures ? `, ${r.failures} failed reads` : '') +
    (r.retries ? `, ${r.retries} retries` : '')
  );
}

/** What STATUS= says about the device itself (daemon/service.ts gathers it every 5 s). */
export interface DeviceStatusFigures {
  devicePath: string;
  deviceSize: number;
  counters: { fastPath: number; slowPath: number; flushes: number; errors: number };
  /** A flush failed: writes are refused until a restart. */
  writesRefused: boolean;
}

/** The one-line STATUS= text of `fvd serve`: device counters, prefetch progress, remote figures. */
export function serviceStatus(d: DeviceStatusFigures, p: PrefetchProgress | undefined, r: RemoteStatus | null): string {
  const s = d.counters;
  return (
    `${d.devicePath} ${formatSize(d.deviceSize)}: ${s.fastPath + s.slowPath} requests (${s.slowPath} via engine), ` +
    `${s.flushes} flushes, ${s.errors} errors` +
    (d.writesRefused ? ', WRITES REFUSED (a flush failed: restart once the storage works)' : '') +
    (p
      ? `, prefetch ${(p.fraction * 100).toFixed(1)}% ${p.state === 'paused' ? `paused (${p.pauseReason})` : p.state}` +
        (p.state === 'running' || p.state === 'paused' ? ` ${formatSize(Math.round(p.rate))}/s ETA ${p.etaSeconds === null ? '--' : `${Math.ceil(p.etaSeconds)} s`}` : '')
      : '') +
    (r ? `, ${formatRemote(r)}` : '')
  );
}
