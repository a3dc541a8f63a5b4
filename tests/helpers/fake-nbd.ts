/**
 * A small NBD server for the client's tests (fixed newstyle, structured replies, base:allocation),
 * exporting a buffer on a unix socket, that stresses what a real server rarely does on loopback:
 * it answers the requests it has received in a shuffled order (seeded), sends each read reply as
 * several chunks in shuffled order (OFFSET_DATA, and OFFSET_HOLE for all-zero pieces), and writes
 * its byte stream in pieces of random sizes, often splitting a chunk header, so the client's reply
 * parser meets every boundary. `dieAfterBytes` makes it drop the connection mid-stream once it sent
 * that many reply bytes and refuse connections from then on (a server that died).
 *
 * Misbehaviour, opt-in, for the client's checks of what it receives (tests/daemon/nbd-replies):
 * `fault` garbles read replies — from the `faultAt`-th read reply on (counted over all
 * connections), `faultTimes` of them — in the way NbdFault names; every byte a faulty reply carries
 * that is not the export's own (a misplaced or overlapping chunk) is the export's bytes inverted,
 * so a test can tell them from real data and from its sentinel. `structured = false` refuses
 * NBD_OPT_STRUCTURED_REPLY: reads are answered with simple replies (the data follows the header).
 */
import net from 'node:net';
import { Rng } from './rng.js';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
const CONTEXT_ID = 7;
const NBD_EIO = 5;

/**
 * How a faulty read reply is wrong. Structured replies (the chunk checks of storage/nbd-source.ts):
 *  - past-end: the last data chunk claims one byte more than the request has (shifted by +1);
 *  - before-start: the first data chunk starts one byte before the request (shifted by -1);
 *  - overlap: the second data chunk is shifted back a byte: it overlaps the first, its last byte
 *    is never sent, and the chunks still add up to the request's length;
 *  - short-coverage: the last byte is never sent, then DONE;
 *  - hole-past-end: the last piece comes as an OFFSET_HOLE shifted by +1 (zeros, one past the end);
 *  - empty-data: first an OFFSET_DATA chunk that has its offset and no data;
 *  - unknown-type: the first chunk has type 42;
 *  - error-chunk: all the data, then an NBD_REPLY_TYPE_ERROR chunk (EIO, "media error");
 *  - error-offset: the data but for one piece, an NBD_REPLY_TYPE_ERROR_OFFSET chunk for it instead.
 * Both kinds of reply:
 *  - bad-magic: the first header's magic is garbled (simple replies: a structured chunk's magic,
 *    which a client that did not negotiate structured replies must refuse);
 *  - unknown-cookie: the first header's cookie has its high word set (no such request);
 *  - simple-error: a simple reply with error EIO and no data;
 *  - simple-data: a simple reply with its data (structured replies negotiated: a protocol error);
 *  - stall: half the reply's bytes, then nothing more on that connection (it stays open).
 */
export type NbdFault =
  | 'past-end'
  | 'before-start'
  | 'overlap'
  | 'short-coverage'
  | 'hole-past-end'
  | 'empty-data'
  | 'unknown-type'
  | 'error-chunk'
  | 'error-offset'
  | 'bad-magic'
  | 'unknown-cookie'
  | 'simple-error'
  | 'simple-data'
  | 'stall';

/** In a connection's reply queue: send nothing from here on (a 'stall' fault). */
const STALL = Buffer.alloc(0);

export class FakeNbd {
  private server!: net.Server;
  private readonly sockets = new Set<net.Socket>();
  /** Reply bytes sent (all connections), and requests answered out of their arrival order. */
  sentBytes = 0;
  outOfOrder = 0;
  requests = 0;
  /** Most read requests received and not yet answered. */
  maxQueued = 0;
  /** When > 0: once this many reply bytes went out, cut the connection and stop serving. */
  dieAfterBytes = 0;
  dead = false;
  /** Offer structured replies (false: the client must read simple replies). */
  structured = true;
  /** Garble read replies from the faultAt-th (1-based, all connections) on, faultTimes of them. */
  fault: NbdFault | null = null;
  faultAt = 1;
  faultTimes = Infinity;
  /** Read replies built so far, and how many of them were garbled. */
  readReplies = 0;
  faultsSent = 0;
  /** Block status replies: 'twice' sends the status chunk twice (the protocol allows one per context), 'misaligned' with a payload of 4 + 8n + 4 bytes. */
  statusFault: 'twice' | 'misaligned' | null = null;
  /** When > 0: well-formed structured read replies come in pieces of this many bytes (shuffled). */
  splitReads = 0;
  /** Connections accepted (a client that dropped one after a protocol error makes another). */
  connections = 0;

