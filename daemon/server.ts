/**
 * Serves one FVD image as /dev/ublkbN: the engine lives on this (main) thread, one worker thread
 * per hardware queue does the ublk data plane, and this thread runs the control plane. This file
 * is the device's life cycle (bring-up, recovery of a device an earlier server left, online grow,
 * hand-off, teardown); the queue workers as this thread sees them (start, gate, messages, end)
 * are daemon/queue-threads.ts, the engine's side of their requests (slow path, copy-on-read
 * hints, per-queue figures) daemon/engine-requests.ts.
 *
 * Life cycle (the kernel's ublk device life cycle, docs/DESIGN.md): open image → ADD_DEV → SET_PARAMS → workers mmap, set up rings
 * and FETCH every tag → START_DEV (from here, after every fetch is in) → serve → STOP_DEV (the
 * kernel drains in-flight I/O, then aborts the fetches; workers exit and release /dev/ublkcN) →
 * engine close (checkpoint, clean flag) → DEL_DEV.
 */
import fs from 'node:fs';
import os from 'node:os';
import type { DeferredBaseReport } from '../fvd/deferred-base.js';
import { FvdImage } from '../fvd/image.js';
import type { IoBackend } from '../fvd/io.js';
import { storageIo } from '../storage/storage-io.js';
import { FvdError } from '../fvd/errors.js';
import { UblkCommandError, UblkControl } from './ublk/control.js';
import { ZERO_COPY_FLAGS, describeFeatures, hasZeroCopy } from './ublk/features.js';
import {
  FVD_SERVER_TAG,
  UBLK_ATTR_FUA,
  UBLK_ATTR_VOLATILE_CACHE,
  UBLK_F_QUIESCE,
  UBLK_F_UPDATE_SIZE,
  UBLK_F_BATCH_IO,
  UBLK_S_DEV_LIVE,
} from './ublk/abi.js';
import { EngineRequests, type ServerStats } from './engine-requests.js';
import type { QueueActivityReader } from './queue-activity.js';
import type { QueueWorkerPool } from './queue-worker-pool.js';
import { QueueThreads, withTimeout } from './queue-threads.js';
import { TraceRecorder, createTrace, installEngineTrace, type TraceShared } from '../fvd/trace.js';
import { TraceFile } from './trace-file.js';
import { removeState, stateDir, writeState, type DeviceState } from './state.js';
import {
  addDevFlags,
  currentBootId,
  fileIdOf,
  findOwnDevice,
  markRecovering,
  pendingLogPath,
  recoverySize,
  removeStaleDevice,
  serverFlagsFor,
  startRecoveryRetrying,
  unmarkRecovering,
  unrecoverable,
  waitForOldServer,
  type OwnDevice,
} from './recovery.js';

/** Largest discard/write-zeroes request: whole blocks are punched in one call, so it can be big. */
const MAX_DISCARD_BYTES = 1 << 30;

export interface ServeOptions {
  image: string;
  name: string;
  devId: number; // -1 = let the kernel choose
  queues: number;
  depth: number;
  maxIo: number;
  copyOnRead: boolean;
  /** Key material of an encrypted image (wiped by the caller once start() returned). */
  key?: Uint8Array;
  log: (line: string) => void;
  /** A queue worker died while serving: the device can no longer make progress. */
  onFatal?: (reason: string) => void;
  /** Opens the image and its base chain (local files, remote bases); default storageIo(). */
  io?: IoBackend;
  /**
   * Seconds the device may wait for a new server after this one dies (ublk USER_RECOVERY, with
   * a pending log). 0: no recovery flags, the device dies with the server (the default).
   */
  recoveryWait?: number;
  /** Per-request trace file (fvd/trace.ts, daemon/trace-file.ts); default $FVD_TRACE, none if unset. */
  traceFile?: string;
  /**
   * Ask for zero copy (UBLK_F_AUTO_BUF_REG + USER_COPY, 6.16+) for a new device: local blocks are
   * read and written straight from the request's pages. Where the kernel lacks it or the image is
   * encrypted, one line says so and the device is served with copies. A recovered device keeps
   * what it was added with, whatever this says.
   */
  zeroCopy?: boolean;
  /**
   * Ask for batched ublk commands (UBLK_F_BATCH_IO, 7.0+) for a new device. Where the kernel lacks
   * them, or with recovery (recovering a batched device is neither built nor tested), one line says
   * so and the device gets one command per request.
   */
  batchIo?: boolean;
  /**
   * Queue workers started ahead (daemon/queue-worker-pool.ts): the server adopts one per queue
   * and stops the ones left over. Without it (or once it is empty) each queue starts its own.
   */
  workers?: QueueWorkerPool;
}

