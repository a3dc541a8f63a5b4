/**
 * A read-only BlockFile over an NBD export (nbd://host[:port]/export, nbd+unix:///export?socket=P):
 * one connection, several requests in flight, structured replies when the server offers them
 * (holes arrive as NBD_REPLY_TYPE_OFFSET_HOLE and cost no transfer), and the export's zero
 * extents from NBD_CMD_BLOCK_STATUS "base:allocation" (NBD_STATE_ZERO), mapped once when the
 * source opens, so `nextData` tells the engine which blocks read as zeros without reading them.
 *
 * Replies are received without copying their data twice: the socket reads through net's `onread`
 * into the buffer the connection names for the next bytes (Connection.readBuffer) — inside a
 * read reply's data payload that is the rest of the payload's place in the request's own buffer,
 * so the kernel copies the data straight to its destination (as qemu's client does); headers and
 * the bytes that share a read with them go through one 64 KiB scratch buffer and are copied out.
 *
 * Every reply is checked against its request: data chunks must lie inside it and not overlap,
 * and together cover it exactly; anything else is an error, never data. A lost connection fails
 * the requests in flight transiently; each is retried (reconnecting, checking that the export
 * still has its size) within its retry budget (storage/retry.ts). An attempt that outlives its
 * budget closes the connection, so no late reply can write into a buffer its caller gave up.
 */
import type net from 'node:net';
import type { BlockFile } from '../fvd/io.js';
import { FvdError } from '../fvd/errors.js';
import { ReadOnlySource } from './read-only-source.js';
import { Limiter, allSettledOrThrow, splitRange } from './limiter.js';
import { BudgetSpent, TransientError, retryOptions, withRetries, type RetryOptions } from './retry.js';
import { CoveredRanges } from './covered-ranges.js';
import type { RemoteStats } from './http-source.js';
import {
  CMD_BLOCK_STATUS,
  CMD_DISC,
  CMD_READ,
  REPLY_FLAG_DONE,
  REPLY_TYPE_BLOCK_STATUS,
  REPLY_TYPE_ERROR_BIT,
  REPLY_TYPE_NONE,
  REPLY_TYPE_OFFSET_DATA,
  REPLY_TYPE_OFFSET_HOLE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STATE_ZERO,
  STRUCTURED_REPLY_MAGIC,
  connectAndNegotiate,
  parseNbdUri,
  type NbdAddress,
  type Negotiated,
} from './nbd-protocol.js';

export interface NbdSourceOptions {
  /** Requests in flight at most (default 8). */
  connections?: number;
  /** Bytes per read request (default 2 MiB; never above the server's maximum payload). */
  requestBytes?: number;
  retry?: Partial<RetryOptions>;
  /** Map the export's zero extents at open (default true when the server offers base:allocation). */
  mapZeroes?: boolean;
}

/** Block status descriptors kept at most (memory bound); past them nothing is known to be zero. */
const MAX_ZERO_RUNS = 1 << 20;
/**
 * Reply chunks one request may take. A real server splits a read at its extents (qemu-nbd: the
 * image's clusters; nbdkit: the file's holes): a 32 MiB request (the largest request-size) at
 * 2 KiB extents is 16384 chunks. More is a broken or hostile server, refused as a protocol error.
 */
const MAX_REPLY_CHUNKS = 16384;

interface Pending {
  cookie: number;
  type: number;
  offset: number;
  length: number;
  /** READ: where the data goes. */
  buf: Uint8Array | null;
  /** READ: the ranges reply chunks covered so far (relative to offset). */
  covered: CoveredRanges;
  /** Structured reply chunks received (bounded: MAX_REPLY_CHUNKS). */
  chunks: number;
  /** Data bytes received (bytes fetched). */
  dataBytes: number;
  error: Error | null;
  /** BLOCK_STATUS: [length, flags] pairs of the base:allocation context. */
  extents: number[];
  resolve: () => void;
  reject: (e: Error) => void;
}

/** An error the server reported for a request (an NBD error code), not worth a retry. */
class NbdServerError extends FvdError {}

