/**
 * fvd rebase -b NEWBASE -F raw|fvd [-u] [-p] [--key-file PATH|-] IMAGE — changes the image's base, like qemu-img rebase.
 * Safe mode copies into the image what the old chain shows and the new one does not, so the
 * image reads the same afterwards; -u switches the header only (the old base need not exist).
 * -b "" removes the base (the image becomes standalone). NEWBASE is recorded as given and, if
 * relative, taken relative to the image's directory. An encrypted image needs its key in safe
 * mode (what is copied in is stored encrypted); -u reads and writes no data and needs none.
 * FORMAT.md §12.4.
 */
import { rebaseImage } from '../../fvd/maintenance.js';
import { nodeIo } from '../../fvd/node-file.js';
import { UsageError, formatSize, parseOptions, progressPrinter } from '../args.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { oneLine } from '../../fvd/errors.js';

const USAGE = 'usage: fvd rebase -b NEWBASE [-F raw|fvd] [-u] [-p] [--json] [--key-file PATH|-] IMAGE   (-b "" removes the base)';

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseOptions('rebase', args, {
    base: { type: 'string', short: 'b' },
    'base-format': { type: 'string', short: 'F' },
    unsafe: { type: 'boolean', short: 'u', default: false },
    p: { type: 'boolean', short: 'p', default: false },
    json: { type: 'boolean', default: false },
    ...KEY_FILE_OPTION,
  });
  if (positionals.length !== 1 || values.base === undefined) throw new UsageError(USAGE);
  const fmt = values['base-format'];
  if (fmt !== undefined && fmt !== 'raw' && fmt !== 'fvd') throw new UsageError(`invalid base format '${fmt}': expected raw or fvd`);
  if (values.base === '' && fmt !== undefined) throw new UsageError('-F given with -b "" (removing the base)');
  if (values.base !== '' && fmt === undefined) throw new UsageError('new base given without its format: add -F raw or -F fvd (formats are recorded, never probed)');
  const image = positionals[0]!;
  const key = readKeyFile(values['key-file']);
  const progress = progressPrinter(values.p);
  const r = await rebaseImage(nodeIo, image, { base: values.base, baseFormat: fmt, unsafe: values.unsafe, key, onProgress: (d, t) => progress.update(d, t) }).finally(() => {
    progress.done();
    wipe(key);
  });
  if (values.json) {
    console.log(JSON.stringify({ image, ...r }, null, 2));
    return 0;
  }
  const target = r.newBase === null ? 'no base (standalone)' : `'${r.newBase}' (${fmt})`;
  const work = values.unsafe ? 'header only (-u)' : `${formatSize(r.bytesCopied)} copied from the old chain, ${formatSize(r.bytesExamined)} compared`;
  console.log(oneLine(`Image rebased onto ${target}: ${work}.`));
  if (r.journalShrunkTo !== null) console.log(`note: the journal shrank to ${formatSize(r.journalShrunkTo)} to make room for a larger bitmap`);
  return 0;
}
