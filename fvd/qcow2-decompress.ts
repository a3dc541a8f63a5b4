/**
 * Decompression of qcow2 compressed clusters: zlib (raw deflate, QEMU's default) and zstd.
 *
 * A compressed cluster always decompresses to exactly one cluster (QEMU pads the last cluster of
 * a disk whose size is not cluster-aligned). Its descriptor names whole 512-byte sectors, so the
 * bytes handed here usually run past the end of the compressed stream into the next cluster's
 * data: deflate stops at the end of its stream by itself; for zstd the frames are delimited here
 * from their headers (what QEMU's decoder does by decoding frames until the output is full).
 * Anything else — a stream that fails, ends early or produces more or less than one cluster —
 * is an error, never data.
 *
 * Clusters of at most SYNC_DECODE_MAX bytes (QEMU's default 64 KiB) decode on the calling
 * thread: a thread-pool round trip (a zlib stream object, a callback, a second event-loop turn)
 * costs the main thread about as much as inflating the cluster itself, so a template read that
 * way spent twice the CPU. The event loop — which a served device's other requests share — is
 * held only in slices: once SYNC_SLICE_MS of one turn went to decoding, the next cluster waits
 * for the loop to turn (setImmediate, after pending I/O), so decoding blocks the loop for at most
 * SYNC_SLICE_MS plus one cluster's decode (measured: bench/qcow2-decompress.ts, README).
 * They decode there through one reused decoder per kind (decode-into.ts: deflate, and Node's own
 * zstd, node:zlib, Node ≥ 22.15 / 23.8), into one reused buffer. Bulk reads send most of their
 * clusters to decode workers instead (qcow2-decode-pool.ts; decodeClusterSync is their loop, with
 * the same decoders). Larger clusters decode on the libuv thread pool. Node 20 has no zstd; the
 * engine imports no packages, so a program that wants zstd there registers a decoder
 * (registerZstdDecoder; the fvd CLI registers the system's libzstd through koffi), loaded at the
 * first zstd image's open; it decodes on the calling thread, sliced the same way (larger clusters
 * there too, whole), and in decode workers started from the entry it names (ZstdProvider).
 */
import { performance } from 'node:perf_hooks';
import zlib from 'node:zlib';
import { FvdError } from './errors.js';
import { hasNodeZstd, inflateRawInto, zstdFrameInto } from './decode-into.js';
import { corruptQcow2, type CompressionType } from './qcow2-format.js';

/** Decodes one complete zstd frame whose content is at most `maxLength` bytes. */
export type ZstdDecoder = (frame: Uint8Array, maxLength: number) => Uint8Array | Promise<Uint8Array>;
/**
 * Decodes one complete zstd frame synchronously into out[at, at + room): the bytes produced, room
 * meaning "more than that" (decode-into.ts's zstdFrameInto; what decode workers and the calling
 * thread use). A frame that does not decode throws.
 */
export type SyncZstdDecoder = (frame: Uint8Array, out: Uint8Array, at: number, room: number) => number;

type ZstdOptions = { maxOutputLength: number; chunkSize: number };
type NativeZstd = (buf: Uint8Array, options: ZstdOptions, cb: (err: Error | null, out: Buffer) => void) => void;
const nativeZstd = hasNodeZstd ? (zlib as unknown as { zstdDecompress?: NativeZstd }).zstdDecompress : undefined;
/**
 * A zstd decoder for Node versions without node:zlib's (Node's own is used where it exists). The
 * engine imports no packages, so the program brings it (the CLI: daemon/zstd-fallback.ts).
 */
export interface ZstdProvider {
  /** The decoder for the calling thread, loaded when the first zstd image is opened. */
  load(): Promise<SyncZstdDecoder>;
  /**
   * The entry module of decode workers that have the same decoder (it calls serveDecodeBatches,
   * qcow2-decode-batches.ts); null keeps zstd on the calling thread.
   */
  worker: URL | null;
}

let provider: ZstdProvider | null = null;
/** The provider's decoder, once loaded on this thread. */
let providedInto: SyncZstdDecoder | null = null;

