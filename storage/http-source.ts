/**
 * A read-only BlockFile over an http:// or https:// URL (a template on a web server or an
 * S3-compatible object store), read with Range GETs (RFC 9110 §14).
 *
 * - Kept-alive connections (node:https Agent), up to `connections` requests in flight; a read
 *   larger than `requestBytes` is split into that many ranges fetched in parallel, so one
 *   prefetch chunk keeps every connection busy. There is no speculative readahead: the prefetcher
 *   asks only for blocks that are not yet local, and reading ahead past them would fetch bytes
 *   twice or fetch bytes nobody needs.
 * - Every response is checked before its bytes are used: status 206, `Content-Range: bytes
 *   a-b/size` exactly as asked, no content coding, the body exactly b − a + 1 bytes. Anything else
 *   is an error, never data (a 200 means the server ignored Range).
 * - Identity: the object's size and its ETag (else Last-Modified), taken when the source is opened;
 *   every range request is conditional on it (If-Match with a strong ETag, else
 *   If-Unmodified-Since), so a template replaced on the server is refused (412) instead of mixed.
 * - Transient failures (refused or reset connections, stalls, 5xx, truncated bodies) are retried
 *   with back-off within one time budget per read (storage/retry.ts).
 * - Credentials (headers, a presigned query) are added to requests only; `path` (used in every
 *   message) is the URL without them.
 */
import http from 'node:http';
import https from 'node:https';
import fs from 'node:fs';
import tls from 'node:tls';
import type { BlockFile } from '../fvd/io.js';
import { FvdError } from '../fvd/errors.js';
import { ReadOnlySource } from './read-only-source.js';
import { redactUrl } from '../fvd/base-location.js';
import { Limiter, allSettledOrThrow, splitRange } from './limiter.js';
import { BudgetSpent, TransientError, isTransientSocketError, retryOptions, withRetries, type RetryOptions } from './retry.js';

export interface HttpSourceOptions {
  /** Extra request headers (Authorization, ...): credentials, never shown. */
  headers?: Record<string, string>;
  /** A query string appended to every request (an S3 presigned URL's signature), never shown. */
  query?: string;
  /** A PEM file of additional trusted CAs for https:// (verification is always on). */
  caFile?: string;
  /** Requests in flight at most (default 4). */
  connections?: number;
  /** Bytes per range request (default 2 MiB: an 8 MiB prefetch chunk is 4 parallel requests). */
  requestBytes?: number;
  retry?: Partial<RetryOptions>;
}

/** What a remote source has done, for STATUS, `fvd info` and tests. */
export interface RemoteStats {
  url: string;
  /** Payload bytes received in accepted responses (each byte of the base counted once per fetch). */
  bytesFetched: number;
  requests: number;
  retries: number;
  failures: number;
}

const DEFAULT_CONNECTIONS = 4;
const DEFAULT_REQUEST_BYTES = 2 * 1024 * 1024;

/** Strips a URL of what must never be shown or stored: user info, query, fragment. */
export function displayUrl(url: string): string {
  return redactUrl(url);
}

export class HttpSource extends ReadOnlySource implements BlockFile {
  readonly stats: RemoteStats;
  private readonly limiter: Limiter;
  private readonly conditional: Record<string, string>;
  private closed = false;
  /** Requests in flight at most × bytes per request (BlockFile.inFlightBytes). */
  readonly inFlightBytes: number;

  private constructor(
    readonly path: string,
    private readonly target: URL,
    private readonly agent: http.Agent,
    private readonly headers: Record<string, string>,
    private readonly retry: RetryOptions,
    private readonly requestBytes: number,
    connections: number,
    private readonly length: number,
    private readonly etag: string | null,
    private readonly lastModified: string | null,
  ) {
    super();
    this.limiter = new Limiter(connections);
    this.inFlightBytes = connections * requestBytes;
    this.stats = { url: path, bytesFetched: 0, requests: 0, retries: 0, failures: 0 };
    // A strong ETag pins the exact bytes; a weak one or a date pins less, but still refuses a
    // template replaced later (RFC 9110 §13.1: If-Match needs strong comparison).
    this.conditional = etag && !etag.startsWith('W/') ? { 'If-Match': etag } : lastModified ? { 'If-Unmodified-Since': lastModified } : {};
  }

