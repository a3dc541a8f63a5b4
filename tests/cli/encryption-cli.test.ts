/**
 * Encryption on the command line (docs/FORMAT.md §11, README "Encryption"): the README's worked
 * example (no plaintext in the image file), every command with --key-file (file and stdin), and
 * bad input — missing, wrong, truncated, empty, absent key files, a key for an unencrypted image,
 * damaged key fields, option misuse — each a one-line error with a non-zero exit that leaves
 * every file byte-identical and never prints the key.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  CLI,
  TempDir,
  assertNoCrash,
  assertOk,
  assertOneLineError,
  assertUnchanged,
  fvd,
  json,
  patternBytes,
  snapshot,
  type CliResult,
} from '../helpers/cli.js';
import { fixHeaderCrc, flipByte, writeBytes } from '../helpers/tamper.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-enc-cli-');
test.after(() => tmp.cleanup());
const caseDir = () => tmp.caseDir();
const PASSPHRASE = 'tr0ub4dor&3 is not a good passphrase';

/** `fvd ...` with `input` on stdin. */
function fvdIn(input: string | Buffer, ...args: string[]): CliResult {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000, cwd: os.tmpdir(), input });
  if (r.error) throw r.error;
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, cmd: `fvd ${args.join(' ')} < input` };
}

function noKeyShown(r: CliResult): void {
  assert.not.ok(r.stdout.includes(PASSPHRASE) || r.stderr.includes(PASSPHRASE), `${r.cmd} printed the key`);
  assert.not.ok(r.stdout.includes('tr0ub4dor') || r.stderr.includes('tr0ub4dor'), `${r.cmd} printed part of the key`);
}

/** A key file holding the passphrase (with the newline `echo` adds). */
function keyFile(dir: string, name = 'key', content = PASSPHRASE + '\n'): string {
  const f = path.join(dir, name);
  fs.writeFileSync(f, content, { mode: 0o600 });
  return f;
}

/** 32 recognisable bytes, repeated: the text that must not be found in an encrypted image. */
const SECRET = Buffer.from('TOP-SECRET-PAYLOAD-0123456789abc');

function fileContains(file: string, needle: Buffer): boolean {
  return fs.readFileSync(file).includes(needle);
}

async function encryptedImage(dir: string, extra: string[] = []): Promise<{ img: string; key: string }> {
  const key = keyFile(dir);
  const img = path.join(dir, 'enc.fvd');
  assertOk(fvd('create', '--encrypt', '--key-file', key, ...extra, img, '4M'));
  return { img, key };
}

test('worked example: create --encrypt, write, the file holds no plaintext, read back, info without the key', async () => {
  const d = caseDir();
  const key = keyFile(d);
  const img = path.join(d, 'secret.fvd');
  const src = path.join(d, 'secret.txt');
  fs.writeFileSync(src, Buffer.concat(Array.from({ length: 2048 }, () => SECRET))); // 64 KiB
  const c = fvd('create', '--encrypt', '--key-file', key, img, '16M');
  assertOk(c);
  assert.match(c.stdout, /encryption=aes-256-xts/);
  noKeyShown(c);
  // Write the file's bytes with convert (raw → the encrypted image's content) and by fvd io.
  const raw = path.join(d, 'disk.raw');
  fs.writeFileSync(raw, Buffer.alloc(16 * MiB));
  fs.writeFileSync(raw, fs.readFileSync(src), { flag: 'r+' });
  const enc2 = path.join(d, 'copy.fvd');
  assertOk(fvd('convert', '-O', 'fvd', '--encrypt', '--key-file', key, raw, enc2));
  assertOk(fvd('io', '--key-file', key, '-c', 'write -P 0x41 1M 64k', img));
  for (const f of [img, enc2]) {
    assert.not.ok(fileContains(f, SECRET.subarray(0, 16)), `${path.basename(f)} contains plaintext`);
    assert.not.ok(fileContains(f, Buffer.alloc(4096, 0x41)), `${path.basename(f)} contains the 0x41 pattern`);
  }
  assert.ok(fileContains(raw, SECRET.subarray(0, 16)), 'the raw file does (the search works)');
  const rd = fvd('io', '--key-file', key, '-c', 'read -P 0x41 1M 64k', '-c', 'read -P 0 0 1M', img);
  assertOk(rd);
  // The copy decrypts to the raw file exactly.
  const back = path.join(d, 'back.raw');
  assertOk(fvd('convert', '--key-file', key, enc2, back));
  assert.ok(fs.readFileSync(back).equals(fs.readFileSync(raw)));
  // info / map / check need no key.
  const i = fvd('info', img);
  assertOk(i);
  assert.match(i.stdout, /^encrypted: aes-256-xts$/m);
  assert.is(json(fvd('info', '--json', img)).encryption, 'aes-256-xts');
  assert.is(json(fvd('info', '--json', raw.replace('disk.raw', 'copy.fvd'))).encryption, 'aes-256-xts');
  const plain = path.join(d, 'plain.fvd');
  assertOk(fvd('create', plain, '1M'));
  assert.match(fvd('info', plain).stdout, /^encrypted: no$/m);
  assert.is(json(fvd('info', '--json', plain)).encryption, null);
  assert.ok(json<Array<{ depth: number; data: boolean }>>(fvd('map', '--json', img)).some((e) => e.depth === 0 && e.data));
  assertOk(fvd('check', img));
  assertOk(fvd('check', '--key-file', key, img));
  assertOk(fvd('info', '--key-file', key, img));
});