/** Registers (or, with null, removes) the zstd decoder for Node versions without their own. */
export function registerZstdDecoder(p: ZstdProvider | null): void {
  provider = p;
  providedInto = null;
}

/** The entry module decode workers start from when a registered decoder brings its own (else null). */
export function zstdWorkerEntry(): URL | null {
  return provider?.worker ?? null;
}

/**
 * Whether decode workers can decode zstd clusters: with Node's own decoder, or the registered
 * one once loaded here. Asked per read, so allowNativeZstd holds.
 */
export function workerZstd(): boolean {
  return (nativeAllowed && nodeZstdInto !== null) || (providedInto !== null && zstdWorkerEntry() !== null);
}

/** Node's own zstd on the calling thread, where it has one (for decode workers). */
export const nodeZstdInto: SyncZstdDecoder | null = hasNodeZstd ? zstdFrameInto : null;

/** The synchronous zstd decoder of this thread: Node's own (unless a test hides it), else the registered one once loaded. */
function syncZstd(): SyncZstdDecoder | null {
  return (nativeAllowed ? nodeZstdInto : null) ?? providedInto;
}

/** Which zstd decoder reads zstd-compressed clusters: 'node:zlib', 'registered', or null (none). */
export function zstdDecoderKind(): 'node:zlib' | 'registered' | null {
  return nativeZstd && nativeAllowed ? 'node:zlib' : provider ? 'registered' : null;
}

/** For tests: false hides Node's own zstd, so the registered decoder (or the refusal) is exercised. */
let nativeAllowed = true;
export function allowNativeZstd(on: boolean): void {
  nativeAllowed = on;
}

/** Node's own zstd on the thread pool (clusters above SYNC_DECODE_MAX; smaller ones decode here). */
const nativeZstdDecoder: ZstdDecoder = (frame, maxLength) => {
  const options = { maxOutputLength: maxLength, chunkSize: Math.max(maxLength, 64) };
  return new Promise((resolve, reject) => nativeZstd!(frame, options, (err, out) => (err ? reject(err) : resolve(out))));
};

/** The registered decoder for a cluster above SYNC_DECODE_MAX: on the calling thread, into a new buffer. */
const providedZstdDecoder: ZstdDecoder = (frame, maxLength) => {
  const out = Buffer.allocUnsafe(maxLength + DECODE_SPARE);
  const n = providedInto!(frame, out, 0, out.length);
  if (n > maxLength) throw new Error('more than one cluster of output');
  return out.subarray(0, n);
};

function zstdDecoder(): ZstdDecoder | null {
  if (nativeZstd && nativeAllowed) return nativeZstdDecoder;
  return providedInto ? providedZstdDecoder : null;
}

/**
 * Clusters up to this size decode on the calling thread (a 64 KiB cluster: tenths of a
 * millisecond); larger ones on the thread pool, so one decode never holds the loop for long.
 */
export const SYNC_DECODE_MAX = 64 * 1024;
/** Decoding on the calling thread per event-loop turn, in milliseconds, before it waits for the next turn. */
export const SYNC_SLICE_MS = 2;
/** When this turn's first calling-thread decode began (-1: none yet), and the wait for the next turn. */
let sliceStart = -1;
let nextTurn: Promise<void> | null = null;
function endSlice(): void {
  sliceStart = -1;
  nextTurn = null;
}

/**
 * Null while this event-loop turn may still decode on the calling thread; else a promise that
 * resolves once the loop has turned (I/O served). Costs no allocation in the common case.
 */
function syncSlice(): Promise<void> | null {
  const now = performance.now();
  if (sliceStart < 0) {
    sliceStart = now;
    setImmediate(endSlice);
    return null;
  }
  if (now - sliceStart < SYNC_SLICE_MS) return null;
  // Queued after endSlice, so the waiters start the next slice afresh.
  return (nextTurn ??= new Promise((resolve) => setImmediate(resolve)));
}

