/**
 * A decode worker (qcow2-decode-pool.ts): decodes batches of compressed qcow2 clusters, one
 * message per batch, from shared memory into shared memory (whole clusters, in order). A cluster
 * that does not decode ends the batch with its index and why; the caller names it in the error.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { decodeClusterSync, nodeZstdInto, type SyncZstdDecoder } from './qcow2-decompress.js';
import type { BatchReply, BatchRequest, DecodeWorkerData } from './qcow2-decode-pool.js';

/** The registered zstd decoder module's decoder (import() caches the module). */
async function importZstd(module: string): Promise<SyncZstdDecoder> {
  return ((await import(module)) as { zstdFrameInto: SyncZstdDecoder }).zstdFrameInto;
}

// zstd: Node's own, else the module the program registered, loaded before the worker says it is
// ready; a batch naming a module this worker was not started with loads it first (a decoder
// registered after the worker started).
const startModule = (workerData as DecodeWorkerData | null)?.zstdModule ?? null;
let zstdInto: SyncZstdDecoder | null = nodeZstdInto ?? (startModule ? await importZstd(startModule) : null);

function decodeBatch(req: BatchRequest): BatchReply {
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

parentPort!.on('message', async (req: BatchRequest) => {
  if (req.type === 'zstd' && !zstdInto && req.zstdModule) {
    try {
      zstdInto = await importZstd(req.zstdModule);
    } catch (err) {
      return parentPort!.postMessage({ id: req.id, index: 0, failure: { detail: `the zstd decoder did not load: ${String(err).replace(/\s+/g, ' ')}` } } satisfies BatchReply);
    }
  }
  parentPort!.postMessage(decodeBatch(req));
});
parentPort!.postMessage({ ready: true } satisfies BatchReply);
