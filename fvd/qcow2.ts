/**
 * A qcow2 image as a read-only base (docs/FORMAT.md §13 says what is read and what is refused).
 *
 * A read of a range is first mapped into runs through the two-level table (qcow2-tables.ts: data
 * at a host offset, zeros, the backing file, or one compressed cluster); then the runs are filled,
 * several at a time. The compressed clusters of one read are read with one file read per group of
 * neighbours on disk; a group of at least WORKER_MIN_CLUSTERS decodes partly on the calling
 * thread, partly in batches on decode workers (qcow2-decode-pool.ts: every core, as qemu-img's
 * thread pool; all on the calling thread until a worker has loaded); smaller groups on the
 * calling thread (clusters ≤ 64 KiB, in slices) or the thread pool (larger ones), see
 * qcow2-decompress.ts.
 *
 * Every offset taken from the image is checked before use (alignment, inside the file, not in the
 * header cluster); a bad one fails the read with a one-line "corrupt qcow2 image" error.
 * The file, its external data file and its backing files are opened read-only and never written.
 */
import path from 'node:path';
import { isUrl } from './base-location.js';
import { FvdError } from './errors.js';
import type { BlockFile, IoBackend } from './io.js';
import { corruptQcow2, decodeQcow2Header, qcow2Geometry, type Qcow2Geometry, type Qcow2Header } from './qcow2-format.js';
import { DECODE_SPARE, prepareCompression, clusterFailure, decompressCluster, decompressClusterInto, workerZstd } from './qcow2-decompress.js';
import { BATCH_BYTES, decodeBatch, giveShared, poolSize, takeShared, workersReady, type DecodeBatch } from './qcow2-decode-pool.js';
import { BACKING, COMPRESSED, DATA, DEFAULT_L2_CACHE_BYTES, Qcow2Tables, ZERO, type Run } from './qcow2-tables.js';
import { fileDataExtent, type DataExtent } from './zero-scan.js';

/** Decompressed clusters kept for partial reads of the same cluster (at least one cluster). */
const DECOMPRESSED_CACHE_BYTES = 4 * 1024 * 1024;
/** Runs filled at once per read: enough to keep the thread pool busy (file reads, large clusters). */
const FILL_PARALLELISM = 8;
/**
 * The compressed clusters of one read are fetched with one read per group of neighbours (QEMU
 * writes them one after another): a group grows while the next stream starts within this gap of
 * the group's end, up to COMPRESSED_GROUP_MAX bytes.
 */
const COMPRESSED_GROUP_GAP = 4096;
const COMPRESSED_GROUP_MAX = 4 * 1024 * 1024;
/**
 * A group of at least this many compressed clusters decodes on the decode workers too; fewer on
 * the calling thread only. A guest's copy-on-read of 128 KiB (2 clusters) stays here, a bulk read goes out.
 */
export const WORKER_MIN_CLUSTERS = 4;
/** Guest bytes mapped at once when looking for the next data extent: first, and at most. */
const EXTENT_WINDOW_FIRST = 1024 * 1024;
const EXTENT_WINDOW_MAX = 256 * 1024 * 1024;
/** Levels below an image, as for FVD base chains. */
export const MAX_QCOW2_CHAIN = 64;
/** Backing "file names" that are really network or option strings: QEMU protocols fvd does not speak. */
const PROTOCOLS = /^(nbd|nbd\+unix|nbd\+tcp|http|https|ftp|ftps|ssh|iscsi|rbd|gluster|gluster\+tcp|nfs|sheepdog|vxhs|blkdebug|null-co|null-aio|json):/;

export interface ChainEntry {
  path: string;
  format: 'qcow2' | 'raw';
  size: number;
  /** qcow2 levels: what `info --backing-chain` shows of them. */
  qcow2?: Qcow2Details;
}

export interface Qcow2Details {
  version: 2 | 3;
  clusterSize: number;
  compression: 'zlib' | 'zstd';
  extendedL2: boolean;
  /** As stored in the image (null: none). */
  backingFile: string | null;
  backingFormat: string | null;
  dataFile: string | null;
}

