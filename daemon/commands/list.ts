/** fvd list [--json]: devices served by fvd on this host. */
import fs from 'node:fs';
import { formatSize, parseOptions, UsageError } from '../args.js';
import { listStates } from '../state.js';
import { pidAlive } from '../server.js';
import { oneLine } from '../../fvd/errors.js';

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseOptions('list', args, { json: { type: 'boolean', default: false } });
  if (positionals.length) throw new UsageError('usage: fvd list [--json]');
  const rows = listStates().map((s) => ({ ...s, running: pidAlive(s.pid) && fs.existsSync(s.device) }));
  if (values.json) {
    console.log(JSON.stringify(rows, null, 2));
    return 0;
  }
  console.log(`${'NAME'.padEnd(16)}${'DEVICE'.padEnd(14)}${'SIZE'.padEnd(11)}${'PID'.padEnd(9)}IMAGE`);
  for (const r of rows)
    console.log(oneLine(`${r.name.padEnd(16)}${r.device.padEnd(14)}${formatSize(r.size).padEnd(11)}${String(r.pid).padEnd(9)}${r.image}${r.running ? '' : '  (stale: server gone)'}`));
  return 0;
}
