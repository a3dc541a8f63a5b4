/**
 * The per-device control channel from the CLI to the process serving the device: a unix socket
 * next to the state file (state.ts controlSocketFile: /run/fvd/ublkbN.sock, mode 0600: root's, like the device), speaking
 * one JSON line of request and one of response per connection. `fvd resize` of a served image
 * uses it (docs/DESIGN.md §8); the server answers one request at a time, in order.
 *
 *   request:  {"op":"grow","size":N} (absolute, bytes) or {"op":"grow","delta":N} (relative)
 *   response: {"ok":true,"oldSize":N,"newSize":N} or {"ok":false,"error":"one line","code":"E..."}
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { FvdError } from '../fvd/errors.js';

export interface GrowRequest {
  op: 'grow';
  size?: number;
  delta?: number;
}
export type ControlRequest = GrowRequest;

export type ControlResponse = { ok: true; oldSize: number; newSize: number } | { ok: false; error: string; code?: string };

/** A request line longer than this is not ours: the connection is closed. */
const MAX_LINE = 4096;

/** Parses a request line; throws a one-line EINVAL error when it is not a valid request. */
export function parseRequest(line: string): ControlRequest {
  let r: unknown;
  try {
    r = JSON.parse(line);
  } catch {
    throw new FvdError('control: request is not JSON', 'EINVAL');
  }
  const o = r as Record<string, unknown>;
  if (!o || typeof o !== 'object' || o.op !== 'grow') throw new FvdError(`control: unknown request ${JSON.stringify(o?.op ?? null)}`, 'EINVAL');
  const n = (v: unknown) => v === undefined || (typeof v === 'number' && Number.isSafeInteger(v));
  if (!n(o.size) || !n(o.delta) || (o.size === undefined) === (o.delta === undefined))
    throw new FvdError('control: grow needs exactly one of size and delta (integers)', 'EINVAL');
  return o.size !== undefined ? { op: 'grow', size: o.size as number } : { op: 'grow', delta: o.delta as number };
}

export type ControlHandler = (req: ControlRequest) => Promise<{ oldSize: number; newSize: number }>;

/**
 * Listens on the device's control socket. Requests are handled one at a time (a grow waits for
 * the previous one). A stale socket file of a dead server is replaced.
 */
export class ControlSocket {
  private chain: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly server: net.Server,
    readonly path: string,
  ) {}

  static async listen(file: string, handler: ControlHandler, log: (line: string) => void): Promise<ControlSocket> {
    fs.mkdirSync(path.dirname(file), { recursive: true, mode: 0o755 });
    fs.rmSync(file, { force: true });
    let cs: ControlSocket;
    const server = net.createServer((conn) => cs.serve(conn, handler, log));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      // Only root (the server's user) may connect: growing a disk is the owner's business.
      const mask = process.umask(0o177);
      server.listen(file, () => {
        process.umask(mask);
        server.off('error', reject);
        resolve();
      });
    });
    server.unref(); // never what keeps the process alive
    cs = new ControlSocket(server, file);
    return cs;
  }

  private serve(conn: net.Socket, handler: ControlHandler, log: (line: string) => void): void {
    let buf = '';
    conn.setEncoding('utf8');
    conn.on('error', () => {}); // a client that went away
    conn.on('data', (chunk: string) => {
      buf += chunk;
      const nl = buf.indexOf('\n');
      if (nl < 0) {
        if (buf.length > MAX_LINE) conn.destroy();
        return;
      }
      conn.removeAllListeners('data');
      const line = buf.slice(0, nl);
      const run = async (): Promise<ControlResponse> => {
        try {
          const r = await handler(parseRequest(line));
          return { ok: true, ...r };
        } catch (err) {
          const e = err as FvdError;
          log(`control: ${e.message}`);
          return { ok: false, error: e.message, ...(typeof e.code === 'string' ? { code: e.code } : {}) };
        }
      };
      const p = this.chain.then(run, run);
      this.chain = p.catch(() => {});
      void p.then((res) => conn.end(JSON.stringify(res) + '\n'));
    });
  }

  close(): void {
    this.server.close();
    fs.rmSync(this.path, { force: true });
  }
}

/**
 * Sends one request to the server listening on `file` and returns its answer. Throws a one-line
 * error when nobody listens or no answer comes within `timeoutMs`.
 */
export function sendControl(file: string, req: ControlRequest, timeoutMs = 120_000): Promise<ControlResponse> {
  return new Promise((resolve, reject) => {
    const conn = net.createConnection(file);
    let buf = '';
    const timer = setTimeout(() => {
      conn.destroy();
      reject(new FvdError(`no answer from the server on ${file} within ${timeoutMs / 1000} s`, 'EIO'));
    }, timeoutMs);
    conn.setEncoding('utf8');
    conn.on('connect', () => conn.write(JSON.stringify(req) + '\n'));
    conn.on('data', (c: string) => (buf += c));
    conn.on('error', (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(new FvdError(`cannot reach the server on ${file}: ${err.code ?? err.message}`, 'EIO'));
    });
    conn.on('end', () => {
      clearTimeout(timer);
      const line = buf.split('\n')[0]!;
      try {
        resolve(JSON.parse(line) as ControlResponse);
      } catch {
        reject(new FvdError(`the server on ${file} closed the connection without an answer`, 'EIO'));
      }
    });
  });
}
