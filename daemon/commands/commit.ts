/**
 * fvd commit [-d] [-p] [--key-file PATH|-] IMAGE — writes the image's local blocks into its base (raw or FVD, growing it
 * to the image's size if it is smaller) and empties the image, like qemu-img commit. -d keeps the
 * image's data; -p shows progress on stderr. The base must be writable and not in use (locked) by anyone. An encrypted image needs its key:
 * its data is decrypted into the (plaintext) base. FORMAT.md §12.3.
 */
import { commitImage } from '../../fvd/maintenance.js';
import { storageIo } from '../../storage/storage-io.js';
import { formatSize, progressPrinter } from '../args.js';
import { OUTPUT_OPTIONS, defineCommand, outputFormat, parseCommand, usageError } from '../command.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { oneLine } from '../../fvd/errors.js';
import { refuseWhilePending } from '../pending-guard.js';

export const spec = defineCommand({
  name: 'commit',
  summary: "write the image's data into its base, then empty the image",
  usage: ['[-d] [-p] [--output=human|json] [--key-file PATH|-] IMAGE'],
  options: {
    d: { type: 'boolean', short: 'd', default: false, help: "keep the image's data (do not empty it)" },
    p: { type: 'boolean', short: 'p', default: false, help: 'show progress on stderr' },
    ...OUTPUT_OPTIONS,
    ...KEY_FILE_OPTION,
  },
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 1) throw usageError(spec);
  const json = outputFormat(values) === 'json';
  const image = positionals[0]!;
  refuseWhilePending(image, 'commit');
  const key = readKeyFile(values['key-file']);
  const progress = progressPrinter(values.p);
  const r = await commitImage(storageIo(), image, { keep: values.d, key, onProgress: (d, t) => progress.update(d, t) }).finally(() => {
    progress.done();
    wipe(key);
  });
  if (json) {
    console.log(JSON.stringify({ image, ...r }, null, 2));
    return 0;
  }
  const grown = r.baseGrownTo !== null ? `; the base grew to ${formatSize(r.baseGrownTo)}` : '';
  const after = r.emptied ? 'the image is now empty' : 'the image keeps its data (-d)';
  console.log(oneLine(
    `Image committed into '${r.base}' (${r.baseFormat}): ${formatSize(r.bytesWritten)} of ${formatSize(r.bytesExamined)} local data differed and was written${grown}; ${after}.`,
  ));
  return 0;
}
