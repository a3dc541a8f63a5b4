/**
 * Where each byte of a disk comes from, in `qemu-img map --output=json`'s terms, so tools written
 * for qemu-img work on FVD images and raw files alike: entries `start, length, depth, present,
 * zero, data[, offset]`, depth 0 being the image itself, 1 its base, and so on.
 *
 * For each level of the chain:
 *  - an FVD image's local extents (fvd/image.ts hostExtents) are split at the holes of the image
 *    file (SEEK_DATA/SEEK_HOLE): written data is `data`, a hole (never written, or discarded)
 *    reads as zeros without taking space: `zero`, `present`, with its file `offset` (as qemu-img
 *    shows for holes of a raw file);
 *  - an unmapped chunk of a compact image reads as zeros from the image itself: `zero`, without
 *    an offset; `present` where the image stands in front of its base (a discarded block), absent
 *    (`present: false`) where no level provides anything (qemu-img's "unallocated");
 *  - extents still in the base are looked up in the base, one level deeper;
 *  - a raw file is split at its holes, `offset` = the virtual offset.
 * On a block device (an image on an LV) there are no holes: everything mapped is data.
 */
import fs from 'node:fs';
import nodePath from 'node:path';
import { FvdImage, type BaseChainEntry } from '../fvd/image.js';
import { blockDeviceSize } from '../storage/node-file.js';
import { storageIo } from '../storage/storage-io.js';
import { libc, SEEK_DATA, SEEK_HOLE } from '../ffi/libc.js';
import { Qcow2Image } from '../fvd/qcow2.js';
import { isUrl } from '../fvd/base-location.js';
import { refuseKeyFor, type DiskFormat } from './disk.js';

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  /** Byte offset in the file of that level (qemu-img omits it where nothing is stored). */
  offset?: number;
}

/** Data and hole pieces of [start, start+length) of an open file (all data where holes are unknown). */
export function dataSegments(fd: number, isRegular: boolean, start: number, length: number): Array<{ offset: number; length: number; data: boolean }> {
  const end = start + length;
  const c = isRegular ? libc() : null;
  if (!c || length === 0) return length ? [{ offset: start, length, data: true }] : [];
  const out: Array<{ offset: number; length: number; data: boolean }> = [];
  let pos = start;
  while (pos < end) {
    const data = c.lseek(fd, pos, SEEK_DATA);
    if (data < 0 || data >= end) {
      // ENXIO: no data at or after pos (a failure of another kind: say data, the safe answer)
      const unknown = data < 0 && c.errno() !== 6;
      out.push({ offset: pos, length: end - pos, data: unknown });
      break;
    }
    if (data > pos) out.push({ offset: pos, length: data - pos, data: false });
    let hole = c.lseek(fd, data, SEEK_HOLE);
    if (hole < 0 || hole > end) hole = end;
    out.push({ offset: data, length: hole - data, data: true });
    pos = hole;
  }
  return out;
}

function push(out: MapEntry[], e: MapEntry): void {
  const last = out[out.length - 1];
  if (
    last &&
    last.start + last.length === e.start &&
    last.depth === e.depth &&
    last.present === e.present &&
    last.zero === e.zero &&
    last.data === e.data &&
    (last.offset === undefined) === (e.offset === undefined) &&
    (e.offset === undefined || last.offset! + last.length === e.offset)
  )
    last.length += e.length;
  else out.push(e);
}

function openFd(path: string): { fd: number; regular: boolean } {
  const fd = fs.openSync(path, 'r');
  return { fd, regular: fs.fstatSync(fd).isFile() };
}

/** A raw file's map over [start, end): data and holes, offset = the virtual offset. */
function mapRaw(path: string, size: number, depth: number, start: number, end: number, out: MapEntry[]): void {
  const { fd, regular } = openFd(path);
  try {
    const inFile = Math.min(end, size);
    for (const s of dataSegments(fd, regular, start, Math.max(0, inFile - start)))
      push(out, { start: s.offset, length: s.length, depth, present: true, zero: !s.data, data: s.data, offset: s.offset });
    if (end > Math.max(start, inFile)) push(out, { start: Math.max(start, inFile), length: end - Math.max(start, inFile), depth, present: false, zero: true, data: false });
  } finally {
    fs.closeSync(fd);
  }
}