/** Waits, if need be, until this turn of the event loop may decode a cluster on the calling thread. */
async function takeSlice(): Promise<void> {
  for (let wait = syncSlice(); wait; wait = syncSlice()) await wait;
}

/**
 * Makes sure clusters of this compression can be read here (at open): loads the registered zstd
 * decoder where Node has none; else throws the one-line refusal.
 */
export async function prepareCompression(path: string, type: CompressionType): Promise<void> {
  if (type !== 'zstd' || zstdDecoder()) return;
  if (provider) {
    try {
      providedInto = await provider.load();
    } catch (err) {
      throw new FvdError(`${path}: qcow2 image uses zstd compression, and the zstd decoder did not load: ${oneLine(err)}`, 'EINVAL');
    }
    return;
  }
  throw new FvdError(`${path}: qcow2 image uses zstd compression, which Node ${process.versions.node} cannot decompress (needs Node >= 22.15 or a registered decoder)`, 'EINVAL');
}

/**
 * Decompresses one cluster from `src` (the sectors its descriptor names) into exactly
 * `clusterSize` bytes. `where` names the cluster in errors.
 */
export async function decompressCluster(path: string, type: CompressionType, src: Uint8Array, clusterSize: number, where: string): Promise<Uint8Array> {
  if (decodesHere(type, clusterSize)) return decodeHere(path, type, src, clusterSize, where, null);
  let out: Uint8Array;
  try {
    out = type === 'zlib' ? await inflateRaw(src, clusterSize) : await decodeZstdFrames(src, clusterSize);
  } catch (err) {
    if (err instanceof FvdError) throw err;
    throw clusterFailure(path, type, where, clusterSize, { detail: oneLine(err) });
  }
  if (out.length !== clusterSize) throw clusterFailure(path, type, where, clusterSize, { length: out.length });
  return out;
}

/** Why a cluster did not decode: the decoder's message, or the length it produced instead of a cluster. */
export type DecodeFailure = { detail: string } | { length: number };

/** The one-line error for a compressed cluster that did not decode (here or in a decode worker). */
export function clusterFailure(path: string, type: CompressionType, where: string, clusterSize: number, f: DecodeFailure): FvdError {
  if ('length' in f) return corruptQcow2(path, `compressed cluster ${where} decompresses to ${f.length} bytes, not ${clusterSize}`);
  return corruptQcow2(path, `compressed cluster ${where} does not decompress (${type}: ${f.detail})`);
}

/**
 * Decodes one cluster on this thread, whatever its size (a decode worker's loop), into
 * out[at, at + clusterSize): null, or why it did not decode. The same checks as
 * decompressCluster. The output may run up to DECODE_SPARE bytes past the cluster (into the
 * next slot, decoded after it, or spare room the caller leaves at the end of `out`).
 */
export function decodeClusterSync(type: CompressionType, src: Uint8Array, clusterSize: number, zstd: SyncZstdDecoder | null, out: Uint8Array, at: number): DecodeFailure | null {
  try {
    if (type === 'zlib') return inflatedLength(inflateRawInto(src, out, at, clusterSize + DECODE_SPARE), clusterSize);
    if (!zstd) return { detail: 'no zstd decoder in this thread' };
    let produced = 0;
    for (let pos = 0; produced < clusterSize; ) {
      const frame = nextZstdFrame(src, pos, produced, clusterSize);
      pos += frame.length;
      if (isSkippable(frame)) continue;
      // Spare room as for deflate: a frame without a declared size that runs on is caught here.
      const n = zstd(frame, out, at + produced, clusterSize - produced + DECODE_SPARE);
      if (n > clusterSize - produced) throw new Error('more than one cluster of output');
      produced += n;
    }
    return produced === clusterSize ? null : { length: produced };
  } catch (err) {
    return { detail: oneLine(err) };
  }
}

/**
 * Spare output room in bytes past a cluster: inflating a cluster then ends in one pass (see
 * inflateRaw), and a stream that gives more than one cluster is told from one that fits.
 */
export const DECODE_SPARE = 512;

