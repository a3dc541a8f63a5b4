/**
 * `fvd check`: verifies an image without modifying it, and with `repair` fixes what can be fixed.
 *
 * Opening read-only already verifies the header (magic, version, checksum, feature bits,
 * geometry), the base chain (present, right size), the journal (replayed in memory: well-formed
 * records, in range) and the lookup table (in bounds, no storage chunk mapped twice). Beyond that
 * it reports the state a repair changes: a dirty image (journal to replay) and unreferenced
 * storage chunks of a compact image (free space or chunks leaked by a crash; harmless, since
 * allocation reuses them, but `--repair` returns them to the host).
 */
import type { IoBackend } from './io.js';
import { FvdError } from './errors.js';
import { FvdImage } from './image.js';

export interface CheckReport {
  /** Corruption found; non-empty means the image is unusable as it is. */
  errors: string[];
  /** Notes that are not corruption (dirty flag, unreferenced chunks). */
  notes: string[];
  /** Unreferenced storage chunks (compact layout). */
  leaks: number;
  /** True when `repair` changed the image. */
  repaired: boolean;
}

export async function checkImage(io: IoBackend, path: string, options: { repair?: boolean } = {}): Promise<CheckReport> {
  const report: CheckReport = { errors: [], notes: [], leaks: 0, repaired: false };
  let image: FvdImage;
  try {
    image = await FvdImage.open(io, path, { readOnly: true });
  } catch (err) {
    if (err instanceof FvdError) {
      report.errors.push(err.message);
      return report;
    }
    throw err;
  }
  let needsRepair = false;
  try {
    const st = image.stats();
    if (st.wasDirty) {
      report.notes.push(`image was not closed cleanly: ${st.journalSectorsReplayed} journal sector(s) to replay`);
      needsRepair = true;
    }
    const next = image.inspect().header.baseSizeNext;
    if (next) report.notes.push(`a commit was interrupted while growing the base to ${next} bytes; run 'fvd commit' again to finish it`);
    report.leaks = image.unreferencedChunks;
    if (report.leaks) {
      report.notes.push(`${report.leaks} unreferenced storage chunk(s) (free space or leaked by a crash; reused by later writes)`);
      needsRepair = true;
    }
  } finally {
    await image.close();
  }
  if (!options.repair || !needsRepair) return report;

  // Read-write open replays the journal and checkpoints it; close writes the clean flag.
  const rw = await FvdImage.open(io, path, { copyOnRead: false });
  try {
    const reclaimed = await rw.reclaimUnreferenced();
    if (reclaimed) report.notes.push(`reclaimed ${reclaimed} unreferenced storage chunk(s)`);
  } finally {
    await rw.close();
  }
  report.repaired = true;
  return report;
}
