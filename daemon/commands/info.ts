/**
 * fvd info [--output=human|json] [--backing-chain] [-f raw|fvd|qcow2] [--key-file PATH|-] IMAGE —
 * qemu-img info for FVD images, and for the raw and qcow2 files they are made over (with -f: the
 * format is never probed, as in `map`). An encrypted image needs no key here (only metadata is
 * read); a key given is verified.
 *
 * The JSON output has qemu-img info's keys ("filename", "format", "virtual-size", "actual-size",
 * "cluster-size", "dirty-flag", "backing-filename", "full-backing-filename",
 * "backing-filename-format", "snapshots") beside fvd's own figures (camelCase); with
 * --backing-chain it is an array, the image first, then each base, as qemu-img prints it.
 *
 * Space: "data" is what was written into this image, "zero" what it serves as zeros without
 * storing anything (never written, discarded: holes of the image file, unmapped chunks), "in base"
 * what is still read from the base chain (daemon/space.ts). The three add up to the virtual size.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage, type BaseChainEntry, type ImageStats } from '../../fvd/image.js';
import type { Qcow2Details } from '../../fvd/qcow2.js';
import { storageIo } from '../../storage/storage-io.js';
import { isUrl } from '../../fvd/base-location.js';
import { listStates } from '../state.js';
import { pidAlive } from '../server.js';
import { formatRemote, fractionLocal } from '../remote-status.js';
import { formatSize } from '../args.js';
import { OUTPUT_OPTIONS, defineCommand, outputFormat, parseCommand, usageError } from '../command.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { oneLine } from '../../fvd/errors.js';
import { mapImage, mapQcow2File, mapRawFile, spaceFigures } from '../space.js';
import { diskSize, parseFormat, refuseKeyFor } from '../disk.js';

/**
 * How long `fvd info` gives a remote base's server (ms), all retries included: it reads no data,
 * so an unreachable server is reported ("base reachable: no") after this, however long a budget
 * the remote configuration gives a guest's reads.
 */
const INFO_PROBE_MS = 5000;

export const spec = defineCommand({
  name: 'info',
  summary: 'describe an image: layout, sizes, base chain, data / zeros / in base, dirty flag',
  usage: ['[--output=human|json] [--backing-chain] [-f raw|fvd|qcow2] [--key-file PATH|-] IMAGE'],
  options: {
    ...OUTPUT_OPTIONS,
    'backing-chain': { type: 'boolean', default: false, help: 'describe every base of the chain too (the image first)' },
    f: { type: 'string', short: 'f', arg: 'raw|fvd|qcow2', help: "IMAGE's format (default fvd: never probed)" },
    ...KEY_FILE_OPTION,
  },
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 1) throw usageError(spec);
  const output = outputFormat(values);
  const file = positionals[0]!;
  // Not probed (a damaged FVD header must not turn the image into a "raw file"): -f for the others.
  const format = parseFormat(values.f, 'format') ?? 'fvd';
  const key = readKeyFile(values['key-file']);
  if (format !== 'fvd' && key) {
    wipe(key);
    throw refuseKeyFor(file, format);
  }
  const top =
    format === 'qcow2'
      ? await describeQcow2File(file)
      : format === 'raw'
        ? { ...describeRaw({ path: file, format: 'raw', size: await diskSize(file, 'raw') }), chain: [] }
        : await describeImage(file, key).finally(() => wipe(key));
  const entries: Record<string, unknown>[] = [top.info];
  const texts = [top.text];
  if (values['backing-chain']) {
    for (const b of top.chain) {
      const d = b.format === 'fvd' ? await describeImage(b.path, undefined) : b.qcow2 ? describeQcow2(b, b.qcow2) : describeRaw(b);
      entries.push(d.info);
      texts.push(d.text);
    }
  }
  if (output === 'json') console.log(JSON.stringify(values['backing-chain'] ? entries : entries[0], null, 2));
  else console.log(texts.join('\n\n'));
  return 0;
}

function diskSizeOf(file: string, fileSize: number): number {
  const st = fs.statSync(file);
  return st.isBlockDevice() ? fileSize : st.blocks * 512;
}

/** `n` as a percentage of `size`, one decimal (an empty image: 0.0). */
function percentOf(n: number, size: number): string {
  return size ? ((100 * n) / size).toFixed(1) : '0.0';
}

