/**
 * fvd serve IMAGE [--name NAME] [--dev-id N] [--queues N] [--depth N] [--max-io SIZE] [--no-copy-on-read]
 *           [--no-prefetch] [--prefetch-rate SIZE] [--prefetch-share PERCENT] [--key-file PATH|-]
 * Prints the device path once it is usable; SIGTERM/SIGINT stop the device, drain in-flight I/O,
 * close the image cleanly, delete the device and exit 0. Under systemd (Type=notify) it reports
 * READY=1 only then, STATUS= with figures, STOPPING=1, and WATCHDOG=1 pings when asked.
 *
 * The key of an encrypted image: --key-file, or for --instance NAME the configuration's KEY_FILE=,
 * or else the systemd credential `key` ($CREDENTIALS_DIRECTORY/key, from LoadCredential=key:...).
 */
import fs from 'node:fs';
import path from 'node:path';
import { readInstanceConfig } from '../instance-config.js';
import { sdNotify, watchdogPingIntervalMs } from '../../ffi/sd-notify.js';
import { UsageError, formatSize, parseInteger, parsePercent, parseSize } from '../args.js';
import { defineCommand, parseCommand, usageError } from '../command.js';
import { UblkServer } from '../server.js';
import { FvdError, oneLine } from '../../fvd/errors.js';
import { Prefetcher } from '../../fvd/prefetch.js';
import type { QueueActivityReader } from '../queue-activity.js';
import { KEY_FILE_OPTION, keepOutOfCoreDumps, readKeyFile, wipe } from '../key-file.js';
import { runGrowCommand } from '../grow.js';
import { figuresFile, linkDevice, prometheusText, unlinkDevice, writeAtomically, type DeviceFigures } from '../metrics.js';
import { stateDir, writeState } from '../state.js';
import { StorageIo } from '../../storage/storage-io.js';
import { loadRemoteConfig } from '../../storage/remote-config.js';
import { isUrl } from '../../fvd/base-location.js';
import { RemoteMonitor, formatRemote } from '../remote-status.js';

/** Prefetch chunks over a remote base: large sequential ranges (split into parallel requests). */
const REMOTE_CHUNK_BYTES = 8 * 1024 * 1024;
/** After a remote base failed a prefetch read, try again after this long (doubling, to 5 min). */
const REMOTE_RETRY_MS = 5000;

