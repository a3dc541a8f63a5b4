/**
 * The NBD client's checks of what a server answers (storage/nbd-source.ts), against a server that
 * garbles its read replies on purpose (tests/helpers/fake-nbd.ts, `fault`): data or hole chunks
 * outside the request, chunks overlapping each other, a data chunk without data, a reply that covers less than the request before DONE, bad
 * magic, a cookie of no request, an unknown chunk type, error chunks and simple error replies, a
 * simple reply with data where structured replies were negotiated, a
 * reply cut short on a connection that then goes silent — with structured replies and without
 * (the server refuses NBD_OPT_STRUCTURED_REPLY: simple replies, the data after the header).
 *
 * Each fault, sent for every reply: the read fails with one line naming the problem (EIO), the
 * caller's buffer holds nothing but its sentinel or the export's own bytes at their own place
 * (a failed read may leave real data from the chunks that were right, never what a bad chunk
 * carried: the fake sends inverted bytes there), and once the server behaves, reads are right
 * again (after a protocol error the client drops the connection and makes another). Each transient
 * fault, sent once: the read is retried and returns the export, also among many reads in flight.
 * Every test is bounded in time: a hang fails it.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import path from 'node:path';
import { NbdSource } from '../../storage/nbd-source.js';
import { CoveredRanges } from '../../storage/covered-ranges.js';
import { FvdError } from '../../fvd/errors.js';
import { FakeNbd, type NbdFault } from '../helpers/fake-nbd.js';
import { Rng } from '../helpers/rng.js';
import { TempDir } from '../helpers/cli.js';

const KiB = 1024;
const tmp = new TempDir('fvd-nbd-replies-');
const SENTINEL = 0xee;
const SIZE = 256 * KiB;
const DATA = new Rng(11).bytes(SIZE);
/** One read, one request (requestBytes 64 KiB), not at a chunk-friendly place. */
const OFFSET = 12_345;
const LENGTH = 40_000;

/**
 * Fail-fast retries: the first failure's back-off is cut to what is left of the 1.5 s budget
 * (storage/retry.ts spends a budget), so a persistent fault gets a second, last attempt about
 * 50 ms before the end and fails then; the error names the fault even when that last attempt ran
 * out of time (BudgetSpent is not a cause). The stall timeout is 500 ms, not less: on a busy host
 * 150 ms of silence happened during open.
 */
const ONE_ATTEMPT = { budgetMs: 1500, stallMs: 500, initialBackoffMs: 6000, maxBackoffMs: 6000 };
/**
 * The same for a reply of 16385 one-byte chunks: parsing it took over 1.5 s on a loaded CI host,
 * so the budget ran out before the limit was reached and the error said "no complete answer"
 * instead of naming the protocol error. 8 s is room for that; the test then takes the 8 s.
 */
const ONE_LONG_ATTEMPT = { budgetMs: 8000, stallMs: 4000, initialBackoffMs: 60_000, maxBackoffMs: 60_000 };
/** Room to retry: a fault sent once is outlived. */
const RETRYING = { budgetMs: 6000, stallMs: 500, initialBackoffMs: 10, maxBackoffMs: 50 };

interface Case {
  fault: NbdFault;
  structured: boolean;
  /** What the message must say (the cause, as the client words it). */
  message: RegExp;
  /** Retried (a protocol error or a short reply) rather than failing at once (the server's error). */
  transient: boolean;
}

