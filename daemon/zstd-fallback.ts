/**
 * zstd for Node versions whose node:zlib has none (Node 20; zstdDecompress came in 22.15/23.8):
 * registers the pure-JavaScript decoder of the fzstd package with the engine, which imports no
 * packages itself. Where Node has its own zstd, the engine uses that and this decoder is idle.
 * It decodes on the calling thread: one 64 KiB cluster takes well under a millisecond (README,
 * "qcow2 templates").
 */
import { decompress } from 'fzstd';
import { registerZstdDecoder } from '../fvd/qcow2-decompress.js';

export function registerZstdFallback(): void {
  registerZstdDecoder((frame) => decompress(frame));
}
