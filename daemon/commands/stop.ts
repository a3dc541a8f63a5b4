/** fvd stop NAME|DEVICE [--timeout SEC]: asks the serving process to stop and waits for it. */
import { UsageError, parseInteger } from '../args.js';
import { defineCommand, parseCommand, usageError } from '../command.js';
import { listStates } from '../state.js';
import { pidAlive } from '../server.js';

export const spec = defineCommand({
  name: 'stop',
  summary: 'stop a served device (by name, /dev path or device number) and wait for it',
  usage: ['[--timeout SEC] NAME|DEVICE'],
  options: { timeout: { type: 'string', default: '60', arg: 'SEC', help: 'how long to wait for the server to finish' } },
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 1) throw usageError(spec);
  const key = positionals[0]!;
  const timeout = parseInteger(values.timeout!, 'timeout', 1, 3600) * 1000;
  const st = listStates().find((s) => s.name === key || s.device === key || `ublkb${s.devId}` === key || String(s.devId) === key);
  if (!st) throw new UsageError(`no device served by fvd matches '${key}' (see 'fvd list')`);
  if (!pidAlive(st.pid)) throw new UsageError(`${st.device} (${st.name}): its server (pid ${st.pid}) is gone; 'fvd serve' on the same --dev-id cleans it up`);
  process.kill(st.pid, 'SIGTERM');
  const until = Date.now() + timeout;
  while (pidAlive(st.pid)) {
    if (Date.now() > until) throw new UsageError(`${st.device}: server pid ${st.pid} did not stop within ${timeout / 1000} s`);
    await new Promise((r) => setTimeout(r, 50));
  }
  console.log(`stopped ${st.device} (${st.name})`);
  return 0;
}
