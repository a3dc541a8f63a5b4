/**
 * A disk as the CLI tools see it: an FVD image through the engine, a raw file/device, or a qcow2
 * image (read-only, through the engine's qcow2 reader), behind one interface, so `convert`, `io`
 * and `bench` treat them alike.
 */
import fs from 'node:fs';
import nodePath from 'node:path';
import { Qcow2Image } from '../fvd/qcow2.js';
import { QCOW2_HEADER_READ, decodeQcow2Header, isQcow2Magic } from '../fvd/qcow2-format.js';
import { FvdImage, type Extent } from '../fvd/image.js';
import { NodeFile } from '../storage/node-file.js';
import { storageIo } from '../storage/storage-io.js';
import { HEADER_SIZE, INCOMPAT_ENCRYPTED, MAGIC, decodeHeader } from '../fvd/format.js';
import { FvdError } from '../fvd/errors.js';
import { UsageError } from './args.js';

export type DiskFormat = 'raw' | 'fvd' | 'qcow2';

export interface Disk {
  readonly format: DiskFormat;
  readonly size: number;
  read(buf: Uint8Array, offset: number): Promise<void>;
  write(buf: Uint8Array, offset: number, fua?: boolean): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  /** Where data lives; a raw disk is one local extent. */
  extents(): Extent[];
  /** BlockFile.fileId of every file read: the disk's own and, for an FVD image, its base chain's. */
  fileIds(): string[];
  close(): Promise<void>;
}

/**
 * The first `length` bytes of a file, for probing. Like every opener (NodeFile.open), it never
 * waits on a FIFO or another special file: those are refused with one line.
 */
function peek(path: string, length: number): Buffer {
  const fd = fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile() && !st.isBlockDevice()) throw new FvdError(`${path}: not a regular file or block device`, 'EINVAL');
    const head = Buffer.alloc(length);
    return head.subarray(0, fs.readSync(fd, head, 0, length, 0));
  } finally {
    fs.closeSync(fd);
  }
}

/** Probes by magic: sources of `convert` may be any format; bases are never probed. */
export function probeFormat(path: string): DiskFormat {
  const head = peek(path, MAGIC.length);
  if (head.equals(Buffer.from(MAGIC))) return 'fvd';
  return isQcow2Magic(head) ? 'qcow2' : 'raw';
}

/**
 * Whether an FVD image's header has the ENCRYPTED bit (just a peek: opening validates the rest),
 * so that commands know which image a --key-file is for.
 */
export function isEncryptedImage(path: string): boolean {
  const head = peek(path, 24);
  return head.length === 24 && head.subarray(0, MAGIC.length).equals(Buffer.from(MAGIC)) && (head.readBigUInt64LE(16) & INCOMPAT_ENCRYPTED) !== 0n;
}

/**
 * The size of the disk at `path` without opening it for writing (an FVD or qcow2 image's virtual
 * size from its validated header; a raw file's or device's size), so that commands refuse
 * out-of-range requests before a read-write open replays a journal or marks the image dirty.
 */
export async function diskSize(path: string, format: DiskFormat | undefined): Promise<number> {
  const fmt = format ?? probeFormat(path);
  const file = await NodeFile.open(path, { readOnly: true });
  try {
    if (fmt === 'raw') return file.size();
    if (fmt === 'qcow2') {
      const first = new Uint8Array(Math.min(QCOW2_HEADER_READ, file.size()));
      await file.read(first, 0);
      return decodeQcow2Header(path, first, file.size()).size;
    }
    const sector = new Uint8Array(HEADER_SIZE);
    await file.read(sector, 0);
    return decodeHeader(path, sector, file.size()).virtualSize;
  } finally {
    await file.close();
  }
}

export function parseFormat(text: string | undefined, what: string): DiskFormat | undefined {
  if (text === undefined) return undefined;
  if (text !== 'raw' && text !== 'fvd' && text !== 'qcow2') throw new UsageError(`invalid ${what} '${text}': expected raw, fvd or qcow2`);
  return text;
}

/** The refusal of a key for a file that is not an FVD image (raw and qcow2 files are never encrypted). */
export function refuseKeyFor(path: string, format: Exclude<DiskFormat, 'fvd'>): UsageError {
  return new UsageError(`${path}: a key was given, but this is a ${format} file (only FVD images are encrypted)`);
}

export async function openDisk(
  path: string,
  format: DiskFormat | undefined,
  options: { readOnly?: boolean; copyOnRead?: boolean; key?: Uint8Array } = {},
): Promise<Disk> {
  const fmt = format ?? probeFormat(path);
  if (fmt !== 'fvd' && options.key) throw refuseKeyFor(path, fmt);
  if (fmt === 'qcow2') {
    if (!options.readOnly) throw new UsageError(`${path}: fvd reads qcow2 images but never writes them (open it read-only, -r)`);
    const img = await Qcow2Image.open(storageIo(), nodePath.resolve(path));
    const readOnly = () => Promise.reject(new UsageError(`${path}: fvd never writes qcow2 images`));
    return {
      format: 'qcow2',
      size: img.size,
      read: (b, o) => img.read(b, o),
      write: readOnly,
      writeZeroes: readOnly,
      discard: readOnly,
      flush: async () => {},
      // Unallocated clusters cost no I/O to read (zeros in memory), so one extent is enough here.
      extents: () => [{ offset: 0, length: img.size, kind: 'local' }],
      fileIds: () => img.fileIds(),
      close: () => img.close(),
    };
  }
  if (fmt === 'fvd') {
    const img = await FvdImage.open(storageIo(), path, options);
    return {
      format: 'fvd',
      size: img.size,
      read: (b, o) => img.read(b, o),
      write: (b, o, fua) => img.write(b, o, fua),
      writeZeroes: (o, l) => img.writeZeroes(o, l),
      discard: (o, l) => img.discard(o, l),
      flush: () => img.flush(),
      extents: () => img.extents(),
      fileIds: () => img.fileIds(),
      close: () => img.close(),
    };
  }
  return rawDisk(await NodeFile.open(path, { readOnly: options.readOnly, lock: options.readOnly ? undefined : 'exclusive' }));
}

/** A raw file or device already open (and locked, for writing) as a Disk. */
export function rawDisk(file: NodeFile): Disk {
  const size = file.size();
  const inRange = (o: number, l: number) => {
    if (o < 0 || l < 0 || o + l > size) throw new UsageError(`request at ${o}+${l} is outside the disk (${size} bytes)`);
  };
  return {
    format: 'raw',
    size,
    read: (b, o) => (inRange(o, b.length), file.read(b, o)),
    write: async (b, o, fua) => {
      inRange(o, b.length);
      await file.write(b, o);
      if (fua) await file.flush();
    },
    writeZeroes: (o, l) => (inRange(o, l), file.zeroRange(o, l)),
    discard: (o, l) => (inRange(o, l), file.zeroRange(o, l)),
    flush: () => file.flush(),
    extents: () => [{ offset: 0, length: size, kind: 'local' }],
    fileIds: () => [file.fileId],
    close: () => file.close(),
  };
}
