/**
 * A small NBD server for the client's tests (fixed newstyle, structured replies, base:allocation),
 * exporting a buffer on a unix socket, that stresses what a real server rarely does on loopback:
 * it answers the requests it has received in a shuffled order (seeded), sends each read reply as
 * several chunks in shuffled order (OFFSET_DATA, and OFFSET_HOLE for all-zero pieces), and writes
 * its byte stream in pieces of random sizes, often splitting a chunk header, so the client's reply
 * parser meets every boundary. `dieAfterBytes` makes it drop the connection mid-stream once it sent
 * that many reply bytes and refuse connections from then on (a server that died).
 */
import net from 'node:net';
import { Rng } from './rng.js';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
const CONTEXT_ID = 7;

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
    this.sockets.add(s);
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
      while (queue.length && !s.destroyed) {
        const whole = Buffer.concat(queue.splice(0));
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
          if (opt === 8) optReply(opt, 1); // STRUCTURED_REPLY: ACK
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
          pending.push({ seq: arrival++, reply: type === 0 ? this.readReply(cookie, offset, length) : this.statusReply(cookie, offset, length) });
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

  /** A read's reply: its range in 1-4 pieces, each OFFSET_DATA or (all zeros) OFFSET_HOLE, shuffled. */
  private readReply(cookie: Buffer, offset: number, length: number): Buffer[] {
    const cuts = new Set([0, length]);
    for (let i = this.rng.int(4); i > 0; i--) cuts.add(this.rng.int(length));
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
    const p = Buffer.alloc(4 + 4 * desc.length);
    p.writeUInt32BE(CONTEXT_ID, 0);
    for (let i = 0; i < desc.length; i++) p.writeUInt32BE(desc[i]!, 4 + 4 * i);
    return [this.chunk(cookie, 5, true, p)];
  }
}