/** One negotiated connection in the transmission phase with its reply parser. */
class Connection {
  readonly pending = new Map<number, Pending>();
  private nextCookie = 1;
  dead: Error | null = null;
  // parser state
  private head = Buffer.alloc(20);
  private headHave = 0;
  private headNeed = 4;
  private cur: Pending | null = null;
  private chunkType = 0;
  private chunkFlags = 0;
  /** Bytes of the current payload still to consume, and how (small: into `small`; data: into a buffer). */
  private payloadLeft = 0;
  private small: Buffer = Buffer.alloc(0);
  /** The fixed-size payloads (OFFSET_DATA's offset, OFFSET_HOLE), allocated once. */
  private readonly small8 = Buffer.alloc(8);
  private readonly small12 = Buffer.alloc(12);
  /** The socket's next read goes straight into `dataTarget` at `dataPos` (readBuffer handed it out). */
  private direct = false;
  private smallHave = 0;
  private dataTarget: Uint8Array | null = null;
  private dataPos = 0;
  private simpleData = false;

  constructor(
    readonly n: Negotiated,
    stallMs: number,
    private readonly onData: (bytes: number) => void,
  ) {
    const s = n.socket;
    n.receiver.next = () => this.readBuffer();
    n.receiver.sink = (bytes, buf) => this.received(bytes, buf);
    s.on('error', (err) => this.kill(new TransientError(`connection lost (${(err as NodeJS.ErrnoException).code ?? err.message})`)));
    s.on('close', () => this.kill(new TransientError('connection closed by the server')));
    s.setTimeout(stallMs, () => {
      if (this.pending.size) this.kill(new TransientError(`stalled: nothing received for ${stallMs} ms`));
    });
    if (n.leftover.length) this.consume(n.leftover);
  }

  get socket(): net.Socket {
    return this.n.socket;
  }

  /** Fails every request in flight and closes the socket: nothing is written into their buffers after this. */
  kill(err: Error): void {
    if (this.dead) return;
    this.dead = err;
    this.n.socket.destroy();
    for (const p of this.pending.values()) p.reject(err);
    this.pending.clear();
  }

  send(type: number, offset: number, length: number, buf: Uint8Array | null): Promise<Pending> {
    if (this.dead) return Promise.reject(this.dead);
    const cookie = this.nextCookie++;
    return new Promise<Pending>((resolve, reject) => {
      const p: Pending = { cookie, type, offset, length, buf, covered: new CoveredRanges(), chunks: 0, dataBytes: 0, error: null, extents: [], resolve: () => resolve(p), reject };
      this.pending.set(cookie, p);
      const req = Buffer.alloc(28);
      req.writeUInt32BE(REQUEST_MAGIC, 0);
      req.writeUInt16BE(0, 4);
      req.writeUInt16BE(type, 6);
      req.writeUInt32BE(0, 8);
      req.writeUInt32BE(cookie, 12);
      req.writeBigUInt64BE(BigInt(offset), 16);
      req.writeUInt32BE(length, 24);
      this.n.socket.write(req);
    });
  }

  disconnect(): void {
    if (this.dead) return;
    const req = Buffer.alloc(28);
    req.writeUInt32BE(REQUEST_MAGIC, 0);
    req.writeUInt16BE(CMD_DISC, 6);
    this.n.socket.end(req);
    this.dead = new FvdError('closed', 'EIO');
  }

  private protocolError(what: string): void {
    // The stream can no longer be trusted: hard disconnect (proto.md), everything in flight fails.
    this.kill(new TransientError(`protocol error: ${what}`));
  }

  /**
   * Where the socket reads next: inside a data payload, the rest of it in the request's own buffer
   * (the kernel copies the reply's data there, no copy here); otherwise the scratch buffer. Called
   * after every read, so it always describes the state the next bytes arrive in.
   * The view is made anew each time on purpose: net's onread reads into the start of the view it
   * is given (no offset), and every read that lands in a payload moves `dataPos`, so a view cached
   * per payload would never be handed out twice.
   */
  private readBuffer(): Uint8Array {
    if (this.dataTarget && this.payloadLeft > 0 && !this.dead) {
      this.direct = true;
      return this.dataTarget.subarray(this.dataPos, this.dataPos + this.payloadLeft);
    }
    this.direct = false;
    return this.n.receiver.scratch;
  }

