/**
 * The FVD engine: one open image, its base chain, and the guest-visible operations on it.
 *
 * Data layout (docs/FORMAT.md): raw-like images store guest byte X at data_offset + X; compact
 * images map each chunk through the lookup table. A bitmap bit per block of the base says whether
 * the block is local. Two in-memory copies of it exist (FVD paper §3.3.4):
 *  - `present` (fresh): the block's data is in this image — what reads consult;
 *  - `journaled` (stale): the bit is on disk or queued in the journal — what decides whether a
 *    guest write must log a bitmap update. Copy-on-read sets only `present` ("soft write"): the
 *    data equals the base, so losing the bit in a crash costs a re-read, never data.
 * Metadata that makes data visible is journaled only after that data completed, and a journal
 * commit starts with fdatasync: see Journal and FORMAT.md §7 for the ordering argument.
 */
import { STAGE_BASE_END, STAGE_BASE_START, STAGE_WRITE_END, STAGE_WRITE_START, engineStamp, engineStampFirst } from './trace.js';
import { holeAt, type BlockFile, type IoBackend } from './io.js';
import { BlockBufferPool } from './block-pool.js';
import { FvdError } from './errors.js';
import {
  AUTOCLEAR_FULLY_LOCAL,
  AUTOCLEAR_KNOWN,
  CHUNK_EMPTY,
  COMPAT_ZERO_DETECTED,
  INCOMPAT_COMPACT,
  INCOMPAT_DIRTY,
  INCOMPAT_ENCRYPTED,
  MAX_VIRTUAL_SIZE,
  SECTOR,
  encodeHeader,
  baseFormatName,
  roundUp,
  type BaseFormat,
  type Header,
} from './format.js';
import { allSet, countSet, forEachClearRun, newBitmap, setRange, testBit } from './bitmap.js';
import { Journal, PendingRecords } from './journal.js';
import { PendingLogWriter, applyPendingLog, existingQueueLogs, readPendingLog, readQueueLogs, unlinkPendingLog } from './pending-log.js';
import { BlockLocks } from './block-locks.js';
import { BlockClaims } from './block-claims.js';
import { EncryptedRequests } from './encrypted-requests.js';
import { FlushGuard } from './flush-guard.js';
import { KeyError, type XtsCipher } from './crypto.js';
import { SnapshotManager, SnapshotState, loadSnapshotState, type ActiveImageState, type SnapshotEngineHooks } from './snapshot.js';
import { baseOpener, openChainLevel } from './base-chain.js';
import { DeferredBase, openOrDefer } from './deferred-base.js';
import { PENDING, STORED, mapRun, newRun, storageLayout, type MappingLayout, type SharedView } from './mapping.js';
import { coverMappedChunks, readBaseReference, readHeaderPage, readMaps, tableRegionOf, unlockKey, writeCheckpoint } from './metadata.js';
import { ChunkAllocator, type StorageGrower } from './allocator.js';
import { CompactStorage } from './compact-storage.js';
import { DataArea } from './data-area.js';
import { BaseCopier } from './base-copy.js';

import type { CreateOptions } from './create.js';
import type { BaseChainEntry, BaseImage, Extent, ExtentKind, HostExtent, ImageStats, OpenOptions } from './image-types.js';

export type { StorageGrower } from './allocator.js';
export type { CreateOptions } from './create.js';
export type { BaseChainEntry, BaseImage, Extent, ExtentKind, HostExtent, ImageStats, OpenOptions } from './image-types.js';

const DEFAULT_MAX_COR = 16 * 1024 * 1024;

export class FvdImage {
  /** Virtual size in bytes; grows only by growOnline (a served image grown by `fvd resize`). */
  get size(): number {
    return this.virtualSize;
  }
  private virtualSize: number;
  /**
   * The size as the queue workers see it (SharedView.liveSize): one aligned float64 in shared
   * memory, written before the kernel is told the new size (docs/DESIGN.md §2.1).
   */
  private readonly sharedSize = new Float64Array(new SharedArrayBuffer(8));
  /** The last online grow (growOnline runs one at a time). */
  private growing: Promise<unknown> = Promise.resolve();
  readonly blockSize: number;
  readonly chunkSize: number;
  readonly compact: boolean;
  readonly readOnly: boolean;
  /** Copy-on-read on (off for read-only opens; turned off after a failed copy: fvd/base-copy.ts). */
  get copyOnRead(): boolean {
    return this.copier.copyOnRead;
  }
  set copyOnRead(on: boolean) {
    this.copier.copyOnRead = on;
  }
  /** Upper bound of copy-on-read data in flight (OpenOptions.maxCopyOnReadBytes). */
  get maxCopyOnReadBytes(): number {
    return this.copier.maxCorBytes;
  }

  /** Blocks with bitmap semantics: those below min(base size, virtual size). */
  private readonly baseBlocks: number;
  /** Bytes of the virtual disk backed by the base: min(base size, virtual size). */
  private readonly baseLimit: number;
  /**
   * End of the last block with a bitmap bit: min(baseBlocks × block size, virtual size). Bytes
   * between baseLimit and here belong to the last base block and follow its bit (reading zeros
   * while it is in the base); only bytes past it are always local.
   */
  private bitmapEnd: number;
  private readonly present: Uint8Array;
  private readonly journaled: Uint8Array;
  private readonly table: Uint32Array | null;
  private readonly journal: Journal | null;
  private readonly locks = new BlockLocks();
  /** Compact image: storage chunk allocation (fvd/allocator.ts) and the chunk mapping; else null. */
  private readonly alloc: ChunkAllocator | null;
  private readonly compactStorage: CompactStorage | null;
  /** Where local bytes live, encrypted or not (fvd/data-area.ts). */
  private readonly data: DataArea;
  /** This image's storage as the mapping rule sees it (fvd/mapping.ts): every block local. */
  private readonly storageMap: MappingLayout;
  /** The mapping result the synchronous mapping loops fill (one at a time: no await inside). */
  private readonly run = newRun();
  private readonly settlingForRead = (c: number): boolean => this.alloc !== null && this.alloc.allocating.has(c);
  private readonly background = new Set<Promise<void>>();
  /** Copy-on-read and prefetch copies of base blocks (fvd/base-copy.ts). */
  private readonly copier: BaseCopier;
  /** The copier's geometry, kept to grow its size with the disk (growOnline). */
  private readonly copierDisk: { size: number; blockSize: number; baseLimit: number };
  /** Block buffers of the copies (copy-on-write here, copy-on-read hints in the copier). */
  private readonly copyBlocks: BlockBufferPool;
  private allLocal: boolean;
  /** allLocal for the daemon's queue workers: [0] = 1 once fully local (read per request). */
  private readonly sharedAllLocal = new Int32Array(new SharedArrayBuffer(4));
  private closed = false;
  private readonly wasDirty: boolean;
  private readonly replayedSectors: number;
  /** Records of a crashed process's pending log applied by this open (FORMAT.md §14). */
  pendingApplied = 0;
  /** The volatile pending log this read-write image appends to, or null (OpenOptions.pendingLog). */
  private pendingLog: PendingLogWriter | null = null;
  /**
   * While the pending log is held (holdPendingLog): the bitmap runs [first, last, ...] whose
   * records wait for releasePendingLog, which sets their journaled bits; null when not held.
   */
  private heldRuns: number[] | null = null;
  private readonly heldRunsBuffer: number[] = [];
  /** Encrypted image: the data cipher, null when opened withoutKey (data I/O refused). */
  readonly encrypted: boolean;
  private readonly xts: XtsCipher | null;
  /** Encrypted image: the whole-sector and key rules of its requests (fvd/encrypted-requests.ts). */
  private readonly crypt: EncryptedRequests | null;
  /** Snapshot bookkeeping of a compact image (refcounts, shared-chunk flags); null if raw-like. */
  private readonly snap: SnapshotState | null;
  /** Internal snapshots: create, list, delete, revert (fvd/snapshot.ts). */
  readonly snapshots: SnapshotManager;
  /** The base identity recorded at create (FORMAT.md §2.2), or null. */
  baseIdentity: string | null = null;
  /** Opens the base (again): set by open when the image has one. */
  private reopenBase: (() => Promise<BaseImage>) | null = null;

