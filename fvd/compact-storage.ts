/**
 * The data area of a compact image (FORMAT.md §4): bytes of the virtual disk reach storage through
 * the lookup table, chunk by chunk. Reads of unmapped chunks give zeros; writes to them allocate
 * storage (fvd/allocator.ts) and journal the new TABLE_SET; writes to storage a snapshot shares
 * copy the chunk first (FORMAT.md §10.7). Runs of chunks adjacent in storage are one I/O.
 */
import type { BlockFile } from './io.js';
import { CHUNK_EMPTY } from './format.js';
import type { Journal } from './journal.js';
import type { SnapshotState } from './snapshot.js';
import type { ChunkAllocator } from './allocator.js';
import { STORED, ZERO, mapRun, newRun, storageLayout, type MappingLayout } from './mapping.js';

export class CompactStorage {
  /** This image's storage as the mapping rule sees it (fvd/mapping.ts): every block local. */
  private readonly storageMap: MappingLayout;
  /** The mapping result the synchronous mapping loops fill (one at a time: no await inside). */
  private readonly run = newRun();
  private readonly settlingForRead = (c: number): boolean => this.alloc.allocating.has(c);
  private readonly settlingForWrite = (c: number): boolean => this.alloc.allocating.has(c) || this.snap.shared[c] !== 0;

  constructor(
    private readonly file: BlockFile,
    private readonly dataOffset: number,
    blockSize: number,
    private readonly chunkSize: number,
    /** The virtual disk's size (grows with a served image: grow). */
    private size: number,
    private readonly table: Uint32Array,
    private readonly snap: SnapshotState,
    private readonly alloc: ChunkAllocator,
    /** Null when opened read-only (nothing is written then). */
    private readonly journal: Journal | null,
  ) {
    this.storageMap = storageLayout(dataOffset, blockSize, chunkSize, table);
  }