const CASES: Case[] = [
  { fault: 'past-end', structured: true, message: /reply chunk \d+\+\d+ outside the request 12345\+40000/, transient: true },
  { fault: 'before-start', structured: true, message: /reply chunk 12344\+\d+ outside the request 12345\+40000/, transient: true },
  { fault: 'overlap', structured: true, message: /overlapping reply chunks at \d+/, transient: true },
  { fault: 'short-coverage', structured: true, message: /read reply covered 39999 of 40000 bytes/, transient: true },
  { fault: 'hole-past-end', structured: true, message: /reply chunk \d+\+\d+ outside the request 12345\+40000/, transient: true },
  { fault: 'empty-data', structured: true, message: /bad OFFSET_DATA chunk/, transient: true },
  { fault: 'unknown-type', structured: true, message: /unknown chunk type 42/, transient: true },
  { fault: 'bad-magic', structured: true, message: /bad reply magic 0x12345678/, transient: true },
  { fault: 'unknown-cookie', structured: true, message: /reply for unknown cookie 1:\d+/, transient: true },
  { fault: 'stall', structured: true, message: /stalled: nothing received for 500 ms/, transient: true },
  { fault: 'error-chunk', structured: true, message: /^nbd\+unix:\/\/\/\?socket=\S+: bytes \d+-\d+: server error EIO: media error$/, transient: false },
  { fault: 'error-offset', structured: true, message: /^nbd\+unix:\/\/\/\?socket=\S+: bytes \d+-\d+: server error EIO: media error$/, transient: false },
  { fault: 'simple-error', structured: true, message: /^nbd\+unix:\/\/\/\?socket=\S+: bytes \d+-\d+: server error EIO$/, transient: false },
  { fault: 'simple-data', structured: true, message: /simple reply to a read with structured replies/, transient: true },
  { fault: 'bad-magic', structured: false, message: /bad reply magic 0x668e33ef/, transient: true },
  { fault: 'unknown-cookie', structured: false, message: /reply for unknown cookie 1:\d+/, transient: true },
  { fault: 'stall', structured: false, message: /stalled: nothing received for 500 ms/, transient: true },
  { fault: 'simple-error', structured: false, message: /^nbd\+unix:\/\/\/\?socket=\S+: bytes \d+-\d+: server error EIO$/, transient: false },
];

/** Rejects if `p` takes longer than `ms`: a hang fails the test instead of stalling the run. */
async function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no end within ${ms} ms (hang)`)), ms);
  });
  try {
    return await Promise.race([p, late]);
  } finally {
    clearTimeout(timer);
  }
}

async function withServer(c: { structured: boolean }, seed: number, fn: (server: FakeNbd) => Promise<void>): Promise<void> {
  const server = new FakeNbd(DATA, path.join(tmp.caseDir(), 's.sock'), new Rng(seed));
  server.structured = c.structured;
  await server.start();
  try {
    await fn(server);
  } finally {
    await server.close();
  }
}

/** Every byte is the sentinel or the export's own byte at that place. */
function assertNothingForeign(buf: Uint8Array, offset: number, what: string): void {
  for (let i = 0; i < buf.length; i++) {
    const v = buf[i]!;
    if (v !== SENTINEL && v !== DATA[offset + i]) assert.unreachable(`${what}: byte ${offset + i} is 0x${v.toString(16)}, neither the sentinel nor the export's 0x${DATA[offset + i]!.toString(16)}`);
  }
}

function assertExport(buf: Uint8Array, offset: number, what: string): void {
  assert.ok(Buffer.from(buf).equals(DATA.subarray(offset, offset + buf.length)), `${what}: read ${offset}+${buf.length} differs from the export`);
}

const mode = (c: { structured: boolean }) => (c.structured ? 'structured' : 'simple replies');

for (const c of CASES) {
  test(`${c.fault} (${mode(c)}), every reply: one line naming it, EIO, no foreign byte in the buffer; then reads are right`, async () => {
    await withServer(c, 21, async (server) => {
      server.fault = c.fault;
      const src = await NbdSource.open(server.url, { requestBytes: 64 * KiB, retry: ONE_ATTEMPT });
      try {
        const buf = new Uint8Array(LENGTH).fill(SENTINEL);
        const err = await within(8000, 'faulty read', src.read(buf, OFFSET).then(() => null, (e: unknown) => e));
        assert.ok(server.faultsSent >= 1, 'the fault was never sent');
        assert.ok(err instanceof FvdError, `the read resolved or failed with no FvdError: ${String(err)}`);
        assert.is(err.code, 'EIO');
        assert.not.match(err.message, /\n/);
        assert.match(err.message, c.message, `the message does not name the fault: ${err.message}`);
        // Transient faults: retried until the budget is spent, and the cause is named; the server's
        // own errors: not retried.
        if (c.transient) assert.match(err.message, /^nbd\+unix:.*: bytes 12345-52344: .*\(gave up after \d+ attempts in [\d.]+ s\)$/);
        if (c.transient) assert.ok(src.stats.retries >= 1, `a transient fault was not retried`);
        else assert.is(src.stats.retries, 0);
        assertNothingForeign(buf, OFFSET, 'after the failed read');

        server.fault = null;
        const connections = server.connections;
        const again = new Uint8Array(LENGTH).fill(SENTINEL);
        await within(8000, 'read after the fault', src.read(again, OFFSET));
        assertExport(again, OFFSET, 'after the fault');
        // A protocol error or a stall drops the connection (the stream cannot be trusted); the
        // server's own error or a short reply leaves it in step and in use.
        const dropped = c.transient && c.fault !== 'short-coverage';
        assert.is(server.connections, connections + (dropped ? 1 : 0), dropped ? 'no new connection after a protocol error' : 'a new connection after a well-framed reply');
      } finally {
        await src.close();
      }
    });
  });
}

