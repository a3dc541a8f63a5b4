/**
 * The NBD client's receive path under a server that answers out of order and in odd pieces
 * (tests/helpers/fake-nbd.ts): many reads in flight, replies shuffled across requests, chunks of
 * one reply shuffled, the byte stream cut at random (often inside a header). The client reads a
 * data payload straight into the request's buffer (storage/nbd-source.ts, readBuffer), so every
 * boundary must land each byte in its own request at its own place. Then a prefetch over a server
 * that dies mid-stream: a one-line error, an image that reopens, checks clean, reads equal to the
 * export, and keeps the blocks it fetched (a second prefetch fetches only the rest).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { NbdSource } from '../../storage/nbd-source.js';
import { FakeNbd } from '../helpers/fake-nbd.js';
import { Rng } from '../helpers/rng.js';
import { TempDir, assertOk, assertOneLineError, fvdAsync } from '../helpers/cli.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const tmp = new TempDir('fvd-nbd-pipeline-');

/** Random data with all-zero 64 KiB stretches (holes: block status ZERO, OFFSET_HOLE chunks). */
function exportData(size: number, rng: Rng): { data: Uint8Array; allocated: number } {
  const data = new Uint8Array(size);
  let allocated = 0;
  for (let o = 0; o < size; o += 64 * KiB) {
    if (rng.int(4) === 0) continue;
    const n = Math.min(64 * KiB, size - o);
    data.set(rng.bytes(n), o);
    data[o] = 1; // never all zeros
    allocated += n;
  }
  return { data, allocated };
}

for (const seed of [1, 2]) {
  test(`reads in flight, replies out of order and cut anywhere (seed ${seed}): every byte lands in its own request`, async () => {
    const dir = tmp.caseDir();
    const rng = new Rng(seed);
    const { data } = exportData(4 * MiB + 4 * KiB, rng);
    const server = await new FakeNbd(data, path.join(dir, 's.sock'), new Rng(seed + 10)).start();
    const src = await NbdSource.open(server.url, { connections: 8, requestBytes: 64 * KiB });
    try {
      const reads: Array<{ buf: Uint8Array; offset: number }> = [];
      for (let i = 0; i < 48; i++) {
        const offset = rng.int(4) === 0 ? rng.int(data.length) : rng.int(data.length / 4096) * 4096; // some unaligned
        const len = 1 + rng.int(Math.min(300 * KiB, data.length - offset));
        reads.push({ buf: new Uint8Array(len).fill(0xee), offset });
      }
      await Promise.all(reads.map((r) => src.read(r.buf, r.offset)));
      for (const r of reads) {
        const want = data.subarray(r.offset, r.offset + r.buf.length);
        assert.ok(Buffer.from(r.buf).equals(want), `read ${r.offset}+${r.buf.length} differs from the export`);
      }
      assert.ok(src.maxInFlight > 4, `at most ${src.maxInFlight} requests in flight`);
      assert.ok(server.outOfOrder > 0, 'the server answered in order: the test did not reorder');
    } finally {
      await src.close();
      await server.close();
    }
  });
}

test('prefetch over a server that dies mid-stream: one line, the image reopens clean, equals the export, keeps what it fetched', async () => {
  const dir = tmp.caseDir();
  const rng = new Rng(5);
  const { data, allocated } = exportData(24 * MiB, rng);
  const sock = path.join(dir, 's.sock');
  const conf = path.join(dir, 'remote.conf');
  fs.writeFileSync(conf, `[nbd+unix://]\nretry-budget = 1500ms\nstall-timeout = 500ms\nrequest-size = 256K\n`);
  const saved = process.env.FVD_REMOTE_CONFIG;
  process.env.FVD_REMOTE_CONFIG = conf;
  const img = path.join(dir, 'img.fvd');
  let server = await new FakeNbd(data, sock, new Rng(6)).start();
  try {
    const created = await fvdAsync('create', '-b', server.url, '-F', 'raw', img);
    assert.is(created.code, 0, created.stderr);
    server.dieAfterBytes = server.sentBytes + Math.floor(allocated / 2);
    const r = await fvdAsync('prefetch', '-q', '--chunk', '1M', img);
    assert.ok(server.dead, 'the server did not die');
    assertOneLineError(r, [/prefetch failed after/, /gave up after|connection/]);

    fs.rmSync(sock, { force: true });
    server = await new FakeNbd(data, sock, new Rng(7)).start();
    assertOk(await fvdAsync('check', img));
    const flat = path.join(dir, 'flat.raw');
    assertOk(await fvdAsync('convert', '-O', 'raw', img, flat));
    assert.ok(fs.readFileSync(flat).equals(Buffer.from(data)), 'the image does not read as the export after the failed prefetch');
    const info = JSON.parse((await fvdAsync('info', '--output=json', img)).stdout) as Record<string, unknown>;
    const inBase = Number(info['bytesInBase']);
    assert.ok(inBase > 0 && inBase < allocated, `in base after the failed prefetch: ${inBase} of ${allocated} (${JSON.stringify(info)})`);

    const again = await fvdAsync('prefetch', '-q', img);
    assertOk(again);
    const fetched = Number(/(\d+) bytes fetched/.exec(again.stdout)?.[1]);
    assert.is(fetched, inBase, 'the second prefetch fetched exactly what was still in the base');
    const flat2 = path.join(dir, 'flat2.raw');
    assertOk(await fvdAsync('convert', '-O', 'raw', img, flat2));
    assert.ok(fs.readFileSync(flat2).equals(Buffer.from(data)), 'the image does not equal the export after the second prefetch');
  } finally {
    if (saved === undefined) delete process.env.FVD_REMOTE_CONFIG;
    else process.env.FVD_REMOTE_CONFIG = saved;
    await server.close().catch(() => {});
  }
});

test.after(() => tmp.cleanup());
test.run();
