/**
 * The crypto step of a queue worker's fast path on an encrypted image (docs/FORMAT.md §11).
 *
 * The engine stores AES-256-XTS ciphertext, tweak = guest sector, and reads an all-zero stored
 * sector as zeros (fvd/crypto.ts). A worker that serves a request itself must produce the same
 * bytes, so it runs its own XtsCipher (OpenSSL contexts are per thread) over the request buffer:
 *   write: the guest's plaintext is encrypted in place in the request buffer, after the request
 *          was routed to the fast path and before the first byte goes to the image file;
 *   read:  the ciphertext read into the request buffer is decrypted in place once the whole
 *          transfer finished, before COMMIT_AND_FETCH hands the buffer to the kernel.
 * In place is allowed: after the worker took a write, nobody reads its buffer but the file write
 * (the kernel copied the guest's data in before it posted the request); a read's buffer belongs
 * to the worker until the commit.
 *
 * Per request: no allocation of its own (a view per tag is kept while its length repeats); the
 * XtsCipher's own per-call work is what bench/xts.ts measures.
 */
import { XtsCipher } from '../fvd/crypto.js';

const SECTOR = 512;

export class FastCrypt {
  private readonly xts: XtsCipher;
  /** Per tag: a view of its request buffer, and the length that view has. */
  private readonly views: Uint8Array[];
  private readonly viewLen: Float64Array;

  /**
   * `key`: the image's 64-byte master key (the caller wipes its copy afterwards). `buffers`: all
   * request buffers of the queue, tag t at t × maxIo.
   */
  constructor(
    key: Uint8Array,
    private readonly buffers: Uint8Array,
    depth: number,
    private readonly maxIo: number,
  ) {
    if (maxIo % SECTOR !== 0 || buffers.length < depth * maxIo) throw new Error('fast-crypt: bad request buffer geometry');
    this.xts = new XtsCipher(key);
    this.views = Array.from({ length: depth }, () => buffers.subarray(0, 0));
    this.viewLen = new Float64Array(depth);
  }

  private view(tag: number, length: number): Uint8Array {
    if (this.viewLen[tag] !== length) {
      this.views[tag] = this.buffers.subarray(tag * this.maxIo, tag * this.maxIo + length);
      this.viewLen[tag] = length;
    }
    return this.views[tag]!;
  }

  /**
   * Encrypts the plaintext of a fast-path write (guest byte `offset`, `length` bytes, both whole
   * sectors as ublk requests are) in place. Call exactly once per request, after routing it to
   * the fast path and before any byte of it is written.
   */
  encryptWrite(tag: number, offset: number, length: number): void {
    const v = this.view(tag, length);
    this.xts.encrypt(v, v, offset / SECTOR);
  }

  /** Wipes the key (the worker's cipher) when the queue stops; see XtsCipher.destroy. */
  destroy(): void {
    this.xts.destroy();
  }

  /** For tests: the cipher whose key buffers destroy() must have zeroed. */
  get cipherForTest(): XtsCipher {
    return this.xts;
  }

  /** Decrypts a completed fast-path read in place (all-zero stored sectors read as zeros). */
  decryptRead(tag: number, offset: number, length: number): void {
    this.xts.decrypt(this.view(tag, length), offset / SECTOR);
  }
}
