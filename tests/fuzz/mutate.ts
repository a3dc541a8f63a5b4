/**
 * Structure-aware mutations of an FVD image file held in memory (docs/FORMAT.md): every operator
 * knows where a metadata structure lives (from the header's offsets) and keeps the checksums that
 * guard it valid where that is the point — a header field is rewritten with its CRC at byte 508
 * recomputed, a journal sector gets a valid magic, CRC and sequence number, a snapshot directory
 * or refcount table its region CRC — so the mutation reaches the validation behind the checksum
 * instead of being refused by it. A share of mutations leaves checksums stale on purpose.
 *
 * Everything here is pure: (generator, seed image) → mutated bytes and a one-line description.
 * The generator decides everything, so a (campaign seed, mutant index) pair replays exactly.
 */
import { crc } from '../../fvd/format.js';
import type { Rng } from '../helpers/rng.js';

const SECTOR = 512;
const PAGE = 4096;
const HEADER_CRC = 508;
const JOURNAL_MAGIC = 0x4a445646;
const DIRECTORY_MAGIC = 0x53445646;
const REFCOUNT_MAGIC = 0x52445646;
const EMPTY = 0xffffffff;

/** Header fields: [name, offset, width]. Everything but the magic and the CRC itself. */
export const HEADER_FIELDS: readonly [string, number, number][] = [
  ['version', 8, 4],
  ['header_size', 12, 4],
  ['incompatible', 16, 8],
  ['compatible', 24, 8],
  ['autoclear', 32, 8],
  ['virtual_size', 40, 8],
  ['block_size', 48, 4],
  ['chunk_size', 52, 4],
  ['base_size', 56, 8],
  ['base_path_length', 64, 2],
  ['base_format', 66, 1],
  ['reserved67', 67, 1],
  ['base_path_crc', 68, 4],
  ['bitmap_offset', 72, 8],
  ['bitmap_length', 80, 8],
  ['table_offset', 88, 8],
  ['table_length', 96, 8],
  ['journal_offset', 104, 8],
  ['journal_length', 112, 8],
  ['journal_start_seq', 120, 8],
  ['refcount_offset', 128, 8],
  ['refcount_length', 136, 8],
  ['snapshots_offset', 144, 8],
  ['snapshots_length', 152, 8],
  ['data_offset', 160, 8],
  ['revert_snapshot_id', 168, 4],
  ['reserved172', 172, 4],
  ['base_path_offset', 304, 4],
  ['base_size_next', 308, 8],
  ['reserved316', 316, 8],
];

/** Encryption fields (FORMAT.md §11.1): [name, offset, width]. */
const CRYPT_FIELDS: readonly [string, number, number][] = [
  ['crypt_method', 176, 1],
  ['kdf', 177, 1],
  ['kdf_log2_n', 178, 1],
  ['kdf_r', 179, 1],
  ['kdf_p', 180, 1],
  ['crypt_reserved181', 181, 3],
  ['kdf_salt', 184, 16],
  ['wrap_nonce', 200, 12],
  ['wrapped_key', 212, 64],
  ['wrap_tag', 276, 16],
  ['crypt_reserved292', 292, 12],
];

/** What the mutator knows about the seed: its header's regions, read without validation. */
export interface Layout {
  size: number;
  virtualSize: number;
  blockSize: number;
  chunkSize: number;
  dataOffset: number;
  incompatible: bigint;
  bitmap: [number, number];
  table: [number, number];
  journal: [number, number];
  journalStartSeq: number;
  refcount: [number, number];
  snapshots: [number, number];
  basePath: [number, number];
  /** Saved states of snapshots: [offset, length, directory entry offset]. */
  states: [number, number, number][];
}