export type { ServerStats } from './engine-requests.js';

export class UblkServer {
  devId = -1;
  devicePath = '';
  /** The engine's side of the queues' requests: slow path, copy-on-read hints, figures. */
  private readonly engine: EngineRequests;
  /** The queue worker threads (daemon/queue-threads.ts). */
  private readonly threads: QueueThreads;
  private cdevFd = -1;
  private started = false;
  /** The per-request trace's file while tracing (FVD_TRACE); its recorder is the engine side's. */
  private traceFile: TraceFile | null = null;
  private stopping: Promise<void> | null = null;
  /** The device's UBLK_F_* flags (ADD_DEV's reply, or GET_DEV_INFO of a recovered device). */
  private deviceFlags = 0n;
  /** Set when a hand-off quiesces the device: the queues' ends are then expected, not fatal. */
  private handingOff = false;

  private constructor(
    private readonly opts: ServeOptions,
    readonly image: FvdImage,
    private ctl: UblkControl,
  ) {
    this.engine = new EngineRequests(image, opts.log);
    this.threads = new QueueThreads(image, opts.image, this.engine, opts.log, (qid, error) => this.queueExited(qid, error), opts.workers);
  }

  /**
   * A queue's thread ended: its tags would never be answered, so unless the device is going away
   * anyway it is stopped (onFatal) and pending I/O fails instead of hanging.
   */
  private queueExited(qid: number, error: string | undefined): void {
    if (this.started && !this.stopping && !this.handingOff) this.opts.onFatal?.(`queue ${qid} exited${error ? `: ${error}` : ''}`);
  }

  /**
   * Opens the image and brings the device up. On any failure everything already done is undone:
   * no device is left behind and the image is closed cleanly.
   */
  static async start(opts: ServeOptions): Promise<UblkServer> {
    // The driver first: without it the image is not even opened (so not touched).
    const ctl = await UblkControl.open();
    const recovery = (opts.recoveryWait ?? 0) > 0;
    let image: FvdImage;
    let own: OwnDevice | null = null;
    const fileId = fileIdOf(opts.image);
    const bootId = currentBootId();
    try {
      // Recovery: a device this image's dead server left waiting is taken over, never re-added.
      if (recovery) {
        fs.mkdirSync(stateDir(), { recursive: true, mode: 0o755 }); // the pending log lives there
        own = await findOwnDevice(ctl, fileId, bootId, opts.devId);
        // The old server's warden must not expire the device while this server takes it over.
        if (own) markRecovering(own.state.devId);
        if (own && !(await waitForOldServer(ctl, own, opts.log))) {
          opts.log(`device ${own.state.devId} cannot be recovered (DEAD); deleting it`);
          await ctl.deleteDevice(own.state.devId).catch(() => {});
          removeState(own.state.devId);
          own = null;
        }
      }
      // The pending log of a crashed server of this boot is applied by any serve of the image;
      // only a recoverable device keeps a new one (FORMAT.md §14).
      image = await FvdImage.open(opts.io ?? storageIo(), opts.image, {
        copyOnRead: opts.copyOnRead,
        key: opts.key,
        pendingLog: { path: pendingLogPath(fileId), bootId, fileId, record: recovery },
        // A device held for this server is not refused for a template server that is down now:
        // it is recovered, and reads that need the template fail until it is back (DESIGN.md §7).
        deferUnreachableBase: own ? reportDeferredBase(own.state.devId, opts.log) : undefined,
      });
    } catch (err) {
      if (own) unmarkRecovering(own.state.devId);
      ctl.close();
      throw err;
    }
    if (image.pendingApplied) opts.log(`applied ${image.pendingApplied} records of the previous server's pending log`);
    const server = new UblkServer(opts, image, ctl);
    server.fileId = fileId;
    server.bootId = bootId;
    if (own) {
      // Until START_USER_RECOVERY the device stays waiting for a later serve; after it a failure
      // deletes the device (teardown: STOP_DEV + DEL_DEV), so held I/O fails instead of hanging.
      try {
        await server.recover(own);
        return server;
      } catch (err) {
        unmarkRecovering(own.state.devId);
        if (!server.recoveryStarted) {
          server.devId = -1; // not ours to delete: it keeps waiting
          opts.log(`recovery of device ${own.state.devId} failed before START_USER_RECOVERY; it keeps waiting`);
        }
        await server.teardown().catch((e) => opts.log(`cleanup after a failed recovery: ${(e as Error).message}`));
        throw err;
      }
    }
    try {
      await server.bringUp();
      return server;
    } catch (err) {
      await server.teardown().catch((e) => opts.log(`cleanup after a failed start: ${(e as Error).message}`));
      throw err;
    }
  }