  /** `bytes` arrived in the buffer readBuffer last handed out. */
  private received(bytes: number, buf: Uint8Array): void {
    if (this.dead) return;
    if (!this.direct) return this.consume(buf.subarray(0, bytes) as Buffer);
    // Already in place: only the bookkeeping of a payload copy.
    this.dataPos += bytes;
    this.payloadLeft -= bytes;
    this.cur!.dataBytes += bytes;
    this.onData(bytes);
    if (this.payloadLeft === 0) this.endPayload();
  }

  private consume(chunk: Buffer): void {
    let i = 0;
    while (i < chunk.length && !this.dead) {
      if (this.payloadLeft === 0 && !this.cur) {
        // header
        const take = Math.min(this.headNeed - this.headHave, chunk.length - i);
        chunk.copy(this.head, this.headHave, i, i + take);
        this.headHave += take;
        i += take;
        if (this.headHave < this.headNeed) continue;
        if (this.headNeed === 4) {
          const magic = this.head.readUInt32BE(0);
          if (magic === SIMPLE_REPLY_MAGIC) this.headNeed = 16;
          else if (magic === STRUCTURED_REPLY_MAGIC && this.n.structured) this.headNeed = 20;
          else return this.protocolError(`bad reply magic 0x${magic.toString(16)}`);
          continue;
        }
        this.onHeader();
        continue;
      }
      // payload
      if (this.dataTarget) {
        const take = Math.min(this.payloadLeft, chunk.length - i);
        this.dataTarget.set(chunk.subarray(i, i + take), this.dataPos);
        this.dataPos += take;
        this.payloadLeft -= take;
        i += take;
        this.cur!.dataBytes += take;
        this.onData(take);
      } else {
        // (OFFSET_DATA: only its 8-byte offset goes here; the data goes to the request's buffer)
        const take = Math.min(this.payloadLeft, chunk.length - i, this.small.length - this.smallHave);
        chunk.copy(this.small, this.smallHave, i, i + take);
        this.smallHave += take;
        this.payloadLeft -= take;
        i += take;
        if (this.smallHave === 8 && this.chunkType === REPLY_TYPE_OFFSET_DATA && this.payloadLeft > 0) {
          this.startData();
          continue;
        }
      }
      if (this.payloadLeft === 0) this.endPayload();
    }
  }

  private onHeader(): void {
    const h = this.head;
    const magic = h.readUInt32BE(0);
    this.headHave = 0;
    this.headNeed = 4;
    if (magic === SIMPLE_REPLY_MAGIC) {
      const err = h.readUInt32BE(4);
      // Peeked, not taken: the request stays in `pending` until finish(), so that kill() fails it
      // if the connection is lost or stalls while its data is still coming, or the reply is a
      // protocol error. Taken out here, it was failed by nobody: the stall timer saw nothing in
      // flight, and the read waited out its whole retry budget and then failed, never retried.
      const p = this.peek(h.readUInt32BE(8), h.readUInt32BE(12));
      if (!p) return;
      if (err) return this.finish(p, new NbdServerError(`server error ${nbdErrno(err)}`));
      if (p.type === CMD_READ && !this.n.structured) {
        // The data follows (simple replies carry the requested length).
        this.cur = p;
        this.simpleData = true;
        this.dataTarget = p.buf;
        this.dataPos = 0;
        this.payloadLeft = p.length;
        if (p.length > 0) p.covered.add(0, p.length);
        if (p.length === 0) this.endPayload();
        return;
      }
      if (p.type === CMD_READ) return this.protocolError('simple reply to a read with structured replies');
      return this.finish(p, null);
    }
    // structured chunk
    this.chunkFlags = h.readUInt16BE(4);
    this.chunkType = h.readUInt16BE(6);
    const p = this.peek(h.readUInt32BE(8), h.readUInt32BE(12));
    if (!p) return;
    if (++p.chunks > MAX_REPLY_CHUNKS) return this.protocolError(`more than ${MAX_REPLY_CHUNKS} reply chunks for one request`);
    this.cur = p;
    const len = h.readUInt32BE(16);
    this.payloadLeft = len;
    this.smallHave = 0;
    this.dataTarget = null;
    this.simpleData = false;
    const t = this.chunkType;
    if (t === REPLY_TYPE_OFFSET_DATA) {
      if (len < 9 || p.type !== CMD_READ) return this.protocolError('bad OFFSET_DATA chunk');
      this.small = this.small8;
    } else if (t === REPLY_TYPE_OFFSET_HOLE) {
      if (len !== 12 || p.type !== CMD_READ) return this.protocolError('bad OFFSET_HOLE chunk');
      this.small = this.small12;
    } else if (t === REPLY_TYPE_BLOCK_STATUS) {
      if (len < 12 || (len - 4) % 8 || p.type !== CMD_BLOCK_STATUS || len > 4 + 8 * (1 << 20)) return this.protocolError('bad BLOCK_STATUS chunk');
      this.small = Buffer.alloc(len);
    } else if (t === REPLY_TYPE_NONE) {
      if (len !== 0) return this.protocolError('NONE chunk with a payload');
    } else if (t & REPLY_TYPE_ERROR_BIT) {
      if (len < 6 || len > 65536) return this.protocolError('bad error chunk');
      this.small = Buffer.alloc(len);
    } else {
      return this.protocolError(`unknown chunk type ${t}`);
    }
    if (len === 0) this.endPayload();
  }