test('--key-file -: stdin, the same key as the file (one trailing newline ignored)', async () => {
  const d = caseDir();
  const img = path.join(d, 'in.fvd');
  assertOk(fvdIn(PASSPHRASE, 'create', '--encrypt', '--key-file', '-', img, '1M'));
  assertOk(fvdIn(PASSPHRASE + '\n', 'io', '--key-file', '-', '-c', 'write -P 0x5c 0 8k', img));
  assertOk(fvd('io', '--key-file', keyFile(d), '-c', 'read -P 0x5c 0 8k', img));
  assertOk(fvd('io', '--key-file', keyFile(d, 'crlf', PASSPHRASE + '\r\n'), '-c', 'read -P 0x5c 0 8k', img));
  const twice = fvdIn(PASSPHRASE, 'io', '--key-file', keyFile(d, 'nl2', PASSPHRASE + '\n\n'), '-c', 'read 0 512', img);
  assertOneLineError(twice, /wrong key/);
  // Binary keys work the same way.
  const bin = path.join(d, 'bin.key');
  fs.writeFileSync(bin, Buffer.from([0, 1, 2, 255, 10, 13, 0]));
  const img2 = path.join(d, 'bin.fvd');
  assertOk(fvd('create', '--encrypt', '--key-file', bin, img2, '1M'));
  assertOk(fvdIn(fs.readFileSync(bin), 'io', '--key-file', '-', '-c', 'write -P 1 0 4k', img2));
  assertOk(fvd('io', '--key-file', bin, '-c', 'read -P 1 0 4k', img2));
});

test('prefetch, bench and copy-on-read over a plaintext base: the image stays ciphertext', async () => {
  const d = caseDir();
  const key = keyFile(d);
  const base = path.join(d, 'base.raw');
  fs.writeFileSync(base, Buffer.concat(Array.from({ length: (2 * MiB) / SECRET.length }, () => SECRET)));
  const img = path.join(d, 'over.fvd');
  assertOk(fvd('create', '--encrypt', '--key-file', key, '-b', 'base.raw', '-F', 'raw', '--layout', 'compact', img));
  assertOk(fvd('io', '--key-file', key, '-c', 'read 0 256k', img)); // copy-on-read
  const b = fvd('bench', '--key-file', key, '-c', '64', '-d', '4', '-s', '4k', '-w', '-o', '1M', '--json', img);
  assertOk(b);
  const p = fvd('prefetch', '--key-file', key, '-q', img);
  assertOk(p);
  assert.match(p.stdout, /fully local/);
  assert.not.ok(fileContains(img, SECRET.subarray(0, 16)));
  fs.renameSync(base, base + '.gone');
  const conv = path.join(d, 'flat.raw');
  assertOk(fvd('convert', '--key-file', key, img, conv));
  const expect = Buffer.concat(Array.from({ length: (2 * MiB) / SECRET.length }, () => SECRET));
  expect.fill(0xa5, MiB, MiB + 64 * 4 * KiB); // what bench wrote
  assert.ok(fs.readFileSync(conv).equals(expect));
  assertOk(fvd('bench', '--key-file', key, '-c', '64', '-s', '4k', '--json', img));
  assertOk(fvd('check', '--key-file', key, img));
});

// -----------------------------------------------------------------------------------------------
// bad input

/** Runs `args` and expects a one-line error matching `re`, no key shown, files unchanged. */
function refused(files: string[], re: RegExp, ...args: string[]): void {
  const before = snapshot(files);
  const r = fvd(...args);
  assertOneLineError(r, re);
  noKeyShown(r);
  assertUnchanged(before, r.cmd);
}

