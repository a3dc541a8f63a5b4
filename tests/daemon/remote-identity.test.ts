/**
 * HTTP identity edge cases of storage/http-source.ts, against a small range server on loopback
 * whose validators the test sets (and which honors If-Match / If-Unmodified-Since as RFC 9110
 * §13.1 says): Last-Modified only (identity recorded at create, a changed date refused at open
 * and by the open source), a weak ETag (never in If-Match — a weak tag can never match there —
 * but If-Unmodified-Since when a date is given; a changed weak tag still refused), a strong ETag
 * (If-Match), and connection reuse: many sequential reads over few TCP connections. Uses only
 * node:http, so it always runs.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { HttpSource } from '../../storage/http-source.js';
import { parseRemoteConfig } from '../../storage/remote-config.js';
import { StorageIo } from '../../storage/storage-io.js';
import { TempDir } from '../helpers/cli.js';
import { Rng } from '../helpers/rng.js';

const MiB = 1024 * 1024;
const SIZE = 2 * MiB;
const tmp = new TempDir('fvd-remote-identity-');
const data = Buffer.alloc(SIZE);
new Rng(77).fill(data);
const fast = { budgetMs: 1500, stallMs: 500, initialBackoffMs: 20, maxBackoffMs: 200 };

/** A range server with settable validators; records the conditional headers and counts connections. */
class RangeServer {
  etag: string | null = null;
  lastModified: string | null = null;
  connections = 0;
  requests = 0;
  seen: Array<{ ifMatch?: string; ifUnmodifiedSince?: string }> = [];
  private server!: http.Server;
  port = 0;

  async start(): Promise<this> {
    this.server = http.createServer((req, res) => this.handle(req, res));
    this.server.keepAliveTimeout = 30_000;
    this.server.on('connection', () => this.connections++);
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.port = (this.server.address() as net.AddressInfo).port;
    return this;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}/t.raw`;
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    this.requests++;
    const ifMatch = req.headers['if-match'];
    const ius = req.headers['if-unmodified-since'];
    this.seen.push({ ifMatch, ifUnmodifiedSince: ius as string | undefined });
    // RFC 9110 §13.1.1: If-Match uses the strong comparison; a weak tag (or none) never matches.
    if (ifMatch !== undefined && (this.etag === null || this.etag.startsWith('W/') || !ifMatch.split(/\s*,\s*/).includes(this.etag))) return void res.writeHead(412).end();
    // §13.1.4: only without If-Match; precondition false if modified after the date.
    if (ifMatch === undefined && ius !== undefined && this.lastModified !== null && Date.parse(this.lastModified) > Date.parse(ius as string)) return void res.writeHead(412).end();
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
    if (!m) return void res.writeHead(200, { 'Content-Length': String(SIZE) }).end(data);
    const a = Number(m[1]);
    const z = Math.min(Number(m[2]), SIZE - 1);
    const h: http.OutgoingHttpHeaders = { 'Content-Range': `bytes ${a}-${z}/${SIZE}`, 'Content-Length': String(z - a + 1) };
    if (this.etag !== null) h.ETag = this.etag;
    if (this.lastModified !== null) h['Last-Modified'] = this.lastModified;
    res.writeHead(206, h).end(data.subarray(a, z + 1));
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

const io = () => new StorageIo(parseRemoteConfig('remote.conf', `[http://127.0.0.1]\nretry-budget = 1500ms\nstall-timeout = 500ms\n`));
const D1 = 'Tue, 01 Sep 2026 10:00:00 GMT';
const D2 = 'Wed, 02 Sep 2026 11:00:00 GMT';

test.after(() => tmp.cleanup());

test('Last-Modified only: identity recorded at create, ranges conditional on it, a changed date refused at open and on the open source', async () => {
  const srv = await new RangeServer().start();
  srv.lastModified = D1;
  try {
    const img = path.join(tmp.caseDir(), 'vm.fvd');
    await FvdImage.create(io(), img, { base: srv.url, baseFormat: 'raw', blockSize: 65536 });
    const image = await FvdImage.open(io(), img, { readOnly: true });
    assert.is(image.baseIdentity, `size=${SIZE} last-modified=${D1}`);
    assert.ok(fs.readFileSync(img).includes(`last-modified=${D1}`), 'the identity is stored in the image');
    srv.seen.length = 0;
    const buf = Buffer.alloc(100_000);
    await image.read(buf, 300_000);
    assert.ok(buf.equals(data.subarray(300_000, 400_000)));
    assert.ok(srv.seen.length > 0);
    for (const s of srv.seen) assert.equal(s, { ifMatch: undefined, ifUnmodifiedSince: D1 });
    // Replaced on the server (same size, new date): the open source gets 412 and refuses.
    srv.lastModified = D2;
    const err = await image.read(Buffer.alloc(4096), MiB).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /changed on the server since it was opened \(HTTP 412\)/);
    await image.close();
    // And a new open of the image refuses the base with the clear error.
    const again = await FvdImage.open(io(), img, { readOnly: true }).then(() => null, (e: Error) => e);
    assert.match(again?.message ?? '', new RegExp(`changed since the image was created \\(now size=${SIZE} last-modified=${D2}, was size=${SIZE} last-modified=${D1}\\): refusing to mix old and new data`));
  } finally {
    await srv.stop();
  }
});

test('weak ETag: never sent in If-Match (it could not match); If-Unmodified-Since when a date is given; a changed weak tag is refused', async () => {
  const srv = await new RangeServer().start();
  srv.etag = 'W/"v1"';
  srv.lastModified = D1;
  try {
    const img = path.join(tmp.caseDir(), 'vm.fvd');
    await FvdImage.create(io(), img, { base: srv.url, baseFormat: 'raw', blockSize: 65536 });
    const image = await FvdImage.open(io(), img, { readOnly: true });
    assert.is(image.baseIdentity, `size=${SIZE} etag=W/"v1"`);
    srv.seen.length = 0;
    const buf = Buffer.alloc(200_000);
    await image.read(buf, 1000);
    assert.ok(buf.equals(data.subarray(1000, 201_000)), 'reads over a weak ETag work (a weak If-Match would be 412)');
    for (const s of srv.seen) assert.equal(s, { ifMatch: undefined, ifUnmodifiedSince: D1 });
    // The tag changes (date unchanged): the response's tag differs from the recorded one.
    srv.etag = 'W/"v2"';
    const err = await image.read(Buffer.alloc(4096), MiB).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /ETag changed \(W\/"v2" was W\/"v1"\)/);
    await image.close();
    const again = await FvdImage.open(io(), img, { readOnly: true }).then(() => null, (e: Error) => e);
    assert.match(again?.message ?? '', /changed since the image was created \(now size=\d+ etag=W\/"v2", was size=\d+ etag=W\/"v1"\)/);
    // A weak tag and no date: no precondition at all (nothing sound to send), reads still work.
    srv.lastModified = null;
    const src = await HttpSource.open(srv.url, { retry: fast });
    srv.seen.length = 0;
    await src.read(Buffer.alloc(4096), 0);
    assert.equal(srv.seen, [{ ifMatch: undefined, ifUnmodifiedSince: undefined }]);
    await src.close();
  } finally {
    await srv.stop();
  }
});

