/**
 * fvd/crypto.ts on its own: XTS-AES-256 from ECB against node's own aes-256-xts (sector by
 * sector) and the IEEE 1619 vector, the zero-sector rule, unaligned buffers, key sealing and
 * unlocking, and validation of the encryption fields.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { FvdError } from '../../fvd/errors.js';
import {
  BufferPool,
  CRYPT_LENGTH,
  KeyError,
  XtsCipher,
  parseCryptFields,
  sealNewKey,
  unlock,
} from '../../fvd/crypto.js';
import { Rng } from '../helpers/rng.js';

const FAST_KDF = { log2N: 10, r: 8, p: 1 };

/** The reference: one node:crypto aes-256-xts cipher per sector, tweak = LE sector number. */
function nativeXts(key: Uint8Array, data: Uint8Array, sector: number, encrypt: boolean): Buffer {
  const out = Buffer.alloc(data.length);
  const iv = Buffer.alloc(16);
  for (let s = 0; s < data.length / 512; s++) {
    iv.writeBigUInt64LE(BigInt(sector + s), 0);
    const c = encrypt ? createCipheriv('aes-256-xts', key, iv) : createDecipheriv('aes-256-xts', key, iv);
    const piece = c.update(data.subarray(s * 512, (s + 1) * 512));
    c.final();
    piece.copy(out, s * 512);
  }
  return out;
}

test('IEEE 1619 vector 10 (XTS-AES-256, data unit 0xff)', () => {
  const key = Buffer.from(
    '2718281828459045235360287471352662497757247093699959574966967627' + '3141592653589793238462643383279502884197169399375105820974944592',
    'hex',
  );
  const pt = Buffer.alloc(512);
  for (let i = 0; i < 512; i++) pt[i] = i & 0xff;
  const ct =
    '1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd' +
    '5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca' +
    '2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f' +
    '93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a' +
    '84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae' +
    '9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac' +
    '6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385' +
    '1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151';
  const xts = new XtsCipher(key);
  const out = new Uint8Array(512);
  xts.encrypt(pt, out, 0xff);
  assert.is(Buffer.from(out).toString('hex'), ct);
  assert.is(nativeXts(key, pt, 0xff, true).toString('hex'), ct, 'node:crypto agrees with the vector');
  xts.decrypt(out, 0xff);
  assert.ok(Buffer.from(out).equals(pt));
});

test('XTS from ECB equals node aes-256-xts per sector: random lengths, sectors past 2^32, unaligned buffers, slices', () => {
  const r = new Rng(77);
  for (let i = 0; i < 60; i++) {
    const key = randomBytes(64);
    const xts = new XtsCipher(key);
    const sectors = r.pick([1, 2, 7, 128, 129, 300]);
    const sector = r.pick([0, r.int(1000), 2 ** 32 - 2, 2 ** 32 + r.int(1000), 2 ** 41 - 400]);
    const shift = r.pick([0, 0, 1, 3]); // unaligned byteOffset
    const backing = new Uint8Array(sectors * 512 + 8);
    const pt = backing.subarray(shift, shift + sectors * 512);
    r.fill(pt);
    const expect = nativeXts(key, pt, sector, true);
    const dstShift = r.pick([0, 1, 2]);
    const dst = new Uint8Array(sectors * 512 + 4).subarray(dstShift, dstShift + sectors * 512);
    const keep = Buffer.from(pt);
    xts.encrypt(pt, dst, sector);
    assert.ok(Buffer.from(dst).equals(expect), `encrypt sectors=${sectors} sector=${sector} shift=${shift}`);
    assert.ok(Buffer.from(pt).equals(keep), 'the source is not changed');
    assert.ok(nativeXts(key, dst, sector, false).equals(keep), 'node decrypts our ciphertext');
    xts.decrypt(dst, sector);
    assert.ok(Buffer.from(dst).equals(keep), `decrypt sectors=${sectors} sector=${sector}`);
    // In place.
    const inPlace = Buffer.from(keep);
    xts.encrypt(inPlace, inPlace, sector);
    assert.ok(inPlace.equals(expect), 'in-place encrypt');
  }
});

test('the tweak is the sector number: the same plaintext differs per sector and per key', () => {
  const key = randomBytes(64);
  const xts = new XtsCipher(key);
  const pt = new Uint8Array(1024).fill(0x41);
  const ct = new Uint8Array(1024);
  xts.encrypt(pt, ct, 5);
  assert.not.ok(Buffer.from(ct.subarray(0, 512)).equals(ct.subarray(512)), 'sectors 5 and 6 differ');
  const again = new Uint8Array(512);
  xts.encrypt(pt.subarray(0, 512), again, 6);
  assert.ok(Buffer.from(again).equals(ct.subarray(512)), 'sector 6 alone = sector 6 inside a longer run');
  const other = new Uint8Array(512);
  new XtsCipher(randomBytes(64)).encrypt(pt.subarray(0, 512), other, 5);
  assert.not.ok(Buffer.from(other).equals(ct.subarray(0, 512)));
});

test('all-zero stored sectors decrypt to zeros; encrypted zeros are not zero', () => {
  const xts = new XtsCipher(randomBytes(64));
  const zeros = new Uint8Array(512);
  const ct = new Uint8Array(512);
  xts.encrypt(zeros, ct, 9);
  assert.ok(ct.some((b) => b !== 0), 'encrypting zeros gives non-zero ciphertext (no zero leak)');
  // A mix: ciphertext, a hole, ciphertext of zeros.
  const pt = randomBytes(3 * 512);
  pt.fill(0, 1024);
  const buf = new Uint8Array(3 * 512);
  xts.encrypt(pt, buf, 100);
  buf.fill(0, 512, 1024); // a punched sector
  xts.decrypt(buf, 100);
  assert.ok(Buffer.from(buf.subarray(0, 512)).equals(pt.subarray(0, 512)));
  assert.ok(buf.subarray(512).every((b) => b === 0), 'the hole and the encrypted zeros both read as zeros');
  const holes = new Uint8Array(128 * 512 * 2);
  xts.decrypt(holes, 0);
  assert.ok(holes.every((b) => b === 0));
});