export function readLayout(image: Uint8Array): Layout {
  // A truncated file reads as zeros past its end (a layout of nothing).
  const img = image.length >= PAGE ? image : Uint8Array.from({ length: PAGE }, (_, i) => image[i] ?? 0);
  const dv = new DataView(img.buffer, img.byteOffset, img.byteLength);
  const u64 = (o: number) => Number(dv.getBigUint64(o, true));
  const region = (o: number): [number, number] => [u64(o), u64(o + 8)];
  const l: Layout = {
    size: image.length,
    virtualSize: u64(40),
    blockSize: dv.getUint32(48, true),
    chunkSize: dv.getUint32(52, true),
    dataOffset: u64(160),
    incompatible: dv.getBigUint64(16, true),
    bitmap: region(72),
    table: region(88),
    journal: region(104),
    journalStartSeq: u64(120),
    refcount: region(128),
    snapshots: region(144),
    basePath: [dv.getUint32(304, true) || 512, dv.getUint16(64, true)],
    states: [],
  };
  const [so, sl] = l.snapshots;
  if (sl >= 32 && so + sl <= image.length && dv.getUint32(so, true) === DIRECTORY_MAGIC) {
    const count = dv.getUint32(so + 8, true);
    let pos = so + 32;
    for (let i = 0; i < count && pos + 64 <= so + sl; i++) {
      const nameLen = dv.getUint16(pos + 4, true);
      l.states.push([u64(pos + 8), u64(pos + 16), pos]);
      pos += 64 + Math.ceil(nameLen / 8) * 8;
    }
  }
  return l;
}

export interface Mutant {
  image: Uint8Array;
  /** The file is then extended (sparsely, with ftruncate) to this size, when larger. */
  extendTo: number;
  /** One line: the operator and what it changed. */
  what: string;
  /** Operator family, for the per-family counts. */
  family: string;
}

/** Values worth trying in a numeric field of `width` bytes, given the seed's layout: by class. */
function interesting(r: Rng, l: Layout, width: number, current: bigint): bigint {
  const max = width >= 8 ? (1n << 64n) - 1n : (1n << BigInt(width * 8)) - 1n;
  const n = BigInt;
  const classes: bigint[][] = [
    // the limits of 64-bit fields and of numbers JavaScript holds exactly
    [(1n << 53n) - 1n, 1n << 53n, (1n << 53n) + 1n, 1n << 63n, max, max - 1n, 1n << 50n, (1n << 50n) + 512n, 1n << 40n, 1n << 32n, (1n << 32n) - 1n, 1n << 31n],
    [0n, 1n],
    // around the file and its regions
    [n(l.size), n(l.size) - 512n, n(l.size) + 512n, n(l.size) + 4096n, n(l.dataOffset), n(l.dataOffset) - 4096n, n(l.dataOffset) + 4096n],
    [current + 1n, current - 1n, current + 512n, current - 4096n, current + 4096n, current * 2n, current / 2n],
    [n(l.bitmap[0]), n(l.bitmap[1]), n(l.table[0]), n(l.table[1]), n(l.journal[0]), n(l.journal[1]), n(l.virtualSize), n(l.blockSize), n(l.chunkSize), n(PAGE), n(SECTOR)],
    [BigInt.asUintN(64, BigInt(r.int(0x7fffffff)) * BigInt(r.int(0x7fffffff)))],
  ];
  const cls = classes[r.weighted([4, 2, 3, 3, 2, 1])]!;
  let v = cls[r.int(cls.length)]!;
  if (v < 0n) v = 0n;
  return v & max;
}

