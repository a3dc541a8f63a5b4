/**
 * fvd resize [--shrink] IMAGE [+|-]SIZE — sets the virtual size (absolute, or relative with + or
 * -), like qemu-img resize. A grown range reads as zeros. Shrinking is refused while any byte
 * past the new end reads non-zero, unless --shrink. FORMAT.md §12.5.
 */
import { FvdImage } from '../../fvd/image.js';
import { resizeImage } from '../../fvd/maintenance.js';
import { nodeIo } from '../../fvd/node-file.js';
import { UsageError, formatSize, parseOptions, parseSize } from '../args.js';

const USAGE = 'usage: fvd resize [--shrink] IMAGE [+|-]SIZE';

export async function run(args: string[]): Promise<number> {
  // "-1G" is a size, not an option: take it out before option parsing.
  const sizeArgs = args.filter((a) => /^[+-]\d/.test(a));
  const { values, positionals } = parseOptions('resize', args.filter((a) => !/^[+-]\d/.test(a)), {
    shrink: { type: 'boolean', default: false },
  });
  const all = [...positionals, ...sizeArgs];
  if (all.length !== 2) throw new UsageError(USAGE);
  const [image, text] = [positionals[0] ?? '', sizeArgs[0] ?? positionals[1] ?? ''];
  if (!image || !text) throw new UsageError(USAGE);
  const sign = text[0] === '+' ? 1 : text[0] === '-' ? -1 : 0;
  const amount = parseSize(sign ? text.slice(1) : text);
  let size = amount;
  if (sign) {
    const img = await FvdImage.open(nodeIo, image, { readOnly: true });
    size = img.size + sign * amount;
    await img.close();
  }
  if (size <= 0) throw new UsageError(`invalid size '${text}': the disk would be ${size} bytes`);
  const r = await resizeImage(nodeIo, image, size, { shrink: values.shrink });
  if (r.oldSize === r.newSize) console.log(`Image size unchanged: ${formatSize(r.newSize)} (${r.newSize} bytes).`);
  else console.log(`Image resized: ${formatSize(r.oldSize)} -> ${formatSize(r.newSize)} (${r.newSize} bytes).`);
  if (r.journalShrunkTo !== null) console.log(`note: the journal shrank to ${formatSize(r.journalShrunkTo)} to make room for the larger lookup table`);
  return 0;
}