/** A read-only layer: a qcow2 level or the raw file at the bottom of a qcow2 chain. */
export interface ReadOnlyLayer {
  readonly size: number;
  read(buf: Uint8Array, offset: number): Promise<void>;
  /** True when the range is known to read as zeros without reading data (false: unknown). */
  knownZero(offset: number, length: number): Promise<boolean>;
  /** The first extent at or after `offset` that may hold data (BaseImage.nextDataExtent). */
  nextDataExtent(offset: number): Promise<DataExtent | null>;
  close(): Promise<void>;
  describe(): ChainEntry[];
  /** BlockFile.fileId of every file read (this level, its data file, then its backing chain), where known. */
  fileIds(): string[];
}

export interface Qcow2OpenOptions {
  /** Bound of the L2 cache of each level, in bytes (default DEFAULT_L2_CACHE_BYTES). */
  l2CacheBytes?: number;
  /** Resolved paths of the images above this one (loop detection), topmost first. */
  chain?: string[];
}


export class Qcow2Image implements ReadOnlyLayer {
  readonly size: number;
  private readonly g: Qcow2Geometry;
  private readonly decompressed = new Map<number, Promise<Uint8Array>>();
  private readonly maxDecompressed: number;

  private constructor(
    /** The path errors name: resolved, as the engine's base errors expect. */
    readonly path: string,
    readonly header: Qcow2Header,
    private readonly file: BlockFile,
    /** Where guest data lives: the image file, or its external data file. */
    private readonly data: BlockFile,
    /** The L1 table and the L2 cache: where each guest range lives. */
    private readonly tables: Qcow2Tables,
    private readonly backing: ReadOnlyLayer | null,
  ) {
    this.size = header.size;
    this.g = qcow2Geometry(header);
    this.maxDecompressed = Math.max(1, Math.floor(DECOMPRESSED_CACHE_BYTES / this.g.clusterSize));
  }

