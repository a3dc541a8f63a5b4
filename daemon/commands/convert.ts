/**
 * fvd convert [-f raw|fvd] [-O raw|fvd] [--layout raw|compact] [--block-size N]
 *             [--key-file PATH|-] [--encrypt [--target-key-file PATH|-]] SRC DST
 * Flattens SRC (an FVD image with its whole base chain, or a raw file) into DST. Zero ranges are
 * skipped, so the output is sparse. DST must not exist (or --force).
 *
 * Keys: --key-file unlocks an encrypted SRC; with --encrypt (-O fvd) the output is encrypted
 * with --target-key-file, or else with the --key-file key.
 */
import fs from 'node:fs';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo, syncDirectoryOf } from '../../fvd/node-file.js';
import { UsageError, parseOptions, parseSize } from '../args.js';
import { isEncryptedImage, openDisk, parseFormat, probeFormat, type Disk } from '../disk.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';

const STEP = 1024 * 1024;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseOptions('convert', args, {
    f: { type: 'string', short: 'f' },
    O: { type: 'string', short: 'O', default: 'raw' },
    layout: { type: 'string', default: 'raw' },
    'block-size': { type: 'string' },
    force: { type: 'boolean', default: false },
    encrypt: { type: 'boolean', default: false },
    'target-key-file': { type: 'string' },
    ...KEY_FILE_OPTION,
  });
  if (positionals.length !== 2)
    throw new UsageError('usage: fvd convert [-f raw|fvd] [-O raw|fvd] [--layout raw|compact] [--block-size N] [--key-file PATH|-] [--encrypt [--target-key-file PATH|-]] [--force] SRC DST');
  const [src, dst] = positionals as [string, string];
  const inFmt = parseFormat(values.f, 'source format');
  const outFmt = parseFormat(values.O, 'output format')!;
  if (values.layout !== 'raw' && values.layout !== 'compact') throw new UsageError(`invalid layout '${values.layout}': expected raw or compact`);
  if (!fs.existsSync(src)) throw new UsageError(`${src}: no such file`);
  if (fs.existsSync(dst) && !values.force) throw new UsageError(`${dst} already exists; use --force to overwrite it`);
  if (fs.existsSync(dst) && fs.realpathSync(dst) === fs.realpathSync(src)) throw new UsageError('source and destination are the same file');
  if (values.encrypt && outFmt !== 'fvd') throw new UsageError('--encrypt needs -O fvd (a raw output cannot be encrypted)');
  if (values['target-key-file'] !== undefined && !values.encrypt) throw new UsageError('--target-key-file given without --encrypt');
  const srcEncrypted = (inFmt ?? probeFormat(src)) === 'fvd' && isEncryptedImage(src);
  const keyForOutput = values.encrypt && values['target-key-file'] === undefined;
  if (values['key-file'] !== undefined && !srcEncrypted && !keyForOutput)
    throw new UsageError(`--key-file given, but ${src} is not encrypted${values.encrypt ? '' : ' (to encrypt the output, add --encrypt)'}`);
  if (values.encrypt && values['key-file'] === undefined && values['target-key-file'] === undefined)
    throw new UsageError('--encrypt needs the key: --target-key-file PATH or --key-file PATH (- for stdin)');

  if (values['key-file'] === '-' && values['target-key-file'] === '-') throw new UsageError('--key-file - and --target-key-file -: stdin can hold only one key');
  const key = readKeyFile(values['key-file']);
  let targetKey: Uint8Array | undefined;
  try {
    targetKey = values.encrypt ? (readKeyFile(values['target-key-file'], '--target-key-file') ?? key) : undefined;
  } catch (err) {
    wipe(key);
    throw err;
  }
  try {
    return await convert(src, dst, inFmt, outFmt, values, srcEncrypted ? key : undefined, targetKey);
  } finally {
    wipe(key);
    wipe(targetKey);
  }
}

async function convert(
  src: string,
  dst: string,
  inFmt: 'raw' | 'fvd' | undefined,
  outFmt: 'raw' | 'fvd',
  values: { layout?: string; 'block-size'?: string },
  key: Uint8Array | undefined,
  targetKey: Uint8Array | undefined,
): Promise<number> {
  const source = await openDisk(src, inFmt, { readOnly: true, key });
  let target: Disk | null = null;
  try {
    if (outFmt === 'raw') {
      fs.writeFileSync(dst, '');
      fs.truncateSync(dst, source.size);
    } else {
      await FvdImage.create(nodeIo, dst, {
        size: source.size,
        layout: values.layout as 'raw' | 'compact',
        blockSize: values['block-size'] ? parseSize(values['block-size'], 'block size') : undefined,
        encrypt: targetKey ? { key: targetKey } : undefined,
      });
    }
    target = await openDisk(dst, outFmt, { key: targetKey });
    const buf = Buffer.alloc(STEP);
    for (const e of source.extents()) {
      if (e.kind === 'zero') continue;
      for (let pos = e.offset; pos < e.offset + e.length; pos += STEP) {
        const len = Math.min(STEP, e.offset + e.length - pos);
        const piece = buf.subarray(0, len);
        await source.read(piece, pos);
        if (isZero(piece)) continue; // keep the output sparse
        // A raw source's unaligned tail: an FVD target is 512-byte granular (and an encrypted one
        // takes whole sectors only), so write the tail's sector with zero padding.
        const wlen = Math.min(Math.ceil(len / 512) * 512, target.size - pos);
        buf.fill(0, len, wlen);
        await target.write(buf.subarray(0, wlen), pos);
      }
    }
    await target.flush();
  } finally {
    await source.close();
    await target?.close();
  }
  // A new raw output's name must survive a power cut too (an FVD output's was synced by create).
  if (outFmt === 'raw' && fs.statSync(dst).isFile()) await syncDirectoryOf(dst);
  return 0;
}

const ZERO = Buffer.alloc(STEP);
function isZero(b: Buffer): boolean {
  return b.compare(ZERO, 0, b.length) === 0;
}
