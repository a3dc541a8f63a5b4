/**
 * Internal snapshots of compact images (docs/FORMAT.md §10).
 *
 * A snapshot is a saved copy of the lookup table and the bitmap. Storage chunks are shared between
 * the active table and snapshots; the refcount table counts, per storage chunk, how many
 * *snapshot* tables map it. The active table's own reference is implicit (it never maps a storage
 * chunk twice), so the normal I/O path never touches refcounts: a fresh allocation has refcount 0
 * and belongs to the active table alone. A write to a chunk whose storage has refcount > 0 copies
 * the chunk first (copy-on-write, in fvd/image.ts) — again without a refcount update, because the
 * snapshot's references did not change. Only snapshot operations change refcounts.
 *
 * Operations (create, delete, revert, refcount repair) are offline: no guest I/O may be in flight.
 * Each one writes new copies of the structures it changes into free chunks, makes them durable, and
 * commits with one header write (an atomic sector); revert additionally needs a redo marker in the
 * header because it rewrites the active table and bitmap in place.
 */
import type { BlockFile } from './io.js';
import type { SnapshotAllocator } from './allocator.js';
import { CorruptImageError, FvdError } from './errors.js';
import { allSet } from './bitmap.js';
import { maxTableEntries } from './metadata.js';
import { BASE_NONE, CHUNK_EMPTY, INCOMPAT_SNAPSHOTS, crc, encodeHeader, type Header } from './format.js';
import {
  MAX_REFCOUNT,
  MAX_SNAPSHOTS,
  decodeDirectory,
  decodeRefcounts,
  encodeDirectory,
  encodeRefcounts,
  stateBytes,
  usedRefcountEntries,
  validateName,
  type Directory,
  type SnapshotEntry,
} from './snapshot-format.js';

export { nameProblem, validateName, MAX_SNAPSHOTS } from './snapshot-format.js';

/**
 * The active image state that snapshot operations read and rewrite in place. fvd/image.ts owns
 * these objects and hands them over as they are: no copies, no per-field accessors.
 */
export interface ActiveImageState {
  readonly file: BlockFile;
  /** The engine's in-memory header; an operation commits its changes with one header write. */
  readonly header: Header;
  readonly table: Uint32Array;
  /** The engine's two bitmaps (fvd/image.ts): what is local, and what is on disk or journaled. */
  readonly present: Uint8Array;
  readonly journaled: Uint8Array;
  /** Blocks with a bitmap bit: min(base size, virtual size) in blocks. */
  readonly baseBlocks: number;
  readonly readOnly: boolean;
  /** The image's storage chunk allocator (fvd/allocator.ts). */
  readonly allocator: SnapshotAllocator;
}

/** What only the engine can do around a snapshot operation (its journal, its base, its files). */
export interface SnapshotEngineHooks {
  /** Throws if the image is closed. */
  checkOpen(): void;
  /** Waits for background copies and checkpoints: table and bitmap on disk, journal empty. */
  quiesce(): Promise<void>;
  /** Writes table and bitmap in place (fdatasync each), then the header. */
  checkpoint(): Promise<void>;
  /** Opens the base again if it is closed (FULLY_LOCAL), clearing FULLY_LOCAL in memory; else nothing. */
  attachBase(): Promise<void>;
  /** Closes the files without writing anything (the on-disk state is uncertain). */
  abandon(): Promise<void>;
}

export interface SnapshotInfo {
  id: number;
  name: string;
  /** Creation time. */
  date: Date;
  /** Bytes of storage the snapshot's table maps (chunks × chunk size). */
  size: number;
  virtualSize: number;
}

/** Refcount findings of `verify()`. */
export interface RefcountReport {
  /** Corruption: unreadable saved states, bad references. */
  errors: string[];
  /** Stored refcount larger than the number of snapshot tables mapping the chunk (a leak). */
  overcounts: Array<{ id: number; stored: number; actual: number }>;
  /** Stored refcount smaller: the active table may overwrite a snapshot's data in place. */
  undercounts: Array<{ id: number; stored: number; actual: number }>;
}

