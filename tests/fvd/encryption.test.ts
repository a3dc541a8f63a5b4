/**
 * Encrypted images through the engine (docs/FORMAT.md §11), each checked after a reopen: data
 * round trip in both layouts with and without a base; no plaintext in the image file (guest
 * writes, copy-on-write, copy-on-read and prefetch of a plaintext base); an independent decoder
 * that follows FORMAT.md §11 with node's own scrypt / AES-GCM / aes-256-xts; holes, discard and
 * write-zeroes read as zeros; a chunk's ciphertext moved to other storage still decrypts (the
 * tweak is the guest sector); key refusals (missing, wrong, given for an unencrypted image,
 * encrypted base) leave every file byte-identical; unaligned reads; check with and without
 * the key.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createDecipheriv, createHash, scryptSync } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { FvdError } from '../../fvd/errors.js';
import { KeyError } from '../../fvd/crypto.js';
import { checkImage } from '../../fvd/check.js';
import { Prefetcher } from '../../fvd/prefetch.js';
import { CHUNK_EMPTY, INCOMPAT_ENCRYPTED, decodeHeader, type Header } from '../../fvd/format.js';
import { MemIo } from '../helpers/mem-io.js';
import { Rng } from '../helpers/rng.js';
import { TempDir } from '../helpers/cli.js';
import { rejectsOneLine } from '../helpers/rejects.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const KEY = Buffer.from('a passphrase for the tests\n'.trim());
const FAST_KDF = { log2N: 10, r: 8, p: 1 };
/** A marker that must never appear in an encrypted image file: 32 distinct bytes. */
const MARKER = Buffer.from('<<PLAINTEXT-MARKER-0123456789ab>>');

function marked(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  const r = new Rng(seed);
  r.fill(b);
  for (let p = 0; p + MARKER.length <= length; p += 512) MARKER.copy(b, p + (p % 64));
  return b;
}

/** True when any 16-byte piece of the marker occurs in `file` (catches partial leaks too). */
function leaks(file: Uint8Array): boolean {
  const hay = Buffer.from(file.buffer, file.byteOffset, file.byteLength);
  for (let i = 0; i + 16 <= MARKER.length; i += 8) if (hay.includes(MARKER.subarray(i, i + 16))) return true;
  return false;
}

async function create(io: MemIo | typeof nodeIo, file: string, o: CreateOptions): Promise<void> {
  await FvdImage.create(io, file, { journalSize: 64 * KiB, encrypt: { key: KEY, kdf: FAST_KDF }, ...o });
}

async function readAll(img: FvdImage, off = 0, len = img.size - off): Promise<Buffer> {
  const b = Buffer.alloc(len);
  await img.read(b, off);
  return b;
}

async function rejects(p: Promise<unknown>, cls: new (...a: any[]) => Error, re: RegExp, what: string): Promise<Error> {
  const e = await rejectsOneLine(p, cls, re, what);
  assert.not.ok(e.message.includes(KEY.toString()), `${what}: the key is never in a message`);
  return e;
}

const hash = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');
function hashes(io: MemIo): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of io.snapshot()) out[k] = hash(v);
  return out;
}

// -----------------------------------------------------------------------------------------------
// An independent reader of FORMAT.md §11: scrypt → KEK, AES-256-GCM unwraps the master key,
// node's aes-256-xts per sector with tweak = guest sector number (LE, 16 bytes).

function masterKey(h: Header, key: Uint8Array): Buffer {
  const f = Buffer.from(h.crypt!);
  assert.is(f[0], 1, 'cipher 1 = aes-256-xts');
  assert.is(f[1], 1, 'kdf 1 = scrypt');
  const N = 2 ** f[2]!;
  const kek = scryptSync(key, f.subarray(8, 24), 32, { N, r: f[3]!, p: f[4]!, maxmem: 256 * N * f[3]! + MiB });
  const gcm = createDecipheriv('aes-256-gcm', kek, f.subarray(24, 36));
  gcm.setAAD(f.subarray(0, 24));
  gcm.setAuthTag(f.subarray(100, 116));
  const master = gcm.update(f.subarray(36, 100));
  gcm.final();
  return master;
}

function decryptSector(master: Buffer, stored: Uint8Array, guestSector: number): Buffer {
  if (stored.every((b) => b === 0)) return Buffer.alloc(512);
  const iv = Buffer.alloc(16);
  iv.writeBigUInt64LE(BigInt(guestSector));
  const d = createDecipheriv('aes-256-xts', master, iv);
  const out = d.update(stored);
  d.final();
  return out;
}