function writeUint(img: Uint8Array, off: number, width: number, v: bigint): void {
  for (let i = 0; i < width; i++) img[off + i] = Number((v >> BigInt(8 * i)) & 0xffn);
}
function readUint(img: Uint8Array, off: number, width: number): bigint {
  let v = 0n;
  for (let i = width - 1; i >= 0; i--) v = (v << 8n) | BigInt(img[off + i]!);
  return v;
}
export function fixHeaderCrc(img: Uint8Array): void {
  new DataView(img.buffer, img.byteOffset).setUint32(HEADER_CRC, crc(img.subarray(0, HEADER_CRC)), true);
}
/** Region CRC at +4 over bytes 8..end (snapshot directory, refcount table). */
function fixRegionCrc(img: Uint8Array, off: number, len: number): void {
  if (off + len > img.length || len < 8) return;
  new DataView(img.buffer, img.byteOffset).setUint32(off + 4, crc(img.subarray(off + 8, off + len)), true);
}
/** Storage chunks in the file's data area, and chunks of the virtual disk (at least 1, finite). */
function storageChunks(l: Layout): number {
  const v = Math.ceil((l.size - l.dataOffset) / l.chunkSize);
  return Number.isSafeInteger(v) && v > 0 ? v : 1;
}
function virtualChunks(l: Layout): number {
  const v = Math.ceil(l.virtualSize / l.chunkSize);
  return Number.isSafeInteger(v) && v > 0 ? Math.min(v, 1 << 24) : 1;
}
/** Sizes and regions an operator can do arithmetic with: safe integers, sector-sized units and lengths. */
export function reasonableLayout(l: Layout): boolean {
  const regions = [l.bitmap, l.table, l.journal, l.refcount, l.snapshots];
  const numbers = [l.virtualSize, l.dataOffset, l.journalStartSeq, ...regions.flat(), ...l.states.flatMap((s) => s.slice(0, 2))];
  return (
    numbers.every((v) => Number.isSafeInteger(v)) &&
    l.blockSize >= SECTOR && l.blockSize % SECTOR === 0 &&
    l.chunkSize >= SECTOR && l.chunkSize % SECTOR === 0 &&
    regions.every(([, len]) => len % SECTOR === 0)
  );
}
function inFile(l: Layout, [off, len]: [number, number]): boolean {
  return len > 0 && off >= 0 && off + len <= l.size;
}

type Op = (r: Rng, img: Uint8Array, l: Layout) => { what: string; image?: Uint8Array; extendTo?: number } | null;

/** A header field set to an interesting value; CRC recomputed (mostly). */
const headerField: Op = (r, img) => {
  const [name, off, width] = HEADER_FIELDS[r.int(HEADER_FIELDS.length)]!;
  const cur = readUint(img, off, width);
  const v = interesting(r, readLayout(img), width, cur);
  writeUint(img, off, width, v);
  const stale = r.chance(0.08);
  if (!stale) fixHeaderCrc(img);
  return { what: `header ${name} ${cur} -> ${v}${stale ? ' (CRC stale)' : ''}` };
};

/** A region of length 0 (absent) given an offset anyway: FORMAT.md §1 says its offset is 0. */
const absentRegion: Op = (r, img, l) => {
  const regions = [['bitmap', 72, l.bitmap], ['table', 88, l.table], ['journal', 104, l.journal], ['refcount', 128, l.refcount], ['snapshots', 144, l.snapshots]] as const;
  const absent = regions.filter(([, , reg]) => reg[1] === 0);
  if (!absent.length) return null;
  // Bitmap, table and journal have no feature bit that would refuse the offset first: favour them.
  const [name, off] = absent[r.weighted(absent.map(([n]) => (n === 'refcount' || n === 'snapshots' ? 1 : 4)))]!;
  const v = [1n << 53n, (1n << 53n) + 4096n, (1n << 53n) - 4096n, 1n << 62n, (1n << 64n) - 4096n, BigInt(l.size), BigInt(PAGE), BigInt(l.dataOffset), 1n << 40n][r.int(9)]!;
  writeUint(img, off, 8, v);
  fixHeaderCrc(img);
  return { what: `absent ${name} region (length 0) given offset ${v}` };
};

/** The journal's sequence number near the end of what it can count, or wrapped. */
const sequence: Op = (r, img) => {
  const v = [(1n << 53n) - 1n, (1n << 53n) - 2n, 1n << 53n, (1n << 53n) + 1n, (1n << 64n) - 1n, (1n << 63n) - 1n, 0n][r.int(7)]!;
  writeUint(img, 120, 8, v);
  if (r.chance(0.3)) img[16] |= 1; // DIRTY: replay from there
  fixHeaderCrc(img);
  return { what: `journal_start_seq -> ${v}${img[16]! & 1 ? ' (DIRTY)' : ''}` };
};