/** The engine's snapshot bookkeeping (compact images only). */
export class SnapshotState {
  dir: Directory = { entries: [], nextId: 1 };
  /** Per storage chunk id: how many snapshot tables map it (ids past the end: 0). */
  refcounts: Uint16Array = new Uint16Array(0);
  /** Storage chunks holding snapshot metadata (directory, refcount table, saved states). */
  meta = new Set<number>();
  /**
   * Opened with `recount` over a damaged refcount table: what is wrong with it. `refcounts` then
   * holds the counts recounted from the snapshot tables, and `check --repair` writes them.
   */
  refcountDamage: string | null = null;
  /**
   * Per virtual chunk: 1 while the active table maps it to storage with refcount > 0. Shared with
   * the daemon's queue workers (a SharedArrayBuffer), which send writes to such chunks to the
   * engine; the engine clears the flag (Atomics.store, after the table update) once it copied it.
   */
  readonly shared: Uint8Array;

  /**
   * `maxChunks`: how far a served image may grow its table (FvdImage.growOnline); `shared` is a
   * length-tracking view of a growable buffer, so the queue workers' copies follow a grow.
   */
  constructor(chunks: number, maxChunks = chunks) {
    const n = Math.max(chunks, 1);
    this.shared = new Uint8Array(new SharedArrayBuffer(n, { maxByteLength: Math.max(n, maxChunks) }));
  }

  /** A served image grew to `chunks` chunks: the new ones share nothing (flags 0). */
  growShared(chunks: number): void {
    const buf = this.shared.buffer as SharedArrayBuffer;
    if (chunks > buf.byteLength) buf.grow(chunks);
  }

  refcount(id: number): number {
    return id < this.refcounts.length ? this.refcounts[id]! : 0;
  }

  /** Used by a snapshot: mapped by one of their tables, or holding their metadata. */
  isUsed(id: number): boolean {
    return this.refcount(id) > 0 || this.meta.has(id);
  }

  /** The highest storage id a snapshot uses, or -1. */
  maxUsedId(): number {
    let max = usedRefcountEntries(this.refcounts) - 1;
    for (const id of this.meta) if (id > max) max = id;
    return max;
  }

  recomputeShared(table: Uint32Array): void {
    for (let c = 0; c < table.length; c++) {
      const id = table[c]!;
      this.shared[c] = id !== CHUNK_EMPTY && this.refcount(id) > 0 ? 1 : 0;
    }
  }

  /** Rebuilds `meta` from the header and directory; throws if two structures share a chunk. */
  rebuildMeta(path: string, h: Header): void {
    const meta = new Set<number>();
    const add = (what: string, offset: number, length: number) => {
      const first = (offset - h.dataOffset) / h.chunkSize;
      const n = Math.ceil(length / h.chunkSize);
      for (let id = first; id < first + n; id++) {
        if (meta.has(id)) throw new CorruptImageError(path, `snapshot metadata overlaps: storage chunk ${id} (${what}) is used twice`);
        meta.add(id);
      }
    };
    if (h.incompatible & INCOMPAT_SNAPSHOTS) {
      add('snapshot directory', h.snapshotsOffset, h.snapshotsLength);
      add('refcount table', h.refcountOffset, h.refcountLength);
      for (const e of this.dir.entries) add(`saved state of '${e.name}'`, e.stateOffset, e.stateLength);
    }
    this.meta = meta;
  }
}

/** Storage chunk ids that exist: the file's chunks (rounded up), or the device's whole chunks. */
function storageLimit(h: Header, file: BlockFile): number {
  const bytes = file.size() - h.dataOffset;
  return file.isBlockDevice ? Math.floor(bytes / h.chunkSize) : Math.ceil(bytes / h.chunkSize);
}

/**
 * Reads the snapshot structures of an image being opened (after the journal replay) and, if the
 * header carries a revert marker, redoes the interrupted revert in memory: `table` and `present`
 * then hold the snapshot's state (the caller persists it with a checkpoint when writable).
 */
