/**
 * Reference models for the engine tests.
 *
 *  - DiskModel: the plain truth image of the differential test (a Uint8Array of the virtual size).
 *  - CrashModel: per-sector histories of versions for the crash test; given a crash point it says
 *    which contents each sector may legitimately hold after recovery.
 *  - makeData / describeSector: write payloads whose sectors are stamped with (write id, sector) so a
 *    mismatch report can say where wrong data came from.
 *  - readWholeDisk: the virtual disk an image shows, read through the engine.
 */
import type { Rng } from './rng.js';
import type { IoBackend } from '../../fvd/io.js';
import { FvdImage } from '../../fvd/image.js';

export const SECTOR = 512;
const STAMP = 0x5ec7da7a;

export type DataStyle = 'random' | 'zero' | 'mixed' | 'fill';

/** A write payload. Sectors of 'random'/'mixed' data carry a stamp: u32 magic, u32 write id, u32 sector. */
export function makeData(rng: Rng, length: number, writeId: number, offset: number, style: DataStyle): Uint8Array {
  const buf = new Uint8Array(length);
  if (style === 'zero') return buf;
  if (style === 'fill') {
    buf.fill(1 + rng.int(255));
    return buf;
  }
  rng.fill(buf);
  const dv = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  for (let p = 0; p + SECTOR <= length; p += SECTOR) {
    if (style === 'mixed' && rng.chance(0.4)) {
      buf.fill(0, p, p + SECTOR);
      continue;
    }
    dv.setUint32(p, STAMP, true);
    dv.setUint32(p + 4, writeId >>> 0, true);
    dv.setUint32(p + 8, Math.floor((offset + p) / SECTOR) >>> 0, true);
  }
  return buf;
}

/** A short human description of a sector's content. */
export function describeSector(s: Uint8Array): string {
  let zero = true;
  for (let i = 0; i < s.length; i++) if (s[i] !== 0) { zero = false; break; }
  if (zero) return 'zeros';
  const dv = new DataView(s.buffer, s.byteOffset, s.byteLength);
  if (s.length >= 12 && dv.getUint32(0, true) === STAMP) {
    return `write#${dv.getUint32(4, true)} sector ${dv.getUint32(8, true)}`;
  }
  let same = true;
  for (let i = 1; i < s.length; i++) if (s[i] !== s[0]) { same = false; break; }
  if (same) return `fill 0x${s[0]!.toString(16)}`;
  return `bytes ${Buffer.from(s.subarray(0, 12)).toString('hex')}…`;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
}

/** The first differing 512-byte sector between expected and actual, described; undefined if equal. */
export function firstMismatch(expected: Uint8Array, actual: Uint8Array, offset: number): string | undefined {
  if (equalBytes(expected, actual)) return undefined;
  for (let p = 0; p < expected.length; p += SECTOR) {
    const e = expected.subarray(p, p + SECTOR);
    const a = actual.subarray(p, p + SECTOR);
    if (!equalBytes(e, a)) {
      let bad = 0;
      for (let q = 0; q < expected.length; q += SECTOR) {
        if (!equalBytes(expected.subarray(q, q + SECTOR), actual.subarray(q, q + SECTOR))) bad++;
      }
      let byte = 0;
      while (byte < e.length && e[byte] === a[byte]) byte++;
      return `first mismatch at byte ${offset + p + byte} (sector ${(offset + p) / SECTOR}): expected ${describeSector(e)}, got ${describeSector(a)}; ${bad} of ${expected.length / SECTOR} sectors differ`;
    }
  }
  return 'mismatch';
}

/** The truth image of the differential test. */
export class DiskModel {
  readonly data: Uint8Array;
  constructor(readonly size: number, initial?: Uint8Array) {
    this.data = new Uint8Array(size);
    if (initial) this.data.set(initial.subarray(0, Math.min(initial.length, size)));
  }
  write(buf: Uint8Array, offset: number): void {
    this.data.set(buf, offset);
  }
  zero(offset: number, length: number): void {
    this.data.fill(0, offset, offset + length);
  }
  /** undefined when `actual` equals the model at offset; otherwise a description. */
  compare(actual: Uint8Array, offset: number): string | undefined {
    return firstMismatch(this.data.subarray(offset, offset + actual.length), actual, offset);
  }
}

/** Version ids with a fixed meaning. */
export const V_INITIAL = -2;
export const V_ZERO = -1;

interface WriteRec {
  id: number;
  offset: number;
  length: number;
  /** undefined ⇒ zeros (discard / writeZeroes). */
  data?: Uint8Array;
  fua: boolean;
  submitSeq: number;
  submitTick: number;
  ackSeq?: number;
  ackTick?: number;
  what: string;
}

interface FlushRec {
  submitSeq: number;
  submitTick: number;
  ackSeq?: number;
  ackTick?: number;
}

/**
 * Crash-consistency model. Times are given twice: `seq` is the CrashIo sequence number at the moment
 * (so a crash point k "includes" an acknowledgement with seq ≤ k and may include a submission with
 * seq < k), and the model's own tick orders events in program order (a flush covers the writes
 * acknowledged before it was submitted).
 *
 * Callers must never have two writes to the same sector in flight at once.
 */
export class CrashModel {
  private tick = 0;
  private readonly writes: WriteRec[] = [];
  private readonly flushes: FlushRec[] = [];
  /** Per sector: ids of the writes that covered it, in order. */
  private readonly hist: number[][];
  readonly sectors: number;

  constructor(readonly size: number, private readonly initial: Uint8Array) {
    this.sectors = Math.ceil(size / SECTOR);
    this.hist = Array.from({ length: this.sectors }, () => []);
  }

