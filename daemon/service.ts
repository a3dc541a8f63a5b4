/**
 * The life cycle of one served device, from start to exit (what `fvd serve` does once its
 * arguments are parsed):
 *
 *   start     the ublk device (daemon/server.ts), storage growth, background prefetching;
 *   ready     the device link and figures files, the device path on stdout, then READY=1 (so
 *             systemd's Type=notify and scripts waiting for the path both see a usable device);
 *   serving   STATUS= and the figures every 5 s, WATCHDOG=1 when systemd asks for pings,
 *             SIGUSR1/SIGUSR2 pause and resume prefetching;
 *   stopping  on SIGTERM/SIGINT or a fatal error: STOPPING=1, the prefetcher stops (its copy in
 *             flight finished) before the device stops and the image closes, then the device
 *             link and metrics file go. Exit status 0, or 1 after a fatal error or failed stop.
 *   hand-off  on SIGHUP, with --recovery-wait > 0 only: the prefetcher stops, the device is
 *             quiesced where the kernel can (QUIESCE_DEV), the journal is committed, and the
 *             process exits 0 *leaving the device* for the next server, which
 *             recovers it (`fvd serve --takeover`, `systemctl restart`; docs/DESIGN.md §7.5).
 */
import fs from 'node:fs';
import path from 'node:path';
import { sdNotify, watchdogPingIntervalMs } from '../ffi/sd-notify.js';
import { formatSize } from './args.js';
import { UblkServer, type ServeOptions } from './server.js';
import { FvdError } from '../fvd/errors.js';
import { Prefetcher, defaultChunkBytes } from '../fvd/prefetch.js';
import type { QueueActivityReader } from './queue-activity.js';
import { wipe } from './key-file.js';
import { figuresFile, linkDevice, prometheusText, unlinkDevice, writeAtomically, type DeviceFigures } from './metrics.js';
import { controlSocketFile, stateDir, writeState } from './state.js';
import { ControlSocket } from './control-socket.js';
import { spawnWarden } from './warden.js';
import type { StorageIo } from '../storage/storage-io.js';
import { isUrl } from '../fvd/base-location.js';
import { RemoteMonitor, formatRemote, serviceStatus } from './remote-status.js';

/** After a remote base failed a prefetch read, try again after this long (doubling, to 5 min). */
const REMOTE_RETRY_MS = 5000;
/** How long a hand-off waits for QUIESCE_DEV and then for the queues to commit what they hold. */
const HANDOFF_QUIESCE_MS = 10_000;
/** How often STATUS= and the figures files are refreshed. */
const STATUS_INTERVAL_MS = 5000;

export interface ServiceOptions extends Omit<ServeOptions, 'onFatal' | 'io'> {
  io: StorageIo;
  /** fvd@NAME.service's instance name, for the hint when the sandbox refuses the image. */
  instance?: string;
  /** Copy the rest of the base in the background (when there is anything to copy). */
  prefetch: boolean;
  prefetchRate?: number;
  /** Percent the prefetcher may raise the guest's mean request latency. */
  prefetchShare: number;
  /** A compact image on a block device: command that grows it (%s = the image's path). */
  growCmd?: string;
  growFree: number;
  /** Prometheus text-format metrics, rewritten with the figures. */
  metricsFile?: string;
}

/** Serves the device until stopped; resolves with the process exit status. Wipes opts.key once started. */
export async function runService(opts: ServiceOptions): Promise<number> {
  let service: DeviceService | null = null;
  const server = await UblkServer.start({
    io: opts.io,
    image: opts.image,
    name: opts.name,
    devId: opts.devId,
    queues: opts.queues,
    depth: opts.depth,
    maxIo: opts.maxIo,
    copyOnRead: opts.copyOnRead,
    zeroCopy: opts.zeroCopy,
    batchIo: opts.batchIo,
    key: opts.key,
    log: opts.log,
    recoveryWait: opts.recoveryWait,
    workers: opts.workers,
    // Ignored until the service waits for its stop (as before it is ready there is nothing to stop).
    onFatal: (reason) => service?.fatal(reason),
  })
    .catch((err) => {
      throw sandboxHint(err, opts.image, opts.instance);
    })
    .finally(() => wipe(opts.key));
  // A device that outlives this server needs someone to delete it if no server returns.
  if ((opts.recoveryWait ?? 0) > 0) spawnWarden(server.devId, opts.log);
  service = new DeviceService(server, opts);
  // Before the device path is announced: a script may resize as soon as it sees it.
  await service.listenForControl();
  return service.run();
}

