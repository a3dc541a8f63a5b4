/**
 * fvd check [--repair] [--json] [--key-file PATH|-] IMAGE — exit 0 clean, 2 corrupt, 3 repaired.
 * An encrypted image is checked and repaired without its key (no data is read); a key given is
 * verified, and a wrong one is an error (exit 1).
 */
import { checkImage } from '../../fvd/check.js';
import { oneLine } from '../../fvd/errors.js';
import { nodeIo } from '../../fvd/node-file.js';
import { UsageError, parseOptions } from '../args.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseOptions('check', args, {
    repair: { type: 'boolean', short: 'r', default: false },
    json: { type: 'boolean', default: false },
    ...KEY_FILE_OPTION,
  });
  if (positionals.length !== 1) throw new UsageError('usage: fvd check [--repair] [--json] [--key-file PATH|-] IMAGE');
  const path = positionals[0]!;
  const key = readKeyFile(values['key-file']);
  const report = await checkImage(nodeIo, path, { repair: values.repair, key }).finally(() => wipe(key));
  const code = report.errors.length ? 2 : report.repaired ? 3 : 0;
  if (values.json) {
    console.log(JSON.stringify({ image: path, ...report, exitCode: code }, null, 2));
    return code;
  }
  // One line per finding: the path and the messages may hold control characters.
  for (const e of report.errors) console.log(oneLine(`ERROR: ${e}`));
  for (const n of report.notes) console.log(oneLine(`note: ${n}`));
  if (report.errors.length) console.log(oneLine(`${path}: ${report.errors.length} error(s) found; the image is corrupt`));
  else if (report.repaired) console.log(oneLine(`${path}: repaired`));
  else console.log(`No errors were found on the image.`);
  return code;
}
