/**
 * Where the guest bytes of one qcow2 level live (docs/FORMAT.md §13), from its tables: the L1
 * table is held in memory whole (8 bytes per L2 table: 16 KiB per TiB at 64 KiB clusters); L2
 * tables are read in slices of at most 64 KiB into a bounded LRU cache (DEFAULT_L2_CACHE_BYTES),
 * so a 1 TiB template needs no more than that however it is read. A guest range is mapped —
 * cluster by cluster, or subcluster by subcluster with extended L2 entries — into runs (data at a
 * host offset, zeros, the backing file, or one compressed cluster), adjacent runs of the same kind
 * merged; Qcow2Image (qcow2.ts) fills them.
 *
 * Every offset taken from the tables is checked before use (alignment, inside the file, not in the
 * header cluster); a bad one fails with a one-line "corrupt qcow2 image" error.
 */
import type { BlockFile } from './io.js';
import {
  HI_COMPRESSED,
  HI_COPIED,
  L1_RESERVED_HI,
  L1_RESERVED_LO,
  LO_ZERO,
  STANDARD_RESERVED_HI,
  STANDARD_RESERVED_LO,
  compressedExtent,
  corruptQcow2,
  entryOffset,
  qcow2Geometry,
  type Qcow2Geometry,
  type Qcow2Header,
} from './qcow2-format.js';
import type { DecodeBatch } from './qcow2-decode-pool.js';

/** L2 cache bound per qcow2 level: 8 MiB covers 64 GiB of disk at 64 KiB clusters, 2 TiB at 2 MiB. */
export const DEFAULT_L2_CACHE_BYTES = 8 * 1024 * 1024;
/** L2 tables are cached in slices of this many bytes at most (the whole table for clusters ≤ 64 KiB). */
const L2_SLICE_BYTES = 64 * 1024;

// Run kinds.
export const ZERO = 0;
export const DATA = 1;
export const BACKING = 2;
export const COMPRESSED = 3;

/** A stretch of a read that lives in one kind of place. */
export interface Run {
  kind: number;
  /** Guest offset and length of the run. */
  guest: number;
  length: number;
  /** DATA: host offset of `guest`. COMPRESSED: host offset of the compressed stream. */
  host: number;
  /** COMPRESSED: bytes the descriptor names, and the run's offset inside the decompressed cluster. */
  compressedLength: number;
  inCluster: number;
  // Left empty here; the reader (qcow2.ts) sets them while it fills the run.
  /** COMPRESSED: the stream's bytes when read ahead with its neighbours (else read on its own). */
  src: Uint8Array | null;
  /** COMPRESSED: the batch decoding it on a worker, and its index there. */
  batch: DecodeBatch | null;
  batchIndex: number;
}

/** One level's L1 table, its L2 cache, and the runs a guest range maps to. */
export class Qcow2Tables {
  private readonly sliceBytes: number;
  private readonly sliceEntries: number;
  private readonly maxSlices: number;
  private readonly slices = new Map<number, DataView>();
  private readonly loading = new Map<number, Promise<DataView>>();
  private lastSliceKey = -1;
  private lastSlice: DataView | null = null;
  private readonly fileSize: number;

  private constructor(
    /** The path errors name. */
    private readonly path: string,
    private readonly header: Qcow2Header,
    private readonly g: Qcow2Geometry,
    /** The image file, which holds the tables. */
    private readonly file: BlockFile,
    /** Table of L2 offsets (0: no L2 table), one per L1 entry. */
    private readonly l1: Float64Array,
    l2CacheBytes: number,
  ) {
    this.fileSize = file.size();
    this.sliceBytes = Math.min(g.clusterSize, L2_SLICE_BYTES);
    this.sliceEntries = this.sliceBytes / g.l2EntrySize;
    this.maxSlices = Math.max(2, Math.floor(l2CacheBytes / this.sliceBytes));
  }

  /** Reads and checks the L1 table; L2 slices are read as they are needed. */
  static async open(path: string, file: BlockFile, header: Qcow2Header, l2CacheBytes: number): Promise<Qcow2Tables> {
    return new Qcow2Tables(path, header, qcow2Geometry(header), file, await readL1(path, file, header), l2CacheBytes);
  }