/** A metadata region made huge, with the file extended (sparsely) to cover it, DIRTY set. */
const hugeRegion: Op = (r, img, l) => {
  const regions = [['journal', 104, l.journal], ['bitmap', 72, l.bitmap], ['table', 88, l.table]] as const;
  const present = regions.filter(([, , reg]) => reg[1] > 0);
  if (!present.length) return null;
  const [name, off, reg] = present[r.int(present.length)]!;
  const len = [3 * 2 ** 30, 8 * 2 ** 30, 2 ** 30 + 4096, 2 ** 31, 2 ** 32][r.int(5)]!;
  writeUint(img, off + 8, 8, BigInt(len));
  const moveData = r.chance(0.5);
  if (moveData) writeUint(img, 160, 8, BigInt(Math.ceil((reg[0] + len) / l.chunkSize) * l.chunkSize));
  img[16] |= 1;
  fixHeaderCrc(img);
  return { what: `${name} length -> ${len}${moveData ? ' (data offset after it)' : ''}, file extended sparsely, DIRTY`, extendTo: reg[0] + len + l.chunkSize };
};

/** One feature bit flipped (known bits most of the time); CRC recomputed. */
const featureBit: Op = (r, img) => {
  const words = [['incompatible', 16], ['compatible', 24], ['autoclear', 32]] as const;
  const [name, off] = words[r.int(3)]!;
  const bit = r.chance(0.7) ? r.int(4) : r.int(64);
  img[off + (bit >> 3)] ^= 1 << (bit & 7);
  fixHeaderCrc(img);
  return { what: `feature ${name} bit ${bit} flipped` };
};

/** A region's offset or length moved onto another region, the file's end, an unaligned value… */
const regionGeometry: Op = (r, img, l) => {
  const regions = [['bitmap', 72], ['table', 88], ['journal', 104], ['refcount', 128], ['snapshots', 144]] as const;
  const [name, off] = regions[r.int(regions.length)]!;
  const field = r.chance(0.5) ? off : off + 8;
  const others = [l.bitmap[0], l.table[0], l.journal[0], l.refcount[0], l.snapshots[0], l.dataOffset, 0, PAGE, l.size, l.size - PAGE, l.size + PAGE];
  const cur = Number(readUint(img, field, 8));
  const choices = [...others, cur + 1, cur + SECTOR, cur - PAGE, cur + PAGE, cur * 2, 2 ** 40, 2 ** 53 + 8];
  const v = Math.max(0, choices[r.int(choices.length)]!);
  writeUint(img, field, 8, BigInt(v));
  fixHeaderCrc(img);
  return { what: `${name} ${field === off ? 'offset' : 'length'} ${cur} -> ${v}` };
};

function journalRecord(r: Rng, l: Layout): Uint8Array {
  const safe = (v: number) => (Number.isSafeInteger(v) && v >= 0 ? v : 1);
  const blocks = safe(Math.ceil(l.virtualSize / l.blockSize));
  const chunks = safe(Math.ceil(l.virtualSize / l.chunkSize));
  const storage = Math.max(1, safe(Math.ceil((l.size - l.dataOffset) / l.chunkSize)));
  const kind = r.weighted([4, 4, 1, 1]);
  if (kind === 0) {
    // BITMAP_SET: in range mostly, sometimes past the base blocks, count 0 or huge.
    const rec = new Uint8Array(16);
    const dv = new DataView(rec.buffer);
    dv.setUint16(0, 1, true);
    const first = r.chance(0.8) ? r.int(Math.max(1, blocks)) : [blocks, blocks + 1, 2 ** 32, 2 ** 52][r.int(4)]!;
    const count = r.chance(0.8) ? r.range(1, 8) : [0, 2 ** 31, 0xffffffff][r.int(3)]!;
    dv.setUint32(4, count >>> 0, true);
    dv.setBigUint64(8, BigInt(first), true);
    return rec;
  }
  if (kind === 1) {
    // TABLE_SET: ids inside the file, past it, duplicates, unmaps.
    const count = r.chance(0.9) ? r.range(1, 4) : 0;
    const rec = new Uint8Array(8 + 4 * Math.max(count, 1));
    const dv = new DataView(rec.buffer);
    dv.setUint16(0, 2, true);
    dv.setUint16(2, count, true);
    dv.setUint32(4, r.chance(0.85) ? r.int(Math.max(1, chunks)) : chunks + r.int(3), true);
    for (let i = 0; i < Math.max(count, 1); i++) {
      const id = [r.int(storage), r.int(storage), storage, storage + 1000, EMPTY, 0, 0xfffffffe][r.int(7)]!;
      dv.setUint32(8 + 4 * i, id >>> 0, true);
    }
    return rec;
  }
  if (kind === 2) {
    const rec = new Uint8Array(r.range(2, 40));
    r.fill(rec);
    new DataView(rec.buffer).setUint16(0, r.range(3, 0xffff), true); // unknown type
    return rec;
  }
  // A record that claims to run past the sector's end.
  const rec = new Uint8Array(8);
  const dv = new DataView(rec.buffer);
  dv.setUint16(0, 2, true);
  dv.setUint16(2, 200, true);
  return rec;
}

