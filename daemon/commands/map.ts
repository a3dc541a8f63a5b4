/** fvd map [--json] [--key-file PATH|-] IMAGE — extents of the virtual disk and where each lives (no key needed). */
import { FvdImage } from '../../fvd/image.js';
import { storageIo } from '../../storage/storage-io.js';
import { UsageError, parseOptions } from '../args.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseOptions('map', args, { json: { type: 'boolean', default: false }, ...KEY_FILE_OPTION });
  if (positionals.length !== 1) throw new UsageError('usage: fvd map [--json] [--key-file PATH|-] IMAGE');
  const key = readKeyFile(values['key-file']);
  const image = await FvdImage.open(storageIo(), positionals[0]!, key ? { readOnly: true, key } : { readOnly: true, withoutKey: true }).finally(() => wipe(key));
  const extents = image.extents();
  await image.close();
  if (values.json) {
    console.log(JSON.stringify(extents));
    return 0;
  }
  const hex = (n: number) => '0x' + n.toString(16);
  console.log(`${'Offset'.padEnd(20)}${'Length'.padEnd(20)}Where`);
  for (const e of extents) console.log(`${hex(e.offset).padEnd(20)}${hex(e.length).padEnd(20)}${e.kind}`);
  return 0;
}
