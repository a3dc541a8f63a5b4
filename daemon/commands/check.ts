/** fvd check [--repair] [--json] IMAGE — exit 0 clean, 2 corrupt, 3 repaired. */
import { checkImage } from '../../fvd/check.js';
import { nodeIo } from '../../fvd/node-file.js';
import { UsageError, parseOptions } from '../args.js';

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseOptions('check', args, {
    repair: { type: 'boolean', short: 'r', default: false },
    json: { type: 'boolean', default: false },
  });
  if (positionals.length !== 1) throw new UsageError('usage: fvd check [--repair] [--json] IMAGE');
  const path = positionals[0]!;
  const report = await checkImage(nodeIo, path, { repair: values.repair });
  const code = report.errors.length ? 2 : report.repaired ? 3 : 0;
  if (values.json) {
    console.log(JSON.stringify({ image: path, ...report, exitCode: code }, null, 2));
    return code;
  }
  for (const e of report.errors) console.log(`ERROR: ${e}`);
  for (const n of report.notes) console.log(`note: ${n}`);
  if (report.errors.length) console.log(`${path}: ${report.errors.length} error(s) found; the image is corrupt`);
  else if (report.repaired) console.log(`${path}: repaired`);
  else console.log(`No errors were found on the image.`);
  return code;
}