test('strong ETag: every range carries If-Match with it; a replaced object is refused (412)', async () => {
  const srv = await new RangeServer().start();
  srv.etag = '"abc-1"';
  srv.lastModified = D1;
  try {
    const src = await HttpSource.open(srv.url, { retry: fast, requestBytes: 256 * 1024 });
    assert.is(src.identity, `size=${SIZE} etag="abc-1"`);
    srv.seen.length = 0;
    await src.read(Buffer.alloc(MiB), 0);
    assert.is(srv.seen.length, 4);
    for (const s of srv.seen) assert.equal(s, { ifMatch: '"abc-1"', ifUnmodifiedSince: undefined });
    srv.etag = '"abc-2"';
    const err = await src.read(Buffer.alloc(4096), 0).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /changed on the server since it was opened \(HTTP 412\)/);
    await src.close();
  } finally {
    await srv.stop();
  }
});

test('keep-alive: 200 sequential reads reuse connections (at most `connections` TCP connections, not one per request)', async () => {
  const srv = await new RangeServer().start();
  srv.etag = '"k"';
  try {
    const src = await io().open(srv.url, { readOnly: true });
    const buf = Buffer.alloc(4096);
    for (let i = 0; i < 200; i++) {
      const off = ((i * 7919) % 500) * 4096;
      await src.read(buf, off);
      assert.ok(buf.equals(data.subarray(off, off + 4096)));
    }
    await src.close();
    assert.is(srv.requests, 201); // the open's probe and the reads
    assert.ok(srv.connections <= 4, `${srv.connections} TCP connections for ${srv.requests} requests`);
  } finally {
    await srv.stop();
  }
});

test.run();
