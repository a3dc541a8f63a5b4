/**
 * `fvd commit`, `fvd rebase`, `fvd resize` on real files: the README's worked example step by
 * step (content checked with `fvd io -c "read -P"` and `fvd convert`), chains through the CLI,
 * and bad input — every refusal is one line on stderr with a non-zero exit and leaves every file
 * byte for byte as it was (sha256 before/after). Also a convert large enough for its background
 * flushes, into each output kind.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { WRITEBACK_BYTES } from '../../daemon/commands/convert.js';
import { nodeIo } from '../../storage/node-file.js';
import {
  TempDir,
  assertOk,
  assertOneLineError,
  assertUnchanged,
  fvd,
  fvdAsync,
  json,
  patternBytes,
  snapshot,
} from '../helpers/cli.js';
import { flipByte } from '../helpers/tamper.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const tmp = new TempDir('fvd-crr-cli-');

interface Info {
  virtualSize: number;
  baseChain: Array<{ path: string; format: string; size: number }>;
  bytesLocal: number;
  bytesInBase: number;
  allocatedChunks?: number;
}
const info = (f: string) => json<Info>(fvd('info', '--json', f));

function flatten(image: string): Buffer {
  const out = `${image}.flat-${Math.random().toString(36).slice(2)}.raw`;
  assertOk(fvd('convert', '-O', 'raw', image, out));
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

test('worked example: overlay, commit into the base, rebase, resize', () => {
  const dir = tmp.caseDir();
  const f = (n: string) => path.join(dir, n);
  fs.writeFileSync(f('base.raw'), patternBytes(4 * MiB, 1));
  // an overlay twice the base's size, some writes inside and past the base
  assertOk(fvd('create', '-b', 'base.raw', '-F', 'raw', '--layout', 'compact', f('vm.fvd'), '8M'));
  assertOk(fvd('io', '-c', 'write -P 0xab 1M 64k', '-c', 'write -P 0xcd 6M 64k', f('vm.fvd')));
  const expected = flatten(f('vm.fvd'));

  // commit: the base grows to 8 MiB and holds the writes; the overlay is empty
  let r = fvd('commit', f('vm.fvd'));
  assertOk(r);
  assert.match(r.stdout, /^Image committed into 'base\.raw' \(raw\): 128 KiB of .* local data differed and was written; the base grew to 8 MiB; the image is now empty\.\n$/);
  assert.ok(fs.readFileSync(f('base.raw')).equals(expected), 'base.raw = the overlay\'s disk');
  let i = info(f('vm.fvd'));
  assert.is(i.bytesInBase, 8 * MiB);
  assert.is(i.allocatedChunks, 0);
  assertOk(fvd('io', '-c', 'read -P 0xab 1M 64k', '-c', 'read -P 0xcd 6M 64k', f('vm.fvd')));
  assertOk(fvd('check', f('vm.fvd')));

  // rebase onto a copy with a different block, then remove the base altogether
  const other = Buffer.from(expected);
  other.fill(0x11, 2 * MiB, 2 * MiB + 64 * KiB);
  fs.writeFileSync(f('other.raw'), other);
  const before = flatten(f('vm.fvd'));
  r = fvd('rebase', '-b', 'other.raw', '-F', 'raw', f('vm.fvd'));
  assertOk(r);
  assert.match(r.stdout, /^Image rebased onto 'other\.raw' \(raw\): 64 KiB copied from the old chain, .* compared\.\n$/);
  i = info(f('vm.fvd'));
  assert.equal(i.baseChain.map((e) => path.basename(e.path)), ['other.raw']);
  fs.renameSync(f('base.raw'), f('base.raw.gone'));
  assert.ok(flatten(f('vm.fvd')).equals(before), 'same disk on the new base, old base gone');
  r = fvd('rebase', '-b', '', f('vm.fvd'));
  assertOk(r);
  assert.match(r.stdout, /onto no base \(standalone\)/);
  fs.rmSync(f('other.raw'));
  assert.ok(flatten(f('vm.fvd')).equals(before), 'standalone');
  assert.equal(info(f('vm.fvd')).baseChain, []);

  // resize: +4M, -- -2M (over zeros: fine), 3M (over data: needs --shrink)
  assert.match(fvd('resize', f('vm.fvd'), '+4M').stdout, /Image resized: 8 MiB -> 12 MiB/);
  assert.match(fvd('resize', f('vm.fvd'), '-2M').stdout, /12 MiB -> 10 MiB/);
  const refused = fvd('resize', f('vm.fvd'), '3M');
  assertOneLineError(refused, /shrinking to 3145728 bytes would discard data \(byte 3145728 is not zero\); use --shrink/);
  assert.match(fvd('resize', '--shrink', f('vm.fvd'), '3M').stdout, /10 MiB -> 3 MiB/);
  assert.ok(flatten(f('vm.fvd')).equals(before.subarray(0, 3 * MiB)));
  assertOk(fvd('check', f('vm.fvd')));
});

test('commit -d and --json; commit into an FVD base in the middle of a chain', () => {
  const dir = tmp.caseDir();
  const f = (n: string) => path.join(dir, n);
  fs.writeFileSync(f('r.raw'), patternBytes(2 * MiB, 2));
  assertOk(fvd('create', '-b', 'r.raw', '-F', 'raw', f('mid.fvd')));
  assertOk(fvd('create', '-b', 'mid.fvd', '-F', 'fvd', f('top.fvd')));
  assertOk(fvd('io', '-c', 'write -P 0x42 100k 300k', f('top.fvd')));
  const expected = flatten(f('top.fvd'));
  const raw = fs.readFileSync(f('r.raw'));
  const r = json<{ bytesWritten: number; emptied: boolean; baseGrownTo: number | null }>(fvd('commit', '-d', '--json', f('top.fvd')));
  // -p: qemu-img style progress on stderr, ending at 100%
  const p = fvd('commit', '-d', '-p', f('top.fvd'));
  assert.is(p.code, 0, p.stderr);
  assert.match(p.stderr, /\(100\.00\/100%\)\n$/);
  assert.is(r.emptied, false);
  assert.is(r.baseGrownTo, null);
  assert.ok(r.bytesWritten >= 300 * KiB);
  assert.ok(flatten(f('mid.fvd')).equals(expected), 'mid holds the data');
  assert.ok(fs.readFileSync(f('r.raw')).equals(raw), 'the raw bottom is untouched');
  assert.ok(info(f('top.fvd')).bytesLocal >= 300 * KiB, '-d: the top keeps its data');
  assert.ok(flatten(f('top.fvd')).equals(expected));
});

test('chains through the CLI: depth 3 info, missing middle image named, loop refused', () => {
  const dir = tmp.caseDir();
  const f = (n: string) => path.join(dir, n);
  fs.writeFileSync(f('r.raw'), patternBytes(MiB, 3));
  assertOk(fvd('create', '-b', 'r.raw', '-F', 'raw', f('a.fvd')));
  assertOk(fvd('create', '-b', 'a.fvd', '-F', 'fvd', '--layout', 'compact', f('b.fvd')));
  assertOk(fvd('create', '-b', 'b.fvd', '-F', 'fvd', f('c.fvd')));
  assert.equal(info(f('c.fvd')).baseChain.map((e) => [path.basename(e.path), e.format]), [['b.fvd', 'fvd'], ['a.fvd', 'fvd'], ['r.raw', 'raw']]);
  fs.renameSync(f('a.fvd'), f('a.moved'));
  const before = snapshot([f('c.fvd'), f('b.fvd'), f('r.raw')]);
  for (const args of [['info', f('c.fvd')], ['commit', f('c.fvd')], ['rebase', '-b', 'r.raw', '-F', 'raw', f('c.fvd')], ['resize', f('c.fvd'), '512k']])
    assertOneLineError(fvd(...args), /base image 'b\.fvd': base image 'a\.fvd' not found/);
  assertUnchanged(before, 'commands on a chain with a missing middle image');
  // -u does not need the old chain: it repairs the chain
  assertOk(fvd('rebase', '-u', '-b', 'r.raw', '-F', 'raw', f('b.fvd')));
  assertOk(fvd('info', f('c.fvd')));
  fs.renameSync(f('a.moved'), f('a.fvd'));
  // b onto c would close the loop b → c → b; b onto itself is the loop of length 1
  const snap = snapshot([f('a.fvd'), f('b.fvd'), f('c.fvd'), f('r.raw')]);
  for (const u of [[], ['-u']]) {
    assertOneLineError(fvd('rebase', ...u, '-b', 'c.fvd', '-F', 'fvd', f('b.fvd')), /base chain loop: '.*b\.fvd' is its own base/);
    assertOneLineError(fvd('rebase', ...u, '-b', 'b.fvd', '-F', 'fvd', f('b.fvd')), /an image cannot be its own base/);
  }
  assertUnchanged(snap, 'rebase refused for a loop');
  // A loop through a symbolic link (lexically different paths): refused too, in one line.
  fs.symlinkSync('s.fvd', f('link.fvd'));
  assertOk(fvd('create', f('s.fvd'), '1M'));
  assertOk(fvd('rebase', '-u', '-b', 'r.raw', '-F', 'raw', f('s.fvd')));
  const sl = snapshot([f('s.fvd'), f('r.raw')]);
  assertOneLineError(fvd('rebase', '-b', 'link.fvd', '-F', 'fvd', f('s.fvd')), /link\.fvd.*(in use by another process|base chain loop)/);
  assertUnchanged(sl, 'rebase onto a symlink to itself');
});

test('bad input: usage errors and refusals are one line and change nothing', async () => {
  const dir = tmp.caseDir();
  const f = (n: string) => path.join(dir, n);
  fs.writeFileSync(f('base.raw'), patternBytes(MiB, 4));
  assertOk(fvd('create', '-b', 'base.raw', '-F', 'raw', f('img.fvd'), '2M'));
  assertOk(fvd('io', '-c', 'write -P 0x77 1536k 64k', f('img.fvd')));
  assertOk(fvd('create', f('plain.fvd'), '1M'));
  fs.writeFileSync(f('notfvd.raw'), patternBytes(64 * KiB, 5));
  assertOk(fvd('create', '-b', 'base.raw', '-F', 'raw', f('corrupt.fvd')));
  flipByte(f('corrupt.fvd'), 44); // virtual size byte: header checksum mismatch
  const all = ['base.raw', 'img.fvd', 'plain.fvd', 'notfvd.raw', 'corrupt.fvd'].map(f);
  const before = snapshot(all);
  const cases: Array<[string[], RegExp]> = [
    [['commit'], /usage: fvd commit/],
    [['commit', f('img.fvd'), f('plain.fvd')], /usage: fvd commit/],
    [['commit', '--bogus', f('img.fvd')], /Unknown option '--bogus'/],
    [['commit', f('nope.fvd')], /nope\.fvd: no such file/],
    [['commit', f('notfvd.raw')], /not an FVD image/],
    [['commit', f('corrupt.fvd')], /corrupt image: header checksum mismatch/],
    [['commit', f('plain.fvd')], /has no base image to commit into/],
    [['rebase', f('img.fvd')], /usage: fvd rebase/],
    [['rebase', '-b', 'x.raw', f('img.fvd')], /without its format: add -F raw, -F qcow2 or -F fvd/],
    [['rebase', '-b', 'x.raw', '-F', 'vmdk', f('img.fvd')], /invalid base format 'vmdk'/],
    [['rebase', '-b', '', '-F', 'raw', f('img.fvd')], /-F given with -b ""/],
    [['rebase', '-b', 'missing.raw', '-F', 'raw', f('img.fvd')], /base image 'missing\.raw' not found/],
    [['rebase', '-b', 'notfvd.raw', '-F', 'fvd', f('img.fvd')], /not an FVD image/],
    [['rebase', '-b', 'img.fvd', '-F', 'fvd', f('img.fvd')], /own base/],
    [['rebase', '-b', 'base.raw', '-F', 'raw', f('corrupt.fvd')], /header checksum mismatch/],
    [['rebase', '-b', 'x'.repeat(4000), '-F', 'raw', f('img.fvd')], /base path must be 1 to 3584 bytes/],
    [['resize', f('img.fvd')], /usage: fvd resize/],
    [['resize', f('img.fvd'), '12Q'], /invalid size '12Q'/],
    [['resize', f('img.fvd'), '0'], /invalid size '0': the disk would be 0 bytes/],
    [['resize', f('img.fvd'), '-4M'], /invalid size '-4M': the disk would be -2097152 bytes/],
    [['resize', f('img.fvd'), '2P'], /out of range/],
    [['resize', f('img.fvd'), '1M'], /would discard data \(byte 1572864 is not zero\); use --shrink/],
    [['resize', f('corrupt.fvd'), '4M'], /header checksum mismatch/],
    [['resize', f('notfvd.raw'), '4M'], /not an FVD image/],
  ];
  for (const [args, re] of cases) assertOneLineError(fvd(...args), re);
  assertUnchanged(before, 'refused commit/rebase/resize');

  // A served (open) image: the usual lock error, for the image and for its base.
  const served = await FvdImage.open(nodeIo, f('img.fvd'));
  try {
    for (const args of [['commit', f('img.fvd')], ['rebase', '-b', '', f('img.fvd')], ['resize', f('img.fvd'), '4M']])
      assertOneLineError(await fvdAsync(...args), /img\.fvd: image is in use by another process \(locked\)/);
  } finally {
    await served.close();
  }
  const before2 = snapshot(all);
  assertOk(fvd('create', '-b', 'img.fvd', '-F', 'fvd', f('child.fvd')));
  const child = await FvdImage.open(nodeIo, f('child.fvd')); // reads through img.fvd: shared lock
  try {
    assertOneLineError(await fvdAsync('commit', f('img.fvd')), /in use by another process \(locked\)/);
    assertOneLineError(await fvdAsync('rebase', '-b', '', f('img.fvd')), /img\.fvd: image is in use by another process \(locked\)/);
  } finally {
    await child.close();
  }
  assertUnchanged(before2, 'commands refused because the image is served or used as a base');

  // A read-only base (not for root, who may write anyway).
  if (process.getuid?.() !== 0) {
    fs.chmodSync(f('base.raw'), 0o444);
    const snap = snapshot(all);
    assertOneLineError(await fvdAsync('commit', f('img.fvd')), /base image 'base\.raw' is read-only \(EACCES\): cannot commit into it/);
    assertUnchanged(snap, 'commit into a read-only base');
    fs.chmodSync(f('base.raw'), 0o644);
  }
});

test('resize: a relative change that is not a multiple of 512 (-1, +1, -511) is refused, not rounded away', () => {
  const dir = tmp.caseDir();
  const img = path.join(dir, 'r.fvd');
  assertOk(fvd('create', img, '1M'));
  const before = snapshot([img]);
  for (const text of ['-1', '+1', '-511', '+1000']) {
    assertOneLineError(fvd('resize', img, text), new RegExp(`invalid size '\\${text}': a relative change must be a multiple of 512 bytes`));
    assertUnchanged(before, `resize ${text}`);
  }
  assertOk(fvd('resize', img, '-512'));
  assert.is(info(img).virtualSize, MiB - 512);
});

test('convert of more than WRITEBACK_BYTES: background flushes while it writes; raw, FVD and compact FVD outputs hold the same bytes', () => {
  const dir = tmp.caseDir();
  const f = (n: string) => path.join(dir, n);
  // 2.5 × WRITEBACK_BYTES of data (no zero megabyte, so nothing is left sparse): two background
  // flushes run while later pieces are written.
  const data = crypto.randomBytes(WRITEBACK_BYTES * 2 + WRITEBACK_BYTES / 2);
  fs.writeFileSync(f('src.raw'), data);
  assertOk(fvd('convert', '-f', 'raw', '-O', 'raw', f('src.raw'), f('out.raw')));
  assert.ok(fs.readFileSync(f('out.raw')).equals(data), 'raw output');
  for (const layout of ['raw', 'compact']) {
    assertOk(fvd('convert', '-f', 'raw', '-O', 'fvd', '--layout', layout, f('src.raw'), f(`${layout}.fvd`)));
    assertOk(fvd('check', f(`${layout}.fvd`)));
    assert.ok(flatten(f(`${layout}.fvd`)).equals(data), `FVD output, ${layout} layout`);
  }
});

test.after(() => tmp.cleanup());
test.run();
