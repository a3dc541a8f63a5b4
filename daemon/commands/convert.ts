/**
 * fvd convert [-f raw|fvd] [-O raw|fvd] [--layout raw|compact] [--block-size N] SRC DST
 * Flattens SRC (an FVD image with its whole base chain, or a raw file) into DST. Zero ranges are
 * skipped, so the output is sparse. DST must not exist (or --force).
 */
import fs from 'node:fs';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../fvd/node-file.js';
import { UsageError, parseOptions, parseSize } from '../args.js';
import { openDisk, parseFormat, type Disk } from '../disk.js';

const STEP = 1024 * 1024;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseOptions('convert', args, {
    f: { type: 'string', short: 'f' },
    O: { type: 'string', short: 'O', default: 'raw' },
    layout: { type: 'string', default: 'raw' },
    'block-size': { type: 'string' },
    force: { type: 'boolean', default: false },
  });
  if (positionals.length !== 2) throw new UsageError('usage: fvd convert [-f raw|fvd] [-O raw|fvd] [--layout raw|compact] [--block-size N] [--force] SRC DST');
  const [src, dst] = positionals as [string, string];
  const inFmt = parseFormat(values.f, 'source format');
  const outFmt = parseFormat(values.O, 'output format')!;
  if (values.layout !== 'raw' && values.layout !== 'compact') throw new UsageError(`invalid layout '${values.layout}': expected raw or compact`);
  if (!fs.existsSync(src)) throw new UsageError(`${src}: no such file`);
  if (fs.existsSync(dst) && !values.force) throw new UsageError(`${dst} already exists; use --force to overwrite it`);
  if (fs.existsSync(dst) && fs.realpathSync(dst) === fs.realpathSync(src)) throw new UsageError('source and destination are the same file');

  const source = await openDisk(src, inFmt, { readOnly: true });
  let target: Disk | null = null;
  try {
    if (outFmt === 'raw') {
      fs.writeFileSync(dst, '');
      fs.truncateSync(dst, source.size);
    } else {
      await FvdImage.create(nodeIo, dst, {
        size: source.size,
        layout: values.layout as 'raw' | 'compact',
        blockSize: values['block-size'] ? parseSize(values['block-size'], 'block size') : undefined,
      });
    }
    target = await openDisk(dst, outFmt, {});
    const buf = Buffer.alloc(STEP);
    for (const e of source.extents()) {
      if (e.kind === 'zero') continue;
      for (let pos = e.offset; pos < e.offset + e.length; pos += STEP) {
        const len = Math.min(STEP, e.offset + e.length - pos);
        const piece = buf.subarray(0, len);
        await source.read(piece, pos);
        if (isZero(piece)) continue; // keep the output sparse
        await target.write(piece, pos);
      }
    }
    await target.flush();
  } finally {
    await source.close();
    await target?.close();
  }
  return 0;
}

const ZERO = Buffer.alloc(STEP);
function isZero(b: Buffer): boolean {
  return b.compare(ZERO, 0, b.length) === 0;
}
