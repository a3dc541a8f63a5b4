/**
 * The on-disk structures of qcow2 that a reader needs (QEMU's docs/interop/qcow2.txt; facts
 * summarised in docs/FORMAT.md §13): the header (versions 2 and 3), its extensions, and what an
 * L1 or L2 entry means. Everything in qcow2 is big-endian. Read-only: nothing here ever writes.
 *
 * Refusals are deliberate and one line each: an image fvd cannot read exactly as QEMU would
 * (encrypted, unknown incompatible features, marked corrupt or dirty) is refused rather than read
 * approximately.
 */
import { FvdError } from './errors.js';

/** "QFI\xfb" */
export const QCOW2_MAGIC = 0x514649fb;
export const MIN_CLUSTER_BITS = 9; // 512-byte clusters
export const MAX_CLUSTER_BITS = 21; // 2 MiB: QEMU's implementation limit
export const MIN_EXTENDED_L2_CLUSTER_BITS = 14; // subclusters of at least 512 bytes
const V2_HEADER_LENGTH = 72;
const V3_MIN_HEADER_LENGTH = 104;
const COMPRESSION_TYPE_OFFSET = 104;
/** QEMU refuses larger L1 tables (QCOW_MAX_L1_SIZE); so do we, before allocating one. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
const MAX_BACKING_NAME = 1023;
/** Offsets must stay exact in a JS number; the engine's own limit on disk sizes. */
const MAX_QCOW2_SIZE = 2 ** 50;

// Incompatible feature bits.
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION_TYPE = 1n << 3n;
export const INCOMPAT_EXTENDED_L2 = 1n << 4n;
const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION_TYPE | INCOMPAT_EXTENDED_L2;
/** Autoclear bit 1: the external data file is also a valid raw image (QEMU keeps L2 valid too). */
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

// Header extension types.
const EXT_END = 0x00000000;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_NAMES = 0x6803f857;
const EXT_CRYPTO = 0x0537be77;
const EXT_DATA_FILE = 0x44415441;
const FEATURE_NAME_ENTRY = 48;

export type CompressionType = 'zlib' | 'zstd';

export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  /** Virtual disk size in bytes. */
  size: number;
  backingFileOffset: number;
  backingFileSize: number;
  l1Size: number;
  l1Offset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  headerLength: number;
  compression: CompressionType;
  extendedL2: boolean;
  /** The backing file name as stored (not resolved), or null. */
  backingFile: string | null;
  /** From the backing format extension; null when absent (QEMU would probe: fvd refuses). */
  backingFormat: string | null;
  /** External data file: true when the incompatible bit is set; its name (extension) or null. */
  hasDataFile: boolean;
  dataFile: string | null;
}

/** Geometry derived from the header: what one L2 entry and one L2 table cover. */
export interface Qcow2Geometry {
  clusterSize: number;
  /** Bytes per L2 entry: 8, or 16 with extended L2 entries. */
  l2EntrySize: number;
  /** Entries per L2 table (one cluster). */
  l2Entries: number;
  /** 32 with extended L2 entries, else 1. */
  subclusters: number;
  subclusterSize: number;
  /** Compressed cluster descriptor: bits below this hold the host offset, the rest (to 61) the extra sector count. */
  csizeShift: number;
  csizeMask: number;
}

/** A qcow2 file whose contents are damaged (as opposed to one that uses a feature fvd refuses). */
export class Qcow2CorruptionError extends FvdError {
  constructor(path: string, what: string) {
    super(`${path}: corrupt qcow2 image: ${what}`, 'EIO');
  }
}

export function corruptQcow2(path: string, what: string): FvdError {
  return new Qcow2CorruptionError(path, what);
}

function unsupported(path: string, what: string): FvdError {
  return new FvdError(`${path}: ${what}`, 'EINVAL');
}

export function isQcow2Magic(head: Uint8Array): boolean {
  return head.length >= 4 && new DataView(head.buffer, head.byteOffset, 4).getUint32(0) === QCOW2_MAGIC;
}

/** Bytes of the file the header parse needs at most: the first cluster (header, extensions, backing name). */
export const QCOW2_HEADER_READ = 1 << MAX_CLUSTER_BITS;