  private constructor(
    readonly path: string,
    private readonly file: BlockFile,
    private readonly header: Header,
    // Not readonly: reverting a fully local image to an older snapshot opens the base again.
    private base: BaseImage | null,
    state: {
      present: Uint8Array;
      table: Uint32Array | null;
      snap: SnapshotState | null;
      readOnly: boolean;
      copyOnRead: boolean;
      maxCorBytes: number;
      nextSeq: number;
      usedSectors: number;
      replayed: number;
      xts: XtsCipher | null;
    },
  ) {
    this.virtualSize = header.virtualSize;
    this.sharedSize[0] = header.virtualSize;
    this.blockSize = header.blockSize;
    this.chunkSize = header.chunkSize;
    this.compact = (header.incompatible & INCOMPAT_COMPACT) !== 0n;
    this.readOnly = state.readOnly;
    this.baseLimit = Math.min(header.baseSize, header.virtualSize);
    this.baseBlocks = Math.ceil(this.baseLimit / header.blockSize);
    this.bitmapEnd = Math.min(this.baseBlocks * header.blockSize, header.virtualSize);
    this.present = state.present;
    this.journaled = newBitmap(state.present.length);
    this.journaled.set(state.present);
    this.table = state.table;
    this.storageMap = storageLayout(header.dataOffset, header.blockSize, header.chunkSize, state.table);
    this.allLocal = !base || (header.autoclear & AUTOCLEAR_FULLY_LOCAL) !== 0n || this.baseBlocks === 0;
    this.sharedAllLocal[0] = this.allLocal ? 1 : 0;
    this.wasDirty = (header.incompatible & INCOMPAT_DIRTY) !== 0n;
    this.replayedSectors = state.replayed;
    this.encrypted = (header.incompatible & INCOMPAT_ENCRYPTED) !== 0n;
    this.xts = state.xts;
    this.crypt = this.encrypted
      ? new EncryptedRequests(path, state.xts !== null, {
          read: (buf, offset) => this.read(buf, offset),
          write: (buf, offset) => this.write(buf, offset),
          writeSectors: (buf, offset) => this.writeSectors(buf, offset),
          zeroRange: (offset, length) => this.zeroRange(offset, length),
        })
      : null;
    this.snap = state.snap;
    this.alloc = this.table && this.snap ? new ChunkAllocator(path, file, header.dataOffset, header.chunkSize, this.table, this.snap) : null;
    this.journal = state.readOnly
      ? null
      : new Journal(file, header.journalOffset, header.journalLength, state.nextSeq, state.usedSectors, this, (batch) =>
          this.onDurable(batch),
        );
    this.compactStorage = this.alloc
      ? new CompactStorage(file, header.dataOffset, header.blockSize, header.chunkSize, header.virtualSize, this.table!, this.snap!, this.alloc, this.journal)
      : null;
    this.data = new DataArea(file, header.dataOffset, this.compactStorage, state.xts);
    this.copyBlocks = new BlockBufferPool(this.blockSize);
    this.copierDisk = { size: header.virtualSize, blockSize: this.blockSize, baseLimit: this.baseLimit };
    this.copier = new BaseCopier(
      this.copierDisk,
      this.present,
      this.locks,
      this.data,
      (buf, offset) => this.readBaseRaw(buf, offset),
      (copy) => this.track(copy),
      state.copyOnRead && !state.readOnly,
      state.maxCorBytes,
      this.copyBlocks,
    );
    const active: ActiveImageState | null = this.alloc
      ? { file, header, table: this.table!, present: this.present, journaled: this.journaled, baseBlocks: this.baseBlocks, readOnly: this.readOnly, allocator: this.alloc }
      : null;
    this.snapshots = new SnapshotManager(path, active, this.snap, this.snapshotHooks());
  }

  // ---------------------------------------------------------------------------------------------
  // create / open / close

  /** Creates an image file (fvd/create.ts). */
  static async create(io: IoBackend, imagePath: string, options: CreateOptions): Promise<void> {
    // Loaded here: a server never creates an image, so serving never loads it.
    const { createImage } = await import('./create.js');
    return createImage(io, imagePath, options, openBase);
  }

  static async open(io: IoBackend, imagePath: string, options: OpenOptions = {}): Promise<FvdImage> {
    return openImage(io, imagePath, options, []);
  }

  /** @internal used by openImage */
  static async fromParts(
    io: IoBackend,
    imagePath: string,
    file: BlockFile,
    options: OpenOptions,
    chain: string[],
  ): Promise<FvdImage> {
    const readOnly = !!options.readOnly;
    const { first, header } = await readHeaderPage(imagePath, file);
    // The key is checked before anything else is read or written (FORMAT.md §11.2).
    const xts = await unlockKey(imagePath, header, options, chain.length > 0);
    try {
      return await FvdImage.fromHeader(io, imagePath, file, options, chain, first, header, readOnly, xts);
    } catch (err) {
      xts?.destroy(); // a refused open keeps no copy of the key either
      throw err;
    }
  }

  private static async fromHeader(
    io: IoBackend,
    imagePath: string,
    file: BlockFile,
    options: OpenOptions,
    chain: string[],
    first: Uint8Array,
    header: Header,
    readOnly: boolean,
    xts: XtsCipher | null,
  ): Promise<FvdImage> {

    let base: BaseImage | null = null;
    const ref = readBaseReference(imagePath, first, header);
    // Opens the base, checked against what the image recorded (fvd/base-chain.ts).
    const reopenBase = ref ? baseOpener(io, imagePath, header, chain, ref, openBase) : null;
    if (ref && reopenBase && !(header.autoclear & AUTOCLEAR_FULLY_LOCAL)) {
      const format = baseFormatName(header.baseFormat) as BaseFormat;
      base = await openOrDefer(reopenBase, ref.path, format, header.baseSize, ref.identity, options.deferUnreachableBase);
    }
    try {
      // Bitmap, table, in-memory journal replay and the table checks (fvd/metadata.ts). Shared
      // memory: the daemon's queue workers map requests through them without copies.
      // The pending log of a crashed process of this boot: applied after the journal (§14).
      const logId = !readOnly ? options.pendingLog : undefined;
      const pending = logId ? readPendingLog(logId) : null;
      // The queue threads' logs (§14.4): records of writes they answered themselves.
      const queueLogs = logId ? readQueueLogs(logId) : [];
      const maps = await readMaps(imagePath, file, header, {
        shared: true,
        afterReplay: pending ? (sink) => queueLogs.reduce((n, log) => n + applyPendingLog(log, sink), applyPendingLog(pending, sink)) : undefined,
      });
      const { bitmap: present, table, dirty, nextSeq, replayedSectors: replayed } = maps;
      // Snapshot structures; an interrupted revert is redone here, over the replayed state.
      const snap = table ? await loadSnapshotState(imagePath, file, header, table, present, !!options.recountRefcounts) : null;
      // Read-write: the first failed flush stops every later write (fvd/flush-guard.ts).
      const image = new FvdImage(imagePath, readOnly ? file : new FlushGuard(file), header, base, {
        present,
        table,
        snap: snap ? snap.state : null,
        readOnly,
        copyOnRead: options.copyOnRead ?? true,
        maxCorBytes: options.maxCopyOnReadBytes ?? DEFAULT_MAX_COR,
        nextSeq,
        usedSectors: 0,
        replayed,
        xts,
      });
      image.reopenBase = reopenBase;
      image.baseIdentity = ref?.identity ?? null;
      if (snap?.redo) header.revertSnapshotId = 0; // cleared on disk by markOpen's checkpoint
      image.pendingApplied = maps.appliedPending;
      if (!readOnly) await image.markOpen(replayed > 0 || dirty || !!snap?.redo);
      if (logId) {
        // The checkpoint above made the applied records durable: the old log is spent (or was
        // another boot's or file's). The new one replaces it and continues its sequence numbers.
        for (const path of existingQueueLogs(logId.path)) unlinkPendingLog(path);
        if (logId.record === false) {
          if (pending?.status !== 'absent') unlinkPendingLog(logId.path);
        } else {
          image.pendingLog = PendingLogWriter.create(logId, pending?.lastSeq ?? 0);
          image.journal!.attachPendingLog(image.pendingLog);
        }
      }
      return image;
    } catch (err) {
      await base?.close();
      throw err;
    }
  }

