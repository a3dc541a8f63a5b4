/**
 * zstd for Node versions whose node:zlib has none (Node 20; zstdDecompress came in 22.15/23.8):
 * registers zstd-wasm.ts (zstd's own decoder compiled to WebAssembly) with the engine, which
 * imports no packages itself: loaded on the calling thread when a zstd-compressed qcow2 image is
 * first opened, and in decode workers through their entry, zstd-decode-worker.ts. Where Node has
 * its own zstd, the engine uses that.
 */
import { registerZstdDecoder, type SyncZstdDecoder } from '../fvd/qcow2-decompress.js';

export function registerZstdFallback(): void {
  registerZstdDecoder({
    load: async () => ((await import('./zstd-wasm.js')) as { zstdFrameInto: SyncZstdDecoder }).zstdFrameInto,
    worker: new URL('./zstd-decode-worker.js', import.meta.url),
  });
}
