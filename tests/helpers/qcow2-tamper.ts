/**
 * Precise damage to qcow2 files made by qemu-img, for bad-input tests. Works on the file at rest
 * with node:fs and reads the structures itself (big-endian, QEMU's docs/interop/qcow2.txt), so
 * nothing of fvd's reader is involved in producing the damage.
 */
import fs from 'node:fs';
import { createHash } from 'node:crypto';

export function readU32(file: string, at: number): number {
  return read(file, at, 4).readUInt32BE(0);
}
export function readU64(file: string, at: number): bigint {
  return read(file, at, 8).readBigUInt64BE(0);
}
export function writeU32(file: string, at: number, v: number): void {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  write(file, at, b);
}
export function writeU64(file: string, at: number, v: bigint): void {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  write(file, at, b);
}

export function read(file: string, at: number, n: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(n);
    fs.readSync(fd, b, 0, n, at);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}
export function write(file: string, at: number, data: Uint8Array): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, data, 0, data.length, at);
  } finally {
    fs.closeSync(fd);
  }
}

export interface Layout {
  clusterSize: number;
  clusterBits: number;
  l1Offset: number;
  l1Size: number;
  entrySize: number;
}

export function layout(file: string): Layout {
  const clusterBits = readU32(file, 20);
  const incompat = readU32(file, 4) >= 3 ? readU64(file, 72) : 0n;
  return {
    clusterBits,
    clusterSize: 2 ** clusterBits,
    l1Size: readU32(file, 36),
    l1Offset: Number(readU64(file, 40)),
    entrySize: incompat & 16n ? 16 : 8,
  };
}

/** File offset of L1 entry `i`. */
export function l1EntryAt(file: string, i: number): number {
  return layout(file).l1Offset + 8 * i;
}

/** File offset of the L2 entry of the guest cluster holding `guest` (its L2 table must exist). */
export function l2EntryAt(file: string, guest: number): number {
  const l = layout(file);
  const perTable = l.clusterSize / l.entrySize;
  const vc = Math.floor(guest / l.clusterSize);
  const l2 = Number(readU64(file, l.l1Offset + 8 * Math.floor(vc / perTable)) & 0x00fffffffffffe00n);
  if (l2 === 0) throw new Error(`no L2 table for guest offset ${guest}`);
  return l2 + (vc % perTable) * l.entrySize;
}

/** Byte offset of a header extension's data (type as in qcow2.txt), or -1. */
export function extensionAt(file: string, type: number): { at: number; length: number } | null {
  const version = readU32(file, 4);
  let off = version >= 3 ? readU32(file, 100) : 72;
  const head = read(file, 0, layout(file).clusterSize);
  while (off + 8 <= head.length) {
    const t = head.readUInt32BE(off);
    const len = head.readUInt32BE(off + 4);
    if (t === 0) return null;
    if (t === type) return { at: off + 8, length: len };
    off += 8 + Math.ceil(len / 8) * 8;
  }
  return null;
}

export function sha256(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}