test('missing, wrong, truncated, empty and absent keys: one line, nothing changed, for every command', async () => {
  const d = caseDir();
  const { img, key } = await encryptedImage(d);
  assertOk(fvd('io', '--key-file', key, '-c', 'write -P 0x33 0 64k', img));
  const wrong = keyFile(d, 'wrong', 'not the passphrase\n');
  const truncated = keyFile(d, 'truncated', PASSPHRASE.slice(0, 20));
  const empty = keyFile(d, 'empty', '');
  const onlyNl = keyFile(d, 'nl', '\n');
  const big = path.join(d, 'big.key');
  fs.writeFileSync(big, Buffer.alloc(64 * KiB + 1, 0x61));
  const out = path.join(d, 'out.raw');
  const files = [img, key];
  const cmds: string[][] = [
    ['io', '-c', 'read 0 4k'],
    ['io', '-c', 'write -P 1 0 4k'],
    ['convert', '@', out],
    ['prefetch', '-q'],
    ['bench', '-c', '4', '-w'],
  ];
  for (const cmd of cmds) {
    const at = (extra: string[]) => {
      const args = [...cmd, ...extra];
      const i = args.indexOf('@');
      if (i >= 0) args[i] = img;
      else args.push(img);
      return args;
    };
    refused(files, /enc\.fvd: the image is encrypted: its key is needed \(--key-file PATH, or --key-file - for stdin\)/, ...at([]));
    refused(files, /enc\.fvd: wrong key/, ...at(['--key-file', wrong]));
    refused(files, /enc\.fvd: wrong key/, ...at(['--key-file', truncated]));
    refused(files, /--key-file: key file .*empty is empty/, ...at(['--key-file', empty]));
    refused(files, /--key-file: key file .*nl is empty/, ...at(['--key-file', onlyNl]));
    refused(files, /larger than 64 KiB/, ...at(['--key-file', big]));
    refused(files, /--key-file: cannot open key file .*nonexistent: no such file/, ...at(['--key-file', path.join(d, 'nonexistent')]));
    refused(files, /--key-file: key file .* is a directory/, ...at(['--key-file', d]));
    assert.not.ok(fs.existsSync(out), 'no output left by a refused convert');
  }
  // info / map / check: no key needed, but a wrong one is refused (exit 1, not "corrupt").
  for (const cmd of [['info'], ['map'], ['check'], ['check', '--repair']]) {
    const before = snapshot(files);
    const r = fvd(...cmd, '--key-file', wrong, img);
    assertOneLineError(r, /wrong key/, 1);
    assertUnchanged(before, r.cmd);
  }
  refused(files, /stdin can hold only one key/, 'convert', '-O', 'fvd', '--key-file', '-', '--encrypt', '--target-key-file', '-', img, out);
  assert.not.ok(fs.existsSync(out));
});

test('a key for an unencrypted image or a raw file is refused', async () => {
  const d = caseDir();
  const key = keyFile(d);
  const plain = path.join(d, 'plain.fvd');
  assertOk(fvd('create', plain, '1M'));
  const raw = path.join(d, 'disk.raw');
  fs.writeFileSync(raw, patternBytes(MiB));
  const files = [plain, raw];
  for (const cmd of [['info'], ['map'], ['io', '-c', 'read 0 4k'], ['prefetch'], ['bench', '-c', '2'], ['check']])
    refused(files, /plain\.fvd: the image is not encrypted, but a key was given/, ...cmd, '--key-file', key, plain);
  refused(files, /--key-file given, but .*plain\.fvd is not encrypted \(to encrypt the output, add --encrypt\)/, 'convert', '--key-file', key, plain, path.join(d, 'o.raw'));
  refused(files, /disk\.raw: a key was given, but this is a raw file/, 'io', '--key-file', key, '-f', 'raw', '-c', 'read 0 4k', raw);
  refused(files, /--key-file applies to encrypted FVD images, not to -f raw/, 'bench', '-f', 'raw', '-c', '2', '--key-file', key, raw);
});