  beginWrite(offset: number, length: number, data: Uint8Array | undefined, fua: boolean, seq: number, what: string): number {
    const id = this.writes.length;
    this.writes.push({ id, offset, length, data: data?.slice(), fua, submitSeq: seq, submitTick: this.tick++, what });
    for (let s = offset / SECTOR; s < (offset + length) / SECTOR; s++) this.hist[s]!.push(id);
    return id;
  }
  ackWrite(id: number, seq: number): void {
    const w = this.writes[id]!;
    w.ackSeq = seq;
    w.ackTick = this.tick++;
  }
  beginFlush(seq: number): number {
    this.flushes.push({ submitSeq: seq, submitTick: this.tick++ });
    return this.flushes.length - 1;
  }
  ackFlush(id: number, seq: number): void {
    const f = this.flushes[id]!;
    f.ackSeq = seq;
    f.ackTick = this.tick++;
  }

  /** Program tick before which every acknowledged write is durable at crash point k. */
  private flushHorizon(k: number): number {
    let h = -1;
    for (const f of this.flushes) if (f.ackSeq !== undefined && f.ackSeq <= k && f.submitTick > h) h = f.submitTick;
    return h;
  }

  private durable(w: WriteRec, k: number, horizon: number): boolean {
    if (w.ackTick === undefined || w.ackSeq === undefined) return false;
    if (w.fua && w.ackSeq <= k) return true;
    return w.ackTick < horizon;
  }

  private content(id: number, sector: number): Uint8Array {
    const off = sector * SECTOR;
    if (id === V_INITIAL) {
      const s = new Uint8Array(SECTOR);
      if (off < this.initial.length) s.set(this.initial.subarray(off, Math.min(off + SECTOR, this.initial.length)));
      return s;
    }
    const w = this.writes[id]!;
    if (!w.data) return new Uint8Array(SECTOR);
    return w.data.subarray(off - w.offset, off - w.offset + SECTOR);
  }

  private name(id: number): string {
    if (id === V_INITIAL) return 'initial';
    const w = this.writes[id]!;
    return `#${id}(${w.what} @${w.offset}+${w.length}${w.fua ? ' fua' : ''} submit ${w.submitSeq} ack ${w.ackSeq ?? '-'})`;
  }

  /** Ids allowed for `sector` after a crash at k, and the one that is required if nothing later was submitted. */
  allowed(sector: number, k: number, horizon = this.flushHorizon(k)): { ids: number[]; required: number } {
    const h = this.hist[sector]!;
    let r = -1;
    for (let i = h.length - 1; i >= 0; i--) {
      if (this.durable(this.writes[h[i]!]!, k, horizon)) { r = i; break; }
    }
    const ids = r < 0 ? [V_INITIAL] : [h[r]!];
    for (let i = r + 1; i < h.length; i++) {
      const w = this.writes[h[i]!]!;
      if (w.submitSeq < k) ids.push(w.id);
    }
    return { ids, required: ids[0]! };
  }

  /**
   * Checks the recovered disk content (`actual` read at `offset`, sector-aligned) against crash
   * point k. Returns one description per offending sector (at most `limit`).
   */
  check(actual: Uint8Array, offset: number, k: number, limit = 5): string[] {
    const horizon = this.flushHorizon(k);
    const problems: string[] = [];
    for (let p = 0; p < actual.length; p += SECTOR) {
      const sector = (offset + p) / SECTOR;
      const got = actual.subarray(p, p + SECTOR);
      const { ids } = this.allowed(sector, k, horizon);
      let ok = false;
      for (const id of ids) if (equalBytes(this.content(id, sector), got)) { ok = true; break; }
      if (ok) continue;
      // Explain: does it match some other (stale) version of this sector?
      let other = 'garbage (no version of this sector)';
      const all = [V_INITIAL, ...this.hist[sector]!];
      for (const id of all) {
        if (equalBytes(this.content(id, sector), got)) { other = `stale version ${this.name(id)}`; break; }
      }
      problems.push(
        `sector ${sector} (byte ${sector * SECTOR}): got ${describeSector(got)} = ${other}; allowed: ${ids.map((i) => this.name(i)).join(', ')}`,
      );
      if (problems.length >= limit) break;
    }
    return problems;
  }
}

/**
 * An FVD base image written through the engine: `extents` random extents (1..maxSectors sectors)
 * over a zero background, in either layout. Returns the base's content, for the model.
 */
export async function makeFvdBase(io: IoBackend, basePath: string, size: number, blockSize: number, rng: Rng, extents: number, maxSectors: number): Promise<Uint8Array> {
  await FvdImage.create(io, basePath, { size, blockSize, layout: rng.chance(0.5) ? 'compact' : 'raw' });
  const b = await FvdImage.open(io, basePath);
  const initial = new Uint8Array(size);
  for (let i = 0; i < extents; i++) {
    const off = rng.int(size / SECTOR) * SECTOR;
    const len = Math.min(size - off, rng.range(1, maxSectors) * SECTOR);
    const data = makeData(rng, len, 1_000_000 + i, off, 'random');
    initial.set(data, off);
    await b.write(data, off);
  }
  await b.close();
  return initial;
}

/** Reads an image's whole virtual disk through the engine (read-only: no copy-on-read side effects). */
export async function readWholeDisk(io: IoBackend, imagePath: string): Promise<Buffer> {
  const img = await FvdImage.open(io, imagePath, { readOnly: true });
  try {
    const buf = Buffer.alloc(img.size);
    await img.read(buf, 0);
    return buf;
  } finally {
    await img.close();
  }
}