  /** Opens the URL: one ranged GET of its first byte gives the size, the validators and range support. */
  static async open(url: string, options: HttpSourceOptions = {}): Promise<HttpSource> {
    const shown = displayUrl(url);
    const target = new URL(url);
    if (target.username || target.password || target.search)
      throw new FvdError(`${shown}: credentials or a query string do not belong in the base URL (they would be stored in the image): put them in the remote configuration`, 'EINVAL');
    if (options.query) target.search = options.query.startsWith('?') ? options.query : `?${options.query}`;
    const retry = retryOptions(options.retry);
    const connections = options.connections ?? DEFAULT_CONNECTIONS;
    let ca: Buffer | undefined;
    if (options.caFile) {
      try {
        ca = fs.readFileSync(options.caFile);
      } catch (err) {
        throw new FvdError(`${shown}: CA file ${options.caFile}: ${(err as NodeJS.ErrnoException).code ?? 'unreadable'}`, 'EINVAL');
      }
    }
    const agent =
      target.protocol === 'https:'
        ? new https.Agent({ keepAlive: true, maxSockets: connections, ca: ca ? [...tlsRootCertificates(), ca.toString()] : undefined })
        : new http.Agent({ keepAlive: true, maxSockets: connections });
    const headers = { ...(options.headers ?? {}) };
    const counters = { retries: 0, failures: 0 };
    try {
      const probe = await withRetries(`${shown}: cannot open`, retry, counters, (deadline) =>
        request(target, agent, { ...headers, Range: 'bytes=0-0' }, retry.stallMs, deadline, null, shown),
      );
      return new HttpSource(shown, target, agent, headers, retry, options.requestBytes ?? DEFAULT_REQUEST_BYTES, connections, probe.size, probe.etag, probe.lastModified);
    } catch (err) {
      agent.destroy();
      throw err;
    }
  }

  /** size + the validator: recorded in the image at create, compared at every open (FORMAT.md §2.2). */
  get identity(): string {
    return `size=${this.length}` + (this.etag ? ` etag=${this.etag}` : this.lastModified ? ` last-modified=${this.lastModified}` : '');
  }

  size(): number {
    return this.length;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    if (this.closed) throw new FvdError(`${this.path}: read after close`, 'EIO');
    const inside = Math.max(0, Math.min(buf.length, this.length - offset));
    if (inside < buf.length) buf.fill(0, inside); // past the end: zeros, as for a file
    if (inside === 0) return;
    // All pieces end before the read returns, even a failed one: `buf` is the caller's to reuse.
    await allSettledOrThrow(splitRange(offset, inside, this.requestBytes).map(([pos, len]) => this.limiter.run(() => this.fetchRange(buf.subarray(pos - offset, pos - offset + len), pos))));
  }

  private async fetchRange(into: Uint8Array, offset: number): Promise<void> {
    const last = offset + into.length - 1;
    const what = `${this.path}: bytes ${offset}-${last}`;
    await withRetries(what, this.retry, this.stats, async (deadline) => {
      this.stats.requests++;
      await request(this.target, this.agent, { ...this.headers, ...this.conditional, Range: `bytes=${offset}-${last}` }, this.retry.stallMs, deadline, { into, offset, size: this.length, etag: this.etag }, this.path);
    });
    this.stats.bytesFetched += into.length;
  }

  async close(): Promise<void> {
    this.closed = true;
    this.agent.destroy();
  }
}

/** Node's bundled CA list: a custom CA file adds to it rather than replacing it. */
function tlsRootCertificates(): readonly string[] {
  return tls.rootCertificates;
}

interface Probe {
  size: number;
  etag: string | null;
  lastModified: string | null;
}

interface RangeTarget {
  into: Uint8Array;
  offset: number;
  size: number;
  etag: string | null;
}

/**
 * One attempt: a GET with `headers` (which hold the Range). Without `range`, it is the open probe
 * (bytes=0-0) and returns the object's size and validators; with it, the body lands in
 * `range.into` after the response was checked. Rejects with TransientError for what may pass.
 */