export async function loadSnapshotState(
  path: string,
  file: BlockFile,
  h: Header,
  table: Uint32Array,
  present: Uint8Array,
  recount = false,
): Promise<{ state: SnapshotState; redo: boolean }> {
  // Room to grow as far as the table can (growableTable, fvd/metadata.ts).
  const st = new SnapshotState(table.length, maxTableEntries(h));
  if (!(h.incompatible & INCOMPAT_SNAPSHOTS)) return { state: st, redo: false };
  const dirBuf = new Uint8Array(h.snapshotsLength);
  const refBuf = new Uint8Array(h.refcountLength);
  await Promise.all([file.read(dirBuf, h.snapshotsOffset), file.read(refBuf, h.refcountOffset)]);
  // A damaged directory loses the list of snapshots (and where their tables are): not derivable.
  st.dir = decodeDirectory(path, dirBuf, h, file.size());
  st.rebuildMeta(path, h);
  // A damaged refcount table is derivable from the tables (FORMAT.md §10.8).
  const damage = refcountTableProblem(path, refBuf, h, file, st);
  if (damage) {
    if (!recount) throw new CorruptImageError(path, `${damage} (repairable: 'fvd check --repair' rebuilds it from the snapshot tables)`);
    st.refcountDamage = damage;
    st.refcounts = await recountReferences(path, file, h, st, damage);
  }
  let redo = false;
  if (h.revertSnapshotId) {
    const e = st.dir.entries.find((x) => x.id === h.revertSnapshotId);
    if (!e) throw new CorruptImageError(path, `interrupted revert to snapshot id ${h.revertSnapshotId}, which does not exist`);
    if (e.virtualSize !== h.virtualSize) throw new CorruptImageError(path, `interrupted revert to snapshot '${e.name}' of a different virtual size`);
    const saved = await readState(path, file, h, st, e);
    table.set(saved.table);
    present.set(saved.bitmap);
    redo = true;
  }
  for (let c = 0; c < table.length; c++) {
    const id = table[c]!;
    if (id !== CHUNK_EMPTY && st.meta.has(id)) throw new CorruptImageError(path, `chunk ${c} maps to storage chunk ${id}, which holds snapshot metadata`);
  }
  st.recomputeShared(table);
  return { state: st, redo };
}

/** Decodes the refcount table into `st.refcounts`; returns what is wrong with it, or null. */
function refcountTableProblem(path: string, refBuf: Uint8Array, h: Header, file: BlockFile, st: SnapshotState): string | null {
  try {
    st.refcounts = decodeRefcounts(path, refBuf);
  } catch (err) {
    if (!(err instanceof CorruptImageError)) throw err;
    return err.message.slice(err.message.indexOf('refcount table'));
  }
  const limit = storageLimit(h, file);
  for (let id = 0; id < st.refcounts.length; id++) {
    if (st.refcounts[id] === 0) continue;
    if (id >= limit) return `refcount table: storage chunk ${id} is referenced but lies beyond the end (truncated?)`;
    if (st.meta.has(id)) return `refcount table: storage chunk ${id} holds snapshot metadata but has a refcount`;
  }
  return null;
}

/**
 * The true refcounts: per storage id, the saved tables that map it. Every saved state must be
 * intact (its checksum and references verified); one that is not makes the loss permanent.
 */
async function recountReferences(path: string, file: BlockFile, h: Header, st: SnapshotState, damage: string): Promise<Uint16Array> {
  st.refcounts = new Uint16Array(0);
  const counts: number[] = [];
  for (const e of st.dir.entries) {
    let saved: SavedState;
    try {
      saved = await readState(path, file, h, st, e);
    } catch (err) {
      if (!(err instanceof FvdError)) throw err;
      throw new CorruptImageError(path, `${damage}, and it cannot be rebuilt: ${err.message.slice(err.message.indexOf('corrupt image: ') + 15)}`);
    }
    for (const id of saved.table) if (id !== CHUNK_EMPTY) counts[id] = (counts[id] ?? 0) + 1;
  }
  return Uint16Array.from(counts, (n) => Math.min(n ?? 0, MAX_REFCOUNT));
}

