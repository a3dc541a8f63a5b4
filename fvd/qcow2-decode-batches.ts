/**
 * A decode worker's loop (qcow2-decode-pool.ts): decodes batches of compressed qcow2 clusters, one
 * message per batch, from shared memory into shared memory (whole clusters, in order). A cluster
 * that does not decode ends the batch with its index and why; the caller names it in the error.
 * The worker's entry module calls serveDecodeBatches with its zstd decoder: the engine's own entry
 * (qcow2-decode-worker.ts) with Node's, a program's with the decoder it registered.
 */
import { parentPort } from 'node:worker_threads';
import { decodeClusterSync, type SyncZstdDecoder } from './qcow2-decompress.js';
import type { BatchReply, BatchRequest } from './qcow2-decode-pool.js';

function decodeBatch(req: BatchRequest, zstdInto: SyncZstdDecoder | null): BatchReply {
  const cs = req.clusterSize;
  // A test's stand-in for a worker that crashes.
  if (req.exitForTest) process.exit(req.exitForTest);
  const zstd = req.type === 'zstd' ? zstdInto : null;
  const src = new Uint8Array(req.src);
  const out = new Uint8Array(req.out);
  // In order: a cluster's spare output room is the next one's slot (or the room after the last).
  for (let i = 0; i < req.starts.length; i++) {
    const failure = decodeClusterSync(req.type, src.subarray(req.starts[i]!, req.starts[i]! + req.lengths[i]!), cs, zstd, out, i * cs);
    if (failure) return { id: req.id, index: i, failure };
  }
  return { id: req.id };
}

/** Serves batches on this worker with `zstdInto` for zstd clusters, after saying it is ready. */
export function serveDecodeBatches(zstdInto: SyncZstdDecoder | null): void {
  parentPort!.on('message', (req: BatchRequest) => parentPort!.postMessage(decodeBatch(req, zstdInto)));
  parentPort!.postMessage({ ready: true } satisfies BatchReply);
}
