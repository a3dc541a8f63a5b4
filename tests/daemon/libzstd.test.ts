/**
 * ffi/libzstd.ts: the system's libzstd through koffi, the CLI's zstd decoder on Node versions
 * without node:zlib's. Frames are built here by hand (zstd's format, RFC 8878 §3.1.1: a raw
 * block), so the test needs no compressor; qemu-img's frames are decoded in tests/fvd/qcow2*.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { openLibzstd } from '../../ffi/libzstd.js';
import { allowNativeZstd, prepareCompression, registerZstdDecoder } from '../../fvd/qcow2-decompress.js';
import { registerZstdFallback } from '../../daemon/zstd-fallback.js';

/** One zstd frame holding `content` (≤ 255 bytes) in one raw block, with its size declared. */
function rawFrame(content: Uint8Array): Buffer {
  const header = Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0x20, content.length]); // magic; single segment, 1-byte size
  const block = 1 | (0 << 1) | (content.length << 3); // last block, raw, its size
  return Buffer.concat([header, Buffer.from([block & 0xff, (block >> 8) & 0xff, block >> 16]), content]);
}

const content = Buffer.from(Array.from({ length: 200 }, (_, i) => (i * 7 + 3) & 0xff));

test('decodes a frame into the middle of a buffer, nothing written around it; the context is reused', () => {
  const into = openLibzstd();
  const out = Buffer.alloc(1000, 0xee);
  for (let round = 0; round < 3; round++) {
    assert.is(into(rawFrame(content), out, 300, 500), 200);
    assert.ok(out.subarray(300, 500).equals(content));
    assert.ok(out.subarray(0, 300).every((b) => b === 0xee), 'before the room');
    assert.ok(out.subarray(500).every((b) => b === 0xee), 'after the content');
  }
});

test('a corrupt frame and a frame larger than the room throw zstd\'s own reason', () => {
  const into = openLibzstd();
  const out = Buffer.alloc(1000);
  const corrupt = rawFrame(content);
  corrupt[6] |= 0b110; // block type 3: reserved
  assert.throws(() => into(corrupt, out, 0, 1000), /^zstd: .*corrupt/i);
  assert.throws(() => into(rawFrame(content), out, 0, 199), /^zstd: Destination buffer is too small/);
  assert.is(into(rawFrame(content), out, 0, 200), 200, 'the context still decodes after errors');
  // Room past the end of the buffer: the capacity is what the buffer has, not what was asked.
  const short = Buffer.alloc(250, 0xee);
  const tail = short.subarray(0, 240);
  assert.throws(() => into(rawFrame(content), tail, 100, 200), /^zstd: Destination buffer is too small/);
  assert.ok(short.subarray(240).every((b) => b === 0xee), 'nothing written past the end of the view');
});

test('a library that cannot be loaded: a one-line error naming it', () => {
  let message = '';
  try {
    openLibzstd('libzstd-missing-for-test.so.1');
  } catch (err) {
    message = (err as Error).message;
  }
  assert.match(message, /^cannot load libzstd-missing-for-test\.so\.1: /);
  assert.not.match(message, /\n/);
});

test('the CLI\'s provider loads it; a provider that fails to load refuses a zstd image at open', async () => {
  allowNativeZstd(false);
  try {
    registerZstdFallback();
    await prepareCompression('t.qcow2', 'zstd');
    registerZstdDecoder({ load: async () => openLibzstd('libzstd-missing-for-test.so.1'), worker: null });
    let message = '';
    await prepareCompression('t.qcow2', 'zstd').catch((err: Error) => (message = err.message));
    assert.match(message, /^t\.qcow2: qcow2 image uses zstd compression, and the zstd decoder did not load: cannot load libzstd-missing/);
  } finally {
    allowNativeZstd(true);
    registerZstdFallback();
  }
});

test.run();