async function describeImage(file: string, key: Uint8Array | undefined): Promise<{ info: Record<string, unknown>; text: string; chain: BaseChainEntry[] }> {
  // Metadata only: a remote template whose server is down does not keep `info` from answering
  // (nothing is read from the base); the line below says so.
  let unreachable: string | null = null;
  const deferUnreachableBase = (event: string, detail: string) => {
    if (event === 'unreachable') unreachable = detail;
  };
  const image = await FvdImage.open(storageIo(undefined, { retryCapMs: INFO_PROBE_MS }), file, key ? { readOnly: true, key, deferUnreachableBase } : { readOnly: true, withoutKey: true, deferUnreachableBase });
  let s: ImageStats;
  let space;
  let snapshots;
  let fracLocal = 1;
  let identity: string | null = null;
  try {
    s = image.stats();
    fracLocal = fractionLocal(s);
    identity = image.baseIdentity;
    space = spaceFigures(await mapImage(image));
    snapshots = s.layout === 'compact' ? image.snapshots.list() : [];
  } finally {
    await image.close();
  }
  const diskSize = diskSizeOf(file, s.fileSize);
  const base = s.baseChain[0];
  // A served image's remote transfer figures, from its server's run-time record.
  const real = fs.realpathSync(file);
  const served = listStates().find((d) => d.image === real && pidAlive(d.pid));
  const info: Record<string, unknown> = {
    // qemu-img info's keys
    filename: file,
    format: 'fvd',
    'virtual-size': s.virtualSize,
    'actual-size': diskSize,
    'cluster-size': s.blockSize,
    'dirty-flag': s.wasDirty,
    ...(base
      ? {
          'backing-filename': base.path,
          'full-backing-filename': isUrl(base.path) ? base.path : path.resolve(base.path),
          'backing-filename-format': base.format,
        }
      : {}),
    ...(snapshots.length
      ? {
          snapshots: snapshots.map((x) => ({
            id: String(x.id),
            name: x.name,
            'vm-state-size': 0,
            'date-sec': Math.floor(x.date.getTime() / 1000),
            'date-nsec': (x.date.getTime() % 1000) * 1e6,
            'vm-clock-sec': 0,
            'vm-clock-nsec': 0,
          })),
        }
      : {}),
    // fvd's own figures
    image: file,
    layout: s.layout,
    virtualSize: s.virtualSize,
    diskSize,
    blockSize: s.blockSize,
    chunkSize: s.chunkSize,
    baseChain: s.baseChain,
    bytesData: space.bytesData,
    bytesZero: space.bytesZero,
    bytesInBase: space.bytesInBase,
    /** Not in the base: data + zero. */
    bytesLocal: s.bytesLocal,
    fractionLocal: fracLocal,
    baseIdentity: identity ?? undefined,
    baseUnreachable: unreachable ?? undefined,
    remote: served?.remote,
    fullyLocal: s.fullyLocal,
    zeroDetected: s.zeroDetected,
    encryption: s.encryption,
    dirty: s.wasDirty,
    journal: { ...s.journal, sectorsToReplay: s.journalSectorsReplayed },
    allocatedChunks: s.layout === 'compact' ? s.allocatedChunks : undefined,
    snapshotCount: s.layout === 'compact' ? s.snapshots : undefined,
  };
  const lines = [
    `image: ${file}`,
    `file format: fvd`,
    `layout: ${s.layout === 'raw' ? 'raw-like' : 'compact'}`,
    `virtual size: ${formatSize(s.virtualSize)} (${s.virtualSize} bytes)`,
    `disk size: ${formatSize(diskSize)}`,
    `block size: ${formatSize(s.blockSize)}`,
  ];
  if (s.layout === 'compact') lines.push(`chunk size: ${formatSize(s.chunkSize)}`, `allocated chunks: ${s.allocatedChunks}`, `snapshots: ${s.snapshots}`);
  if (s.baseChain.length) {
    lines.push(`base image: ${s.baseChain[0]!.path} (${s.baseChain[0]!.format}, ${formatSize(s.baseChain[0]!.size)})`);
    for (const b of s.baseChain.slice(1)) lines.push(`  based on: ${b.path} (${b.format}, ${formatSize(b.size)})`);
  } else if (s.baseSize) {
    lines.push(`base image: not needed (fully local)`);
  }
  if (identity) lines.push(`base identity: ${identity}`);
  if (unreachable) lines.push(`base reachable: no: ${unreachable}`);
  if (served?.remote) lines.push(`${formatRemote(served.remote).replace(/^remote /, 'remote (served as ' + served.device + '): ')} as of ${served.remote.updatedAt}`);
  lines.push(
    `data: ${formatSize(space.bytesData)} (${percentOf(space.bytesData, s.virtualSize)}%) written in this image`,
    `zero: ${formatSize(space.bytesZero)} (${percentOf(space.bytesZero, s.virtualSize)}%) never written or discarded: reads as zeros, takes no space`,
    `in base: ${formatSize(space.bytesInBase)} (${percentOf(space.bytesInBase, s.virtualSize)}%)`,
    `fully local: ${s.fullyLocal ? 'yes' : `no (${(fracLocal * 100).toFixed(1)}% of the base is local)`}`,
    `zero blocks detected at create: ${s.zeroDetected ? 'yes' : 'no'}`,
    `encrypted: ${s.encryption ?? 'no'}`,
    `dirty: ${s.wasDirty ? `yes (${s.journalSectorsReplayed} journal sectors to replay)` : 'no'}`,
    `journal: ${s.journal.capacitySectors * 512 ? formatSize(s.journal.capacitySectors * 512) : 'none'}, ${s.journalSectorsReplayed} sectors in use`,
  );
  return { info, text: lines.map(oneLine).join('\n'), chain: s.baseChain }; // one line per field, whatever the paths hold
}