  /** Recovery: the image file's identity and this boot's id (daemon/recovery.ts). */
  fileId = '';
  bootId = '';
  /** Set once START_USER_RECOVERY succeeded: from then a failure must delete the device. */
  recoveryStarted = false;
  /** An END_USER_RECOVERY of ours timed out and is still in the kernel (endContinuedRecovery). */
  private endPending = false;
  /**
   * The device's size as the kernel has it (SET_PARAMS, UPDATE_SIZE): the image's, except after
   * a recovery that found an online grow interrupted before UPDATE_SIZE (DESIGN.md §8).
   */
  deviceSize = 0;

  /**
   * Takes over a device this image's dead server left waiting (docs/DESIGN.md §7): the image is
   * open (journal and pending log applied), the old server is gone. No ADD_DEV, no SET_PARAMS.
   */
  private async recover(own: OwnDevice): Promise<void> {
    const { opts, image, ctl } = this;
    const id = own.state.devId;
    if (own.info.nrHwQueues !== opts.queues || own.info.queueDepth !== opts.depth || own.info.maxIoBufBytes < opts.maxIo) {
      opts.log(`device ${id} keeps its geometry: ${own.info.nrHwQueues} queues, depth ${own.info.queueDepth}, max I/O ${own.info.maxIoBufBytes} (the command line's is ignored)`);
      opts.queues = own.info.nrHwQueues;
      opts.depth = own.info.queueDepth;
      opts.maxIo = Math.min(opts.maxIo, own.info.maxIoBufBytes);
    }
    const params = await ctl.getParams(id);
    const devSectors = Number(new DataView(params.buffer, params.byteOffset).getBigUint64(8 + 16, true));
    const { deviceBytes, pendingGrow } = recoverySize(id, devSectors, image.size);
    if (pendingGrow) {
      // The old server died between a grow's header write and its UPDATE_SIZE (DESIGN.md §8):
      // serve the device's size until the kernel is told the image's, after the device is LIVE.
      opts.log(`device ${id}: interrupted online grow: recovering at ${deviceBytes} bytes (the image's header says ${image.size}; UPDATE_SIZE follows once it is live)`);
      image.setLiveSize(deviceBytes);
    }
    this.deviceSize = deviceBytes;
    opts.log(`recovering device ${id} (previous server pid ${own.state.pid})`);
    const t0 = Date.now();
    // Before the workers: they serve the device as it was added (zero copy or not).
    this.deviceFlags = own.info.flags;
    this.spawnWorkers(id);
    const how = await startRecoveryRetrying(ctl, id);
    if (how === 'started') {
      this.recoveryStarted = true;
      opts.log(`START_USER_RECOVERY accepted after ${Date.now() - t0} ms`);
    } else {
      opts.log(`START_USER_RECOVERY refused (EINVAL): an earlier server's recovery of device ${id} was interrupted before any queue was fetched (this kernel then refuses a new START); continuing that recovery: fetch every tag, then END_USER_RECOVERY`);
    }
    // Test hook (tests/vm/e2e/18-recovery.sh): hold the recovery here so a test can kill the server
    // in its middle; a later server must complete it.
    const pauseMs = Number(process.env.FVD_TEST_RECOVERY_PAUSE_MS ?? 0);
    if (pauseMs > 0) await new Promise((r) => setTimeout(r, pauseMs));
    this.devId = id;
    this.devicePath = `/dev/ublkb${id}`;
    opts.log(describeFeatures(os.release(), ctl.features, own.info.flags));
    const t1 = Date.now();
    if (how === 'continue') await this.continueRecovery(id);
    else await this.openWorkers();
    const t2 = Date.now();
    if (how === 'continue') await this.endContinuedRecovery(id);
    else await ctl.endUserRecovery(id, process.pid);
    const t3 = Date.now();
    this.started = true;
    await ctl.waitForState(id, [UBLK_S_DEV_LIVE], 10_000);
    await waitForPath(this.devicePath, 10_000);
    opts.log(`recovered device ${id} in ${Date.now() - t0} ms (START ${t1 - t0} ms, queues fetched ${t2 - t1} ms, END_USER_RECOVERY ${t3 - t2} ms, live ${Date.now() - t3} ms)`);
    this.writeDeviceState((own.state.generation ?? 0) + 1);
    unmarkRecovering(id);
    if (pendingGrow) await this.finishInterruptedGrow();
  }

