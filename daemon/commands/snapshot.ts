/**
 * fvd snapshot -c NAME | -l [--json] | -d NAME | -a NAME IMAGE — internal snapshots, like
 * `qemu-img snapshot` (create, list, delete, apply = revert). Compact images only. The image is
 * opened with its lock, so a served image is refused ("in use"). Each operation is atomic under
 * power loss (docs/FORMAT.md §10).
 */
import { FvdImage } from '../../fvd/image.js';
import { validateName } from '../../fvd/snapshot.js';
import { storageIo } from '../../storage/storage-io.js';
import { UsageError, formatSize } from '../args.js';
import { OUTPUT_OPTIONS, defineCommand, outputFormat, parseCommand } from '../command.js';
import { oneLine } from '../../fvd/errors.js';
import { refuseWhilePending } from '../pending-guard.js';

export const spec = defineCommand({
  name: 'snapshot',
  summary: 'internal snapshots of a compact image: create, list, apply (revert to), delete',
  usage: ['-c NAME | -l [--output=human|json] | -a NAME | -d NAME IMAGE'],
  options: {
    create: { type: 'string', short: 'c', arg: 'NAME', help: 'take a snapshot (instant: saves the table and bitmap)' },
    list: { type: 'boolean', short: 'l', default: false, help: 'list the snapshots' },
    apply: { type: 'string', short: 'a', arg: 'NAME', help: 'revert the disk to a snapshot (the snapshot stays)' },
    delete: { type: 'string', short: 'd', arg: 'NAME', help: 'delete a snapshot; storage only it used is freed' },
    ...OUTPUT_OPTIONS,
  },
  details: 'The image must not be in use, except for -l. JSON: qemu-img info\'s snapshot keys (id, name, date-sec, ...) and fvd\'s (size, date).',
});
const USAGE = `usage: fvd snapshot ${spec.usage[0]}`;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  const json = outputFormat(values) === 'json';
  const actions = (['create', 'delete', 'apply'] as const).filter((k) => values[k] !== undefined);
  const n = actions.length + (values.list ? 1 : 0);
  if (n !== 1) throw new UsageError(n === 0 ? `no action given; ${USAGE}` : `give exactly one of -c, -l, -d, -a; ${USAGE}`);
  if (positionals.length !== 1) throw new UsageError(USAGE);
  if (json && !values.list) throw new UsageError('--output=json/--json goes with -l');
  const path = positionals[0]!;
  // Before the image is opened for writing: a bad name touches nothing.
  if (values.create !== undefined) validateName(values.create);
  if (!values.list) refuseWhilePending(path, 'retry');

  if (values.list) {
    const image = await FvdImage.open(storageIo(), path, { readOnly: true, withoutKey: true });
    let list;
    try {
      list = image.snapshots.list();
    } finally {
      await image.close();
    }
    if (json) {
      const qemu = (s: (typeof list)[number]) => ({
        id: String(s.id),
        name: s.name,
        'vm-state-size': 0,
        'date-sec': Math.floor(s.date.getTime() / 1000),
        'date-nsec': (s.date.getTime() % 1000) * 1e6,
        'vm-clock-sec': 0,
        'vm-clock-nsec': 0,
      });
      console.log(JSON.stringify(list.map((s) => ({ ...qemu(s), ...s, id: s.id, date: s.date.toISOString() })), null, 2));
      return 0;
    }
    if (list.length === 0) {
      console.log(oneLine(`${path}: no snapshots`));
      return 0;
    }
    const rows = list.map((s) => [String(s.id), s.name, formatSize(s.size), formatDate(s.date)]);
    const head = ['ID', 'TAG', 'SIZE', 'DATE'];
    const width = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
    const line = (r: string[]) => r.map((x, i) => (i === r.length - 1 ? x : x.padEnd(width[i]! + 2))).join('');
    console.log('Snapshot list:');
    console.log(line(head));
    for (const r of rows) console.log(line(r));
    return 0;
  }

  // Checked on a read-only open first: the read-write open below replays a dirty image's journal,
  // and a refused operation must leave the file byte-identical.
  const op = values.create !== undefined ? 'create' : values.delete !== undefined ? 'delete' : 'revert';
  const probe = await FvdImage.open(storageIo(), path, { readOnly: true, withoutKey: true });
  try {
    await probe.snapshots.preflight(op, (values.create ?? values.delete ?? values.apply)!);
  } finally {
    await probe.close();
  }
  const image = await FvdImage.open(storageIo(), path, { copyOnRead: false, withoutKey: true });
  try {
    if (values.create !== undefined) await image.snapshots.create(values.create);
    else if (values.delete !== undefined) await image.snapshots.delete(values.delete);
    else await image.snapshots.revert(values.apply!);
  } finally {
    await image.close();
  }
  return 0;
}

/** Local time, like qemu-img: 2024-05-01 12:34:56. */
function formatDate(d: Date): string {
  const p = (v: number) => String(v).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}
