/**
 * `fvd commit`, `fvd rebase`, `fvd resize` on encrypted images through the CLI (README "Base
 * chains, commit, rebase and resize", docs/FORMAT.md §12.6): --key-file PATH and --key-file -,
 * what needs the key and what does not, the base holding plaintext after a commit and the image
 * never holding plaintext after a rebase — and bad input: a missing, wrong or superfluous key,
 * an unreadable key file, images with internal snapshots. Every refusal is one line on stderr, a
 * non-zero exit, and leaves the image AND its base byte for byte as they were (sha256).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { CLI, TempDir, assertOk, assertOneLineError, assertUnchanged, fvd, snapshot, type CliResult } from '../helpers/cli.js';

const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-enc-maint-');
test.after(() => tmp.cleanup());
const PASSPHRASE = 'correct horse battery staple, maintenance edition';
/** Plaintext that must show up in a committed base and never in an encrypted image file. */
const SECRET = Buffer.from('MAINTENANCE-SECRET-PAYLOAD-4567');

function fvdIn(input: string, ...args: string[]): CliResult {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000, cwd: os.tmpdir(), input });
  if (r.error) throw r.error;
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, cmd: `fvd ${args.join(' ')} < input` };
}

function secretBytes(n: number): Buffer {
  return Buffer.concat(Array.from({ length: Math.ceil(n / SECRET.length) }, () => SECRET)).subarray(0, n);
}

function has(file: string, needle: Buffer): boolean {
  return fs.readFileSync(file).includes(needle);
}

function noKeyShown(r: CliResult): void {
  assert.not.ok((r.stdout + r.stderr).includes('battery staple'), `${r.cmd} printed the key`);
}

interface Setup {
  dir: string;
  key: string;
  wrong: string;
  base: string;
  img: string;
  f(n: string): string;
}

/** base.raw (4 MiB of the secret text) under enc.fvd (8 MiB, encrypted), with a write of 0x5a. */
function setup(layout = 'raw'): Setup {
  const dir = tmp.caseDir();
  const f = (n: string) => path.join(dir, n);
  fs.writeFileSync(f('key'), PASSPHRASE + '\n', { mode: 0o600 });
  fs.writeFileSync(f('wrong'), 'not the passphrase\n', { mode: 0o600 });
  fs.writeFileSync(f('base.raw'), secretBytes(4 * MiB));
  assertOk(fvd('create', '--encrypt', '--key-file', f('key'), '-b', 'base.raw', '-F', 'raw', '--layout', layout, f('enc.fvd'), '8M'));
  assertOk(fvd('io', '--key-file', f('key'), '-c', 'write -P 0x5a 1M 64k', '-c', 'write -P 0x5a 6M 64k', f('enc.fvd')));
  assert.not.ok(has(f('enc.fvd'), Buffer.alloc(64, 0x5a)), 'setup: the image holds no plaintext');
  return { dir, key: f('key'), wrong: f('wrong'), base: f('base.raw'), img: f('enc.fvd'), f };
}

test('commit --key-file: the base holds the plaintext and grows; the image is emptied and keeps its key', () => {
  const s = setup('compact');
  const header = fs.readFileSync(s.img).subarray(176, 304);
  const r = fvd('commit', '--key-file', s.key, s.img);
  assertOk(r);
  noKeyShown(r);
  assert.match(r.stdout, /^Image committed into 'base\.raw' \(raw\): 128 KiB of .* local data differed and was written; the base grew to 8 MiB; the image is now empty\.\n$/);
  const base = fs.readFileSync(s.base);
  assert.is(base.length, 8 * MiB);
  assert.ok(base.subarray(MiB, MiB + 64 * 1024).every((x) => x === 0x5a), 'plaintext at 1M');
  assert.ok(base.subarray(6 * MiB, 6 * MiB + 64 * 1024).every((x) => x === 0x5a), 'plaintext at 6M');
  assert.ok(base.subarray(0, MiB).equals(secretBytes(4 * MiB).subarray(0, MiB)), 'the rest of the base as it was');
  assert.ok(fs.readFileSync(s.img).subarray(176, 304).equals(header), 'key fields kept');
  assertOk(fvd('io', '--key-file', s.key, '-c', 'read -P 0x5a 6M 64k', s.img));
  assertOk(fvd('check', '--key-file', s.key, s.img));
});

