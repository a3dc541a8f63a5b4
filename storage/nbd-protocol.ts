/**
 * The NBD protocol's client side as fvd uses it (NetworkBlockDevice/nbd doc/proto.md): NBD URIs
 * (doc/uri.md), the fixed-newstyle handshake with NBD_OPT_STRUCTURED_REPLY,
 * NBD_OPT_SET_META_CONTEXT "base:allocation" and NBD_OPT_GO asking for NBD_INFO_BLOCK_SIZE, and
 * the wire constants of the transmission phase. All integers are big-endian (network order).
 */
import net from 'node:net';
import { FvdError } from '../fvd/errors.js';
import { TransientError, isTransientSocketError } from './retry.js';

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

const FLAG_FIXED_NEWSTYLE = 1 << 0;
const FLAG_NO_ZEROES = 1 << 1;

const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const OPT_SET_META_CONTEXT = 10;
const OPT_ABORT = 2;

const REP_ACK = 1;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const REP_ERR = 0x80000000;
const REP_ERR_NAMES: Record<number, string> = {
  1: 'unsupported',
  2: 'forbidden by policy',
  3: 'invalid',
  4: 'unsupported on this platform',
  5: 'TLS required (nbds:// is not supported)',
  6: 'no such export',
  7: 'server shutting down',
  8: 'block size negotiation required',
  9: 'too big',
};

const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;

export const TFLAG_READ_ONLY = 1 << 1;
export const CMD_READ = 0;
export const CMD_DISC = 2;
export const CMD_BLOCK_STATUS = 7;
export const REPLY_FLAG_DONE = 1;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR_BIT = 0x8000;
/** base:allocation flags */
export const STATE_ZERO = 1 << 1;

export interface NbdAddress {
  /** The URI as given (it holds no credentials: NBD URIs here carry none). */
  uri: string;
  exportName: string;
  host?: string;
  port?: number;
  socketPath?: string;
}

/** Parses nbd://host[:port]/export and nbd+unix:///export?socket=PATH (doc/uri.md). */
export function parseNbdUri(uri: string): NbdAddress {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new FvdError(`${uri}: not a valid NBD URI`, 'EINVAL');
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  if (u.protocol === 'nbds:' || u.protocol === 'nbds+unix:') throw new FvdError(`${uri}: NBD over TLS is not supported (use nbd:// or nbd+unix://)`, 'EINVAL');
  if (u.username || u.password) throw new FvdError(`${uri}: user info in an NBD URI is only for TLS, which is not supported`, 'EINVAL');
  const params = [...u.searchParams.keys()];
  if (u.protocol === 'nbd:') {
    if (!u.hostname) throw new FvdError(`${uri}: an nbd:// URI needs a host`, 'EINVAL');
    if (params.length) throw new FvdError(`${uri}: unknown query parameter '${params[0]}'`, 'EINVAL');
    return { uri, exportName, host: u.hostname.replace(/^\[(.*)\]$/, '$1'), port: u.port ? Number(u.port) : 10809 };
  }
  if (u.protocol === 'nbd+unix:') {
    const socketPath = u.searchParams.get('socket');
    if (!socketPath) throw new FvdError(`${uri}: an nbd+unix:// URI needs ?socket=PATH`, 'EINVAL');
    const other = params.find((p) => p !== 'socket');
    if (other) throw new FvdError(`${uri}: unknown query parameter '${other}'`, 'EINVAL');
    if (u.host) throw new FvdError(`${uri}: an nbd+unix:// URI has no host`, 'EINVAL');
    return { uri, exportName, socketPath };
  }
  throw new FvdError(`${uri}: not an NBD URI`, 'EINVAL');
}

/**
 * Where a connection's incoming bytes go. The socket reads into the buffer `next()` returns (net's
 * `onread`: no Buffer allocated per read, and the connection may hand out the destination of a
 * read reply so the kernel copies its data straight there), and `sink(n, buf)` gets the n bytes
 * read into that buffer. The handshake and then the connection (storage/nbd-source.ts) set both.
 */
