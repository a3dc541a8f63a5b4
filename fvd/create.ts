/** Creating an image file: option checks, the base scan for zero blocks, the initial metadata. */
import { randomInt } from 'node:crypto';
import type { BlockFile, IoBackend } from './io.js';
import { FvdError } from './errors.js';
import {
  BASE_FORMAT_CHOICES,
  BASE_NONE,
  BASE_PATH_OFFSET,
  CHUNK_EMPTY,
  COMPAT_ZERO_DETECTED,
  DEFAULT_BLOCK_SIZE,
  bitmapCoverage,
  defaultBlockSize,
  DEFAULT_CHUNK_SIZE,
  DEFAULT_JOURNAL_SIZE,
  INCOMPAT_COMPACT,
  INCOMPAT_ENCRYPTED,
  MAX_BASE_IDENTITY,
  MAX_BASE_PATH,
  MAX_BLOCK_SIZE,
  MAX_CHUNK_SIZE,
  MAX_METADATA_REGION,
  MAX_VIRTUAL_SIZE,
  MIN_BLOCK_SIZE,
  MIN_JOURNAL_SIZE,
  PAGE,
  SECTOR,
  VERSION,
  baseFormatCode,
  computeLayout,
  crc,
  encodeHeader,
  roundUp,
  type BaseFormat,
  type Header,
} from './format.js';
import { sealNewKey, type KdfParams } from './crypto.js';
import { canonicalName, resolveBasePath } from './base-location.js';
import type { BaseImage } from './image-types.js';
import { markZeroBlocks } from './zero-scan.js';

/** Opens a base image read-only, given the images above it (for loop detection). */
export type OpenBase = (io: IoBackend, resolved: string, format: number, chain: string[], shownPath: string) => Promise<BaseImage>;

export interface CreateOptions {
  /** Virtual size in bytes; defaults to the base's size (rounded up to 512). */
  size?: number;
  /** Base image path (relative paths are relative to the image's directory) or URL. */
  base?: string;
  baseFormat?: BaseFormat;
  layout?: 'raw' | 'compact';
  blockSize?: number;
  chunkSize?: number;
  journalSize?: number;
  /** Mark all-zero base blocks as local at create, so writes to them need no copy (default on). */
  detectZeroes?: boolean;
  /** Encrypt the data area (FORMAT.md §11) with a key unlocked by this key material. */
  encrypt?: { key: Uint8Array; kdf?: Partial<KdfParams> };
}

/**
 * Creates an image file (FORMAT.md §2–§4): checks every option and the base first, so a refused
 * create leaves nothing behind, then writes header, bitmap, table and journal and syncs them.
 * `openBase` is the engine's base opener (fvd/image.ts), passed in so this module does not
 * import the engine that imports it.
 */
