/**
 * The image file, offline: one image held with its exclusive lock and read at the metadata level,
 * shared by commit, rebase and resize (fvd/maintenance.ts describes the operations; docs/FORMAT.md
 * §12 is normative). Also here: each operation's refusals decided from the header alone (§12.6),
 * and the reads and zeroing of the image's own storage that the operations build on.
 */
import { holeAt, type BlockFile, type IoBackend } from '../io.js';
import { FvdError } from '../errors.js';
import {
  AUTOCLEAR_FULLY_LOCAL,
  AUTOCLEAR_KNOWN,
  BASE_QCOW2,
  INCOMPAT_COMPACT,
  INCOMPAT_DIRTY,
  INCOMPAT_ENCRYPTED,
  INCOMPAT_SNAPSHOTS,
  SECTOR,
  decodeHeader,
  encodeHeader,
  type Header,
} from '../format.js';
import { FvdImage, type OpenOptions } from '../image.js';
import { STORED, mapRun, newRun, storageLayout, type MappingLayout } from '../mapping.js';
import { coverMappedChunks, readBaseReference, readHeaderPage, readMaps, tableRegionOf, unlockKey, writeCheckpoint } from '../metadata.js';
import { resolveBasePath } from '../base-location.js';
import { KeyError, type XtsCipher } from '../crypto.js';

/**
 * Incompatible features these operations know how to carry over (others: refuse, FORMAT.md
 * §12.6). ENCRYPTED needs nothing but its header bytes 176..303 carried across every header
 * write (they are part of `Header`): the XTS tweak is the guest sector, so data never has to be
 * re-encrypted when metadata moves.
 */
const MAINTENANCE_INCOMPAT = INCOMPAT_DIRTY | INCOMPAT_COMPACT | INCOMPAT_ENCRYPTED;

/** The op name under which commit opens an FVD base for writing (its refusals name it as a base). */
export const COMMIT_BASE = 'commit-base';

/** Why each operation refuses internal snapshots (FORMAT.md §12.6): one line each. */
const SNAPSHOT_REFUSAL: Record<string, string> = {
  commit:
    'its snapshots read every block they do not hold through the base, so writing into the base would change what each snapshot holds; delete the snapshots first (fvd snapshot -d NAME)',
  rebase:
    'its snapshots read every block they do not hold through the base, so switching the base would change what each snapshot holds; delete the snapshots first (fvd snapshot -d NAME)',
  resize:
    'a snapshot can only be applied to a disk of the size it was taken at, its saved state is laid out for the current bitmap, and shrinking would free storage snapshots use; delete the snapshots first (fvd snapshot -d NAME)',
  [COMMIT_BASE]: 'writing into a base with snapshots is not supported; delete its snapshots first (fvd snapshot -d NAME)',
};

/**
 * One image file held with its exclusive lock, read at the metadata level: header, base path,
 * in-place bitmap and lookup table. After `ensureClean()` the on-disk metadata is authoritative
 * (journal replayed and checkpointed, DIRTY clear), which every metadata switch requires.
 */
export class OfflineImage {
  header!: Header;
  basePath = '';
  /** The remote base's identity stored after the path (FORMAT.md §2.2), '' when none. */
  baseIdentity = '';
  /** The whole bitmap region (bitmap_length bytes). */
  bitmap!: Uint8Array;
  /**
   * One entry per chunk (ceil(virtual_size / chunk_size)), or null in raw-like layout; its
   * `buffer` is the whole table region (table_length bytes), padding included.
   */
  table: Uint32Array | null = null;
  private dirty = false;
  private replayedNextSeq = 0;
  /** ENCRYPTED: the data cipher, when the key was given (null: metadata-only work). */
  private xts: XtsCipher | null = null;

  private constructor(
    readonly path: string,
    readonly file: BlockFile,
    private readonly op: string,
    /** Key material for the engine opened by withEngine (it unlocks the image again). */
    private readonly key: Uint8Array | undefined,
  ) {}

