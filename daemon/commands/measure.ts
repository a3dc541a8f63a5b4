/**
 * fvd measure [-O raw|fvd] [--layout raw|compact] [--block-size SIZE] [--chunk-size SIZE]
 *             [--journal-size SIZE] [--output=human|json] (SRC | --size SIZE)
 *
 * How large a file or block device (an LV) must be to hold SRC converted to the output format, or
 * a new image of SIZE, like qemu-img measure: "required" is what `fvd convert` (or `fvd create`)
 * needs now, "fully-allocated" what the image needs once every byte has been written.
 *  - raw output, and a raw-like FVD image: the whole disk either way (a raw-like image's data
 *    area maps the disk one to one; on a block device it is not supported at all);
 *  - compact FVD image: the metadata, plus one chunk per chunk of SRC holding data (at least one
 *    chunk, which `create` demands of a block device), or plus every chunk when fully allocated.
 * The FVD figures come from the same layout code `create` uses (fvd/format.ts computeLayout).
 */
import { formatSize, parseSize, UsageError } from '../args.js';
import { OUTPUT_OPTIONS, defineCommand, outputFormat, parseCommand, usageError } from '../command.js';
import { parseFormat, probeFormat } from '../disk.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { mapPath } from '../space.js';
import { DEFAULT_BLOCK_SIZE, DEFAULT_CHUNK_SIZE, DEFAULT_JOURNAL_SIZE, computeLayout, roundUp } from '../../fvd/format.js';

export const spec = defineCommand({
  name: 'measure',
  summary: 'how much space SRC converted (or a new image of --size) needs, e.g. to size an LV',
  usage: ['[-O raw|fvd] [--layout raw|compact] [--output=human|json] [options] SRC', '[-O raw|fvd] [--layout raw|compact] [options] --size SIZE'],
  options: {
    O: { type: 'string', short: 'O', default: 'fvd', arg: 'raw|fvd', help: 'output format' },
    layout: { type: 'string', default: 'raw', arg: 'raw|compact', help: '-O fvd: layout (an image on a block device must be compact)' },
    size: { type: 'string', arg: 'SIZE', help: 'measure a new empty image of this size instead of SRC' },
    f: { type: 'string', short: 'f', arg: 'raw|fvd|qcow2', help: "SRC's format (default: probed)" },
    'block-size': { type: 'string', arg: 'SIZE', help: '-O fvd: block size (default 64K)' },
    'chunk-size': { type: 'string', arg: 'SIZE', help: '-O fvd compact: chunk size (default 1M)' },
    'journal-size': { type: 'string', arg: 'SIZE', help: '-O fvd: journal size (default 16M)' },
    ...OUTPUT_OPTIONS,
    ...KEY_FILE_OPTION,
  },
  details: `"required size" is what the output needs now, "fully allocated size" once every byte of the disk has
been written. JSON: {"required": N, "fully-allocated": N}, as qemu-img measure.`,
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  const output = outputFormat(values);
  const outFmt = parseFormat(values.O, 'output format')!;
  if (values.layout !== 'raw' && values.layout !== 'compact') throw new UsageError(`invalid layout '${values.layout}': expected raw or compact`);
  if ((values.size === undefined) === (positionals.length === 0) || positionals.length > 1) throw usageError(spec, 'give SRC or --size SIZE');
  const compact = values.layout === 'compact';
  const blockSize = values['block-size'] ? parseSize(values['block-size'], 'block size') : DEFAULT_BLOCK_SIZE;
  const chunkSize = values['chunk-size'] ? parseSize(values['chunk-size'], 'chunk size') : Math.max(DEFAULT_CHUNK_SIZE, blockSize);
  const journalLength = values['journal-size'] !== undefined ? parseSize(values['journal-size'], 'journal size') : DEFAULT_JOURNAL_SIZE;

  let size: number;
  let dataChunks = 0;
  if (values.size !== undefined) {
    size = parseSize(values.size);
    if (size <= 0) throw new UsageError('size must be greater than zero');
  } else {
    const src = positionals[0]!;
    const key = readKeyFile(values['key-file']);
    const measured = await mapPath(src, parseFormat(values.f, 'source format') ?? probeFormat(src), key).finally(() => wipe(key));
    size = measured.size;
    // Chunks of the output that will hold data: every chunk a data extent of SRC touches.
    let last = -1;
    for (const e of measured.map) {
      if (!e.data) continue;
      const first = Math.max(Math.floor(e.start / chunkSize), last + 1);
      const end = Math.floor((e.start + e.length - 1) / chunkSize);
      if (end >= first) dataChunks += end - first + 1;
      last = Math.max(last, end);
    }
  }
  size = roundUp(size, 512);
  let required: number;
  let full: number;
  if (outFmt === 'raw') {
    required = full = size;
  } else {
    const { dataOffset } = computeLayout({ virtualSize: size, blockSize, chunkSize, baseSize: 0, compact, journalLength });
    if (compact) {
      required = dataOffset + Math.max(1, dataChunks) * chunkSize;
      full = dataOffset + Math.ceil(size / chunkSize) * chunkSize;
    } else {
      required = full = dataOffset + size;
    }
  }
  if (output === 'json') console.log(JSON.stringify({ required, 'fully-allocated': full }, null, 2));
  else console.log(`required size: ${required} (${formatSize(required)})\nfully allocated size: ${full} (${formatSize(full)})`);
  return 0;
}
