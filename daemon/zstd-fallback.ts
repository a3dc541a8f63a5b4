/**
 * zstd for Node versions whose node:zlib has none (Node 20; zstdDecompress came in 22.15/23.8):
 * registers zstd-wasm.ts (zstd's own decoder compiled to WebAssembly) with the engine, which
 * imports no packages itself. Loaded only when a zstd-compressed qcow2 image is opened, on the
 * calling thread and in each decode worker. Where Node has its own zstd, the engine uses that.
 */
import { registerZstdDecoder, type SyncZstdDecoder } from '../fvd/qcow2-decompress.js';

const WASM_MODULE = new URL('./zstd-wasm.js', import.meta.url).href;

export function registerZstdFallback(): void {
  registerZstdDecoder({
    load: async () => ((await import(WASM_MODULE)) as { zstdFrameInto: SyncZstdDecoder }).zstdFrameInto,
    workerModule: WASM_MODULE,
  });
}