  /**
   * Opens `resolved` (an absolute path) and its backing chain read-only, each with a shared lock,
   * so no writer that also locks (fvd) changes them underneath.
   */
  static async open(io: IoBackend, resolved: string, options: Qcow2OpenOptions = {}): Promise<Qcow2Image> {
    const chain = options.chain ?? [];
    if (chain.includes(resolved)) throw new FvdError(`base chain loop: '${resolved}' is its own backing file`, 'EINVAL');
    if (chain.length >= MAX_QCOW2_CHAIN) throw new FvdError(`base chain longer than ${MAX_QCOW2_CHAIN} images (at '${resolved}')`, 'EINVAL');
    const file = await io.open(resolved, { readOnly: true, lock: 'shared' });
    let data: BlockFile | null = null;
    let backing: ReadOnlyLayer | null = null;
    try {
      const fileSize = file.size();
      const head = new Uint8Array(Math.min(fileSize, 512));
      await file.read(head, 0);
      const bits = head.length >= 24 ? new DataView(head.buffer).getUint32(20) : 0;
      // The whole first cluster (header, extensions, backing name); bad cluster_bits are reported by the decoder.
      const first = bits >= 9 && bits <= 21 && fileSize > head.length ? new Uint8Array(Math.min(fileSize, 2 ** bits)) : head;
      if (first !== head) await file.read(first, 0);
      const header = decodeQcow2Header(resolved, first, fileSize);
      await prepareCompression(resolved, header.compression);
      const tables = await Qcow2Tables.open(resolved, file, header, options.l2CacheBytes ?? DEFAULT_L2_CACHE_BYTES);
      if (header.hasDataFile) {
        if (!header.dataFile) throw new FvdError(`${resolved}: qcow2 image uses an external data file but does not name it`, 'EINVAL');
        data = await openRelative(io, resolved, header.dataFile, 'external data file');
      }
      if (header.backingFile !== null) backing = await openBacking(io, resolved, header, [...chain, resolved], options);
      return new Qcow2Image(resolved, header, file, data ?? file, tables, backing);
    } catch (err) {
      await backing?.close();
      await data?.close();
      await file.close();
      throw err;
    }
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    this.checkRange(offset, buf.length);
    const runs = await this.tables.runs(offset, offset + buf.length);
    await this.readCompressedGroups(runs);
    let next = 0;
    let failed = false;
    const worker = async () => {
      while (next < runs.length && !failed) {
        try {
          await this.fill(buf, offset, runs[next++]!);
        } catch (err) {
          failed = true;
          throw err;
        }
      }
    };
    // Settled, not raced: when one run fails, none is still writing into `buf` once this returns.
    const results = await Promise.allSettled(Array.from({ length: Math.min(FILL_PARALLELISM, runs.length) }, worker));
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  async knownZero(offset: number, length: number): Promise<boolean> {
    this.checkRange(offset, length);
    for (const r of await this.tables.runs(offset, offset + length)) {
      if (r.kind === DATA || r.kind === COMPRESSED) return false;
      if (r.kind === BACKING && this.backing && r.guest < this.backing.size) {
        const z = Math.min(r.guest + r.length, this.backing.size);
        if (!(await this.backing.knownZero(r.guest, z - r.guest))) return false;
      }
    }
    return true;
  }

  /**
   * The first extent at or after `offset` that may hold data: stored clusters (plain or
   * compressed) of this level, and the backing layer's own extents under clusters that read from
   * it. Zero clusters, and unallocated ones without a backing layer or past its end, are not data.
   * The tables are walked a window at a time, so a long run of zeros costs table reads only.
   */
  async nextDataExtent(offset: number): Promise<DataExtent | null> {
    // Small windows first (data is often near), growing while only zeros turn up.
    for (let pos = offset, window = EXTENT_WINDOW_FIRST; pos < this.size; window = Math.min(2 * window, EXTENT_WINDOW_MAX)) {
      const windowEnd = Math.min(this.size, pos + window);
      let start = -1;
      let end = -1;
      for (const r of await this.tables.runs(pos, windowEnd)) {
        const rEnd = r.guest + r.length;
        let a = -1;
        let z = -1;
        if (r.kind === DATA || r.kind === COMPRESSED) [a, z] = [r.guest, rEnd];
        else if (r.kind === BACKING && this.backing && r.guest < this.backing.size) {
          const ext = await this.backing.nextDataExtent(r.guest);
          const below = Math.min(rEnd, this.backing.size);
          if (ext && ext[0] < below) [a, z] = [ext[0], Math.min(ext[1], below)];
        }
        if (a < 0) {
          if (start >= 0) break; // the extent found ends before this run
          continue;
        }
        if (start < 0) [start, end] = [a, z];
        else if (a === end) end = z;
        else break;
        if (z < rEnd) break; // the backing layer's extent ended inside this run
      }
      if (start >= 0) return [start, end];
      pos = windowEnd;
    }
    return null;
  }

  /**
   * Where [offset, offset + length) lives at this level, for `map`-like callers: runs of 'data'
   * (stored here, compressed or not), 'zero' (reads as zeros, known from the tables) and
   * 'backing' (read from the backing file; zeros past its end or without one).
   */
  async allocation(offset: number, length: number): Promise<{ offset: number; length: number; kind: 'data' | 'zero' | 'backing' }[]> {
    this.checkRange(offset, length);
    const out: { offset: number; length: number; kind: 'data' | 'zero' | 'backing' }[] = [];
    for (const r of await this.tables.runs(offset, offset + length)) {
      const kind = r.kind === ZERO ? 'zero' : r.kind === BACKING ? (this.backing ? 'backing' : 'zero') : 'data';
      const last = out[out.length - 1];
      if (last && last.kind === kind && last.offset + last.length === r.guest) last.length += r.length;
      else out.push({ offset: r.guest, length: r.length, kind });
    }
    return out;
  }

  async close(): Promise<void> {
    this.tables.clear();
    this.decompressed.clear();
    try {
      await this.backing?.close();
      if (this.data !== this.file) await this.data.close();
    } finally {
      await this.file.close();
    }
  }

  /** A remote template's identity (its size and validator), checked against the image's record. */
  fileIds(): string[] {
    const own = [this.file, ...(this.data !== this.file ? [this.data] : [])].flatMap((f) => (f.fileId ? [f.fileId] : []));
    return [...own, ...(this.backing ? this.backing.fileIds() : [])];
  }

  get identity(): string | undefined {
    return this.file.identity;
  }

  /** True when the template is read over the network (zero detection then only asks, never reads). */
  get remote(): boolean {
    return !!this.file.remote;
  }

  describe(): ChainEntry[] {
    const h = this.header;
    const qcow2: Qcow2Details = {
      version: h.version,
      clusterSize: h.clusterSize,
      compression: h.compression,
      extendedL2: h.extendedL2,
      backingFile: h.backingFile,
      backingFormat: h.backingFormat,
      dataFile: h.hasDataFile ? h.dataFile : null,
    };
    return [{ path: this.path, format: 'qcow2', size: this.size, qcow2 }, ...(this.backing ? this.backing.describe() : [])];
  }

  /** Bytes the L2 cache holds now (for tests and `info`). */
  l2CacheBytes(): number {
    return this.tables.l2CacheBytes();
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size)
      throw new FvdError(`${this.path}: read at ${offset}+${length} outside the ${this.size}-byte qcow2 image`, 'EINVAL');
  }

