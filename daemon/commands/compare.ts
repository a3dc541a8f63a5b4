/**
 * fvd compare [-f raw|fvd|qcow2] [-F raw|fvd|qcow2] [-s] [-p] [--output=human|json] [--key-file PATH|-] A B —
 * whether two disks read the same, like qemu-img compare, with its exit codes: 0 identical, 1
 * different, 2 an error (a file that cannot be opened or read, a bad argument).
 *
 * Disks of different sizes are identical when the longer one reads zeros past the shorter one's
 * end; -s (strict) calls them different, and also calls a range different where one side holds
 * data and the other does not (allocation status, from the two maps), even when both read zeros.
 * Ranges that both maps show as zeros are not read.
 */
import { UsageError, progressPrinter } from '../args.js';
import { HelpRequested, OUTPUT_OPTIONS, defineCommand, outputFormat, parseCommand, usageError } from '../command.js';
import { openDisk, parseFormat, probeFormat, type Disk } from '../disk.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { mapPath, type MapEntry } from '../space.js';

export const spec = defineCommand({
  name: 'compare',
  summary: 'whether two disks read the same: exit 0 identical, 1 different, 2 error',
  usage: ['[-f raw|fvd|qcow2] [-F raw|fvd|qcow2] [-s] [-p] [--output=human|json] [--key-file PATH|-] A B'],
  options: {
    f: { type: 'string', short: 'f', arg: 'raw|fvd|qcow2', help: "A's format (default: probed)" },
    F: { type: 'string', short: 'F', arg: 'raw|fvd|qcow2', help: "B's format (default: probed)" },
    strict: { type: 'boolean', short: 's', default: false, help: 'different sizes, or data beside no data, also count as different' },
    p: { type: 'boolean', short: 'p', default: false, help: 'show progress on stderr' },
    ...OUTPUT_OPTIONS,
    ...KEY_FILE_OPTION,
  },
  details: 'The key (--key-file) is used for whichever of A and B is an encrypted FVD image.',
});

const STEP = 1024 * 1024;

export async function run(args: string[]): Promise<number> {
  try {
    return await compare(args);
  } catch (err) {
    if (err instanceof HelpRequested) throw err;
    const e = err as NodeJS.ErrnoException;
    const msg = e?.code && e.syscall ? `${e.path ? `${e.path}: ` : ''}${e.message.replace(/^[A-Z]+: /, '')}` : (e?.message ?? String(err));
    throw new UsageError(msg, 2);
  }
}

interface Side {
  disk: Disk;
  map: MapEntry[];
}

async function compare(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 2) throw usageError(spec);
  const output = outputFormat(values);
  const [a, b] = positionals as [string, string];
  const fa = parseFormat(values.f, "A's format") ?? probeFormat(a);
  const fb = parseFormat(values.F, "B's format") ?? probeFormat(b);
  const key = readKeyFile(values['key-file']);
  let sides: Side[] = [];
  try {
    for (const [p, f] of [[a, fa], [b, fb]] as const) {
      const k = f === 'fvd' ? key : undefined;
      const { map } = await mapPath(p, f, k);
      sides.push({ disk: await openDisk(p, f, { readOnly: true, key: k }), map });
    }
  } catch (err) {
    await Promise.all(sides.map((s) => s.disk.close()));
    throw err;
  } finally {
    wipe(key);
  }
  const [A, B] = sides as [Side, Side];
  let diff: { offset: number; reason: 'content' | 'size' | 'allocation' } | null = null;
  try {
    diff = await firstDifference(A, B, values.strict, progressPrinter(values.p));
  } finally {
    await A.disk.close();
    await B.disk.close();
    sides = [];
  }
  if (output === 'json') {
    console.log(JSON.stringify({ identical: diff === null, 'first-difference': diff?.offset ?? null, reason: diff?.reason ?? null }, null, 2));
  } else if (!diff) console.log('Images are identical.');
  else if (diff.reason === 'size') console.log(`Image size mismatch! (${A.disk.size} and ${B.disk.size} bytes)`);
  else if (diff.reason === 'allocation') console.log(`Strict mode: Offset ${diff.offset} block status mismatch!`);
  else console.log(`Content mismatch at offset ${diff.offset}!`);
  return diff ? 1 : 0;
}

/** Whether [start, start+len) holds data in `map`, as runs: the boundaries where that changes. */
function dataAt(map: MapEntry[], pos: number): { data: boolean; end: number } {
  // Maps are sorted and tile the disk; a binary search finds the entry holding pos.
  let lo = 0;
  let hi = map.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (map[mid]!.start <= pos) lo = mid;
    else hi = mid - 1;
  }
  const e = map[lo];
  if (!e || pos >= e.start + e.length) return { data: false, end: Number.POSITIVE_INFINITY };
  return { data: e.data, end: e.start + e.length };
}

async function firstDifference(
  A: Side,
  B: Side,
  strict: boolean,
  progress: ReturnType<typeof progressPrinter>,
): Promise<{ offset: number; reason: 'content' | 'size' | 'allocation' } | null> {
  if (strict && A.disk.size !== B.disk.size) return { offset: Math.min(A.disk.size, B.disk.size), reason: 'size' };
  const total = Math.max(A.disk.size, B.disk.size);
  const bufA = Buffer.alloc(STEP);
  const bufB = Buffer.alloc(STEP);
  let pos = 0;
  try {
    while (pos < total) {
      progress.update(pos, total);
      const da = pos < A.disk.size ? dataAt(A.map, pos) : { data: false, end: Number.POSITIVE_INFINITY };
      const db = pos < B.disk.size ? dataAt(B.map, pos) : { data: false, end: Number.POSITIVE_INFINITY };
      const end = Math.min(da.end, db.end, total, pos + STEP, ...(pos < A.disk.size ? [A.disk.size] : []), ...(pos < B.disk.size ? [B.disk.size] : []));
      if (strict && da.data !== db.data) return { offset: pos, reason: 'allocation' };
      const len = end - pos;
      if (da.data || db.data) {
        const pa = bufA.subarray(0, len);
        const pb = bufB.subarray(0, len);
        if (pos < A.disk.size) await A.disk.read(pa, pos);
        else pa.fill(0);
        if (pos < B.disk.size) await B.disk.read(pb, pos);
        else pb.fill(0);
        if (!pa.equals(pb)) {
          let i = 0;
          while (pa[i] === pb[i]) i++;
          // qemu-img reports the first differing sector
          return { offset: pos + i - ((pos + i) % 512), reason: 'content' };
        }
      }
      pos = end;
    }
    progress.update(total, total);
    return null;
  } finally {
    progress.done();
  }
}