/** Journal sectors with a valid magic, CRC and sequence number, holding random records; DIRTY set. */
const journalSectors: Op = (r, img, l) => {
  const [jo, jl] = l.journal;
  if (!inFile(l, l.journal) || jl < 2 * SECTOR) return null;
  const n = jl / SECTOR;
  const count = r.range(1, Math.min(4, n));
  const parts: string[] = [];
  for (let i = 0; i < count; i++) {
    const seqShift = r.chance(0.85) ? 0 : r.range(1, 3);
    const seq = l.journalStartSeq + i + seqShift;
    const s = new Uint8Array(SECTOR);
    const dv = new DataView(s.buffer);
    dv.setUint32(0, JOURNAL_MAGIC, true);
    dv.setBigUint64(8, BigInt(seq), true);
    let pos = 16;
    for (let k = r.range(1, 5); k > 0; k--) {
      const rec = journalRecord(r, l);
      if (pos + rec.length > SECTOR) break;
      s.set(rec, pos);
      pos += rec.length;
      parts.push(`${dv.getUint16(pos - rec.length, true) === 1 ? 'bitmap' : 'rec'}`);
    }
    const staleCrc = r.chance(0.05);
    dv.setUint32(4, crc(s.subarray(8)) ^ (staleCrc ? 1 : 0), true);
    img.set(s, jo + (seq % n) * SECTOR);
  }
  if (r.chance(0.9)) {
    img[16] |= 1; // DIRTY: the next open replays
    fixHeaderCrc(img);
  }
  return { what: `journal: ${count} checksum-valid sectors at seq ${l.journalStartSeq} (${parts.join(',')})` };
};

/** Bits of the bitmap flipped, set or cleared (padding bits too). */
const bitmapBits: Op = (r, img, l) => {
  if (!inFile(l, l.bitmap)) return null;
  const [bo, bl] = l.bitmap;
  const mode = r.int(3);
  if (mode === 0) {
    const n = r.range(1, 16);
    for (let i = 0; i < n; i++) {
      const bit = r.int(bl * 8);
      img[bo + (bit >> 3)] ^= 1 << (bit & 7);
    }
    return { what: `bitmap: ${n} bits flipped` };
  }
  img.fill(mode === 1 ? 0xff : 0, bo, bo + bl);
  return { what: `bitmap: all ${mode === 1 ? 'set' : 'clear'}` };
};

/** Table entries set to ids inside and past the file, duplicates, metadata chunks, unmapped. */
const tableEntries: Op = (r, img, l) => {
  if (!inFile(l, l.table)) return null;
  const [to, tl] = l.table;
  const dv = new DataView(img.buffer, img.byteOffset);
  const entries = tl / 4;
  const storage = storageChunks(l);
  const n = r.range(1, 4);
  const parts: string[] = [];
  for (let i = 0; i < n; i++) {
    const e = r.chance(0.8) ? r.int(Math.min(entries, virtualChunks(l))) : r.int(entries);
    const other = dv.getUint32(to + 4 * r.int(entries), true);
    const meta = [l.refcount[0], l.snapshots[0], ...l.states.map((s) => s[0])].filter((o) => o >= l.dataOffset);
    const metaId = meta.length ? Math.floor((meta[r.int(meta.length)]! - l.dataOffset) / l.chunkSize) : 0;
    const id = [r.int(storage), storage, storage + 5, other, metaId, EMPTY, 0xfffffffe, 2 ** 31][r.int(8)]!;
    dv.setUint32(to + 4 * e, id >>> 0, true);
    parts.push(`${e}=${id === EMPTY ? 'empty' : id}`);
  }
  return { what: `table entries ${parts.join(' ')}` };
};

