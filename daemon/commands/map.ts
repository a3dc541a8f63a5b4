/**
 * fvd map [--output=human|json] [-f raw|fvd|qcow2] [--key-file PATH|-] IMAGE — where each range of the
 * virtual disk comes from, through the whole base chain (no key needed). The JSON output is
 * qemu-img map's (daemon/space.ts): `start, length, depth, present, zero, data[, offset]`.
 */
import { OUTPUT_OPTIONS, defineCommand, outputFormat, parseCommand, usageError } from '../command.js';
import { parseFormat, refuseKeyFor } from '../disk.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { mapPath } from '../space.js';

export const spec = defineCommand({
  name: 'map',
  summary: 'list the extents of the disk: written data, zeros, or in which base',
  usage: ['[--output=human|json] [-f raw|fvd|qcow2] [--key-file PATH|-] IMAGE'],
  options: {
    ...OUTPUT_OPTIONS,
    f: { type: 'string', short: 'f', arg: 'raw|fvd|qcow2', help: "IMAGE's format (default fvd: never probed)" },
    ...KEY_FILE_OPTION,
  },
  details: `Each extent is "data" (written, stored at OFFSET of that level's file), "zero" (reads as
zeros without taking space: never written, discarded, or a hole) or "unallocated" (no level
provides it: zeros). DEPTH 0 is IMAGE itself, 1 its base, and so on. --output=json prints
qemu-img map's format: [{"start", "length", "depth", "present", "zero", "data", "offset"}].`,
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 1) throw usageError(spec);
  const output = outputFormat(values);
  const path = positionals[0]!;
  // Not probed (a damaged FVD header must not turn the image into a "raw file"): -f raw for raw files.
  const format = parseFormat(values.f, 'format') ?? 'fvd';
  const key = readKeyFile(values['key-file']);
  if (format === 'raw' && key) {
    wipe(key);
    throw refuseKeyFor(path, 'raw');
  }
  const { map: entries, chain } = await mapPath(path, format, key).finally(() => wipe(key));
  if (output === 'json') {
    // One entry per line, as qemu-img prints it.
    console.log(`[${entries.map((e) => JSON.stringify(e)).join(',\n')}]`);
    return 0;
  }
  const hex = (n: number) => '0x' + n.toString(16);
  const rows = entries.map((e) => {
    const what = e.data ? 'data' : e.present ? 'zero' : 'unallocated';
    const where = e.depth === 0 ? '' : `  in ${chain[e.depth] ?? 'base'} (depth ${e.depth})`;
    return [hex(e.start), hex(e.length), what + where, e.offset === undefined ? '' : hex(e.offset)];
  });
  const w = (i: number, head: string) => Math.max(head.length, ...rows.map((r) => r[i]!.length)) + 2;
  const [w0, w1] = [w(0, 'Offset'), w(1, 'Length')];
  const w2 = w(2, 'What');
  console.log(`${'Offset'.padEnd(w0)}${'Length'.padEnd(w1)}${'What'.padEnd(w2)}File offset`.trimEnd());
  for (const r of rows) console.log(`${r[0]!.padEnd(w0)}${r[1]!.padEnd(w1)}${r[2]!.padEnd(w2)}${r[3]}`.trimEnd());
  return 0;
}