for (const c of CASES.filter((c) => c.transient)) {
  test(`${c.fault} (${mode(c)}), once: the read is retried and equals the export`, async () => {
    await withServer(c, 22, async (server) => {
      server.fault = c.fault;
      server.faultTimes = 1;
      const src = await NbdSource.open(server.url, { requestBytes: 64 * KiB, retry: RETRYING });
      try {
        const buf = new Uint8Array(LENGTH).fill(SENTINEL);
        await within(10_000, 'retried read', src.read(buf, OFFSET));
        assert.is(server.faultsSent, 1);
        assert.is(src.stats.retries, 1);
        assertExport(buf, OFFSET, 'the retried read');
      } finally {
        await src.close();
      }
    });
  });
}

for (const c of CASES.filter((c) => c.transient && ['overlap', 'bad-magic', 'unknown-cookie', 'stall'].includes(c.fault))) {
  test(`${c.fault} (${mode(c)}) in one reply among many in flight: the requests it failed are retried, every read equals the export`, async () => {
    await withServer(c, 23, async (server) => {
      server.fault = c.fault;
      server.faultAt = 5;
      server.faultTimes = 1;
      const rng = new Rng(24);
      const src = await NbdSource.open(server.url, { connections: 8, requestBytes: 16 * KiB, retry: RETRYING });
      try {
        const reads = Array.from({ length: 16 }, () => {
          const offset = rng.int(SIZE - 1);
          return { offset, buf: new Uint8Array(1 + rng.int(Math.min(48 * KiB, SIZE - offset))).fill(SENTINEL) };
        });
        await within(10_000, 'reads in flight', Promise.all(reads.map((r) => src.read(r.buf, r.offset))));
        assert.is(server.faultsSent, 1);
        assert.ok(src.stats.retries >= 1, 'nothing was retried');
        assert.ok(src.maxInFlight > 1, 'one request in flight at a time');
        for (const r of reads) assertExport(r.buf, r.offset, 'a read in flight with the faulty reply');
      } finally {
        await src.close();
      }
    });
  });
}

test('without structured replies (simple replies, data after the header): reads of random ranges in flight equal the export', async () => {
  await withServer({ structured: false }, 25, async (server) => {
    const rng = new Rng(26);
    const src = await NbdSource.open(server.url, { connections: 8, requestBytes: 16 * KiB, retry: RETRYING });
    try {
      assert.is(src.hasBlockStatus, false, 'block status without structured replies');
      const reads = Array.from({ length: 48 }, () => {
        const offset = rng.int(SIZE);
        return { offset, buf: new Uint8Array(1 + rng.int(Math.min(100 * KiB, SIZE - offset))).fill(SENTINEL) };
      });
      reads.push({ offset: SIZE - 10, buf: new Uint8Array(30).fill(SENTINEL) }); // past the end: zeros
      await within(10_000, 'reads', Promise.all(reads.map((r) => src.read(r.buf, r.offset))));
      for (const r of reads) {
        const inside = Math.min(r.buf.length, SIZE - r.offset);
        assertExport(r.buf.subarray(0, inside), r.offset, 'simple replies');
        assert.ok(r.buf.subarray(inside).every((v) => v === 0), 'bytes past the export are not zeros');
      }
      assert.ok(src.maxInFlight > 4, `at most ${src.maxInFlight} requests in flight`);
      assert.ok(server.outOfOrder > 0, 'the server answered in order: the test did not reorder');
      assert.is(src.stats.retries, 0);
    } finally {
      await src.close();
    }
  });
});