/** The refcount table: counts, entry count, magic — with its CRC recomputed (mostly). */
const refcounts: Op = (r, img, l) => {
  if (!inFile(l, l.refcount)) return null;
  const [ro, rl] = l.refcount;
  const dv = new DataView(img.buffer, img.byteOffset);
  const kind = r.int(4);
  let what: string;
  if (kind === 0) {
    const entries = dv.getUint32(ro + 8, true);
    const i = r.int(Math.max(1, Math.min(entries + 2, (rl - 16) / 2)));
    const v = [0, 1, 2, 0xffff, r.int(0x10000)][r.int(5)]!;
    if (ro + 16 + 2 * i + 2 <= ro + rl) dv.setUint16(ro + 16 + 2 * i, v, true);
    what = `refcount[${i}] = ${v}`;
  } else if (kind === 1) {
    const v = [0, 1, (rl - 16) / 2 + 1, 0xffffffff, 2 ** 20][r.int(5)]!;
    dv.setUint32(ro + 8, v >>> 0, true);
    what = `refcount entries = ${v}`;
  } else if (kind === 2) {
    dv.setUint32(ro + 12, r.range(1, 0xffff), true);
    what = 'refcount reserved field set';
  } else {
    dv.setUint32(ro, REFCOUNT_MAGIC ^ 0x100, true);
    what = 'refcount magic';
  }
  const stale = r.chance(0.1);
  if (!stale) fixRegionCrc(img, ro, rl);
  return { what: `${what}${stale ? ' (CRC stale)' : ''}` };
};

/** The snapshot directory: header and entry fields, CRC recomputed (mostly). */
const directory: Op = (r, img, l) => {
  if (!inFile(l, l.snapshots)) return null;
  const [so, sl] = l.snapshots;
  const dv = new DataView(img.buffer, img.byteOffset);
  const entryFields: [string, number, number][] = [
    ['id', 0, 4], ['name_length', 4, 2], ['reserved6', 6, 2], ['state_offset', 8, 8], ['state_length', 16, 8],
    ['virtual_size', 24, 8], ['date_nsec', 40, 4], ['state_crc', 44, 4], ['mapped_chunks', 48, 4], ['reserved52', 52, 4], ['name0', 64, 1],
  ];
  let what: string;
  if (l.states.length && r.chance(0.7)) {
    const [, , eo] = l.states[r.int(l.states.length)]!;
    const [name, off, width] = entryFields[r.int(entryFields.length)]!;
    const cur = readUint(img, eo + off, width);
    let v = interesting(r, l, width, cur);
    if (name === 'name0') v = BigInt([0, 0x20, 0x0a, 0x7f, 0xc3][r.int(5)]!);
    if (name === 'id' && l.states.length > 1 && r.chance(0.4)) v = readUint(img, l.states[0]![2], 4); // duplicate id
    writeUint(img, eo + off, width, v);
    what = `directory entry ${name} ${cur} -> ${v}`;
  } else {
    const fields: [string, number][] = [['count', 8], ['next_id', 12], ['reserved16', 16], ['magic', 0]];
    const [name, off] = fields[r.int(fields.length)]!;
    const cur = dv.getUint32(so + off, true);
    const v = name === 'magic' ? DIRECTORY_MAGIC ^ 1 : [0, 1, cur + 1, cur - 1, 65536, 0xffffffff][r.int(6)]! >>> 0;
    dv.setUint32(so + off, v, true);
    what = `directory ${name} ${cur} -> ${v}`;
  }
  const stale = r.chance(0.1);
  if (!stale) fixRegionCrc(img, so, sl);
  return { what: `${what}${stale ? ' (CRC stale)' : ''}` };
};