  /**
   * The disk grew (FvdImage.growOnline) after the table did: a write reaching the old end no
   * longer covers the last chunk whole, so its allocation zeroes the rest of the chunk.
   */
  grow(size: number): void {
    this.size = size;
  }

  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.forEachChunkRun(buf, offset, false);
  }

  write(buf: Uint8Array, offset: number): Promise<void> {
    return this.forEachChunkRun(buf, offset, true);
  }

  /**
   * Splits [offset, offset + buf.length) into runs (fvd/mapping.ts): runs of chunks adjacent in
   * storage are one I/O; unmapped chunks read zeros or are allocated when writing; chunks being
   * allocated (or, when writing, shared with a snapshot) are handled alone.
   */
  private async forEachChunkRun(buf: Uint8Array, offset: number, writing: boolean): Promise<void> {
    const cs = this.chunkSize;
    const layout = this.storageMap;
    // A write to storage a snapshot shares must copy the chunk first (writeUnmappedChunk).
    layout.settling = writing ? this.settlingForWrite : this.settlingForRead;
    const run = this.run;
    const end = offset + buf.length;
    const tasks: Promise<void>[] = [];
    for (let pos = offset; pos < end; ) {
      mapRun(layout, pos, end - pos, run);
      const runEnd = pos + run.length;
      if (run.kind === STORED) {
        const sub = buf.subarray(pos - offset, runEnd - offset);
        tasks.push(writing ? this.file.write(sub, run.host) : this.file.read(sub, run.host));
      } else if (run.kind === ZERO && !writing) {
        buf.fill(0, pos - offset, runEnd - offset);
      } else {
        // PENDING (one chunk), or unmapped chunks being written: each chunk on its own.
        for (let at = pos; at < runEnd; ) {
          const c = Math.floor(at / cs);
          const chunkEnd = Math.min(runEnd, (c + 1) * cs);
          const sub = buf.subarray(at - offset, chunkEnd - offset);
          tasks.push(writing ? this.writeUnmappedChunk(c, sub, at - c * cs) : this.readAfterAllocation(c, sub, at - c * cs));
          at = chunkEnd;
        }
      }
      pos = runEnd;
    }
    if (tasks.length === 1) return tasks[0];
    await Promise.all(tasks);
  }

  private async readAfterAllocation(c: number, sub: Uint8Array, inChunk: number): Promise<void> {
    while (this.alloc.allocating.has(c)) await this.alloc.allocating.get(c);
    const id = this.table[c]!;
    if (id === CHUNK_EMPTY) sub.fill(0);
    else await this.file.read(sub, this.dataOffset + id * this.chunkSize + inChunk);
  }

  /**
   * Writes into chunk c, allocating its storage first if it has none, or copying it first if a
   * snapshot shares its storage.
   */
  private async writeUnmappedChunk(c: number, sub: Uint8Array, inChunk: number): Promise<void> {
    const alloc = this.alloc;
    while (alloc.allocating.has(c)) await alloc.allocating.get(c);
    const table = this.table;
    const cs = this.chunkSize;
    if (table[c] !== CHUNK_EMPTY && !this.snap.shared[c]) {
      await this.file.write(sub, this.dataOffset + table[c]! * cs + inChunk);
      return;
    }
    if (table[c] !== CHUNK_EMPTY) {
      // The write covers the whole chunk (up to the disk's end): it is the copy.
      const whole = inChunk === 0 && sub.length === Math.min(cs, this.size - c * cs);
      const phys = await this.unshareChunk(c, whole ? sub : null);
      if (!whole) await this.file.write(sub, phys + inChunk);
      return;
    }
    const end = alloc.begin(c);
    let phys: number;
    try {
      const id = await alloc.takeGrowing();
      phys = this.dataOffset + id * cs;
      try {
        // Storage never written reads as zeros; reused or device storage must be zeroed first,
        // because blocks of the chunk that are local but unwritten must read as zeros.
        const zeroFrom = alloc.knownZeroFrom;
        if (phys < zeroFrom) await this.file.zeroRange(phys, Math.min(cs, zeroFrom - phys));
      } catch (err) {
        alloc.putBack(id);
        throw err;
      }
      alloc.noteWritten(phys, cs);
      // Publish the mapping now, before the data write: the chunk reads exactly as the unmapped
      // chunk did (zeros where local, base data where the bits are clear), so other writers to
      // the chunk need not queue behind this one, and the TABLE_SET can be logged at once — a
      // commit's first fdatasync covers the zeroing, which completed above (FORMAT.md §4.3).
      table[c] = id;
      this.journal!.pending.addTable(c, id);
    } finally {
      end();
    }
    await this.file.write(sub, phys + inChunk);
  }

  /**
   * Copy-on-write of chunk c, whose storage a snapshot also references (FORMAT.md §10.7): copies
   * it (or writes `whole`, the chunk's complete new content) into a new storage chunk, then points
   * the table at it and journals the entry. The old storage stays as the snapshot has it; no
   * refcount changes (the snapshots' references did not). Returns the new chunk's file offset.
   * The caller has just seen (with no await since) that c is shared and not being allocated.
   */
  private async unshareChunk(c: number, whole: Uint8Array | null): Promise<number> {
    const table = this.table;
    const cs = this.chunkSize;
    const alloc = this.alloc;
    const end = alloc.begin(c);
    try {
      const id = await alloc.takeGrowing();
      const phys = this.dataOffset + id * cs;
      try {
        let data = whole;
        if (!data) {
          data = new Uint8Array(cs);
          await this.file.read(data, this.dataOffset + table[c]! * cs);
        }
        alloc.noteWritten(phys, cs);
        await this.file.write(data, phys);
      } catch (err) {
        alloc.putBack(id);
        throw err;
      }
      // Like an allocation, the entry is logged once the copy completed (a commit's first
      // fdatasync covers it); the worker sees the flag clear only after the table changed.
      table[c] = id;
      this.journal!.pending.addTable(c, id);
      Atomics.store(this.snap.shared, c, 0);
      return phys;
    } finally {
      end();
    }
  }

  /**
   * Zeroes whole blocks [a, z) of the virtual disk (z may be the disk's end), chunk by chunk:
   * whole chunks are unmapped (their storage punched and freed once durable, or left to a
   * snapshot that shares it), partial ones zeroed in place.
   */
  async zeroRange(a: number, z: number): Promise<void> {
    const cs = this.chunkSize;
    const tasks: Promise<void>[] = [];
    for (let c = Math.floor(a / cs); c * cs < z; c++) {
      const cStart = Math.max(a, c * cs);
      const cEnd = Math.min(z, (c + 1) * cs, this.size);
      tasks.push(this.zeroInChunk(c, cStart, cEnd, cStart === c * cs && cEnd === Math.min((c + 1) * cs, this.size)));
    }
    await Promise.all(tasks);
  }

  private async zeroInChunk(c: number, start: number, end: number, whole: boolean): Promise<void> {
    while (this.alloc.allocating.has(c)) await this.alloc.allocating.get(c);
    const id = this.table[c]!;
    if (id === CHUNK_EMPTY) return; // local and unmapped reads as zeros already
    const cs = this.chunkSize;
    if (this.snap.shared[c]) {
      if (whole) {
        // A snapshot still references the storage: unmap it without punching or freeing it.
        this.table[c] = CHUNK_EMPTY;
        this.journal!.pending.addTable(c, CHUNK_EMPTY);
        Atomics.store(this.snap.shared, c, 0);
        return;
      }
      const phys = await this.unshareChunk(c, null);
      await this.file.zeroRange(phys + (start - c * cs), end - start);
      return;
    }
    if (whole) {
      // Give the space back to the host now; unmap; the storage is reusable once this TABLE_SET
      // is durable (the journal's callback releases it). Until then a crash leaves the old
      // mapping, reading zeros or base.
      await this.file.zeroRange(this.dataOffset + id * cs, cs);
      this.table[c] = CHUNK_EMPTY;
      this.journal!.pending.addTable(c, CHUNK_EMPTY);
      this.journal!.pending.freed.push(id);
      return;
    }
    await this.file.zeroRange(this.dataOffset + id * cs + (start - c * cs), end - start);
  }
}