class DeviceService {
  private readonly log: (line: string) => void;
  private readonly activity: QueueActivityReader;
  /** The figures' own reader (each reader counts from when it was made): made when the device is announced. */
  private metricsReader: QueueActivityReader | null = null;
  private readonly remote: RemoteMonitor;
  private readonly remoteBase: boolean;
  /** The prefetcher's copy unit for this base chain (fvd/prefetch.ts defaultChunkBytes). */
  private readonly prefetchChunk: number;
  private prefetcher: Prefetcher | null = null;
  private retryTimer: NodeJS.Timeout | null = null;
  private retryMs = REMOTE_RETRY_MS;
  /** Set once stopping began: no prefetch retry starts after it. */
  private stopped = false;
  private stopping = false;
  private failed = false;
  private waiting = false;
  private statusTimer: NodeJS.Timeout | null = null;
  private traceTimer: NodeJS.Timeout | null = null;
  private watchdog: NodeJS.Timeout | null = null;
  private devLink: string | null = null;
  private resolveExit: (status: number) => void = () => {};
  private control: ControlSocket | null = null;

  constructor(
    private readonly server: UblkServer,
    private readonly opts: ServiceOptions,
  ) {
    this.log = opts.log;
    this.activity = server.activityReader();
    this.remote = new RemoteMonitor(opts.io, server.image);
    const st = server.image.stats();
    this.remoteBase = st.baseChain.some((b) => isUrl(b.path));
    this.prefetchChunk = defaultChunkBytes(st.baseChain.map((b) => b.path));
    if (opts.growCmd !== undefined) this.setUpGrowth(opts.growCmd, st.layout);
    if (!(!opts.prefetch || st.fullyLocal || st.baseSize === 0)) this.prefetcher = this.startPrefetcher();
  }

  /** The control channel (`fvd resize` of this image); without it the device is served all the same. */
  async listenForControl(): Promise<void> {
    const file = controlSocketFile(this.server.devId);
    try {
      this.control = await ControlSocket.listen(file, (req) => this.server.grow(req), this.log);
    } catch (err) {
      this.log(`no control socket (${file}: ${(err as Error).message}): 'fvd resize' cannot grow this device while served`);
    }
  }

  /** Announces the device, then waits for a signal or a fatal error; resolves with the exit status. */
  run(): Promise<number> {
    const { server, opts, log } = this;
    this.devLink = linkDevice(opts.name, server.devicePath, log);
    this.metricsReader = server.activityReader();
    this.publish();
    console.log(server.devicePath);
    sdNotify(`READY=1\nSTATUS=serving ${this.status()}`);
    this.statusTimer = setInterval(() => {
      sdNotify(`STATUS=serving ${this.status()}`);
      this.publish();
    }, STATUS_INTERVAL_MS);
    this.statusTimer.unref();
    if (process.env.FVD_PREFETCH_TRACE && this.prefetcher) this.traceTimer = tracePrefetch(this.prefetcher, server.activityReader(), log);
    const ping = watchdogPingIntervalMs();
    if (ping > 0) this.watchdog = setInterval(() => sdNotify('WATCHDOG=1'), ping);
    return new Promise<number>((resolve) => {
      this.resolveExit = resolve;
      this.waiting = true;
      process.on('SIGTERM', () => this.stop('SIGTERM'));
      // SIGUSR1 pauses background prefetching (after the chunks in flight), SIGUSR2 resumes it: for
      // an operator (`systemctl kill -s USR1 fvd@NAME`) and for bench/device-prefetch.sh, which
      // alternates them to compare the guest's latency with and without prefetching in one run.
      process.on('SIGUSR1', () => {
        if (this.prefetcher) void this.prefetcher.pause().then(() => log('prefetch paused (SIGUSR1)'));
      });
      process.on('SIGUSR2', () => {
        if (this.prefetcher) {
          this.prefetcher.resume();
          log('prefetch resumed (SIGUSR2)');
        }
      });
      process.on('SIGINT', () => this.stop('SIGINT'));
      process.on('SIGHUP', () => this.handOff());
    });
  }

