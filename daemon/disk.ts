/**
 * A disk as the CLI tools see it: an FVD image through the engine, a raw file/device, or a qcow2
 * image (read-only, through the engine's qcow2 reader), behind one interface, so `convert`, `io`
 * and `bench` treat them alike.
 */
import fs from 'node:fs';
import nodePath from 'node:path';
import { Qcow2Image } from '../fvd/qcow2.js';
import { isQcow2Magic } from '../fvd/qcow2-format.js';
import { FvdImage, type Extent } from '../fvd/image.js';
import { NodeFile } from '../fvd/node-file.js';
import { storageIo } from '../storage/storage-io.js';
import { INCOMPAT_ENCRYPTED, MAGIC } from '../fvd/format.js';
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
  close(): Promise<void>;
}

/** Probes by magic: sources of `convert` may be any format; bases are never probed. */
export function probeFormat(path: string): DiskFormat {
  const fd = fs.openSync(path, 'r');
  try {
    const head = Buffer.alloc(MAGIC.length);
    const n = fs.readSync(fd, head, 0, head.length, 0);
    if (n === MAGIC.length && head.equals(Buffer.from(MAGIC))) return 'fvd';
    return isQcow2Magic(head.subarray(0, n)) ? 'qcow2' : 'raw';
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Whether an FVD image's header has the ENCRYPTED bit (just a peek: opening validates the rest),
 * so that commands know which image a --key-file is for.
 */
export function isEncryptedImage(path: string): boolean {
  const fd = fs.openSync(path, 'r');
  try {
    const head = Buffer.alloc(24);
    const n = fs.readSync(fd, head, 0, head.length, 0);
    return n === head.length && head.subarray(0, MAGIC.length).equals(Buffer.from(MAGIC)) && (head.readBigUInt64LE(16) & INCOMPAT_ENCRYPTED) !== 0n;
  } finally {
    fs.closeSync(fd);
  }
}

export function parseFormat(text: string | undefined, what: string): DiskFormat | undefined {
  if (text === undefined) return undefined;
  if (text !== 'raw' && text !== 'fvd' && text !== 'qcow2') throw new UsageError(`invalid ${what} '${text}': expected raw, fvd or qcow2`);
  return text;
}

export async function openDisk(
  path: string,
  format: DiskFormat | undefined,
  options: { readOnly?: boolean; copyOnRead?: boolean; key?: Uint8Array } = {},
): Promise<Disk> {
  const fmt = format ?? probeFormat(path);
  if (fmt !== 'fvd' && options.key) throw new UsageError(`${path}: a key was given, but this is a ${fmt} file (only FVD images are encrypted)`);
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
      close: () => img.close(),
    };
  }
  const file = await NodeFile.open(path, { readOnly: options.readOnly, lock: options.readOnly ? undefined : 'exclusive' });
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
    close: () => file.close(),
  };
}
