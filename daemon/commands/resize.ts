/**
 * fvd resize [--shrink] [--key-file PATH|-] IMAGE [+|-]SIZE — sets the virtual size (absolute, or relative with + or
 * -), like qemu-img resize. A grown range reads as zeros. Shrinking is refused while any byte
 * past the new end reads non-zero, unless --shrink. An encrypted image needs its key only where
 * data is read: shrinking without --shrink (the dropped range must read as zero plaintext), and
 * growing when the block holding an unaligned old end still reads from the base. FORMAT.md §12.5.
 * A served image only grows, through its server, which grows the device too (UPDATE_SIZE).
 */
import { FvdImage } from '../../fvd/image.js';
import { resizeImage } from '../../fvd/maintenance.js';
import { storageIo } from '../../storage/storage-io.js';
import { UsageError, formatSize, parseSize } from '../args.js';
import { defineCommand, parseCommand, usageError } from '../command.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { refuseWhilePending } from '../pending-guard.js';
import { servedImage, growServed } from '../served-resize.js';

export const spec = defineCommand({
  name: 'resize',
  summary: 'grow or shrink the virtual disk',
  usage: ['[--shrink] [--key-file PATH|-] IMAGE [+|-]SIZE'],
  options: {
    shrink: { type: 'boolean', default: false, help: 'allow dropping data past the new end' },
    ...KEY_FILE_OPTION,
  },
  details:
    'SIZE is the new size, or with + or - a change of size ("-5G" is a size, not an option). ' +
    'An image being served only grows: its server grows the image and the device (Linux 6.14+, raw-like images); then resize2fs.',
  signedValues: true,
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 2) throw usageError(spec);
  const [image, text] = positionals as [string, string];
  if (!image || !text) throw usageError(spec);
  const sign = text[0] === '+' ? 1 : text[0] === '-' ? -1 : 0;
  const amount = parseSize(sign ? text.slice(1) : text);
  // Sizes are rounded up to 512: a relative change that is not a multiple of it would round
  // away ('-1' meant the disk would stay as it is, reported as success).
  if (sign && amount % 512) throw new UsageError(`invalid size '${text}': a relative change must be a multiple of 512 bytes`);
  // A served image grows through its server (image and device together): docs/DESIGN.md §8.
  const served = servedImage(image);
  if (served) {
    if (sign < 0 || values.shrink) throw new UsageError(`${image} is served by ${served.device}: it can only grow while served; stop the server to shrink it`);
    const r = await growServed(served, sign ? { delta: amount } : { size: amount });
    if (r.oldSize === r.newSize) console.log(`Image size unchanged: ${formatSize(r.newSize)} (${r.newSize} bytes).`);
    else console.log(`Image and ${served.device} resized: ${formatSize(r.oldSize)} -> ${formatSize(r.newSize)} (${r.newSize} bytes).`);
    return 0;
  }
  refuseWhilePending(image, 'resize');
  let size = amount;
  if (sign) {
    // The size is metadata: no key needed to read it (it is checked by resizeImage).
    const img = await FvdImage.open(storageIo(), image, { readOnly: true, withoutKey: true });
    size = img.size + sign * amount;
    await img.close();
  }
  if (size <= 0) throw new UsageError(`invalid size '${text}': the disk would be ${size} bytes`);
  const key = readKeyFile(values['key-file']);
  const r = await resizeImage(storageIo(), image, size, { shrink: values.shrink, key }).finally(() => wipe(key));
  if (r.oldSize === r.newSize) console.log(`Image size unchanged: ${formatSize(r.newSize)} (${r.newSize} bytes).`);
  else console.log(`Image resized: ${formatSize(r.oldSize)} -> ${formatSize(r.newSize)} (${r.newSize} bytes).`);
  if (r.journalShrunkTo !== null) console.log(`note: the journal shrank to ${formatSize(r.journalShrunkTo)} to make room for the larger lookup table`);
  return 0;
}
