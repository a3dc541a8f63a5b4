/**
 * Offline commands and a dead server's leftovers (docs/DESIGN.md §7). While an image's device
 * waits for a new server, or a pending log holds acknowledged writes whose records are not yet
 * in the image's metadata, an offline command that opens the image would lose those writes (a
 * clean close clears DIRTY and the log is then ignored) or change the image under a guest that
 * still runs. Such commands refuse, naming what is left and what to run: `fvd serve` applies the
 * log (and recovers a waiting device); `fvd stop N` deletes a waiting device.
 */
import fs from 'node:fs';
import { FvdError } from '../fvd/errors.js';
import { HEADER_SIZE, INCOMPAT_DIRTY, decodeHeader } from '../fvd/format.js';
import { readPendingLog, readQueueLogs } from '../fvd/pending-log.js';
import { currentBootId, fileIdOf, pendingLogPath, pidAlive } from './recovery.js';
import { listStates } from './state.js';

/** Throws a one-line EBUSY error when `image` has a waiting device or an unapplied pending log. */
export function refuseWhilePending(image: string, what: string): void {
  let fileId: string;
  try {
    if (!fs.statSync(image).isFile()) return; // logs are kept for image files only
    fileId = fileIdOf(image);
  } catch {
    return; // the command reports a missing image itself
  }
  const bootId = currentBootId();
  const mine = listStates().filter((s) => s.fileId === fileId && s.bootId === bootId);
  // A running server holds the image's lock: the command's open says "in use".
  if (mine.some((s) => pidAlive(s.pid))) return;
  const waiting = mine.find((s) => fs.existsSync(s.device));
  if (waiting)
    throw new FvdError(
      `${image}: ${waiting.device} is waiting for this image's server (writes it acknowledged may not be in the image yet): 'fvd serve ${image}' recovers it, 'fvd stop ${waiting.devId}' deletes it; then ${what}`,
      'EBUSY',
    );
  const pending = unappliedPendingWrites(image, fileId, bootId);
  if (pending)
    throw new FvdError(
      `${image}: ${pending.logPath} holds ${pending.records} records of writes a dead server acknowledged, not yet in the image: run 'fvd serve ${image}' (it applies them) and stop it, then ${what}`,
      'EBUSY',
    );
}

/**
 * The records of this boot's pending log of `image` (identity `fileId`) that its next read-write
 * open would apply, or null when there are none. The engine applies a log only to a DIRTY image
 * (fvd/metadata.ts: after the journal replay): a clean image's log is spent — its server closed
 * it, or the file is a new one that reuses a deleted image's inode (the log is keyed by dev:ino) —
 * and is not pending, whatever it holds.
 */
export function unappliedPendingWrites(image: string, fileId: string, bootId: string): { logPath: string; records: number } | null {
  const logPath = pendingLogPath(fileId);
  const id = { path: logPath, bootId, fileId };
  const log = readPendingLog(id);
  if (log.status !== 'valid') return null;
  // With the queue threads' logs (FORMAT.md §14.4): records of writes they answered, which the
  // image's log may not hold yet.
  const queued = readQueueLogs(id).reduce((n, q) => n + (q.status === 'valid' ? q.records.length : 0), 0);
  const records = log.records.filter((r) => r.seq > log.committedSeq).length + queued;
  if (records === 0 || !imageIsDirty(image)) return null;
  return { logPath, records };
}

/** DIRTY in the image's header; an unreadable header counts as dirty (the command reports it). */
function imageIsDirty(image: string): boolean {
  try {
    const fd = fs.openSync(image, 'r');
    try {
      const sector = new Uint8Array(HEADER_SIZE);
      fs.readSync(fd, sector, 0, HEADER_SIZE, 0);
      return (decodeHeader(image, sector, fs.fstatSync(fd).size).incompatible & INCOMPAT_DIRTY) !== 0n;
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return true;
  }
}