  // -------------------------------------------------------------------------------------------
  // filling

  private async fill(buf: Uint8Array, offset: number, r: Run): Promise<void> {
    const a = r.guest - offset;
    const dst = buf.subarray(a, a + r.length);
    switch (r.kind) {
      case ZERO:
        dst.fill(0);
        return;
      case DATA:
        // Past the end of the file reads as zeros, as in QEMU: the last cluster may be partly written.
        await this.data.read(dst, r.host);
        return;
      case BACKING: {
        const inBacking = this.backing ? Math.max(0, Math.min(r.length, this.backing.size - r.guest)) : 0;
        if (inBacking > 0) await this.backing!.read(dst.subarray(0, inBacking), r.guest);
        dst.fill(0, inBacking);
        return;
      }
      default: {
        const b = r.batch;
        if (b) {
          await b.done;
          dst.set(new Uint8Array(b.out, r.batchIndex * this.g.clusterSize + r.inCluster, r.length));
          if (--b.unread === 0) giveShared(b.out);
          return;
        }
        if (r.length === this.g.clusterSize && !this.decompressed.has(r.host)) {
          // A whole cluster: decoded straight into the read's buffer (no cached copy: read whole, it is not read again soon).
          await this.decompressInto(r, dst);
          return;
        }
        const cluster = await this.decompress(r);
        dst.set(cluster.subarray(r.inCluster, r.inCluster + r.length));
      }
    }
  }

  /**
   * Reads the streams of the compressed runs not cached yet, neighbours together (sets `src`);
   * large groups go to the decode workers (sets `batch`).
   */
  private async readCompressedGroups(runs: Run[]): Promise<void> {
    const groups: { start: number; end: number; members: Run[] }[] = [];
    let g: { start: number; end: number; members: Run[] } | null = null;
    for (const r of runs) {
      if (r.kind !== COMPRESSED || this.decompressed.has(r.host)) continue;
      const end = r.host + r.compressedLength;
      if (g && r.host >= g.start && r.host <= g.end + COMPRESSED_GROUP_GAP && Math.max(g.end, end) - g.start <= COMPRESSED_GROUP_MAX) {
        g.end = Math.max(g.end, end);
        g.members.push(r);
      } else {
        g = { start: r.host, end, members: [r] };
        groups.push(g);
      }
    }
    await Promise.all(
      groups.map(async (group) => {
        if (group.members.length < 2) return; // read by decompress() itself
        const length = group.end - group.start;
        const toWorkers = group.members.length >= WORKER_MIN_CLUSTERS && this.workersDecode && workersReady();
        // Shared memory when the workers read it (no copy); not zero-filled first either way:
        // BlockFile.read fills the whole buffer (zeros past the end of the file).
        const shared = toWorkers ? takeShared(length <= COMPRESSED_GROUP_MAX ? COMPRESSED_GROUP_MAX : length) : null;
        const bytes = shared ? new Uint8Array(shared, 0, length) : Buffer.allocUnsafe(length);
        await this.file.read(bytes, group.start);
        // The calling thread's share (the first clusters, which fill() reaches first) decodes
        // here while the workers decode the rest; copied out of the shared buffer, which goes
        // back to be reused once the workers are done with it.
        const own = shared ? Math.ceil(group.members.length / (poolSize() + 1)) : group.members.length;
        let ownEnd = 0;
        for (let i = 0; i < own; i++) ownEnd = Math.max(ownEnd, group.members[i]!.host + group.members[i]!.compressedLength - group.start);
        const ownBytes = shared ? bytes.slice(0, ownEnd) : bytes;
        for (let i = 0; i < own; i++) {
          const r = group.members[i]!;
          r.src = ownBytes.subarray(r.host - group.start, r.host - group.start + r.compressedLength);
        }
        if (shared) this.sendBatches(shared, group.start, group.members.slice(own));
      }),
    );
  }

