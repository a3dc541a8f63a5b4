/**
 * fvd stop [--handoff] NAME|DEVICE [--timeout SEC]: asks the serving process to stop and waits for
 * it. With --handoff the server leaves its device waiting for the next server instead of deleting
 * it (live restart; the unit's ExecStop uses it when systemd restarts the service).
 */
import { UsageError, parseInteger } from '../args.js';
import { defineCommand, parseCommand, usageError } from '../command.js';
import { listStates, removeState, type DeviceState } from '../state.js';
import { pidAlive } from '../server.js';
import { currentBootId, handOffServer, isOurs, waitForExit } from '../recovery.js';
import { recoveringPid } from '../warden.js';
import { unappliedPendingWrites } from '../pending-guard.js';
import { UblkControl } from '../ublk/control.js';

export const spec = defineCommand({
  name: 'stop',
  summary: 'stop a served device (by name, /dev path or device number) and wait for it',
  usage: ['[--handoff] [--timeout SEC] NAME|DEVICE'],
  options: {
    timeout: { type: 'string', default: '60', arg: 'SEC', help: 'how long to wait for the server to finish' },
    handoff: {
      type: 'boolean',
      default: false,
      help: 'live restart: the server exits leaving the device (with its held I/O) to the next `fvd serve` of the image; needs --recovery-wait',
    },
  },
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 1) throw usageError(spec);
  const key = positionals[0]!;
  const timeout = parseInteger(values.timeout!, 'timeout', 1, 3600) * 1000;
  const st = listStates().find((s) => s.name === key || s.device === key || `ublkb${s.devId}` === key || String(s.devId) === key);
  if (!st) throw new UsageError(`no device served by fvd matches '${key}' (see 'fvd list')`);
  if (!pidAlive(st.pid)) {
    if (values.handoff) throw new UsageError(`${st.device} (${st.name}): no server to hand over (pid ${st.pid} is gone); it already waits for the next 'fvd serve'`);
    // A device left waiting for a new server (serve --recovery-wait): deleted here, its held
    // I/O fails. The pending log stays and is applied by the image's next read-write serve.
    if (st.fileId !== undefined) {
      const taker = recoveringPid(st.devId);
      if (taker !== null) throw new UsageError(`${st.device} (${st.name}) is being taken over by a new server (pid ${taker}): stop that one once it is up`);
      return deleteWaitingDevice(st);
    }
    throw new UsageError(`${st.device} (${st.name}): its server (pid ${st.pid}) is gone; 'fvd serve' on the same --dev-id cleans it up`);
  }
  if (values.handoff) {
    await handOffServer(st, timeout);
    console.log(`handed over ${st.device} (${st.name}): it waits for the next 'fvd serve' of ${st.image}`);
    return 0;
  }
  process.kill(st.pid, 'SIGTERM');
  if (!(await waitForExit(st.pid, timeout))) throw new UsageError(`${st.device}: server pid ${st.pid} did not stop within ${timeout / 1000} s`);
  console.log(`stopped ${st.device} (${st.name})`);
  return 0;
}

async function deleteWaitingDevice(st: DeviceState): Promise<number> {
  const ctl = await UblkControl.open();
  try {
    const info = await ctl.deviceInfo(st.devId);
    if (info && !isOurs(info, st)) throw new UsageError(`${st.device}: device ${st.devId} is not the one ${st.name} left (another server's); not touching it`);
    if (info) {
      await ctl.stopDevice(st.devId).catch(() => {});
      await ctl.deleteDevice(st.devId);
    }
    removeState(st.devId);
    console.log(`deleted ${st.device} (${st.name}), which was waiting for its server`);
    // Its held I/O failed, but what it acknowledged before is safe: the data is in the image and
    // the records that expose it are in the pending log, which only a read-write serve applies.
    const pending = st.fileId !== undefined ? unappliedPendingWrites(st.image, st.fileId, currentBootId()) : null;
    if (pending)
      console.log(
        `${pending.records} records of writes it acknowledged are in ${pending.logPath}, not yet in ${st.image}: the next 'fvd serve ${st.image}' applies them (offline commands refuse until then)`,
      );
    return 0;
  } finally {
    ctl.close();
  }
}