  /**
   * The second half of an online grow whose server died before UPDATE_SIZE (DESIGN.md §8), on
   * the recovered, LIVE device: UPDATE_SIZE to the image's size where the kernel offers it.
   * Never throws: the device serves its old size whatever happens here.
   */
  private async finishInterruptedGrow(): Promise<void> {
    const { opts, image, ctl } = this;
    const id = this.devId;
    const keep = `serving ${this.deviceSize} of the image's ${image.size} bytes: the grown part is not visible until the device is re-created ('fvd stop ${id}', then serve again)`;
    // Test hook (tests/vm/e2e/15-kernel.sh): a kernel without UPDATE_SIZE, on one that has it.
    const offered = ((ctl.features ?? 0n) & UBLK_F_UPDATE_SIZE) !== 0n && process.env.FVD_TEST_FAULT !== 'recover-without-update-size';
    if (!offered) {
      opts.log(`device ${id}: this kernel (${os.release()}) lacks UBLK_F_UPDATE_SIZE (6.14+); ${keep}`);
      return;
    }
    try {
      const from = this.deviceSize;
      await this.updateDeviceSize(image.size);
      opts.log(`device ${id}: UPDATE_SIZE to ${image.size} bytes done: ${this.devicePath} grew from ${from} bytes, state file updated`);
    } catch (err) {
      opts.log(`device ${id}: UPDATE_SIZE to ${image.size} bytes failed (${(err as Error).message}); ${keep}`);
    }
  }

  /**
   * Tells the kernel the device's new size (the image has it already), then the state file.
   * The queue workers' size is raised first: a request past the old end can only come after the
   * kernel's capacity changed, i.e. after this store (DESIGN.md §8). Never UPDATE_SIZE a device
   * without its disk: before Linux's fix ("ublk: check ub_disk in ublk_ctrl_set_size", stable)
   * the driver dereferences it unchecked. Checked in the same turn that queues the command: a
   * STOP_DEV queued later on the same ring runs after it.
   */
  private async updateDeviceSize(bytes: number): Promise<void> {
    if (!this.started || this.stopping) throw new FvdError(`${this.devicePath} is stopping`, 'EBUSY');
    this.image.setLiveSize(bytes);
    await this.ctl.updateSize(this.devId, bytes / 512);
    this.deviceSize = bytes;
    if (this.state) {
      this.state = { ...this.state, size: bytes };
      writeState(this.state);
    }
  }