function describeRaw(b: BaseChainEntry): { info: Record<string, unknown>; text: string } {
  // A remote base (a URL, shown without credentials): nothing local to measure.
  if (isUrl(b.path))
    return {
      info: { filename: b.path, format: 'raw', 'virtual-size': b.size, 'dirty-flag': false },
      text: [`image: ${b.path}`, `file format: raw`, `virtual size: ${formatSize(b.size)} (${b.size} bytes)`].map(oneLine).join('\n'),
    };
  const st = fs.statSync(b.path);
  const actual = st.isBlockDevice() ? b.size : st.blocks * 512;
  const space = spaceFigures(mapRawFile(b.path));
  return {
    info: { filename: b.path, format: 'raw', 'virtual-size': b.size, 'actual-size': actual, 'dirty-flag': false, bytesData: space.bytesData, bytesZero: space.bytesZero },
    text: [
      `image: ${b.path}`,
      `file format: raw`,
      `virtual size: ${formatSize(b.size)} (${b.size} bytes)`,
      `disk size: ${formatSize(actual)}`,
      `data: ${formatSize(space.bytesData)}, holes: ${formatSize(space.bytesZero)}`,
    ].join('\n'),
  };
}

/**
 * A qcow2 file named on the command line: its header facts, what its own clusters hold and what
 * its backing files provide (the same three figures as an FVD image's), and its backing chain.
 */
async function describeQcow2File(file: string): Promise<{ info: Record<string, unknown>; text: string; chain: BaseChainEntry[] }> {
  const { map, chain } = await mapQcow2File(file);
  const top = chain[0]!;
  const space = spaceFigures(map);
  const d = describeQcow2({ ...top, path: file }, top.qcow2!);
  const lines = [
    `data: ${formatSize(space.bytesData)} (${percentOf(space.bytesData, top.size)}%) in this file's clusters`,
    `zero: ${formatSize(space.bytesZero)} (${percentOf(space.bytesZero, top.size)}%) zero clusters, or unallocated with no backing file to read`,
    `in backing files: ${formatSize(space.bytesInBase)} (${percentOf(space.bytesInBase, top.size)}%)`,
  ];
  return {
    info: { ...d.info, bytesData: space.bytesData, bytesZero: space.bytesZero, bytesInBase: space.bytesInBase, baseChain: chain.slice(1) },
    text: [d.text, ...lines.map(oneLine)].join('\n'),
    chain: chain.slice(1),
  };
}

/** A qcow2 level of the chain, with the facts `qemu-img info` shows for it (format-specific data). */
function describeQcow2(b: BaseChainEntry, q: Qcow2Details): { info: Record<string, unknown>; text: string } {
  const st = fs.statSync(b.path);
  const actual = st.isBlockDevice() ? b.size : st.blocks * 512;
  const compat = q.version === 2 ? '0.10' : '1.1';
  const text = [
    `image: ${b.path}`,
    `file format: qcow2`,
    `virtual size: ${formatSize(b.size)} (${b.size} bytes)`,
    `disk size: ${formatSize(actual)}`,
    `cluster size: ${formatSize(q.clusterSize)}`,
    `compat: ${compat}`,
    `compression type: ${q.compression}`,
    `extended l2: ${q.extendedL2 ? 'yes' : 'no'}`,
  ];
  if (q.dataFile) text.push(`data file: ${q.dataFile}`);
  if (q.backingFile) text.push(`backing file: ${q.backingFile} (${q.backingFormat})`);
  return {
    info: {
      filename: b.path,
      format: 'qcow2',
      'virtual-size': b.size,
      'actual-size': actual,
      'cluster-size': q.clusterSize,
      'dirty-flag': false,
      ...(q.backingFile ? { 'backing-filename': q.backingFile, 'backing-filename-format': q.backingFormat } : {}),
      'format-specific': {
        type: 'qcow2',
        data: { compat, 'compression-type': q.compression, 'extended-l2': q.extendedL2, ...(q.dataFile ? { 'data-file': q.dataFile } : {}) },
      },
    },
    text: text.map(oneLine).join('\n'),
  };
}