  /** OFFSET_DATA: the 8-byte offset is in; the data goes straight into the request's buffer. */
  private startData(): void {
    const p = this.cur!;
    const off = Number(this.small.readBigUInt64BE(0));
    const n = this.payloadLeft;
    if (!this.cover(p, off, n)) return;
    this.dataTarget = p.buf!.subarray(off - p.offset, off - p.offset + n);
    this.dataPos = 0;
  }

  /** Records [off, off + n) of the request as answered; false (and a hard disconnect) if it is outside or overlaps. */
  private cover(p: Pending, off: number, n: number): boolean {
    const a = off - p.offset;
    const z = a + n;
    if (a < 0 || z > p.length) {
      this.protocolError(`reply chunk ${off}+${n} outside the request ${p.offset}+${p.length}`);
      return false;
    }
    if (!p.covered.add(a, z)) {
      this.protocolError(`overlapping reply chunks at ${off}`);
      return false;
    }
    return true;
  }

  private endPayload(): void {
    const p = this.cur!;
    this.cur = null;
    if (this.simpleData) {
      this.simpleData = false;
      this.dataTarget = null;
      return this.finish(p, null);
    }
    const t = this.chunkType;
    if (this.dataTarget) {
      this.dataTarget = null;
    } else if (t === REPLY_TYPE_OFFSET_HOLE) {
      const off = Number(this.small.readBigUInt64BE(0));
      const n = this.small.readUInt32BE(8);
      if (n === 0) return this.protocolError('empty hole chunk');
      if (!this.cover(p, off, n)) return;
      p.buf!.fill(0, off - p.offset, off - p.offset + n);
    } else if (t === REPLY_TYPE_BLOCK_STATUS) {
      const ctx = this.small.readUInt32BE(0);
      if (ctx === this.n.allocationContext) {
        // Exactly one status chunk per context (the NBD protocol's MUST); a second would also let a
        // server grow this list without bound (each chunk may carry 2^20 descriptors).
        if (p.extents.length > 0) return this.protocolError('a second BLOCK_STATUS chunk for base:allocation');
        for (let o = 4; o < this.small.length; o += 8) p.extents.push(this.small.readUInt32BE(o), this.small.readUInt32BE(o + 4));
      }
    } else if (t & REPLY_TYPE_ERROR_BIT) {
      const errno = this.small.readUInt32BE(0);
      const mlen = this.small.readUInt16BE(4);
      const msg = this.small.subarray(6, 6 + Math.min(mlen, this.small.length - 6)).toString('utf8').slice(0, 200);
      p.error ??= new NbdServerError(`server error ${nbdErrno(errno)}${msg ? `: ${msg}` : ''}`);
    }
    if (this.chunkFlags & REPLY_FLAG_DONE) {
      this.pending.delete(p.cookie);
      if (p.error) return this.finish(p, p.error);
      if (p.type === CMD_READ) {
        // Ranges never overlap (cover() refuses that), so whole coverage is one range [0, length).
        if (p.length > 0 && !p.covered.coversWhole(p.length))
          return this.finish(p, new TransientError(`read reply covered ${p.covered.bytes()} of ${p.length} bytes`));
      }
      this.finish(p, null);
    }
  }