export const spec = defineCommand({
  name: 'serve',
  summary: 'serve an image as a block device /dev/ublkbN until stopped',
  usage: ['[options] IMAGE', '--instance NAME   (systemd: /etc/fvd/NAME.conf or /var/lib/fvd/NAME.fvd)'],
  options: {
    instance: { type: 'string', arg: 'NAME', help: 'take the image and options from /etc/fvd/NAME.conf (fvd@NAME.service)' },
    name: { type: 'string', arg: 'NAME', help: "the device's name for list/stop (default: the image's file name)" },
    'dev-id': { type: 'string', arg: 'N', help: 'device number (/dev/ublkbN; default: the kernel picks)' },
    queues: { type: 'string', default: '2', arg: 'N', help: 'hardware queues, one worker thread each' },
    depth: { type: 'string', default: '128', arg: 'N', help: 'requests in flight per queue' },
    'max-io': { type: 'string', default: '512k', arg: 'SIZE', help: 'largest request' },
    'no-copy-on-read': { type: 'boolean', default: false, help: 'do not store base data the guest reads in the image' },
    'no-prefetch': { type: 'boolean', default: false, help: 'do not copy the rest of the base in the background' },
    'prefetch-rate': { type: 'string', arg: 'SIZE', help: 'bandwidth cap per second for background prefetching' },
    'prefetch-share': { type: 'string', default: '10', arg: 'PERCENT', help: "how much prefetching may raise the guest's mean request latency" },
    'grow-cmd': { type: 'string', arg: 'CMD', help: "a compact image on a block device (LV): command that grows it when free space runs low, %s = the image's path (e.g. 'lvextend -L+1G %s')" },
    'metrics-file': { type: 'string', arg: 'PATH', help: 'write Prometheus text-format metrics to PATH every 5 s (atomic rename; for node_exporter\'s textfile collector)' },
    'grow-free': { type: 'string', default: '64M', arg: 'SIZE', help: 'with --grow-cmd: grow when less than this is left past the last chunk' },
    'remote-config': { type: 'string', arg: 'FILE', help: 'settings and credentials of a remote base (default /etc/fvd/remote.conf)' },
    ...KEY_FILE_OPTION,
  },
  details: `Prints the device path once it answers I/O. SIGTERM/SIGINT stop it cleanly (drain, close, delete the
device); SIGUSR1 pauses background prefetching, SIGUSR2 resumes it. Needs the ublk_drv module.`,
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (values.instance !== undefined) {
    // systemd: fvd serve --instance NAME reads /etc/fvd/NAME.conf (or serves /var/lib/fvd/NAME.fvd)
    if (positionals.length) throw new UsageError('--instance takes its image from the configuration, not the command line');
    const conf = readInstanceConfig(values.instance);
    values.name ??= values.instance;
    positionals.push(conf.image);
    if (conf.devId !== undefined) values['dev-id'] ??= conf.devId;
    if (conf.queues !== undefined) values.queues = conf.queues;
    if (conf.depth !== undefined) values.depth = conf.depth;
    if (conf.maxIo !== undefined) values['max-io'] = conf.maxIo;
    if (conf.copyOnRead === false) values['no-copy-on-read'] = true;
    if (conf.prefetch === false) values['no-prefetch'] = true;
    if (conf.prefetchRate !== undefined) values['prefetch-rate'] = conf.prefetchRate;
    if (conf.prefetchShare !== undefined) values['prefetch-share'] = conf.prefetchShare;
    if (conf.keyFile !== undefined) values['key-file'] ??= conf.keyFile;
    if (conf.growCmd !== undefined) values['grow-cmd'] ??= conf.growCmd;
    if (conf.growFree !== undefined) values['grow-free'] = conf.growFree;
    if (conf.metricsFile !== undefined) values['metrics-file'] ??= conf.metricsFile;
    if (conf.remoteConfig !== undefined) values['remote-config'] ??= conf.remoteConfig;
    const credential = process.env.CREDENTIALS_DIRECTORY ? path.join(process.env.CREDENTIALS_DIRECTORY, 'key') : '';
    if (values['key-file'] === undefined && credential && fs.existsSync(credential)) values['key-file'] = credential;
    // Remote base credentials as a systemd credential too (LoadCredential=remote:/etc/fvd/NAME.remote).
    const remoteCred = process.env.CREDENTIALS_DIRECTORY ? path.join(process.env.CREDENTIALS_DIRECTORY, 'remote') : '';
    if (values['remote-config'] === undefined && remoteCred && fs.existsSync(remoteCred)) values['remote-config'] = remoteCred;
  }
  if (positionals.length !== 1) throw usageError(spec);
  const image = positionals[0]!;
  const maxIo = parseSize(values['max-io']!, 'max I/O size');
  if (maxIo < 4096 || maxIo > 32 * 1024 * 1024 || maxIo % 4096) throw new UsageError(`invalid max I/O size ${maxIo}: a multiple of 4 KiB from 4 KiB to 32 MiB`);
  const log = (line: string) => console.error(oneLine(`fvd[${process.pid}]: ${line}`));
  // The daemon holds guest data in its request buffers and, for an encrypted image, the master
  // key: never in a core dump, never readable through ptrace by another process of this user.
  keepOutOfCoreDumps();
  let fatal: ((reason: string) => void) | undefined;
  const prefetchRate = values['prefetch-rate'] !== undefined ? parseSize(values['prefetch-rate'], 'prefetch rate') : undefined;
  const prefetchShare = parsePercent(values['prefetch-share']!, 'prefetch latency share');
  const growFree = parseSize(values['grow-free']!, 'grow threshold');
  const growCmd = values['grow-cmd'];
  if (growCmd !== undefined && (growCmd.trim() === '' || /[\x00-\x1f]/.test(growCmd))) throw new UsageError('--grow-cmd: an empty command or one with control characters');
  if (growCmd !== undefined && !fs.statSync(image, { throwIfNoEntry: false })?.isBlockDevice())
    throw new UsageError(`--grow-cmd: ${image} is not a block device (a file grows by itself)`);
  const key = readKeyFile(values['key-file']);
  const io = new StorageIo(values['remote-config'] !== undefined ? loadRemoteConfig(values['remote-config']) : undefined);
  const server = await UblkServer.start({
    io,
    image,
    name: values.name ?? path.basename(image).replace(/\.[^.]*$/, ''), // = `name` below
    devId: values['dev-id'] !== undefined ? parseInteger(values['dev-id'], 'device id', 0, 1 << 20) : -1,
    queues: parseInteger(values.queues!, 'queue count', 1, 64),
    depth: parseInteger(values.depth!, 'queue depth', 1, 4096),
    maxIo,
    copyOnRead: !values['no-copy-on-read'],
    key,
    log,
    onFatal: (reason) => fatal?.(reason),
  })
    .catch((err) => {
      throw sandboxHint(err, image, values.instance);
    })
    .finally(() => wipe(key));

  // Background prefetching of the base, adaptive: the queue workers time every request
  // (daemon/queue-activity.ts) and the prefetcher's latency budget keeps the guest's mean latency
  // within the configured share of its baseline (fvd/prefetch-control.ts).
  const st = server.image.stats();
  if (growCmd !== undefined) {
    if (st.layout !== 'compact') log(`--grow-cmd ignored: ${image} is raw-like (only compact images allocate storage)`);
    else {
      server.image.setStorageGrower({ lowWaterBytes: growFree, grow: () => runGrowCommand(growCmd, image, log) });
      log(`storage: grows with '${growCmd}' when less than ${formatSize(growFree)} is left`);
    }
  }
  const activity = server.activityReader();
  const remoteBase = st.baseChain.some((b) => isUrl(b.path));
  const remote = new RemoteMonitor(io, server.image);
  let prefetcher: Prefetcher | null = null;
  let retryTimer: NodeJS.Timeout | null = null;
  let retryMs = REMOTE_RETRY_MS;
  let stopped = false;
  const startPrefetcher = () => {
    const p = new Prefetcher(server.image, {
      maxBytesPerSec: prefetchRate,
      maxLatencyShare: prefetchShare / 100,
      activity: () => activity.poll(),
      // The workers time only the daemon's part of a request: the guest's own path (its kernel,
      // its CPUs, which the copy also uses) shows as a lower request rate.
      partialLatency: true,
      ...(remoteBase ? { chunkBytes: REMOTE_CHUNK_BYTES } : {}),
    }).start();
    p.on('baseline', (ns: number) =>
      log(`prefetch: guest request latency baseline ${(ns / 1000).toFixed(1)} µs; prefetching keeps the mean within +${prefetchShare}%`),
    );
    p.on('done', () => {
      const r = remote.sample();
      log(`prefetch done: the image is fully local, the base is no longer needed${r ? ` (${formatRemote(r)})` : ''}`);
    });
    p.on('failed', (pr: { error?: Error }) => {
      log(`prefetch stopped: ${pr.error?.message}`);
      // A remote base that failed (server down past the retry budget) may come back: the copy
      // resumes later where it stopped; a local base's failure stays final.
      if (remoteBase && !stopped) {
        log(`prefetch: retrying in ${retryMs / 1000} s`);
        retryTimer = setTimeout(() => {
          retryTimer = null;
          if (!stopped) prefetcher = startPrefetcher();
        }, retryMs);
        retryMs = Math.min(retryMs * 2, 300_000);
      }
    });
    p.on('persisted', () => (retryMs = REMOTE_RETRY_MS));
    return p;
  };
  if (!(values['no-prefetch'] || st.fullyLocal || st.baseSize === 0)) prefetcher = startPrefetcher();

  const status = () => {
    const s = server.counters();
    const p = prefetcher?.progress();
    const r = remote.sample();
    if (r && server.state) writeState({ ...server.state, remote: r });
    return (
      `${server.devicePath} ${formatSize(server.image.size)}: ${s.fastPath + s.slowPath} requests (${s.slowPath} via engine), ` +
      `${s.flushes} flushes, ${s.errors} errors` +
      (server.image.failure ? ', WRITES REFUSED (a flush failed: restart once the storage works)' : '') +
      (p
        ? `, prefetch ${(p.fraction * 100).toFixed(1)}% ${p.state === 'paused' ? `paused (${p.pauseReason})` : p.state}` +
          (p.state === 'running' || p.state === 'paused' ? ` ${formatSize(Math.round(p.rate))}/s ETA ${p.etaSeconds === null ? '--' : `${Math.ceil(p.etaSeconds)} s`}` : '')
        : '') +
      (r ? `, ${formatRemote(r)}` : '')
    );
  };
  const name = values.name ?? path.basename(image).replace(/\.[^.]*$/, '');
  const devLink = linkDevice(name, server.devicePath, log);
  const metricsReader = server.activityReader();
  const metricsFile = values['metrics-file'];
  const figures = (): DeviceFigures => {
    const c = server.counters();
    const a = metricsReader.poll();
    const p = prefetcher?.progress();
    return {
      name,
      device: server.devicePath,
      image: path.resolve(image),
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
  };
  const publish = () => {
    const f = figures();
    try {
      writeAtomically(figuresFile(stateDir(), server.devId), JSON.stringify(f, null, 2) + '\n');
      if (metricsFile) writeAtomically(metricsFile, prometheusText(f));
    } catch (err) {
      log(`cannot write figures: ${(err as Error).message}`);
    }
  };
  publish();
  console.log(server.devicePath);
  sdNotify(`READY=1\nSTATUS=serving ${status()}`);
  const statusTimer = setInterval(() => {
    sdNotify(`STATUS=serving ${status()}`);
    publish();
  }, 5000);
  statusTimer.unref();
  const traceTimer = process.env.FVD_PREFETCH_TRACE && prefetcher ? tracePrefetch(prefetcher, server.activityReader(), log) : null;
  const ping = watchdogPingIntervalMs();
  const watchdog = ping > 0 ? setInterval(() => sdNotify('WATCHDOG=1'), ping) : null;

  return new Promise<number>((resolve) => {
    let stopping = false;
    let failed = false;
    const stop = (signal: string) => {
      if (stopping) return;
      stopping = true;
      log(`${signal}: stopping ${server.devicePath}`);
      sdNotify(`STOPPING=1\nSTATUS=stopping ${server.devicePath}`);
      clearInterval(statusTimer);
      if (traceTimer) clearInterval(traceTimer);
      stopped = true;
      if (retryTimer) clearTimeout(retryTimer);
      // The prefetcher stops (its in-flight copy finished) before the image closes.
      (prefetcher ? prefetcher.stop() : Promise.resolve()).then(() => server.stop()).then(
        () => {
          if (watchdog) clearInterval(watchdog);
          unlinkDevice(devLink, server.devicePath);
          if (metricsFile) fs.rmSync(metricsFile, { force: true });
          log(`stopped; ${status()}`);
          resolve(failed ? 1 : 0);
        },
        (err) => {
          if (watchdog) clearInterval(watchdog);
          log(`stop failed: ${(err as Error).message}`);
          resolve(1);
        },
      );
    };
    fatal = (reason) => {
      failed = true;
      log(`fatal: ${reason}`);
      stop('fatal error');
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    // SIGUSR1 pauses background prefetching (after the chunks in flight), SIGUSR2 resumes it: for
    // an operator (`systemctl kill -s USR1 fvd@NAME`) and for bench/device-prefetch.sh, which
    // alternates them to compare the guest's latency with and without prefetching in one run.
    process.on('SIGUSR1', () => {
      if (prefetcher) void prefetcher.pause().then(() => log('prefetch paused (SIGUSR1)'));
    });
    process.on('SIGUSR2', () => {
      if (prefetcher) {
        prefetcher.resume();
        log('prefetch resumed (SIGUSR2)');
      }
    });
    process.on('SIGINT', () => stop('SIGINT'));
  });
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