  /**
   * The fetch half of a recovery an earlier server began and did not finish (startRefusal
   * 'continue'). /dev/ublkcN is opened first: while the dead server's process still holds it
   * nothing of the device is touched and it keeps waiting. From then a failure deletes the device
   * (teardown), since fetches of ours may be pending on it.
   */
  private async continueRecovery(id: number): Promise<void> {
    try {
      this.cdevFd = fs.openSync(`/dev/ublkc${id}`, 'r+');
    } catch (err) {
      throw new FvdError(`device ${id} cannot be recovered now: /dev/ublkc${id} is still held (${(err as NodeJS.ErrnoException).code}): the server whose recovery was interrupted has not exited`, 'EBUSY');
    }
    this.recoveryStarted = true;
    try {
      await this.openWorkers();
    } catch (err) {
      throw unrecoverable(id, (err as Error).message);
    }
  }

  /**
   * END_USER_RECOVERY of a continued recovery, bounded: it completes once every queue has all its
   * tags fetched, and a tag the dead server had fetched can be fetched by no one else, so it could
   * wait forever. On time-out the teardown gets a control ring of its own (this one's command stays
   * in the kernel until the process exits).
   */
  private async endContinuedRecovery(id: number): Promise<void> {
    const end = this.ctl.endUserRecovery(id, process.pid);
    end.catch(() => {});
    if ((await withTimeout(end, END_CONTINUED_MS)) !== 'timeout') return;
    this.ctl = await UblkControl.open();
    // The pending END holds a reference to the device until this process exits: a plain DEL_DEV
    // would wait for it forever (seen on 6.12, scenario 18 round h).
    this.endPending = true;
    throw unrecoverable(id, `END_USER_RECOVERY did not complete within ${END_CONTINUED_MS / 1000} s`);
  }

  private writeDeviceState(generation: number): void {
    const { opts, image } = this;
    const recovery = (opts.recoveryWait ?? 0) > 0;
    const st: DeviceState = {
      name: opts.name,
      devId: this.devId,
      device: this.devicePath,
      image: fs.realpathSync(opts.image),
      pid: process.pid,
      size: this.deviceSize,
      queues: opts.queues,
      depth: opts.depth,
      startedAt: new Date().toISOString(),
      queueThreads: this.threads.queues.map((q) => ({ tid: q.tid, ioFlusher: q.ioFlusher === 1 })),
      ...(recovery ? { fileId: this.fileId, bootId: this.bootId, maxIo: opts.maxIo, recoveryWait: opts.recoveryWait, generation } : {}),
    };
    this.state = st;
    writeState(st);
  }

  private async bringUp(): Promise<void> {
    const { opts, image, ctl } = this;
    const recovery = (opts.recoveryWait ?? 0) > 0;
    await removeStaleDevice(ctl, opts.devId, opts.log);
    const info = await ctl
      .addDevice({
        nrHwQueues: opts.queues,
        queueDepth: opts.depth,
        maxIoBufBytes: opts.maxIo,
        devId: opts.devId,
        ublksrvPid: process.pid,
        // UPDATE_SIZE where the kernel has it: `fvd resize` may grow the device while served.
        flags: addDevFlags(recovery, ctl.features) | ((ctl.features ?? 0n) & UBLK_F_UPDATE_SIZE) | this.zeroCopyFlags() | this.batchIoFlags(recovery),
        ublksrvFlags: recovery ? serverFlagsFor(this.fileId) : FVD_SERVER_TAG,
      })
      .catch((err) => {
        if (err instanceof UblkCommandError && err.errno === -17 /* EEXIST */)
          throw new FvdError(`ublk device id ${opts.devId} is in use by another server`, 'EBUSY');
        throw err;
      });
    this.devId = info.devId;
    this.deviceFlags = info.flags;
    this.deviceSize = image.size;
    this.devicePath = `/dev/ublkb${info.devId}`;
    opts.log(describeFeatures(os.release(), ctl.features, info.flags));
    const bs = image.blockSize;
    const physShift = Math.min(Math.log2(bs), 12);
    await ctl.setParams(this.devId, {
      devSectors: image.size / 512,
      logicalBsShift: 9,
      physicalBsShift: physShift,
      ioOptShift: Math.min(Math.log2(bs), 20),
      ioMinShift: physShift,
      maxSectors: opts.maxIo / 512,
      attrs: UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA,
      discardGranularity: Math.min(bs, 1 << 20),
      maxDiscardSectors: MAX_DISCARD_BYTES / 512,
      maxWriteZeroesSectors: MAX_DISCARD_BYTES / 512,
      maxDiscardSegments: 1,
    });
    this.spawnWorkers(this.devId);
    await this.openWorkers();
    await ctl.startDevice(this.devId, process.pid);
    this.started = true;
    await waitForPath(this.devicePath, 10_000);
    this.writeDeviceState(0);
  }

