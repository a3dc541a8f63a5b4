/**
 * Storage chunk allocation of a compact image (FORMAT.md §4.3): which storage chunk ids are free,
 * the next never-used id, which chunks of the virtual disk are being allocated right now, how far
 * the storage is known to read as zeros, and growing a block device before it runs out.
 *
 * Free ids are unreferenced and durable as unreferenced: an id freed by a TABLE_SET returns here
 * only once that record is durable (FvdImage's journal callback calls release()).
 */
import type { BlockFile } from './io.js';
import { FvdError } from './errors.js';
import { CHUNK_EMPTY } from './format.js';
import { highestMappedId } from './metadata.js';
import type { SnapshotState } from './snapshot.js';

/**
 * Grows the storage of a compact image on a block device (an LV) before allocation runs out, like
 * FVD's add_storage_cmd: `grow()` makes the device larger (the daemon runs the configured command);
 * the engine then re-reads the device's size. Called when less than `lowWaterBytes` would remain
 * past the last chunk, at most one call in flight; an allocation that finds no room waits for it.
 */
export interface StorageGrower {
  lowWaterBytes: number;
  grow(): Promise<void>;
}

/** What the snapshot operations (fvd/snapshot.ts) need of the allocator. */
export interface SnapshotAllocator {
  /** Takes `n` consecutive free storage chunk ids (or ids past the end); returns the first. */
  takeRun(n: number): number;
  /** Recomputes the free list from the active table and the snapshot state. */
  rebuild(): void;
  /** Storage at [offset, offset + length) was (or may have been) written: it no longer reads as zeros. */
  noteWritten(offset: number, length: number): void;
}

export class ChunkAllocator implements SnapshotAllocator {
  /**
   * Chunks of the virtual disk whose storage is being allocated (or copied away from a snapshot):
   * later readers and writers of the chunk wait for the promise.
   */
  readonly allocating = new Map<number, Promise<void>>();
  /** Free storage chunk ids (unreferenced, durable as unreferenced) and the next never-used id. */
  private readonly free: number[] = [];
  private nextId = 0;
  /** Storage at or beyond this offset has never been written: it reads as zeros (regular files). */
  private zeroFrom: number;
  /** Block-device storage growth (setGrower), and the grow in flight. */
  private grower: StorageGrower | null = null;
  private growing: Promise<void> | null = null;

  constructor(
    private readonly path: string,
    private readonly file: BlockFile,
    private readonly dataOffset: number,
    private readonly chunkSize: number,
    private readonly table: Uint32Array,
    private readonly snap: SnapshotState,
  ) {
    this.zeroFrom = file.isBlockDevice ? Number.POSITIVE_INFINITY : file.size();
    this.init();
  }

  /** Storage chunks inside the file that no table entry references (free space, or leaked). */
  get unreferenced(): number {
    return this.free.length;
  }

  /** Storage at or beyond this file offset reads as zeros without being zeroed. */
  get knownZeroFrom(): number {
    return this.zeroFrom;
  }

  noteWritten(offset: number, length: number): void {
    if (!this.file.isBlockDevice) this.zeroFrom = Math.max(this.zeroFrom, offset + length);
  }

  /** Chunk c is being allocated: returns the function that ends that (and wakes its waiters). */
  begin(c: number): () => void {
    let done!: () => void;
    this.allocating.set(c, new Promise<void>((r) => (done = r)));
    return () => {
      this.allocating.delete(c);
      done();
    };
  }

  /** Returns an id that was taken but never made visible (its data write failed). */
  putBack(id: number): void {
    this.free.push(id);
  }

  /** Ids whose unmapping is now durable. */
  release(ids: readonly number[]): void {
    for (const id of ids) this.free.push(id);
  }

  /** Grow the device storage through `grower` (null: never; a full device then gives ENOSPC). */
  setGrower(grower: StorageGrower | null): void {
    this.grower = grower;
  }

  /**
   * take, on a block device with a grower: starts a grow when the room past the last chunk
   * runs low, and when no chunk fits, waits for grows until one does or until a grow of its own
   * added nothing (then take reports ENOSPC). The room check and the take run with no await
   * between them, so writers racing for the last chunk cannot both pass the check.
   */
  async takeGrowing(): Promise<number> {
    const g = this.grower;
    if (!g || !this.file.isBlockDevice || this.free.length) return this.take();
    const room = () => this.file.size() - (this.dataOffset + this.nextId * this.chunkSize);
    if (room() - this.chunkSize < g.lowWaterBytes) this.startGrow(g);
    let sizeBefore = -1;
    while (room() < this.chunkSize && !this.free.length) {
      if (!this.growing) {
        if (this.file.size() === sizeBefore) break;
        sizeBefore = this.file.size();
        this.startGrow(g);
      }
      await this.growing;
    }
    return this.take();
  }