export class Receiver {
  /** The receive buffer for everything that is not read straight into a destination. */
  readonly scratch = Buffer.allocUnsafe(64 * 1024);
  next: () => Uint8Array = () => this.scratch;
  sink: (n: number, buf: Uint8Array) => void = () => {};
}

export interface Negotiated {
  socket: net.Socket;
  /** The socket's receive path; its sink is a no-op until the caller sets it. */
  receiver: Receiver;
  size: number;
  transmissionFlags: number;
  structured: boolean;
  /** The metadata context id of base:allocation, or null when the server offers none. */
  allocationContext: number | null;
  minBlock: number;
  preferredBlock: number;
  maxPayload: number;
  /** Bytes received after the handshake, before any request (none from a correct server). */
  leftover: Buffer;
}

/** Buffers a socket's bytes during the handshake: reads of exact lengths, failing on close. */
class HandshakeReader {
  private buf: Buffer = Buffer.alloc(0);
  private want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private error: Error | null = null;
  constructor(
    private readonly socket: net.Socket,
    private readonly receiver: Receiver,
  ) {
    // The receive buffer is reused by the next read: keep a copy of what arrived.
    receiver.sink = (n, buf) => this.onData(Buffer.from(buf.subarray(0, n)));
    socket.on('close', () => this.fail(new TransientError('connection closed during the handshake')));
    socket.on('error', (err) => this.fail(isTransientSocketError(err) ? new TransientError(String((err as NodeJS.ErrnoException).code)) : err));
  }
  private readonly onData = (chunk: Buffer) => {
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    this.pump();
  };
  private fail(err: Error) {
    this.error ??= err;
    if (this.want) {
      const w = this.want;
      this.want = null;
      w.reject(this.error);
    }
  }
  private pump() {
    if (this.want && this.buf.length >= this.want.n) {
      const w = this.want;
      this.want = null;
      const out = this.buf.subarray(0, w.n);
      this.buf = this.buf.subarray(w.n);
      w.resolve(out);
    }
  }
  read(n: number): Promise<Buffer> {
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      this.want = { n, resolve, reject };
      this.pump();
    });
  }
  detach(): Buffer {
    this.receiver.sink = () => {};
    this.socket.removeAllListeners('close');
    this.socket.removeAllListeners('error');
    return this.buf;
  }
}