  /** The flags `--zero-copy` adds at ADD_DEV, or none, with one line saying why not. */
  private zeroCopyFlags(): bigint {
    const { opts, image, ctl } = this;
    if (!opts.zeroCopy) return 0n;
    if (image.encrypted) {
      opts.log('zero copy: not for an encrypted image (its queue threads encrypt and decrypt in their own buffers); serving with copies');
      return 0n;
    }
    if (!hasZeroCopy(ctl.features)) {
      opts.log(`zero copy: this kernel (${os.release()}) lacks UBLK_F_AUTO_BUF_REG (Linux 6.16+) or USER_COPY; serving with copies`);
      return 0n;
    }
    return ZERO_COPY_FLAGS;
  }

  /** The flag `--batch-io` adds at ADD_DEV, or none, with one line saying why not. */
  private batchIoFlags(recovery: boolean): bigint {
    const { opts, ctl } = this;
    if (!opts.batchIo) return 0n;
    if (recovery) {
      opts.log('batched I/O: not with --recovery-wait (recovering a batched device is not built); one command per request');
      return 0n;
    }
    if (((ctl.features ?? 0n) & UBLK_F_BATCH_IO) === 0n) {
      opts.log(`batched I/O: this kernel (${os.release()}) lacks UBLK_F_BATCH_IO (Linux 7.0+); one command per request`);
      return 0n;
    }
    return UBLK_F_BATCH_IO;
  }

  /** The run-time record as written at start, for refreshing its remote figures. */
  state: DeviceState | null = null;

  /**
   * Starts the queue workers, each waiting for /dev/ublkcN (openWorkers): a recovery spawns them
   * before START_USER_RECOVERY, so their start-up overlaps it.
   */
  private spawnWorkers(devId: number): void {
    const { opts } = this;
    const geometry = { devId, queues: opts.queues, depth: opts.depth, maxIo: opts.maxIo, deviceFlags: this.deviceFlags };
    this.threads.spawn(geometry, this.startTrace());
  }

  /** Opens /dev/ublkcN, hands it to the waiting workers and waits until every tag is fetched. */
  private async openWorkers(): Promise<void> {
    if (this.cdevFd < 0) this.cdevFd = fs.openSync(`/dev/ublkc${this.devId}`, 'r+'); // a continued recovery opened it
    await this.threads.open(this.cdevFd);
  }

  /** FVD_TRACE (or opts.traceFile): the shared trace buffers for the queues, and the file; else null. */
  private startTrace(): TraceShared | null {
    const file = this.opts.traceFile ?? process.env.FVD_TRACE;
    if (!file) return null;
    const shared = createTrace(this.opts.queues, this.opts.depth);
    this.traceFile = new TraceFile(file, shared);
    this.engine.trace = new TraceRecorder(shared);
    installEngineTrace(this.engine.trace);
    this.opts.log(`tracing every request to ${file}`);
    return shared;
  }

  /** The queues have stopped: the last records go to the file. */
  private stopTrace(): void {
    if (!this.traceFile) return;
    installEngineTrace(null);
    // The queue threads' ids name them in a per-thread CPU split (bench/device-trace.sh).
    this.opts.log(`${this.traceFile.close()}; queue thread ids ${this.threads.threadIds().join(' ')}`);
    this.traceFile = null;
    this.engine.trace = null;
  }

  /**
   * A reader of the queues' request counts and latencies (cumulative from its creation), the
   * prefetcher's measure of foreground activity.
   */
  activityReader(): QueueActivityReader {
    return this.threads.activityReader();
  }

