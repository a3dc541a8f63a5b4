/**
 * zstd for Node versions whose node:zlib has none (Node 20; zstdDecompress came in 22.15/23.8):
 * registers the system's libzstd (ffi/libzstd.ts) with the engine, which imports nothing outside
 * itself: loaded on the calling thread when a zstd-compressed qcow2 image is first opened, and in
 * decode workers through their entry, zstd-decode-worker.ts. Where Node has its own zstd, the
 * engine uses that.
 */
import { registerZstdDecoder } from '../fvd/qcow2-decompress.js';
import { openLibzstd } from '../ffi/libzstd.js';

export function registerZstdFallback(): void {
  registerZstdDecoder({
    load: async () => openLibzstd(),
    worker: new URL('./zstd-decode-worker.js', import.meta.url),
  });
}
