/**
 * fvd create [-b BASE] [-F raw|qcow2|fvd] [--layout raw|compact] [--block-size N] [--chunk-size N]
 *            [--preallocation off|falloc] [--encrypt --key-file PATH|-] IMAGE [SIZE]
 */
import fs from 'node:fs';
import { FvdImage } from '../../fvd/image.js';
import { storageIo } from '../../storage/storage-io.js';
import { BASE_FORMAT_CHOICES, baseFormatCode, type BaseFormat } from '../../fvd/format.js';
import { UsageError, formatSize, parseSize } from '../args.js';
import { defineCommand, parseCommand, usageError } from '../command.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { FvdError, oneLine } from '../../fvd/errors.js';
import { FALLOC_FL_KEEP_SIZE, libc } from '../../ffi/libc.js';
import { errnoName } from '../../ffi/uring.js';

export const spec = defineCommand({
  name: 'create',
  summary: 'create an image, empty or as a copy-on-write layer over a base',
  usage: ['[-b BASE -F raw|qcow2|fvd] [--layout raw|compact] [options] IMAGE [SIZE]'],
  options: {
    base: { type: 'string', short: 'b', arg: 'BASE', help: 'base image (read-only; its path is recorded relative to IMAGE)' },
    'base-format': { type: 'string', short: 'F', arg: 'raw|qcow2|fvd', help: "the base's format (required with -b: never probed)" },
    layout: { type: 'string', default: 'raw', arg: 'raw|compact', help: 'raw-like (guest offset = file offset) or compact (lookup table; thin, works on block devices)' },
    'block-size': { type: 'string', arg: 'SIZE', help: 'copy-on-write unit, one bitmap bit (default: 64K; over a base the smallest of 4K..64K whose bitmap fits 2M, i.e. 4K up to a 64G base)' },
    'chunk-size': { type: 'string', arg: 'SIZE', help: 'allocation unit of the compact layout (default 1M)' },
    'journal-size': { type: 'string', arg: 'SIZE', help: 'metadata journal size (0: no journal)' },
    'no-detect-zeroes': { type: 'boolean', default: false, help: "do not scan the base for zero blocks at create" },
    preallocation: { type: 'string', default: 'off', arg: 'off|falloc', help: "falloc: allocate the image file's space now (raw layout, regular file), so a first write of a block allocates nothing (qemu-img's preallocation=falloc)" },
    force: { type: 'boolean', default: false, help: 'overwrite an existing file or a block device' },
    encrypt: { type: 'boolean', default: false, help: 'encrypt the data area (AES-256-XTS); needs --key-file' },
    ...KEY_FILE_OPTION,
  },
  details: 'SIZE takes K, M, G, T suffixes (binary); without SIZE the image has the base\'s size.',
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length < 1 || positionals.length > 2) throw usageError(spec);
  const [image, sizeText] = positionals as [string, string | undefined];
  if (values.layout !== 'raw' && values.layout !== 'compact') throw new UsageError(`invalid layout '${values.layout}': expected raw or compact`);
  const baseFormat = values['base-format'];
  if (baseFormat !== undefined && baseFormatCode(baseFormat) < 0) throw new UsageError(`invalid base format '${baseFormat}': expected ${BASE_FORMAT_CHOICES}`);
  if (baseFormat && !values.base) throw new UsageError('-F given without a base image (-b)');
  if (values.base && !baseFormat) throw new UsageError('base image given without its format: add -F raw, -F qcow2 or -F fvd (formats are recorded, never probed)');
  if (!sizeText && !values.base) throw new UsageError('a size is required when there is no base image');
  const size = sizeText ? parseSize(sizeText) : undefined;
  if (size === 0) throw new UsageError('size must be greater than zero');
  if (values.encrypt && values['key-file'] === undefined) throw new UsageError('--encrypt needs the key: --key-file PATH (or --key-file - for stdin)');
  if (!values.encrypt && values['key-file'] !== undefined) throw new UsageError('--key-file given without --encrypt (a new image is encrypted only with --encrypt)');
  const blockSize = values['block-size'] !== undefined ? parseSize(values['block-size'], 'block size') : undefined;
  const chunkSize = values['chunk-size'] !== undefined ? parseSize(values['chunk-size'], 'chunk size') : undefined;
  const journalSize = values['journal-size'] !== undefined ? parseSize(values['journal-size'], 'journal size') : undefined;
  const preallocation = values.preallocation;
  if (preallocation !== 'off' && preallocation !== 'falloc') throw new UsageError(`invalid preallocation '${preallocation}': expected off or falloc`);
  if (preallocation === 'falloc' && values.layout !== 'raw')
    throw new UsageError('--preallocation falloc needs --layout raw (the compact layout allocates chunk by chunk, on purpose)');

  // Never clobber data by accident: an existing non-empty file or any device needs --force.
  const st = fs.statSync(image, { throwIfNoEntry: false });
  if (st && (st.isBlockDevice() ? true : st.size > 0) && !values.force)
    throw new UsageError(`${image} already exists; use --force to overwrite it`);
  if (st && !st.isFile() && !st.isBlockDevice()) throw new UsageError(`${image} is not a regular file or block device`);
  if (preallocation === 'falloc' && st?.isBlockDevice()) throw new UsageError(`--preallocation falloc: ${image} is a block device (its space is there already)`);

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
  await FvdImage.create(storageIo(), image, {
    size,
    base: values.base,
    baseFormat: baseFormat as BaseFormat | undefined,
    layout: values.layout,
    blockSize,
    chunkSize,
    journalSize,
    detectZeroes: !values['no-detect-zeroes'],
    encrypt: key ? { key } : undefined,
  })
    .then(() => {
      if (preallocation === 'falloc') preallocate(image);
    })
    .catch((err) => {
      const now = made && fs.statSync(image, { throwIfNoEntry: false });
      if (now && now.ino === made!.ino && now.dev === made!.dev) fs.rmSync(image, { force: true });
      throw err;
    })
    .finally(() => wipe(key));
  const img = await FvdImage.open(storageIo(), image, { readOnly: true, withoutKey: true });
  const s = img.stats();
  await img.close();
  console.log(oneLine(
    `Formatting '${image}', fmt=fvd layout=${s.layout} size=${s.virtualSize} (${formatSize(s.virtualSize)}) block_size=${s.blockSize}` +
      (s.layout === 'compact' ? ` chunk_size=${s.chunkSize}` : '') +
      (values.base ? ` base=${values.base} base_fmt=${baseFormat}` : '') +
      (s.encryption ? ` encryption=${s.encryption}` : '') +
      (preallocation !== 'off' ? ` preallocation=${preallocation}` : ''),
  ));
  return 0;
}

/**
 * --preallocation falloc: the whole image file (header, metadata, data area) allocated now, its
 * size unchanged. On a filesystem a first write into a hole allocates (tmpfs: a zeroed page per
 * 4 KiB, ext4/xfs: an extent), and a fresh image over a base is all holes: this moves that cost
 * from the guest's first writes to create (README: 128K writes 2.3× faster on tmpfs). Blocks read
 * from the base stay absent in the bitmap: allocation changes no content.
 */
function preallocate(image: string): void {
  const c = libc();
  if (c === null) throw new FvdError(`${image}: --preallocation falloc needs fallocate(2), and koffi could not be loaded`);
  const fd = fs.openSync(image, 'r+');
  try {
    const size = fs.fstatSync(fd).size;
    if (c.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, size) !== 0)
      throw new FvdError(`${image}: --preallocation falloc: fallocate failed: ${errnoName(c.errno())} (the filesystem may not support it; use --preallocation off)`);
  } finally {
    fs.closeSync(fd);
  }
}
