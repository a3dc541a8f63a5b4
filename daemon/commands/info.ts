/**
 * fvd info [--json] [--backing-chain] [--key-file PATH|-] IMAGE — qemu-img info for FVD images;
 * --backing-chain adds a block for every level below (FVD, qcow2 or raw). An encrypted
 * image needs no key here (only metadata is read); a key given is verified.
 */
import fs from 'node:fs';
import { FvdImage, type BaseChainEntry } from '../../fvd/image.js';
import { nodeIo } from '../../fvd/node-file.js';
import { UsageError, formatSize, parseOptions } from '../args.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseOptions('info', args, {
    json: { type: 'boolean', default: false },
    'backing-chain': { type: 'boolean', default: false },
    ...KEY_FILE_OPTION,
  });
  if (positionals.length !== 1) throw new UsageError('usage: fvd info [--json] [--backing-chain] [--key-file PATH|-] IMAGE');
  const path = positionals[0]!;
  const key = readKeyFile(values['key-file']);
  const image = await FvdImage.open(nodeIo, path, key ? { readOnly: true, key } : { readOnly: true, withoutKey: true }).finally(() => wipe(key));
  const s = image.stats();
  await image.close();
  const st = fs.statSync(path);
  const diskSize = st.isBlockDevice() ? s.fileSize : st.blocks * 512;
  const info = {
    image: path,
    format: 'fvd',
    layout: s.layout,
    virtualSize: s.virtualSize,
    diskSize,
    blockSize: s.blockSize,
    chunkSize: s.chunkSize,
    baseChain: s.baseChain,
    bytesLocal: s.bytesLocal,
    bytesInBase: s.bytesInBase,
    fullyLocal: s.fullyLocal,
    zeroDetected: s.zeroDetected,
    encryption: s.encryption,
    dirty: s.wasDirty,
    journal: { ...s.journal, sectorsToReplay: s.journalSectorsReplayed },
    allocatedChunks: s.layout === 'compact' ? s.allocatedChunks : undefined,
    snapshots: s.layout === 'compact' ? s.snapshots : undefined,
  };
  if (values.json) {
    console.log(JSON.stringify(info, null, 2));
    return 0;
  }
  const pct = (n: number) => (s.virtualSize ? ((100 * n) / s.virtualSize).toFixed(1) : '0.0');
  const lines = [
    `image: ${path}`,
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
  lines.push(
    `local: ${formatSize(s.bytesLocal)} (${pct(s.bytesLocal)}%)`,
    `in base: ${formatSize(s.bytesInBase)} (${pct(s.bytesInBase)}%)`,
    `fully local: ${s.fullyLocal ? 'yes' : 'no'}`,
    `zero blocks detected at create: ${s.zeroDetected ? 'yes' : 'no'}`,
    `encrypted: ${s.encryption ?? 'no'}`,
    `dirty: ${s.wasDirty ? `yes (${s.journalSectorsReplayed} journal sectors to replay)` : 'no'}`,
    `journal: ${s.journal.capacitySectors * 512 ? formatSize(s.journal.capacitySectors * 512) : 'none'}, ${s.journalSectorsReplayed} sectors in use`,
  );
  if (values['backing-chain']) for (const level of s.baseChain) lines.push('', ...describeLevel(level));
  console.log(lines.join('\n'));
  return 0;
}

/** One level below the image, as `qemu-img info --backing-chain` shows each image of a chain. */
function describeLevel(level: BaseChainEntry): string[] {
  const st = fs.statSync(level.path, { throwIfNoEntry: false });
  const out = [`image: ${level.path}`, `file format: ${level.format}`, `virtual size: ${formatSize(level.size)} (${level.size} bytes)`];
  if (st) out.push(`disk size: ${formatSize(st.isBlockDevice() ? level.size : st.blocks * 512)}`);
  const q = level.qcow2;
  if (q) {
    out.push(
      `cluster size: ${formatSize(q.clusterSize)}`,
      `compat: ${q.version === 2 ? '0.10' : '1.1'}`,
      `compression type: ${q.compression}`,
      `extended l2: ${q.extendedL2 ? 'yes' : 'no'}`,
    );
    if (q.dataFile) out.push(`data file: ${q.dataFile}`);
    if (q.backingFile) out.push(`backing file: ${q.backingFile} (${q.backingFormat})`);
  }
  return out;
}
