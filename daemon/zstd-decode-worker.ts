/**
 * The CLI's qcow2 decode worker where Node has no zstd of its own: the engine's loop with the
 * WebAssembly decoder (zstd-wasm.ts, compiled before the worker says it is ready).
 */
import { serveDecodeBatches } from '../fvd/qcow2-decode-batches.js';
import { nodeZstdInto } from '../fvd/qcow2-decompress.js';
import { zstdFrameInto } from './zstd-wasm.js';

serveDecodeBatches(nodeZstdInto ?? zstdFrameInto);
