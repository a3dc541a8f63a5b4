/**
 * convert's background flushes (daemon/commands/convert.ts, Writeback): one flush started per
 * WRITEBACK_BYTES written, never two at once, and a flush that fails ends the copy with its error.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { WRITEBACK_BYTES, Writeback } from '../../daemon/commands/convert.js';

/** A target whose flushes stay pending until the test settles them. */
function target() {
  const flushes: { resolve: () => void; reject: (e: Error) => void }[] = [];
  const disk = { flush: () => new Promise<void>((resolve, reject) => void flushes.push({ resolve, reject })) };
  return { disk, flushes };
}

test('a flush starts after every WRITEBACK_BYTES written, one at a time; settled() waits for it', async () => {
  const { disk, flushes } = target();
  const wb = new Writeback(disk);
  wb.wrote(WRITEBACK_BYTES - 1);
  assert.is(flushes.length, 0, 'not before WRITEBACK_BYTES');
  wb.wrote(1);
  assert.is(flushes.length, 1, 'one flush at WRITEBACK_BYTES');
  wb.wrote(3 * WRITEBACK_BYTES);
  assert.is(flushes.length, 1, 'none while one is in flight');
  let settled = false;
  const done = wb.settled().then(() => (settled = true));
  await new Promise((r) => setImmediate(r));
  assert.not.ok(settled, 'settled() waits for the flush in flight');
  flushes[0]!.resolve();
  await done;
  wb.wrote(WRITEBACK_BYTES);
  assert.is(flushes.length, 2, 'the next flush once the first is done');
  flushes[1]!.resolve();
  await wb.settled();
});

test('a background flush that fails: the next write and settled() throw its error', async () => {
  const { disk, flushes } = target();
  const wb = new Writeback(disk);
  wb.wrote(WRITEBACK_BYTES);
  flushes[0]!.reject(new Error('EIO: flush failed'));
  await new Promise((r) => setImmediate(r));
  assert.throws(() => wb.wrote(1), /EIO: flush failed/);
  try {
    await wb.settled();
    assert.unreachable('settled() resolved');
  } catch (err) {
    assert.match(String(err), /EIO: flush failed/);
  }
});

test.run();
