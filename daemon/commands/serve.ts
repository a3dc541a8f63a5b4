/**
 * fvd serve IMAGE [--name NAME] [--dev-id N] [--queues N] [--depth N] [--max-io SIZE] [--no-copy-on-read]
 *           [--no-prefetch] [--prefetch-rate SIZE] [--prefetch-share PERCENT] [--key-file PATH|-]
 *           [--recovery-wait SEC] [--takeover] [--zero-copy] [--batch-io]
 * Prints the device path once it is usable; SIGTERM/SIGINT stop the device, drain in-flight I/O,
 * close the image cleanly, delete the device and exit 0. Under systemd (Type=notify) it reports
 * READY=1 only then, STATUS= with figures, STOPPING=1, and WATCHDOG=1 pings when asked.
 *
 * The key of an encrypted image: --key-file, or for --instance NAME the configuration's KEY_FILE=,
 * or else the systemd credential `key` ($CREDENTIALS_DIRECTORY/key, from LoadCredential=key:...).
 *
 * This file reads the arguments (and an instance's configuration); the life cycle of the served
 * device — sd_notify, signals, prefetching, the stop order — is daemon/service.ts.
 */
import fs from 'node:fs';
import path from 'node:path';
import { INSTANCE_RECOVERY_WAIT, instanceRemoteConfig, readInstanceConfig } from '../instance-config.js';
import { UsageError, parseInteger, parsePercent, parseSize } from '../args.js';
import { defineCommand, parseCommand, usageError } from '../command.js';
import { oneLine } from '../../fvd/errors.js';
import { KEY_FILE_OPTION, keepOutOfCoreDumps, readKeyFile } from '../key-file.js';
import { QueueWorkerPool } from '../queue-worker-pool.js';
// The engine, the control plane and the storage backends (daemon/service.ts and what it imports)
// are loaded in run(), after the queue workers have started: both load side by side.