/** An FVD image's map over [start, end), descending into its base where the image has nothing. */
async function mapFvd(image: FvdImage, chain: BaseChainEntry[], depth: number, start: number, end: number, out: MapEntry[]): Promise<void> {
  const { baseBlocks } = image.inspect();
  const { blockSize, fullyLocal } = image.stats();
  const baseCovers = (pos: number) => !fullyLocal && Math.floor(pos / blockSize) < baseBlocks;
  const { fd, regular } = openFd(image.path);
  const below: Array<[number, number]> = [];
  try {
    for (const e of image.hostExtents()) {
      const a = Math.max(start, e.offset);
      const b = Math.min(end, e.offset + e.length);
      if (a >= b) continue;
      if (e.kind === 'base') {
        below.push([a, b]);
        push(out, { start: a, length: b - a, depth: -1, present: false, zero: false, data: false }); // placeholder
      } else if (e.kind === 'zero') {
        push(out, { start: a, length: b - a, depth, present: baseCovers(a), zero: true, data: false });
      } else {
        const host = e.host! + (a - e.offset);
        for (const s of dataSegments(fd, regular, host, b - a))
          push(out, { start: a + (s.offset - host), length: s.length, depth, present: true, zero: !s.data, data: s.data, offset: s.offset });
      }
    }
  } finally {
    fs.closeSync(fd);
  }
  if (!below.length) return;
  // Fill the placeholders from the base, one level deeper.
  const base = chain[0]!;
  const deeper: MapEntry[] = [];
  if (base.format === 'raw' && isUrl(base.path)) {
    // A remote raw base: nothing to ask about holes; everything it covers counts as its data.
    for (const [a, b] of below) push(deeper, { start: a, length: b - a, depth: depth + 1, present: true, zero: false, data: true });
  } else if (base.format === 'raw') {
    for (const [a, b] of below) mapRaw(base.path, base.size, depth + 1, a, b, deeper);
  } else if (base.format === 'qcow2') {
    for (const [a, b] of below) await mapQcow2(chain, depth + 1, a, b, deeper);
  } else {
    const img = await FvdImage.open(storageIo(), base.path, { readOnly: true, withoutKey: true });
    try {
      for (const [a, b] of below) await mapFvd(img, chain.slice(1), depth + 1, a, b, deeper);
    } finally {
      await img.close();
    }
  }
  const merged: MapEntry[] = [];
  let d = 0;
  for (const e of out) {
    if (e.depth !== -1) push(merged, e);
    else {
      const stop = e.start + e.length;
      while (d < deeper.length && deeper[d]!.start < stop) push(merged, deeper[d++]!);
    }
  }
  out.splice(0, out.length, ...merged);
}

/**
 * A qcow2 level's map over [start, end) (chain[0] is the qcow2 level, chain[1..] its backing
 * levels): clusters stored at this level are `data` (no offset: compressed clusters have no
 * plain file offset), zero clusters `zero`, and the rest is looked up in the backing file, one
 * level deeper (zeros, not present, past its end or without one).
 */
async function mapQcow2(chain: BaseChainEntry[], depth: number, start: number, end: number, out: MapEntry[]): Promise<void> {
  const level = chain[0]!;
  const img = await Qcow2Image.open(storageIo(), level.path);
  try {
    const len = Math.min(end, img.size) - start;
    const runs = len > 0 ? await img.allocation(start, len) : [];
    for (const r of runs) {
      if (r.kind === 'data') push(out, { start: r.offset, length: r.length, depth, present: true, zero: false, data: true });
      else if (r.kind === 'zero') push(out, { start: r.offset, length: r.length, depth, present: true, zero: true, data: false });
      else {
        const below = chain[1];
        const stop = Math.min(r.offset + r.length, below ? below.size : r.offset);
        if (below && stop > r.offset) {
          if (below.format === 'raw') mapRaw(below.path, below.size, depth + 1, r.offset, stop, out);
          else await mapQcow2(chain.slice(1), depth + 1, r.offset, stop, out);
        }
        const from = Math.max(r.offset, stop);
        if (r.offset + r.length > from) push(out, { start: from, length: r.offset + r.length - from, depth: depth + 1, present: false, zero: true, data: false });
      }
    }
    if (end > Math.max(start, img.size))
      push(out, { start: Math.max(start, img.size), length: end - Math.max(start, img.size), depth, present: false, zero: true, data: false });
  } finally {
    await img.close();
  }
}