  /**
   * Live restart: leave the device, in the state a crash leaves it, to the next server. With
   * UBLK_F_QUIESCE (7.x) the kernel stops dispatching and the queues end once they have committed
   * what they hold, so nothing is in flight at the exit. Without it (6.12) the queues keep serving
   * until the process exits, and whatever the kernel had handed them and they had not completed
   * is reissued to the next server (USER_RECOVERY_REISSUE). The journal commit before the exit
   * only shortens the next server's work: every write acknowledged after it is in the pending
   * log, as after a crash (docs/DESIGN.md §7, §7.5).
   */
  private handOff(): void {
    const { server, log } = this;
    if ((this.opts.recoveryWait ?? 0) <= 0) {
      log(`SIGHUP ignored: ${server.devicePath} is served without --recovery-wait, it cannot outlive this server (use SIGTERM to stop it)`);
      return;
    }
    if (this.stopping) return;
    log(`SIGHUP: handing ${server.devicePath} over to the next server`);
    // Quiesce first, so that the journal commit after it covers every write acknowledged here.
    const finish = () =>
      server
        .quiesceForHandOff(HANDOFF_QUIESCE_MS)
        .then(log)
        .then(() => server.image.flush());
    this.leaveServing(`handing ${server.devicePath} over`, finish).then(
      () => {
        log(`handed over: ${server.devicePath} waits for the next server (at most ${this.opts.recoveryWait} s)`);
        this.exit(0);
      },
      (err) => {
        // The device is left all the same: a failed flush loses nothing the pending log holds.
        log(`hand-off: journal commit failed (${(err as Error).message}); the next server replays the pending log`);
        this.exit(0);
      },
    );
  }

  /** A queue worker died while serving: stop the device, exit 1. */
  fatal(reason: string): void {
    if (!this.waiting) return;
    this.failed = true;
    this.log(`fatal: ${reason}`);
    this.stop('fatal error');
  }

  private stop(signal: string): void {
    if (this.stopping) return;
    const { server, log } = this;
    log(`${signal}: stopping ${server.devicePath}`);
    this.leaveServing(`stopping ${server.devicePath}`, () => server.stop()).then(
      () => {
        unlinkDevice(this.devLink, server.devicePath);
        if (this.opts.metricsFile) fs.rmSync(this.opts.metricsFile, { force: true });
        log(`stopped; ${this.status()}`);
        this.exit(this.failed ? 1 : 0);
      },
      (err) => {
        log(`stop failed: ${(err as Error).message}`);
        this.exit(1);
      },
    );
  }

  /**
   * What a stop and a hand-off share: STOPPING=1, no more status, trace or prefetch retries, the
   * prefetcher stopped (its copy in flight finished, before the image closes); then `finish`: the
   * stop's drain and close, or a hand-off's journal commit.
   */
  private leaveServing(status: string, finish: () => Promise<void>): Promise<void> {
    this.stopping = true;
    this.stopped = true;
    sdNotify(`STOPPING=1\nSTATUS=${status}`);
    this.control?.close();
    if (this.statusTimer) clearInterval(this.statusTimer);
    if (this.traceTimer) clearInterval(this.traceTimer);
    if (this.retryTimer) clearTimeout(this.retryTimer);
    return (this.prefetcher ? this.prefetcher.stop() : Promise.resolve()).then(finish);
  }

  private exit(status: number): void {
    if (this.watchdog) clearInterval(this.watchdog);
    this.resolveExit(status);
  }

  private setUpGrowth(growCmd: string, layout: string): void {
    const { image, growFree } = this.opts;
    if (layout !== 'compact') {
      this.log(`--grow-cmd ignored: ${image} is raw-like (only compact images allocate storage)`);
      return;
    }
    this.server.image.setStorageGrower({ lowWaterBytes: growFree, grow: async () => (await import('./grow.js')).runGrowCommand(growCmd, image, this.log) });
    this.log(`storage: grows with '${growCmd}' when less than ${formatSize(growFree)} is left`);
  }

  /**
   * Background prefetching of the base, adaptive: the queue workers time every request
   * (daemon/queue-activity.ts) and the prefetcher's latency budget keeps the guest's mean latency
   * within the configured share of its baseline (fvd/prefetch-control.ts).
   */
  private startPrefetcher(): Prefetcher {
    const { log, opts, remote } = this;
    const p = new Prefetcher(this.server.image, {
      maxBytesPerSec: opts.prefetchRate,
      maxLatencyShare: opts.prefetchShare / 100,
      activity: () => this.activity.poll(),
      // The workers time only the daemon's part of a request: the guest's own path (its kernel,
      // its CPUs, which the copy also uses) shows as a lower request rate.
      partialLatency: true,
      // The copy unit `fvd prefetch` uses for the same chain (8 MiB over HTTP, 2 MiB over NBD).
      chunkBytes: this.prefetchChunk,
    }).start();
    p.on('baseline', (ns: number) =>
      log(`prefetch: guest request latency baseline ${(ns / 1000).toFixed(1)} µs; prefetching keeps the mean within +${opts.prefetchShare}%`),
    );
    p.on('done', () => {
      const r = remote.sample();
      log(`prefetch done: the image is fully local, the base is no longer needed${r ? ` (${formatRemote(r)})` : ''}`);
    });
    p.on('failed', (pr: { error?: Error }) => {
      log(`prefetch stopped: ${pr.error?.message}`);
      // A remote base that failed (server down past the retry budget) may come back: the copy
      // resumes later where it stopped; a local base's failure stays final.
      if (this.remoteBase && !this.stopped) {
        log(`prefetch: retrying in ${this.retryMs / 1000} s`);
        this.retryTimer = setTimeout(() => {
          this.retryTimer = null;
          if (!this.stopped) this.prefetcher = this.startPrefetcher();
        }, this.retryMs);
        this.retryMs = Math.min(this.retryMs * 2, 300_000);
      }
    });
    p.on('persisted', () => (this.retryMs = REMOTE_RETRY_MS));
    return p;
  }

