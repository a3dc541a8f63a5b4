/**
 * Precise damage to FVD image files, for bad-input tests. Everything works on the file at rest
 * (synchronously, with node:fs), so no engine code is involved in producing the damage.
 *
 * Header field offsets follow fvd/format.ts (docs/FORMAT.md); `rewriteField` writes one field and
 * recomputes the header CRC (crc32 of bytes 0..507 stored at 508), so only the targeted check can
 * trip. Journal sectors are built like the engine builds them (magic, crc32 of bytes 8..511,
 * sequence number), so a tampered sector is "valid" as far as the checksum goes.
 */
import fs from 'node:fs';
import { randomBytes } from 'node:crypto';
import {
  BASE_PATH_OFFSET,
  HEADER_SIZE,
  INCOMPAT_DIRTY,
  PAGE,
  SECTOR,
  crc,
  decodeHeader,
  encodeHeader,
  type Header,
} from '../../fvd/format.js';
import { JOURNAL_MAGIC, PendingRecords, SECTOR_HEADER, encodeRecords } from '../../fvd/journal.js';
import { decodeDirectory, decodeRefcounts, encodeDirectory, encodeRefcounts, type Directory } from '../../fvd/snapshot-format.js';

/** Offsets and widths of the header fields (bytes). */
export const FIELD = {
  magic: [0, 8],
  version: [8, 4],
  headerSize: [12, 4],
  incompatible: [16, 8],
  compatible: [24, 8],
  autoclear: [32, 8],
  virtualSize: [40, 8],
  blockSize: [48, 4],
  chunkSize: [52, 4],
  baseSize: [56, 8],
  basePathLength: [64, 2],
  baseFormat: [66, 1],
  basePathCrc: [68, 4],
  bitmapOffset: [72, 8],
  bitmapLength: [80, 8],
  tableOffset: [88, 8],
  tableLength: [96, 8],
  journalOffset: [104, 8],
  journalLength: [112, 8],
  journalStartSeq: [120, 8],
  refcountOffset: [128, 8],
  refcountLength: [136, 8],
  snapshotsOffset: [144, 8],
  snapshotsLength: [152, 8],
  dataOffset: [160, 8],
  revertSnapshotId: [168, 4],
  crc: [508, 4],
} as const;
export type FieldName = keyof typeof FIELD;
export const HEADER_CRC_OFFSET = 508;

function readAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    fs.readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

function writeAt(file: string, offset: number, bytes: Uint8Array): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

export function readBytes(file: string, offset: number, length: number): Buffer {
  return readAt(file, offset, length);
}

export function writeBytes(file: string, offset: number, bytes: Uint8Array): void {
  writeAt(file, offset, bytes);
}

/** XORs one byte of the file with `mask` (default: flip every bit). */
export function flipByte(file: string, offset: number, mask = 0xff): void {
  const b = readAt(file, offset, 1);
  b[0] = b[0]! ^ mask;
  writeAt(file, offset, b);
}

export function truncate(file: string, length: number): void {
  fs.truncateSync(file, length);
}

/** The raw 512-byte header sector. */
export function readHeaderSector(file: string): Buffer {
  return readAt(file, 0, HEADER_SIZE);
}

/** Decodes (and validates) the header of an intact image. */
export function readHeader(file: string): Header {
  return decodeHeader(file, readHeaderSector(file), fs.statSync(file).size);
}

/** Reads one header field as a bigint straight from disk (no validation). */
export function getField(file: string, name: FieldName): bigint {
  const [off, len] = FIELD[name];
  const b = readAt(file, off, len);
  switch (len) {
    case 1:
      return BigInt(b.readUInt8(0));
    case 2:
      return BigInt(b.readUInt16LE(0));
    case 4:
      return BigInt(b.readUInt32LE(0));
    default:
      return b.readBigUInt64LE(0);
  }
}

/** Recomputes the header CRC over bytes 0..507 and stores it at 508. */
export function fixHeaderCrc(file: string): void {
  const h = readHeaderSector(file);
  h.writeUInt32LE(crc(h.subarray(0, HEADER_CRC_OFFSET)), HEADER_CRC_OFFSET);
  writeAt(file, 0, h);
}

