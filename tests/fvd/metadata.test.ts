/**
 * The one metadata loader (fvd/metadata.ts) behind both the engine and offline maintenance.
 *
 * Regression: a compact image over a raw base whose only chunk was mapped, written and flushed,
 * then the power cut and the file cut back to data_offset. FORMAT.md §4.3 calls this a legitimate
 * crash state (the table entry names storage past the end of the file; it reads as zeros, and a
 * writer that replays the journal extends the file over it before clearing DIRTY). The engine
 * opened it; `fvd commit`, `fvd rebase` and `fvd resize` refused it as "truncated" because the
 * offline loader had its own, stricter table check and no file extension on recovery.
 *
 * Every case goes through the entry points the CLI uses (daemon/commands/*.ts: FvdImage.open,
 * commitImage, rebaseImage, resizeImage over storageIo()) on real files, then reopens the result.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { commitImage, rebaseImage, resizeImage } from '../../fvd/maintenance.js';
import { checkImage } from '../../fvd/check.js';
import { HEADER_SIZE, INCOMPAT_DIRTY, decodeHeader, type Header } from '../../fvd/format.js';
import { FvdError } from '../../fvd/errors.js';
import { storageIo } from '../../storage/storage-io.js';
import { TempDir, patternBytes } from '../helpers/cli.js';
import { rejectsOneLine } from '../helpers/rejects.js';
import { readWholeDisk } from '../helpers/model.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 4 * MiB;
const BLOCK = 64 * KiB;
const CHUNK = MiB;
/** The guest write: two whole blocks inside chunk 1 (so chunk 1 also has blocks still in the base). */
const WRITE_AT = CHUNK + 4 * BLOCK;
const WRITE_LEN = 2 * BLOCK;

const tmp = new TempDir('fvd-metadata-');
test.after(() => tmp.cleanup());

function headerOf(file: string): Header {
  const bytes = fs.readFileSync(file);
  return decodeHeader(file, bytes.subarray(0, HEADER_SIZE), bytes.length);
}

/**
 * What the crashed image must read as (FORMAT.md §4.3): the written blocks have their bits set
 * (journaled by the flush), but the chunk's storage lies past the end of the file, so they read
 * as zeros; every other block, including the rest of chunk 1, still reads from the base.
 */
function expectedAfterCrash(base: Uint8Array): Uint8Array {
  const disk = Uint8Array.from(base);
  disk.fill(0, WRITE_AT, WRITE_AT + WRITE_LEN);
  return disk;
}

/** A fresh case directory holding base.raw and the crashed img.fvd (base path relative). */
async function crashedImage(): Promise<{ dir: string; image: string; base: string; baseData: Uint8Array; dataOffset: number }> {
  const dir = tmp.caseDir();
  const base = path.join(dir, 'base.raw');
  const baseData = patternBytes(SIZE, 7);
  fs.writeFileSync(base, baseData);
  const image = path.join(dir, 'img.fvd');
  const io = storageIo();
  await FvdImage.create(io, image, { base: 'base.raw', baseFormat: 'raw', layout: 'compact', blockSize: BLOCK, chunkSize: CHUNK, journalSize: 64 * KiB });
  const img = await FvdImage.open(io, image, { copyOnRead: false });
  await img.write(patternBytes(WRITE_LEN, 9), WRITE_AT);
  await img.flush(); // the TABLE_SET and BITMAP_SET records are in the journal
  await img.abandon(); // power cut: no checkpoint, DIRTY stays set
  const { dataOffset } = headerOf(image);
  fs.truncateSync(image, dataOffset); // the chunk's data never reached the disk
  const h = headerOf(image);
  assert.ok((h.incompatible & INCOMPAT_DIRTY) !== 0n, 'setup: the image is dirty');
  assert.is(fs.statSync(image).size, dataOffset, 'setup: the mapped chunk lies past the end of the file');
  return { dir, image, base, baseData, dataOffset };
}

async function readDisk(image: string, length: number): Promise<Uint8Array> {
  const disk = await readWholeDisk(storageIo(), image);
  assert.is(disk.length, length, `${path.basename(image)}: virtual size`);
  return disk;
}