export const spec = defineCommand({
  name: 'serve',
  summary: 'serve an image as a block device /dev/ublkbN until stopped',
  usage: ['[options] IMAGE', '--instance NAME   (systemd: /etc/fvd/NAME.conf or /var/lib/fvd/NAME.fvd)'],
  options: {
    instance: { type: 'string', arg: 'NAME', help: 'take the image and options from /etc/fvd/NAME.conf (fvd@NAME.service)' },
    name: { type: 'string', arg: 'NAME', help: "the device's name for list/stop (default: the image's file name)" },
    'dev-id': { type: 'string', arg: 'N', help: 'device number (/dev/ublkbN; default: the kernel picks)' },
    queues: { type: 'string', default: '1', arg: 'N', help: 'hardware queues, one worker thread each (more for guests that submit from several CPUs at once, on a host with CPUs to spare)' },
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
    'recovery-wait': { type: 'string', default: '0', arg: 'SEC', help: 'keep the device when this server dies (ublk user recovery): the next serve of the image takes it over; 0 = the device dies with the server' },
    'zero-copy': {
      type: 'boolean',
      default: false,
      help: 'serve local blocks straight from the requests\' pages (ublk AUTO_BUF_REG, Linux 6.16+; not for encrypted images); off by default: measure it first (README)',
    },
    'batch-io': {
      type: 'boolean',
      default: false,
      help: 'batched ublk commands (UBLK_F_BATCH_IO, Linux 7.0+; not with --recovery-wait); off by default: measured no faster here (README)',
    },
    takeover: {
      type: 'boolean',
      default: false,
      help: 'live restart: if a server of this image runs (with --recovery-wait), it hands its device over and this one recovers it without removing it',
    },
    ...KEY_FILE_OPTION,
  },
  details: `Prints the device path once it answers I/O. SIGTERM/SIGINT stop it cleanly (drain, close, delete the
device); SIGHUP (with --recovery-wait) exits leaving the device to the next server; SIGUSR1 pauses background prefetching, SIGUSR2 resumes it. Needs the ublk_drv module.`,
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
    if (conf.zeroCopy === true) values['zero-copy'] = true;
    if (conf.prefetchRate !== undefined) values['prefetch-rate'] = conf.prefetchRate;
    if (conf.prefetchShare !== undefined) values['prefetch-share'] = conf.prefetchShare;
    if (conf.keyFile !== undefined) values['key-file'] ??= conf.keyFile;
    if (conf.growCmd !== undefined) values['grow-cmd'] ??= conf.growCmd;
    if (conf.growFree !== undefined) values['grow-free'] = conf.growFree;
    if (conf.metricsFile !== undefined) values['metrics-file'] ??= conf.metricsFile;
    values['recovery-wait'] = conf.recoveryWait ?? INSTANCE_RECOVERY_WAIT;
    const credential = process.env.CREDENTIALS_DIRECTORY ? path.join(process.env.CREDENTIALS_DIRECTORY, 'key') : '';
    if (values['key-file'] === undefined && credential && fs.existsSync(credential)) values['key-file'] = credential;
    values['remote-config'] = instanceRemoteConfig(conf, values['remote-config']);
  }
  if (positionals.length !== 1) throw usageError(spec);
  const image = positionals[0]!;
  const queues = parseInteger(values.queues!, 'queue count', 1, 64);
  // First, before this thread loads the engine: each queue worker's start-up (a Node environment
  // and its modules; seconds under emulation) then overlaps this thread's.
  const workers = new QueueWorkerPool(queues);
  const maxIo = parseSize(values['max-io']!, 'max I/O size');
  if (maxIo < 4096 || maxIo > 32 * 1024 * 1024 || maxIo % 4096) throw new UsageError(`invalid max I/O size ${maxIo}: a multiple of 4 KiB from 4 KiB to 32 MiB`);
  const log = (line: string) => console.error(oneLine(`fvd[${process.pid}]: ${line}`));
  // The daemon holds guest data in its request buffers and, for an encrypted image, the master
  // key: never in a core dump, never readable through ptrace by another process of this user.
  keepOutOfCoreDumps();
  const prefetchRate = values['prefetch-rate'] !== undefined ? parseSize(values['prefetch-rate'], 'prefetch rate') : undefined;
  const prefetchShare = parsePercent(values['prefetch-share']!, 'prefetch latency share');
  const growFree = parseSize(values['grow-free']!, 'grow threshold');
  const growCmd = values['grow-cmd'];
  if (growCmd !== undefined && (growCmd.trim() === '' || /[\x00-\x1f]/.test(growCmd))) throw new UsageError('--grow-cmd: an empty command or one with control characters');
  if (growCmd !== undefined && !fs.statSync(image, { throwIfNoEntry: false })?.isBlockDevice())
    throw new UsageError(`--grow-cmd: ${image} is not a block device (a file grows by itself)`);
  const key = readKeyFile(values['key-file']);
  let recoveryWait = parseInteger(values['recovery-wait']!, 'recovery wait', 0, 86_400);
  if (values.takeover) recoveryWait = await takeOver(image, recoveryWait, log);
  const [{ StorageIo }, { runService }] = await Promise.all([import('../../storage/storage-io.js'), import('../service.js')]);
  const remoteConfig = values['remote-config'] !== undefined ? (await import('../../storage/remote-config.js')).loadRemoteConfig(values['remote-config']) : undefined;
  const io = new StorageIo(remoteConfig);
  return runService({
    io,
    image,
    instance: values.instance,
    name: values.name ?? path.basename(image).replace(/\.[^.]*$/, ''),
    devId: values['dev-id'] !== undefined ? parseInteger(values['dev-id'], 'device id', 0, 1 << 20) : -1,
    queues,
    workers,
    depth: parseInteger(values.depth!, 'queue depth', 1, 4096),
    maxIo,
    copyOnRead: !values['no-copy-on-read'],
    zeroCopy: values['zero-copy'],
    batchIo: values['batch-io'],
    key,
    log,
    prefetch: !values['no-prefetch'],
    prefetchRate,
    prefetchShare,
    growCmd,
    growFree,
    metricsFile: values['metrics-file'],
    recoveryWait,
  });
}

/**
 * --takeover: the image's running server (if any) hands its device over and exits; this server
 * then finds the device waiting and recovers it. Without --recovery-wait it keeps the old one's.
 */
async function takeOver(image: string, recoveryWait: number, log: (line: string) => void): Promise<number> {
  const { currentBootId, fileIdOf, handOffServer, liveServerOf } = await import('../recovery.js');
  const old = fs.existsSync(image) ? liveServerOf(fileIdOf(image), currentBootId()) : null;
  if (!old) {
    log('--takeover: no running server of this image; serving it');
    return recoveryWait;
  }
  log(`--takeover: asking pid ${old.pid} to hand ${old.device} over`);
  await handOffServer(old, 120_000);
  return recoveryWait > 0 ? recoveryWait : old.recoveryWait!;
}