export async function createImage(io: IoBackend, imagePath: string, options: CreateOptions, openBase: OpenBase): Promise<void> {
  // A block size not given is picked once the base's size is known (defaultBlockSize, at most a
  // chunk size given); until then the checks below take the largest it can be (64 KiB), and a
  // chunk size given need only hold the smallest (4 KiB).
  let blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
  const chunkSize = options.chunkSize ?? Math.max(DEFAULT_CHUNK_SIZE, blockSize);
  const compact = (options.layout ?? 'raw') === 'compact';
  const journalLength = options.journalSize ?? DEFAULT_JOURNAL_SIZE;
  const isPow2 = (v: number) => Number.isSafeInteger(v) && v > 0 && (v & (v - 1)) === 0;
  if (!isPow2(blockSize) || blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE)
    throw new FvdError(`block size ${blockSize} must be a power of two between ${MIN_BLOCK_SIZE} and ${MAX_BLOCK_SIZE}`, 'EINVAL');
  const smallestBlock = options.blockSize ?? MIN_BLOCK_SIZE;
  if (!isPow2(chunkSize) || chunkSize < smallestBlock || chunkSize > MAX_CHUNK_SIZE)
    throw new FvdError(`chunk size ${chunkSize} must be a power of two between the block size (${smallestBlock}) and ${MAX_CHUNK_SIZE}`, 'EINVAL');
  if (!Number.isSafeInteger(journalLength) || (journalLength !== 0 && (journalLength < MIN_JOURNAL_SIZE || journalLength % PAGE || journalLength > MAX_METADATA_REGION)))
    throw new FvdError(`journal size ${journalLength} must be 0 or a multiple of 4 KiB from ${MIN_JOURNAL_SIZE} to ${MAX_METADATA_REGION}`, 'EINVAL');
  if (options.layout && options.layout !== 'raw' && options.layout !== 'compact')
    throw new FvdError(`unknown layout '${options.layout}' (raw or compact)`, 'EINVAL');

  let base: BaseImage | null = null;
  let basePath = '';
  let baseFormat = BASE_NONE;
  if (options.base !== undefined) {
    if (!options.baseFormat) throw new FvdError(`base image given without its format: add -F raw, -F qcow2 or -F fvd`, 'EINVAL');
    basePath = options.base;
    baseFormat = baseFormatCode(options.baseFormat);
    if (baseFormat < 0) throw new FvdError(`unknown base format '${options.baseFormat}' (${BASE_FORMAT_CHOICES})`, 'EINVAL');
    const pathBytes = Buffer.from(basePath, 'utf8');
    if (pathBytes.length === 0 || pathBytes.length > MAX_BASE_PATH)
      throw new FvdError(`base path must be 1 to ${MAX_BASE_PATH} bytes long`, 'EINVAL');
    const resolved = resolveBasePath(imagePath, basePath);
    if (resolved === canonicalName(imagePath)) throw new FvdError(`an image cannot be its own base`, 'EINVAL');
    base = await openBase(io, resolved, baseFormat, [canonicalName(imagePath)], options.base);
    // The same file under another name (a symbolic or hard link), at any level of the chain.
    const target = await io.identify?.(imagePath);
    if (target && base.fileIds().includes(target)) {
      await base.close();
      throw new FvdError(`${imagePath}: an image cannot be its own base (it is '${options.base}' or in its base chain)`, 'EINVAL');
    }
  }
  try {
    let size = options.size ?? (base ? roundUp(base.size, SECTOR) : undefined);
    if (size === undefined) throw new FvdError(`no size given and no base image to take it from`, 'EINVAL');
    size = roundUp(size, SECTOR);
    if (!Number.isSafeInteger(size) || size <= 0 || size > MAX_VIRTUAL_SIZE)
      throw new FvdError(`size ${size} out of range (1 byte to ${MAX_VIRTUAL_SIZE} bytes)`, 'EINVAL');
    const baseSize = base ? base.size : 0;
    // Never larger than a chunk size given (a chunk holds whole blocks).
    if (options.blockSize === undefined) blockSize = Math.min(defaultBlockSize(!!base, bitmapCoverage(baseSize, size)), chunkSize);
    const layout = computeLayout({ virtualSize: size, blockSize, chunkSize, baseSize, compact, journalLength });
    if (layout.tableLength > MAX_METADATA_REGION)
      throw new FvdError(`a ${size}-byte disk needs a ${layout.tableLength}-byte lookup table at ${chunkSize}-byte chunks (limit ${MAX_METADATA_REGION}): use a larger --chunk-size`, 'EINVAL');
    if (layout.bitmapLength > MAX_METADATA_REGION)
      throw new FvdError(`a ${baseSize}-byte base needs a ${layout.bitmapLength}-byte bitmap at ${blockSize}-byte blocks (limit ${MAX_METADATA_REGION}): use a larger --block-size`, 'EINVAL');
    if (compact && Math.ceil(size / chunkSize) >= CHUNK_EMPTY) throw new FvdError(`too many chunks: use a larger chunk size`, 'EINVAL');

    // Scan the base before touching the target, so a failing scan leaves nothing behind.
    const bitmap = new Uint8Array(layout.bitmapLength);
    const detect = !!base && options.detectZeroes !== false;
    if (detect) await markZeroBlocks(base!, Math.min(baseSize, size), blockSize, bitmap);
    // A remote base's identity (FORMAT.md §2.2), stored after its path.
    const identity = Buffer.from(base?.identity ?? '', 'utf8');
    if (identity.length > MAX_BASE_IDENTITY || BASE_PATH_OFFSET + pathBytesOf(basePath) + identity.length > PAGE)
      throw new FvdError(`the base's path and identity (${pathBytesOf(basePath)} + ${identity.length} bytes) do not fit in the image's first page`, 'EINVAL');

    // The key is sealed before the target is touched, like the base scan.
    const crypt = options.encrypt ? await sealNewKey(options.encrypt.key, options.encrypt.kdf) : undefined;
    // Opened without truncating, under the lock: an existing file is emptied below, only once
    // every check has passed (a served image, or a base of this one, is refused untouched).
    const file = await io.open(imagePath, { create: true, lock: 'exclusive' });
    try {
      if (file.isBlockDevice && !compact)
        throw new FvdError(`${imagePath}: a raw-like image needs a regular file (holes must read as zeros); use --layout compact on block devices`, 'EINVAL');
      const header: Header = {
        version: VERSION,
        incompatible: (compact ? INCOMPAT_COMPACT : 0n) | (crypt ? INCOMPAT_ENCRYPTED : 0n),
        compatible: detect ? COMPAT_ZERO_DETECTED : 0n,
        autoclear: 0n,
        virtualSize: size,
        blockSize,
        chunkSize,
        baseSize,
        basePathLength: Buffer.byteLength(basePath),
        baseFormat,
        basePathCrc: basePath ? crc(Buffer.from(basePath)) : 0,
        baseIdentityLength: identity.length,
        baseIdentityCrc: identity.length ? crc(identity) : 0,
        ...layout,
        // A random start makes stale sectors of an earlier image on the same device not match.
        journalStartSeq: randomInt(0, 2 ** 40),
        refcountOffset: 0,
        refcountLength: 0,
        snapshotsOffset: 0,
        snapshotsLength: 0,
        crypt,
        revertSnapshotId: 0,
      };
      if (file.isBlockDevice && file.size() < layout.dataOffset + chunkSize)
        throw new FvdError(`${imagePath}: device of ${file.size()} bytes is too small for this image's metadata`, 'ENOSPC');
      if (!file.isBlockDevice) await file.truncate(0);
      const first = new Uint8Array(PAGE);
      first.set(encodeHeader(header), 0);
      first.set(Buffer.from(basePath), BASE_PATH_OFFSET);
      first.set(identity, BASE_PATH_OFFSET + pathBytesOf(basePath));
      await file.write(first, 0);
      if (layout.bitmapLength) await file.write(bitmap, layout.bitmapOffset);
      if (layout.tableLength) await file.write(new Uint8Array(layout.tableLength).fill(0xff), layout.tableOffset);
      if (file.isBlockDevice) await file.zeroRange(layout.journalOffset, layout.journalLength);
      else {
        await file.truncate(compact ? layout.dataOffset : layout.dataOffset + size);
        // Allocated, not a hole: on a full file system a journal commit then needs no new space,
        // so flushes keep working while data writes fail with ENOSPC (bitmap and table are
        // written above, so they are allocated too).
        await writeZeros(file, layout.journalOffset, layout.journalLength);
      }
      await file.flush();
    } finally {
      await file.close();
    }
    // The new name, too, must survive a power cut (a block device has no new name).
    if (!file.isBlockDevice) await io.syncDirectoryOf?.(imagePath);
  } finally {
    await base?.close();
  }
}

function pathBytesOf(p: string): number {
  return Buffer.byteLength(p, 'utf8');
}

/** Writes zeros over a range (allocating it), 1 MiB at a time. */
async function writeZeros(file: BlockFile, offset: number, length: number): Promise<void> {
  const piece = new Uint8Array(Math.min(length, 1 << 20));
  for (let pos = 0; pos < length; pos += piece.length) await file.write(piece.subarray(0, Math.min(piece.length, length - pos)), offset + pos);
}