  /** Whether decode workers can decode this image's clusters (zstd: only with Node's own decoder). */
  private get workersDecode(): boolean {
    return this.header.compression === 'zlib' || workerZstd();
  }

  /**
   * Splits a group's members into batches — at most BATCH_BYTES of output each, and at least as
   * many batches as there are workers — and sends each to a decode worker. `src` holds the
   * group's streams from host offset `start`; it is given back once every batch has settled.
   */
  private sendBatches(src: SharedArrayBuffer, start: number, members: Run[]): void {
    const cs = this.g.clusterSize;
    if (members.length === 0) return giveShared(src);
    const perBatch = Math.max(1, Math.min(Math.floor(BATCH_BYTES / cs), Math.ceil(members.length / poolSize())));
    const settled: Promise<unknown>[] = [];
    for (let first = 0; first < members.length; first += perBatch) {
      const batch = members.slice(first, first + perBatch);
      // Full-size batches share a buffer size, so their buffers are reused.
      const out = takeShared(Math.max(batch.length, perBatch) * cs + DECODE_SPARE);
      const sent = decodeBatch(this.header.compression, cs, src, batch.map((r) => r.host - start), batch.map((r) => r.compressedLength), out);
      settled.push(sent);
      const done = sent.then((res) => {
        if (res.ok) return;
        const r = batch[res.index]!;
        const vc = Math.floor((r.guest - r.inCluster) / cs);
        throw clusterFailure(this.path, this.header.compression, this.where(vc, r.host), cs, res.failure);
      });
      // Observed even when an earlier run's failure ends the read before this batch is awaited.
      done.catch(() => {});
      const b: DecodeBatch = { done, out, unread: batch.length };
      batch.forEach((r, i) => {
        r.batch = b;
        r.batchIndex = i;
      });
    }
    // A worker that died may still be reading it: given back only when every batch succeeded.
    Promise.all(settled).then(() => giveShared(src), () => {});
  }

  private where(vc: number, host: number): string {
    const cs = this.g.clusterSize;
    return `of guest cluster ${vc} (offset ${vc * cs}, data at ${host})`;
  }

  /** The compressed stream of `r`: as read ahead with its neighbours, else read now on its own. */
  private async streamOf(r: Run): Promise<Uint8Array> {
    if (r.src) return r.src;
    const src = Buffer.allocUnsafe(r.compressedLength);
    await this.file.read(src, r.host);
    return src;
  }

  /** One whole compressed cluster, decompressed into `dst`. */
  private async decompressInto(r: Run, dst: Uint8Array): Promise<void> {
    const src = await this.streamOf(r);
    const vc = Math.floor(r.guest / this.g.clusterSize);
    await decompressClusterInto(this.path, this.header.compression, src, this.g.clusterSize, this.where(vc, r.host), dst);
  }

  /** One compressed cluster, decompressed; kept in a small cache for reads of its other parts. */
  private decompress(r: Run): Promise<Uint8Array> {
    const key = r.host;
    const cached = this.decompressed.get(key);
    if (cached) {
      this.decompressed.delete(key);
      this.decompressed.set(key, cached);
      return cached;
    }
    const cs = this.g.clusterSize;
    const p = (async () => {
      const src = await this.streamOf(r);
      const vc = Math.floor((r.guest - r.inCluster) / cs);
      return decompressCluster(this.path, this.header.compression, src, cs, this.where(vc, r.host));
    })();
    this.decompressed.set(key, p);
    while (this.decompressed.size > this.maxDecompressed) this.decompressed.delete(this.decompressed.keys().next().value!);
    p.catch(() => {
      if (this.decompressed.get(key) === p) this.decompressed.delete(key);
    });
    return p;
  }
}