/**
 * Writes one header field at its offset; by default then recomputes the CRC so that the header
 * stays checksum-valid and only the field's own validation can refuse it.
 */
export function rewriteField(file: string, name: FieldName, value: number | bigint, options: { fixCrc?: boolean } = {}): void {
  const [off, len] = FIELD[name];
  const b = Buffer.alloc(len);
  const v = BigInt(value);
  switch (len) {
    case 1:
      b.writeUInt8(Number(v), 0);
      break;
    case 2:
      b.writeUInt16LE(Number(v), 0);
      break;
    case 4:
      b.writeUInt32LE(Number(v), 0);
      break;
    default:
      b.writeBigUInt64LE(BigInt.asUintN(64, v), 0);
  }
  writeAt(file, off, b);
  if (options.fixCrc !== false) fixHeaderCrc(file);
}

/** Decodes the (valid) header, lets `mutate` change it, re-encodes it with a fresh CRC. */
export function rewriteHeader(file: string, mutate: (h: Header) => void): void {
  const h = readHeader(file);
  mutate(h);
  writeAt(file, 0, encodeHeader(h));
}

/** Sets bits in a feature word (incompatible / compatible / autoclear), CRC recomputed. */
export function setFeatureBits(file: string, word: 'incompatible' | 'compatible' | 'autoclear', bits: bigint): void {
  rewriteField(file, word, getField(file, word) | bits);
}

export function setDirty(file: string): void {
  setFeatureBits(file, 'incompatible', INCOMPAT_DIRTY);
}

/**
 * Points the image at a different base: writes the path at byte 512, zero-pads the rest of the
 * first page, and updates basePathLength / basePathCrc (and the format and size if given).
 */
export function setBasePath(file: string, basePath: string, options: { format?: number; baseSize?: number } = {}): void {
  const bytes = Buffer.from(basePath, 'utf8');
  const area = Buffer.alloc(PAGE - BASE_PATH_OFFSET);
  bytes.copy(area);
  writeAt(file, BASE_PATH_OFFSET, area);
  rewriteField(file, 'basePathLength', bytes.length, { fixCrc: false });
  rewriteField(file, 'basePathCrc', crc(bytes), { fixCrc: false });
  if (options.format !== undefined) rewriteField(file, 'baseFormat', options.format, { fixCrc: false });
  if (options.baseSize !== undefined) rewriteField(file, 'baseSize', options.baseSize, { fixCrc: false });
  fixHeaderCrc(file);
}

/** Storage chunk id of virtual chunk `chunk` in a compact image's lookup table. */
export function getTableEntry(file: string, chunk: number): number {
  const off = Number(getField(file, 'tableOffset'));
  return readAt(file, off + chunk * 4, 4).readUInt32LE(0);
}

export function setTableEntry(file: string, chunk: number, id: number): void {
  const off = Number(getField(file, 'tableOffset'));
  if (!off) throw new Error(`${file} has no lookup table (not a compact image)`);
  const b = Buffer.alloc(4);
  b.writeUInt32LE(id >>> 0, 0);
  writeAt(file, off + chunk * 4, b);
}

/** Sets bitmap bits (blocks local) directly in the on-disk bitmap. */
export function setBitmapBit(file: string, block: number, value = true): void {
  const off = Number(getField(file, 'bitmapOffset'));
  if (!off) throw new Error(`${file} has no bitmap`);
  const b = readAt(file, off + (block >> 3), 1);
  b[0] = value ? b[0]! | (1 << (block & 7)) : b[0]! & ~(1 << (block & 7));
  writeAt(file, off + (block >> 3), b);
}

/** Builds one journal sector: magic, crc32(bytes 8..511) at 4, seq at 8, `body` from byte 16. */
export function journalSector(seq: number, body: Uint8Array): Buffer {
  if (body.length > SECTOR - SECTOR_HEADER) throw new Error('journal sector body too long');
  const s = Buffer.alloc(SECTOR);
  s.writeUInt32LE(JOURNAL_MAGIC, 0);
  s.writeBigUInt64LE(BigInt(seq), 8);
  Buffer.from(body).copy(s, SECTOR_HEADER);
  s.writeUInt32LE(crc(s.subarray(8)), 4);
  return s;
}

