/**
 * The CLI's qcow2 decode worker (the CLI registers it on every Node): the engine's loop with
 * Node's own zstd, or where Node has none the WebAssembly decoder (zstd-wasm.ts, imported only
 * then, and compiled before the worker says it is ready).
 */
import { serveDecodeBatches } from '../fvd/qcow2-decode-batches.js';
import { nodeZstdInto, type SyncZstdDecoder } from '../fvd/qcow2-decompress.js';

serveDecodeBatches(nodeZstdInto ?? ((await import('./zstd-wasm.js')) as { zstdFrameInto: SyncZstdDecoder }).zstdFrameInto);