function same(actual: Uint8Array, expected: Uint8Array, what: string): void {
  assert.is(actual.length, expected.length, `${what}: length`);
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.length);
  const e = Buffer.from(expected.buffer, expected.byteOffset, expected.length);
  if (a.equals(e)) return;
  let i = 0;
  while (a[i] === e[i]) i++;
  assert.unreachable(`${what}: first difference at byte ${i} (block ${Math.floor(i / BLOCK)}): ${a[i]} instead of ${e[i]}`);
}

async function assertClean(image: string, what: string): Promise<void> {
  const r = await checkImage(storageIo(), image);
  assert.equal(r.errors, [], `${what}: check`);
  assert.is(headerOf(image).incompatible & INCOMPAT_DIRTY, 0n, `${what}: DIRTY cleared`);
}

test('crash state of §4.3 (mapped chunk past the end of a file cut to data_offset): open reads zeros there, recovery extends the file', async () => {
  const c = await crashedImage();
  const expected = expectedAfterCrash(c.baseData);
  same(await readDisk(c.image, SIZE), expected, 'read-only open (in-memory replay)');
  assert.is(fs.statSync(c.image).size, c.dataOffset, 'a read-only open writes nothing');

  const img = await FvdImage.open(storageIo(), c.image);
  const buf = new Uint8Array(SIZE);
  await img.read(buf, 0);
  await img.close();
  same(buf, expected, 'read-write open');
  assert.ok(fs.statSync(c.image).size >= c.dataOffset + CHUNK, 'recovery extended the file over the mapped chunk');
  await assertClean(c.image, 'after open');
  same(await readDisk(c.image, SIZE), expected, 'reopened');
});

test('crash state of §4.3: commit accepts it and writes what the image reads into the base', async () => {
  const c = await crashedImage();
  const expected = expectedAfterCrash(c.baseData);
  const r = await commitImage(storageIo(), c.image);
  assert.ok(r.emptied);
  assert.is(r.bytesWritten, WRITE_LEN, 'only the two blocks that now read zeros differ from the base');
  same(new Uint8Array(fs.readFileSync(c.base)), expected, 'base after commit');
  await assertClean(c.image, 'after commit');
  same(await readDisk(c.image, SIZE), expected, 'image after commit (reads the base)');
});

test('crash state of §4.3: safe rebase (no base) and rebase -u accept it and keep the contents', async () => {
  const safe = await crashedImage();
  const expected = expectedAfterCrash(safe.baseData);
  await rebaseImage(storageIo(), safe.image, { base: '' });
  assert.is(headerOf(safe.image).baseSize, 0, 'safe rebase: no base any more');
  await assertClean(safe.image, 'after safe rebase');
  same(await readDisk(safe.image, SIZE), expected, 'after safe rebase');

  // -u recovers without the engine: the offline loader replays, extends and checkpoints itself.
  const unsafe = await crashedImage();
  fs.copyFileSync(unsafe.base, path.join(unsafe.dir, 'copy.raw'));
  await rebaseImage(storageIo(), unsafe.image, { base: 'copy.raw', baseFormat: 'raw', unsafe: true });
  assert.ok(fs.statSync(unsafe.image).size >= unsafe.dataOffset + CHUNK, 'rebase -u extended the file over the mapped chunk');
  await assertClean(unsafe.image, 'after rebase -u');
  same(await readDisk(unsafe.image, SIZE), expected, 'after rebase -u');
});

test('crash state of §4.3: resize (grow, and shrink without --shrink) accepts it and keeps the contents', async () => {
  const grow = await crashedImage();
  const expected = expectedAfterCrash(grow.baseData);
  await resizeImage(storageIo(), grow.image, SIZE + 2 * MiB);
  await assertClean(grow.image, 'after grow');
  const grown = new Uint8Array(SIZE + 2 * MiB);
  grown.set(expected);
  same(await readDisk(grow.image, SIZE + 2 * MiB), grown, 'after grow (the new range reads zeros)');

  // Shrinking reads the dropped range through the engine first (read-only, in-memory replay).
  const shrink = await crashedImage();
  await rejectsOneLine(resizeImage(storageIo(), shrink.image, 2 * MiB), FvdError, /would discard data/, 'shrink without --shrink: the dropped range holds base data');
  await resizeImage(storageIo(), shrink.image, 2 * MiB, { shrink: true });
  await assertClean(shrink.image, 'after shrink');
  same(await readDisk(shrink.image, 2 * MiB), expected.subarray(0, 2 * MiB), 'after shrink');
});

test.run();