  /** Read-write open: persist any replayed state, then set the dirty flag before the first write. */
  private async markOpen(replayed: boolean): Promise<void> {
    this.header.autoclear &= AUTOCLEAR_KNOWN;
    if (replayed) {
      await coverMappedChunks(this.file, this.header, this.table);
      // Write the replayed bitmap/table in place and restart the log after the replayed records.
      await this.journal!.checkpoint();
    }
    this.header.incompatible |= INCOMPAT_DIRTY;
    await this.writeHeader();
  }

  private async writeHeader(): Promise<void> {
    await this.file.write(encodeHeader(this.header), 0);
    await this.file.flush();
  }

  /** Waits for background copy-on-read work. */
  async idle(): Promise<void> {
    while (this.background.size) await Promise.allSettled([...this.background]);
  }

  /**
   * Why the image accepts no more writes (a flush failed: fvd/flush-guard.ts), or null. Such an
   * image closes without its checkpoint: the next open replays the journal it had on disk.
   */
  get failure(): FvdError | null {
    return this.file instanceof FlushGuard ? this.file.failure : null;
  }

  /** Clean shutdown: finish background work, checkpoint, clear the dirty flag. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    let checkpointed = false;
    try {
      await this.idle();
      if (this.failure) throw new FvdError(`${this.failure.message}; closed without a checkpoint (the image stays dirty)`, 'EIO');
      if (!this.readOnly) {
        // Every base block local (copy-on-read, writes): from now on neither bitmap nor base
        // is needed. Set only at a checkpoint, whose bitmap write precedes the header write.
        if (!this.allLocal && countSet(this.present, this.baseBlocks) === this.baseBlocks) {
          this.header.autoclear |= AUTOCLEAR_FULLY_LOCAL;
        }
        // A chunk mapped by an allocation whose data write then failed (ENOSPC) points past the
        // end of the file; in a cleanly closed image every entry points inside it (§4.3).
        await coverMappedChunks(this.file, this.header, this.table);
        this.header.incompatible &= ~INCOMPAT_DIRTY; // written by the checkpoint's header update
        await this.journal!.checkpoint();
        checkpointed = true;
      }
    } finally {
      // Checkpointed: every logged record is in the image. Otherwise the log stays for the next open.
      this.pendingLog?.close(checkpointed);
      this.xts?.destroy(); // the key leaves memory with the image (FORMAT.md §11.2)
      await this.file.close();
      await this.base?.close();
    }
  }

  /**
   * Simulates a crash of this process for tests: drops all in-memory state and closes the files
   * without writing anything (background copies may still be in flight and are abandoned too).
   */
  async abandon(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.pendingLog?.close(false); // a killed process leaves its log behind
    this.xts?.destroy();
    await this.file.close();
    await this.base?.close();
  }

  /**
   * Checkpoint target: persist all metadata in place, then move the log start. The snapshot is
   * taken before the first await, so it holds exactly the updates whose data already completed.
   */
  async checkpoint(nextSeq: number): Promise<void> {
    const bitmap = this.header.bitmapLength ? this.present.slice(0, this.header.bitmapLength) : null;
    const table = this.table ? tableRegionOf(this.header, this.table) : null;
    // (Records of a batch that overflowed the journal exist only in this snapshot.)
    await writeCheckpoint(this.file, this.header, { table, bitmap }, async () => {
      this.header.journalStartSeq = nextSeq;
      await this.writeHeader();
    });
    if (bitmap) {
      // Atomic where it changes a byte: a queue thread may set bits of it meanwhile (setBit).
      const journaled = this.journaled;
      for (let i = 0; i < bitmap.length; i++) if ((bitmap[i]! & ~journaled[i]!) !== 0) Atomics.or(journaled, i, bitmap[i]!);
    }
  }

  private onDurable(batch: PendingRecords): void {
    this.alloc?.release(batch.freed);
  }

  // ---------------------------------------------------------------------------------------------
  // guest operations

