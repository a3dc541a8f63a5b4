/**
 * The engine's decode worker (qcow2-decode-pool.ts): zlib, and zstd with Node's own decoder where
 * it has one. A program that registers a zstd decoder names its own entry instead (ZstdProvider).
 */
import { nodeZstdInto } from './qcow2-decompress.js';
import { serveDecodeBatches } from './qcow2-decode-batches.js';

serveDecodeBatches(nodeZstdInto);
