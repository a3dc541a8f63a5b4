/** The engine's public types: options of open, what a base image offers, extents and stats. */
import type { DeferredBaseReport } from './deferred-base.js';
import type { BaseFormat } from './format.js';
import type { Qcow2Details } from './qcow2.js';

export interface OpenOptions {
  readOnly?: boolean;
  /** Store base data read by the guest in the image (default on for read-write opens). */
  copyOnRead?: boolean;
  /** Upper bound of copy-on-read data in flight; beyond it reads just read the base. */
  maxCopyOnReadBytes?: number;
  /** Key material of an encrypted image (FORMAT.md §11); refused for an unencrypted one. */
  key?: Uint8Array;
  /**
   * Open an encrypted image without its key, for metadata only (info, map, check): every data
   * read or write then fails. Without this, an encrypted image needs `key`.
   */
  withoutKey?: boolean;
  /**
   * For `check`: open an image whose refcount table is damaged, with the refcounts recounted from
   * the snapshot tables (FORMAT.md §10.8; `snapshots.refcountDamage` says what was wrong).
   * Without this, such an image is refused as corrupt.
   */
  recountRefcounts?: boolean;
  /**
   * Read-write opens: the volatile pending log (fvd/pending-log.ts, FORMAT.md §14). A log left by
   * a crashed process of this boot for this file is applied after the journal replay and folded
   * into the image by the open's checkpoint; then a fresh log receives every queued record until
   * a clean close removes it. `record: false`: apply and remove a log left behind, keep no new one.
   */
  pendingLog?: { path: string; bootId: string; fileId: string; record?: boolean };
  /**
   * The recovery of a live device (and `fvd info`): a remote base that cannot be reached now is
   * opened on its first read instead (fvd/deferred-base.ts), and this hears of it ('unreachable'
   * with the error, later 'opened' or 'refused'). Without it an unreachable base fails the open.
   */
  deferUnreachableBase?: DeferredBaseReport;
}

/** A base image as the engine sees it: read-only bytes of a fixed size. */
export interface BaseImage {
  readonly size: number;
  read(buf: Uint8Array, offset: number): Promise<void>;
  /** True when the range is known to read as zeros without reading it (false: unknown). */
  knownZero(offset: number, length: number): Promise<boolean>;
  /**
   * Optional: the first extent [start, end) at or after `offset` that may hold data — every byte
   * from `offset` to start reads as zeros — or null when no byte from `offset` on does. Extents
   * need not be maximal and may include zeros, never miss data. Zero detection at create reads
   * only these (fvd/zero-scan.ts).
   */
  nextDataExtent?(offset: number): Promise<[start: number, end: number] | null>;
  close(): Promise<void>;
  describe(): BaseChainEntry[];
  /** The top file's identity (a remote source's size and validator), if it has one. */
  readonly identity?: string;
  /** Reads cross a network: create detects zero blocks only where known without reading. */
  readonly remote?: boolean;
  /**
   * A plain local raw file (the whole chain, not remote): its path, whose bytes at offset x are
   * the base's bytes at x. A served image's queue threads read it themselves (read-only).
   */
  readonly localRawPath?: string;
  /** Bytes of reads the base serves at once (BlockFile.inFlightBytes), where known. */
  readonly inFlightBytes?: number;
  /** BlockFile.fileId of every file of the chain as opened (this level first), where known. */
  fileIds(): string[];
}

export interface BaseChainEntry {
  path: string;
  format: BaseFormat;
  size: number;
  /** A qcow2 level's header facts (for `info --backing-chain`). */
  qcow2?: Qcow2Details;
}

export type ExtentKind = 'local' | 'base' | 'zero';
export interface Extent {
  offset: number;
  length: number;
  kind: ExtentKind;
}
/** An extent with the byte offset of its data in the image file (local extents only). */
export interface HostExtent extends Extent {
  host: number | null;
}

export interface ImageStats {
  path: string;
  layout: 'raw' | 'compact';
  virtualSize: number;
  blockSize: number;
  chunkSize: number;
  baseChain: BaseChainEntry[];
  baseSize: number;
  /** Bytes of the virtual disk served from this image (including known-zero local blocks). */
  bytesLocal: number;
  /** Bytes still read from the base. */
  bytesInBase: number;
  fullyLocal: boolean;
  zeroDetected: boolean;
  /** The data area's cipher, or null for an unencrypted image. */
  encryption: 'aes-256-xts' | null;
  /** The header's dirty flag as found at open (not cleanly closed). */
  wasDirty: boolean;
  journalSectorsReplayed: number;
  journal: {
    capacitySectors: number;
    usedSectors: number;
    commits: number;
    sectorsWritten: number;
    checkpoints: number;
    /** BITMAP_SET runs and TABLE_SET entries committed by this open (not by checkpoints). */
    bitmapRuns: number;
    tableEntries: number;
  };
  allocatedChunks: number;
  fileSize: number;
  /** Internal snapshots (compact layout; FORMAT.md §10). */
  snapshots: number;
}