function request(target: URL, agent: http.Agent, headers: Record<string, string>, stallMs: number, deadline: number, range: RangeTarget | null, shown: string): Promise<Probe> {
  return new Promise<Probe>((resolve, reject) => {
    const mod = target.protocol === 'https:' ? https : http;
    let settled = false;
    const req = mod.request(target, { agent, method: 'GET', headers: { ...headers, 'Accept-Encoding': 'identity' } });
    const fail = (err: Error) => {
      if (settled) return;
      settled = true;
      clearTimeout(budgetTimer);
      req.destroy(); // also drops the connection: a half-read body must not be reused
      reject(err);
    };
    const budgetTimer = setTimeout(() => fail(new BudgetSpent()), Math.max(0, deadline - performance.now()));
    req.setTimeout(Math.max(1, Math.min(stallMs, deadline - performance.now())), () => fail(new TransientError(`stalled: nothing received for ${stallMs} ms`)));
    req.on('error', (err) => {
      if (isTransientSocketError(err)) fail(new TransientError(`${(err as NodeJS.ErrnoException).code}`));
      else fail(new FvdError(`${shown}: ${(err as NodeJS.ErrnoException).code ?? err.message}`, 'EIO'));
    });
    req.on('response', (res) => {
      const status = res.statusCode ?? 0;
      const bad = (err: Error) => {
        res.resume();
        fail(err);
      };
      if (status !== 206) {
        if (status >= 500 || status === 408 || status === 429) return bad(new TransientError(`HTTP ${status}`));
        if (status === 412) return bad(new FvdError(`${shown}: the object changed on the server since it was opened (HTTP 412): refusing to mix old and new data`, 'EIO'));
        if (status === 404 || status === 410) return bad(new FvdError(`${shown}: not found (HTTP ${status})`, 'ENOENT'));
        if (status === 401 || status === 403) return bad(new FvdError(`${shown}: access denied (HTTP ${status}): check the credentials in the remote configuration`, 'EIO'));
        if (status === 200) return bad(new FvdError(`${shown}: the server ignored the Range header (HTTP 200): range requests are required`, 'EIO'));
        if (status === 416) return bad(new FvdError(`${shown}: range not satisfiable (HTTP 416): the object is shorter than expected`, 'EIO'));
        return bad(new FvdError(`${shown}: unexpected HTTP ${status}`, 'EIO'));
      }
      const enc = res.headers['content-encoding'];
      if (enc && enc !== 'identity') return bad(new TransientError(`unexpected Content-Encoding ${enc}`));
      const cr = /^bytes (\d+)-(\d+)\/(\d+)$/.exec(String(res.headers['content-range'] ?? ''));
      if (!cr) return bad(new TransientError(`206 without a valid single Content-Range (${JSON.stringify(res.headers['content-range'] ?? null)})`));
      const first = Number(cr[1]);
      const last = Number(cr[2]);
      const total = Number(cr[3]);
      const etag = typeof res.headers.etag === 'string' ? res.headers.etag : null;
      const wantFirst = range ? range.offset : 0;
      const wantLast = range ? range.offset + range.into.length - 1 : 0;
      if (first !== wantFirst || last !== wantLast) return bad(new TransientError(`asked for bytes ${wantFirst}-${wantLast}, got Content-Range ${first}-${last}`));
      if (range && total !== range.size) return bad(new FvdError(`${shown}: the object is now ${total} bytes, it was ${range.size}: refusing to mix old and new data`, 'EIO'));
      if (range && range.etag && etag !== range.etag) return bad(new FvdError(`${shown}: the object's ETag changed (${etag} was ${range.etag}): refusing to mix old and new data`, 'EIO'));
      const length = last - first + 1;
      const declared = res.headers['content-length'];
      if (declared !== undefined && Number(declared) !== length) return bad(new TransientError(`Content-Length ${declared} for a ${length}-byte range`));
      const into = range ? range.into : new Uint8Array(1);
      let got = 0;
      res.on('data', (chunk: Buffer) => {
        if (settled) return;
        if (got + chunk.length > length) return fail(new TransientError(`body longer than the ${length}-byte range`));
        into.set(chunk, got);
        got += chunk.length;
      });
      res.on('end', () => {
        if (settled) return;
        if (got !== length) return fail(new TransientError(`body ended after ${got} of ${length} bytes`));
        settled = true;
        clearTimeout(budgetTimer);
        resolve({ size: total, etag, lastModified: typeof res.headers['last-modified'] === 'string' ? res.headers['last-modified'] : null });
      });
      res.on('aborted', () => fail(new TransientError(`connection lost after ${got} of ${length} bytes`)));
      res.on('error', (err) => fail(new TransientError(`connection lost after ${got} of ${length} bytes (${(err as NodeJS.ErrnoException).code ?? err.message})`)));
    });
    req.end();
  });
}
