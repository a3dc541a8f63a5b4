/**
 * The CLI's qcow2 decode worker (the CLI registers it on every Node): the engine's loop with
 * Node's own zstd, or where Node has none the system's libzstd (ffi/libzstd.ts), opened at the
 * first zstd frame, so workers reading zlib templates never load it. The calling thread opened it
 * before any zstd batch was sent here (prepareCompression), so it opens here too.
 */
import { serveDecodeBatches } from '../fvd/qcow2-decode-batches.js';
import { nodeZstdInto, type SyncZstdDecoder } from '../fvd/qcow2-decompress.js';
import { openLibzstd } from '../ffi/libzstd.js';

let libzstd: SyncZstdDecoder | null = null;
const libzstdInto: SyncZstdDecoder = (frame, out, at, room) =>
  (libzstd ??= openLibzstd())(frame, out, at, room);

serveDecodeBatches(nodeZstdInto ?? libzstdInto);
