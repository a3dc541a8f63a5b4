/**
 * Raw deflate (qcow2's zlib clusters) decoded synchronously into a buffer the caller gives, by one
 * decoder reused for every stream of this thread.
 *
 * Why: zlib.inflateRawSync builds a new inflate context for each call (inflateInit: a 32 KiB
 * window and its state) and a new output buffer (fresh memory: page faults), which together cost
 * about as much CPU as the inflate itself for a 64 KiB cluster (measured: 100 MiB of /usr in
 * 64 KiB streams, user + sys 0.30 s → 0.15 s). node:zlib has no public call for "inflate this
 * into that buffer", so this drives the decoder of one zlib.InflateRaw object the way node's own
 * inflateRawSync does (its handle's writeSync and the object's write state), reset between
 * streams. Those are node internals: when they are not there (another Node), inflateRawInto falls
 * back to inflateRawSync and a copy, the same results at the old cost (allowReusedInflater(false)
 * makes tests take that path).
 */
import zlib from 'node:zlib';

interface ZlibHandle {
  writeSync(flush: number, src: Uint8Array, srcOff: number, srcLen: number, out: Uint8Array, outOff: number, outLen: number): void;
  onerror: (message: string, errno: number, code?: string) => void;
}

interface Reused {
  z: zlib.InflateRaw;
  handle: ZlibHandle;
  /** [output room left, input left] after each writeSync, written by node. */
  state: Uint32Array;
}

let reused: Reused | null = null;
let reuseAllowed = true;
/** The error the decoder reported during the current writeSync (its onerror runs synchronously). */
let failure: Error | null = null;

/** For tests: false takes the inflateRawSync path, as on a Node whose internals differ. */
export function allowReusedInflater(on: boolean): void {
  reuseAllowed = on;
  reused = null;
}

function decoder(): Reused | null {
  if (reused || !reuseAllowed) return reused;
  const z = zlib.createInflateRaw();
  const handle = (z as unknown as { _handle?: ZlibHandle })._handle;
  const state = (z as unknown as { _writeState?: unknown })._writeState;
  if (typeof handle?.writeSync !== 'function' || !(state instanceof Uint32Array) || state.length < 2) {
    reuseAllowed = false;
    z.close();
    return null;
  }
  // Replaces node's handler, which would destroy the object (and emit 'error' later).
  handle.onerror = (message, errno, code) => {
    failure = Object.assign(new Error(message), { errno, code });
  };
  reused = { z, handle, state };
  return reused;
}

/**
 * Inflates the raw deflate stream at the start of `src` into out[at, at + room); returns the
 * bytes produced. Bytes after the end of the stream are not read. `room` bytes produced means
 * the stream had more to give (the caller's "too long"); a stream that fails or ends early throws
 * zlib's own error.
 */
export function inflateRawInto(src: Uint8Array, out: Uint8Array, at: number, room: number): number {
  const d = decoder();
  if (!d) {
    let b: Buffer;
    try {
      b = zlib.inflateRawSync(src, { maxOutputLength: room - 1, chunkSize: room });
    } catch (err) {
      if ((err as { code?: string }).code === 'ERR_BUFFER_TOO_LARGE') return room;
      throw err;
    }
    out.set(b, at);
    return b.length;
  }
  failure = null;
  d.z.reset();
  d.handle.writeSync(zlib.constants.Z_FINISH, src, 0, src.length, out, at, room);
  const f = failure as Error | null;
  if (f) {
    // Not reused after an error: a fresh decoder next time.
    failure = null;
    reused = null;
    d.z.close();
    throw f;
  }
  return room - d.state[0]!;
}