/** The whole map of an open FVD image and its chain. */
export async function mapImage(image: FvdImage): Promise<MapEntry[]> {
  const out: MapEntry[] = [];
  await mapFvd(image, image.stats().baseChain, 0, 0, image.size, out);
  return out;
}

/** The whole map of a raw file, as `qemu-img map -f raw` gives it. */
export function mapRawFile(path: string): MapEntry[] {
  const st = fs.statSync(path);
  const out: MapEntry[] = [];
  if (st.isBlockDevice()) {
    const { fd } = openFd(path);
    try {
      const size = blockDeviceSize(fd, path);
      if (size) push(out, { start: 0, length: size, depth: 0, present: true, zero: false, data: true, offset: 0 });
    } finally {
      fs.closeSync(fd);
    }
    return out;
  }
  mapRaw(path, st.size, 0, 0, st.size, out);
  return out;
}

/** Space figures from a map: written data in this image, zeros it provides itself, the rest in its bases. */
export function spaceFigures(map: MapEntry[]): { bytesData: number; bytesZero: number; bytesInBase: number } {
  let bytesData = 0;
  let bytesZero = 0;
  let bytesInBase = 0;
  for (const e of map) {
    if (e.depth > 0) bytesInBase += e.length;
    else if (e.data) bytesData += e.length;
    else bytesZero += e.length;
  }
  return { bytesData, bytesZero, bytesInBase };
}

/** Counts the distinct units (blocks, clusters) that ranges, given in ascending order, touch. */
export class UnitCounter {
  count = 0;
  private last = -1;
  constructor(private readonly unit: number) {}

  add(offset: number, length: number): void {
    const first = Math.max(Math.floor(offset / this.unit), this.last + 1);
    const last = Math.floor((offset + length - 1) / this.unit);
    if (last >= first) this.count += last - first + 1;
    this.last = Math.max(this.last, last);
  }
}

/** A qcow2 file's map through its backing chain, and the chain (each level's header facts). */
export async function mapQcow2File(path: string): Promise<{ size: number; map: MapEntry[]; chain: BaseChainEntry[] }> {
  const img = await Qcow2Image.open(storageIo(), nodePath.resolve(path));
  let chain: BaseChainEntry[];
  try {
    chain = img.describe();
  } finally {
    await img.close();
  }
  const map: MapEntry[] = [];
  await mapQcow2(chain, 0, 0, img.size, map);
  return { size: img.size, map, chain };
}

/** The map of a file by its format (FVD: through its chain; raw: its holes), and its virtual size. */
export async function mapPath(path: string, format: DiskFormat, key?: Uint8Array): Promise<{ size: number; map: MapEntry[]; chain: string[] }> {
  if (format === 'raw') {
    const map = mapRawFile(path);
    return { size: map.reduce((n, e) => n + e.length, 0), map, chain: [path] };
  }
  if (format === 'qcow2') {
    if (key) throw refuseKeyFor(path, 'qcow2');
    const { size, map, chain } = await mapQcow2File(path);
    return { size, map, chain: chain.map((c) => c.path) };
  }
  const image = await FvdImage.open(storageIo(), path, key ? { readOnly: true, key } : { readOnly: true, withoutKey: true });
  try {
    return { size: image.size, map: await mapImage(image), chain: [path, ...image.stats().baseChain.map((b) => b.path)] };
  } finally {
    await image.close();
  }
}