interface SavedState {
  table: Uint32Array;
  bitmap: Uint8Array;
}

/**
 * Reads and verifies a snapshot's saved state: checksum, every mapped id inside the storage area,
 * not metadata, not mapped twice; with `needRefcounts`, every mapped id has a refcount (else a
 * write through the active table could have changed it: the image needs `check --repair`).
 */
async function readState(path: string, file: BlockFile, h: Header, st: SnapshotState, e: SnapshotEntry, needRefcounts = false): Promise<SavedState> {
  const what = `snapshot '${e.name}'`;
  const buf = new Uint8Array(e.stateLength);
  await file.read(buf, e.stateOffset);
  if (crc(buf) !== e.stateCrc) throw new CorruptImageError(path, `${what}: saved table/bitmap checksum mismatch`);
  const chunks = Math.ceil(e.virtualSize / h.chunkSize);
  const table = new Uint32Array(chunks);
  const dv = new DataView(buf.buffer);
  for (let c = 0; c < chunks; c++) table[c] = dv.getUint32(4 * c, true);
  const tableLength = e.stateLength - h.bitmapLength;
  const limit = storageLimit(h, file);
  const seen = new Set<number>();
  for (let c = 0; c < chunks; c++) {
    const id = table[c]!;
    if (id === CHUNK_EMPTY) continue;
    if (id >= limit) throw new CorruptImageError(path, `${what} maps chunk ${c} to storage chunk ${id} beyond the end (truncated?)`);
    if (st.meta.has(id)) throw new CorruptImageError(path, `${what} maps chunk ${c} to storage chunk ${id}, which holds snapshot metadata`);
    if (seen.has(id)) throw new CorruptImageError(path, `${what} maps storage chunk ${id} twice`);
    if (needRefcounts && st.refcount(id) === 0)
      throw new CorruptImageError(path, `${what} maps storage chunk ${id}, whose refcount is 0 (run fvd check)`);
    seen.add(id);
  }
  return { table, bitmap: buf.slice(tableLength) };
}

/** The snapshot operations of one open image (FvdImage.snapshots). */
export class SnapshotManager {
  constructor(
    private readonly path: string,
    /** Null for a raw-like image (no snapshots). */
    private readonly active: ActiveImageState | null,
    private readonly st: SnapshotState | null,
    private readonly engine: SnapshotEngineHooks,
  ) {}

  /** Number of snapshots (0 for raw-like images). */
  get count(): number {
    return this.st ? this.st.dir.entries.length : 0;
  }

  /** Opened with `recountRefcounts` over a damaged refcount table: what is wrong with it, else null. */
  get refcountDamage(): string | null {
    return this.st?.refcountDamage ?? null;
  }

  private need(): { active: ActiveImageState; st: SnapshotState } {
    if (!this.active || !this.st) throw new FvdError(`${this.path}: internal snapshots need the compact layout; this image is raw-like`, 'EINVAL');
    this.engine.checkOpen();
    return { active: this.active, st: this.st };
  }

  private writable(op: string): { active: ActiveImageState; st: SnapshotState } {
    const r = this.need();
    if (r.active.readOnly) throw new FvdError(`${this.path}: cannot ${op} on an image opened read-only`, 'EROFS');
    return r;
  }

  private find(st: SnapshotState, name: string): SnapshotEntry {
    const e = st.dir.entries.find((x) => x.name === name);
    if (!e) throw new FvdError(`${this.path}: no snapshot named ${JSON.stringify(name)}`, 'ENOENT');
    return e;
  }

  list(): SnapshotInfo[] {
    const { active, st } = this.need();
    return st.dir.entries.map((e) => ({
      id: e.id,
      name: e.name,
      date: new Date(e.dateSec * 1000 + Math.floor(e.dateNsec / 1e6)),
      size: e.mappedChunks * active.header.chunkSize,
      virtualSize: e.virtualSize,
    }));
  }

