/**
 * The engine's only view of storage: a small async interface over one file or block device.
 *
 * The engine defines these interfaces and never imports an implementation: callers pass an
 * IoBackend in. The implementations live in storage/ (node:fs with koffi helpers: node-file.ts;
 * io_uring for the benchmark: uring-file.ts; remote bases: storage-io.ts), so the engine itself
 * needs no native code. Tests use in-memory backends and wrap them to record, reorder or drop writes
 * (crash simulation).
 * Semantics follow pread/pwrite/fdatasync exactly:
 *  - `read` fills `buf` from `offset`; bytes past the end of the file read as zeros.
 *  - `write` is complete when its promise resolves, but durable only after a later `flush`.
 *  - `flush` makes every write that completed before the call durable (fdatasync).
 *  - `zeroRange` makes a range read back as zeros, freeing space where it can (hole punch on a
 *    regular file); like a write it is durable only after `flush`.
 */
export interface BlockFile {
  read(buf: Uint8Array, offset: number): Promise<void>;
  write(buf: Uint8Array, offset: number): Promise<void>;
  flush(): Promise<void>;
  zeroRange(offset: number, length: number): Promise<void>;
  /** Current size in bytes (for a block device: its capacity). */
  size(): number;
  /** Optional: re-reads the size (a block device that was grown, e.g. by lvextend); returns it. */
  refreshSize?(): Promise<number>;
  /** Grow or shrink a regular file; a block device refuses. */
  truncate(length: number): Promise<void>;
  /**
   * Optional (SEEK_DATA): the first offset at or after `offset` that may hold data — every byte
   * before it reads as zeros — or size() when none does; null when the file cannot tell.
   * Conservative: it may report data where there are zeros, never the reverse.
   */
  nextData?(offset: number): number | null;
  /**
   * Optional (SEEK_HOLE): the first offset at or after `offset` where a hole starts — bytes from
   * there to the next `nextData` read as zeros — or size() when there is none; null when the file
   * cannot tell. Conservative: it may report a hole later than it starts, never earlier.
   */
  nextHole?(offset: number): number | null;
  close(): Promise<void>;
  /**
   * Optional, remote sources only: what identifies this content — its size and, over HTTP, the
   * ETag or Last-Modified date. Recorded in an image created over it and compared at every open
   * (FORMAT.md §2.2), so a template replaced on the server is refused rather than mixed.
   */
  readonly identity?: string;
  /**
   * Optional: true when reads cross a network. The engine then never reads a whole base just to
   * find zero blocks at create; it asks `nextData` only.
   */
  readonly remote?: boolean;
  /**
   * Optional, remote sources: bytes of reads served at once (requests in flight × request size).
   * A sequential copier (the prefetcher) keeps about this much in flight to hide the latency.
   */
  readonly inFlightBytes?: number;
  /** True for a block device: it has a fixed size and unwritten space is not known to be zero. */
  readonly isBlockDevice: boolean;
  readonly readOnly: boolean;
  /** The path it was opened from, for error messages. */
  readonly path: string;
  /**
   * Optional: which file this is ("dev:ino"), the same through symbolic and hard links, so that
   * "is the output its own input or base" is decided by file, not by path. (Not `identity`,
   * which names a remote source's content.)
   */
  readonly fileId?: string;
}

export interface OpenOptions {
  readOnly?: boolean;
  /**
   * Create the file if it does not exist. Never truncates: a creator empties an existing file
   * itself (`truncate(0)`), after its checks and its lock have passed, so a refused create
   * leaves the file as it was.
   */
  create?: boolean;
  /**
   * Take an advisory lock (flock) for as long as the file is open, failing at once with EBUSY if
   * another open file description holds a conflicting one: 'exclusive' for a writer.
   */
  lock?: 'exclusive' | 'shared';
}

/** Opens BlockFiles; the engine opens its image, and the base chain, only through one of these. */
export interface IoBackend {
  open(path: string, options?: OpenOptions): Promise<BlockFile>;
  /** Optional: BlockFile.fileId of the file at `path` without opening it; null if there is none. */
  identify?(path: string): Promise<string | null>;
  /**
   * Makes the directory entry of a file created at `path` durable: fsync of its parent directory
   * (an fdatasync of the file covers its data, not its name, so after a power cut a new image
   * could be missing altogether). Optional: a backend without directories omits it.
   */
  syncDirectoryOf?(path: string): Promise<void>;
}

/** [a, z) of the file is known to read as zeros (a hole, or past the end). */
export function holeAt(file: BlockFile, a: number, z: number): boolean {
  if (a >= file.size()) return true;
  const next = file.nextData?.(a);
  return next !== undefined && next !== null && next >= z;
}
