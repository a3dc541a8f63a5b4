/**
 * Storage that fails the way a disk or a full file system under an image fails, for engine tests
 * (the device suite does the same for real, with dm-flakey and a small file system: tests/vm/e2e/
 * 12-faults.sh). FaultyIo wraps a MemIo; per file (resolved path) a test switches on:
 *
 *  - `readEio`: every read rejects with EIO;
 *  - `writeEio`: every write and zeroRange rejects with EIO (nothing changes);
 *  - `failFlushes`: that many next flushes reject with EIO, and — as Linux does when writeback
 *    fails — the writes since the last successful flush are lost (their bytes are put back as they
 *    were before them), while a later flush may succeed again;
 *  - `full`: the file system is full: a write or zeroRange touching a 4 KiB page that was never
 *    written (a hole, or past the end) rejects with ENOSPC and changes nothing; pages already
 *    written can be overwritten (a non-copy-on-write file system allocates once).
 */
import type { BlockFile, IoBackend, OpenOptions } from '../../fvd/io.js';
import { MemIo } from './mem-io.js';

const PAGE = 4096;

export interface Faults {
  readEio: boolean;
  writeEio: boolean;
  failFlushes: number;
  full: boolean;
}

class ErrnoError extends Error {
  constructor(
    readonly code: string,
    what: string,
  ) {
    super(`${code}: ${what}`);
  }
}

/** Per file: the pages ever written, and the undo log of writes since the last good flush. */
class FileState {
  readonly faults: Faults = { readEio: false, writeEio: false, failFlushes: 0, full: false };
  readonly allocated = new Set<number>();
  undo: { offset: number; before: Uint8Array; sizeBefore: number }[] = [];
  lostWrites = 0;
}

class FaultyFile implements BlockFile {
  constructor(
    private readonly inner: BlockFile,
    private readonly st: FileState,
  ) {}
  get path(): string {
    return this.inner.path;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get isBlockDevice(): boolean {
    return this.inner.isBlockDevice;
  }
  async read(buf: Uint8Array, offset: number): Promise<void> {
    if (this.st.faults.readEio) throw new ErrnoError('EIO', `read ${this.path} at ${offset}`);
    return this.inner.read(buf, offset);
  }
  private needsSpace(offset: number, length: number): boolean {
    for (let p = Math.floor(offset / PAGE); p * PAGE < offset + length; p++) if (!this.st.allocated.has(p)) return true;
    return false;
  }
  private async recordUndo(offset: number, length: number): Promise<void> {
    const before = new Uint8Array(length);
    await this.inner.read(before, offset);
    this.st.undo.push({ offset, before, sizeBefore: this.inner.size() });
  }
  private allocate(offset: number, length: number): void {
    for (let p = Math.floor(offset / PAGE); p * PAGE < offset + length; p++) this.st.allocated.add(p);
  }
  async write(buf: Uint8Array, offset: number): Promise<void> {
    if (this.st.faults.writeEio) throw new ErrnoError('EIO', `write ${this.path} at ${offset}`);
    if (this.st.faults.full && this.needsSpace(offset, buf.length)) throw new ErrnoError('ENOSPC', `write ${this.path} at ${offset}: no space left on device`);
    await this.recordUndo(offset, buf.length);
    await this.inner.write(buf, offset);
    this.allocate(offset, buf.length);
  }
  async zeroRange(offset: number, length: number): Promise<void> {
    if (this.st.faults.writeEio) throw new ErrnoError('EIO', `zeroRange ${this.path} at ${offset}`);
    await this.recordUndo(offset, Math.max(0, Math.min(length, this.inner.size() - offset)));
    await this.inner.zeroRange(offset, length);
  }
  async flush(): Promise<void> {
    if (this.st.faults.failFlushes > 0) {
      this.st.faults.failFlushes--;
      // Writeback failed: the dirty data since the last good flush is gone.
      for (const u of this.st.undo.reverse()) {
        await this.inner.write(u.before, u.offset);
        if (this.inner.size() > u.sizeBefore) await this.inner.truncate(u.sizeBefore);
      }
      this.st.lostWrites += this.st.undo.length;
      this.st.undo = [];
      throw new ErrnoError('EIO', `fdatasync ${this.path}`);
    }
    await this.inner.flush();
    this.st.undo = [];
  }
  size(): number {
    return this.inner.size();
  }
  async truncate(length: number): Promise<void> {
    if (this.st.faults.writeEio) throw new ErrnoError('EIO', `truncate ${this.path}`);
    const size = this.inner.size();
    if (length < size) await this.recordUndo(length, size - length);
    else this.st.undo.push({ offset: size, before: new Uint8Array(0), sizeBefore: size });
    await this.inner.truncate(length);
  }
  nextData(offset: number): number | null {
    return this.inner.nextData ? this.inner.nextData(offset) : null;
  }
  nextHole(offset: number): number | null {
    return this.inner.nextHole ? this.inner.nextHole(offset) : null;
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

export class FaultyIo implements IoBackend {
  private readonly files = new Map<string, FileState>();
  constructor(readonly mem: MemIo = new MemIo()) {}

  private state(p: string): FileState {
    const k = MemIo.key(p);
    let st = this.files.get(k);
    if (!st) {
      st = new FileState();
      // What exists already is allocated.
      if (this.mem.exists(p)) for (let pg = 0; pg * PAGE < this.mem.readFile(p).length; pg++) st.allocated.add(pg);
      this.files.set(k, st);
    }
    return st;
  }

  /** The fault switches of a file. */
  faults(p: string): Faults {
    return this.state(p).faults;
  }

  /** Writes undone by failed flushes so far. */
  lostWrites(p: string): number {
    return this.state(p).lostWrites;
  }

  async open(p: string, options: OpenOptions = {}): Promise<BlockFile> {
    const st = this.state(p);
    const inner = await this.mem.open(p, options);
    if (options.create) st.allocated.clear();
    return new FaultyFile(inner, st);
  }
}