  /**
   * The refusals of create, delete and revert that the image's state decides, checked without
   * writing anything: `fvd snapshot` runs them on a read-only open first, so that a refused
   * operation leaves the file byte-identical (a read-write open replays a dirty image's journal).
   */
  async preflight(op: 'create' | 'delete' | 'revert', name: string): Promise<void> {
    const { active, st } = this.need();
    if (op === 'create') return this.checkCreate(st, name);
    const e = this.find(st, name);
    if (op === 'revert') this.checkRevert(active, e, name);
    const saved = await readState(this.path, active.file, active.header, st, e, true);
    if (op === 'revert' && this.needsBase(active, saved)) await this.engine.attachBase();
  }

  private checkCreate(st: SnapshotState, name: string): void {
    validateName(name);
    if (st.dir.entries.some((e) => e.name === name)) throw new FvdError(`${this.path}: a snapshot named ${JSON.stringify(name)} already exists`, 'EINVAL');
    if (st.dir.entries.length >= MAX_SNAPSHOTS) throw new FvdError(`${this.path}: too many snapshots (at most ${MAX_SNAPSHOTS})`, 'ENOSPC');
  }

  private checkRevert(active: ActiveImageState, e: SnapshotEntry, name: string): void {
    if (e.virtualSize !== active.header.virtualSize)
      throw new FvdError(`${this.path}: snapshot ${JSON.stringify(name)} has virtual size ${e.virtualSize}, the image ${active.header.virtualSize}`, 'EINVAL');
  }

  /**
   * A snapshot taken before the image became fully local reads blocks from the base again (which
   * attachBase opens if FULLY_LOCAL closed it).
   */
  private needsBase(active: ActiveImageState, saved: SavedState): boolean {
    const h = active.header;
    return h.baseFormat !== BASE_NONE && active.baseBlocks > 0 && !allSet(saved.bitmap, 0, active.baseBlocks);
  }

  /** Saves the active table and bitmap as snapshot `name`. No data is copied. */
  async create(name: string): Promise<SnapshotInfo> {
    const { active, st } = this.writable('create a snapshot');
    this.checkCreate(st, name);
    // Copy-on-read and prefetched ("soft") bits are in memory only: the checkpoint writes them
    // after an fdatasync of their data, so the saved bitmap may include them.
    await this.engine.quiesce();
    const h = active.header;
    const table = active.table;
    let maxId = -1;
    for (let c = 0; c < table.length; c++) if (table[c] !== CHUNK_EMPTY && table[c]! > maxId) maxId = table[c]!;
    const counts = new Uint16Array(Math.max(st.refcounts.length, maxId + 1));
    counts.set(st.refcounts);
    // With fewer than MAX_SNAPSHOTS snapshots (checkCreate), a stored count at MAX_REFCOUNT can
    // only be a leak — an overcount, which `fvd check` reports but does not call corruption. So a
    // clean image always takes one more snapshot: recount such a table from the snapshot tables
    // (the true counts are written with this snapshot, which also drops the leak).
    if (mapsSaturatedChunk(table, counts)) await this.recountInto(counts);
    let mapped = 0;
    for (let c = 0; c < table.length; c++) {
      const id = table[c]!;
      if (id === CHUNK_EMPTY) continue;
      if (counts[id] === MAX_REFCOUNT) throw new FvdError(`${this.path}: storage chunk ${id} is already in ${MAX_REFCOUNT} snapshots`, 'ENOSPC');
      counts[id]!++;
      mapped++;
    }
    const state = new Uint8Array(stateBytes(h, h.virtualSize));
    state.fill(0xff, 0, h.tableLength);
    state.set(new Uint8Array(table.buffer, table.byteOffset, table.length * 4));
    state.set(active.present.subarray(0, h.bitmapLength), h.tableLength);
    const now = Date.now();
    const { id, nextId } = nextSnapshotId(st.dir);
    const entry: SnapshotEntry = {
      id,
      name,
      stateOffset: 0,
      stateLength: state.length,
      virtualSize: h.virtualSize,
      dateSec: Math.floor(now / 1000),
      dateNsec: (now % 1000) * 1e6,
      stateCrc: crc(state),
      mappedChunks: mapped,
    };
    await this.commit(active, st, { entries: [...st.dir.entries, entry], nextId }, counts, { entry, bytes: state });
    return this.list().find((x) => x.id === entry.id)!;
  }