  private peek(hi: number, lo: number): Pending | null {
    const p = hi === 0 ? this.pending.get(lo) : undefined;
    if (!p) {
      this.protocolError(`reply for unknown cookie ${hi}:${lo}`);
      return null;
    }
    return p;
  }

  private finish(p: Pending, err: Error | null): void {
    this.pending.delete(p.cookie);
    if (err) p.reject(err);
    else p.resolve();
  }
}

const NBD_ERRNO: Record<number, string> = { 1: 'EPERM', 5: 'EIO', 12: 'ENOMEM', 22: 'EINVAL', 28: 'ENOSPC', 75: 'EOVERFLOW', 95: 'ENOTSUP', 108: 'ESHUTDOWN' };
function nbdErrno(e: number): string {
  return NBD_ERRNO[e] ?? `errno ${e}`;
}

export class NbdSource extends ReadOnlySource implements BlockFile {
  readonly stats: RemoteStats;
  private conn: Connection | null;
  private connecting: Promise<Connection> | null = null;
  private readonly limiter: Limiter;
  private readonly pieceBytes: number;
  private closed = false;
  /** Requests in flight at most × bytes per request (BlockFile.inFlightBytes). */
  readonly inFlightBytes: number;
  /** Most requests in flight at once on the connection (tests: requests overlap). */
  maxInFlight = 0;
  /** Zero runs from block status, sorted, merged: [start0, end0, start1, end1, ...]. */
  private zeroRuns: number[] = [];
  /** Offsets below this were mapped by block status. */
  private mappedEnd = 0;

  private constructor(
    private readonly addr: NbdAddress,
    n: Negotiated,
    private readonly retry: RetryOptions,
    connections: number,
    requestBytes: number,
  ) {
    super();
    this.stats = { url: addr.uri, bytesFetched: 0, requests: 0, retries: 0, failures: 0 };
    this.length = n.size;
    this.conn = new Connection(n, retry.stallMs, (b) => (this.stats.bytesFetched += b));
    this.limiter = new Limiter(connections);
    const piece = Math.min(requestBytes, n.maxPayload === 0xffffffff ? requestBytes : n.maxPayload);
    this.pieceBytes = Math.max(n.minBlock, piece - (piece % n.minBlock));
    this.inFlightBytes = connections * this.pieceBytes;
  }

  static async open(uri: string, options: NbdSourceOptions = {}): Promise<NbdSource> {
    const addr = parseNbdUri(uri);
    const retry = retryOptions(options.retry);
    const counters = { retries: 0, failures: 0 };
    const n = await withRetries(`${uri}: cannot open`, retry, counters, (deadline) => connectAndNegotiate(addr, deadline));
    const src = new NbdSource(addr, n, retry, options.connections ?? 8, options.requestBytes ?? 2 * 1024 * 1024);
    try {
      if ((options.mapZeroes ?? true) && n.allocationContext !== null) await src.mapZeroes();
    } catch (err) {
      await src.close();
      throw err;
    }
    return src;
  }

  get path(): string {
    return this.addr.uri;
  }

  /** The export's size (NBD has no content validator). */
  get identity(): string {
    return `size=${this.length}`;
  }

  /** Fixed at open: a reconnection to an export of another size is refused. */
  private readonly length: number;

  size(): number {
    return this.length;
  }

  /** Whether the server answers block status (zero detection without reading). */
  get hasBlockStatus(): boolean {
    return this.conn?.n.allocationContext != null;
  }

