/**
 * One zstd frame decoded by zstd's reference decoder compiled to WebAssembly (the zstddec
 * package: MIT and BSD-3-Clause, no dependencies), for Node versions without node:zlib's zstd.
 * Imported on demand (zstd-fallback.ts), by the main thread and by qcow2 decode workers; the
 * module's top-level await compiles the WebAssembly once per thread.
 *
 * Why this decoder: on Node 20, 64 MiB of a Node binary in 64 KiB frames decoded at 250–390
 * MiB/s against 80–115 MiB/s for the pure-JavaScript fzstd used before (README, "qcow2 templates").
 */
import { ZSTDDecoder } from 'zstddec';

const decoder = new ZSTDDecoder();
await decoder.init();

/**
 * Decodes the complete frame `frame` into out[at, at + room); returns the bytes produced. zstddec
 * gives back an empty array when zstd reports an error (a corrupt frame, or more than `room`
 * bytes of content): that is thrown, as a frame holding no data cannot be one of a qcow2 cluster.
 */
export function zstdFrameInto(frame: Uint8Array, out: Uint8Array, at: number, room: number): number {
  const piece = decoder.decode(frame, room);
  if (piece.length === 0) throw new Error('the zstd frame does not decode into the room left in the cluster');
  out.set(piece, at);
  return piece.length;
}