  /** Deletes snapshot `name`; storage only it referenced becomes free. */
  async delete(name: string): Promise<void> {
    const { active, st } = this.writable('delete a snapshot');
    const e = this.find(st, name);
    await this.engine.quiesce();
    const saved = await readState(this.path, active.file, active.header, st, e, true);
    const counts = st.refcounts.slice();
    for (const id of saved.table) if (id !== CHUNK_EMPTY) counts[id]!--;
    await this.commit(active, st, { entries: st.dir.entries.filter((x) => x !== e), nextId: st.dir.nextId }, counts);
  }

  /**
   * Reverts the active state to snapshot `name` (qemu-img snapshot -a): the active table and bitmap
   * become the snapshot's; storage that only the old active state referenced becomes free. The
   * snapshot itself stays. Every chunk is then shared with it, so the next write to each copies it.
   */
  async revert(name: string): Promise<void> {
    const { active, st } = this.writable('revert to a snapshot');
    const e = this.find(st, name);
    const h = active.header;
    this.checkRevert(active, e, name);
    await this.engine.quiesce();
    const saved = await readState(this.path, active.file, h, st, e, true);
    if (this.needsBase(active, saved)) await this.engine.attachBase();
    const before = usedIds(active.table, st);
    // Commit point: with the marker on disk, every open redoes the revert from the (immutable)
    // saved state before it uses the table or bitmap, so a torn in-place write below is harmless.
    h.revertSnapshotId = e.id;
    await this.headerOrAbandon(active, () => (h.revertSnapshotId = 0));
    try {
      active.table.set(saved.table);
      active.present.set(saved.bitmap);
      active.journaled.set(saved.bitmap);
      h.revertSnapshotId = 0;
      // Table, fdatasync, bitmap, fdatasync, then the header without the marker.
      await this.engine.checkpoint();
    } catch (err) {
      await this.engine.abandon();
      throw new FvdError(`${this.path}: revert to ${JSON.stringify(name)} interrupted (${(err as Error).message}); reopening the image completes it`, 'EIO');
    }
    st.recomputeShared(active.table);
    active.allocator.rebuild();
    await punchFreed(active, st, before);
  }

  /** Replaces `counts` by the true references of the snapshot tables (verify's recount). */
  private async recountInto(counts: Uint16Array): Promise<void> {
    const r = await this.verify();
    if (r.errors.length || !r.actual) throw new FvdError(`${this.path}: cannot recount the snapshot references: ${r.errors[0]}`, 'EIO');
    counts.fill(0);
    counts.set(r.actual.subarray(0, counts.length));
  }

  /**
   * Recounts every snapshot table's references and compares them with the refcount table
   * (`fvd check`). Reads every saved state.
   */
  async verify(): Promise<RefcountReport & { actual: Uint16Array | null }> {
    const { active, st } = this.need();
    const report: RefcountReport & { actual: Uint16Array | null } = { errors: [], overcounts: [], undercounts: [], actual: null };
    const limit = storageLimit(active.header, active.file);
    const actual = new Uint32Array(Math.max(limit, st.refcounts.length));
    for (const e of st.dir.entries) {
      let saved: SavedState;
      try {
        saved = await readState(this.path, active.file, active.header, st, e);
      } catch (err) {
        if (!(err instanceof FvdError)) throw err;
        report.errors.push(err.message);
        continue;
      }
      for (const id of saved.table) if (id !== CHUNK_EMPTY) actual[id]!++;
    }
    if (report.errors.length) return report; // the true counts are unknown
    for (let id = 0; id < actual.length; id++) {
      const stored = st.refcount(id);
      const n = actual[id]!;
      if (stored > n) report.overcounts.push({ id, stored, actual: n });
      else if (stored < n) report.undercounts.push({ id, stored, actual: n });
    }
    report.actual = Uint16Array.from(actual, (n) => Math.min(n, MAX_REFCOUNT));
    return report;
  }

