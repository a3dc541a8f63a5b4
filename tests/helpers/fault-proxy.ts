/**
 * A small fault-injecting HTTP proxy for the remote-base tests: it forwards requests to an
 * upstream server (nginx) and, on command, misbehaves — resets the connection, delays or stalls,
 * answers 5xx, truncates or lengthens the body, sends a wrong Content-Range, ignores the Range
 * header (200), or demands credentials. Faults apply to the next `count` requests (or all).
 */
import http from 'node:http';
import net from 'node:net';

export type Fault = 'reset' | 'delay' | 'stall' | '503' | 'truncate' | 'long' | 'wrong-range' | 'ignore-range' | 'wrong-length';

export class FaultProxy {
  private server!: http.Server;
  port = 0;
  private fault: Fault | null = null;
  private remaining = 0;
  delayMs = 0;
  /** Requests seen, and the Authorization header / URL of the last one (tests check credentials). */
  requests = 0;
  /** Most requests being answered at once. */
  maxConcurrent = 0;
  private concurrent = 0;
  lastAuthorization: string | undefined;
  lastUrl = '';
  /** When set, requests must carry this Authorization header or this query, else 401/403. */
  requireAuthorization: string | null = null;
  requireQuery: string | null = null;
  private readonly sockets = new Set<net.Socket>();

  constructor(private readonly upstream: string) {}

  async start(): Promise<this> {
    this.server = http.createServer((req, res) => this.handle(req, res));
    this.server.keepAliveTimeout = 60_000;
    this.server.on('connection', (s) => {
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
    });
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.port = (this.server.address() as net.AddressInfo).port;
    return this;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Misbehave on the next `count` requests (Infinity: until cleared). */
  inject(fault: Fault | null, count = Infinity, delayMs = 0): void {
    this.fault = fault;
    this.remaining = count;
    this.delayMs = delayMs;
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }

  /** Faults for the next requests, one each, before `inject`'s (null: that request passes). */
  readonly queue: Array<{ fault: Fault | null; delayMs?: number }> = [];

  private take(): Fault | null {
    const next = this.queue.shift();
    if (next) {
      if (next.delayMs !== undefined) this.delayMs = next.delayMs;
      return next.fault;
    }
    if (!this.fault || this.remaining <= 0) return null;
    this.remaining--;
    return this.fault;
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.requests++;
    this.concurrent++;
    this.maxConcurrent = Math.max(this.maxConcurrent, this.concurrent);
    res.on('close', () => this.concurrent--);
    this.lastAuthorization = req.headers.authorization;
    this.lastUrl = req.url ?? '';
    const u = new URL(req.url ?? '/', 'http://x');
    if (this.requireAuthorization !== null && req.headers.authorization !== this.requireAuthorization) {
      res.writeHead(401).end('no');
      return;
    }
    if (this.requireQuery !== null) {
      if (u.search !== `?${this.requireQuery}`) {
        res.writeHead(403).end('no');
        return;
      }
    }
    const fault = this.take();
    if (fault === 'reset') {
      req.socket.destroy();
      return;
    }
    if (fault === 'stall') return; // never answers
    if (fault === '503') {
      res.writeHead(503).end('busy');
      return;
    }
    const go = () => this.forward(req, res, u.pathname, fault);
    if (fault === 'delay') setTimeout(go, this.delayMs);
    else go();
  }

  private forward(req: http.IncomingMessage, res: http.ServerResponse, pathname: string, fault: Fault | null): void {
    const headers: http.OutgoingHttpHeaders = { ...req.headers };
    delete headers.authorization;
    if (fault === 'ignore-range') delete headers.range;
    const up = http.request(`${this.upstream}${pathname}`, { method: req.method, headers }, (ur) => {
      const h: http.OutgoingHttpHeaders = { ...ur.headers };
      const len = Number(ur.headers['content-length'] ?? 0);
      if (fault === 'wrong-range' && typeof h['content-range'] === 'string') {
        // Same length, shifted by one byte: a broken cache or middlebox.
        const m = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(h['content-range'])!;
        const a = Number(m[1]) + 1;
        h['content-range'] = `bytes ${a}-${Number(m[2]) + 1}/${m[3]}`;
      }
      if (fault === 'wrong-length') h['content-length'] = String(len - 1);
      if (fault === 'long') delete h['content-length']; // chunked, with extra bytes at the end
      res.writeHead(ur.statusCode ?? 502, h);
      if (fault === 'truncate') {
        let sent = 0;
        ur.on('data', (d: Buffer) => {
          const room = Math.floor(len / 2) - sent;
          if (room > 0) res.write(d.subarray(0, room));
          sent += Math.min(room, d.length);
          if (sent >= Math.floor(len / 2)) {
            ur.destroy();
            res.socket?.destroy();
          }
        });
        return;
      }
      if (fault === 'wrong-length') {
        ur.on('data', (d: Buffer) => res.write(d));
        ur.on('end', () => res.socket?.destroy());
        return;
      }
      ur.on('data', (d: Buffer) => res.write(d));
      ur.on('end', () => {
        if (fault === 'long') res.write(Buffer.alloc(16, 0x55));
        res.end();
      });
    });
    up.on('error', () => res.socket?.destroy());
    req.pipe(up);
  }
}
