/** An IoBackend wrapper for tests that bound how much of one file (a base) an operation reads. */
import path from 'node:path';
import type { BlockFile, IoBackend, OpenOptions } from '../../fvd/io.js';

/** Counts the bytes read from one file (by resolved path) through an IoBackend. */
export class ReadCounter implements IoBackend {
  bytes = 0;
  reads = 0;
  constructor(
    private readonly inner: IoBackend,
    private readonly target: string,
  ) {}
  async open(p: string, options?: OpenOptions): Promise<BlockFile> {
    const f = await this.inner.open(p, options);
    if (path.resolve(p) !== path.resolve(this.target)) return f;
    const read = f.read.bind(f);
    f.read = async (buf: Uint8Array, offset: number) => {
      this.bytes += buf.length;
      this.reads++;
      await read(buf, offset);
    };
    return f;
  }
}