/** The guest's view of local data read straight from the file (no engine code involved). */
function independentRead(fileBytes: Uint8Array, key: Uint8Array, offset: number, length: number): Buffer {
  const h = decodeHeader('x', fileBytes.subarray(0, 512), fileBytes.length);
  assert.ok(h.incompatible & INCOMPAT_ENCRYPTED, 'ENCRYPTED bit set');
  const master = masterKey(h, key);
  const table = h.tableLength ? new Uint32Array(fileBytes.slice(h.tableOffset, h.tableOffset + h.tableLength).buffer) : null;
  const out = Buffer.alloc(length);
  for (let x = offset; x < offset + length; x += 512) {
    let phys: number;
    if (!table) phys = h.dataOffset + x;
    else {
      const id = table[Math.floor(x / h.chunkSize)]!;
      if (id === CHUNK_EMPTY) continue;
      phys = h.dataOffset + id * h.chunkSize + (x % h.chunkSize);
    }
    const stored = new Uint8Array(512);
    stored.set(fileBytes.subarray(phys, Math.min(phys + 512, fileBytes.length)));
    decryptSector(master, stored, x / 512).copy(out, x - offset);
  }
  return out;
}

// -----------------------------------------------------------------------------------------------

for (const layout of ['raw', 'compact'] as const) {
  for (const baseKind of ['none', 'raw', 'fvd'] as const) {
    test(`${layout}, base ${baseKind}: round trip after reopen, no plaintext in the file, independent decoder agrees`, async () => {
      const io = new MemIo({ rng: new Rng(3) });
      const size = 2 * MiB;
      const o: CreateOptions = { size, layout, blockSize: 16 * KiB, chunkSize: 64 * KiB };
      let baseData: Buffer = Buffer.alloc(0);
      if (baseKind === 'raw') {
        baseData = marked(MiB + 512, 1);
        io.writeFile('/e/base.raw', baseData);
        Object.assign(o, { base: 'base.raw', baseFormat: 'raw' });
      } else if (baseKind === 'fvd') {
        await FvdImage.create(io, '/e/base.fvd', { size: MiB });
        const b = await FvdImage.open(io, '/e/base.fvd');
        baseData = marked(MiB, 2);
        await b.write(baseData, 0);
        await b.close();
        Object.assign(o, { base: 'base.fvd', baseFormat: 'fvd' });
      }
      await create(io, '/e/disk.fvd', o);
      const model = Buffer.alloc(size);
      baseData.copy(model);
      let img = await FvdImage.open(io, '/e/disk.fvd', { key: KEY, copyOnRead: true });
      assert.is(img.stats().encryption, 'aes-256-xts');
      const writes: Array<[number, number]> = [[0, 4 * KiB], [20 * KiB + 512, 3 * 512], [100 * KiB, 200 * KiB], [MiB - 1024, 4096], [size - 512, 512]];
      for (const [off, len] of writes) {
        const d = marked(len, off);
        d.copy(model, off);
        await img.write(d, off);
      }
      // Copy-on-read of base blocks that were never written (plaintext base → ciphertext image).
      assert.ok((await readAll(img, 300 * KiB, 64 * KiB)).equals(model.subarray(300 * KiB, 364 * KiB)));
      await img.idle();
      assert.ok((await readAll(img)).equals(model), 'reads before close');
      await img.close();

      const file = io.readFile('/e/disk.fvd');
      assert.not.ok(leaks(file), 'plaintext of written or copied data found in the image file');
      if (baseKind === 'raw') assert.ok(leaks(io.readFile('/e/base.raw')), 'the marker is findable (in the plaintext base)');
      // Everything local decodes with FORMAT.md §11 alone.
      img = await FvdImage.open(io, '/e/disk.fvd', { key: KEY, readOnly: true });
      assert.ok((await readAll(img)).equals(model), 'reads after reopen');
      for (const e of img.extents()) {
        if (e.kind === 'base') continue;
        const mine = independentRead(file, KEY, e.offset, e.length);
        assert.ok(mine.equals(model.subarray(e.offset, e.offset + e.length)), `independent decoder at ${e.offset}+${e.length} (${e.kind})`);
      }
      await img.close();
    });
  }
}