  private startGrow(g: StorageGrower): void {
    if (this.growing) return;
    this.growing = (async () => {
      try {
        await g.grow();
      } catch {
        // the grower reports its own failure; allocation goes on until the device is full
      }
      await this.file.refreshSize?.();
    })().finally(() => (this.growing = null));
  }

  take(): number {
    const id = this.free.pop();
    if (id !== undefined) return id;
    const next = this.nextId;
    if (this.file.isBlockDevice && this.dataOffset + (next + 1) * this.chunkSize > this.file.size())
      throw new FvdError(`${this.path}: no space left on the device for a new chunk`, 'ENOSPC');
    if (next >= CHUNK_EMPTY) throw new FvdError(`${this.path}: chunk ids exhausted`, 'ENOSPC');
    this.nextId++;
    return next;
  }

  /** `n` consecutive free storage ids (from the free list, else past the end); returns the first. */
  takeRun(n: number): number {
    if (n === 1) return this.take();
    const free = new Set(this.free);
    for (const id of [...free].sort((a, b) => a - b)) {
      let k = 1;
      while (k < n && free.has(id + k)) k++;
      if (k < n) continue;
      for (let i = 0; i < n; i++) this.free.splice(this.free.indexOf(id + i), 1);
      return id;
    }
    const first = this.nextId;
    if (this.file.isBlockDevice && this.dataOffset + (first + n) * this.chunkSize > this.file.size())
      throw new FvdError(`${this.path}: no space left on the device for ${n} chunks`, 'ENOSPC');
    if (first + n >= CHUNK_EMPTY) throw new FvdError(`${this.path}: chunk ids exhausted`, 'ENOSPC');
    this.nextId += n;
    return first;
  }

  /**
   * From the table, the snapshot state and the file size: chunks an operation took but never
   * wrote (it failed) return to the pool. Offline only: no allocation may be in flight.
   */
  rebuild(): void {
    this.free.length = 0;
    this.init();
  }

  private init(): void {
    const table = this.table;
    // Storage snapshots use (their data and metadata) is never free.
    const max = highestMappedId(table, this.snap.maxUsedId());
    // Storage chunks present in the file but unreferenced (freed, or leaked by a crash) are
    // reused; the ones below the highest id go on the free list.
    const fileChunks = this.file.isBlockDevice
      ? max + 1
      : Math.max(max + 1, Math.ceil((this.file.size() - this.dataOffset) / this.chunkSize));
    const referenced = new Uint8Array(Math.max(fileChunks, 0));
    for (let c = 0; c < table.length; c++) if (table[c] !== CHUNK_EMPTY) referenced[table[c]!] = 1;
    for (let id = fileChunks - 1; id >= 0; id--) if (!referenced[id] && !this.snap.isUsed(id)) this.free.push(id);
    this.nextId = Math.max(fileChunks, 0);
  }

  /**
   * `check --repair`: returns unreferenced storage chunks to the host (holes) and truncates
   * unreferenced chunks at the end of the file. The caller committed the journal first (pending
   * frees are free) and no allocation is in flight. Returns how many chunks it reclaimed.
   */
  async reclaim(): Promise<number> {
    const cs = this.chunkSize;
    let maxRef = this.snap.maxUsedId();
    const table = this.table;
    for (let c = 0; c < table.length; c++) if (table[c] !== CHUNK_EMPTY && table[c]! > maxRef) maxRef = table[c]!;
    const reclaimed = this.free.length;
    for (const id of this.free) if (id <= maxRef) await this.file.zeroRange(this.dataOffset + id * cs, cs);
    if (!this.file.isBlockDevice) {
      await this.file.truncate(this.dataOffset + (maxRef + 1) * cs);
      this.zeroFrom = this.file.size();
    }
    const keep = this.free.filter((id) => id <= maxRef);
    this.free.length = 0;
    this.free.push(...keep);
    this.nextId = maxRef + 1;
    return reclaimed;
  }
}