  /** Figures for STATUS= and `fvd list`. */
  counters(): ServerStats {
    return this.engine.counters(this.threads.queues);
  }

  /**
   * Grows the image and then the device (`fvd resize` of a served image; docs/DESIGN.md §8).
   * The kernel must have UBLK_F_UPDATE_SIZE (6.14+): checked first, so on an older kernel the
   * image stays as it is. The engine grows (file, durable header, in-memory and shared size)
   * before UPDATE_SIZE, so the kernel sends nothing past the old end before the engine serves it.
   */
  async grow(req: { size?: number; delta?: number }): Promise<{ oldSize: number; newSize: number }> {
    const { image, ctl } = this;
    if (this.stopping) throw new FvdError(`resize: ${this.devicePath} is stopping`, 'EBUSY');
    const old = image.size;
    const size = req.size ?? old + req.delta!;
    if (size < old) throw new FvdError(`resize: ${this.opts.image} is served by ${this.devicePath}: it can only grow while served (${size} < ${old} bytes); stop the server to shrink it`, 'EINVAL');
    if (((ctl.features ?? 0n) & UBLK_F_UPDATE_SIZE) === 0n)
      throw new FvdError(
        `resize: ${this.opts.image} is served by ${this.devicePath} and this kernel (${os.release()}) lacks UBLK_F_UPDATE_SIZE (6.14+): the device cannot grow while served; the image is unchanged (stop the server to resize it offline)`,
        'EINVAL',
      );
    const r = await image.growOnline(size);
    // Test hook (tests/vm/e2e/15-kernel.sh): die between the header write and UPDATE_SIZE, the
    // window a recovering server closes (docs/DESIGN.md §8).
    if (r.newSize !== r.oldSize && process.env.FVD_TEST_FAULT === 'grow-after-header') process.kill(process.pid, 'SIGKILL');
    // Compared with the device, not the image: a device left smaller by a failed UPDATE_SIZE of
    // an earlier grow or recovery grows with this one.
    const deviceOld = this.deviceSize;
    if (r.newSize > deviceOld) {
      if (!this.started || this.stopping)
        throw new FvdError(`resize: ${this.opts.image} grew to ${r.newSize} bytes but ${this.devicePath} is stopping: the next serve uses the new size`, 'EBUSY');
      try {
        await this.updateDeviceSize(r.newSize);
      } catch (err) {
        throw new FvdError(
          `resize: ${this.opts.image} grew to ${r.newSize} bytes but UPDATE_SIZE of ${this.devicePath} failed (${(err as Error).message}): the device keeps ${deviceOld} bytes until the image is served again`,
          'EIO',
        );
      }
      this.opts.log(`resized: ${this.devicePath} grew from ${deviceOld} to ${r.newSize} bytes`);
    }
    return { oldSize: deviceOld, newSize: r.newSize };
  }

  /**
   * A hand-off's drain (docs/DESIGN.md §7.5), before the journal commit: on a device with
   * UBLK_F_QUIESCE, QUIESCE_DEV makes the kernel hold new requests and abort the idle fetches,
   * and each queue ends once it has committed the requests it holds, so the process exits with
   * nothing in flight and the device goes QUIESCED with no request to reissue. Without QUIESCE,
   * or if the kernel refuses, nothing changes: the requests in flight at the exit are reissued
   * to the next server (USER_RECOVERY_REISSUE). Returns the line for the log; never throws.
   */
  async quiesceForHandOff(timeoutMs: number): Promise<string> {
    const { ctl } = this;
    if ((this.deviceFlags & UBLK_F_QUIESCE) === 0n) {
      const why = ctl.features !== null && (ctl.features & UBLK_F_QUIESCE) !== 0n ? 'this device was added without UBLK_F_QUIESCE' : 'the kernel has no UBLK_F_QUIESCE';
      return `hand-off without QUIESCE_DEV (${why}): requests in flight at the exit are reissued to the next server`;
    }
    this.handingOff = true;
    const t0 = Date.now();
    try {
      await ctl.quiesceDevice(this.devId, timeoutMs);
    } catch (err) {
      // EBUSY: some queue had every tag busy for the whole time-out. The kernel holds new
      // requests all the same; what the queues hold is reissued after the exit, as on 6.12.
      return `hand-off: QUIESCE_DEV failed (${(err as Error).message}): requests in flight at the exit are reissued to the next server`;
    }
    const t1 = Date.now();
    const exits = await this.threads.endQuiesced(timeoutMs);
    const stuck = exits.findIndex((e) => e === 'timeout');
    if (stuck >= 0) return `hand-off: device quiesced, but queue ${stuck} still held requests after ${timeoutMs} ms: they are reissued to the next server`;
    return `hand-off: device quiesced (QUIESCE_DEV ${t1 - t0} ms, queues drained ${Date.now() - t1} ms): no request is left to reissue`;
  }

