/**
 * Opening the backing chain under an image, and the checks that make it safe to read through:
 * no loops, at most MAX_CHAIN_DEPTH levels, every level read-only under a shared lock, and a base
 * that is still the one the image was created over (its size and, for a remote template, its
 * identity: FORMAT.md §2.2). These rules are about which bytes may back an image at all, not about
 * serving requests, so they live apart from the engine (fvd/image.ts).
 *
 * An FVD level is opened by the engine itself: the caller passes that opener in (`openFvd`), so
 * this module does not import the engine that imports it.
 */
import type { IoBackend } from './io.js';
import { holeAt } from './io.js';
import { fileDataExtent } from './zero-scan.js';
import { FvdError, oneLine } from './errors.js';
import { BASE_QCOW2, BASE_RAW, baseFormatName, type Header } from './format.js';
import { canonicalName, isUrl, redactUrl, resolveBasePath } from './base-location.js';
import type { OpenBase } from './create.js';
import type { BaseReference } from './metadata.js';
import type { BaseImage } from './image-types.js';

export const MAX_CHAIN_DEPTH = 64;

/** Opens an FVD image read-only (shared lock) as one level of a chain; `chain` holds the levels above. */
export type OpenFvdLevel = (io: IoBackend, resolved: string, chain: string[]) => Promise<BaseImage>;

/**
 * Opens a base image read-only. `chain` holds the images above it, to detect loops. Every level
 * is opened with a shared lock, so no writer (a served image, `fvd commit`) can change a base
 * while an image reads through it. Errors name the base as the image refers to it (`shownPath`).
 */
export async function openChainLevel(
  io: IoBackend,
  resolved: string,
  format: number,
  chain: string[],
  shownPath: string,
  openFvd: OpenFvdLevel,
): Promise<BaseImage> {
  if (chain.includes(resolved)) throw new FvdError(`base chain loop: '${resolved}' is its own base`, 'EINVAL');
  if (chain.length >= MAX_CHAIN_DEPTH) throw new FvdError(`base chain longer than ${MAX_CHAIN_DEPTH} images (at '${shownPath}')`, 'EINVAL');
  try {
    if (format === BASE_RAW) {
      const file = await io.open(resolved, { readOnly: true, lock: 'shared' });
      return {
        size: file.size(),
        read: (buf, offset) => file.read(buf, offset),
        knownZero: async (offset, length) => holeAt(file, offset, offset + length),
        nextDataExtent: async (offset) => fileDataExtent(file, offset),
        close: () => file.close(),
        describe: () => [{ path: resolved, format: 'raw', size: file.size() }],
        identity: file.identity,
        remote: file.remote,
        localRawPath: file.remote || isUrl(resolved) ? undefined : resolved,
        inFlightBytes: file.inFlightBytes,
        fileIds: () => (file.fileId ? [file.fileId] : []),
      };
    }
    // Its own backing chain continues below, with the levels above it for loop detection.
    // Loaded only for a qcow2 base: serving over a raw one never loads the qcow2 reader.
    if (format === BASE_QCOW2) return await (await import('./qcow2.js')).Qcow2Image.open(io, resolved, { chain });
    return await openFvd(io, resolved, chain);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    // A remote source names itself (its URL without credentials) at the start of its messages.
    if (isUrl(resolved)) throw new FvdError(`base image ${err instanceof FvdError ? err.message : `'${redactUrl(shownPath)}': ${e.message}`}`, err instanceof FvdError ? err.code : 'EIO');
    // An FvdError first: one from deeper in the chain (a missing image further down has code
    // ENOENT too) must keep naming that image, prefixed with this level.
    if (err instanceof FvdError && err.message.startsWith('base chain longer')) throw err; // 64 prefixes would say nothing more
    if (err instanceof FvdError) throw new FvdError(`base image '${shownPath}': ${err.message.replace(oneLine(`${resolved}: `), '')}`, err.code);
    if (e.code === 'ENOENT') throw new FvdError(`base image '${shownPath}' not found (looked for ${resolved})`, 'ENOENT');
    throw new FvdError(`base image '${shownPath}' (${baseFormatName(format)}) cannot be opened: ${e.message}`, 'EIO');
  }
}

/**
 * The opener of the base under the image at `imagePath` (recorded as `ref`), for its open and for
 * a revert that needs the base again: it refuses a base whose size or identity is not the one the
 * image was created over, rather than mix old and new data.
 */
export function baseOpener(io: IoBackend, imagePath: string, header: Header, chain: string[], ref: BaseReference, openBase: OpenBase): () => Promise<BaseImage> {
  const { path: basePath, identity } = ref;
  return async () => {
    const resolved = resolveBasePath(imagePath, basePath);
    const b = await openBase(io, resolved, header.baseFormat, [...chain, canonicalName(imagePath)], basePath);
    // An interrupted commit may have grown the base already (FORMAT.md §12.3); this image
    // reads only its first base_size bytes either way.
    if (b.size !== header.baseSize && !(header.baseSizeNext && b.size === header.baseSizeNext)) {
      await b.close();
      throw new FvdError(
        `${imagePath}: base image '${basePath}' is ${b.size} bytes but was ${header.baseSize} bytes when the image was created (wrong or resized base)`,
        'EINVAL',
      );
    }
    // A remote template replaced on the server (same size, new ETag/date) is refused too.
    if (identity !== null && b.identity !== identity) {
      await b.close();
      throw new FvdError(
        `${imagePath}: base image '${basePath}' changed since the image was created (now ${b.identity ?? 'no identity'}, was ${identity}): refusing to mix old and new data`,
        'EINVAL',
      );
    }
    return b;
  };
}