  nextData(offset: number): number | null {
    const size = this.size();
    if (offset >= size) return size;
    if (offset >= this.mappedEnd) return null;
    const r = this.zeroRuns;
    // the last run starting at or before offset
    let lo = 0;
    let hi = r.length / 2 - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (r[2 * mid]! <= offset) {
        found = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    if (found >= 0 && offset < r[2 * found + 1]!) return Math.min(r[2 * found + 1]!, size);
    return offset;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    if (this.closed) throw new FvdError(`${this.path}: read after close`, 'EIO');
    const size = this.size();
    const inside = Math.max(0, Math.min(buf.length, size - offset));
    if (inside < buf.length) buf.fill(0, inside);
    if (inside === 0) return;
    const min = this.conn?.n.minBlock ?? 1;
    if (offset % min || (inside % min && offset + inside !== size)) {
      // Requests must be aligned to the minimum block size: read the aligned cover, copy out.
      const a = offset - (offset % min);
      const z = Math.min(size, Math.ceil((offset + inside) / min) * min);
      const bounce = new Uint8Array(z - a);
      await this.readAligned(bounce, a);
      buf.set(bounce.subarray(offset - a, offset - a + inside));
      return;
    }
    await this.readAligned(buf.subarray(0, inside), offset);
  }

  private async readAligned(buf: Uint8Array, offset: number): Promise<void> {
    await allSettledOrThrow(
      splitRange(offset, buf.length, this.pieceBytes).map(([pos, len]) =>
        this.limiter.run(() =>
          this.request(`${this.path}: bytes ${pos}-${pos + len - 1}`, CMD_READ, pos, len, buf.subarray(pos - offset, pos - offset + len)),
        ),
      ),
    );
  }

  private async request(what: string, type: number, offset: number, length: number, buf: Uint8Array | null): Promise<Pending> {
    return withRetries(what, this.retry, this.stats, async (deadline) => {
      const conn = await this.connection(deadline);
      this.stats.requests++;
      const p = conn.send(type, offset, length, buf);
      this.maxInFlight = Math.max(this.maxInFlight, conn.pending.size);
      let timer: NodeJS.Timeout | undefined;
      const budget = new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          // Past the budget: close the connection, so a late reply cannot land in `buf`.
          conn.kill(new BudgetSpent());
          reject(conn.dead);
        }, Math.max(0, deadline - performance.now()));
      });
      try {
        return await Promise.race([p, budget]);
      } catch (err) {
        // The server's own error: the connection does not know the source or the range; name them.
        if (err instanceof NbdServerError) throw new FvdError(`${what}: ${err.message}`, 'EIO');
        throw err;
      } finally {
        clearTimeout(timer);
      }
    });
  }

  /** The live connection, or a new one (the export must still have the size it had). */
  private async connection(deadline: number): Promise<Connection> {
    if (this.closed) throw new FvdError(`${this.path}: closed`, 'EIO');
    if (this.conn && !this.conn.dead) return this.conn;
    this.connecting ??= (async () => {
      try {
        const n = await connectAndNegotiate(this.addr, deadline);
        if (n.size !== this.size()) {
          n.socket.destroy();
          throw new FvdError(`${this.path}: the export is now ${n.size} bytes, it was ${this.size()}: refusing to mix old and new data`, 'EIO');
        }
        this.conn = new Connection(n, this.retry.stallMs, (b) => (this.stats.bytesFetched += b));
        return this.conn;
      } finally {
        this.connecting = null;
      }
    })();
    return this.connecting;
  }

  /** Maps the export's zero extents (NBD_STATE_ZERO) with block status queries, front to back. */
  private async mapZeroes(): Promise<void> {
    const size = this.size();
    const min = this.conn!.n.minBlock;
    const maxLen = 0x80000000 - (0x80000000 % min);
    const runs: number[] = [];
    let pos = 0;
    while (pos < size) {
      const len = Math.min(maxLen, size - pos);
      const p = await this.request(`${this.path}: block status at ${pos}`, CMD_BLOCK_STATUS, pos, len, null);
      if (p.extents.length === 0) break;
      let at = pos;
      for (let i = 0; i < p.extents.length && at < size; i += 2) {
        const end = Math.min(size, at + p.extents[i]!);
        if (p.extents[i + 1]! & STATE_ZERO) {
          if (runs.length && runs[runs.length - 1] === at) runs[runs.length - 1] = end;
          else runs.push(at, end);
        }
        at = end;
      }
      if (at <= pos) break;
      pos = at;
      if (runs.length / 2 >= MAX_ZERO_RUNS) break;
    }
    this.zeroRuns = runs;
    this.mappedEnd = pos;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.conn?.disconnect();
  }
}