/** inflateRawInto's count checked: null for exactly one cluster. */
function inflatedLength(n: number, clusterSize: number): DecodeFailure | null {
  if (n === clusterSize + DECODE_SPARE) return { detail: 'more than one cluster of output' };
  return n === clusterSize ? null : { length: n };
}

/** The calling thread's output room for one cluster (grown to the largest cluster size seen). */
let scratch = new Uint8Array(0);

/** Whether a cluster of this size and type decodes on the calling thread (decodeHere). */
function decodesHere(type: CompressionType, clusterSize: number): boolean {
  return clusterSize <= SYNC_DECODE_MAX && (type === 'zlib' || syncZstd() !== null);
}

/**
 * Decodes one cluster on the calling thread, in this turn's slice, into `dst` (one cluster long;
 * through the reused `scratch`, no allocation) or, when dst is null, into a new buffer it returns.
 */
async function decodeHere(path: string, type: CompressionType, src: Uint8Array, clusterSize: number, where: string, dst: Uint8Array | null): Promise<Uint8Array> {
  await takeSlice();
  // Nothing awaits from here to the copy: the next cluster decoded on this thread reuses scratch.
  if (dst && scratch.length < clusterSize + DECODE_SPARE) scratch = new Uint8Array(clusterSize + DECODE_SPARE);
  const out = dst ? scratch : Buffer.allocUnsafe(clusterSize + DECODE_SPARE);
  const f = decodeClusterSync(type, src, clusterSize, syncZstd(), out, 0);
  if (f) throw clusterFailure(path, type, where, clusterSize, f);
  if (!dst) return out.subarray(0, clusterSize);
  dst.set(out.subarray(0, clusterSize));
  return dst;
}

/**
 * Decompresses one cluster from `src` into `dst` (one cluster long). Clusters decoded on this
 * thread go through the reused decoders and buffer (no allocation per cluster); others as
 * decompressCluster.
 */
export async function decompressClusterInto(path: string, type: CompressionType, src: Uint8Array, clusterSize: number, where: string, dst: Uint8Array): Promise<void> {
  if (decodesHere(type, clusterSize)) await decodeHere(path, type, src, clusterSize, where, dst);
  else dst.set(await decompressCluster(path, type, src, clusterSize, where));
}

/**
 * The zstd frame at `pos` of `src`, `produced` bytes of the cluster decoded so far: throws if the
 * frames end or one declares more than that (checked before decoding, so a forged header cannot
 * make a decoder allocate a huge buffer).
 */
function nextZstdFrame(src: Uint8Array, pos: number, produced: number, clusterSize: number): Uint8Array {
  if (pos >= src.length) throw new Error(`the frames end after ${produced} bytes`);
  const { length, contentSize } = zstdFrame(src, pos);
  const frame = src.subarray(pos, pos + length);
  if (!isSkippable(frame) && contentSize !== null && contentSize > clusterSize - produced) throw new Error(`a frame declares ${contentSize} bytes, more than the cluster holds`);
  return frame;
}

function oneLine(err: unknown): string {
  const e = err as { code?: string; message?: string };
  const msg = e?.code === 'ERR_BUFFER_TOO_LARGE' ? 'more than one cluster of output' : String(e?.message ?? err);
  return msg.replace(/\s+/g, ' ').trim();
}

/** A cluster above SYNC_DECODE_MAX, inflated on the thread pool. */
async function inflateRaw(src: Uint8Array, clusterSize: number): Promise<Uint8Array> {
  // maxOutputLength: a stream that would produce more than a cluster fails instead of growing;
  // chunkSize: the whole cluster in one pass (the default 16 KiB means one thread-pool trip each),
  // plus spare room: a pass that fills its output buffer exactly makes node allocate a second
  // buffer and go back to the thread pool just to find the end of the stream (measured: half the
  // main-thread cost of a compressed qcow2 read was that second trip).
  const options = { maxOutputLength: clusterSize, chunkSize: clusterSize + DECODE_SPARE };
  return new Promise((resolve, reject) => zlib.inflateRaw(src, options, (err, out) => (err ? reject(err) : resolve(out))));
}