/**
 * Decodes and checks a qcow2 header. `first` holds the file's first bytes (at least its first
 * cluster, or the whole file if shorter); `fileSize` bounds every offset. Throws a one-line
 * FvdError naming `path` for anything fvd cannot read exactly.
 */
export function decodeQcow2Header(path: string, first: Uint8Array, fileSize: number): Qcow2Header {
  if (fileSize < V2_HEADER_LENGTH || first.length < V2_HEADER_LENGTH) throw corruptQcow2(path, `file of ${fileSize} bytes is too short for a qcow2 header`);
  const dv = new DataView(first.buffer, first.byteOffset, first.byteLength);
  if (dv.getUint32(0) !== QCOW2_MAGIC) throw corruptQcow2(path, 'bad magic (not a qcow2 image)');
  const version = dv.getUint32(4);
  if (version !== 2 && version !== 3) throw unsupported(path, `qcow2 version ${version} is not supported (versions 2 and 3 are)`);
  const u64 = (off: number, what: string): number => {
    const v = dv.getBigUint64(off);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corruptQcow2(path, `${what} ${v} out of range`);
    return Number(v);
  };
  const clusterBits = dv.getUint32(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS)
    throw corruptQcow2(path, `cluster_bits ${clusterBits} outside ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS} (512 bytes to 2 MiB)`);
  const clusterSize = 2 ** clusterBits;
  if (first.length < Math.min(clusterSize, fileSize)) throw new Error('decodeQcow2Header: the first cluster was not passed whole');

  let incompatible = 0n;
  let compatible = 0n;
  let autoclear = 0n;
  let headerLength = V2_HEADER_LENGTH;
  let refcountOrder = 4;
  if (version === 3) {
    incompatible = dv.getBigUint64(72);
    compatible = dv.getBigUint64(80);
    autoclear = dv.getBigUint64(88);
    refcountOrder = dv.getUint32(96);
    headerLength = dv.getUint32(100);
    if (headerLength < V3_MIN_HEADER_LENGTH || headerLength % 8 !== 0 || headerLength > Math.min(clusterSize, fileSize))
      throw corruptQcow2(path, `header_length ${headerLength} invalid (a multiple of 8, at least ${V3_MIN_HEADER_LENGTH}, within the first cluster)`);
    if (refcountOrder > 6) throw corruptQcow2(path, `refcount_order ${refcountOrder} above 6`);
  }

  const backingFileOffset = u64(8, 'backing_file_offset');
  const backingFileSize = dv.getUint32(16);
  const extEnd = backingFileOffset ? backingFileOffset : Math.min(clusterSize, fileSize);
  if (backingFileOffset) {
    if (backingFileSize === 0 || backingFileSize > MAX_BACKING_NAME)
      throw corruptQcow2(path, `backing file name length ${backingFileSize} outside 1..${MAX_BACKING_NAME}`);
    if (backingFileOffset < headerLength || backingFileOffset + backingFileSize > Math.min(clusterSize, fileSize))
      throw corruptQcow2(path, `backing file name at ${backingFileOffset}+${backingFileSize} is not inside the header cluster`);
  }
  const ext = readExtensions(path, first, headerLength, extEnd);

  // Features: an unknown incompatible bit means we cannot know how to read the image.
  const unknown = incompatible & ~INCOMPAT_KNOWN;
  if (unknown) {
    const bits: string[] = [];
    for (let b = 0n; b < 64n; b++)
      if (unknown & (1n << b)) bits.push(ext.featureNames.get(`0:${b}`) ? `'${ext.featureNames.get(`0:${b}`)}' (bit ${b})` : `bit ${b}`);
    throw unsupported(path, `qcow2 image uses incompatible features fvd does not know: ${bits.join(', ')}`);
  }
  const cryptMethod = dv.getUint32(32);
  if (cryptMethod !== 0) {
    const name = cryptMethod === 1 ? 'AES' : cryptMethod === 2 ? 'LUKS' : `method ${cryptMethod}`;
    throw unsupported(path, `qcow2 image is encrypted (${name}): encrypted qcow2 templates are not supported (decrypt it with qemu-img convert first)`);
  }
  if (ext.hasCrypto) throw corruptQcow2(path, 'encryption header extension present but crypt_method is 0');
  if (incompatible & INCOMPAT_CORRUPT) throw unsupported(path, `qcow2 image is marked corrupt: repair it with 'qemu-img check -r all' first`);
  if (incompatible & INCOMPAT_DIRTY)
    throw unsupported(path, `qcow2 image is marked dirty (lazy refcounts, not closed cleanly or still in use): run 'qemu-img check -r all' on it first`);

  let compression: CompressionType = 'zlib';
  const compressionType = headerLength > COMPRESSION_TYPE_OFFSET ? first[COMPRESSION_TYPE_OFFSET]! : 0;
  if (incompatible & INCOMPAT_COMPRESSION_TYPE) {
    if (compressionType === 1) compression = 'zstd';
    else if (compressionType === 0) throw corruptQcow2(path, 'compression type bit set but compression_type is 0');
    else throw unsupported(path, `qcow2 compression type ${compressionType} is not supported (zlib and zstd are)`);
  } else if (compressionType !== 0) {
    throw corruptQcow2(path, `compression_type ${compressionType} without the compression type bit`);
  }

  const extendedL2 = (incompatible & INCOMPAT_EXTENDED_L2) !== 0n;
  if (extendedL2 && clusterBits < MIN_EXTENDED_L2_CLUSTER_BITS)
    throw corruptQcow2(path, `extended L2 entries need clusters of at least ${2 ** MIN_EXTENDED_L2_CLUSTER_BITS} bytes (cluster_bits ${clusterBits})`);
  const hasDataFile = (incompatible & INCOMPAT_DATA_FILE) !== 0n;
  if (!hasDataFile && (autoclear & AUTOCLEAR_DATA_FILE_RAW)) throw corruptQcow2(path, 'raw external data bit set without an external data file');

  const size = u64(24, 'virtual size');
  if (size > MAX_QCOW2_SIZE) throw unsupported(path, `qcow2 virtual size ${size} is above fvd's limit of ${MAX_QCOW2_SIZE} bytes`);
  const l1Size = dv.getUint32(36);
  const l1Offset = u64(40, 'l1_table_offset');
  const l2Entries = clusterSize / (extendedL2 ? 16 : 8);
  const needed = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Size * 8 > MAX_L1_BYTES) throw corruptQcow2(path, `L1 table of ${l1Size} entries is larger than ${MAX_L1_BYTES} bytes`);
  if (l1Size < needed) throw corruptQcow2(path, `L1 table of ${l1Size} entries is too small for a ${size}-byte disk (needs ${needed})`);
  if (l1Size > 0) {
    if (l1Offset % clusterSize !== 0) throw corruptQcow2(path, `L1 table offset ${l1Offset} is not cluster-aligned`);
    if (l1Offset < clusterSize) throw corruptQcow2(path, `L1 table offset ${l1Offset} overlaps the header`);
    if (l1Offset + l1Size * 8 > fileSize) throw corruptQcow2(path, `L1 table at ${l1Offset}+${l1Size * 8} lies past the end of the file (${fileSize} bytes; truncated?)`);
  }

  let backingFile: string | null = null;
  if (backingFileOffset) {
    backingFile = Buffer.from(first.subarray(backingFileOffset, backingFileOffset + backingFileSize)).toString('utf8');
    if (hasDataFile && (autoclear & AUTOCLEAR_DATA_FILE_RAW)) throw corruptQcow2(path, 'a raw external data file cannot have a backing file');
  }

  return {
    version,
    clusterBits,
    clusterSize,
    size,
    backingFileOffset,
    backingFileSize,
    l1Size,
    l1Offset,
    incompatible,
    compatible,
    autoclear,
    headerLength,
    compression,
    extendedL2,
    backingFile,
    backingFormat: ext.backingFormat,
    hasDataFile,
    dataFile: ext.dataFile,
  };
}

