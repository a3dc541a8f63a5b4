/**
 * Raw deflate and zstd (qcow2's compressed clusters) decoded synchronously into a buffer the
 * caller gives, by one decoder of each kind reused for every stream of this thread.
 *
 * Why: zlib.inflateRawSync and zlib.zstdDecompressSync build a new decoder for each call (for
 * deflate a 32 KiB window and its state, for zstd a decompression context) and a new output
 * buffer (fresh memory: page faults), which together cost about as much CPU as the decoding itself
 * for a 64 KiB cluster (measured: 100 MiB of /usr in 64 KiB deflate streams, user + sys 0.30 s →
 * 0.15 s; 64 MiB of a Node binary in 64 KiB zstd frames on Node 24, 151 → 62 ms of CPU). node:zlib
 * has no public call for "decode this into that buffer", so this drives the decoder of one
 * zlib.InflateRaw / zlib.ZstdDecompress object the way node's own *Sync functions do (its handle's
 * writeSync and the object's write state), reset between streams. Those are node internals: when
 * they are not there (another Node), the functions fall back to the *Sync calls and a copy, the
 * same results at the old cost (allowReusedDecoders(false) makes tests take that path).
 */
import zlib from 'node:zlib';

interface ZlibHandle {
  writeSync(flush: number, src: Uint8Array, srcOff: number, srcLen: number, out: Uint8Array, outOff: number, outLen: number): void;
  onerror: (message: string, errno: number, code?: string) => void;
}

type Stream = { reset(): void; close(): void };

/** An open node:zlib stream with the two internals the decoder drives. */
interface LiveDecoder {
  stream: Stream;
  handle: ZlibHandle;
  /** [output room left, input left] after each writeSync, written by node. */
  state: Uint32Array;
}

/** One node:zlib decoder object driven synchronously, or the *Sync call where that cannot be done. */
class ReusedDecoder {
  private live: LiveDecoder | null = null;
  /** The error the decoder reported during the current writeSync (its onerror runs synchronously). */
  private failure: Error | null = null;
  private unusable = false;

  constructor(
    private readonly create: () => Stream,
    private readonly finishFlag: number,
    private readonly fallback: (src: Uint8Array, maxOutputLength: number, chunkSize: number) => Buffer,
  ) {}

  reuse(on: boolean): void {
    this.unusable = !on;
    this.drop();
  }

  private drop(): void {
    this.live?.stream.close();
    this.live = null;
  }

  /**
   * Decodes the stream at the start of `src` into out[at, at + room); returns the bytes produced.
   * `room` bytes produced means the stream had more to give (the caller's "too long"); a stream
   * that fails throws zlib's own error.
   */
  into(src: Uint8Array, out: Uint8Array, at: number, room: number): number {
    if (!this.live && !this.unusable) this.open();
    const live = this.live;
    if (!live) {
      let b: Buffer;
      try {
        b = this.fallback(src, Math.max(1, room - 1), Math.max(64, room));
      } catch (err) {
        if ((err as { code?: string }).code === 'ERR_BUFFER_TOO_LARGE') return room;
        throw err;
      }
      out.set(b, at);
      return b.length;
    }
    this.failure = null;
    live.stream.reset();
    live.handle.writeSync(this.finishFlag, src, 0, src.length, out, at, room);
    const f = this.failure as Error | null;
    if (f) {
      // Not reused after an error: a fresh decoder next time.
      this.failure = null;
      this.drop();
      throw f;
    }
    return room - live.state[0]!;
  }

  private open(): void {
    const stream = this.create();
    const handle = (stream as unknown as { _handle?: ZlibHandle })._handle;
    const state = (stream as unknown as { _writeState?: unknown })._writeState;
    if (typeof handle?.writeSync !== 'function' || !(state instanceof Uint32Array) || state.length < 2) {
      this.unusable = true;
      stream.close();
      return;
    }
    // Replaces node's handler, which would destroy the object (and emit 'error' later).
    handle.onerror = (message, errno, code) => {
      this.failure = Object.assign(new Error(message), { errno, code });
    };
    this.live = { stream, handle, state };
  }
}

const inflater = new ReusedDecoder(
  () => zlib.createInflateRaw(),
  zlib.constants.Z_FINISH,
  (src, maxOutputLength, chunkSize) => zlib.inflateRawSync(src, { maxOutputLength, chunkSize }),
);

type ZstdModule = {
  createZstdDecompress?: () => Stream;
  zstdDecompressSync?: (src: Uint8Array, options: { maxOutputLength: number; chunkSize: number }) => Buffer;
  constants: { ZSTD_e_end?: number };
};
const zstdModule = zlib as unknown as ZstdModule;

/** Whether this Node has its own zstd (node:zlib, Node ≥ 22.15 / 23.8). */
export const hasNodeZstd = typeof zstdModule.createZstdDecompress === 'function' && typeof zstdModule.zstdDecompressSync === 'function';

const zstdDecoder = hasNodeZstd
  ? new ReusedDecoder(
      () => zstdModule.createZstdDecompress!(),
      zstdModule.constants.ZSTD_e_end ?? 2,
      (src, maxOutputLength, chunkSize) => zstdModule.zstdDecompressSync!(src, { maxOutputLength, chunkSize }),
    )
  : null;

/** For tests: false takes the *Sync paths, as on a Node whose internals differ. */
export function allowReusedDecoders(on: boolean): void {
  inflater.reuse(on);
  zstdDecoder?.reuse(on);
}

/**
 * Inflates the raw deflate stream at the start of `src` into out[at, at + room); returns the
 * bytes produced. Bytes after the end of the stream are not read. `room` bytes produced means
 * the stream had more to give (the caller's "too long"); a stream that fails or ends early throws
 * zlib's own error.
 */
export function inflateRawInto(src: Uint8Array, out: Uint8Array, at: number, room: number): number {
  return inflater.into(src, out, at, room);
}

/**
 * Decodes the one complete zstd frame `frame` (delimited by the caller) into out[at, at + room)
 * with Node's own zstd; returns the bytes produced, `room` meaning the frame had more to give. A
 * frame that fails throws zstd's error. Only where hasNodeZstd.
 */
export function zstdFrameInto(frame: Uint8Array, out: Uint8Array, at: number, room: number): number {
  if (!zstdDecoder) throw new Error(`Node ${process.versions.node} has no zstd decoder`);
  return zstdDecoder.into(frame, out, at, room);
}