test('whole sectors only', () => {
  const xts = new XtsCipher(randomBytes(64));
  assert.throws(() => xts.encrypt(new Uint8Array(100), new Uint8Array(100), 0), /whole number of sectors/);
  assert.throws(() => xts.decrypt(new Uint8Array(513), 0), /whole number of sectors/);
});

test('seal and unlock: the right key opens, a wrong or truncated key does not', async () => {
  const material = Buffer.from('correct horse battery staple');
  const fields = await sealNewKey(material, FAST_KDF);
  assert.is(fields.length, CRYPT_LENGTH);
  const parsed = parseCryptFields('x.fvd', fields);
  assert.equal([parsed.method, parsed.log2N, parsed.r, parsed.p], [1, 10, 8, 1]);
  const a = await unlock('x.fvd', fields, material);
  const b = await unlock('x.fvd', fields, Buffer.from(material));
  const ca = new Uint8Array(512);
  const cb = new Uint8Array(512);
  a.encrypt(new Uint8Array(512).fill(1), ca, 3);
  b.encrypt(new Uint8Array(512).fill(1), cb, 3);
  assert.ok(Buffer.from(ca).equals(cb), 'two unlocks give the same data key');
  for (const wrong of [Buffer.from('correct horse battery stapl'), Buffer.from('Correct horse battery staple'), randomBytes(64)]) {
    try {
      await unlock('x.fvd', fields, wrong);
      assert.unreachable('a wrong key unlocked the image');
    } catch (err) {
      assert.instance(err, KeyError);
      assert.match((err as Error).message, /^x\.fvd: wrong key/);
      assert.not.match((err as Error).message, /staple/, 'the key is never in a message');
    }
  }
  // Two seals of the same key: different salt, nonce and master key.
  const again = await sealNewKey(material, FAST_KDF);
  assert.not.ok(Buffer.from(again).equals(Buffer.from(fields)));
});

test('damaged encryption fields: structure refused without a key, wrapped key / tag / salt / params as a wrong key', async () => {
  const material = Buffer.from('k');
  const fields = await sealNewKey(material, FAST_KDF);
  const mutate = (i: number, v: number) => {
    const f = Uint8Array.from(fields);
    f[i] = v;
    return f;
  };
  // Structure: caught by parseCryptFields (no key needed).
  const structural: Array<[number, number, RegExp]> = [
    [0, 2, /unknown cipher 2/],
    [0, 0, /unknown cipher 0/],
    [1, 9, /unknown key derivation 9/],
    [2, 9, /log2\(N\) 9/],
    [2, 40, /log2\(N\) 40/],
    [3, 0, /scrypt r 0/],
    [4, 0, /scrypt p 0/],
    [5, 1, /reserved byte 181/],
    [127, 1, /reserved byte 303/],
  ];
  for (const [i, v, re] of structural) {
    assert.throws(() => parseCryptFields('x.fvd', mutate(i, v)), (e: Error) => e instanceof FvdError && /corrupt image: encryption fields/.test(e.message) && re.test(e.message), `byte ${i} = ${v}`);
  }
  const noSalt = Uint8Array.from(fields);
  noSalt.fill(0, 8, 24);
  assert.throws(() => parseCryptFields('x.fvd', noSalt), /salt is all zero/);
  assert.throws(() => parseCryptFields('x.fvd', new Uint8Array(CRYPT_LENGTH)), /unknown cipher 0/);
  // Content: the GCM tag fails, as for a wrong key. (r, salt, nonce, wrapped key, tag.)
  for (const i of [3, 8, 20, 24, 36, 99, 100, 115]) {
    const f = mutate(i, fields[i]! ^ (i === 3 ? 0x01 : 0x80));
    try {
      await unlock('x.fvd', f, material);
      assert.unreachable(`byte ${i} damaged, still unlocked`);
    } catch (err) {
      assert.instance(err, KeyError, `byte ${i}: ${(err as Error).message}`);
      assert.match((err as Error).message, /wrong key.*damaged/);
    }
  }
});

test('key material: empty and oversized keys refused', async () => {
  for (const k of [new Uint8Array(0), new Uint8Array(64 * 1024 + 1)]) {
    try {
      await sealNewKey(k, FAST_KDF);
      assert.unreachable('accepted');
    } catch (err) {
      assert.instance(err, KeyError);
    }
  }
  try {
    await sealNewKey(Buffer.from('k'), { log2N: 30 });
    assert.unreachable('accepted');
  } catch (err) {
    assert.match((err as Error).message, /log2\(N\) 30/);
  }
});

test('buffer pool: reuses released buffers by size class, bounded', () => {
  const pool = new BufferPool(64 * 1024, 32 * 1024);
  const a = pool.acquire(5000);
  assert.is(a.length, 5000);
  assert.is(a.buffer.byteLength, 8192);
  pool.release(a);
  const b = pool.acquire(8000);
  assert.is(b.buffer, a.buffer, 'same class: reused');
  const big = pool.acquire(40 * 1024);
  pool.release(big);
  assert.is.not(pool.acquire(40 * 1024).buffer, big.buffer, 'larger than maxPooled: not kept');
});

test.run();
