/**
 * fvd/decode-into.ts: deflate streams and zstd frames decoded into the caller's buffer by one
 * reused node:zlib decoder per kind, and by the *Sync fallback (allowReusedDecoders(false)), which
 * must give the same bytes, the same "too long" answer and an error for garbage. Streams of
 * different sizes follow each other (a decoder that kept state from the last stream would show),
 * and a stream after a failed one decodes (the failed decoder is replaced). The zstd cases need
 * Node's own zstd (Node >= 22.15); on older Node they are registered as skipped.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import zlib from 'node:zlib';
import { allowReusedDecoders, hasNodeZstd, inflateRawInto, zstdFrameInto } from '../../fvd/decode-into.js';
import { Rng } from '../helpers/rng.js';

const KiB = 1024;

type Into = (src: Uint8Array, out: Uint8Array, at: number, room: number) => number;
type Compress = (b: Uint8Array) => Uint8Array;

const zstdCompress = (zlib as unknown as { zstdCompressSync?: Compress }).zstdCompressSync;

/** Compressible bytes: runs of a few values with random lengths, and some noise. */
function sample(rng: Rng, length: number): Uint8Array {
  const b = new Uint8Array(length);
  for (let i = 0; i < length; ) {
    const run = 1 + rng.int(200);
    const v = rng.int(4) === 0 ? -1 : rng.int(256);
    for (let j = 0; j < run && i < length; j++, i++) b[i] = v < 0 ? rng.int(256) : v;
  }
  return b;
}

function exercise(kind: string, compress: Compress, into: Into): void {
  const rng = new Rng(0xdec0de);
  const out = new Uint8Array(200 * KiB);
  for (const reuse of [true, false]) {
    allowReusedDecoders(reuse);
    try {
      const how = `${kind}, ${reuse ? 'reused decoder' : '*Sync fallback'}`;
      for (const size of [64 * KiB, 1, 4 * KiB, 0, 65 * KiB, 64 * KiB - 1, 128 * KiB, 512]) {
        const data = sample(rng, size);
        const stream = compress(data);
        // Bytes after the stream must not be read: garbage follows it.
        const src = new Uint8Array(stream.length + 100);
        src.set(stream);
        src.fill(0xa5, stream.length);
        const at = rng.int(1000);
        out.fill(0x5a);
        const n = into(kind === 'zstd' ? stream : src, out, at, size + 512);
        assert.is(n, size, `${how}: ${size} bytes out`);
        assert.ok(Buffer.from(out.subarray(at, at + size)).equals(Buffer.from(data)), `${how}: ${size} bytes equal`);
        assert.is(out[at - 1] ?? 0x5a, 0x5a, `${how}: nothing written before the offset`);
        // Too long: room smaller than the stream's output, and room exactly the output (the
        // caller's spare byte decides; `room` out means "there was more").
        if (size > 0) {
          assert.is(into(kind === 'zstd' ? stream : src, out, 0, size - 1 || 1), size - 1 || 1, `${how}: ${size} bytes in a smaller room fill it`);
          assert.is(into(kind === 'zstd' ? stream : src, out, 0, size), size, `${how}: exactly ${size} bytes`);
        }
      }
      // Garbage fails with the decoder's error; the next stream decodes.
      const garbage = compress(sample(rng, 8 * KiB));
      garbage.fill(0xff, 4, Math.min(40, garbage.length));
      assert.throws(() => into(garbage, out, 0, 16 * KiB), undefined, `${how}: garbage throws`);
      const data = sample(rng, 32 * KiB);
      assert.is(into(compress(data), out, 0, 33 * KiB), 32 * KiB, `${how}: after an error`);
      assert.ok(Buffer.from(out.subarray(0, 32 * KiB)).equals(Buffer.from(data)), `${how}: after an error, equal`);
    } finally {
      allowReusedDecoders(true);
    }
  }
}

test('raw deflate into a buffer: reused inflater and inflateRawSync agree', () => {
  exercise('deflate', (b) => zlib.deflateRawSync(b), inflateRawInto);
});

(hasNodeZstd && zstdCompress ? test : test.skip)('zstd frames into a buffer: reused decoder and zstdDecompressSync agree (Node >= 22.15)', () => {
  exercise('zstd', zstdCompress!, zstdFrameInto);
});

test.run();
