/**
 * An in-memory IoBackend for fast tests: files are growable byte arrays keyed by resolved path,
 * with sparse semantics (bytes past the end read as zeros).
 *
 * Optional deterministic completion reordering (in the spirit of FVD's blksim): given an Rng, every
 * operation waits a random number of microtask turns (and sometimes a macrotask turn) before it
 * takes effect and completes, so concurrent requests interleave differently per seed but exactly
 * the same way for the same seed. A write copies the caller's buffer when it takes effect, not when
 * it is submitted (like io_uring), so an engine that reuses a buffer before the write completes is
 * caught.
 */
import path from 'node:path';
import type { BlockFile, IoBackend, OpenOptions } from '../../fvd/io.js';
import type { Rng } from './rng.js';

export interface MemIoOptions {
  /** Enables completion reordering driven by this generator. */
  rng?: Rng;
  /** Largest number of microtask turns an operation is delayed (default 8). */
  maxTurns?: number;
  /** Probability that an operation additionally waits one macrotask turn (default 0.1). */
  macroTurnChance?: number;
  /** Answer BlockFile.nextData (SEEK_DATA), treating zero bytes as holes; else it says null. */
  seekData?: boolean;
}

/** One stored file. */
export class MemData {
  buf: Uint8Array;
  size: number;
  /** Advisory locks held by open handles (flock semantics). */
  exclusiveLocks = 0;
  sharedLocks = 0;
  constructor(initial?: Uint8Array) {
    this.size = initial ? initial.length : 0;
    this.buf = new Uint8Array(Math.max(4096, this.size));
    if (initial) this.buf.set(initial);
  }
  private ensure(cap: number): void {
    if (cap <= this.buf.length) return;
    let n = this.buf.length;
    while (n < cap) n *= 2;
    const nb = new Uint8Array(n);
    nb.set(this.buf.subarray(0, this.size));
    this.buf = nb;
  }
  read(dst: Uint8Array, offset: number): void {
    const end = offset + dst.length;
    const avail = Math.max(0, Math.min(end, this.size) - offset);
    if (avail > 0) dst.set(this.buf.subarray(offset, offset + avail));
    dst.fill(0, Math.max(avail, 0));
  }
  write(src: Uint8Array, offset: number): void {
    const end = offset + src.length;
    this.ensure(end);
    this.buf.set(src, offset);
    if (end > this.size) this.size = end;
  }
  /** Hole punch with KEEP_SIZE semantics: never changes the size. */
  zero(offset: number, length: number): void {
    const end = Math.min(offset + length, this.size);
    if (end > offset) this.buf.fill(0, offset, end);
  }
  truncate(length: number): void {
    if (length < this.size) {
      this.buf.fill(0, length, this.size);
    } else {
      this.ensure(length);
    }
    this.size = length;
  }
  /** The first non-zero byte at or after `offset`, or size: zero bytes stand for holes. */
  nextNonZero(offset: number): number {
    for (let i = offset; i < this.size; i++) if (this.buf[i] !== 0) return i;
    return Math.max(offset, this.size);
  }
  /**
   * SEEK_HOLE as a file system answers it: the start of the first all-zero 4 KiB page (or the
   * end) at or after `offset`, so holes are whole pages like a real file's, never single bytes.
   */
  nextZeroPage(offset: number): number {
    for (let p = offset - (offset % 4096); p < this.size; p += 4096) {
      const end = Math.min(p + 4096, this.size);
      let zero = true;
      for (let i = p; i < end && zero; i++) zero = this.buf[i] === 0;
      if (zero) return Math.max(p, offset);
    }
    return Math.max(offset, this.size);
  }
  /** A copy of the contents (exactly `size` bytes). */
  contents(): Uint8Array {
    return this.buf.slice(0, this.size);
  }
  clone(): MemData {
    return new MemData(this.contents());
  }
}

export class IoError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
    this.name = 'IoError';
  }
}

function checkRange(what: string, p: string, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new IoError(`${p}: ${what} with a bad range (offset ${offset}, length ${length})`, 'EINVAL');
  }
}

export interface MemIoStats {
  opens: number;
  reads: number;
  writes: number;
  zeroRanges: number;
  flushes: number;
  truncates: number;
  bytesWritten: number;
}

class MemFile implements BlockFile {
  private closed = false;
  readonly isBlockDevice = false;
  constructor(
    private readonly io: MemIo,
    private readonly data: MemData,
    readonly path: string,
    readonly readOnly: boolean,
    private readonly lock?: 'exclusive' | 'shared',
  ) {}