/** A snapshot's saved table or bitmap changed, its state_crc (and the directory CRC) recomputed. */
const savedState: Op = (r, img, l) => {
  if (!l.states.length || !inFile(l, l.snapshots)) return null;
  const [off, len, eo] = l.states[r.int(l.states.length)]!;
  if (!(len > 0 && off + len <= img.length)) return null;
  const dv = new DataView(img.buffer, img.byteOffset);
  const storage = storageChunks(l);
  const at = off + 4 * r.int(Math.max(1, Math.min(Math.floor(len / 4), virtualChunks(l))));
  const v = [r.int(storage), storage + 3, EMPTY, 0, Math.floor((l.snapshots[0] - l.dataOffset) / l.chunkSize)][r.int(5)]!;
  if (r.chance(0.7)) dv.setUint32(at, v >>> 0, true);
  else img[off + r.int(len)] ^= 1 << r.int(8);
  dv.setUint32(eo + 44, crc(img.subarray(off, off + len)), true);
  fixRegionCrc(img, l.snapshots[0], l.snapshots[1]);
  return { what: `saved state at ${off}: entry/bit changed, state CRC recomputed` };
};

/** The encryption fields (header 176..303), CRC recomputed. */
const cryptFields: Op = (r, img) => {
  const [name, off, width] = CRYPT_FIELDS[r.int(CRYPT_FIELDS.length)]!;
  if (width <= 8 && r.chance(0.6)) {
    const v = [0, 1, 2, 9, 10, 22, 23, 32, 33, 255][r.int(10)]!;
    img[off] = v;
    if (width > 1) img.fill(0, off + 1, off + width);
  } else {
    const i = off + r.int(width);
    img[i] ^= 1 << r.int(8);
    if (r.chance(0.3)) img.fill(0, off, off + width);
  }
  fixHeaderCrc(img);
  return { what: `encryption field ${name} changed` };
};

/** The base path: its bytes, length, offset or CRC. */
const basePath: Op = (r, img, l) => {
  const [po, pl] = l.basePath;
  const kind = r.int(4);
  if (kind === 0 && pl > 0 && po + pl <= PAGE) {
    img[po + r.int(pl)] = [0x2f, 0x2e, 0x00, 0x0a, 0x41][r.int(5)]!;
    if (r.chance(0.8)) new DataView(img.buffer, img.byteOffset).setUint32(68, crc(img.subarray(po, po + pl)), true);
    fixHeaderCrc(img);
    return { what: 'base path byte changed' };
  }
  if (kind === 1) {
    const v = [0, 1, pl + 1, 3584, 3585, 0xffff][r.int(6)]!;
    new DataView(img.buffer, img.byteOffset).setUint16(64, v, true);
    if (po + v <= img.length && r.chance(0.7)) new DataView(img.buffer, img.byteOffset).setUint32(68, crc(img.subarray(po, po + v)), true);
    fixHeaderCrc(img);
    return { what: `base path length ${pl} -> ${v}` };
  }
  if (kind === 2) {
    const v = [512, 1024, 513, 4096, 3584, 4095][r.int(6)]!;
    new DataView(img.buffer, img.byteOffset).setUint32(304, v, true);
    fixHeaderCrc(img);
    return { what: `base path offset -> ${v}` };
  }
  // A path of our choosing with a valid CRC: itself, the parent directory, a deep chain.
  const p = ['.', '..', '/', 'image.fvd', '../x/../base.raw', 'base.raw/', '/dev/zero', '/proc/self/fd/0'][r.int(8)]!;
  const bytes = Buffer.from(p);
  img.fill(0, 512, PAGE);
  img.set(bytes, 512);
  const dv = new DataView(img.buffer, img.byteOffset);
  dv.setUint16(64, bytes.length, true);
  dv.setUint32(68, crc(bytes), true);
  dv.setUint32(304, 0, true);
  if (img[66] === 0 && r.chance(0.5)) img[66] = 1;
  fixHeaderCrc(img);
  return { what: `base path -> '${p}'` };
};

/** The file cut short at an interesting point. */
const truncate: Op = (r, img, l) => {
  const points = [0, 1, SECTOR - 1, SECTOR, PAGE, l.bitmap[0], l.table[0], l.journal[0], l.journal[0] + SECTOR, l.dataOffset, l.dataOffset - 1, l.dataOffset + 1, l.size - 1, l.size - SECTOR, l.size - l.chunkSize, r.int(l.size)];
  const at = Math.max(0, Math.min(l.size - 1, points[r.int(points.length)]!));
  return { what: `truncated to ${at} of ${l.size}`, image: img.slice(0, at) };
};

