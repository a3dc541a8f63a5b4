/**
 * After a failed flush nothing more may become durable (docs/FORMAT.md §7, "A failed flush").
 *
 * When fdatasync fails (the disk under the image returned EIO, the file system under it shut
 * down), Linux marks the dirty pages whose writeback failed clean: their data may be gone, and the
 * next fdatasync on the file can succeed — the error is reported once. A journal commit or a
 * checkpoint after that would make metadata durable that exposes lost data (a bitmap bit for a
 * block whose copy never reached the disk: the block would read as zeros instead of its base
 * data). So the image's file is wrapped in a FlushGuard: the first failed flush fails every later
 * write, zeroRange, truncate and flush with one explanation, and the image is closed without its
 * checkpoint, DIRTY set. The next open replays the journal as it was at the last successful flush:
 * every write acknowledged and flushed before the failure reads back, nothing later is claimed.
 * (PostgreSQL reached the same rule in 2018: a failed fsync is not retried.)
 *
 * A write that fails (ENOSPC from a full file system, EIO) does not poison the file: nothing was
 * accepted into the page cache, the engine sets no metadata for it, and a later write may
 * succeed once there is space again.
 */
import { FvdError } from './errors.js';
import type { BlockFile } from './io.js';

export class FlushGuard implements BlockFile {
  /** The first flush failure, or null. */
  failure: FvdError | null = null;

  constructor(private readonly inner: BlockFile) {}

  get path(): string {
    return this.inner.path;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get isBlockDevice(): boolean {
    return this.inner.isBlockDevice;
  }
  // Every optional member of BlockFile passes through: the engine asks the guarded file for them
  // (a grown LV's new size, the image's file id for own-base checks).
  get fileId(): string | undefined {
    return this.inner.fileId;
  }
  get identity(): string | undefined {
    return this.inner.identity;
  }
  get remote(): boolean | undefined {
    return this.inner.remote;
  }
  refreshSize(): Promise<number> {
    return this.inner.refreshSize ? this.inner.refreshSize() : Promise.resolve(this.inner.size());
  }

  private check(): void {
    if (this.failure) throw this.failure;
  }

  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.inner.read(buf, offset);
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    this.check();
    return this.inner.write(buf, offset);
  }

  async flush(): Promise<void> {
    this.check();
    try {
      await this.inner.flush();
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      this.failure ??= new FvdError(
        `${this.path}: a flush (fdatasync) failed (${e.code ?? e.message}): writes since the last successful flush may be lost, so nothing more is written to the image until it is reopened`,
        'EIO',
      );
      throw err;
    }
  }

  async zeroRange(offset: number, length: number): Promise<void> {
    this.check();
    return this.inner.zeroRange(offset, length);
  }

  size(): number {
    return this.inner.size();
  }

  async truncate(length: number): Promise<void> {
    this.check();
    return this.inner.truncate(length);
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