  /**
   * Raises the in-memory refcounts to at least `actual` (verify()'s true counts); writes nothing.
   * An undercounting table calls storage free that a snapshot table maps: from now on the
   * allocator, the free-chunk count and the shared flags treat it as used (FORMAT.md §10.8).
   * Overcounted chunks stay used until a repair commits the true counts.
   */
  holdReferenced(actual: Uint16Array): void {
    const { active, st } = this.need();
    const counts = new Uint16Array(Math.max(st.refcounts.length, actual.length));
    counts.set(st.refcounts);
    for (let id = 0; id < actual.length; id++) if (actual[id]! > counts[id]!) counts[id] = actual[id]!;
    st.refcounts = counts;
    st.recomputeShared(active.table);
    active.allocator.rebuild();
  }

  /** `check --repair`: rewrites the refcount table with the counts verify() found. */
  async repairRefcounts(): Promise<number> {
    const { active, st } = this.writable('repair refcounts');
    const r = await this.verify();
    if (r.errors.length || !r.actual) throw new FvdError(`${this.path}: cannot repair refcounts: ${r.errors[0]}`, 'EIO');
    const fixed = r.overcounts.length + r.undercounts.length;
    if (!fixed && !st.refcountDamage) return 0;
    await this.engine.quiesce();
    // The new table and directory go into storage free under both the stored and the true counts:
    // by the stored ones alone, a chunk only a snapshot maps (undercounted to 0) looked free, and
    // the new table was written over that snapshot's data.
    this.holdReferenced(r.actual);
    // A damaged table is replaced even when the recount (already in st.refcounts) changes nothing.
    await this.commit(active, st, st.dir, r.actual);
    st.refcountDamage = null;
    return fixed;
  }

  /**
   * Writes a new directory and refcount table (and a new saved state) into free chunks, makes
   * them durable, and switches the header to them. With no snapshot left, the header drops the
   * feature instead: the image is a plain compact image again.
   */
  private async commit(active: ActiveImageState, st: SnapshotState, dir: Directory, counts: Uint16Array, add?: { entry: SnapshotEntry; bytes: Uint8Array }): Promise<void> {
    const h = active.header;
    const cs = h.chunkSize;
    const before = usedIds(active.table, st);
    const place = (length: number): number => {
      const first = active.allocator.takeRun(Math.ceil(length / cs));
      const offset = h.dataOffset + first * cs;
      // Before the write: even a failed one may have left data behind.
      active.allocator.noteWritten(offset, Math.ceil(length / cs) * cs);
      return offset;
    };
    let refOffset = 0;
    let refLength = 0;
    let dirOffset = 0;
    let dirLength = 0;
    try {
      const writes: Promise<void>[] = [];
      if (add) {
        add.entry.stateOffset = place(add.bytes.length);
        writes.push(active.file.write(add.bytes, add.entry.stateOffset));
      }
      if (dir.entries.length) {
        const refBytes = encodeRefcounts(counts, usedRefcountEntries(counts));
        const dirBytes = encodeDirectory(dir);
        refOffset = place(refBytes.length);
        refLength = refBytes.length;
        dirOffset = place(dirBytes.length);
        dirLength = dirBytes.length;
        writes.push(active.file.write(refBytes, refOffset), active.file.write(dirBytes, dirOffset));
      }
      const results = await Promise.allSettled(writes);
      for (const r of results) if (r.status === 'rejected') throw r.reason;
      await active.file.flush();
    } catch (err) {
      active.allocator.rebuild(); // nothing on disk refers to the chunks just taken
      throw err;
    }
    const old = { incompatible: h.incompatible, refcountOffset: h.refcountOffset, refcountLength: h.refcountLength, snapshotsOffset: h.snapshotsOffset, snapshotsLength: h.snapshotsLength };
    if (dir.entries.length) h.incompatible |= INCOMPAT_SNAPSHOTS;
    else h.incompatible &= ~INCOMPAT_SNAPSHOTS;
    h.refcountOffset = refOffset;
    h.refcountLength = refLength;
    h.snapshotsOffset = dirOffset;
    h.snapshotsLength = dirLength;
    await this.headerOrAbandon(active, () => Object.assign(h, old));
    // Committed.
    st.dir = dir.entries.length ? dir : { entries: [], nextId: 1 };
    st.refcounts = dir.entries.length ? counts : new Uint16Array(0);
    st.rebuildMeta(this.path, h);
    st.recomputeShared(active.table);
    active.allocator.rebuild();
    await punchFreed(active, st, before);
  }

