/**
 * fvd list [--output=human|json]: devices served by fvd on this host, with their state (running,
 * or stale: the server is gone) and, as JSON, the figures the server publishes every 5 s
 * (requests, engine hand-offs, errors, latency, prefetch progress: daemon/metrics.ts).
 */
import fs from 'node:fs';
import { formatSize } from '../args.js';
import { OUTPUT_OPTIONS, defineCommand, outputFormat, parseCommand, usageError } from '../command.js';
import { listStates, stateDir } from '../state.js';
import { figuresFile, type DeviceFigures } from '../metrics.js';

/** The figures the server last published (every 5 s), or null. */
function readFigures(devId: number): DeviceFigures | null {
  try {
    return JSON.parse(fs.readFileSync(figuresFile(stateDir(), devId), 'utf8')) as DeviceFigures;
  } catch {
    return null;
  }
}
import { pidAlive } from '../server.js';
import { oneLine } from '../../fvd/errors.js';

export const spec = defineCommand({
  name: 'list',
  summary: 'list the devices served by fvd on this host',
  usage: ['[--output=human|json]'],
  options: { ...OUTPUT_OPTIONS },
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length) throw usageError(spec);
  const rows = listStates().map((s) => {
    const running = pidAlive(s.pid) && fs.existsSync(s.device);
    return { ...s, state: running ? 'running' : 'stale', running, figures: running ? readFigures(s.devId) : null };
  });
  if (outputFormat(values) === 'json') {
    console.log(JSON.stringify(rows, null, 2));
    return 0;
  }
  console.log(`${'NAME'.padEnd(16)}${'DEVICE'.padEnd(14)}${'SIZE'.padEnd(11)}${'PID'.padEnd(9)}IMAGE`);
  for (const r of rows)
    console.log(oneLine(`${r.name.padEnd(16)}${r.device.padEnd(14)}${formatSize(r.size).padEnd(11)}${String(r.pid).padEnd(9)}${r.image}${r.running ? '' : '  (stale: server gone)'}`));
  return 0;
}