  private checkRange(offset: number, length: number, op: string): void {
    if (this.closed) throw new FvdError(`${this.path}: image is closed`, 'EINVAL');
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size)
      throw new FvdError(`${op} at ${offset}+${length} is outside the disk (${this.size} bytes)`, 'EINVAL');
  }

  private checkWritable(op: string): void {
    if (this.readOnly) throw new FvdError(`${this.path}: ${op} on an image opened read-only`, 'EROFS');
  }

  /** `slot`: the request's trace slot (fvd/trace.ts) when the daemon traces, else -1. */
  async read(buf: Uint8Array, offset: number, slot = -1): Promise<void> {
    this.checkRange(offset, buf.length, 'read');
    if (buf.length === 0) return;
    if (this.crypt?.check('read', offset, buf.length)) return this.crypt.readUnaligned(buf, offset);
    const end = offset + buf.length;
    if (this.allLocal || offset >= this.bitmapEnd) return this.data.read(buf, offset);
    const bs = this.blockSize;
    const tasks: Promise<void>[] = [];
    let pos = offset;
    while (pos < end) {
      const b = Math.floor(pos / bs);
      const local = this.isLocal(b);
      let runEnd = Math.min(end, (b + 1) * bs);
      while (runEnd < end && this.isLocal(runEnd / bs) === local) runEnd = Math.min(end, runEnd + bs);
      const sub = buf.subarray(pos - offset, runEnd - offset);
      tasks.push(local ? this.data.read(sub, pos) : this.copier.readFromBase(sub, pos, slot));
      pos = runEnd;
    }
    if (tasks.length === 1) return tasks[0];
    await Promise.all(tasks);
  }

  /**
   * `baseBlock`, optional: the base's bytes of the one block the write lies in (blockSize bytes
   * from the block's start, zeros past the base's end), read by the caller — a queue thread that
   * read them from a local raw base (daemon/fvd-queue.ts preReadBlock). A copy-on-write of that
   * block then takes its base bytes from there instead of reading the base; whether a
   * copy-on-write is needed is still decided here, under the block's lock. Not for encrypted
   * images (ignored).
   */
  async write(buf: Uint8Array, offset: number, fua = false, slot = -1, baseBlock: Uint8Array | null = null): Promise<void> {
    this.checkRange(offset, buf.length, 'write');
    this.checkWritable('write');
    if (buf.length === 0) return;
    if (this.crypt) await this.crypt.write(buf, offset, this.crypt.check('write', offset, buf.length));
    else await this.writeSectors(buf, offset, slot, baseBlock);
    if (fua) await this.journal!.commit();
  }

  /** The write path under the public checks (and, encrypted, inside the sector gate). */
  private writeSectors(buf: Uint8Array, offset: number, slot = -1, baseBlock: Uint8Array | null = null): Promise<void> {
    if (this.needsBitmapWork(offset, offset + buf.length)) return this.writeSlow(buf, offset, slot, baseBlock);
    return slot < 0 ? this.data.write(buf, offset) : this.writeTraced(buf, offset, slot);
  }

  /** data.write with its trace stamps (only while the daemon traces). */
  private async writeTraced(buf: Uint8Array, offset: number, slot: number): Promise<void> {
    engineStampFirst(slot, STAGE_WRITE_START);
    await this.data.write(buf, offset);
    engineStamp(slot, STAGE_WRITE_END);
  }

  /** Makes every completed write durable, data first, then the journal records that expose it. */
  async flush(): Promise<void> {
    if (this.closed) throw new FvdError(`${this.path}: image is closed`, 'EINVAL');
    if (this.readOnly) return;
    await this.journal!.commit();
  }

  /** Discarded ranges read back as zeros (the device advertises discard_zeroes_data semantics). */
  discard(offset: number, length: number): Promise<void> {
    return this.writeZeroes(offset, length);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length, 'write-zeroes');
    this.checkWritable('write-zeroes');
    if (length === 0) return;
    if (this.crypt) return this.crypt.zero(offset, length, this.crypt.check('write-zeroes', offset, length));
    return this.zeroRange(offset, length);
  }

  private async zeroRange(offset: number, length: number): Promise<void> {
    const end = offset + length;
    const bs = this.blockSize;
    // Whole blocks are zeroed by punching storage and marking them local; partial edges are
    // written as zeros through the normal write path (which copies the rest of a base block).
    const a = roundUp(offset, bs);
    const z = end === this.size ? end : Math.floor(end / bs) * bs;
    if (a >= z) {
      await this.writeSectors(new Uint8Array(length), offset);
      return;
    }
    const edges: Promise<void>[] = [];
    if (offset < a) edges.push(this.writeSectors(new Uint8Array(a - offset), offset));
    if (z < end) edges.push(this.writeSectors(new Uint8Array(end - z), z));
    await Promise.all([...edges, this.zeroBlocks(a, z)]);
  }

  // ---------------------------------------------------------------------------------------------
  // read side

  /** Block b reads from this image (blocks past the base are always local). */
  private isLocal(b: number): boolean {
    return b >= this.baseBlocks || testBit(this.present, b);
  }

  /** Reads base bytes; beyond the base's end the disk reads zeros. */
  private async readBaseRaw(buf: Uint8Array, offset: number): Promise<void> {
    const inBase = Math.max(0, Math.min(buf.length, this.baseLimit - offset));
    if (inBase < buf.length) buf.fill(0, inBase);
    if (inBase > 0) await this.base!.read(inBase === buf.length ? buf : buf.subarray(0, inBase), offset);
  }

  private track(p: Promise<void>): void {
    this.background.add(p);
    p.finally(() => this.background.delete(p));
  }

  // ---------------------------------------------------------------------------------------------
  // prefetching hooks (fvd/prefetch.ts drives them)

  /** Blocks of the base (with a bitmap bit) and how many of them are still only in the base. */
  baseProgress(): { blocks: number; absent: number; blockSize: number } {
    const absent = this.allLocal ? 0 : this.baseBlocks - countSet(this.present, this.baseBlocks);
    return { blocks: this.baseBlocks, absent, blockSize: this.blockSize };
  }

  /**
   * Bytes of base reads worth keeping in flight for a sequential copy (the prefetcher's depth):
   * what the base serves at once when it says (a remote source's connections × request size),
   * 16 MiB for another remote base (a qcow2 or fvd image over a URL), 0 for a local one.
   */
  baseReadAhead(): number {
    const base = this.base;
    if (!base) return 0;
    return base.inFlightBytes ?? (base.remote ? 16 * 1024 * 1024 : 0);
  }

  /**
   * The path of a base that a queue thread may read itself — a plain local raw file under an
   * unencrypted image that still reads from it — or null (no base, fully local, encrypted, a
   * qcow2 or FVD base, a remote one: the engine reads those).
   */
  localRawBasePath(): string | null {
    if (!this.base || this.allLocal || this.encrypted) return null;
    return this.base.localRawPath ?? null;
  }

  /**
   * Lets queue threads copy-on-write blocks of the local raw base themselves (daemon/queue-cow.ts,
   * docs/DESIGN.md §2.5): returns the shared claims every lock of this image holds from now on,
   * or null where the queue threads may not — no plain local raw base (localRawBasePath), a
   * compact layout (a write may need a chunk allocated), read-only.
   */
  shareBlockClaims(): BlockClaims | null {
    if (this.readOnly || this.table || this.localRawBasePath() === null) return null;
    const claims = BlockClaims.create(this.baseBlocks);
    this.locks.shareWith(claims);
    return claims;
  }

  /** The queue threads are gone: locks hold in-process locks only again. */
  unshareBlockClaims(): void {
    this.locks.shareWith(null);
  }

  /**
   * A queue thread holding the claims of blocks [b0, b1] stored them whole (the base's bytes
   * around a guest write, or a write of whole blocks) at their place in the data area, and the
   * write completed: the blocks are local now.
   * Sets the bits and queues the BITMAP_SET record (and its pending-log entry) like a copy-on-write
   * here does, before the guest's write is acknowledged. The caller releases the claim after this.
   */
  adoptStoredBlocks(b0: number, b1: number): void {
    this.checkStoredBlocks(b0, b1);
    // Whole blocks are stored without looking at `present` (the guest's bytes replace them either
    // way), so the image may have become fully local (the last soft copies done, FULLY_LOCAL
    // checkpointed) while they were written: every block is local then, nothing to record.
    if (this.allLocal) return;
    this.markLocal(b0, b1);
  }

  /**
   * A queue thread stored blocks [b0, b1] (as for adoptStoredBlocks), set their `present` and
   * `journaled` bits itself, released their claims and answered the guest without waiting for
   * this thread (DESIGN.md §2.5): their BITMAP_SET record is queued now (and appended to the
   * pending log, if one is kept: the queue thread's own log held it until then, §14.4). It must
   * run before the next journal commit that a guest FLUSH waits for (EngineRequests drains every
   * queue's stored writes first).
   */
  journalAnsweredBlocks(b0: number, b1: number): void {
    this.checkStoredBlocks(b0, b1);
    if (this.allLocal) return; // FULLY_LOCAL's checkpoint holds every bit
    this.journal!.pending.addBitmap(b0, b1 - b0 + 1);
  }

  private checkStoredBlocks(b0: number, b1: number): void {
    this.checkWritable('write');
    if (this.closed) throw new FvdError(`${this.path}: image is closed`, 'EINVAL');
    if (b0 > b1 || b1 >= this.baseBlocks) throw new FvdError(`${this.path}: blocks ${b0}-${b1} are not base blocks`, 'EINVAL');
  }

  /**
   * With a pending log: creates the logs of queue threads 0 … queues−1 (FORMAT.md §14.4), closed
   * and removed with it, and returns their descriptors; null without one.
   */
  createQueueLogs(queues: number): number[] | null {
    return this.pendingLog?.createQueueLogs(queues) ?? null;
  }

  /**
   * A copy-on-read hint (daemon/cor-hints.ts): a queue thread answered a read of block b from the
   * base itself; copy the block into the image in background, as a soft write like copy-on-read
   * (skipped if it became local, or a guest request holds its lock). Never rejects: a failed copy
   * turns copy-on-read off, as a failed copy-on-read does. Waited for by idle() and close.
   * `data`: the block's data as the base holds it, read by the queue thread (a hint that carries
   * it): written without reading the base again (BaseCopier.copyCarried says why that is safe).
   * The caller may reuse `data` once the promise resolves.
   */
  copyHint(b: number, data?: Uint8Array): Promise<void> {
    if (!data) return this.copyHintRun(b, 1);
    if (this.closed || this.allLocal || this.readOnly || !this.copier.copyOnRead || b >= this.baseBlocks || testBit(this.present, b)) return Promise.resolve();
    const copy = this.copier.copyCarried(b, data);
    this.track(copy);
    return copy;
  }

  /**
   * A copy-on-read hint of the run of blocks [b, b + count) without data: the still-absent ones
   * are copied in background with one base read and one image write per absent run (a 128 KiB
   * guest read of 4 KiB blocks is one copy, not 32). Like copyHint otherwise.
   */
  copyHintRun(b: number, count: number): Promise<void> {
    const last = Math.min(b + count, this.baseBlocks) - 1;
    if (this.closed || this.allLocal || this.readOnly || !this.copier.copyOnRead || last < b) return Promise.resolve();
    const copy = this.copier.copyInBackground(b, last);
    this.track(copy);
    return copy;
  }

  /** The first block at or after `from` still only in the base, or -1. */
  nextAbsentBlock(from: number): number {
    if (this.allLocal) return -1;
    for (let b = from; b < this.baseBlocks; b++) {
      if (this.present[b >>> 3] === 0xff && (b & 7) === 0) {
        b += 7;
        continue;
      }
      if (!testBit(this.present, b)) return b;
    }
    return -1;
  }

  /**
   * Copies the blocks of [b0, b1] still only in the base into the image, as soft writes (like
   * copy-on-read: bits in memory only, persisted by persistSoftBits or the next checkpoint). Runs that a guest
   * request holds locked are skipped — the guest always wins — and come back in a later pass.
   * Returns the bytes read from the base. Errors are thrown to the caller. `scratch`, if given and
   * large enough, is the copy buffer (the caller reuses it; it is free again once this resolves).
   */
  async prefetchBlocks(b0: number, b1: number, scratch?: Uint8Array): Promise<number> {
    this.checkWritable('prefetch');
    if (this.encrypted && !this.xts) throw new KeyError(`${this.path}: prefetch into an encrypted image opened without its key`);
    if (this.closed || this.allLocal) return 0;
    return this.copier.copyAbsent(b0, Math.min(b1, this.baseBlocks - 1), scratch);
  }

  /**
   * Journals the bits of blocks made local by soft writes (copy-on-read, prefetch), so a crash no
   * longer loses them, and waits until they are durable. The journal commit starts with fdatasync,
   * and each bit was set only after its data write completed: the data is durable before the
   * record that exposes it (FORMAT.md §9). Returns the number of blocks whose bits it journaled.
   */
  async persistSoftBits(): Promise<number> {
    this.checkWritable('persist');
    if (this.closed || this.allLocal) return 0;
    let n = 0;
    const present = this.present;
    const journaled = this.journaled;
    const last = this.baseBlocks;
    for (let b = 0; b < last; ) {
      if ((b & 7) === 0 && (present[b >>> 3]! & ~journaled[b >>> 3]!) === 0) {
        b += 8; // nothing soft in this byte
        continue;
      }
      if (!testBit(present, b) || testBit(journaled, b)) {
        b++;
        continue;
      }
      let e = b;
      while (e + 1 < last && testBit(present, e + 1) && !testBit(journaled, e + 1)) e++;
      this.logBitmapRun(b, e);
      n += e - b + 1;
      b = e + 1;
    }
    await this.journal!.commit();
    return n;
  }

  /** True once close() or abandon() began: no more I/O through this object. */
  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Once every base block is local: records FULLY_LOCAL (with a checkpoint, so the bitmap it
   * replaces is on disk first) and stops consulting the bitmap. Returns false if blocks remain.
   */
  async markFullyLocal(): Promise<boolean> {
    this.checkWritable('mark fully local');
    if (this.allLocal) return true;
    await this.idle();
    if (countSet(this.present, this.baseBlocks) !== this.baseBlocks) return false;
    this.header.autoclear |= AUTOCLEAR_FULLY_LOCAL;
    await this.journal!.checkpoint();
    this.allLocal = true;
    Atomics.store(this.sharedAllLocal, 0, 1);
    return true;
  }

  /**
   * Grows the virtual disk of an image that is being served (`fvd resize` of a served image,
   * docs/DESIGN.md §8). Scope: images whose base (if any) ends at or before the current end (the
   * bitmap covers the base only, so it does not change); compact images without snapshots, whose
   * table grows and pushes the journal (growCompactOnline). Encrypted images
   * too: the zeroed range reads as zero plaintext by the all-zero-sector rule (FORMAT.md §11.3). Anything else throws a one-line EINVAL error naming the offline way.
   *
   * Order (crash consistency): the new range of the file is zeroed and made durable first (an
   * old-size image with a longer file is valid: FORMAT.md §12.5), then the header with the new
   * size is written by a checkpoint (serialized with the journal's own header writes). A crash
   * before the header write leaves the old size, after it the new one; nothing past the old end
   * was acknowledged before, so no acknowledged write is lost either way. The in-memory size
   * (and the workers' copy) grows last: the caller tells the kernel only after this resolves.
   */
  growOnline(newSize: number): Promise<{ oldSize: number; newSize: number }> {
    // One grow at a time: a second `fvd resize` starts from the size the first one left.
    const run = this.growing.then(() => this.growOnlineNow(newSize));
    this.growing = run.catch(() => {});
    return run;
  }

  private async growOnlineNow(newSize: number): Promise<{ oldSize: number; newSize: number }> {
    this.checkWritable('grow');
    if (this.closed) throw new FvdError(`${this.path}: image is closed`, 'EINVAL');
    const V = this.virtualSize;
    const V2 = roundUp(newSize, SECTOR);
    const h = this.header;
    if (!Number.isSafeInteger(newSize) || newSize <= 0 || V2 > MAX_VIRTUAL_SIZE)
      throw new FvdError(`resize: size ${newSize} out of range (1 byte to ${MAX_VIRTUAL_SIZE} bytes)`, 'EINVAL');
    if (V2 < V) throw new FvdError(`resize: ${this.path} is being served: it can only grow (${V2} < ${V} bytes); stop the server to shrink it`, 'EINVAL');
    if (V2 === V) return { oldSize: V, newSize: V };
    const offline = 'stop the server and resize it offline';
    const refuse = (why: string) => new FvdError(`resize: ${this.path}: cannot grow a served ${why}; ${offline}`, 'EINVAL');
    if (this.base && !this.allLocal && h.baseSize > V) throw refuse('image whose base extends past its end (the bitmap would grow)');
    // The block holding an unaligned old end: if the base reaches into it and it is not local,
    // the base's bytes past the old end would show (the offline resize copies it in).
    if (this.base && !this.allLocal && V % this.blockSize !== 0 && h.baseSize > Math.floor(V / this.blockSize) * this.blockSize)
      throw refuse('image whose last block still reads from its base');
    if (this.table) {
      // A snapshot is bound to the size it was taken at (FORMAT.md §10.10), as offline.
      if (this.snap!.dir.entries.length)
        throw new FvdError(`resize: ${this.path} has internal snapshots: a snapshot is bound to the size it was taken at; delete the snapshots first (fvd snapshot -d NAME)`, 'EINVAL');
      await this.growCompactOnline(V, V2);
      this.compactStorage!.grow(V2);
      this.raiseSize(V2);
      return { oldSize: V, newSize: V2 };
    }
    const file = this.file;
    const end = h.dataOffset + V;
    const newEnd = h.dataOffset + V2;
    if (file.isBlockDevice && file.size() < newEnd)
      throw new FvdError(`resize: ${this.path}: the block device holds ${file.size()} bytes, ${newEnd} are needed for ${V2} bytes; grow it first`, 'ENOSPC');
    // Storage for the new range must read zeros (a crashed shrink may have left data there).
    const have = Math.min(file.size(), newEnd);
    if (have > end) await file.zeroRange(end, have - end);
    if (file.size() < newEnd) await file.truncate(newEnd);
    await file.flush();
    h.virtualSize = V2;
    await this.journal!.checkpoint();
    this.raiseSize(V2);
    return { oldSize: V, newSize: V2 };
  }

  /** The last step of a grow, once the new size is durable: the engine's and the workers' size. */
  private raiseSize(V2: number): void {
    this.virtualSize = V2;
    this.bitmapEnd = Math.min(this.baseBlocks * this.blockSize, V2);
    this.copierDisk.size = V2;
    this.sharedSize[0] = V2;
  }

  /**
   * growOnline of a compact image (FORMAT.md §12.5, "Growing an image that is open"): the table
   * grows at its offset into the journal's space, so the journal moves up and may shrink, exactly
   * as the offline layout plan places it (planLayout); the bitmap does not change (growOnline
   * refused a base past the old end). Inside Journal.relocate, i.e. with the log just emptied by a
   * checkpoint and no commit able to run: the new entries' bytes, which lie in the old journal
   * (nothing in it is live after the checkpoint), are written 0xFF and made durable, then one
   * header write switches size, table length and journal (journal_start_seq moved past every
   * number the old region holds). A power cut before that write leaves the old disk (replay
   * finds an empty log), after it the new one. The shared table and snapshot flags grow in place
   * (growable buffers: the queue workers' views follow) before the caller raises the sizes.
   */
  private async growCompactOnline(V: number, V2: number): Promise<void> {
    const { movedJournal, planLayout } = await import('./maintenance/metadata-switch.js');
    const h = this.header;
    const cs = this.chunkSize;
    const table = this.table!;
    const plan = planLayout('resize', this.path, h, V2, h.baseSize);
    const L = plan.layout;
    if (plan.tempTable !== null || L.tableOffset !== h.tableOffset || L.bitmapLength !== h.bitmapLength)
      throw new Error(`internal error: a served grow of ${this.path} would move the table or the bitmap`);
    const chunks = Math.ceil(V2 / cs);
    const tableBuf = table.buffer as SharedArrayBuffer;
    if (!tableBuf.growable || chunks * 4 > tableBuf.maxByteLength) throw new Error(`internal error: the lookup table of ${this.path} cannot grow to ${chunks} entries`);
    // The chunk holding an unaligned old end: its storage past the end may hold stale bytes (a
    // crashed shrink, a copy that stopped at the end) that would join the disk. A chunk being
    // allocated now gets its whole storage zeroed by the allocation itself.
    if (V % cs !== 0) {
      const id = table[Math.floor(V / cs)]!;
      if (id !== CHUNK_EMPTY) await this.file.zeroRange(h.dataOffset + id * cs + (V % cs), cs - (V % cs));
    }
    await this.journal!.relocate(async () => {
      const live = this.header;
      const journal = movedJournal(live, L);
      // The new entries (unmapped): the old padding is 0xFF already (the checkpoint wrote it).
      const from = live.tableOffset + live.tableLength;
      const to = live.tableOffset + L.tableLength;
      if (to > from) await this.file.write(new Uint8Array(to - from).fill(0xff), from);
      await this.file.flush();
      const next: Header = { ...live, virtualSize: V2, tableLength: L.tableLength, ...journal };
      await this.file.write(encodeHeader(next), 0);
      await this.file.flush();
      Object.assign(live, next);
      const old = table.length;
      tableBuf.grow(chunks * 4);
      table.fill(CHUNK_EMPTY, old);
      this.snap!.growShared(chunks);
      return { offset: journal.journalOffset, length: journal.journalLength, startSeq: journal.journalStartSeq };
    });
  }

  /**
   * Sets the size the queue workers serve (SharedView.liveSize), at most the image's. Only a
   * recovery of a device smaller than the image needs it (an online grow interrupted before
   * UPDATE_SIZE, docs/DESIGN.md §8): the workers serve the device's size until the kernel is
   * about to be told the image's, exactly as growOnline raises it before UPDATE_SIZE.
   */
  setLiveSize(bytes: number): void {
    if (!Number.isSafeInteger(bytes) || bytes <= 0 || bytes % SECTOR !== 0 || bytes > this.virtualSize)
      throw new FvdError(`${this.path}: live size ${bytes} out of range (sectors up to ${this.virtualSize} bytes)`, 'EINVAL');
    this.sharedSize[0] = bytes;
  }

  // ---------------------------------------------------------------------------------------------
  // write side

  /** False when every block of [start, end) is local, journaled and needs no copy: the fast path. */
  private needsBitmapWork(start: number, end: number): boolean {
    if (this.allLocal || start >= this.bitmapEnd) return false;
    const bs = this.blockSize;
    const b0 = Math.floor(start / bs);
    const b1 = Math.min(Math.floor((end - 1) / bs), this.baseBlocks - 1);
    return !(allSet(this.journaled, b0, b1 - b0 + 1) && allSet(this.present, b0, b1 - b0 + 1));
  }

  private async writeSlow(buf: Uint8Array, offset: number, slot: number, baseBlock: Uint8Array | null): Promise<void> {
    const bs = this.blockSize;
    const end = offset + buf.length;
    const b0 = Math.floor(offset / bs);
    const b1 = Math.floor((end - 1) / bs);
    const lockLast = Math.min(b1, this.baseBlocks - 1);
    await this.locks.acquire(b0, lockLast);
    try {
      // Copy-on-write: a partial first or last block not yet local gets the rest of its data
      // from the base, so the image holds the whole block before its bit is set.
      let wStart = offset;
      let wEnd = end;
      if (b0 < this.baseBlocks && !testBit(this.present, b0) && offset > b0 * bs) wStart = b0 * bs;
      const lastEnd = Math.min((b1 + 1) * bs, this.size);
      if (b1 < this.baseBlocks && !testBit(this.present, b1) && end < lastEnd) wEnd = lastEnd;
      let data = buf;
      let scratch: Uint8Array | null = null;
      if (wStart !== offset || wEnd !== end) {
        const wLen = wEnd - wStart;
        if (baseBlock !== null && b0 === b1 && wStart === b0 * bs && wLen <= baseBlock.length) {
          // The caller read this block's base bytes already (before the lock: the base never
          // changes, so they are what a read here would give). The present bit, checked above
          // under the lock, alone decides that they are needed.
          data = baseBlock.subarray(0, wLen);
          data.set(buf, offset - wStart);
          return await this.writeBlocks(data, wStart, b0, lockLast, slot, null);
        }
        // A pooled block buffer (every byte of it is overwritten below: base data around the
        // guest's), so a copy-on-write allocates nothing in the common case.
        scratch = wLen <= bs ? this.copyBlocks.take() : null;
        data = scratch ? scratch.subarray(0, wLen) : new Uint8Array(wLen);
        if (slot >= 0) engineStampFirst(slot, STAGE_BASE_START);
        if (wStart < offset && end < wEnd && buf.length <= bs) {
          // Both edges from the base and the guest's part at most a block: one read of the whole
          // range (the guest's bytes then replace the middle) instead of two — each file read is
          // a hand-off to the thread pool and back, which costs more CPU than the extra bytes.
          await this.readBaseRaw(data, wStart);
        } else if (wStart < offset && end < wEnd) {
          await Promise.all([
            this.readBaseRaw(data.subarray(0, offset - wStart), wStart),
            this.readBaseRaw(data.subarray(end - wStart), end),
          ]);
        } else if (wStart < offset) {
          await this.readBaseRaw(data.subarray(0, offset - wStart), wStart);
        } else {
          await this.readBaseRaw(data.subarray(end - wStart), end);
        }
        if (slot >= 0) engineStamp(slot, STAGE_BASE_END);
        data.set(buf, offset - wStart);
      }
      await this.writeBlocks(data, wStart, b0, lockLast, slot, scratch);
    } finally {
      this.locks.release(b0, lockLast);
    }
  }

  /** writeSlow's end, under its locks: stores `data` at `wStart`, then marks [b0, last] local. */
  private async writeBlocks(data: Uint8Array, wStart: number, b0: number, last: number, slot: number, scratch: Uint8Array | null): Promise<void> {
    try {
      if (slot >= 0) engineStampFirst(slot, STAGE_WRITE_START);
      await this.data.write(data, wStart);
      if (slot >= 0) engineStamp(slot, STAGE_WRITE_END);
    } finally {
      // The write has completed (or failed): nothing holds the buffer any more.
      if (scratch) this.copyBlocks.give(scratch);
    }
    this.markLocal(b0, last);
  }

  /** Blocks [b0, b1] now hold their data in the image: set both bitmaps, log what is new. */
  private markLocal(b0: number, b1: number): void {
    setRange(this.present, b0, b1 - b0 + 1);
    forEachClearRun(this.journaled, b0, b1, this.logBitmapRun);
  }

  /**
   * Sets the journaled bits [first, last] and queues their BITMAP_SET record. While the pending
   * log is held the bits wait for its release: a set journaled bit lets a queue thread write the
   * block on its fast path and answer at once, which must not happen before the record is in the
   * log (a crash of the process would lose the bit of an acknowledged write).
   */
  private readonly logBitmapRun = (first: number, last: number): void => {
    if (this.heldRuns !== null) this.heldRuns.push(first, last);
    else setRange(this.journaled, first, last - first + 1);
    this.journal!.pending.addBitmap(first, last - first + 1);
  };

  /**
   * Batches the pending-log appends of the adoptStoredBlocks calls that follow (synchronously),
   * until releasePendingLog: one write for the batch instead of one per call. No-op without a
   * pending log.
   */
  holdPendingLog(): void {
    if (this.pendingLog === null || this.heldRuns !== null) return;
    this.pendingLog.hold();
    this.heldRuns = this.heldRunsBuffer;
  }

  /**
   * Writes the held records in one go, then sets their journaled bits (also when the write
   * failed: the records are queued for the journal all the same, as after a failed single
   * append). Throws the write's error: the batch's requests must fail.
   */
  releasePendingLog(): void {
    const runs = this.heldRuns;
    if (runs === null) return;
    this.heldRuns = null;
    try {
      this.pendingLog!.release();
    } finally {
      for (let i = 0; i < runs.length; i += 2) setRange(this.journaled, runs[i]!, runs[i + 1]! - runs[i]! + 1);
      runs.length = 0;
    }
  }

  /** Grow the device storage through `grower` (null: never; a full device then gives ENOSPC). */
  setStorageGrower(grower: StorageGrower | null): void {
    this.alloc?.setGrower(grower);
  }

  /** Zeroes whole blocks [a, z) (z may be the disk's end): storage punched, blocks marked local. */
  private async zeroBlocks(a: number, z: number): Promise<void> {
    const bs = this.blockSize;
    const b0 = a / bs;
    const b1 = Math.ceil(z / bs) - 1;
    const lockLast = Math.min(b1, this.baseBlocks - 1);
    await this.locks.acquire(b0, lockLast);
    try {
      if (!this.table) {
        await this.file.zeroRange(this.header.dataOffset + a, z - a);
      } else {
        await this.compactStorage!.zeroRange(a, z);
      }
      if (!this.allLocal && lockLast >= b0) this.markLocal(b0, lockLast);
    } finally {
      this.locks.release(b0, lockLast);
    }
  }

  /**
   * Compact layout, `check --repair`: returns unreferenced storage chunks to the host (holes) and
   * truncates unreferenced chunks at the end of the file. Returns how many chunks it reclaimed.
   */
  async reclaimUnreferenced(): Promise<number> {
    this.checkWritable('reclaim');
    if (!this.table) return 0;
    await this.idle();
    await this.journal!.commit(); // pending frees become free
    return this.alloc!.reclaim();
  }

  /** Storage chunks inside the file that no table entry references (free space, or leaked). */
  get unreferencedChunks(): number {
    return this.alloc ? this.alloc.unreferenced : 0;
  }

  // ---------------------------------------------------------------------------------------------
  // introspection (info, map, check)

  /** Extents of the virtual disk with where each lives, merged. */
  extents(): Extent[] {
    const out: Extent[] = [];
    for (const { offset, length, kind } of this.hostExtents()) {
      const last = out[out.length - 1];
      if (last && last.kind === kind && last.offset + last.length === offset) last.length += length;
      else out.push({ offset, length, kind });
    }
    return out;
  }

  /**
   * Like extents(), with where each local extent's bytes lie in the image file (`host`, a byte
   * offset; null for base and zero extents), merged only where the file is contiguous too. For
   * `fvd map` and the space figures of `fvd info`, which look for holes in those file ranges.
   */
  hostExtents(): HostExtent[] {
    const out: HostExtent[] = [];
    const layout: MappingLayout = { ...this.storageMap, baseLimit: this.baseLimit, baseBlocks: this.allLocal ? 0 : this.baseBlocks, bitmap: this.present, settling: null };
    const run = newRun();
    for (let pos = 0; pos < this.size; pos += run.length) {
      mapRun(layout, pos, this.size - pos, run);
      // Not local (in the base, or past its end in the block straddling it): the base's.
      const kind: ExtentKind = !run.local ? 'base' : run.kind === STORED ? 'local' : 'zero';
      const host = run.kind === STORED ? run.host : null;
      const last = out[out.length - 1];
      if (last && last.kind === kind && last.offset + last.length === pos && (host === null || last.host! + last.length === host)) last.length += run.length;
      else out.push({ offset: pos, length: run.length, kind, host });
    }
    return out;
  }

  /**
   * A remote base deferred at open (fvd/deferred-base.ts) that is not open yet: 'unreachable', or
   * 'refused' for good; null otherwise (no base, a base opened as usual, or a deferred one opened).
   */
  deferredBaseState(): 'unreachable' | 'refused' | null {
    const b = this.base;
    if (!(b instanceof DeferredBase)) return null;
    const state = b.state;
    return state === 'open' ? null : state;
  }

  stats(): ImageStats {
    const localBaseBlocks = this.allLocal ? this.baseBlocks : countSet(this.present, this.baseBlocks);
    let bytesInBase = 0;
    if (!this.allLocal && this.baseBlocks > 0) {
      bytesInBase = (this.baseBlocks - localBaseBlocks) * this.blockSize;
      const last = this.baseBlocks - 1;
      if (!testBit(this.present, last)) bytesInBase -= this.baseBlocks * this.blockSize - this.bitmapEnd;
    }
    let allocated = 0;
    if (this.table) for (let c = 0; c < this.table.length; c++) if (this.table[c] !== CHUNK_EMPTY) allocated++;
    return {
      path: this.path,
      layout: this.table ? 'compact' : 'raw',
      virtualSize: this.size,
      blockSize: this.blockSize,
      chunkSize: this.chunkSize,
      baseChain: this.base ? this.base.describe() : [],
      baseSize: this.header.baseSize,
      bytesLocal: this.size - bytesInBase,
      bytesInBase,
      fullyLocal: this.allLocal,
      zeroDetected: (this.header.compatible & COMPAT_ZERO_DETECTED) !== 0n,
      encryption: this.encrypted ? 'aes-256-xts' : null,
      wasDirty: this.wasDirty,
      journalSectorsReplayed: this.replayedSectors,
      journal: {
        capacitySectors: this.header.journalLength / SECTOR,
        usedSectors: this.journal ? this.journal.sectorsUsed : this.replayedSectors,
        commits: this.journal?.stats.commits ?? 0,
        sectorsWritten: this.journal?.stats.sectors ?? 0,
        checkpoints: this.journal?.stats.checkpoints ?? 0,
        bitmapRuns: this.journal?.stats.bitmapRuns ?? 0,
        tableEntries: this.journal?.stats.tableEntries ?? 0,
      },
      allocatedChunks: allocated,
      fileSize: this.file.size(),
      snapshots: this.snapshots.count,
    };
  }

  /** For `check`: the header, the lookup table and the storage ids in use. */
  inspect(): { header: Readonly<Header>; table: Uint32Array | null; present: Uint8Array; baseBlocks: number; fileSize: number; isBlockDevice: boolean } {
    return { header: this.header, table: this.table, present: this.present, baseBlocks: this.baseBlocks, fileSize: this.file.size(), isBlockDevice: this.file.isBlockDevice };
  }

  /**
   * For the daemon only: a copy of the unlocked 64-byte master key (null when unencrypted or opened
   * without the key), so that each queue worker can run its own XtsCipher on its fast path. The
   * caller hands it on and wipes it (fill(0)); it must never be logged or put in a message.
   */
  masterKeyCopy(): Uint8Array | null {
    return this.xts ? this.xts.masterKey() : null;
  }

  /**
   * The metadata a ublk queue worker needs to serve requests on local data itself (all of it in
   * SharedArrayBuffers, updated in place by this engine). fvd/mapping.ts defines its shape.
   */
  sharedView(): SharedView {
    return {
      liveSize: this.sharedSize,
      dataOffset: this.header.dataOffset,
      blockSize: this.blockSize,
      chunkSize: this.chunkSize,
      baseLimit: this.baseLimit,
      baseBlocks: this.baseBlocks,
      bitmapEnd: this.bitmapEnd,
      allLocal: this.allLocal,
      fullyLocal: this.sharedAllLocal,
      present: this.present,
      journaled: this.journaled,
      table: this.table,
      // The data area holds ciphertext: a queue worker encrypts/decrypts with its own cipher
      // (masterKeyCopy), tweak = guest sector, exactly as the data area does (fvd/data-area.ts).
      encrypted: this.encrypted,
      shared: this.snap ? this.snap.shared : null,
    };
  }

  /**
   * For offline tools (commit, rebase, resize): true when [offset, offset + length) is known to
   * read as zeros without reading any data — unmapped chunks, holes in the image file (where the
   * BlockFile can tell), bytes past the base's end, and the same asked of the base. False means
   * unknown, not non-zero.
   */
  async knownZero(offset: number, length: number): Promise<boolean> {
    this.checkRange(offset, length, 'knownZero');
    const end = offset + length;
    const bs = this.blockSize;
    for (let pos = offset; pos < end; ) {
      const b = Math.floor(pos / bs);
      const local = this.allLocal || this.isLocal(b);
      let runEnd = Math.min(end, (b + 1) * bs);
      while (runEnd < end && (this.allLocal || this.isLocal(runEnd / bs)) === local) runEnd = Math.min(end, runEnd + bs);
      if (local ? !this.storageKnownZero(pos, runEnd) : !(await this.baseKnownZero(pos, runEnd))) return false;
      pos = runEnd;
    }
    return true;
  }

  private storageKnownZero(a: number, z: number): boolean {
    const layout = this.storageMap;
    layout.settling = this.settlingForRead;
    for (let pos = a; pos < z; pos += this.run.length) {
      const run = mapRun(layout, pos, z - pos, this.run);
      if (run.kind === PENDING) return false;
      if (run.kind === STORED && !holeAt(this.file, run.host, run.host + run.length)) return false;
    }
    return true;
  }

  private async baseKnownZero(a: number, z: number): Promise<boolean> {
    if (a >= this.baseLimit) return true;
    return this.base!.knownZero(a, Math.min(z, this.baseLimit) - a);
  }

  /** What snapshot operations (fvd/snapshot.ts) may not do themselves: this image's journal, base and files. */
  private snapshotHooks(): SnapshotEngineHooks {
    return {
      checkOpen: () => {
        if (this.closed) throw new FvdError(`${this.path}: image is closed`, 'EINVAL');
      },
      quiesce: async () => {
        await this.idle();
        await this.journal!.checkpoint();
      },
      checkpoint: () => this.journal!.checkpoint(),
      attachBase: async () => {
        if (this.base || !this.reopenBase) return;
        this.base = await this.reopenBase();
        this.header.autoclear &= ~AUTOCLEAR_FULLY_LOCAL;
        this.allLocal = this.baseBlocks === 0;
        Atomics.store(this.sharedAllLocal, 0, this.allLocal ? 1 : 0); // queue workers consult bits again
      },
      abandon: () => this.abandon(),
    };
  }

  /** The image file's identity and remoteness, when this image is a (remote) base. */
  get fileIdentity(): string | undefined {
    return this.file.identity;
  }
  get fileIsRemote(): boolean {
    return !!this.file.remote;
  }

  /** A base image's chain entry, for `info`. */
  describeChain(format: BaseFormat): BaseChainEntry[] {
    return [{ path: this.path, format, size: this.size }, ...(this.base ? this.base.describe() : [])];
  }

  /**
   * BlockFile.fileId of this image's file and of every base file it reads through, where known:
   * an output that is one of them must be refused before it is written (convert, create).
   */
  fileIds(): string[] {
    return [...(this.file.fileId ? [this.file.fileId] : []), ...(this.base ? this.base.fileIds() : [])];
  }
}