  /**
   * Writes the header (the commit point). If that fails, whether the sector reached the disk is
   * unknown, so the in-memory state may be wrong either way: the image is closed without writing.
   */
  private async headerOrAbandon(active: ActiveImageState, undo: () => void): Promise<void> {
    try {
      await active.file.write(encodeHeader(active.header), 0);
      await active.file.flush();
    } catch (err) {
      undo();
      await this.engine.abandon();
      throw new FvdError(`${this.path}: header update failed (${(err as Error).message}); the image was closed, reopen it`, 'EIO');
    }
  }
}

/** Every storage id in use: mapped by the active table or used by a snapshot. */
function usedIds(table: Uint32Array, st: SnapshotState): Set<number> {
  const used = new Set<number>();
  for (let c = 0; c < table.length; c++) if (table[c] !== CHUNK_EMPTY) used.add(table[c]!);
  for (let id = 0; id < st.refcounts.length; id++) if (st.refcounts[id]) used.add(id);
  for (const id of st.meta) used.add(id);
  return used;
}

/**
 * Returns the storage of chunks that an operation freed to the host. Called after the operation
 * is durable, so nothing on disk refers to them any more. Best effort: the allocator zeroes a
 * reused chunk anyway (FORMAT.md §4.3), so a failed punch only costs space.
 */
async function punchFreed(active: ActiveImageState, st: SnapshotState, before: Set<number>): Promise<void> {
  const now = usedIds(active.table, st);
  const h = active.header;
  // Never past the end of a file (zeroRange may fall back to writing zeros, which would extend it).
  const end = active.file.isBlockDevice ? Number.POSITIVE_INFINITY : active.file.size();
  for (const id of before) {
    if (now.has(id)) continue;
    const offset = h.dataOffset + id * h.chunkSize;
    const length = Math.min(h.chunkSize, end - offset);
    if (length <= 0) continue;
    try {
      await active.file.zeroRange(offset, length);
    } catch {
      // see above
    }
  }
}

/** True when a chunk the active table maps already has the largest count a refcount can hold. */
function mapsSaturatedChunk(table: Uint32Array, counts: Uint16Array): boolean {
  for (let c = 0; c < table.length; c++) {
    const id = table[c]!;
    if (id !== CHUNK_EMPTY && counts[id] === MAX_REFCOUNT) return true;
  }
  return false;
}

/**
 * The id of a new snapshot and the directory's next_id after it (FORMAT.md §10.3): next_id itself
 * while it is below 0xffffffff; once the 32-bit id space is spent (next_id = 0xffffffff, after
 * 2^32 - 2 creates or in a damaged-but-valid directory), the smallest id no entry uses — there is
 * one below 65536, as there are fewer entries than that — and next_id stays.
 */
function nextSnapshotId(dir: Directory): { id: number; nextId: number } {
  if (dir.nextId < 0xffffffff) return { id: dir.nextId, nextId: dir.nextId + 1 };
  const used = new Set(dir.entries.map((e) => e.id));
  let id = 1;
  while (used.has(id)) id++;
  return { id, nextId: dir.nextId };
}