/** A name stored in `image` (backing or data file), resolved as QEMU does: relative to the image's directory. */
function resolveStoredName(image: string, name: string, what: string): string {
  let n = name;
  if (n.startsWith('file:')) n = n.slice(5);
  else if (PROTOCOLS.test(n)) throw new FvdError(`${image}: ${what} '${name}' is not a local file (QEMU protocol or options); fvd reads local files only`, 'EINVAL');
  if (n.length === 0 || n.includes('\0')) throw corruptQcow2(image, `${what} name '${name}' is not a file name`);
  // A template reached by URL (a remote base): its backing and data files are relative to it.
  if (isUrl(image)) return new URL(n, image).href;
  return path.resolve(path.dirname(image), n);
}

async function openRelative(io: IoBackend, image: string, name: string, what: string): Promise<BlockFile> {
  const resolved = resolveStoredName(image, name, what);
  try {
    return await io.open(resolved, { readOnly: true, lock: 'shared' });
  } catch (err) {
    throw namedOpenError(image, what, name, resolved, err);
  }
}

function namedOpenError(image: string, what: string, name: string, resolved: string, err: unknown): FvdError {
  const e = err as NodeJS.ErrnoException;
  if (err instanceof FvdError) return err;
  if (e.code === 'ENOENT') return new FvdError(`${image}: ${what} '${name}' not found (looked for ${resolved})`, 'ENOENT');
  return new FvdError(`${image}: ${what} '${name}' cannot be opened: ${e.message}`, 'EIO');
}

/** The backing file in the format the image records; QEMU's probing is never imitated. */
async function openBacking(io: IoBackend, image: string, h: Qcow2Header, chain: string[], options: Qcow2OpenOptions): Promise<ReadOnlyLayer> {
  const name = h.backingFile!;
  const fmt = h.backingFormat;
  if (fmt === null)
    throw new FvdError(
      `${image}: qcow2 image names backing file '${name}' without its format (QEMU would probe it; fvd does not): record it with 'qemu-img rebase -u -b ${name} -F raw|qcow2 ${image}'`,
      'EINVAL',
    );
  if (fmt !== 'raw' && fmt !== 'qcow2') throw new FvdError(`${image}: backing file '${name}' has format '${fmt}', which fvd does not read (raw or qcow2)`, 'EINVAL');
  const resolved = resolveStoredName(image, name, 'backing file');
  if (chain.includes(resolved)) throw new FvdError(`base chain loop: '${resolved}' is its own backing file`, 'EINVAL');
  if (fmt === 'qcow2') {
    try {
      return await Qcow2Image.open(io, resolved, { ...options, chain });
    } catch (err) {
      throw namedOpenError(image, 'backing file', name, resolved, err);
    }
  }
  if (chain.length >= MAX_QCOW2_CHAIN) throw new FvdError(`base chain longer than ${MAX_QCOW2_CHAIN} images (at '${resolved}')`, 'EINVAL');
  return new RawLayer(resolved, await openRelative(io, image, name, 'backing file'));
}

/** A raw file at the bottom of a qcow2 chain: its size is the file's; holes are known zero. */
class RawLayer implements ReadOnlyLayer {
  readonly size: number;
  constructor(
    private readonly path: string,
    private readonly file: BlockFile,
  ) {
    this.size = file.size();
  }
  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.file.read(buf, offset);
  }
  async knownZero(offset: number, length: number): Promise<boolean> {
    if (offset >= this.file.size()) return true;
    const next = this.file.nextData?.(offset);
    return next !== undefined && next !== null && next >= offset + length;
  }
  async nextDataExtent(offset: number): Promise<DataExtent | null> {
    return fileDataExtent(this.file, offset);
  }
  close(): Promise<void> {
    return this.file.close();
  }
  fileIds(): string[] {
    return this.file.fileId ? [this.file.fileId] : [];
  }
  describe(): ChainEntry[] {
    return [{ path: this.path, format: 'raw', size: this.size }];
  }
}