  /** The one-line STATUS= text (also refreshes the state file's remote figures). */
  private status(): string {
    const { server } = this;
    const s = server.counters();
    const p = this.prefetcher?.progress();
    const r = this.remote.sample();
    if (r && server.state) writeState({ ...server.state, remote: r });
    return serviceStatus({ devicePath: server.devicePath, deviceSize: server.deviceSize, counters: s, writesRefused: !!server.image.failure }, p, r);
  }

  private figures(): DeviceFigures {
    const { server } = this;
    const c = server.counters();
    const a = this.metricsReader!.poll();
    const p = this.prefetcher?.progress();
    return {
      name: this.opts.name,
      device: server.devicePath,
      image: path.resolve(this.opts.image),
      virtualSize: server.image.size,
      requestsFast: c.fastPath,
      requestsEngine: c.slowPath,
      flushes: c.flushes,
      errors: c.errors,
      latencyCount: a.ops,
      latencySecondsSum: a.latencyNs / 1e9,
      bytesRead: a.bytesRead,
      bytesWritten: a.bytesWritten,
      inFlight: a.inFlight,
      prefetch: p ? { state: p.state, fraction: p.fraction, bytesDone: p.bytesDone, bytesRemaining: p.bytesRemaining } : null,
      updatedAt: new Date().toISOString(),
    };
  }

  /** The figures file (for `fvd list`/`info`) and, if asked, the Prometheus metrics file. */
  private publish(): void {
    const f = this.figures();
    try {
      writeAtomically(figuresFile(stateDir(), this.server.devId), JSON.stringify(f, null, 2) + '\n');
      if (this.opts.metricsFile) writeAtomically(this.opts.metricsFile, prometheusText(f));
    } catch (err) {
      this.log(`cannot write figures: ${(err as Error).message}`);
    }
  }
}

/**
 * Under fvd@.service the file system is read-only except /var/lib/fvd (ProtectSystem=strict): an
 * image elsewhere fails to open read-write with EROFS. Say what to add instead of only the errno.
 */
function sandboxHint(err: unknown, image: string, instance: string | undefined): unknown {
  const e = err as NodeJS.ErrnoException;
  if (e?.code !== 'EROFS' || !process.env.INVOCATION_ID) return err;
  const dir = path.dirname(path.resolve(image));
  const unit = instance !== undefined ? `fvd@${instance}` : 'the service';
  return new FvdError(
    `${image}: read-only file system: the service may write only /var/lib/fvd; allow the image's directory with 'systemctl edit ${unit}': [Service] ReadWritePaths=${dir}`,
    'EROFS',
  );
}

/**
 * FVD_PREFETCH_TRACE=1: one log line per second with what the prefetcher adapts to — the guest's
 * requests per second and their mean latency inside the daemon — and what it did (for tuning).
 */
function tracePrefetch(prefetcher: Prefetcher, activity: QueueActivityReader, log: (line: string) => void): NodeJS.Timeout {
  let last = { ...activity.poll() };
  let lastBytes = 0;
  let lastAt = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    const a = activity.poll();
    const p = prefetcher.progress();
    const dt = (now - lastAt) / 1000;
    const ops = a.ops - last.ops;
    const lat = ops ? (a.latencyNs - last.latencyNs) / ops / 1000 : 0;
    log(
      `prefetch trace: guest ${Math.round(ops / dt)} req/s, ${lat.toFixed(1)} µs mean in the daemon; ` +
        `copied ${((p.bytesDone - lastBytes) / dt / 1048576).toFixed(1)} MiB/s, ${p.state}${p.pauseReason ? ` (${p.pauseReason})` : ''}, ` +
        `baseline ${p.baselineLatencyNs === null ? '-' : (p.baselineLatencyNs / 1000).toFixed(1)} µs ` +
        `${p.baselineOpsPerSec === null ? '-' : Math.round(p.baselineOpsPerSec)} req/s, ${p.throttles} throttles`,
    );
    last = { ...a };
    lastBytes = p.bytesDone;
    lastAt = now;
  }, 1000);
  timer.unref();
  return timer;
}
