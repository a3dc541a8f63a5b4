/**
 * Bench helper: creates a fresh FVD image without depending on `fvd create`'s option set.
 *   node build/bench/create-image.js [--layout raw|compact] IMAGE SIZE
 */
import { parseOptions, parseSize, UsageError } from '../daemon/args.js';
import { FvdImage } from '../fvd/image.js';
import { nodeIo } from '../storage/node-file.js';

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseOptions('create-image', argv, { layout: { type: 'string' } });
  if (positionals.length !== 2) throw new UsageError('usage: create-image [--layout raw|compact] IMAGE SIZE');
  const layout = values.layout ?? 'raw';
  if (layout !== 'raw' && layout !== 'compact') throw new UsageError(`invalid --layout '${layout}'`);
  await FvdImage.create(nodeIo, positionals[0]!, { size: parseSize(positionals[1]!), layout });
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    console.error(`create-image: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  },
);