test('create and convert option misuse: one line, no file left behind', async () => {
  const d = caseDir();
  const key = keyFile(d);
  const img = path.join(d, 'new.fvd');
  assertOneLineError(fvd('create', '--encrypt', img, '1M'), /--encrypt needs the key: --key-file PATH/);
  assertOneLineError(fvd('create', '--key-file', key, img, '1M'), /--key-file given without --encrypt/);
  assertOneLineError(fvd('create', '--encrypt', '--key-file', keyFile(d, 'e', ''), img, '1M'), /is empty/);
  assertOneLineError(fvd('create', '--encrypt', '--key-file', path.join(d, 'nope'), img, '1M'), /cannot open key file/);
  assert.not.ok(fs.existsSync(img), 'no image left by a refused create');
  const { img: enc } = await encryptedImage(d);
  const over = path.join(d, 'over.fvd');
  assertOneLineError(fvd('create', '-b', enc, '-F', 'fvd', over), /encrypted image cannot be a base/);
  assert.not.ok(fs.existsSync(over));
  const raw = path.join(d, 'r.raw');
  fs.writeFileSync(raw, Buffer.alloc(MiB));
  const out = path.join(d, 'o.fvd');
  assertOneLineError(fvd('convert', '--encrypt', '--key-file', key, raw, path.join(d, 'o.raw')), /--encrypt needs -O fvd/);
  assertOneLineError(fvd('convert', '-O', 'fvd', '--encrypt', raw, out), /--encrypt needs the key/);
  assertOneLineError(fvd('convert', '-O', 'fvd', '--target-key-file', key, raw, out), /--target-key-file given without --encrypt/);
  assert.not.ok(fs.existsSync(out));
  // Unaligned writes and write-zeroes to an encrypted image: read-modify-write of the edge sectors.
  assertOk(fvd('io', '--key-file', key, '-c', 'write -P 0xab 3 1000', '-c', 'zero 500 20', enc));
  assertOk(fvd('io', '--key-file', key, '-c', 'read -P 0 0 3', '-c', 'read -P 0xab 3 497', '-c', 'read -P 0 500 20', '-c', 'read -P 0xab 520 483', '-c', 'read -P 0 1003 21', enc));
  // Re-keying by convert: a new key for the copy.
  const other = keyFile(d, 'other', 'another passphrase');
  const rekeyed = path.join(d, 'rekeyed.fvd');
  assertOk(fvd('io', '--key-file', key, '-c', 'write -P 0x77 0 4k', enc));
  assertOk(fvd('convert', '-O', 'fvd', '--key-file', key, '--encrypt', '--target-key-file', other, enc, rekeyed));
  assertOk(fvd('io', '--key-file', other, '-c', 'read -P 0x77 0 4k', rekeyed));
  assertOneLineError(fvd('io', '--key-file', key, '-c', 'read 0 4k', rekeyed), /wrong key/);
});

test('damaged key fields: structure → corrupt (even without the key); wrapped key or tag → wrong key; never changed', async () => {
  const d = caseDir();
  const { img, key } = await encryptedImage(d);
  const pristine = fs.readFileSync(img);
  const cases: Array<{ what: string; damage: () => void; noKey: RegExp | null; withKey: RegExp }> = [
    { what: 'cipher id 9', damage: () => writeBytes(img, 176, Buffer.from([9])), noKey: /corrupt image: encryption fields: unknown cipher 9/, withKey: /unknown cipher 9/ },
    { what: 'scrypt log2(N) 63', damage: () => writeBytes(img, 178, Buffer.from([63])), noKey: /log2\(N\) 63/, withKey: /log2\(N\) 63/ },
    { what: 'reserved byte 300', damage: () => writeBytes(img, 300, Buffer.from([1])), noKey: /reserved byte 300/, withKey: /reserved byte 300/ },
    { what: 'wrapped key byte', damage: () => flipByte(img, 230, 0x10), noKey: null, withKey: /wrong key: .*key fields are damaged/ },
    { what: 'GCM tag byte', damage: () => flipByte(img, 280, 0x01), noKey: null, withKey: /wrong key/ },
    { what: 'salt byte', damage: () => flipByte(img, 190, 0x01), noKey: null, withKey: /wrong key/ },
    { what: 'ENCRYPTED bit cleared', damage: () => flipByte(img, 16, 0x08), noKey: null, withKey: /not encrypted, but a key was given/ },
  ];
  for (const c of cases) {
    fs.writeFileSync(img, pristine);
    c.damage();
    fixHeaderCrc(img); // only the encryption checks can trip
    const before = snapshot([img]);
    if (c.noKey) {
      assertOneLineError(fvd('info', img), c.noKey);
      const ck = fvd('check', img);
      assertNoCrash(ck);
      assert.is(ck.code, 2, `${c.what}: check exit 2\n${ck.stdout}${ck.stderr}`);
      assert.match(ck.stdout, c.noKey);
    } else if (c.what !== 'ENCRYPTED bit cleared') {
      assertOk(fvd('info', img)); // undetectable without the key
    }
    for (const args of [['io', '-c', 'read 0 4k'], ['io', '-c', 'write 0 4k'], ['info']]) {
      const r = fvd(...args, '--key-file', key, img);
      assertOneLineError(r, c.withKey);
      noKeyShown(r);
    }
    assertUnchanged(before, `commands on an image with a damaged ${c.what}`);
  }
});

test('serve: a bad key file is refused before anything else happens', async () => {
  const d = caseDir();
  const { img } = await encryptedImage(d);
  refused([img], /--key-file: cannot open key file/, 'serve', '--key-file', path.join(d, 'missing.key'), img);
});

test.run();
