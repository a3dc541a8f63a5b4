/**
 * `fvd change-key` (docs/FORMAT.md §11.2, fvd/change-key.ts): the master key re-wrapped under a
 * new key, data untouched. Engine level: after a reopen the old key fails and the new one reads
 * the same plaintext; only header bytes 176..303 and the checksum changed; the master key is the
 * same (the data area is byte-identical and decrypts). CLI: the worked flow, help, stdin, and bad
 * input (unencrypted image, wrong old key, empty new key file, missing arguments, both keys from
 * stdin or the same file, a served image) — one line, non-zero exit, every file sha256-unchanged.
 * Power cuts during change-key: tests/properties/crash-crypt.test.ts.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { changeKey } from '../../fvd/change-key.js';
import { KeyError, parseCryptFields } from '../../fvd/crypto.js';
import { FvdError } from '../../fvd/errors.js';
import { nodeIo } from '../../storage/node-file.js';
import { MemIo } from '../helpers/mem-io.js';
import { Rng } from '../helpers/rng.js';
import { CLI, TempDir, assertOk, assertOneLineError, assertUnchanged, fvd, snapshot, type CliResult } from '../helpers/cli.js';
import { rejectsOneLine } from '../helpers/rejects.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const OLD = Buffer.from('the old passphrase');
const NEW = Buffer.from('a brand new passphrase');
const FAST_KDF = { log2N: 10, r: 1, p: 1 };

async function rejects(p: Promise<unknown>, cls: new (...a: any[]) => Error, re: RegExp, what: string): Promise<void> {
  await rejectsOneLine(p, cls, re, what);
}

for (const layout of ['raw', 'compact'] as const) {
  test(`engine: ${layout}: after change-key the old key fails, the new one reads the same data; only the key fields changed`, async () => {
    const io = new MemIo();
    const p = '/k/disk.fvd';
    await FvdImage.create(io, p, { size: 2 * MiB, layout, blockSize: 16 * KiB, chunkSize: 64 * KiB, journalSize: 16 * KiB, encrypt: { key: OLD, kdf: FAST_KDF } });
    const data = new Rng(5).bytes(2 * MiB);
    let img = await FvdImage.open(io, p, { key: OLD });
    await img.write(data.subarray(0, MiB), 0);
    await img.write(data.subarray(MiB + 4096), MiB + 4096);
    await img.close();
    const before = io.readFile(p).slice();
    const res = await changeKey(io, p, OLD, NEW);
    assert.equal(res.kdf, FAST_KDF, 'the image keeps its scrypt parameters');
    const after = io.readFile(p);
    assert.is(after.length, before.length);
    for (let i = 0; i < before.length; i++) {
      if (before[i] !== after[i] && !(i >= 176 && i < 304) && !(i >= 508 && i < 512)) assert.unreachable(`byte ${i} changed outside the key fields`);
    }
    const f0 = parseCryptFields(p, before.subarray(176, 304));
    const f1 = parseCryptFields(p, after.subarray(176, 304));
    assert.not.equal(Buffer.from(f0.salt), Buffer.from(f1.salt), 'fresh salt');
    assert.not.equal(Buffer.from(f0.nonce), Buffer.from(f1.nonce), 'fresh nonce');
    await rejects(FvdImage.open(io, p, { key: OLD, readOnly: true }), KeyError, /wrong key/, 'the old key');
    img = await FvdImage.open(io, p, { key: NEW });
    const got = new Uint8Array(2 * MiB);
    await img.read(got, 0);
    const want = data.slice();
    want.fill(0, MiB, MiB + 4096);
    assert.ok(Buffer.from(got).equals(Buffer.from(want)), 'the same plaintext under the new key (the master key did not change)');
    await img.write(new Uint8Array(512).fill(9), 512); // and it stays writable
    await img.close();
    // Changing it again (and back to the old key) works; so does a new scrypt cost.
    await changeKey(io, p, NEW, OLD, { log2N: 11 });
    assert.is(parseCryptFields(p, io.readFile(p).subarray(176, 304)).log2N, 11);
    await rejects(FvdImage.open(io, p, { key: NEW, readOnly: true }), KeyError, /wrong key/, 'the intermediate key');
    img = await FvdImage.open(io, p, { key: OLD, readOnly: true });
    const again = new Uint8Array(512);
    await img.read(again, 512);
    assert.ok(again.every((b) => b === 9));
    await img.close();
  });
}

test('engine: refusals change nothing: wrong old key, unencrypted image, empty key, bad scrypt cost, image in use', async () => {
  const io = new MemIo();
  await FvdImage.create(io, '/k/enc.fvd', { size: MiB, encrypt: { key: OLD, kdf: FAST_KDF } });
  await FvdImage.create(io, '/k/plain.fvd', { size: MiB });
  const snap = () => [...io.snapshot()].map(([k, v]) => `${k}:${Buffer.from(v).toString('base64')}`).join();
  const before = snap();
  await rejects(changeKey(io, '/k/enc.fvd', NEW, OLD), KeyError, /wrong key/, 'wrong old key');
  await rejects(changeKey(io, '/k/plain.fvd', OLD, NEW), KeyError, /not encrypted/, 'unencrypted image');
  await rejects(changeKey(io, '/k/enc.fvd', OLD, new Uint8Array(0)), KeyError, /empty/, 'empty new key');
  await rejects(changeKey(io, '/k/enc.fvd', OLD, NEW, { log2N: 30 }), FvdError, /log2\(N\) 30/, 'scrypt cost out of range');
  assert.is(snap(), before);
  const holder = await FvdImage.open(io, '/k/enc.fvd', { key: OLD });
  const held = snap();
  await rejects(changeKey(io, '/k/enc.fvd', OLD, NEW), Error, /locked|in use/, 'image open elsewhere (MemIo says "locked"; node-file "in use": the CLI test)');
  assert.is(snap(), held);
  await holder.close();
});

// -----------------------------------------------------------------------------------------------
// CLI

const tmp = new TempDir('fvd-change-key-');
test.after(() => tmp.cleanup());

function keyFile(dir: string, name: string, content: string): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, content, { mode: 0o600 });
  return f;
}

function fvdIn(input: string, ...args: string[]): CliResult {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000, cwd: os.tmpdir(), input });
  if (r.error) throw r.error;
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, cmd: `fvd ${args.join(' ')} < input` };
}

test('CLI: change-key from files and from stdin; the old key stops working, the data stays', () => {
  const d = tmp.caseDir();
  const oldKey = keyFile(d, 'old.key', 'old passphrase\n');
  const newKey = keyFile(d, 'new.key', 'new passphrase\n');
  const img = path.join(d, 'disk.fvd');
  assertOk(fvd('create', '--encrypt', '--key-file', oldKey, img, '4M'));
  assertOk(fvd('io', '--key-file', oldKey, '-c', 'write -P 0x5c 0 64k', '-c', 'write -P 0x3e 3 1000', img));
  const r = fvd('change-key', '--key-file', oldKey, '--new-key-file', newKey, img);
  assertOk(r);
  assert.match(r.stdout, /key changed/);
  assert.not.ok((r.stdout + r.stderr).includes('passphrase'), 'no key printed');
  assertOneLineError(fvd('io', '--key-file', oldKey, '-c', 'read 0 4k', img), /wrong key/);
  assertOk(fvd('io', '--key-file', newKey, '-c', 'read -P 0x5c 0 3', '-c', 'read -P 0x3e 3 1000', '-c', 'read -P 0x5c 1003 64509', img));
  assertOk(fvd('check', '--key-file', newKey, img));
  // The new key from stdin, then the old one from stdin.
  assertOk(fvdIn('third passphrase\n', 'change-key', '--key-file', newKey, '--new-key-file', '-', img));
  const third = keyFile(d, 'third.key', 'third passphrase');
  assertOk(fvd('io', '--key-file', third, '-c', 'read -P 0x5c 0 3', img));
  assertOk(fvdIn('third passphrase', 'change-key', '--key-file', '-', '--new-key-file', oldKey, '--kdf-log2n', '12', img));
  assertOk(fvd('io', '--key-file', oldKey, '-c', 'read -P 0x3e 3 1000', img));
  const info = fvd('info', img);
  assertOk(info);
});

test('CLI: help; bad input is one line, non-zero, and leaves every file unchanged', () => {
  const h = fvd('change-key', '--help');
  assertOk(h);
  assert.match(h.stdout, /usage: fvd change-key --key-file OLD\|- --new-key-file NEW\|-/);
  assert.match(fvd('--help').stdout, /^  change-key /m);
  const d = tmp.caseDir();
  const oldKey = keyFile(d, 'old.key', 'old passphrase\n');
  const newKey = keyFile(d, 'new.key', 'new passphrase\n');
  const wrong = keyFile(d, 'wrong.key', 'not it\n');
  const empty = keyFile(d, 'empty.key', '');
  const img = path.join(d, 'disk.fvd');
  const plain = path.join(d, 'plain.fvd');
  assertOk(fvd('create', '--encrypt', '--key-file', oldKey, img, '4M'));
  assertOk(fvd('create', plain, '4M'));
  assertOk(fvd('io', '--key-file', oldKey, '-c', 'write -P 0x11 0 4k', img));
  const files = [img, plain, oldKey, newKey];
  const cases: Array<[RegExp, string[]]> = [
    [/wrong key/, ['--key-file', wrong, '--new-key-file', newKey, img]],
    [/not encrypted/, ['--key-file', oldKey, '--new-key-file', newKey, plain]],
    [/empty/, ['--key-file', oldKey, '--new-key-file', empty, img]],
    [/cannot open key file/, ['--key-file', oldKey, '--new-key-file', path.join(d, 'missing.key'), img]],
    [/the new key is needed/, ['--key-file', oldKey, img]],
    [/the current key is needed/, ['--new-key-file', newKey, img]],
    [/usage: fvd change-key/, ['--key-file', oldKey, '--new-key-file', newKey]],
    [/usage: fvd change-key/, ['--key-file', oldKey, '--new-key-file', newKey, img, img]],
    [/same file/, ['--key-file', oldKey, '--new-key-file', oldKey, img]],
    [/same file/, ['--key-file', oldKey, '--new-key-file', path.join(d, '.', 'old.key'), img]],
    [/cannot both be stdin/, ['--key-file', '-', '--new-key-file', '-', img]],
    [/--kdf-log2n/, ['--key-file', oldKey, '--new-key-file', newKey, '--kdf-log2n', '40', img]],
    [/--kdf-log2n/, ['--key-file', oldKey, '--new-key-file', newKey, '--kdf-log2n', 'x', img]],
    [/not an FVD image/, ['--key-file', oldKey, '--new-key-file', newKey, oldKey]],
    [/no such file|ENOENT/, ['--key-file', oldKey, '--new-key-file', newKey, path.join(d, 'nope.fvd')]],
    [/Unknown option/, ['--key-file', oldKey, '--new-key', newKey, img]],
  ];
  for (const [re, args] of cases) {
    const before = snapshot(files);
    const r = fvdIn('', 'change-key', ...args);
    assertOneLineError(r, re);
    assert.not.ok((r.stdout + r.stderr).includes('passphrase'), `${r.cmd}: no key printed`);
    assertUnchanged(before, r.cmd);
  }
  assertOk(fvd('io', '--key-file', oldKey, '-c', 'read -P 0x11 0 4k', img));
});

test('CLI: a served (locked) image is refused with "in use", unchanged', async () => {
  const d = tmp.caseDir();
  const oldKey = keyFile(d, 'old.key', 'old passphrase\n');
  const newKey = keyFile(d, 'new.key', 'new passphrase\n');
  const img = path.join(d, 'disk.fvd');
  assertOk(fvd('create', '--encrypt', '--key-file', oldKey, img, '4M'));
  const holder = await FvdImage.open(nodeIo, img, { key: Buffer.from('old passphrase') });
  try {
    const before = snapshot([img]);
    assertOneLineError(fvd('change-key', '--key-file', oldKey, '--new-key-file', newKey, img), /in use/);
    assertUnchanged(before, 'change-key of a held image');
  } finally {
    await holder.close();
  }
  assertOk(fvd('change-key', '--key-file', oldKey, '--new-key-file', newKey, img));
});

test.run();