test('prefetch of a plaintext base stores only ciphertext; the fully local image decodes without the base', async () => {
  const io = new MemIo();
  const base = marked(MiB, 9);
  io.writeFile('/p/base.raw', base);
  await create(io, '/p/disk.fvd', { base: 'base.raw', baseFormat: 'raw', layout: 'compact', blockSize: 16 * KiB, chunkSize: 64 * KiB });
  const img = await FvdImage.open(io, '/p/disk.fvd', { key: KEY, copyOnRead: false });
  const pf = new Prefetcher(img, { chunkBytes: 128 * KiB }).start();
  const end = await pf.finished;
  assert.is(end.state, 'done');
  await img.close();
  const file = io.readFile('/p/disk.fvd');
  assert.not.ok(leaks(file));
  io.deleteFile('/p/base.raw');
  const again = await FvdImage.open(io, '/p/disk.fvd', { key: KEY, readOnly: true });
  assert.ok(again.stats().fullyLocal);
  assert.ok((await readAll(again)).equals(base));
  await again.close();
  assert.ok(independentRead(file, KEY, 0, MiB).equals(base));
});

for (const layout of ['raw', 'compact'] as const) {
  test(`${layout}: unwritten storage, discard, write-zeroes and reused chunks read as zeros`, async () => {
    const t = new TempDir('fvd-enc-');
    try {
      // A real file: holes punched by the OS, not just MemIo's zero fill.
      const file = t.file('z.fvd');
      await create(nodeIo, file, { size: 4 * MiB, layout, blockSize: 16 * KiB, chunkSize: 256 * KiB });
      let img = await FvdImage.open(nodeIo, file, { key: KEY });
      assert.ok((await readAll(img)).every((b) => b === 0), 'a new image reads as zeros');
      const model = Buffer.alloc(4 * MiB);
      const data = marked(2 * MiB, 4);
      await img.write(data, 512 * KiB);
      data.copy(model, 512 * KiB);
      for (const [off, len, how] of [
        [512 * KiB, 256 * KiB, 'discard'], // a whole chunk: unmapped in compact
        [800 * KiB + 512, 40 * KiB, 'zero'], // partial blocks: encrypted zeros
        [MiB + 16 * KiB, 32 * KiB, 'discard'], // whole blocks: punched
        [2 * MiB - 512, 512, 'zero'],
      ] as const) {
        if (how === 'discard') await img.discard(off, len);
        else await img.writeZeroes(off, len);
        model.fill(0, off, off + len);
      }
      // The unmapped chunk's storage is reused by a new chunk: it must read zeros where unwritten.
      await img.flush();
      const w = marked(4096, 5);
      await img.write(w, 3 * MiB + 8 * KiB);
      w.copy(model, 3 * MiB + 8 * KiB);
      assert.ok((await readAll(img)).equals(model), 'before close');
      await img.close();
      img = await FvdImage.open(nodeIo, file, { key: KEY, readOnly: true });
      assert.ok((await readAll(img)).equals(model), 'after reopen');
      await img.close();
      assert.not.ok(leaks(fs.readFileSync(file)));
    } finally {
      t.cleanup();
    }
  });
}

test('compact: a chunk\'s ciphertext copied unchanged to other storage still decrypts (tweak = guest sector)', async () => {
  const io = new MemIo();
  await create(io, '/m/disk.fvd', { size: MiB, layout: 'compact', blockSize: 16 * KiB, chunkSize: 64 * KiB });
  let img = await FvdImage.open(io, '/m/disk.fvd', { key: KEY });
  const data = marked(64 * KiB, 6);
  await img.write(data, 128 * KiB); // chunk 2 → storage 0
  await img.close();
  const file = io.readFile('/m/disk.fvd');
  const h = decodeHeader('/m/disk.fvd', file.subarray(0, 512), file.length);
  const dv = new DataView(file.buffer, file.byteOffset);
  assert.is(dv.getUint32(h.tableOffset + 8, true), 0);
  // Move storage chunk 0 to storage chunk 5 (what a defragmenter or a copy-on-write snapshot
  // would do) and point chunk 2 at it.
  const moved = new Uint8Array(h.dataOffset + 6 * h.chunkSize);
  moved.set(file.subarray(0, h.dataOffset));
  moved.set(file.subarray(h.dataOffset, h.dataOffset + h.chunkSize), h.dataOffset + 5 * h.chunkSize);
  new DataView(moved.buffer).setUint32(h.tableOffset + 8, 5, true);
  io.writeFile('/m/disk.fvd', moved);
  img = await FvdImage.open(io, '/m/disk.fvd', { key: KEY, readOnly: true });
  assert.ok((await readAll(img, 128 * KiB, 64 * KiB)).equals(data));
  await img.close();
  // The same ciphertext at another guest position does not decrypt to the data.
  new DataView(moved.buffer).setUint32(h.tableOffset + 8, CHUNK_EMPTY, true);
  new DataView(moved.buffer).setUint32(h.tableOffset + 12, 5, true);
  io.writeFile('/m/disk.fvd', moved);
  img = await FvdImage.open(io, '/m/disk.fvd', { key: KEY, readOnly: true });
  assert.not.ok((await readAll(img, 192 * KiB, 64 * KiB)).equals(data));
  await img.close();
});