test('rebase -b "" --key-file -: the base is copied in encrypted; -u and growing need no key; shrinking does', () => {
  const s = setup();
  // -u: header only, no key (onto an identical copy).
  fs.copyFileSync(s.base, s.f('copy.raw'));
  assertOk(fvd('rebase', '-u', '-b', 'copy.raw', '-F', 'raw', s.img));
  fs.rmSync(s.base);
  const r = fvdIn(PASSPHRASE + '\n', 'rebase', '-b', '', '--key-file', '-', s.img);
  assertOk(r);
  assert.match(r.stdout, /^Image rebased onto no base \(standalone\): [\d.]+ MiB copied from the old chain/, r.stdout);
  fs.rmSync(s.f('copy.raw'));
  assert.not.ok(has(s.img, SECRET), 'no plaintext of the base in the image file');
  const back = s.f('back.raw');
  assertOk(fvd('convert', '--key-file', s.key, '-O', 'raw', s.img, back));
  const plain = fs.readFileSync(back);
  assert.ok(plain.subarray(0, MiB).equals(secretBytes(4 * MiB).subarray(0, MiB)), 'reads the old base through the key');
  // grow without a key (relative size), then shrinking needs it
  assert.match(fvd('resize', s.img, '+8M').stdout, /Image resized: 8 MiB -> 16 MiB/);
  const before = snapshot([s.img]);
  assertOneLineError(fvd('resize', s.img, '12M'), [/enc\.fvd: the image is encrypted: shrinking it without --shrink .* needs its key \(--key-file PATH, or --key-file - for stdin\)/]);
  assertUnchanged(before, 'resize shrink without a key');
  assertOk(fvd('resize', '--key-file', s.key, s.img, '12M')); // zeros past 12M
  assertOneLineError(fvd('resize', '--key-file', s.key, s.img, '6M'), [/would discard data \(byte 6291456 is not zero\); use --shrink/]);
  assertUnchanged(snapshot([s.img]), 'noop');
  assertOk(fvd('resize', '--shrink', s.img, '6M')); // --shrink reads nothing: no key
  assertOk(fvd('io', '--key-file', s.key, '-c', 'read -P 0x5a 1M 64k', s.img));
  assertOk(fvd('check', '--key-file', s.key, s.img));
  assert.not.ok(has(s.img, SECRET) || has(s.img, Buffer.alloc(64, 0x5a)), 'still no plaintext');
});

test('bad input: missing, wrong or superfluous key, unreadable key file — one line, image and base unchanged', () => {
  const s = setup();
  const plainImg = s.f('plain.fvd');
  assertOk(fvd('create', '-b', 'base.raw', '-F', 'raw', plainImg, '8M'));
  assertOk(fvd('io', '-c', 'write -P 0x11 0 64k', plainImg));
  const files = [s.img, s.base, plainImg];
  fs.writeFileSync(s.f('new.raw'), Buffer.alloc(MiB));
  const cases: Array<[string[], RegExp]> = [
    [['commit', s.img], /enc\.fvd: the image is encrypted: commit needs its key/],
    [['commit', '-d', '--key-file', s.wrong, s.img], /enc\.fvd: wrong key/],
    [['commit', '--key-file', s.key, plainImg], /plain\.fvd: the image is not encrypted, but a key was given/],
    [['commit', '--key-file', s.f('nonexistent'), s.img], /--key-file: cannot open key file .*nonexistent: no such file/],
    [['rebase', '-b', 'new.raw', '-F', 'raw', s.img], /enc\.fvd: the image is encrypted: a safe rebase \(it compares and copies data; -u switches the header only\) needs its key/],
    [['rebase', '-b', '', '--key-file', s.wrong, s.img], /wrong key/],
    [['rebase', '-u', '-b', 'new.raw', '-F', 'raw', '--key-file', s.wrong, s.img], /wrong key/],
    [['rebase', '-b', '', '--key-file', s.key, plainImg], /the image is not encrypted, but a key was given/],
    [['resize', s.img, '4M'], /needs its key/],
    [['resize', '--key-file', s.wrong, s.img, '16M'], /wrong key/],
    [['resize', '--key-file', s.key, plainImg, '+1M'], /the image is not encrypted, but a key was given/],
    [['resize', '--key-file', s.dir, s.img, '16M'], /--key-file: key file .* is a directory/],
  ];
  for (const [args, re] of cases) {
    const before = snapshot(files);
    const r = fvd(...args);
    assertOneLineError(r, [re]);
    noKeyShown(r);
    assertUnchanged(before, r.cmd);
  }
  // stdin: a wrong key piped in
  const before = snapshot(files);
  assertOneLineError(fvdIn('nope\n', 'commit', '--key-file', '-', s.img), [/wrong key/]);
  assertUnchanged(before, 'commit --key-file - with a wrong key');
});

test('internal snapshots: commit, rebase, resize refuse with the reason (delete them first); nothing written', () => {
  const dir = tmp.caseDir();
  const f = (n: string) => path.join(dir, n);
  fs.writeFileSync(f('base.raw'), secretBytes(MiB));
  assertOk(fvd('create', '-b', 'base.raw', '-F', 'raw', '--layout', 'compact', f('s.fvd'), '2M'));
  assertOk(fvd('io', '-c', 'write -P 0x22 0 64k', f('s.fvd')));
  assertOk(fvd('snapshot', '-c', 'before-upgrade', f('s.fvd')));
  const files = [f('s.fvd'), f('base.raw')];
  for (const [args, re] of [
    [['commit', f('s.fvd')], /s\.fvd: commit refuses an image with internal snapshots: its snapshots read every block they do not hold through the base, so writing into the base would change what each snapshot holds; delete the snapshots first \(fvd snapshot -d NAME\)/],
    [['rebase', '-b', '', f('s.fvd')], /rebase refuses an image with internal snapshots: .*switching the base would change what each snapshot holds/],
    [['rebase', '-u', '-b', 'base.raw', '-F', 'raw', f('s.fvd')], /rebase refuses an image with internal snapshots/],
    [['resize', f('s.fvd'), '+1M'], /resize refuses an image with internal snapshots: a snapshot can only be applied to a disk of the size it was taken at/],
  ] as Array<[string[], RegExp]>) {
    const before = snapshot(files);
    assertOneLineError(fvd(...args), [re]);
    assertUnchanged(before, args.join(' '));
  }
  assertOk(fvd('snapshot', '-d', 'before-upgrade', f('s.fvd')));
  assertOk(fvd('commit', f('s.fvd')));
  assert.ok(fs.readFileSync(f('base.raw')).subarray(0, 65536).every((x) => x === 0x22));
});

test.run();
