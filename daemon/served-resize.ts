/**
 * `fvd resize` of an image that is being served: finds the live server from the state files and
 * asks it, over its control socket (daemon/control-socket.ts), to grow image and device.
 */
import fs from 'node:fs';
import { FvdError } from '../fvd/errors.js';
import { sendControl } from './control-socket.js';
import { pidAlive } from './recovery.js';
import { controlSocketFile, listStates, type DeviceState } from './state.js';

/** The state of the live server of `image` (same file, by real path), or null. */
export function servedImage(image: string): DeviceState | null {
  let real: string;
  try {
    real = fs.realpathSync(image);
  } catch {
    return null; // the offline path reports a missing image
  }
  return listStates().find((s) => s.image === real && pidAlive(s.pid)) ?? null;
}

/** Asks the server of `st` to grow; resolves with the sizes, throws its one-line error. */
export async function growServed(st: DeviceState, req: { size: number } | { delta: number }): Promise<{ oldSize: number; newSize: number }> {
  const res = await sendControl(controlSocketFile(st.devId), { op: 'grow', ...req });
  if (!res.ok) throw new FvdError(res.error, res.code === 'EBUSY' || res.code === 'ENOSPC' || res.code === 'EIO' ? res.code : 'EINVAL');
  return { oldSize: res.oldSize, newSize: res.newSize };
}