// -----------------------------------------------------------------------------------------------

async function openImage(io: IoBackend, imagePath: string, options: OpenOptions, chain: string[], readLock?: 'shared'): Promise<FvdImage> {
  const file = await io.open(imagePath, { readOnly: !!options.readOnly, lock: options.readOnly ? readLock : 'exclusive' });
  try {
    return await FvdImage.fromParts(io, imagePath, file, options, chain);
  } catch (err) {
    await file.close();
    throw err;
  }
}

/** An FVD image as one read-only level of a base chain. */
async function openFvdLevel(io: IoBackend, resolved: string, chain: string[]): Promise<BaseImage> {
  const image = await openImage(io, resolved, { readOnly: true, copyOnRead: false }, chain, 'shared');
  return {
    identity: image.fileIdentity,
    remote: image.fileIsRemote,
    size: image.size,
    read: (buf, offset) => image.read(buf, offset),
    knownZero: (offset, length) => image.knownZero(offset, length),
    close: () => image.close(),
    describe: () => image.describeChain('fvd'),
    fileIds: () => image.fileIds(),
  };
}

/**
 * Opens a base image read-only, of any format, below the images in `chain` (fvd/base-chain.ts
 * has the rules; this supplies the FVD opener).
 */
export function openBase(io: IoBackend, resolved: string, format: number, chain: string[], shownPath: string): Promise<BaseImage> {
  return openChainLevel(io, resolved, format, chain, shownPath, openFvdLevel);
}
