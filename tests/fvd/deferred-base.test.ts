/**
 * fvd/deferred-base.ts without a server: the opener is a function the test controls. Reads that
 * arrive while an open is in flight share it (one open, not one per read); a failed open is
 * retried by the next read; a refusal (EINVAL) is final and reported once; close during an open
 * closes the base that open returns; openOrDefer defers only URLs, only with a report, and never
 * a refusal.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { DeferredBase, openOrDefer } from '../../fvd/deferred-base.js';
import { FvdError } from '../../fvd/errors.js';
import type { BaseImage } from '../../fvd/image-types.js';

const SIZE = 1 << 20;
const URL_PATH = 'http://templates.example/t.raw';

/** A base whose bytes are their offset's low byte; counts its closes. */
function fakeBase(): BaseImage & { closes: number } {
  return {
    size: SIZE,
    closes: 0,
    async read(buf: Uint8Array, offset: number) {
      for (let i = 0; i < buf.length; i++) buf[i] = (offset + i) & 0xff;
    },
    async knownZero() {
      return false;
    },
    async close() {
      this.closes++;
    },
    describe: () => [{ path: URL_PATH, format: 'raw', size: SIZE }],
    fileIds: () => [],
  };
}

/** An opener the test resolves or rejects by hand, one call at a time. */
function manualOpener() {
  const calls: { resolve: (b: BaseImage) => void; reject: (e: Error) => void }[] = [];
  const open = () => new Promise<BaseImage>((resolve, reject) => calls.push({ resolve, reject }));
  return { open, calls };
}

const tick = () => new Promise((r) => setImmediate(r));

test('reads during an open share it; a failed open is retried by the next read; the opened base serves every read after', async () => {
  const { open, calls } = manualOpener();
  const events: string[] = [];
  const d = new DeferredBase(open, SIZE, 'size=1048576', { path: URL_PATH, format: 'raw', size: SIZE }, (e) => events.push(e));
  const a = d.read(new Uint8Array(4), 0);
  const b = d.read(new Uint8Array(4), 8);
  await tick();
  assert.is(calls.length, 1, 'two reads, one open');
  calls[0].reject(new FvdError('base image: ECONNREFUSED', 'EIO'));
  for (const r of [a, b]) {
    const err = await r.then(() => null, (e: FvdError) => e);
    assert.is(err?.code, 'EIO');
  }
  assert.not.ok(d.isOpen);
  const buf = new Uint8Array(4);
  const c = d.read(buf, 16);
  await tick();
  assert.is(calls.length, 2, 'the next read tries again');
  const base = fakeBase();
  calls[1].resolve(base);
  await c;
  assert.equal([...buf], [16, 17, 18, 19]);
  assert.ok(d.isOpen);
  await d.read(buf, 32);
  assert.is(calls.length, 2, 'an open base is not opened again');
  assert.equal(events, ['opened']);
  assert.equal(d.describe(), base.describe());
  await d.close();
  assert.is(base.closes, 1);
});

test('a refusal (EINVAL: wrong size or identity) is final, reported once, and every read fails with EIO', async () => {
  const { open, calls } = manualOpener();
  const events: string[] = [];
  const d = new DeferredBase(open, SIZE, undefined, { path: URL_PATH, format: 'raw', size: SIZE }, (e, detail) => events.push(`${e}: ${detail}`));
  const a = d.read(new Uint8Array(4), 0);
  await tick();
  calls[0].reject(new FvdError('base changed since the image was created', 'EINVAL'));
  for (const r of [a, d.read(new Uint8Array(4), 0), d.read(new Uint8Array(4), 0)]) {
    const err = await r.then(() => null, (e: FvdError) => e);
    assert.is(err?.code, 'EIO');
    assert.match(err!.message, /changed since/);
  }
  assert.is(calls.length, 1, 'a refused base is not opened again');
  assert.equal(events, ['refused: base changed since the image was created']);
  assert.not.ok(await d.knownZero(0, 4096), 'unknown while not open');
  assert.equal(d.describe(), [{ path: URL_PATH, format: 'raw', size: SIZE }]);
});

test('close during an open: the base that open returns is closed, the waiting read fails', async () => {
  const { open, calls } = manualOpener();
  const d = new DeferredBase(open, SIZE, undefined, { path: URL_PATH, format: 'raw', size: SIZE });
  const r = d.read(new Uint8Array(4), 0).then(() => null, (e: FvdError) => e);
  await tick();
  const closing = d.close();
  const base = fakeBase();
  calls[0].resolve(base);
  await closing;
  assert.match((await r)?.message ?? '', /read after close/);
  assert.is(base.closes, 1);
  assert.not.ok(d.isOpen);
  const late = await d.read(new Uint8Array(4), 0).then(() => null, (e: FvdError) => e);
  assert.match(late?.message ?? '', /read after close/);
});

test('openOrDefer: defers an unreachable URL base only with a report; a local path, a refusal or no report throws', async () => {
  const down = () => Promise.reject(new FvdError('base image: ECONNREFUSED', 'EIO'));
  const refused = () => Promise.reject(new FvdError('base image is 5 bytes but was 6 bytes', 'EINVAL'));
  const events: string[] = [];
  const report = (e: string, detail: string) => events.push(`${e}: ${detail}`);
  const d = await openOrDefer(down, URL_PATH, 'raw', SIZE, 'size=1048576', report);
  assert.ok(d instanceof DeferredBase);
  assert.is(d.size, SIZE);
  assert.is(d.identity, 'size=1048576');
  assert.ok(d.remote);
  assert.equal(events, ['unreachable: base image: ECONNREFUSED']);
  for (const [opener, where, rep] of [
    [down, '/images/t.raw', report],
    [refused, URL_PATH, report],
    [down, URL_PATH, undefined],
  ] as const) {
    const err = await openOrDefer(opener, where, 'raw', SIZE, null, rep).then(() => null, (e: Error) => e);
    assert.ok(err instanceof FvdError, `${where}: thrown`);
  }
  const base = fakeBase();
  assert.is(await openOrDefer(async () => base, URL_PATH, 'raw', SIZE, null, report), base, 'reachable: the base itself');
  assert.is(events.length, 1);
});

test.run();
