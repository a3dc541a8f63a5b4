/**
 * fvd info [--json] [--key-file PATH|-] IMAGE — qemu-img info for FVD images. An encrypted
 * image needs no key here (only metadata is read); a key given is verified.
 */
import fs from 'node:fs';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../fvd/node-file.js';
import { UsageError, formatSize, parseOptions } from '../args.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { oneLine } from '../../fvd/errors.js';

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseOptions('info', args, { json: { type: 'boolean', default: false }, ...KEY_FILE_OPTION });
  if (positionals.length !== 1) throw new UsageError('usage: fvd info [--json] [--key-file PATH|-] IMAGE');
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
  console.log(lines.map(oneLine).join('\n')); // one line per field, whatever the paths hold
  return 0;
}
