/**
 * Block-sized copy buffers (a copy-on-write's block, a copy-on-read hint's block), reused instead
 * of allocated per request: a fresh zeroed 64 KiB per copy and the GC it feeds were the main
 * thread's largest self cost in the profile (docs/DESIGN.md §2.3).
 */

/** Buffers kept free: about the copies in flight at once. */
const KEEP = 64;

export class BlockBufferPool {
  private readonly free: Uint8Array[] = [];

  constructor(readonly blockSize: number) {}

  /** A buffer of blockSize bytes; its contents are stale (the caller overwrites what it uses). */
  take(): Uint8Array {
    return this.free.pop() ?? new Uint8Array(this.blockSize);
  }

  /** Gives back a buffer from take(), once no I/O uses it any more. */
  give(buf: Uint8Array): void {
    if (this.free.length < KEEP) this.free.push(buf);
  }
}
