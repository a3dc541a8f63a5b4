/**
 * isZero (fvd/bytes.ts), which zero detection at create, commit, rebase, resize and `fvd convert`
 * use to tell zero data from data: a memcmp against a 64 KiB zero buffer, piece by piece. Checked
 * against the plain byte loop on every length around the piece size, with the one non-zero byte
 * at each edge, in views that start inside their buffer.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { isZero } from '../../fvd/bytes.js';

const bytewise = (b: Uint8Array): boolean => b.every((x) => x === 0);
const PIECE = 64 * 1024;

test('isZero equals the byte loop: empty, short, piece edges, long; non-zero first, last, at piece joins', () => {
  const backing = new Uint8Array(3 * PIECE + 64);
  const lengths = [0, 1, 7, 511, 512, PIECE - 1, PIECE, PIECE + 1, 2 * PIECE, 2 * PIECE + 3, 3 * PIECE];
  let checked = 0;
  for (const start of [0, 5]) {
    for (const len of lengths) {
      const view = backing.subarray(start, start + len);
      assert.ok(isZero(view), `all zero: start ${start}, length ${len}`);
      for (const at of new Set([0, len - 1, PIECE - 1, PIECE, 2 * PIECE - 1, 2 * PIECE].filter((i) => i >= 0 && i < len))) {
        view[at] = 0x80;
        assert.is(isZero(view), bytewise(view), `start ${start}, length ${len}, non-zero at ${at}`);
        assert.not.ok(isZero(view), `start ${start}, length ${len}, non-zero at ${at}`);
        view[at] = 0;
        checked++;
      }
      // The byte just past the view must not count.
      if (start + len < backing.length) {
        backing[start + len] = 1;
        assert.ok(isZero(view), `a non-zero byte after the view (start ${start}, length ${len}) is outside it`);
        backing[start + len] = 0;
      }
    }
  }
  assert.ok(checked > 40, `${checked} cases`);
});

test.run();