  /**
   * Opens the image with its exclusive lock. `key`: its key material, checked here, after the
   * header and before anything else is read or written (as the engine does, FORMAT.md §11.2):
   * a wrong key, or a key for an unencrypted image, is refused with nothing changed. Without
   * it an encrypted image is opened for metadata work only (requireKey guards data access).
   */
  static async open(io: IoBackend, imagePath: string, op: string, key?: Uint8Array): Promise<OfflineImage> {
    const file = await io.open(imagePath, { lock: 'exclusive' });
    const img = new OfflineImage(imagePath, file, op, key);
    try {
      const page = await readHeaderPage(imagePath, file);
      img.checkHeader(page.header);
      // Without the key an encrypted image is opened for metadata work only (requireKey).
      img.xts = await unlockKey(imagePath, page.header, key ? { key } : { withoutKey: true });
      await img.load(page);
      return img;
    } catch (err) {
      img.xts?.destroy();
      await file.close();
      throw err;
    }
  }

  get encrypted(): boolean {
    return (this.header.incompatible & INCOMPAT_ENCRYPTED) !== 0n;
  }

  /** Throws the one-line KeyError when `what` needs the data of an image opened without its key. */
  requireKey(what: string): void {
    if (this.encrypted && !this.xts)
      throw new KeyError(`${this.path}: the image is encrypted: ${what} needs its key (--key-file PATH, or --key-file - for stdin)`);
  }

  /** This operation's refusals, decided from the header alone before anything is written (§12.6). */
  private checkHeader(h: Header): void {
    const op = this.op === COMMIT_BASE ? 'commit' : this.op;
    // Bases of other formats are read, never written (FORMAT.md §12.6, §13).
    if (this.op === 'commit' && h.baseFormat === BASE_QCOW2)
      throw new FvdError(`${this.path}: commit refuses an image over a qcow2 base: fvd reads qcow2 bases but never writes them (flatten with 'fvd convert' instead)`, 'EINVAL');
    if (h.incompatible & INCOMPAT_SNAPSHOTS)
      throw new FvdError(`${this.path}: ${op} refuses ${this.op === COMMIT_BASE ? 'a base' : 'an image'} with internal snapshots: ${SNAPSHOT_REFUSAL[this.op] ?? 'not supported'}`, 'EINVAL');
    const extra = h.incompatible & ~MAINTENANCE_INCOMPAT;
    if (extra) throw new FvdError(`${this.path}: ${op} does not support images with incompatible feature bits 0x${extra.toString(16)}`, 'EINVAL');
  }

  get compact(): boolean {
    return (this.header.incompatible & INCOMPAT_COMPACT) !== 0n;
  }

  get fullyLocal(): boolean {
    return (this.header.autoclear & AUTOCLEAR_FULLY_LOCAL) !== 0n;
  }

  /** Blocks with a meaningful bit under the current header. */
  get baseBlocks(): number {
    return baseBlocksOf(this.header);
  }

  /**
   * Reads (again) the on-disk state through the engine's loader (fvd/metadata.ts); a dirty
   * image's journal is replayed in memory only. `page`: the first page, when just read.
   */
  async load(page?: { first: Uint8Array; header: Header }): Promise<void> {
    const { first, header: h } = page ?? (await readHeaderPage(this.path, this.file));
    this.checkHeader(h);
    h.autoclear &= AUTOCLEAR_KNOWN; // a writer clears the autoclear bits it does not know
    const ref = readBaseReference(this.path, first, h);
    const maps = await readMaps(this.path, this.file, h);
    this.header = h;
    this.basePath = ref?.path ?? '';
    this.baseIdentity = ref?.identity ?? '';
    this.bitmap = maps.bitmap;
    this.table = maps.table;
    this.dirty = maps.dirty;
    this.replayedNextSeq = maps.nextSeq;
  }

  /**
   * Makes the on-disk metadata authoritative: if the image was not closed cleanly, extends the
   * file over chunks mapped past its end (FORMAT.md §4.3), then writes the replayed table and
   * bitmap in place and a clean header that empties the journal — the engine's recovery and
   * checkpoint (fvd/metadata.ts), with DIRTY cleared in the same header write.
   */
  async ensureClean(): Promise<void> {
    if (!this.dirty) return;
    const h = this.header;
    await coverMappedChunks(this.file, h, this.table);
    const snapshot = { table: this.table ? tableRegionOf(h, this.table) : null, bitmap: h.bitmapLength ? this.bitmap : null };
    await writeCheckpoint(this.file, h, snapshot, () =>
      this.writeHeader({ ...h, journalStartSeq: this.replayedNextSeq, incompatible: h.incompatible & ~INCOMPAT_DIRTY }),
    );
    this.dirty = false;
  }

  async writeHeader(h: Header): Promise<void> {
    selfCheck(this.path, h, this.file.size());
    await this.file.write(encodeHeader(h), 0);
    await this.file.flush();
    this.header = h;
  }

