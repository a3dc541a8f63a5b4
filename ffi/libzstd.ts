/**
 * zstd frames decoded by the system's libzstd (libzstd.so.1, which dpkg itself depends on, so
 * every Debian system has it) through koffi: for Node versions whose node:zlib has no zstd (Node
 * 20). One decompression context per thread, reused for every frame, and the output written
 * straight into the caller's buffer (no copy; the WebAssembly build used before allocated and
 * copied per frame). On Node 20, 64 MiB of the Node binary in 64 KiB frames decoded on one core
 * at ~860 MiB/s this way, against 250–390 MiB/s for zstd compiled to WebAssembly (README, "qcow2
 * templates").
 */
import { loadKoffi } from './koffi.js';

/** Decodes the complete frame into out[at, at + room); returns the bytes produced. */
export type FrameInto = (frame: Uint8Array, out: Uint8Array, at: number, room: number) => number;

/**
 * Opens `library` (libzstd.so.1 unless a test names another) and returns this thread's decoder.
 * Throws a one-line error when koffi or the library cannot be loaded.
 */
export function openLibzstd(library = 'libzstd.so.1'): FrameInto {
  let lib: { func(decl: string): (...args: any[]) => any };
  try {
    lib = loadKoffi().load(library);
  } catch (err) {
    throw new Error(`cannot load ${library}: ${(err as Error).message.split('\n')[0]}`);
  }
  const createDCtx = lib.func('void *ZSTD_createDCtx(void)');
  const decompressDCtx = lib.func(
    'size_t ZSTD_decompressDCtx(void *dctx, void *dst, size_t cap, const void *src, size_t size)',
  );
  const isError = lib.func('unsigned int ZSTD_isError(size_t code)');
  const errorName = lib.func('const char *ZSTD_getErrorName(size_t code)');
  // Lives as long as the thread: decode workers and the CLI keep their decoder to the end.
  const dctx = createDCtx();
  if (!dctx) throw new Error(`${library}: ZSTD_createDCtx failed`);
  return (frame, out, at, room) => {
    // koffi passes a view's own start (byteOffset included) as the pointer; the capacity is the
    // view's length, never `room` alone: zstd must not write past the end of `out`.
    const dst = out.subarray(at, at + room);
    const n = decompressDCtx(dctx, dst, dst.length, frame, frame.length);
    // Errors are the top size_t values (koffi returns them as BigInt), never a byte count.
    if (isError(n)) throw new Error(`zstd: ${errorName(n)}`);
    return n as number;
  };
}
