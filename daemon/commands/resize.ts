/**
 * fvd resize [--shrink] [--key-file PATH|-] IMAGE [+|-]SIZE — sets the virtual size (absolute, or relative with + or
 * -), like qemu-img resize. A grown range reads as zeros. Shrinking is refused while any byte
 * past the new end reads non-zero, unless --shrink. An encrypted image needs its key only where
 * data is read: shrinking without --shrink (the dropped range must read as zero plaintext), and
 * growing when the block holding an unaligned old end still reads from the base. FORMAT.md §12.5.
 */
import { FvdImage } from '../../fvd/image.js';
import { resizeImage } from '../../fvd/maintenance.js';
import { nodeIo } from '../../fvd/node-file.js';
import { UsageError, formatSize, parseOptions, parseSize } from '../args.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';

const USAGE = 'usage: fvd resize [--shrink] [--key-file PATH|-] IMAGE [+|-]SIZE';

export async function run(args: string[]): Promise<number> {
  // "-1G" is a size, not an option: take it out before option parsing.
  const sizeArgs = args.filter((a) => /^[+-]\d/.test(a));
  const { values, positionals } = parseOptions('resize', args.filter((a) => !/^[+-]\d/.test(a)), {
    shrink: { type: 'boolean', default: false },
    ...KEY_FILE_OPTION,
  });
  const all = [...positionals, ...sizeArgs];
  if (all.length !== 2) throw new UsageError(USAGE);
  const [image, text] = [positionals[0] ?? '', sizeArgs[0] ?? positionals[1] ?? ''];
  if (!image || !text) throw new UsageError(USAGE);
  const sign = text[0] === '+' ? 1 : text[0] === '-' ? -1 : 0;
  const amount = parseSize(sign ? text.slice(1) : text);
  // Sizes are rounded up to 512: a relative change that is not a multiple of it would round
  // away ('-1' meant the disk would stay as it is, reported as success).
  if (sign && amount % 512) throw new UsageError(`invalid size '${text}': a relative change must be a multiple of 512 bytes`);
  let size = amount;
  if (sign) {
    // The size is metadata: no key needed to read it (it is checked by resizeImage).
    const img = await FvdImage.open(nodeIo, image, { readOnly: true, withoutKey: true });
    size = img.size + sign * amount;
    await img.close();
  }
  if (size <= 0) throw new UsageError(`invalid size '${text}': the disk would be ${size} bytes`);
  const key = readKeyFile(values['key-file']);
  const r = await resizeImage(nodeIo, image, size, { shrink: values.shrink, key }).finally(() => wipe(key));
  if (r.oldSize === r.newSize) console.log(`Image size unchanged: ${formatSize(r.newSize)} (${r.newSize} bytes).`);
  else console.log(`Image resized: ${formatSize(r.oldSize)} -> ${formatSize(r.newSize)} (${r.newSize} bytes).`);
  if (r.journalShrunkTo !== null) console.log(`note: the journal shrank to ${formatSize(r.journalShrunkTo)} to make room for the larger lookup table`);
  return 0;
}