  constructor(
    readonly data: Uint8Array,
    readonly socketPath: string,
    private readonly rng: Rng,
  ) {}

  get url(): string {
    return `nbd+unix:///?socket=${this.socketPath}`;
  }

  async start(): Promise<this> {
    this.server = net.createServer((s) => this.serve(s));
    await new Promise<void>((resolve) => this.server.listen(this.socketPath, resolve));
    return this;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private die(): void {
    this.dead = true;
    for (const s of this.sockets) s.destroy();
    this.server.close();
  }

  private serve(s: net.Socket): void {
    if (this.dead) return void s.destroy();
    this.connections++;
    this.sockets.add(s);
    /** Set by a 'stall' reply: this connection sends nothing more. */
    let stalled = false;
    s.on('close', () => this.sockets.delete(s));
    s.on('error', () => {});
    let buf = Buffer.alloc(0);
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    const queue: Buffer[] = [];
    let flushing = false;
    let arrival = 0;
    const pending: Array<{ seq: number; reply: Buffer[] }> = [];
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(NBDMAGIC, 0);
    hello.writeBigUInt64BE(IHAVEOPT, 8);
    hello.writeUInt16BE(3, 16); // FIXED_NEWSTYLE | NO_ZEROES
    s.write(hello);

    const optReply = (opt: number, type: number, data: Buffer = Buffer.alloc(0)) => {
      const h = Buffer.alloc(20);
      h.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
      h.writeUInt32BE(opt, 8);
      h.writeUInt32BE(type, 12);
      h.writeUInt32BE(data.length, 16);
      s.write(Buffer.concat([h, data]));
    };
    // The reply stream in random pieces, yielding between some, so the client reads partial headers.
    const flush = async () => {
      if (flushing) return;
      flushing = true;
      while (queue.length && !s.destroyed && !stalled) {
        const all = queue.splice(0);
        const stallAt = all.indexOf(STALL);
        if (stallAt >= 0) {
          stalled = true;
          all.length = stallAt;
        }
        const whole = Buffer.concat(all);
        for (let o = 0; o < whole.length && !s.destroyed; ) {
          const n = Math.min(whole.length - o, this.rng.int(4) === 0 ? 1 + this.rng.int(24) : 1 + this.rng.int(200 * 1024));
          if (this.dieAfterBytes > 0 && this.sentBytes + n >= this.dieAfterBytes) {
            s.write(whole.subarray(o, o + Math.max(0, this.dieAfterBytes - this.sentBytes)));
            this.sentBytes = this.dieAfterBytes;
            this.die();
            return;
          }
          s.write(whole.subarray(o, o + n));
          this.sentBytes += n;
          o += n;
          if (this.rng.int(3) === 0) await new Promise((r) => setTimeout(r, 1));
        }
      }
      flushing = false;
    };
    // Requests that arrived are answered together, in shuffled order, a moment later.
    let timer: NodeJS.Timeout | null = null;
    const answerSoon = () => {
      timer ??= setTimeout(() => {
        timer = null;
        const batch = pending.splice(0);
        for (let i = batch.length - 1; i > 0; i--) {
          const j = this.rng.int(i + 1);
          [batch[i], batch[j]] = [batch[j]!, batch[i]!];
        }
        for (let i = 1; i < batch.length; i++) if (batch[i]!.seq < batch[i - 1]!.seq) this.outOfOrder++;
        for (const r of batch) queue.push(...r.reply);
        void flush();
      }, 2);
    };

    s.on('data', (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          phase = 'options';
        } else if (phase === 'options') {
          if (buf.length < 16) return;
          const opt = buf.readUInt32BE(8);
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          buf = buf.subarray(16 + len);
          if (opt === 8) optReply(opt, this.structured ? 1 : 0x80000001); // STRUCTURED_REPLY: ACK or unsupported
          else if (opt === 10) {
            const d = Buffer.concat([Buffer.alloc(4), Buffer.from('base:allocation')]);
            d.writeUInt32BE(CONTEXT_ID, 0);
            optReply(opt, 4, d); // META_CONTEXT
            optReply(opt, 1);
          } else if (opt === 7) {
            const info = Buffer.alloc(12);
            info.writeUInt16BE(0, 0); // INFO_EXPORT
            info.writeBigUInt64BE(BigInt(this.data.length), 2);
            info.writeUInt16BE(1 | 2, 10); // HAS_FLAGS | READ_ONLY
            optReply(opt, 3, info);
            optReply(opt, 1);
            phase = 'transmission';
          } else optReply(opt, 0x80000001); // unsupported
        } else {
          if (buf.length < 28) return;
          const type = buf.readUInt16BE(6);
          const cookie = buf.subarray(8, 16);
          const offset = Number(buf.readBigUInt64BE(16));
          const length = buf.readUInt32BE(24);
          buf = buf.subarray(28);
          if (type === 2) return void s.end(); // DISC
          this.requests++;
          pending.push({ seq: arrival++, reply: type === 0 ? this.readReplyOrFault(cookie, offset, length) : this.statusReply(cookie, offset, length) });
          this.maxQueued = Math.max(this.maxQueued, pending.length);
          answerSoon();
        }
      }
    });
  }

  private chunk(cookie: Buffer, type: number, done: boolean, payload: Buffer): Buffer {
    const h = Buffer.alloc(20);
    h.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
    h.writeUInt16BE(done ? 1 : 0, 4);
    h.writeUInt16BE(type, 6);
    cookie.copy(h, 8);
    h.writeUInt32BE(payload.length, 16);
    return Buffer.concat([h, payload]);
  }

  /** The next read reply: well-formed, or garbled as `fault` says when its turn has come. */
  private readReplyOrFault(cookie: Buffer, offset: number, length: number): Buffer[] {
    const n = ++this.readReplies;
    const fault = this.fault !== null && n >= this.faultAt && n < this.faultAt + this.faultTimes ? this.fault : null;
    if (fault === null) return this.structured ? this.readReply(cookie, offset, length) : this.simpleReadReply(cookie, offset, length);
    this.faultsSent++;
    return this.faultyReply(fault, cookie, offset, length);
  }

  private simpleHeader(cookie: Buffer, error: number): Buffer {
    const h = Buffer.alloc(16);
    h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    h.writeUInt32BE(error, 4);
    cookie.copy(h, 8);
    return h;
  }

  /** Without structured replies: the header, then the requested bytes. */
  private simpleReadReply(cookie: Buffer, offset: number, length: number): Buffer[] {
    return [this.simpleHeader(cookie, 0), Buffer.from(this.data.subarray(offset, offset + length))];
  }

  /** An OFFSET_DATA chunk claiming `at` and carrying `bytes`. */
  private dataChunk(cookie: Buffer, at: number, bytes: Uint8Array, done = false): Buffer {
    const p = Buffer.alloc(8 + bytes.length);
    p.writeBigUInt64BE(BigInt(at), 0);
    p.set(bytes, 8);
    return this.chunk(cookie, 1, done, p);
  }

  /** An OFFSET_HOLE chunk claiming [at, at + n). */
  private holeChunk(cookie: Buffer, at: number, n: number): Buffer {
    const p = Buffer.alloc(12);
    p.writeBigUInt64BE(BigInt(at), 0);
    p.writeUInt32BE(n, 8);
    return this.chunk(cookie, 2, false, p);
  }

  /** An error chunk: errno, message, and for ERROR_OFFSET (0x8002) the offset it concerns. */
  private errorChunk(cookie: Buffer, message: string, offset: number | null): Buffer {
    const m = Buffer.from(message);
    const p = Buffer.alloc(6 + m.length + (offset === null ? 0 : 8));
    p.writeUInt32BE(NBD_EIO, 0);
    p.writeUInt16BE(m.length, 4);
    m.copy(p, 6);
    if (offset !== null) p.writeBigUInt64BE(BigInt(offset), 6 + m.length);
    return this.chunk(cookie, offset === null ? 0x8001 : 0x8002, false, p);
  }

  /** The export's bytes at [at, at + n) inverted (0xff past its end): never the real data of where they claim to go. */
  private garbage(at: number, n: number): Buffer {
    const g = Buffer.alloc(n, 0xff);
    for (let i = 0; i < n && at + i < this.data.length; i++) g[i] = ~this.data[at + i]! & 0xff;
    return g;
  }

  /** The request in 2-4 data pieces ([offset, length] each, in order); a 1-byte request in one. */
  private pieces(offset: number, length: number): Array<[number, number]> {
    const cuts = new Set([0, length]);
    if (length > 2) cuts.add(1 + this.rng.int(length - 2));
    for (let i = this.rng.int(3); i > 0; i--) cuts.add(this.rng.int(length));
    const at = [...cuts].sort((a, b) => a - b);
    return at.slice(1).map((z, i) => [offset + at[i]!, z - at[i]!]);
  }

  private faultyReply(fault: NbdFault, cookie: Buffer, offset: number, length: number): Buffer[] {
    if (fault === 'simple-error') return [this.simpleHeader(cookie, NBD_EIO)];
    if (fault === 'simple-data') return this.simpleReadReply(cookie, offset, length);
    const reply = this.structured ? this.structuredFault(fault, cookie, offset, length) : this.simpleReadReply(cookie, offset, length);
    const first = reply[0]!;
    if (fault === 'bad-magic') first.writeUInt32BE(this.structured ? 0x12345678 : STRUCTURED_REPLY_MAGIC, 0);
    else if (fault === 'unknown-cookie') first.writeUInt32BE(1, 8);
    else if (fault === 'stall') {
      const whole = Buffer.concat(reply);
      return [whole.subarray(0, whole.length >> 1), STALL];
    }
    return reply;
  }

  /** A structured read reply, wrong as `fault` says (the kinds that need no chunk changes: well-formed). */
  private structuredFault(fault: NbdFault, cookie: Buffer, offset: number, length: number): Buffer[] {
    const pieces = this.pieces(offset, length);
    const last = pieces.length - 1;
    const chunks: Buffer[] = [];
    pieces.forEach(([a, n], i) => {
      const real = this.data.subarray(a, a + n);
      if (fault === 'past-end' && i === last) chunks.push(this.dataChunk(cookie, a + 1, this.garbage(a + 1, n)));
      else if (fault === 'before-start' && i === 0 && a > 0) chunks.push(this.dataChunk(cookie, a - 1, this.garbage(a - 1, n)));
      else if (fault === 'overlap' && i === 1) chunks.push(this.dataChunk(cookie, a - 1, this.garbage(a - 1, n)));
      else if (fault === 'short-coverage' && i === last) chunks.push(this.dataChunk(cookie, a, real.subarray(0, n - 1)));
      else if (fault === 'hole-past-end' && i === last) chunks.push(this.holeChunk(cookie, a + 1, n));
      else if (fault === 'error-offset' && i === last) chunks.push(this.errorChunk(cookie, 'media error', a));
      else chunks.push(this.dataChunk(cookie, a, real));
    });
    if (fault === 'unknown-type') chunks[0]!.writeUInt16BE(42, 6);
    if (fault === 'empty-data') chunks.unshift(this.dataChunk(cookie, offset, new Uint8Array(0)));
    if (fault === 'error-chunk') chunks.push(this.errorChunk(cookie, 'media error', null));
    chunks.push(this.chunk(cookie, 0, true, Buffer.alloc(0))); // NONE, DONE
    return chunks;
  }

  /** A read's reply: its range in 1-4 pieces (or splitReads-byte ones), each OFFSET_DATA or (all zeros) OFFSET_HOLE, shuffled. */
  private readReply(cookie: Buffer, offset: number, length: number): Buffer[] {
    const cuts = new Set([0, length]);
    if (this.splitReads > 0) for (let c = this.splitReads; c < length; c += this.splitReads) cuts.add(c);
    else for (let i = this.rng.int(4); i > 0; i--) cuts.add(this.rng.int(length));
    const at = [...cuts].sort((a, b) => a - b);
    const chunks: Buffer[] = [];
    for (let i = 0; i + 1 < at.length; i++) {
      const a = offset + at[i]!;
      const n = at[i + 1]! - at[i]!;
      const piece = this.data.subarray(a, a + n);
      const hole = piece.every((v) => v === 0);
      const p = Buffer.alloc(hole ? 12 : 8 + n);
      p.writeBigUInt64BE(BigInt(a), 0);
      if (hole) p.writeUInt32BE(n, 8);
      else p.set(piece, 8);
      chunks.push(this.chunk(cookie, hole ? 2 : 1, false, p)); // OFFSET_HOLE or OFFSET_DATA
    }
    for (let i = chunks.length - 1; i > 0; i--) {
      const j = this.rng.int(i + 1);
      [chunks[i], chunks[j]] = [chunks[j]!, chunks[i]!];
    }
    chunks.push(this.chunk(cookie, 0, true, Buffer.alloc(0))); // NONE, DONE
    return chunks;
  }

  /** base:allocation in 64 KiB steps: all-zero steps are holes (HOLE | ZERO), others data. */
  private statusReply(cookie: Buffer, offset: number, length: number): Buffer[] {
    const step = 64 * 1024;
    const desc: number[] = [];
    for (let a = offset; a < Math.min(offset + length, this.data.length); a += step) {
      const n = Math.min(step, this.data.length - a, offset + length - a);
      const flags = this.data.subarray(a, a + n).every((v) => v === 0) ? 3 : 0;
      if (desc.length && desc[desc.length - 1] === flags) desc[desc.length - 2]! += n;
      else desc.push(n, flags);
    }
    const p = Buffer.alloc(4 + 4 * desc.length + (this.statusFault === 'misaligned' ? 4 : 0));
    p.writeUInt32BE(CONTEXT_ID, 0);
    for (let i = 0; i < desc.length; i++) p.writeUInt32BE(desc[i]!, 4 + 4 * i);
    if (this.statusFault === 'twice') return [this.chunk(cookie, 5, false, p), this.chunk(cookie, 5, true, p)];
    return [this.chunk(cookie, 5, true, p)];
  }
}
