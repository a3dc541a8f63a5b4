/**
 * `fvd check -f qcow2 TEMPLATE`: can fvd read this template, every byte of it? Before a template
 * is made the base of many images, its header and features are validated (the open), every L1 and
 * L2 entry (the walk over the whole disk), and every cluster that holds data is read — compressed
 * ones decoded — as are the ranges its backing chain provides. The reader's own checks decide
 * (fvd/qcow2-tables.ts, fvd/qcow2-decompress.ts): the first damaged structure ends the check with
 * its one-line reason. Ranges known to be zero cost nothing; nothing is written.
 *
 * Not qemu-img check: refcounts are never read by fvd (a read-only reader needs none), so leaks
 * and refcount errors are not looked for.
 */
import fs from 'node:fs';
import nodePath from 'node:path';
import { Qcow2Image } from '../fvd/qcow2.js';
import { Qcow2CorruptionError } from '../fvd/qcow2-format.js';
import { storageIo } from '../storage/storage-io.js';
import { UnitCounter } from './space.js';

/** Bytes per walk step and per read (a compressed read this large decodes on every core). */
const STEP = 4 * 1024 * 1024;

export interface Qcow2CheckReport {
  /** The damage found (at most one: the reader stops at the first), with its location. */
  errors: string[];
  clusterSize: number;
  totalClusters: number;
  /** Clusters of this file holding data (compressed or not). */
  allocatedClusters: number;
  imageEndOffset: number;
  bytesData: number;
  bytesZero: number;
  bytesInBacking: number;
}

/**
 * Reads the whole template as fvd would serve it. Throws (one line) when the file cannot be checked
 * at all — missing, or a feature fvd refuses (an encrypted qcow2, an unknown incompatible bit);
 * damage is reported, not thrown. `progress(done, total)` after each step.
 */
export async function checkQcow2(path: string, progress: (done: number, total: number) => void = () => {}): Promise<Qcow2CheckReport> {
  const st = fs.statSync(path);
  const report: Qcow2CheckReport = {
    errors: [],
    clusterSize: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    imageEndOffset: st.size,
    bytesData: 0,
    bytesZero: 0,
    bytesInBacking: 0,
  };
  let img: Qcow2Image;
  try {
    img = await Qcow2Image.open(storageIo(), nodePath.resolve(path));
  } catch (err) {
    if (!(err instanceof Qcow2CorruptionError)) throw err;
    report.errors.push(err.message);
    return report;
  }
  const buf = Buffer.allocUnsafe(STEP);
  try {
    const cs = img.describe()[0]!.qcow2!.clusterSize;
    report.clusterSize = cs;
    report.totalClusters = Math.ceil(img.size / cs);
    const allocated = new UnitCounter(cs);
    try {
      for (let pos = 0; pos < img.size; pos += STEP) {
        for (const r of await img.allocation(pos, Math.min(STEP, img.size - pos))) {
          if (r.kind === 'zero') {
            report.bytesZero += r.length;
            continue;
          }
          if (r.kind === 'data') {
            report.bytesData += r.length;
            allocated.add(r.offset, r.length);
          } else {
            report.bytesInBacking += r.length;
          }
          await img.read(buf.subarray(0, r.length), r.offset);
        }
        progress(Math.min(img.size, pos + STEP), img.size);
      }
    } finally {
      // Also when damage ends the walk: the report gives the clusters counted up to there.
      report.allocatedClusters = allocated.count;
    }
  } catch (err) {
    if (!(err instanceof Qcow2CorruptionError)) throw err;
    report.errors.push(err.message);
  } finally {
    await img.close();
  }
  return report;
}
