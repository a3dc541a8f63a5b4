/**
 * What every remote base source (HTTP, NBD) shares: it is a BlockFile that is never written.
 * A base is read-only by definition (FORMAT.md §2), so any write-side call reaching a remote
 * source is a bug above it; it fails with EROFS naming the source instead of being attempted.
 */
import type { BlockFile } from '../fvd/io.js';
import { FvdError } from '../fvd/errors.js';

export abstract class ReadOnlySource implements Partial<BlockFile> {
  readonly isBlockDevice = false;
  readonly readOnly = true;
  readonly remote = true;
  /** The source as users name it (URL or NBD URI, credentials redacted). */
  abstract readonly path: string;

  async write(): Promise<void> {
    throw this.readOnlyError();
  }
  /** Nothing is ever written, so there is nothing to make durable. */
  async flush(): Promise<void> {}
  async zeroRange(): Promise<void> {
    throw this.readOnlyError();
  }
  async truncate(): Promise<void> {
    throw this.readOnlyError();
  }

  private readOnlyError(): FvdError {
    return new FvdError(`${this.path}: a remote base is read-only`, 'EROFS');
  }
}