  private live(what: string): void {
    if (this.closed) throw new IoError(`${this.path}: ${what} after close`, 'EBADF');
  }
  private writable(what: string): void {
    this.live(what);
    if (this.readOnly) throw new IoError(`${this.path}: ${what} on a read-only file`, 'EBADF');
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    this.live('read');
    checkRange('read', this.path, offset, buf.length);
    this.io.stats.reads++;
    await this.io.turns();
    this.live('read (completion)');
    this.data.read(buf, offset);
  }
  async write(buf: Uint8Array, offset: number): Promise<void> {
    this.writable('write');
    checkRange('write', this.path, offset, buf.length);
    this.io.stats.writes++;
    this.io.stats.bytesWritten += buf.length;
    await this.io.turns();
    this.live('write (completion)');
    this.data.write(buf, offset);
  }
  async flush(): Promise<void> {
    this.writable('flush');
    this.io.stats.flushes++;
    await this.io.turns();
  }
  async zeroRange(offset: number, length: number): Promise<void> {
    this.writable('zeroRange');
    checkRange('zeroRange', this.path, offset, length);
    this.io.stats.zeroRanges++;
    await this.io.turns();
    this.live('zeroRange (completion)');
    this.data.zero(offset, length);
  }
  size(): number {
    this.live('size');
    return this.data.size;
  }
  nextData(offset: number): number | null {
    this.live('nextData');
    return this.io.seekData ? this.data.nextNonZero(offset) : null;
  }
  nextHole(offset: number): number | null {
    this.live('nextHole');
    return this.io.seekData ? this.data.nextZeroPage(offset) : null;
  }
  async truncate(length: number): Promise<void> {
    this.writable('truncate');
    checkRange('truncate', this.path, 0, length);
    this.io.stats.truncates++;
    await this.io.turns();
    this.data.truncate(length);
  }
  async close(): Promise<void> {
    this.live('close');
    this.closed = true;
    this.io.openCount--;
    if (this.lock === 'exclusive') this.data.exclusiveLocks--;
    else if (this.lock === 'shared') this.data.sharedLocks--;
  }
}

export class MemIo implements IoBackend {
  readonly files = new Map<string, MemData>();
  readonly stats: MemIoStats = {
    opens: 0, reads: 0, writes: 0, zeroRanges: 0, flushes: 0, truncates: 0, bytesWritten: 0,
  };
  /** Number of currently open handles (to detect leaked handles). */
  openCount = 0;
  private readonly rng?: Rng;
  private readonly maxTurns: number;
  private readonly macroChance: number;
  /** See MemIoOptions.seekData. */
  seekData: boolean;

  constructor(options: MemIoOptions = {}) {
    this.seekData = !!options.seekData;
    this.rng = options.rng;
    this.maxTurns = options.maxTurns ?? 8;
    this.macroChance = options.macroTurnChance ?? 0.1;
  }

  static key(p: string): string {
    return path.resolve(p);
  }

  /** Waits a (seeded) random number of turns; always at least one microtask. */
  async turns(): Promise<void> {
    await null;
    const r = this.rng;
    if (!r) return;
    const n = r.int(this.maxTurns + 1);
    for (let i = 0; i < n; i++) await null;
    if (r.chance(this.macroChance)) await new Promise<void>((res) => setImmediate(res));
  }

  async open(p: string, options: OpenOptions = {}): Promise<BlockFile> {
    const key = MemIo.key(p);
    await this.turns();
    let data = this.files.get(key);
    if (!data && !options.create) throw new IoError(`${p}: no such file`, 'ENOENT');
    if (options.create && options.readOnly) throw new IoError(`${p}: create with readOnly`, 'EINVAL');
    // `lock` is newer than some versions of OpenOptions; read it loosely.
    const lock = (options as { lock?: 'exclusive' | 'shared' }).lock;
    if (data && (lock === 'exclusive' ? data.exclusiveLocks + data.sharedLocks > 0 : lock === 'shared' && data.exclusiveLocks > 0)) {
      throw new IoError(`${p}: locked by another open file`, 'EBUSY');
    }
    // create: made if missing, never truncated (the creator empties it after its checks and lock).
    if (options.create && !data) {
      data = new MemData();
      this.files.set(key, data);
    }
    if (lock === 'exclusive') data!.exclusiveLocks++;
    else if (lock === 'shared') data!.sharedLocks++;
    this.stats.opens++;
    this.openCount++;
    return new MemFile(this, data!, p, !!options.readOnly, lock);
  }

  exists(p: string): boolean {
    return this.files.has(MemIo.key(p));
  }
  /** A copy of a file's contents. */
  readFile(p: string): Uint8Array {
    const d = this.files.get(MemIo.key(p));
    if (!d) throw new IoError(`${p}: no such file`, 'ENOENT');
    return d.contents();
  }
  /** Creates or replaces a file (synchronously, outside any reordering). */
  writeFile(p: string, contents: Uint8Array): void {
    this.files.set(MemIo.key(p), new MemData(contents));
  }
  deleteFile(p: string): void {
    this.files.delete(MemIo.key(p));
  }
  /** Copies of every file, keyed by resolved path. */
  snapshot(): Map<string, Uint8Array> {
    const m = new Map<string, Uint8Array>();
    for (const [k, d] of this.files) m.set(k, d.contents());
    return m;
  }
  /** A new backend holding copies of the given files. */
  static fromSnapshot(files: Map<string, Uint8Array>, options: MemIoOptions = {}): MemIo {
    const io = new MemIo(options);
    for (const [k, v] of files) io.files.set(k, new MemData(v.slice()));
    return io;
  }
}
