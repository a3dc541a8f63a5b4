/**
 * fvd create [-b BASE] [-F raw|fvd] [--layout raw|compact] [--block-size N] [--chunk-size N]
 *            [--encrypt --key-file PATH|-] IMAGE [SIZE]
 */
import fs from 'node:fs';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../fvd/node-file.js';
import { UsageError, formatSize, parseOptions, parseSize } from '../args.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { oneLine } from '../../fvd/errors.js';

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseOptions('create', args, {
    base: { type: 'string', short: 'b' },
    'base-format': { type: 'string', short: 'F' },
    layout: { type: 'string', default: 'raw' },
    'block-size': { type: 'string' },
    'chunk-size': { type: 'string' },
    'journal-size': { type: 'string' },
    'no-detect-zeroes': { type: 'boolean', default: false },
    force: { type: 'boolean', default: false },
    encrypt: { type: 'boolean', default: false },
    ...KEY_FILE_OPTION,
  });
  if (positionals.length < 1 || positionals.length > 2) throw new UsageError('usage: fvd create [-b BASE -F raw|fvd] [--layout raw|compact] [--block-size N] [--chunk-size N] [--journal-size N] [--no-detect-zeroes] [--encrypt --key-file PATH|-] [--force] IMAGE [SIZE]');
  const [image, sizeText] = positionals as [string, string | undefined];
  if (values.layout !== 'raw' && values.layout !== 'compact') throw new UsageError(`invalid layout '${values.layout}': expected raw or compact`);
  const baseFormat = values['base-format'];
  if (baseFormat !== undefined && baseFormat !== 'raw' && baseFormat !== 'fvd') throw new UsageError(`invalid base format '${baseFormat}': expected raw or fvd`);
  if (baseFormat && !values.base) throw new UsageError('-F given without a base image (-b)');
  if (values.base && !baseFormat) throw new UsageError('base image given without its format: add -F raw or -F fvd (formats are recorded, never probed)');
  if (!sizeText && !values.base) throw new UsageError('a size is required when there is no base image');
  const size = sizeText ? parseSize(sizeText) : undefined;
  if (size === 0) throw new UsageError('size must be greater than zero');
  if (values.encrypt && values['key-file'] === undefined) throw new UsageError('--encrypt needs the key: --key-file PATH (or --key-file - for stdin)');
  if (!values.encrypt && values['key-file'] !== undefined) throw new UsageError('--key-file given without --encrypt (a new image is encrypted only with --encrypt)');
  const blockSize = values['block-size'] !== undefined ? parseSize(values['block-size'], 'block size') : undefined;
  const chunkSize = values['chunk-size'] !== undefined ? parseSize(values['chunk-size'], 'chunk size') : undefined;
  const journalSize = values['journal-size'] !== undefined ? parseSize(values['journal-size'], 'journal size') : undefined;

  // Never clobber data by accident: an existing non-empty file or any device needs --force.
  const st = fs.statSync(image, { throwIfNoEntry: false });
  if (st && (st.isBlockDevice() ? true : st.size > 0) && !values.force)
    throw new UsageError(`${image} already exists; use --force to overwrite it`);
  if (st && !st.isFile() && !st.isBlockDevice()) throw new UsageError(`${image} is not a regular file or block device`);

  const key = readKeyFile(values['key-file']);
  // A failed create must not leave a half-written image behind (a retry would need --force); but
  // only a file this command made is removed (O_EXCL: a file that appeared since the stat is not
  // ours). A file that existed is never removed, and the engine writes it only after every check
  // and its lock passed (FvdImage.create).
  let made: fs.Stats | null = null;
  if (!st) {
    try {
      fs.closeSync(fs.openSync(image, 'wx', 0o644));
      made = fs.statSync(image);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'EEXIST' && values.force) {
        // appeared since the stat; --force allows it (and it is not ours to remove)
      } else {
        wipe(key);
        throw (err as NodeJS.ErrnoException).code === 'EEXIST' ? new UsageError(`${image} already exists; use --force to overwrite it`) : err;
      }
    }
  }
  await FvdImage.create(nodeIo, image, {
    size,
    base: values.base,
    baseFormat: baseFormat as 'raw' | 'fvd' | undefined,
    layout: values.layout,
    blockSize,
    chunkSize,
    journalSize,
    detectZeroes: !values['no-detect-zeroes'],
    encrypt: key ? { key } : undefined,
  })
    .catch((err) => {
      const now = made && fs.statSync(image, { throwIfNoEntry: false });
      if (now && now.ino === made!.ino && now.dev === made!.dev) fs.rmSync(image, { force: true });
      throw err;
    })
    .finally(() => wipe(key));
  const img = await FvdImage.open(nodeIo, image, { readOnly: true, withoutKey: true });
  const s = img.stats();
  await img.close();
  console.log(oneLine(
    `Formatting '${image}', fmt=fvd layout=${s.layout} size=${s.virtualSize} (${formatSize(s.virtualSize)}) block_size=${s.blockSize}` +
      (s.layout === 'compact' ? ` chunk_size=${s.chunkSize}` : '') +
      (values.base ? ` base=${values.base} base_fmt=${baseFormat}` : '') +
      (s.encryption ? ` encryption=${s.encryption}` : ''),
  ));
  return 0;
}