test('key refusals: missing, wrong, truncated, empty, for an unencrypted image — nothing read or written', async () => {
  const io = new MemIo();
  io.writeFile('/k/base.raw', marked(MiB, 7));
  await create(io, '/k/disk.fvd', { size: MiB, base: 'base.raw', baseFormat: 'raw' });
  let img = await FvdImage.open(io, '/k/disk.fvd', { key: KEY });
  await img.write(marked(8 * KiB, 8), 0);
  await img.flush();
  await img.abandon(); // dirty, with a journal to replay: a refused open must not replay it
  await FvdImage.create(io, '/k/plain.fvd', { size: MiB });
  const before = hashes(io);
  const opens0 = io.stats.opens;
  for (const readOnly of [false, true]) {
    await rejects(FvdImage.open(io, '/k/disk.fvd', { readOnly }), KeyError, /disk\.fvd: the image is encrypted: its key is needed \(--key-file/, 'no key');
    await rejects(FvdImage.open(io, '/k/disk.fvd', { readOnly, key: Buffer.from('not the key') }), KeyError, /disk\.fvd: wrong key/, 'wrong key');
    await rejects(FvdImage.open(io, '/k/disk.fvd', { readOnly, key: KEY.subarray(0, KEY.length - 1) }), KeyError, /wrong key/, 'truncated key');
    await rejects(FvdImage.open(io, '/k/disk.fvd', { readOnly, key: new Uint8Array(0) }), KeyError, /key is empty/, 'empty key');
    await rejects(FvdImage.open(io, '/k/plain.fvd', { readOnly, key: KEY }), KeyError, /plain\.fvd: the image is not encrypted, but a key was given/, 'key for a plain image');
  }
  assert.equal(hashes(io), before, 'no file changed');
  assert.is(io.openCount, 0, 'every refused open closed its file');
  assert.is(io.stats.opens - opens0, 10, 'the base was never opened');
  // The right key replays the journal and reads the data.
  img = await FvdImage.open(io, '/k/disk.fvd', { key: KEY });
  assert.ok(img.stats().wasDirty);
  assert.ok((await readAll(img, 0, 8 * KiB)).equals(marked(8 * KiB, 8)));
  await img.close();
});

test('without the key: metadata only (stats, extents, check, repair); data I/O refused', async () => {
  const io = new MemIo();
  await create(io, '/w/disk.fvd', { size: MiB, layout: 'compact', chunkSize: 64 * KiB, blockSize: 16 * KiB });
  let img = await FvdImage.open(io, '/w/disk.fvd', { key: KEY });
  await img.write(marked(64 * KiB, 1), 0);
  await img.flush();
  await img.abandon();
  const before = hashes(io);
  img = await FvdImage.open(io, '/w/disk.fvd', { readOnly: true, withoutKey: true });
  assert.is(img.stats().encryption, 'aes-256-xts');
  assert.ok(img.extents().some((e) => e.kind === 'local'));
  await rejects(img.read(Buffer.alloc(512), 0), KeyError, /read of an encrypted image opened without its key/, 'read');
  await img.close();
  assert.equal(hashes(io), before);
  const report = await checkImage(io, '/w/disk.fvd');
  assert.equal(report.errors, []);
  assert.equal(hashes(io), before, 'check without repair changes nothing');
  await rejects(checkImage(io, '/w/disk.fvd', { key: Buffer.from('wrong') }), KeyError, /wrong key/, 'check with a wrong key');
  const repaired = await checkImage(io, '/w/disk.fvd', { repair: true });
  assert.ok(repaired.repaired, 'a dirty encrypted image is repaired without its key');
  img = await FvdImage.open(io, '/w/disk.fvd', { withoutKey: true });
  assert.not.ok(img.stats().wasDirty);
  for (const op of [() => img.write(Buffer.alloc(512), 0), () => img.writeZeroes(0, 512), () => img.discard(0, 64 * KiB)])
    await rejects(op(), KeyError, /opened without its key/, 'write without key');
  await img.close();
  img = await FvdImage.open(io, '/w/disk.fvd', { key: KEY, readOnly: true });
  assert.ok((await readAll(img, 0, 64 * KiB)).equals(marked(64 * KiB, 1)));
  await img.close();
  assert.equal((await checkImage(io, '/w/disk.fvd', { key: KEY })).errors, []);
});

test('an encrypted image cannot be a base: create and open over it refused', async () => {
  const io = new MemIo();
  await create(io, '/b/enc.fvd', { size: MiB });
  await rejects(
    FvdImage.create(io, '/b/top.fvd', { base: 'enc.fvd', baseFormat: 'fvd' }),
    FvdError,
    /base image 'enc\.fvd'.*encrypted image cannot be a base/,
    'create over an encrypted base',
  );
  assert.not.ok(io.exists('/b/top.fvd'));
  // An image whose base became encrypted (replaced after create).
  await FvdImage.create(io, '/b/plain.fvd', { size: MiB });
  await FvdImage.create(io, '/b/top2.fvd', { base: 'plain.fvd', baseFormat: 'fvd' });
  io.writeFile('/b/plain.fvd', io.readFile('/b/enc.fvd'));
  await rejects(FvdImage.open(io, '/b/top2.fvd', { readOnly: true }), FvdError, /encrypted image cannot be a base/, 'open over an encrypted base');
});

test('unaligned reads served (unaligned writes: tests/fvd/encryption-unaligned.test.ts)', async () => {
  const io = new MemIo();
  await create(io, '/a/disk.fvd', { size: MiB });
  const img = await FvdImage.open(io, '/a/disk.fvd', { key: KEY });
  const data = marked(8 * KiB, 3);
  await img.write(data, 4 * KiB);
  await img.flush();
  for (const [off, len] of [[4 * KiB + 1, 700], [4 * KiB + 511, 2], [3 * KiB + 5, 3000]]) {
    const got = await readAll(img, off, len);
    const want = Buffer.alloc(len);
    for (let i = 0; i < len; i++) {
      const x = off + i;
      want[i] = x >= 4 * KiB && x < 12 * KiB ? data[x - 4 * KiB]! : 0;
    }
    assert.ok(got.equals(want), `read ${off}+${len}`);
  }
  await img.close();
});

test('create: the ENCRYPTED bit and fields are in the header; header rewrites (checkpoints, close) keep them', async () => {
  const io = new MemIo();
  await create(io, '/h/disk.fvd', { size: 4 * MiB, journalSize: 8 * KiB, layout: 'compact', chunkSize: 64 * KiB, blockSize: 16 * KiB });
  const first = io.readFile('/h/disk.fvd').slice(0, 512);
  const h0 = decodeHeader('x', first, io.readFile('/h/disk.fvd').length);
  assert.ok(h0.incompatible & INCOMPAT_ENCRYPTED);
  assert.ok(h0.crypt!.some((b) => b !== 0));
  const img = await FvdImage.open(io, '/h/disk.fvd', { key: KEY });
  for (let i = 0; i < 40; i++) {
    await img.write(marked(512, i), i * 64 * KiB);
    await img.flush(); // a TABLE_SET per flush fills the 8 KiB journal: checkpoints rewrite the header
  }
  assert.ok(img.stats().journal.checkpoints > 0);
  await img.close();
  const h1 = decodeHeader('x', io.readFile('/h/disk.fvd').slice(0, 512), io.readFile('/h/disk.fvd').length);
  assert.ok(Buffer.from(h1.crypt!).equals(Buffer.from(h0.crypt!)), 'encryption fields unchanged');
  // Plain images keep bytes 176..303 zero.
  await FvdImage.create(io, '/h/plain.fvd', { size: MiB });
  assert.ok(io.readFile('/h/plain.fvd').subarray(176, 304).every((b) => b === 0));
});

test('sharedView marks an encrypted image so queue workers never touch its data area', async () => {
  const io = new MemIo();
  await create(io, '/v/disk.fvd', { size: MiB });
  const img = await FvdImage.open(io, '/v/disk.fvd', { key: KEY });
  assert.is(img.sharedView().encrypted, true);
  await img.close();
  await FvdImage.create(io, '/v/plain.fvd', { size: MiB });
  const p = await FvdImage.open(io, '/v/plain.fvd');
  assert.is(p.sharedView().encrypted, false);
  await p.close();
});

test.run();