  /**
   * Reads bytes of the virtual disk from this image's own storage (never from the base), as
   * plaintext: an encrypted image's sectors are decrypted (whole sectors only; the tweak is the
   * guest sector, wherever the storage lies).
   */
  async readLocal(buf: Uint8Array, offset: number): Promise<void> {
    if (this.encrypted) {
      this.requireKey(`reading its data for ${this.op}`);
      await this.readStored(buf, offset);
      this.xts!.decrypt(buf, offset / SECTOR);
      return;
    }
    return this.readStored(buf, offset);
  }

  /** This image's own storage as the mapping rule sees it (fvd/mapping.ts): every block local. */
  private storageMap(): MappingLayout {
    const h = this.header;
    return storageLayout(h.dataOffset, h.blockSize, h.chunkSize, this.table);
  }

  /** The stored bytes (ciphertext for an encrypted image) of [offset, offset + buf.length). */
  private async readStored(buf: Uint8Array, offset: number): Promise<void> {
    const layout = this.storageMap();
    const run = newRun();
    const end = offset + buf.length;
    for (let pos = offset; pos < end; pos += run.length) {
      mapRun(layout, pos, end - pos, run);
      const sub = buf.subarray(pos - offset, pos - offset + run.length);
      if (run.kind === STORED) await this.file.read(sub, run.host);
      else sub.fill(0);
    }
  }

  /** This image's own storage for [offset, offset + length) is known to read zeros (unmapped, holes). */
  localKnownZero(offset: number, length: number): boolean {
    const layout = this.storageMap();
    const run = newRun();
    const end = offset + length;
    for (let pos = offset; pos < end; pos += run.length) {
      mapRun(layout, pos, end - pos, run);
      if (run.kind === STORED && !holeAt(this.file, run.host, run.host + run.length)) return false;
    }
    return true;
  }

  /** Makes this image's storage for [offset, offset + length) read as zeros (bits untouched). */
  async zeroLocal(offset: number, length: number): Promise<void> {
    const layout = this.storageMap();
    const run = newRun();
    const end = offset + length;
    for (let pos = offset; pos < end; pos += run.length) {
      mapRun(layout, pos, end - pos, run);
      if (run.kind === STORED) await this.file.zeroRange(run.host, run.length);
    }
  }

  /**
   * Runs `fn` on the engine opened over this same file descriptor (the lock stays held), then
   * closes the engine cleanly (checkpoint) and reloads the on-disk state.
   */
  async withEngine<T>(io: IoBackend, fn: (image: FvdImage) => Promise<T>, readOnly = false): Promise<T> {
    // An encrypted image's engine gets the key (and unlocks it again), or serves metadata only.
    const keyed: OpenOptions = this.encrypted ? (this.key ? { key: this.key } : { withoutKey: true }) : {};
    const image = await FvdImage.fromParts(io, this.path, borrowed(this.file), { copyOnRead: false, readOnly, ...keyed }, []);
    let result: T;
    try {
      result = await fn(image);
    } finally {
      await image.close();
    }
    await this.load();
    return result;
  }

  close(): Promise<void> {
    this.xts?.destroy(); // the key leaves memory with the image (FORMAT.md §11.2)
    return this.file.close();
  }
}

/** A BlockFile that shares `file` and leaves closing it to its owner. */
function borrowed(file: BlockFile): BlockFile {
  return {
    read: (b, o) => file.read(b, o),
    write: (b, o) => file.write(b, o),
    flush: () => file.flush(),
    zeroRange: (o, l) => file.zeroRange(o, l),
    size: () => file.size(),
    truncate: (l) => file.truncate(l),
    close: async () => {},
    isBlockDevice: file.isBlockDevice,
    readOnly: file.readOnly,
    path: file.path,
  };
}

export function baseBlocksOf(h: Header): number {
  return Math.ceil(Math.min(h.baseSize, h.virtualSize) / h.blockSize);
}

/** A header this module is about to write must pass the reader's own checks (else: a bug). */
function selfCheck(imagePath: string, h: Header, fileSize: number): void {
  try {
    decodeHeader(imagePath, encodeHeader(h), fileSize);
  } catch (err) {
    throw new Error(`internal error: about to write an invalid header: ${(err as Error).message}`);
  }
}

export function resolveFrom(imagePath: string, basePath: string): string {
  return resolveBasePath(imagePath, basePath);
}
