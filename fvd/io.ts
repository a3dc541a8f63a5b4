/**
 * The engine's only view of storage: a small async interface over one file or block device.
 *
 * The same engine runs over node:fs (CLI, tests: NodeFile below) and over io_uring (the daemon's
 * queue workers), and tests wrap it to record, reorder or drop writes (crash simulation).
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
  /** Grow or shrink a regular file; a block device refuses. */
  truncate(length: number): Promise<void>;
  /**
   * Optional (SEEK_DATA): the first offset at or after `offset` that may hold data — every byte
   * before it reads as zeros — or size() when none does; null when the file cannot tell.
   * Conservative: it may report data where there are zeros, never the reverse.
   */
  nextData?(offset: number): number | null;
  close(): Promise<void>;
  /** True for a block device: it has a fixed size and unwritten space is not known to be zero. */
  readonly isBlockDevice: boolean;
  readonly readOnly: boolean;
  /** The path it was opened from, for error messages. */
  readonly path: string;
}

export interface OpenOptions {
  readOnly?: boolean;
  /** Create (or truncate) a regular file. */
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
  /**
   * Makes the directory entry of a file created at `path` durable: fsync of its parent directory
   * (an fdatasync of the file covers its data, not its name, so after a power cut a new image
   * could be missing altogether). Optional: a backend without directories omits it.
   */
  syncDirectoryOf?(path: string): Promise<void>;
}