/** Byte offset of the journal slot that sequence number `seq` lands in (circular log). */
export function journalSlot(file: string, seq: number): number {
  const off = Number(getField(file, 'journalOffset'));
  const len = Number(getField(file, 'journalLength'));
  if (!len) throw new Error(`${file} has no journal`);
  return off + (seq % (len / SECTOR)) * SECTOR;
}

/**
 * Writes checksum-valid journal sectors at the log's start (header journalStartSeq) and sets the
 * dirty flag so that the next open replays them. `sectors` are bodies (records, from byte 16).
 */
export function injectJournal(file: string, bodies: Uint8Array[]): void {
  const start = Number(getField(file, 'journalStartSeq'));
  bodies.forEach((body, i) => writeAt(file, journalSlot(file, start + i), journalSector(start + i, body)));
  setDirty(file);
}

/** Like injectJournal but with records encoded by the engine's own encoder. */
export function injectRecords(file: string, build: (p: PendingRecords) => void): number {
  const p = new PendingRecords();
  build(p);
  const start = Number(getField(file, 'journalStartSeq'));
  const bytes = encodeRecords(p, start);
  for (let i = 0; i < bytes.length / SECTOR; i++) writeAt(file, journalSlot(file, start + i), bytes.subarray(i * SECTOR, (i + 1) * SECTOR));
  setDirty(file);
  return bytes.length / SECTOR;
}

/** A record body with an unknown record type (and some payload). */
export function unknownRecordBody(type = 7): Buffer {
  const b = Buffer.alloc(32);
  b.writeUInt16LE(type, 0);
  b.writeUInt32LE(0xdeadbeef, 4);
  return b;
}

/** Fills the whole journal region with random bytes (no sector will carry a valid checksum). */
export function scribbleJournal(file: string): void {
  const off = Number(getField(file, 'journalOffset'));
  const len = Number(getField(file, 'journalLength'));
  writeAt(file, off, randomBytes(len));
}

// ------------------------------------------------------------------------------------------------
// Internal snapshots (FORMAT.md §10): the structures are re-encoded with valid checksums, in place,
// so only the targeted consistency check can trip.

/** The snapshot directory of an image with snapshots. */
export function readDirectory(file: string): Directory {
  const h = readHeader(file);
  return decodeDirectory(file, readAt(file, h.snapshotsOffset, h.snapshotsLength), h, fs.statSync(file).size);
}

/** Lets `mutate` change the directory, then writes it back in place (it must still fit). */
export function rewriteDirectory(file: string, mutate: (d: Directory) => void): void {
  const h = readHeader(file);
  const d = readDirectory(file);
  mutate(d);
  const bytes = encodeDirectory(d);
  if (bytes.length > h.snapshotsLength) throw new Error('rewritten directory does not fit');
  const region = Buffer.alloc(h.snapshotsLength);
  Buffer.from(bytes).copy(region);
  // The checksum covers the whole region: recompute it over the zero padding too.
  region.writeUInt32LE(crc(region.subarray(8)), 4);
  writeAt(file, h.snapshotsOffset, region);
}

/** The refcount table of an image with snapshots (index = storage chunk id). */
export function readRefcounts(file: string): number[] {
  const h = readHeader(file);
  return [...decodeRefcounts(file, readAt(file, h.refcountOffset, h.refcountLength))];
}

/** Lets `mutate` change the counts (same number of entries), then writes the table back in place. */
export function rewriteRefcounts(file: string, mutate: (counts: number[]) => void): void {
  const h = readHeader(file);
  const counts = readRefcounts(file);
  mutate(counts);
  const bytes = encodeRefcounts(Uint16Array.from(counts), counts.length);
  if (bytes.length > h.refcountLength) throw new Error('rewritten refcount table does not fit');
  const region = Buffer.alloc(h.refcountLength);
  Buffer.from(bytes).copy(region);
  region.writeUInt32LE(crc(region.subarray(8)), 4);
  writeAt(file, h.refcountOffset, region);
}