  /** Bytes the L2 cache holds now (for tests and `info`). */
  l2CacheBytes(): number {
    return this.slices.size * this.sliceBytes;
  }

  /** Drops the cached L2 slices (the image is closing). */
  clear(): void {
    this.slices.clear();
    this.lastSlice = null;
    this.lastSliceKey = -1;
  }

  /** The runs of [offset, end), in order, adjacent runs of one kind merged. */
  async runs(offset: number, end: number): Promise<Run[]> {
    const runs: Run[] = [];
    const cs = this.g.clusterSize;
    const perTable = cs * this.g.l2Entries;
    for (let pos = offset; pos < end; ) {
      const vc = Math.floor(pos / cs);
      const l1i = Math.floor(vc / this.g.l2Entries);
      const l2Offset = this.l1[l1i]!;
      if (l2Offset === 0) {
        // No L2 table: the whole span it would cover is unallocated.
        const spanEnd = Math.min(end, (l1i + 1) * perTable);
        push(runs, BACKING, pos, spanEnd - pos, 0);
        pos = spanEnd;
        continue;
      }
      const l2i = vc % this.g.l2Entries;
      const key = l2Offset + Math.floor(l2i / this.sliceEntries) * this.sliceBytes;
      const view = key === this.lastSliceKey ? this.lastSlice! : (this.slices.get(key) ?? (await this.loadSlice(key)));
      if (key !== this.lastSliceKey) this.touch(key, view);
      const cEnd = Math.min(end, (vc + 1) * cs);
      this.classify(runs, view, (l2i % this.sliceEntries) * this.g.l2EntrySize, vc, pos, cEnd);
      pos = cEnd;
    }
    return runs;
  }

  /** Appends the runs of [pos, cEnd) inside guest cluster `vc`, whose L2 entry is at `at` in `view`. */
  private classify(runs: Run[], view: DataView, at: number, vc: number, pos: number, cEnd: number): void {
    const cs = this.g.clusterSize;
    const hi = view.getUint32(at);
    const lo = view.getUint32(at + 4);
    const where = () => `guest cluster ${vc} (offset ${vc * cs})`;
    const ext = this.header.extendedL2;
    const zeroBits = ext ? view.getUint32(at + 8) : 0;
    const allocBits = ext ? view.getUint32(at + 12) : 0;
    if (hi & HI_COMPRESSED) {
      if (this.header.hasDataFile) throw corruptQcow2(this.path, `${where()} is compressed, which an external data file does not allow`);
      if (zeroBits || allocBits) throw corruptQcow2(this.path, `${where()} is compressed but has a subcluster bitmap`);
      const c = compressedExtent(hi, lo, this.g);
      if (c.offset < cs || c.offset >= this.fileSize)
        throw corruptQcow2(this.path, `${where()}: compressed data at ${c.offset} is ${c.offset < cs ? 'inside the header cluster' : `past the end of the file (${this.fileSize} bytes; truncated?)`}`);
      runs.push({ kind: COMPRESSED, guest: pos, length: cEnd - pos, host: c.offset, compressedLength: c.length, inCluster: pos - vc * cs, src: null, batch: null, batchIndex: 0 });
      return;
    }
    if (hi & STANDARD_RESERVED_HI || lo & STANDARD_RESERVED_LO) throw corruptQcow2(this.path, `${where()}: reserved bits set in its L2 entry`);
    if (!ext && lo & LO_ZERO) {
      if (this.header.version < 3) throw corruptQcow2(this.path, `${where()}: zero flag in a version 2 image`);
      push(runs, ZERO, pos, cEnd - pos, 0);
      return;
    }
    const host = entryOffset(hi, lo);
    const allocated = host !== 0 || (this.header.hasDataFile && (hi & HI_COPIED) !== 0);
    if (allocated) this.checkHost(host, vc, where);
    if (!ext) {
      push(runs, allocated ? DATA : BACKING, pos, cEnd - pos, host + (pos - vc * cs));
      return;
    }
    if (allocBits & zeroBits) throw corruptQcow2(this.path, `${where()}: subclusters marked both allocated and zero`);
    if (!allocated && allocBits) throw corruptQcow2(this.path, `${where()}: allocated subclusters in an unallocated cluster`);
    const scs = this.g.subclusterSize;
    const base = vc * cs;
    for (let p = pos; p < cEnd; ) {
      const sc = Math.floor((p - base) / scs);
      const scEnd = Math.min(cEnd, base + (sc + 1) * scs);
      const bit = 1 << sc;
      const kind = allocBits & bit ? DATA : zeroBits & bit ? ZERO : BACKING;
      push(runs, kind, p, scEnd - p, host + (p - base));
      p = scEnd;
    }
  }

