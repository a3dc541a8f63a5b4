/**
 * An image's data area: where the bytes of the virtual disk that are local live. Raw-like images
 * store guest byte X at data_offset + X; compact ones go through the lookup table
 * (fvd/compact-storage.ts). An encrypted image (FORMAT.md §11) holds XTS ciphertext there, tweak =
 * guest sector: reads decrypt in place, writes encrypt into a pooled buffer so the caller's
 * buffer stays plaintext. Callers pass whole sectors when encrypted (FvdImage's sector gate).
 */
import type { BlockFile } from './io.js';
import { SECTOR } from './format.js';
import { BufferPool, type XtsCipher } from './crypto.js';
import type { CompactStorage } from './compact-storage.js';

export class DataArea {
  private readonly cipherBufs = new BufferPool();

  constructor(
    private readonly file: BlockFile,
    private readonly dataOffset: number,
    /** The chunk mapping of a compact image; null for a raw-like one. */
    private readonly compact: CompactStorage | null,
    /** The data cipher of an encrypted image opened with its key, else null. */
    private readonly xts: XtsCipher | null,
  ) {}

  /** Reads local bytes of the virtual disk. */
  read(buf: Uint8Array, offset: number): Promise<void> {
    if (this.xts) return this.readEncrypted(buf, offset);
    if (!this.compact) return this.file.read(buf, this.dataOffset + offset);
    return this.compact.read(buf, offset);
  }

  /** Writes bytes of the virtual disk to this image's storage (allocating chunks if compact). */
  write(buf: Uint8Array, offset: number): Promise<void> {
    if (this.xts) return this.writeEncrypted(buf, offset);
    if (!this.compact) return this.file.write(buf, this.dataOffset + offset);
    return this.compact.write(buf, offset);
  }

  private async readEncrypted(buf: Uint8Array, offset: number): Promise<void> {
    if (!this.compact) await this.file.read(buf, this.dataOffset + offset);
    else await this.compact.read(buf, offset);
    this.xts!.decrypt(buf, offset / SECTOR);
  }

  private async writeEncrypted(buf: Uint8Array, offset: number): Promise<void> {
    const cipher = this.cipherBufs.acquire(buf.length);
    this.xts!.encrypt(buf, cipher, offset / SECTOR);
    if (!this.compact) await this.file.write(cipher, this.dataOffset + offset);
    else await this.compact.write(cipher, offset);
    // Only after success: a failed run may still have sibling writes reading the buffer.
    this.cipherBufs.release(cipher);
  }
}