function option(opt: number, data: Buffer): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(IHAVEOPT, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

interface OptReply {
  type: number;
  data: Buffer;
}

async function optReply(r: HandshakeReader, opt: number): Promise<OptReply> {
  const h = await r.read(20);
  if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new FvdError(`bad option reply magic`, 'EIO');
  if (h.readUInt32BE(8) !== opt) throw new FvdError(`option reply for option ${h.readUInt32BE(8)}, expected ${opt}`, 'EIO');
  const type = h.readUInt32BE(12);
  const len = h.readUInt32BE(16);
  if (len > 1 << 20) throw new FvdError(`option reply of ${len} bytes`, 'EIO');
  return { type, data: len ? Buffer.from(await r.read(len)) : Buffer.alloc(0) };
}

function repError(rep: OptReply): string {
  const code = rep.type & ~REP_ERR;
  const text = rep.data.length ? `: ${rep.data.toString('utf8').slice(0, 200)}` : '';
  return `${REP_ERR_NAMES[code] ?? `error ${code}`}${text}`;
}

/** Connects and negotiates; the socket is left in the transmission phase. */
export async function connectAndNegotiate(addr: NbdAddress, deadline: number): Promise<Negotiated> {
  const receiver = new Receiver();
  const onread = {
    buffer: () => receiver.next(),
    callback: (n: number, buf: Uint8Array) => {
      receiver.sink(n, buf);
      return true;
    },
  };
  const socket = addr.socketPath ? net.connect({ path: addr.socketPath, onread }) : net.connect({ host: addr.host!, port: addr.port!, onread });
  socket.setNoDelay(true);
  const reader = new HandshakeReader(socket, receiver);
  const timer = setTimeout(() => socket.destroy(new TransientError('handshake timed out')), Math.max(1, deadline - performance.now()));
  try {
    const hello = await reader.read(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC) throw new FvdError(`not an NBD server (bad magic)`, 'EIO');
    if (hello.readBigUInt64BE(8) !== IHAVEOPT) throw new FvdError(`the server speaks the oldstyle handshake only; fvd needs fixed newstyle`, 'EIO');
    const hflags = hello.readUInt16BE(16);
    if (!(hflags & FLAG_FIXED_NEWSTYLE)) throw new FvdError(`the server does not support fixed newstyle negotiation`, 'EIO');
    const cflags = Buffer.alloc(4);
    cflags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES));
    socket.write(cflags);

    const name = Buffer.from(addr.exportName, 'utf8');
    socket.write(option(OPT_STRUCTURED_REPLY, Buffer.alloc(0)));
    const sr = await optReply(reader, OPT_STRUCTURED_REPLY);
    const structured = sr.type === REP_ACK;

    let allocationContext: number | null = null;
    if (structured) {
      const q = Buffer.from('base:allocation');
      const d = Buffer.alloc(4 + name.length + 4 + 4 + q.length);
      let o = d.writeUInt32BE(name.length, 0);
      o += name.copy(d, o);
      o = d.writeUInt32BE(1, o);
      o = d.writeUInt32BE(q.length, o);
      q.copy(d, o);
      socket.write(option(OPT_SET_META_CONTEXT, d));
      for (;;) {
        const rep = await optReply(reader, OPT_SET_META_CONTEXT);
        if (rep.type === REP_META_CONTEXT && rep.data.length >= 4) {
          if (rep.data.subarray(4).toString('utf8') === 'base:allocation') allocationContext = rep.data.readUInt32BE(0);
          continue;
        }
        break; // ACK, or an error: then no block status (reads still work)
      }
    }

    const go = Buffer.alloc(4 + name.length + 2 + 2);
    let o = go.writeUInt32BE(name.length, 0);
    o += name.copy(go, o);
    o = go.writeUInt16BE(1, o);
    go.writeUInt16BE(INFO_BLOCK_SIZE, o);
    socket.write(option(OPT_GO, go));
    let size = -1;
    let tflags = 0;
    let minBlock = 1;
    let preferredBlock = 4096;
    let maxPayload = 32 * 1024 * 1024;
    for (;;) {
      const rep = await optReply(reader, OPT_GO);
      if (rep.type === REP_INFO && rep.data.length >= 2) {
        const t = rep.data.readUInt16BE(0);
        if (t === INFO_EXPORT && rep.data.length === 12) {
          size = Number(rep.data.readBigUInt64BE(2));
          tflags = rep.data.readUInt16BE(10);
        } else if (t === INFO_BLOCK_SIZE && rep.data.length === 14) {
          minBlock = rep.data.readUInt32BE(2);
          preferredBlock = rep.data.readUInt32BE(6);
          maxPayload = rep.data.readUInt32BE(10);
        }
        continue;
      }
      if (rep.type === REP_ACK) break;
      if (rep.type & REP_ERR) {
        socket.write(option(OPT_ABORT, Buffer.alloc(0)));
        throw new FvdError(`export '${addr.exportName}': ${repError(rep)}`, (rep.type & ~REP_ERR) === 6 ? 'ENOENT' : 'EIO');
      }
      throw new FvdError(`unexpected reply type ${rep.type} to NBD_OPT_GO`, 'EIO');
    }
    if (size < 0 || !Number.isSafeInteger(size)) throw new FvdError(`the server sent no export size`, 'EIO');
    if (!(minBlock >= 1 && minBlock <= 65536 && (minBlock & (minBlock - 1)) === 0)) throw new FvdError(`invalid minimum block size ${minBlock}`, 'EIO');
    if (maxPayload < minBlock) throw new FvdError(`invalid maximum payload ${maxPayload}`, 'EIO');
    const leftover = reader.detach();
    return { socket, receiver, size, transmissionFlags: tflags, structured, allocationContext, minBlock, preferredBlock, maxPayload, leftover };
  } catch (err) {
    reader.detach();
    socket.on('error', () => {});
    socket.destroy();
    throw err;
  } finally {
    clearTimeout(timer);
  }
}
