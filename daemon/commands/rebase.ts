/**
 * fvd rebase -b NEWBASE -F raw|qcow2|fvd [-u] [-p] [--key-file PATH|-] IMAGE — changes the image's base, like qemu-img rebase.
 * Safe mode copies into the image what the old chain shows and the new one does not, so the
 * image reads the same afterwards; -u switches the header only (the old base need not exist).
 * -b "" removes the base (the image becomes standalone). NEWBASE is recorded as given and, if
 * relative, taken relative to the image's directory. An encrypted image needs its key in safe
 * mode (what is copied in is stored encrypted); -u reads and writes no data and needs none.
 * FORMAT.md §12.4.
 */
import { rebaseImage } from '../../fvd/maintenance.js';
import { storageIo } from '../../storage/storage-io.js';
import { BASE_FORMAT_CHOICES, baseFormatCode, type BaseFormat } from '../../fvd/format.js';
import { UsageError, formatSize, progressPrinter } from '../args.js';
import { OUTPUT_OPTIONS, defineCommand, outputFormat, parseCommand, usageError } from '../command.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { oneLine } from '../../fvd/errors.js';
import { refuseWhilePending } from '../pending-guard.js';

export const spec = defineCommand({
  name: 'rebase',
  summary: 'change the base of an image (-b "" removes it), keeping what the image reads',
  usage: ['-b NEWBASE -F raw|qcow2|fvd [-u] [-p] [--output=human|json] [--key-file PATH|-] IMAGE', '-b "" [-p] IMAGE'],
  options: {
    base: { type: 'string', short: 'b', arg: 'NEWBASE', help: 'the new base ("" for none); a relative path is taken from IMAGE\'s directory' },
    'base-format': { type: 'string', short: 'F', arg: 'raw|qcow2|fvd', help: "the new base's format (required: never probed)" },
    unsafe: { type: 'boolean', short: 'u', default: false, help: 'change the header only (NEWBASE holds the same data; the old base may be gone)' },
    p: { type: 'boolean', short: 'p', default: false, help: 'show progress on stderr' },
    ...OUTPUT_OPTIONS,
    ...KEY_FILE_OPTION,
  },
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 1 || values.base === undefined) throw usageError(spec);
  const json = outputFormat(values) === 'json';
  const fmt = values['base-format'];
  if (fmt !== undefined && baseFormatCode(fmt) < 0) throw new UsageError(`invalid base format '${fmt}': expected ${BASE_FORMAT_CHOICES}`);
  if (values.base === '' && fmt !== undefined) throw new UsageError('-F given with -b "" (removing the base)');
  if (values.base !== '' && fmt === undefined) throw new UsageError('new base given without its format: add -F raw, -F qcow2 or -F fvd (formats are recorded, never probed)');
  const image = positionals[0]!;
  refuseWhilePending(image, 'rebase');
  const key = readKeyFile(values['key-file']);
  const progress = progressPrinter(values.p);
  const r = await rebaseImage(storageIo(), image, { base: values.base, baseFormat: fmt as BaseFormat | undefined, unsafe: values.unsafe, key, onProgress: (d, t) => progress.update(d, t) }).finally(() => {
    progress.done();
    wipe(key);
  });
  if (json) {
    console.log(JSON.stringify({ image, ...r }, null, 2));
    return 0;
  }
  const target = r.newBase === null ? 'no base (standalone)' : `'${r.newBase}' (${fmt})`;
  const work = values.unsafe ? 'header only (-u)' : `${formatSize(r.bytesCopied)} copied from the old chain, ${formatSize(r.bytesExamined)} compared`;
  console.log(oneLine(`Image rebased onto ${target}: ${work}.`));
  if (r.journalShrunkTo !== null) console.log(`note: the journal shrank to ${formatSize(r.journalShrunkTo)} to make room for a larger bitmap`);
  return 0;
}
