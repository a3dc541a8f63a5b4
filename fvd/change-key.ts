/**
 * change-key (docs/FORMAT.md §11.2): re-wraps an encrypted image's master key under new key
 * material, like `cryptsetup luksChangeKey`. Only header bytes 176..303 (and the header checksum)
 * change; the data, encrypted under the unchanged master key, is not touched.
 *
 * Crash safety: the header is one checksummed 512-byte sector, and the whole change is a single
 * write of it (the old key is verified and the new fields computed before anything is written).
 * Like qcow2 for its header, this relies on a one-sector write being atomic: a power cut leaves
 * the old header (old key) or the new one (new key). Success is reported only after fdatasync.
 * The image is held under its exclusive lock throughout, so a served image (whose server holds
 * the lock and would rewrite the header from its own copy at the next checkpoint) is refused.
 */
import type { IoBackend } from './io.js';
import { FvdError } from './errors.js';
import { HEADER_SIZE, INCOMPAT_ENCRYPTED, crc, decodeHeader } from './format.js';
import { CRYPT_LENGTH, CRYPT_OFFSET, KeyError, parseCryptFields, rewrapKey, type KdfParams } from './crypto.js';

/** Header offset of header_crc (crc32 of bytes 0..507). */
const CRC_OFFSET = 508;

export interface ChangeKeyResult {
  /** The scrypt parameters of the new wrap. */
  kdf: KdfParams;
}

export async function changeKey(io: IoBackend, imagePath: string, oldKey: Uint8Array, newKey: Uint8Array, kdf: Partial<KdfParams> = {}): Promise<ChangeKeyResult> {
  const file = await io.open(imagePath, { lock: 'exclusive' });
  try {
    const sector = new Uint8Array(HEADER_SIZE);
    await file.read(sector, 0);
    const header = decodeHeader(imagePath, sector, file.size());
    if (!(header.incompatible & INCOMPAT_ENCRYPTED)) throw new KeyError(`${imagePath}: the image is not encrypted: it has no key to change`);
    // Verifies the old key (KeyError if wrong) before anything is written.
    const fields = await rewrapKey(imagePath, sector.subarray(CRYPT_OFFSET, CRYPT_OFFSET + CRYPT_LENGTH), oldKey, newKey, kdf);
    // Every other header byte stays as it is (DIRTY, a revert marker, reserved bytes included):
    // the change is to the key fields alone.
    const next = sector.slice();
    next.set(fields, CRYPT_OFFSET);
    new DataView(next.buffer).setUint32(CRC_OFFSET, crc(next.subarray(0, CRC_OFFSET)), true);
    decodeHeader(imagePath, next, file.size()); // cannot fail: the same header with new key fields
    if (file.readOnly) throw new FvdError(`${imagePath}: the image is read-only`, 'EROFS');
    await file.write(next, 0);
    await file.flush();
    const f = parseCryptFields(imagePath, fields);
    return { kdf: { log2N: f.log2N, r: f.r, p: f.p } };
  } finally {
    await file.close();
  }
}