  /** A standard cluster's host offset must be cluster-aligned (so clear of the header: 0 is unallocated) and inside the file. */
  private checkHost(host: number, vc: number, where: () => string): void {
    const cs = this.g.clusterSize;
    if (host % cs !== 0) throw corruptQcow2(this.path, `${where()}: data offset ${host} is not cluster-aligned`);
    if (this.header.hasDataFile) {
      // The external data file maps guest offsets 1:1.
      if (host !== vc * cs) throw corruptQcow2(this.path, `${where()}: external data offset ${host} differs from the guest offset`);
      return;
    }
    if (host >= this.fileSize) throw corruptQcow2(this.path, `${where()}: data offset ${host} is past the end of the file (${this.fileSize} bytes; truncated?)`);
  }

  /** Reads one L2 slice (deduplicating concurrent loads) and caches it. */
  private loadSlice(key: number): Promise<DataView> {
    let p = this.loading.get(key);
    if (!p) {
      p = (async () => {
        const bytes = new Uint8Array(this.sliceBytes);
        await this.file.read(bytes, key);
        return new DataView(bytes.buffer);
      })();
      this.loading.set(key, p);
      p.then(
        () => this.loading.delete(key),
        () => this.loading.delete(key),
      );
    }
    return p;
  }

  /** LRU: most recently used last; evicts from the front beyond the bound. */
  private touch(key: number, view: DataView): void {
    this.slices.delete(key);
    this.slices.set(key, view);
    while (this.slices.size > this.maxSlices) this.slices.delete(this.slices.keys().next().value!);
    this.lastSliceKey = key;
    this.lastSlice = view;
  }
}

function push(runs: Run[], kind: number, guest: number, length: number, host: number): void {
  const last = runs[runs.length - 1];
  if (last && last.kind === kind && kind !== COMPRESSED && (kind !== DATA || last.host + last.length === host)) {
    last.length += length;
    return;
  }
  runs.push({ kind, guest, length, host, compressedLength: 0, inCluster: 0, src: null, batch: null, batchIndex: 0 });
}

/**
 * The L1 table, each entry checked: an L2 table must be cluster-aligned (so, not being 0, clear of
 * the header cluster), inside the file and clear of the L1 table.
 */
async function readL1(p: string, file: BlockFile, h: Qcow2Header): Promise<Float64Array> {
  const l1 = new Float64Array(h.l1Size);
  if (h.l1Size === 0) return l1;
  const bytes = new Uint8Array(h.l1Size * 8);
  await file.read(bytes, h.l1Offset);
  const dv = new DataView(bytes.buffer);
  const cs = h.clusterSize;
  const l1End = h.l1Offset + h.l1Size * 8;
  for (let i = 0; i < h.l1Size; i++) {
    const hi = dv.getUint32(i * 8);
    const lo = dv.getUint32(i * 8 + 4);
    if (hi & L1_RESERVED_HI || lo & L1_RESERVED_LO) throw corruptQcow2(p, `L1 entry ${i}: reserved bits set`);
    const off = entryOffset(hi, lo);
    if (off === 0) continue;
    if (off % cs !== 0) throw corruptQcow2(p, `L1 entry ${i}: L2 table offset ${off} is not cluster-aligned`);
    if (off < l1End && off + cs > h.l1Offset) throw corruptQcow2(p, `L1 entry ${i}: L2 table offset ${off} overlaps the L1 table`);
    if (off + cs > file.size()) throw corruptQcow2(p, `L1 entry ${i}: L2 table at ${off} lies past the end of the file (${file.size()} bytes; truncated?)`);
    l1[i] = off;
  }
  return l1;
}