interface Extensions {
  backingFormat: string | null;
  dataFile: string | null;
  hasCrypto: boolean;
  /** Feature names by "type:bit" (type 0 incompatible, 1 compatible, 2 autoclear). */
  featureNames: Map<string, string>;
}

/** Header extensions: from the end of the header up to the backing file name (or the cluster end). */
function readExtensions(path: string, first: Uint8Array, start: number, end: number): Extensions {
  const dv = new DataView(first.buffer, first.byteOffset, first.byteLength);
  const out: Extensions = { backingFormat: null, dataFile: null, hasCrypto: false, featureNames: new Map() };
  const text = (a: number, n: number) => Buffer.from(first.subarray(a, a + n)).toString('utf8');
  for (let off = start; off + 8 <= end; ) {
    const type = dv.getUint32(off);
    const len = dv.getUint32(off + 4);
    if (type === EXT_END) return out;
    const data = off + 8;
    if (data + len > end) throw corruptQcow2(path, `header extension 0x${type.toString(16)} of ${len} bytes runs past the header area`);
    switch (type) {
      case EXT_BACKING_FORMAT:
        out.backingFormat = text(data, len);
        break;
      case EXT_DATA_FILE:
        out.dataFile = text(data, len);
        break;
      case EXT_CRYPTO:
        out.hasCrypto = true;
        break;
      case EXT_FEATURE_NAMES:
        for (let e = data; e + FEATURE_NAME_ENTRY <= data + len; e += FEATURE_NAME_ENTRY) {
          const raw = first.subarray(e + 2, e + FEATURE_NAME_ENTRY);
          const nul = raw.indexOf(0);
          out.featureNames.set(`${first[e]}:${first[e + 1]}`, Buffer.from(nul < 0 ? raw : raw.subarray(0, nul)).toString('utf8'));
        }
        break;
      default: // bitmaps and unknown extensions: nothing a reader of the active data needs
        break;
    }
    off = data + Math.ceil(len / 8) * 8;
  }
  return out;
}