/** Bytes appended: zeros or garbage, a sector to a chunk or more. */
const extend: Op = (r, img) => {
  const add = [1, SECTOR, PAGE, 65536, 1 << 20][r.int(5)]!;
  const out = new Uint8Array(img.length + add);
  out.set(img);
  const junk = r.chance(0.5);
  if (junk) r.fill(out.subarray(img.length));
  return { what: `extended by ${add} ${junk ? 'random' : 'zero'} bytes`, image: out };
};

/** A few random bytes anywhere in the metadata, no checksum fixed. */
const byteFlips: Op = (r, img, l) => {
  const end = Math.max(SECTOR, Math.min(l.dataOffset, img.length));
  const n = r.range(1, 8);
  for (let i = 0; i < n; i++) img[r.int(end)] ^= 1 << r.int(8);
  return { what: `${n} random bit flips in the metadata (checksums stale)` };
};

const OPS: [string, Op, number][] = [
  ['header', headerField, 14],
  ['absent-region', absentRegion, 4],
  ['sequence', sequence, 3],
  ['huge-region', hugeRegion, 3],
  ['feature', featureBit, 5],
  ['geometry', regionGeometry, 8],
  ['journal', journalSectors, 12],
  ['bitmap', bitmapBits, 6],
  ['table', tableEntries, 8],
  ['refcount', refcounts, 5],
  ['directory', directory, 6],
  ['saved-state', savedState, 4],
  ['crypt', cryptFields, 5],
  ['base-path', basePath, 5],
  ['truncate', truncate, 6],
  ['extend', extend, 3],
  ['flips', byteFlips, 3],
];

/** Structure families that apply to this seed (an operator whose structure is absent is skipped). */
function applicable(l: Layout, name: string): boolean {
  switch (name) {
    case 'journal':
      return l.journal[1] >= 2 * SECTOR && l.journal[0] + l.journal[1] <= l.size;
    case 'bitmap':
      return l.bitmap[1] > 0;
    case 'table':
      return l.table[1] > 0;
    case 'refcount':
      return l.refcount[1] > 0;
    case 'directory':
    case 'saved-state':
      return l.snapshots[1] > 0;
    case 'crypt':
      return (l.incompatible & 8n) !== 0n;
    case 'base-path':
      return l.basePath[1] > 0 || true;
    default:
      return true;
  }
}

/**
 * One mutant of `seed`: one operator, sometimes two or three stacked (`stack` forces the count).
 * Operators run only on a layout reasonableLayout accepts, so their counts from region lengths
 * (whole sectors) are whole numbers.
 */
export function mutate(r: Rng, seed: Uint8Array, stack?: number): Mutant {
  let img: Uint8Array = new Uint8Array(seed); // a copy (Buffer.prototype.slice would share the seed's memory)
  let extendTo = 0;
  const whats: string[] = [];
  const families: string[] = [];
  const operators = stack ?? (r.chance(0.8) ? 1 : r.range(2, 3));
  for (let k = 0; k < operators; k++) {
    const l = readLayout(img);
    // A stacked operator gets the layout the previous one left; the operators compute offsets and
    // counts from it, so stop stacking once it is no longer one they can reason about (the
    // header operator below still applies: it only needs the file's bytes).
    if (!reasonableLayout(l)) break;
    const ops = OPS.filter(([name]) => applicable(l, name));
    const [name, op] = ops[r.weighted(ops.map((o) => o[2]))]!;
    const res = op(r, img, l);
    if (!res) continue;
    whats.push(res.what);
    families.push(name);
    if (res.extendTo) {
      extendTo = res.extendTo;
      break; // the sparse tail must not be cut by a later truncation
    }
    if (res.image) {
      img = res.image;
      break; // a truncation or extension comes last: the structures above no longer line up
    }
  }
  if (!whats.length) {
    const res = headerField(r, img, readLayout(img))!;
    whats.push(res.what);
    families.push('header');
  }
  return { image: img, extendTo, what: whats.join('; '), family: families.join('+') };
}
