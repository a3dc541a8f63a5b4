/**
 * Guest requests on an encrypted image (FORMAT.md §11): the data area holds XTS ciphertext, tweak
 * = guest sector, and XTS works on whole 512-byte sectors only. This module is the part of the
 * request path that exists because of that: it refuses data I/O when the image was opened without
 * its key, turns requests that do not cover whole sectors into whole-sector ones (read around,
 * read-modify-write), and puts every write through the sector gate (fvd/sector-gate.ts). The
 * engine (fvd/image.ts) keeps the mapping and bitmap work; the cipher itself is in the data area
 * (fvd/data-area.ts).
 */
import { KeyError } from './crypto.js';
import { SECTOR, roundUp } from './format.js';
import { SectorGate } from './sector-gate.js';

/** The engine's request paths that the encrypted paths call back into. */
export interface SectorRequests {
  /** The engine's public read (whole sectors by the time it reaches the data area). */
  read(buf: Uint8Array, offset: number): Promise<void>;
  /** The engine's public write: range checks, then back through EncryptedRequests.write. */
  write(buf: Uint8Array, offset: number): Promise<void>;
  /** The engine's write path under the public checks (bitmap and mapping work, data write). */
  writeSectors(buf: Uint8Array, offset: number): Promise<void>;
  /** The engine's write-zeroes under the public checks. */
  zeroRange(offset: number, length: number): Promise<void>;
}

export class EncryptedRequests {
  /** Serializes read-modify-writes of partial sectors with other writes. */
  private readonly gate = new SectorGate();

  constructor(
    private readonly path: string,
    /** False when the image was opened withoutKey: data I/O is refused. */
    private readonly keyed: boolean,
    private readonly engine: SectorRequests,
  ) {}

  /**
   * Refuses data I/O on an encrypted image opened without its key. Returns true when the range
   * does not cover whole sectors (XTS works on whole sectors: the unaligned paths below).
   */
  check(op: string, offset: number, length: number): boolean {
    if (!this.keyed) throw new KeyError(`${this.path}: ${op} of an encrypted image opened without its key (give it with --key-file)`);
    return offset % SECTOR !== 0 || length % SECTOR !== 0;
  }

  /**
   * Every write of an encrypted image passes the sector gate (fvd/sector-gate.ts, which argues
   * the concurrency): whole-sector writes as plain writers, others as a read-modify-write of the
   * sectors they touch — the partial edge sectors are read (decrypted), the new bytes merged into
   * the plaintext, and the whole sectors encrypted and written, with no other write to them in
   * between. Each sector is then written whole, so a power cut leaves it old or new (§11.4).
   */
  async write(buf: Uint8Array, offset: number, unaligned: boolean): Promise<void> {
    const first = Math.floor(offset / SECTOR);
    const last = Math.floor((offset + buf.length - 1) / SECTOR);
    if (!unaligned) {
      if (!this.gate.tryEnter(first, last)) await this.gate.enter(first, last);
      try {
        await this.engine.writeSectors(buf, offset);
      } finally {
        this.gate.leave();
      }
      return;
    }
    await this.gate.lock(first, last);
    try {
      const start = first * SECTOR;
      const whole = new Uint8Array((last + 1) * SECTOR - start);
      const reads: Promise<void>[] = [];
      if (offset > start || (first === last && buf.length < SECTOR)) reads.push(this.engine.read(whole.subarray(0, SECTOR), start));
      if ((offset + buf.length) % SECTOR && last > first) reads.push(this.engine.read(whole.subarray(whole.length - SECTOR), last * SECTOR));
      await Promise.all(reads);
      whole.set(buf, offset - start);
      await this.engine.writeSectors(whole, start);
    } finally {
      this.gate.unlock(first, last);
    }
  }

  /** Write-zeroes (and discard): partial edge sectors are merged writes. */
  async zero(offset: number, length: number, unaligned: boolean): Promise<void> {
    const end = offset + length;
    if (unaligned) {
      const a = roundUp(offset, SECTOR);
      const z = Math.floor(end / SECTOR) * SECTOR;
      if (a >= z) return this.engine.write(new Uint8Array(length), offset);
      const parts: Promise<void>[] = [this.zero(a, z - a, false)];
      if (offset < a) parts.push(this.engine.write(new Uint8Array(a - offset), offset));
      if (z < end) parts.push(this.engine.write(new Uint8Array(end - z), z));
      await Promise.all(parts);
      return;
    }
    const first = offset / SECTOR;
    const last = end / SECTOR - 1;
    if (!this.gate.tryEnter(first, last)) await this.gate.enter(first, last);
    try {
      await this.engine.zeroRange(offset, length);
    } finally {
      this.gate.leave();
    }
  }

  /** A read that does not cover whole sectors: read the sectors around it and copy. */
  async readUnaligned(buf: Uint8Array, offset: number): Promise<void> {
    const start = Math.floor(offset / SECTOR) * SECTOR;
    const end = roundUp(offset + buf.length, SECTOR);
    const whole = new Uint8Array(end - start);
    await this.engine.read(whole, start);
    buf.set(whole.subarray(offset - start, offset - start + buf.length));
  }
}
