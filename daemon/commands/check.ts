/**
 * fvd check [--repair] [--output=human|json] [-f fvd|qcow2] [-p] [--key-file PATH|-] IMAGE — exit 0
 * clean, 2 corrupt, 3 repaired. An encrypted image is checked and repaired without its key (no data
 * is read); a key given is verified, and a wrong one is an error (exit 1). A qcow2 template (-f
 * qcow2) is read whole, as fvd would serve it (daemon/qcow2-check.ts); it is never repaired.
 *
 * The JSON output has qemu-img check's keys ("filename", "format", "check-errors", "corruptions",
 * "leaks", "corruptions-fixed", "leaks-fixed", "total-clusters", "allocated-clusters",
 * "image-end-offset"; a cluster is a block, the unit `info` calls cluster-size) beside fvd's own.
 */
import fs from 'node:fs';
import { checkImage } from '../../fvd/check.js';
import { FvdImage } from '../../fvd/image.js';
import { storageIo } from '../../storage/storage-io.js';
import { OUTPUT_OPTIONS, defineCommand, outputFormat, parseCommand, usageError } from '../command.js';
import { oneLine } from '../../fvd/errors.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { UnitCounter, mapImage } from '../space.js';
import { refuseWhilePending } from '../pending-guard.js';
import { parseFormat, probeFormat, refuseKeyFor } from '../disk.js';
import { UsageError, progressPrinter } from '../args.js';
import { checkQcow2 } from '../qcow2-check.js';

export const spec = defineCommand({
  name: 'check',
  summary: 'verify an image (and repair what can be repaired): exit 0 clean, 2 corrupt, 3 repaired',
  usage: ['[--repair] [--output=human|json] [-f fvd|qcow2] [-p] [--key-file PATH|-] IMAGE'],
  options: {
    repair: { type: 'boolean', short: 'r', default: false, help: 'replay the journal, return leaked chunks, rebuild a damaged refcount table' },
    ...OUTPUT_OPTIONS,
    f: { type: 'string', short: 'f', arg: 'fvd|qcow2', help: "IMAGE's format (default fvd: never probed); qcow2: read the whole template as fvd serves it" },
    p: { type: 'boolean', short: 'p', default: false, help: 'show progress (qcow2)' },
    ...KEY_FILE_OPTION,
  },
  details: `Exit codes: 0 no errors, 1 the check could not run, 2 the image is corrupt, 3 it was repaired.
With -f qcow2 the template's header, tables and every cluster holding data (compressed ones
decoded) are read, and the ranges its backing files provide: the first damage found is reported.
Refcounts are not checked (fvd never reads them); nothing is written.`,
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 1) throw usageError(spec);
  const output = outputFormat(values);
  const path = positionals[0]!;
  const format = parseFormat(values.f, 'format') ?? 'fvd';
  if (format === 'raw') throw new UsageError(`${path}: a raw file has no metadata to check`);
  if (format === 'qcow2') return checkTemplate(path, output, values);
  // Not a damaged FVD image but the wrong command line: said in one line, not as corruption.
  if (fs.statSync(path, { throwIfNoEntry: false })?.isFile() && probeFormat(path) === 'qcow2') throw new UsageError(`${path}: not an FVD image (bad magic; it is a qcow2 image): fvd check -f qcow2 reads it whole`);
  if (values.repair) refuseWhilePending(path, 'repair');
  const key = readKeyFile(values['key-file']);
  const report = await checkImage(storageIo(), path, { repair: values.repair, key }).finally(() => wipe(key));
  const code = report.errors.length ? 2 : report.repaired ? 3 : 0;
  if (output === 'json') {
    const leaks = report.leaks + report.overcounts;
    printJson(
      path,
      'fvd',
      {
        ...(report.errors.length ? { corruptions: report.errors.length } : {}),
        ...(leaks && !report.repaired ? { leaks } : {}),
        ...(report.repaired ? { 'corruptions-fixed': report.undercounts, 'leaks-fixed': leaks } : {}),
        ...(report.errors.length ? {} : await clusters(path)),
      },
      report,
      code,
    );
    return code;
  }
  // One line per finding: the path and the messages may hold control characters.
  for (const e of report.errors) console.log(oneLine(`ERROR: ${e}`));
  for (const n of report.notes) console.log(oneLine(`note: ${n}`));
  if (report.errors.length) console.log(oneLine(`${path}: ${report.errors.length} error(s) found; the image is corrupt`));
  else if (report.repaired) console.log(oneLine(`${path}: repaired`));
  else console.log(`No errors were found on the image.`);
  return code;
}

async function checkTemplate(path: string, output: 'human' | 'json', values: { repair?: boolean; p?: boolean; 'key-file'?: string }): Promise<number> {
  if (values.repair) throw new UsageError(`${path}: fvd never writes qcow2 images: --repair is for FVD images`);
  if (values['key-file'] !== undefined) throw refuseKeyFor(path, 'qcow2');
  const progress = progressPrinter(!!values.p);
  const report = await checkQcow2(path, (done, total) => progress.update(done, total));
  progress.done();
  const code = report.errors.length ? 2 : 0;
  if (output === 'json') {
    printJson(
      path,
      'qcow2',
      {
        ...(report.errors.length ? { corruptions: report.errors.length } : {}),
        'total-clusters': report.totalClusters,
        'allocated-clusters': report.allocatedClusters,
        'image-end-offset': report.imageEndOffset,
      },
      report,
      code,
    );
    return code;
  }
  for (const e of report.errors) console.log(oneLine(`ERROR: ${e}`));
  if (report.errors.length) console.log(oneLine(`${path}: the qcow2 image is corrupt`));
  else
    console.log(
      `No errors were found on the image.\n${report.allocatedClusters}/${report.totalClusters} = ${((100 * report.allocatedClusters) / Math.max(1, report.totalClusters)).toFixed(2)}% allocated clusters, all read` +
        (report.bytesInBacking ? `; ${report.bytesInBacking} bytes read from its backing files` : ''),
    );
  return code;
}

/** qemu-img check's keys (those that apply), then fvd's own report and the exit code. */
function printJson(path: string, format: 'fvd' | 'qcow2', qemuKeys: Record<string, unknown>, report: object, exitCode: number): void {
  console.log(JSON.stringify({ filename: path, format, 'check-errors': 0, ...qemuKeys, image: path, ...report, exitCode }, null, 2));
}

/** qemu-img's cluster figures of a sound image: blocks in all, blocks holding data, file end. */
async function clusters(path: string): Promise<Record<string, number>> {
  const image = await FvdImage.open(storageIo(), path, { readOnly: true, withoutKey: true });
  try {
    const { blockSize, virtualSize, fileSize } = image.stats();
    const allocated = new UnitCounter(blockSize);
    for (const e of await mapImage(image)) if (e.depth === 0 && e.data) allocated.add(e.start, e.length);
    const st = fs.statSync(path);
    return {
      'total-clusters': Math.ceil(virtualSize / blockSize),
      'allocated-clusters': allocated.count,
      'image-end-offset': st.isBlockDevice() ? fileSize : st.size,
    };
  } finally {
    await image.close();
  }
}