export function qcow2Geometry(h: Qcow2Header): Qcow2Geometry {
  const l2EntrySize = h.extendedL2 ? 16 : 8;
  const subclusters = h.extendedL2 ? 32 : 1;
  const csizeShift = 62 - (h.clusterBits - 8);
  return {
    clusterSize: h.clusterSize,
    l2EntrySize,
    l2Entries: h.clusterSize / l2EntrySize,
    subclusters,
    subclusterSize: h.clusterSize / subclusters,
    csizeShift,
    csizeMask: (1 << (h.clusterBits - 8)) - 1,
  };
}

// Entries are read as two 32-bit halves (hi = bits 32-63, lo = bits 0-31), so the per-request
// path needs no BigInt.
//
// L1 entry: bits 9-55 the L2 table offset (0: no L2 table, every cluster it covers unallocated);
// bit 63 "refcount is one" (meaningless to a reader); bits 0-8 and 56-62 reserved.
// L2 entry (the first 64 bits, also with extended L2): bit 63 "refcount is one", bit 62
// compressed, bits 0-61 the cluster descriptor. A standard descriptor has bit 0 "reads as
// zeros" (v3 without extended L2 only), bits 9-55 the host cluster offset, the rest reserved.
export const HI_COPIED = 0x80000000;
export const HI_COMPRESSED = 0x40000000;
export const L1_RESERVED_HI = 0x7f000000;
export const L1_RESERVED_LO = 0x1ff;
export const STANDARD_RESERVED_HI = 0x3f000000;
export const STANDARD_RESERVED_LO = 0x1fe;
export const LO_ZERO = 1;

/** Bits 9-55 of an entry: an L2 table or host cluster offset. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
}

/**
 * A compressed cluster descriptor (x = 62 - (cluster_bits - 8)): bits 0..x-1 the host byte offset
 * (not aligned), bits x..61 the number of 512-byte sectors beyond the one holding that offset.
 * The data may end anywhere in its last sector; the length returned covers every sector named.
 */
export function compressedExtent(hi: number, lo: number, g: Qcow2Geometry): { offset: number; length: number } {
  const shiftHi = g.csizeShift - 32; // 17 (2 MiB clusters) .. 29 (512-byte clusters)
  const d = hi & 0x3fffffff;
  const offset = (d & ((1 << shiftHi) - 1)) * 2 ** 32 + (lo >>> 0);
  const sectors = ((d >>> shiftHi) & g.csizeMask) + 1;
  return { offset, length: sectors * 512 - (offset % 512) };
}