test('a read split into one-byte chunks in shuffled order (4000 chunks) reads right; one of 40000 chunks is refused as a protocol error, not worked through', async () => {
  await withServer({ structured: true }, 27, async (server) => {
    server.splitReads = 1;
    const src = await NbdSource.open(server.url, { requestBytes: 64 * KiB, retry: ONE_LONG_ATTEMPT });
    try {
      const small = new Uint8Array(4000).fill(SENTINEL);
      await within(10_000, 'read in 4000 chunks', src.read(small, OFFSET));
      assertExport(small, OFFSET, 'one-byte chunks');
      assert.is(src.stats.retries, 0);
      const big = new Uint8Array(LENGTH).fill(SENTINEL);
      const err = await within(12_000, 'read in 40000 chunks', src.read(big, OFFSET).then(() => null, (e: unknown) => e));
      assert.ok(err instanceof FvdError, `a reply of ${LENGTH} chunks was accepted`);
      assert.match(err.message, /^nbd\+unix:.*: bytes 12345-52344: protocol error: more than 16384 reply chunks for one request \(gave up after \d+ attempts in [\d.]+ s\)$/);
      assertNothingForeign(big, OFFSET, 'after the refused reply');
    } finally {
      await src.close();
    }
  });
});

for (const [fault, message] of [['twice', /a second BLOCK_STATUS chunk for base:allocation/], ['misaligned', /bad BLOCK_STATUS chunk/]] as const) {
  test(`block status reply ${fault}: the open (which maps the zero extents) fails in one line naming it; without the map the export reads right`, async () => {
    await withServer({ structured: true }, 29, async (server) => {
      server.statusFault = fault;
      const err = await within(8000, 'open', NbdSource.open(server.url, { retry: ONE_ATTEMPT }).then(() => null, (e: unknown) => e));
      assert.ok(err instanceof FvdError, `an open over a bad block status reply succeeded: ${String(err)}`);
      assert.is(err.code, 'EIO');
      assert.not.match(err.message, /\n/);
      assert.match(err.message, message);
      assert.match(err.message, /: block status at 0: /);
      const src = await NbdSource.open(server.url, { retry: ONE_ATTEMPT, mapZeroes: false });
      try {
        const buf = new Uint8Array(LENGTH).fill(SENTINEL);
        await within(8000, 'read', src.read(buf, OFFSET));
        assertExport(buf, OFFSET, 'without the zero map');
      } finally {
        await src.close();
      }
    });
  });
}

test('CoveredRanges against a byte map: random chunks accepted iff they overlap nothing, merged, whole coverage seen exactly', () => {
  const rng = new Rng(28);
  for (let round = 0; round < 300; round++) {
    const length = 1 + rng.int(300);
    const map = new Uint8Array(length);
    const c = new CoveredRanges();
    for (let k = 0; k < 60; k++) {
      const a = rng.int(length);
      const z = a + 1 + rng.int(Math.min(length - a, 1 + rng.int(40)));
      const free = map.subarray(a, z).every((v) => v === 0);
      assert.is(c.add(a, z), free, `round ${round}: [${a}, ${z}) over ${Array.from(map).join('')}`);
      if (free) map.fill(1, a, z);
      let bytes = 0;
      let runs = 0;
      for (let i = 0; i < length; i++) {
        bytes += map[i]!;
        if (map[i] && (i === 0 || !map[i - 1])) runs++;
      }
      assert.is(c.bytes(), bytes);
      assert.is(c.ranges, runs, 'touching ranges are not merged');
      assert.is(c.coversWhole(length), bytes === length);
    }
  }
  // A partition added in a random order ends as one range.
  const cuts = [0, 100, 101, 250, 251, 252, 400];
  const parts = cuts.slice(1).map((z, i) => [cuts[i]!, z] as const);
  for (let i = parts.length - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [parts[i], parts[j]] = [parts[j]!, parts[i]!];
  }
  const c = new CoveredRanges();
  for (const [a, z] of parts) assert.ok(c.add(a, z));
  assert.ok(c.coversWhole(400));
  assert.is(c.ranges, 1);
});

test.after(() => tmp.cleanup());
test.run();
