/**
 * An encrypted image's key leaves memory with the image (docs/FORMAT.md §11.2, "Key handling"):
 *
 *  - XtsCipher.destroy zeroes every buffer that held key material and ends its OpenSSL contexts;
 *    the cipher refuses to work afterwards;
 *  - every cipher the engine makes is destroyed again: by close(), by abandon() (a simulated
 *    crash), by an open that is refused after the key was unlocked, by the offline maintenance
 *    commands and by check — XtsCipher.live returns to where it was;
 *  - the queue workers' FastCrypt wipes its cipher; the daemon hands a worker its key in shared
 *    memory and wipes its own copy;
 *  - a key read from a file sits in memory of its own that wipe() clears entirely, and reading it
 *    makes the process non-dumpable (no core dump, no ptrace by the same user);
 *  - no command puts the key into its output or error text, and none takes a key on argv.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FvdImage } from '../../fvd/image.js';
import { XtsCipher, unlock, sealNewKey } from '../../fvd/crypto.js';
import { checkImage } from '../../fvd/check.js';
import { commitImage, rebaseImage, resizeImage } from '../../fvd/maintenance.js';
import { FastCrypt } from '../../daemon/fast-crypt.js';
import { readKeyFile, wipe } from '../../daemon/key-file.js';
import { sharedKeyForWorker } from '../../daemon/queue-threads.js';
import { libc } from '../../ffi/libc.js';
import { MemIo } from '../helpers/mem-io.js';
import { TempDir, fvd, assertNoCrash } from '../helpers/cli.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const KEY = Buffer.from('secrets-test-key-MARKER-7f3a9c');
const FAST_KDF = { log2N: 10, r: 8, p: 1 };

const allZero = (b: Uint8Array) => b.every((x) => x === 0);
const cipherOf = (img: unknown) => (img as { xts: XtsCipher | null }).xts!;

function assertWiped(c: XtsCipher, what: string): void {
  assert.ok(c.isDestroyed, `${what}: cipher destroyed`);
  for (const b of c.secretBuffersForTest()) assert.ok(allZero(b), `${what}: a key buffer (${b.length} B) is not zeroed`);
  assert.throws(() => c.encrypt(new Uint8Array(512), new Uint8Array(512), 0), /destroyed/, `${what}: encrypt after destroy`);
  assert.throws(() => c.decrypt(new Uint8Array(512), 0), /destroyed/, `${what}: decrypt after destroy`);
  assert.throws(() => c.masterKey(), /destroyed/, `${what}: masterKey after destroy`);
}

async function encryptedImage(io: MemIo, p: string, extra: object = {}): Promise<void> {
  await FvdImage.create(io, p, { size: 4 * MiB, journalSize: 64 * KiB, encrypt: { key: KEY, kdf: FAST_KDF }, ...extra });
}

test('XtsCipher.destroy: every key buffer zeroed, the cipher refuses work, idempotent; the caller\'s key is not kept', () => {
  const key = new Uint8Array(64).map((_, i) => i + 1);
  const live = XtsCipher.live;
  const c = new XtsCipher(key);
  assert.is(XtsCipher.live, live + 1);
  key.fill(0); // the caller wipes its copy: the cipher still works
  const pt = new Uint8Array(1024).fill(0x5a);
  const ct = new Uint8Array(1024);
  c.encrypt(pt, ct, 7);
  assert.not.ok(allZero(ct));
  const copy = c.masterKey();
  assert.is(copy[0], 1, 'masterKey: a copy of the key given');
  assert.is(copy.buffer.byteLength, 64, 'masterKey: in an ArrayBuffer of its own');
  assert.not.ok(c.secretBuffersForTest().every(allZero), 'before destroy the key is held');
  c.destroy();
  assertWiped(c, 'destroy');
  assert.is(XtsCipher.live, live);
  c.destroy();
  assert.is(XtsCipher.live, live, 'a second destroy changes nothing');
  assert.is(copy[0], 1, 'a copy handed out is the caller\'s to wipe');
});

test('FvdImage: close, abandon and a refused open wipe the key; the live cipher count returns', async () => {
  const io = new MemIo();
  await encryptedImage(io, '/s/a.fvd');
  const live = XtsCipher.live;

  const img = await FvdImage.open(io, '/s/a.fvd', { key: KEY });
  const c = cipherOf(img);
  await img.write(new Uint8Array(64 * KiB).fill(0x42), 0);
  await img.flush();
  assert.is(XtsCipher.live, live + 1);
  await img.close();
  assertWiped(c, 'close');
  assert.is(XtsCipher.live, live, 'close');

  const crashed = await FvdImage.open(io, '/s/a.fvd', { key: KEY });
  const c2 = cipherOf(crashed);
  await crashed.write(new Uint8Array(4 * KiB).fill(1), 0);
  await crashed.abandon();
  assertWiped(c2, 'abandon');
  assert.is(XtsCipher.live, live, 'abandon');

  // Refused after the key was unlocked: the base is missing (FORMAT.md §11.2: the key is checked
  // first, so a cipher exists when the base is looked for).
  io.writeFile('/s/base.raw', new Uint8Array(1 * MiB));
  await encryptedImage(io, '/s/over.fvd', { base: 'base.raw', baseFormat: 'raw' });
  io.deleteFile('/s/base.raw');
  let err: unknown;
  try {
    await FvdImage.open(io, '/s/over.fvd', { key: KEY });
  } catch (e) {
    err = e;
  }
  assert.match(String((err as Error)?.message), /base/, 'open over a missing base is refused');
  assert.is(XtsCipher.live, live, 'a refused open keeps no cipher');
  assert.is(io.openCount, 0);
});

test('offline commands (commit, rebase, resize, check) leave no cipher alive', async () => {
  const io = new MemIo();
  io.writeFile('/m/base.raw', new Uint8Array(2 * MiB).fill(3));
  await encryptedImage(io, '/m/img.fvd', { base: 'base.raw', baseFormat: 'raw', layout: 'compact' });
  const img = await FvdImage.open(io, '/m/img.fvd', { key: KEY });
  await img.write(new Uint8Array(64 * KiB).fill(9), 0);
  await img.close();
  const live = XtsCipher.live;
  await checkImage(io, '/m/img.fvd', { key: KEY });
  assert.is(XtsCipher.live, live, 'check');
  await resizeImage(io, '/m/img.fvd', 8 * MiB, { key: KEY });
  assert.is(XtsCipher.live, live, 'resize');
  await rebaseImage(io, '/m/img.fvd', { base: '', key: KEY });
  assert.is(XtsCipher.live, live, 'rebase');
  io.writeFile('/m/b2.raw', new Uint8Array(1 * MiB));
  await rebaseImage(io, '/m/img.fvd', { base: 'b2.raw', baseFormat: 'raw', key: KEY });
  await commitImage(io, '/m/img.fvd', { key: KEY });
  assert.is(XtsCipher.live, live, 'commit');
  // A refusal with a wrong key after the fields were parsed: nothing unlocked, nothing kept.
  await resizeImage(io, '/m/img.fvd', 4 * MiB, { key: Buffer.from('wrong') }).catch(() => {});
  assert.is(XtsCipher.live, live, 'wrong key');
  assert.is(io.openCount, 0);
});

test('FastCrypt.destroy wipes the worker\'s cipher; the worker\'s key arrives in shared memory and the source copy is wiped', async () => {
  const fields = await sealNewKey(KEY, FAST_KDF);
  const xts = await unlock('/x.fvd', fields, KEY);
  const live = XtsCipher.live;
  const master = xts.masterKey();
  const shared = sharedKeyForWorker(master)!;
  assert.ok(shared instanceof SharedArrayBuffer, 'a SharedArrayBuffer: a worker sees this memory, no clone of it is made');
  assert.ok(allZero(master), 'the copy the key came in is wiped');
  const workerView = new Uint8Array(shared);
  assert.not.ok(allZero(workerView));
  const fc = new FastCrypt(workerView, new Uint8Array(2 * 8192), 2, 8192);
  workerView.fill(0); // what the worker does once its cipher holds the key
  const buf = new Uint8Array(8192).fill(0x33);
  fc.encryptWrite(0, 4096, 4096);
  assert.is(XtsCipher.live, live + 1);
  fc.destroy();
  assertWiped(fc.cipherForTest, 'FastCrypt.destroy');
  assert.is(XtsCipher.live, live);
  assert.is(sharedKeyForWorker(null), null);
  xts.destroy();
  assert.ok(buf.length > 0);
});

const tmp = new TempDir('fvd-secrets-');
test.after(() => tmp.cleanup());

test('readKeyFile: exactly the key, in memory of its own that wipe() clears entirely', () => {
  const f = tmp.file('k1');
  fs.writeFileSync(f, 'a passphrase\n', { mode: 0o600 });
  const key = readKeyFile(f)!;
  assert.is(Buffer.from(key).toString(), 'a passphrase');
  assert.is(key.byteOffset, 0);
  assert.is(key.buffer.byteLength, key.length, 'no other bytes share its ArrayBuffer (no pool, no newline)');
  wipe(key);
  assert.ok(allZero(new Uint8Array(key.buffer)));
});

const HERE = path.dirname(fileURLToPath(import.meta.url));

test('reading a key makes the process non-dumpable (PR_SET_DUMPABLE 0); before it, it is dumpable', () => {
  if (!libc()) {
    console.log('  # skip: koffi (libc) unavailable: prctl cannot be called here');
    return;
  }
  const f = tmp.file('k2');
  fs.writeFileSync(f, 'another passphrase', { mode: 0o600 });
  const keyFileJs = path.join(HERE, '..', '..', 'daemon', 'key-file.js');
  const libcJs = path.join(HERE, '..', '..', 'ffi', 'libc.js');
  const script = `
    const { readKeyFile } = await import(${JSON.stringify(keyFileJs)});
    const { libc, PR_GET_DUMPABLE } = await import(${JSON.stringify(libcJs)});
    const before = libc().prctl(PR_GET_DUMPABLE, 0);
    readKeyFile(${JSON.stringify(f)});
    console.log(before, libc().prctl(PR_GET_DUMPABLE, 0));`;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' });
  assert.is(r.status, 0, r.stderr);
  assert.is(r.stdout.trim(), '1 0', 'dumpable before the key is read, not after');
});

test('CLI: the key never appears in output or error text; no option takes a key on the command line', () => {
  const marker = 'KEY-MARKER-ZX81-do-not-print';
  const d = tmp.caseDir();
  const key = path.join(d, 'key');
  const wrong = path.join(d, 'wrong');
  fs.writeFileSync(key, marker, { mode: 0o600 });
  fs.writeFileSync(wrong, `${marker}-wrong`, { mode: 0o600 });
  const enc = path.join(d, 'enc.fvd');
  const plain = path.join(d, 'plain.fvd');
  assert.is(fvd('create', '--encrypt', '--key-file', key, enc, '4M').code, 0);
  // A cheap scrypt from here on (each command below unlocks the image once).
  const same = path.join(d, 'same');
  fs.copyFileSync(key, same);
  assert.is(fvd('change-key', '--key-file', key, '--new-key-file', same, '--kdf-log2n', '10', enc).code, 0);
  assert.is(fvd('create', plain, '4M').code, 0);
  const runs = [
    ['io', '--key-file', key, '-c', 'write -P 0x11 0 4k', '-c', 'read -P 0x11 0 4k', enc],
    ['io', '--key-file', wrong, '-c', 'read 0 4k', enc],
    ['io', '--key-file', key, '-c', 'read 0 4k', plain],
    ['io', '--key-file', key, '-c', 'read 8M 4k', enc],
    ['info', '--key-file', wrong, enc],
    ['check', '--key-file', wrong, enc],
    ['convert', '--key-file', wrong, enc, path.join(d, 'out.raw')],
    ['resize', '--key-file', wrong, enc, '2M'],
    ['commit', '--key-file', key, enc],
    ['rebase', '--key-file', wrong, '-b', '', enc],
    ['prefetch', '--key-file', wrong, enc],
    ['change-key', '--key-file', wrong, '--new-key-file', key, enc],
    ['serve', '--key-file', wrong, enc],
  ];
  for (const args of runs) {
    const r = fvd(...args);
    assertNoCrash(r);
    assert.not.ok(r.stdout.includes(marker) || r.stderr.includes(marker), `fvd ${args.join(' ')} printed the key:\n${r.stdout}${r.stderr}`);
    assert.not.ok(/5a31|4b45592d/i.test(r.stderr), `fvd ${args.join(' ')}: key bytes in hex?`);
  }
  for (const opt of ['--key', '--passphrase', '--password', '--secret']) {
    const r = fvd('io', opt, marker, '-c', 'read 0 4k', enc);
    assert.ok(r.code !== 0, `fvd io ${opt} VALUE must be refused`);
    assert.not.ok(r.stderr.includes(marker), `fvd io ${opt}: the refused value is echoed`);
  }
});

test.run();