/**
 * Decodes the zstd frames at the start of `src` until `clusterSize` bytes are out. QEMU writes
 * one frame per cluster; more are accepted (as QEMU's reader does), padding after them is not read.
 */
async function decodeZstdFrames(src: Uint8Array, clusterSize: number): Promise<Uint8Array> {
  const decode = zstdDecoder();
  if (!decode) throw new FvdError(`zstd decompression is not available in Node ${process.versions.node}`, 'EINVAL');
  const pieces: Uint8Array[] = [];
  let produced = 0;
  for (let pos = 0; produced < clusterSize; ) {
    const frame = nextZstdFrame(src, pos, produced, clusterSize);
    pos += frame.length;
    if (isSkippable(frame)) continue;
    // Node's thread-pool zstd (large clusters) needs no slice; a registered decoder runs here.
    if (decode !== nativeZstdDecoder) await takeSlice();
    const piece = await decode(frame, clusterSize - produced);
    if (piece.length > clusterSize - produced) throw new Error('more than one cluster of output');
    pieces.push(piece);
    produced += piece.length;
  }
  return pieces.length === 1 ? pieces[0]! : Buffer.concat(pieces);
}

const ZSTD_MAGIC = 0xfd2fb528;

function isSkippable(frame: Uint8Array): boolean {
  return (u32le(frame, 0) & 0xfffffff0) >>> 0 === 0x184d2a50;
}

function u32le(b: Uint8Array, at: number): number {
  return (b[at]! | (b[at + 1]! << 8) | (b[at + 2]! << 16) | (b[at + 3]! << 24)) >>> 0;
}

/**
 * The length of the zstd frame starting at `at`, from its header and block headers (RFC 8878
 * §3.1.1), without decoding it, and the content size its header declares (null if it does not).
 * Throws if the frame is malformed or runs past `src`.
 */
export function zstdFrame(src: Uint8Array, at: number): { length: number; contentSize: number | null } {
  const need = (n: number) => {
    if (n > src.length) throw new Error('truncated zstd frame');
  };
  need(at + 4);
  const magic = u32le(src, at);
  if ((magic & 0xfffffff0) >>> 0 === 0x184d2a50) {
    need(at + 8);
    const len = 8 + u32le(src, at + 4);
    need(at + len);
    return { length: len, contentSize: 0 };
  }
  if (magic !== ZSTD_MAGIC) throw new Error(`bad zstd frame magic 0x${magic.toString(16)}`);
  need(at + 5);
  const fhd = src[at + 4]!;
  if (fhd & 0x08) throw new Error('reserved bit set in a zstd frame header');
  const fcsFlag = fhd >> 6;
  const singleSegment = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictIdBytes = [0, 1, 2, 4][fhd & 3]!;
  const fcsBytes = [singleSegment ? 1 : 0, 2, 4, 8][fcsFlag]!;
  const fcsAt = at + 5 + (singleSegment ? 0 : 1) + dictIdBytes;
  let pos = fcsAt + fcsBytes;
  need(pos);
  let contentSize: number | null = null;
  if (fcsBytes === 1) contentSize = src[fcsAt]!;
  else if (fcsBytes === 2) contentSize = (src[fcsAt]! | (src[fcsAt + 1]! << 8)) + 256;
  else if (fcsBytes === 4) contentSize = u32le(src, fcsAt);
  else if (fcsBytes === 8) contentSize = u32le(src, fcsAt) + u32le(src, fcsAt + 4) * 2 ** 32;
  for (;;) {
    need(pos + 3);
    const bh = src[pos]! | (src[pos + 1]! << 8) | (src[pos + 2]! << 16);
    const last = bh & 1;
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    if (type === 3) throw new Error('reserved zstd block type');
    pos += 3 + (type === 1 ? 1 : size);
    need(pos);
    if (last) break;
  }
  if (checksum) pos += 4;
  need(pos);
  return { length: pos - at, contentSize };
}