  /** Stops the device, drains I/O, closes the image cleanly and deletes the device. Idempotent. */
  stop(): Promise<void> {
    this.stopping ??= this.teardown();
    return this.stopping;
  }

  /** @internal also the cleanup of a failed start or recovery */
  async teardown(): Promise<void> {
    const { ctl } = this;
    const errors: string[] = [];
    const attempt = async (what: string, fn: () => Promise<unknown>) => {
      try {
        await fn();
      } catch (err) {
        errors.push(`${what}: ${(err as Error).message}`);
      }
    };
    if (this.devId >= 0 && (this.started || this.recoveryStarted)) await attempt('STOP_DEV', () => ctl.stopDevice(this.devId));
    this.engine.flushFailures(); // the requests failed during the drain, before the closing lines
    for (const qid of await this.threads.end(this.started, 30_000)) errors.push(`queue ${qid} did not stop`);
    const hintSummary = this.engine.hintSummary(this.threads.queues);
    if (hintSummary) this.opts.log(hintSummary);
    const cowSummary = this.engine.cowSummary(this.threads.queues);
    if (cowSummary) this.opts.log(cowSummary);
    // No queue holds a block claim any more (each 'stored' message came before its queue's
    // exit; an entry pushed after the last one drained raised the flag and posted again).
    this.engine.unshareClaims();
    await this.threads.terminate();
    this.stopTrace();
    // DEL_DEV waits until nobody holds /dev/ublkcN (the workers unmapped their descriptors).
    if (this.cdevFd >= 0) fs.closeSync(this.cdevFd);
    this.cdevFd = -1;
    await attempt('closing the image', () => this.image.close());
    await this.engine.releaseCopyOnRead();
    if (this.devId >= 0) await attempt('DEL_DEV', () => (this.endPending ? ctl.deleteDeviceAsync(this.devId) : ctl.deleteDevice(this.devId)));
    ctl.close();
    if (this.devId >= 0) removeState(this.devId);
    if (errors.length) throw new FvdError(errors.join('; '), 'EIO');
  }
}

/** How long END_USER_RECOVERY of a continued recovery may take (normally milliseconds). */
const END_CONTINUED_MS = 30_000;

async function waitForPath(path: string, ms: number): Promise<void> {
  const until = Date.now() + ms;
  while (!fs.statSync(path, { throwIfNoEntry: false })?.isBlockDevice()) {
    if (Date.now() > until) throw new FvdError(`${path} did not appear within ${ms / 1000} s`, 'EIO');
    await new Promise((r) => setTimeout(r, 5));
  }
}

// Stale-device cleanup and pidAlive live in daemon/recovery.ts (they decide what is ours).
export { pidAlive, removeStaleDevice } from './recovery.js';

/** The log lines of a recovery's remote base that was unreachable at first (fvd/deferred-base.ts). */
function reportDeferredBase(devId: number, log: (line: string) => void): DeferredBaseReport {
  return (event, detail) => {
    if (event === 'unreachable') log(`device ${devId}: ${detail}; recovering anyway: reads of blocks not yet local fail (EIO) until the base is back`);
    else if (event === 'opened') log(`device ${devId}: base ${detail} reachable again: opened`);
    else log(`device ${devId}: ${detail}; reads of blocks not yet local fail (EIO)`);
  };
}
