/**
 * `fvd check`: verifies an image without modifying it, and with `repair` fixes what can be fixed.
 *
 * Opening read-only already verifies the header (magic, version, checksum, feature bits,
 * geometry), the base chain (present, right size), the journal (replayed in memory: well-formed
 * records, in range) and the lookup table (in bounds, no storage chunk mapped twice). Beyond that
 * it reports the state a repair changes: a dirty image (journal to replay) and unreferenced
 * storage chunks of a compact image (free space or chunks leaked by a crash; harmless, since
 * allocation reuses them, but `--repair` returns them to the host). With internal snapshots it
 * reads every snapshot's saved table and compares the references with the refcount table:
 * overcounts are leaks (`--repair` rewrites the refcounts), undercounts are errors (the active
 * table could overwrite a snapshot's data in place; `--repair` sets the true counts, which stops
 * further damage but cannot restore what was overwritten). With undercounts, storage a snapshot maps
 * is used whatever the stored count says: it is neither reported unreferenced nor allocated by the
 * repair (FORMAT.md §10.8). A damaged refcount table (bad checksum,
 * impossible counts) is an error that `--repair` fixes: refcounts are derivable, so the image is
 * opened with the counts recounted from the snapshot tables and --repair writes them (FORMAT.md
 * §10.8). A damaged directory or saved table is not derivable: an error --repair cannot fix.
 */
import type { IoBackend } from './io.js';
import { FvdError } from './errors.js';
import { FvdImage } from './image.js';
import { KeyError } from './crypto.js';

export interface CheckReport {
  /** Corruption found; non-empty means the image is unusable as it is. */
  errors: string[];
  /** Notes that are not corruption (dirty flag, unreferenced chunks). */
  notes: string[];
  /** Unreferenced storage chunks (compact layout). */
  leaks: number;
  /** Storage chunks whose refcount exceeds the snapshot tables mapping them (leaked references). */
  overcounts: number;
  /** Storage chunks whose refcount is below the snapshot tables mapping them (corruption). */
  undercounts: number;
  /** Internal snapshots. */
  snapshots: number;
  /** True when `repair` changed the image. */
  repaired: boolean;
}

/**
 * `key`: an encrypted image's key material, verified when given. Without it an encrypted image
 * is checked (and repaired) all the same: no check or repair reads or writes its data.
 */
export async function checkImage(io: IoBackend, path: string, options: { repair?: boolean; key?: Uint8Array } = {}): Promise<CheckReport> {
  const report: CheckReport = { errors: [], notes: [], leaks: 0, overcounts: 0, undercounts: 0, snapshots: 0, repaired: false };
  const keyed = options.key ? { key: options.key } : { withoutKey: true };
  let image: FvdImage;
  try {
    image = await FvdImage.open(io, path, { readOnly: true, recountRefcounts: true, ...keyed });
  } catch (err) {
    // A wrong key (or a key for an unencrypted image) is a usage error, not damage.
    if (err instanceof FvdError && !(err instanceof KeyError)) {
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
    report.snapshots = image.snapshots.count;
    const damage = image.snapshots.refcountDamage;
    if (damage) {
      // Derivable: the counts were recounted from the snapshot tables at open (FORMAT.md §10.8).
      const what = `${damage}; --repair rebuilds it from the snapshot tables`;
      if (options.repair) report.notes.push(what);
      else report.errors.push(`${path}: corrupt image: ${what}`);
      needsRepair = true;
    }
    if (report.snapshots) {
      const r = await image.snapshots.verify();
      report.errors.push(...r.errors);
      report.overcounts = r.overcounts.length;
      report.undercounts = r.undercounts.length;
      const list = (xs: typeof r.overcounts) =>
        xs.slice(0, 5).map((x) => `chunk ${x.id}: refcount ${x.stored}, referenced ${x.actual}`).join('; ') + (xs.length > 5 ? '; ...' : '');
      if (r.overcounts.length) {
        report.notes.push(`${r.overcounts.length} storage chunk(s) with a refcount above their references (leaked; --repair fixes): ${list(r.overcounts)}`);
        needsRepair = true;
      }
      if (r.undercounts.length) {
        const what = `${r.undercounts.length} storage chunk(s) with a refcount below their references (snapshot data may be overwritten in place): ${list(r.undercounts)}`;
        if (options.repair) report.notes.push(`${what}; --repair sets the true counts`);
        else report.errors.push(`${what}; --repair sets the true counts`);
        needsRepair = true;
        // Storage only a snapshot maps is not unreferenced, whatever the stored counts say.
        image.snapshots.holdReferenced(r.actual!);
      }
    }
    report.leaks = image.unreferencedChunks;
    if (report.leaks) {
      report.notes.push(`${report.leaks} unreferenced storage chunk(s) (free space or leaked by a crash; reused by later writes)`);
      needsRepair = true;
    }
  } finally {
    await image.close();
  }
  if (!options.repair || !needsRepair || report.errors.length) return report;

  // Read-write open replays the journal and checkpoints it; close writes the clean flag.
  const rw = await FvdImage.open(io, path, { copyOnRead: false, recountRefcounts: true, ...keyed });
  try {
    if (rw.snapshots.refcountDamage) {
      await rw.snapshots.repairRefcounts();
      report.notes.push('rebuilt the refcount table from the snapshot tables');
    } else if (report.overcounts || report.undercounts) {
      const fixed = await rw.snapshots.repairRefcounts();
      report.notes.push(`rewrote the refcount table (${fixed} count(s) corrected)`);
    }
    const reclaimed = await rw.reclaimUnreferenced();
    if (reclaimed) report.notes.push(`reclaimed ${reclaimed} unreferenced storage chunk(s)`);
  } finally {
    await rw.close();
  }
  report.repaired = true;
  return report;
}
