/**
 * Encryption of the data area (docs/FORMAT.md §11): AES-256-XTS per 512-byte sector, the tweak
 * being the guest (virtual) sector number, with a random 512-bit master key that is stored only
 * wrapped (AES-256-GCM) under a key derived from the user's key material by scrypt.
 *
 * Only the data area is encrypted. The engine calls this module where data is stored to, and
 * loaded from, the image file (FvdImage.storeLocal / readLocal); metadata stays plaintext.
 *
 * XTS is computed here from AES-256-ECB (one long-lived OpenSSL context per direction) instead of
 * one `createCipheriv('aes-256-xts', key, tweak)` per sector: per IEEE 1619 a sector is
 * C_j = E_K1(P_j ⊕ T_j) ⊕ T_j with T_0 = E_K2(tweak) and T_{j+1} = T_j·α in GF(2^128), so a whole
 * request costs one ECB call for its tweaks, one for its data and two XOR passes, instead of a
 * cipher object per sector (measured: ~4x the throughput; bench/xts.ts). tests/fvd/crypto.test.ts
 * checks it against node's own aes-256-xts, sector by sector, and against IEEE 1619 vectors.
 *
 * Unwritten storage (holes, zeroed chunks, the end of a file) reads as zeros, which would decrypt
 * to garbage: a sector whose stored bytes are all zero therefore decrypts to zeros. A real
 * ciphertext sector is all zero with probability 2^-4096.
 */
import { createCipheriv, createDecipheriv, randomBytes, scrypt, type Cipher, type Decipher } from 'node:crypto';
import { CorruptImageError, FvdError } from './errors.js';

/** Header bytes 176..303 hold the encryption fields (FORMAT.md §11.1). */
export const CRYPT_OFFSET = 176;
export const CRYPT_LENGTH = 128;
export const CRYPT_AES_256_XTS = 1;
export const KDF_SCRYPT = 1;
export const MASTER_KEY_BYTES = 64;
/** Key material: a passphrase or random bytes, at most this long (a guard against wrong files). */
export const MAX_KEY_MATERIAL = 64 * 1024;

// Offsets inside the 128-byte field block (header offset − 176).
const F_METHOD = 0;
const F_KDF = 1;
const F_LOG2N = 2;
const F_R = 3;
const F_P = 4;
const F_SALT = 8;
const SALT_BYTES = 16;
const F_NONCE = 24;
const NONCE_BYTES = 12;
const F_WRAPPED = 36;
const F_TAG = 100;
const TAG_BYTES = 16;
const F_END = 116;

export interface KdfParams {
  /** scrypt cost N = 2^log2N. */
  log2N: number;
  r: number;
  p: number;
}

/** 32 MiB of memory and ~0.1 s per open: the cost a guesser pays per key tried. */
export const DEFAULT_KDF: KdfParams = { log2N: 15, r: 8, p: 1 };
export const KDF_LIMITS = { log2N: [10, 22], r: [1, 32], p: [1, 16], memory: 256 * 1024 * 1024 } as const;

export interface CryptFields extends KdfParams {
  method: number;
  salt: Uint8Array;
  nonce: Uint8Array;
  wrapped: Uint8Array;
  tag: Uint8Array;
}

/** The key given cannot unlock the image, or a key was given where none applies. */
export class KeyError extends FvdError {
  constructor(message: string) {
    super(message, 'EINVAL');
    this.name = 'KeyError';
  }
}

function kdfProblem(k: KdfParams): string | null {
  const L = KDF_LIMITS;
  if (!Number.isInteger(k.log2N) || k.log2N < L.log2N[0] || k.log2N > L.log2N[1]) return `scrypt log2(N) ${k.log2N} outside ${L.log2N[0]}..${L.log2N[1]}`;
  if (!Number.isInteger(k.r) || k.r < L.r[0] || k.r > L.r[1]) return `scrypt r ${k.r} outside ${L.r[0]}..${L.r[1]}`;
  if (!Number.isInteger(k.p) || k.p < L.p[0] || k.p > L.p[1]) return `scrypt p ${k.p} outside ${L.p[0]}..${L.p[1]}`;
  if (128 * 2 ** k.log2N * k.r > L.memory) return `scrypt parameters need more than ${L.memory / 2 ** 20} MiB`;
  return null;
}

/**
 * Decodes and validates the encryption fields of an image whose ENCRYPTED bit is set. Needs no
 * key: `info` and `check` use it to report damage. Throws CorruptImageError.
 */
export function parseCryptFields(path: string, f: Uint8Array): CryptFields {
  const bad = (what: string) => new CorruptImageError(path, `encryption fields: ${what}`);
  if (f.length !== CRYPT_LENGTH) throw bad('missing');
  if (f[F_METHOD] !== CRYPT_AES_256_XTS) throw bad(`unknown cipher ${f[F_METHOD]} (1 = aes-256-xts)`);
  if (f[F_KDF] !== KDF_SCRYPT) throw bad(`unknown key derivation ${f[F_KDF]} (1 = scrypt)`);
  const kdf = { log2N: f[F_LOG2N]!, r: f[F_R]!, p: f[F_P]! };
  const problem = kdfProblem(kdf);
  if (problem) throw bad(problem);
  for (const [a, b] of [[5, F_SALT], [F_END, CRYPT_LENGTH]] as const) {
    for (let i = a; i < b; i++) if (f[i] !== 0) throw bad(`reserved byte ${CRYPT_OFFSET + i} is not zero`);
  }
  const salt = f.slice(F_SALT, F_SALT + SALT_BYTES);
  if (salt.every((b) => b === 0)) throw bad('salt is all zero');
  return {
    method: f[F_METHOD]!,
    ...kdf,
    salt,
    nonce: f.slice(F_NONCE, F_NONCE + NONCE_BYTES),
    wrapped: f.slice(F_WRAPPED, F_WRAPPED + MASTER_KEY_BYTES),
    tag: f.slice(F_TAG, F_TAG + TAG_BYTES),
  };
}

function deriveKek(material: Uint8Array, salt: Uint8Array, k: KdfParams): Promise<Buffer> {
  const N = 2 ** k.log2N;
  return new Promise((resolve, reject) =>
    scrypt(material, salt, 32, { N, r: k.r, p: k.p, maxmem: 2 * 128 * N * k.r + (1 << 20) }, (err, key) => (err ? reject(err) : resolve(key))),
  );
}

/** The GCM additional data: method, KDF and its parameters, salt (so none can be swapped). */
function aad(f: Uint8Array): Uint8Array {
  return f.subarray(0, F_NONCE);
}

function checkMaterial(material: Uint8Array): void {
  if (material.length === 0) throw new KeyError('the key is empty');
  if (material.length > MAX_KEY_MATERIAL) throw new KeyError(`the key is longer than ${MAX_KEY_MATERIAL} bytes`);
}

/** Key derivation parameters with defaults applied, or a one-line error. */
function checkedKdf(k: KdfParams): KdfParams {
  const problem = kdfProblem(k);
  if (problem) throw new FvdError(`invalid key derivation parameters: ${problem}`, 'EINVAL');
  return k;
}

/**
 * The 128 field bytes wrapping `master` under `material`: a fresh salt (a new KEK even for the
 * same key material) and a fresh nonce, so a GCM nonce is never reused under one KEK.
 */
async function wrapMaster(master: Uint8Array, material: Uint8Array, method: number, k: KdfParams): Promise<Uint8Array> {
  const f = new Uint8Array(CRYPT_LENGTH);
  f[F_METHOD] = method;
  f[F_KDF] = KDF_SCRYPT;
  f[F_LOG2N] = k.log2N;
  f[F_R] = k.r;
  f[F_P] = k.p;
  f.set(randomBytes(SALT_BYTES), F_SALT);
  f.set(randomBytes(NONCE_BYTES), F_NONCE);
  const kek = await deriveKek(material, f.subarray(F_SALT, F_SALT + SALT_BYTES), k);
  try {
    const gcm = createCipheriv('aes-256-gcm', kek, f.subarray(F_NONCE, F_NONCE + NONCE_BYTES));
    gcm.setAAD(aad(f));
    f.set(gcm.update(master), F_WRAPPED);
    gcm.final();
    f.set(gcm.getAuthTag(), F_TAG);
  } finally {
    kek.fill(0);
  }
  return f;
}

/**
 * The master key unwrapped from parsed fields `f` (of `fieldBytes`) with `material`; the caller
 * wipes it. A wrong key (or damaged wrapped-key fields: GCM cannot tell the two apart) throws
 * KeyError.
 */
async function unwrapMaster(path: string, fieldBytes: Uint8Array, f: CryptFields, material: Uint8Array): Promise<Buffer> {
  const kek = await deriveKek(material, f.salt, f);
  let master: Buffer;
  try {
    const gcm = createDecipheriv('aes-256-gcm', kek, f.nonce);
    gcm.setAAD(aad(fieldBytes));
    gcm.setAuthTag(f.tag);
    master = gcm.update(f.wrapped);
    gcm.final();
  } catch {
    throw new KeyError(`${path}: wrong key: it does not unlock this encrypted image (or the image's key fields are damaged)`);
  } finally {
    kek.fill(0);
  }
  if (master.subarray(0, 32).equals(master.subarray(32))) {
    master.fill(0);
    throw new CorruptImageError(path, 'encryption fields: the master key halves are equal');
  }
  return master;
}

/**
 * For create: a new random master key, wrapped under `material`. Returns the 128 field bytes
 * for header offset 176.
 */
export async function sealNewKey(material: Uint8Array, kdf: Partial<KdfParams> = {}): Promise<Uint8Array> {
  checkMaterial(material);
  const k = checkedKdf({ ...DEFAULT_KDF, ...kdf });
  let master: Buffer;
  // XTS needs two different AES keys (OpenSSL refuses equal halves).
  do master = randomBytes(MASTER_KEY_BYTES);
  while (master.subarray(0, 32).equals(master.subarray(32)));
  try {
    return await wrapMaster(master, material, CRYPT_AES_256_XTS, k);
  } finally {
    master.fill(0);
  }
}

/**
 * Unwraps the master key with the user's key material. A wrong key (or damaged wrapped-key
 * fields: GCM cannot tell the two apart) throws KeyError; nothing is read but the header.
 */
export async function unlock(path: string, fieldBytes: Uint8Array, material: Uint8Array): Promise<XtsCipher> {
  checkMaterial(material);
  const master = await unwrapMaster(path, fieldBytes, parseCryptFields(path, fieldBytes), material);
  try {
    return new XtsCipher(master);
  } finally {
    master.fill(0);
  }
}

/**
 * For change-key (FORMAT.md §11.2): unwraps the master key with `oldMaterial` (a wrong key throws
 * KeyError, as in unlock) and wraps the same master key under `newMaterial` with a fresh salt and
 * nonce, keeping the image's scrypt parameters unless `kdf` overrides some. Returns the new 128
 * field bytes; the data, encrypted under the master key, stays valid.
 */
export async function rewrapKey(path: string, fieldBytes: Uint8Array, oldMaterial: Uint8Array, newMaterial: Uint8Array, kdf: Partial<KdfParams> = {}): Promise<Uint8Array> {
  checkMaterial(oldMaterial);
  checkMaterial(newMaterial);
  const old = parseCryptFields(path, fieldBytes);
  const k = checkedKdf({ log2N: old.log2N, r: old.r, p: old.p, ...kdf });
  const master = await unwrapMaster(path, fieldBytes, old, oldMaterial);
  try {
    return await wrapMaster(master, newMaterial, old.method, k);
  } finally {
    master.fill(0);
  }
}

/** Sectors per slice: the scratch space is bounded whatever the request size. */
const SLICE_SECTORS = 128;
const SLICE = SLICE_SECTORS * 512;
const WORDS_PER_SECTOR = 128;

/**
 * AES-256-XTS over whole 512-byte sectors, tweak = 128-bit little-endian sector number. All
 * methods are synchronous, so one instance serves concurrent requests of one thread.
 */
export class XtsCipher {
  private readonly enc: Cipher;
  private readonly dec: Decipher;
  private readonly tweakEnc: Cipher;
  private readonly tweakIn = new Uint32Array(SLICE_SECTORS * 4);
  /** T_j for every 16-byte block of a slice, then P ⊕ T (or C ⊕ T). */
  private readonly t = new Uint32Array(SLICE / 4);
  private readonly x = new Uint32Array(SLICE / 4);
  /** Bounce space for buffers not 4-byte aligned. */
  private readonly bounce = new Uint32Array(SLICE / 4);
  private readonly zeroSector = new Uint8Array(SLICE_SECTORS);
  /**
   * A private copy of the key, only for `masterKey()` (the ECB contexts hold it anyway). In an
   * ArrayBuffer of its own: V8 keeps small typed arrays made by length inside its heap and moves
   * them (leaving stale copies behind); an explicit ArrayBuffer's memory never moves.
   */
  private readonly key = new Uint8Array(new ArrayBuffer(MASTER_KEY_BYTES));
  private destroyed = false;
  /** Ciphers made and not yet destroyed in this thread: tests check every image close brings it back. */
  static live = 0;

  /** `key`: 64 bytes, K1 (data) then K2 (tweak). The caller may wipe it afterwards. */
  constructor(key: Uint8Array) {
    if (key.length !== MASTER_KEY_BYTES) throw new Error('XTS-AES-256 needs a 64-byte key');
    XtsCipher.live++;
    this.key.set(key);
    this.enc = createCipheriv('aes-256-ecb', this.key.subarray(0, 32), null).setAutoPadding(false);
    this.dec = createDecipheriv('aes-256-ecb', this.key.subarray(0, 32), null).setAutoPadding(false);
    this.tweakEnc = createCipheriv('aes-256-ecb', this.key.subarray(32, 64), null).setAutoPadding(false);
  }

  /**
   * A fresh copy of the 64-byte master key, for code that needs its own cipher on another thread
   * (the daemon's queue workers: OpenSSL contexts cannot be shared between threads). The caller
   * wipes the copy (fill(0)) once done and never logs it.
   */
  masterKey(): Uint8Array {
    if (this.destroyed) throw new Error('xts: the cipher was destroyed');
    const copy = new Uint8Array(new ArrayBuffer(MASTER_KEY_BYTES));
    copy.set(this.key);
    return copy;
  }

  /**
   * Wipes every copy of the key this object holds, at once rather than whenever the garbage
   * collector runs: its own copy and the tweak scratch are zeroed, and final() ends the three
   * OpenSSL contexts, which frees them with OPENSSL_cleanse (Node frees the EVP context in
   * final()). Called when the image closes; the cipher refuses to work afterwards. Idempotent.
   */
  destroy(): void {
    if (this.destroyed) return;
    this.destroyed = true;
    XtsCipher.live--;
    this.key.fill(0);
    this.tweakIn.fill(0);
    this.t.fill(0);
    this.x.fill(0);
    this.bounce.fill(0);
    for (const c of [this.enc, this.dec, this.tweakEnc]) {
      try {
        c.final();
      } catch {
        // nothing pending can make final() fail on ECB without padding; the context is gone either way
      }
    }
  }

  /** For tests: the buffers that held key material (all zero after destroy()). */
  secretBuffersForTest(): Uint8Array[] {
    return [this.key, new Uint8Array(this.tweakIn.buffer), new Uint8Array(this.t.buffer), new Uint8Array(this.x.buffer), new Uint8Array(this.bounce.buffer)];
  }

  get isDestroyed(): boolean {
    return this.destroyed;
  }

  /** Encrypts whole sectors of `src` into `dst` (same length; may be the same buffer). */
  encrypt(src: Uint8Array, dst: Uint8Array, firstSector: number): void {
    if (this.destroyed) throw new Error('xts: the cipher was destroyed (the image is closed)');
    checkSectors(src.length);
    if (dst.length !== src.length) throw new Error('xts: dst and src lengths differ');
    for (let pos = 0; pos < src.length; pos += SLICE) {
      const len = Math.min(SLICE, src.length - pos);
      this.slice(src.subarray(pos, pos + len), dst.subarray(pos, pos + len), firstSector + pos / 512, true);
    }
  }

  /**
   * Decrypts whole sectors in place. A sector stored as all zeros (never written, punched, or
   * zeroed storage) reads as zeros.
   */
  decrypt(buf: Uint8Array, firstSector: number): void {
    if (this.destroyed) throw new Error('xts: the cipher was destroyed (the image is closed)');
    checkSectors(buf.length);
    for (let pos = 0; pos < buf.length; pos += SLICE) {
      const len = Math.min(SLICE, buf.length - pos);
      const sub = buf.subarray(pos, pos + len);
      this.slice(sub, sub, firstSector + pos / 512, false);
    }
  }

  private slice(src: Uint8Array, dst: Uint8Array, sector: number, encrypt: boolean): void {
    const n = src.length / 512;
    const words = src.length / 4;
    const aligned = (src.byteOffset & 3) === 0;
    let p: Uint32Array;
    if (aligned) p = new Uint32Array(src.buffer, src.byteOffset, words);
    else {
      p = this.bounce.subarray(0, words);
      new Uint8Array(p.buffer, 0, src.length).set(src);
    }
    const zero = this.zeroSector;
    let zeros = 0;
    if (!encrypt) {
      for (let s = 0; s < n; s++) {
        let i = s * WORDS_PER_SECTOR;
        const end = i + WORDS_PER_SECTOR;
        while (i < end && p[i] === 0) i++;
        zero[s] = i === end ? 1 : 0;
        if (i === end) zeros++;
      }
      if (zeros === n) return; // only holes: they already read as zeros
    }
    const tw = this.tweakIn;
    for (let s = 0; s < n; s++) {
      const v = sector + s;
      tw[4 * s] = v >>> 0;
      tw[4 * s + 1] = Math.floor(v / 0x100000000) >>> 0;
      tw[4 * s + 2] = 0;
      tw[4 * s + 3] = 0;
    }
    const t0 = words32(this.tweakEnc.update(new Uint8Array(tw.buffer, 0, n * 16)));
    const t = this.t;
    const x = this.x;
    for (let s = 0; s < n; s++) {
      let w0 = t0[4 * s]!;
      let w1 = t0[4 * s + 1]!;
      let w2 = t0[4 * s + 2]!;
      let w3 = t0[4 * s + 3]!;
      const end = (s + 1) * WORDS_PER_SECTOR;
      for (let i = s * WORDS_PER_SECTOR; i < end; i += 4) {
        t[i] = w0;
        t[i + 1] = w1;
        t[i + 2] = w2;
        t[i + 3] = w3;
        x[i] = p[i]! ^ w0;
        x[i + 1] = p[i + 1]! ^ w1;
        x[i + 2] = p[i + 2]! ^ w2;
        x[i + 3] = p[i + 3]! ^ w3;
        // T·α: a 128-bit little-endian left shift, reduced by x^128 + x^7 + x^2 + x + 1.
        const carry = w3 >>> 31;
        w3 = (w3 << 1) | (w2 >>> 31);
        w2 = (w2 << 1) | (w1 >>> 31);
        w1 = (w1 << 1) | (w0 >>> 31);
        w0 = (w0 << 1) ^ (carry * 0x87);
      }
    }
    const xb = new Uint8Array(x.buffer, 0, src.length);
    const y = words32(encrypt ? this.enc.update(xb) : this.dec.update(xb));
    if (y.length !== words) throw new Error('xts: short ECB output');
    const dstAligned = (dst.byteOffset & 3) === 0;
    const out = dstAligned ? new Uint32Array(dst.buffer, dst.byteOffset, words) : this.bounce.subarray(0, words);
    for (let i = 0; i < words; i++) out[i] = y[i]! ^ t[i]!;
    if (zeros) for (let s = 0; s < n; s++) if (zero[s]) out.fill(0, s * WORDS_PER_SECTOR, (s + 1) * WORDS_PER_SECTOR);
    if (!dstAligned) dst.set(new Uint8Array(out.buffer, 0, src.length));
  }
}

function checkSectors(length: number): void {
  if (length % 512) throw new Error(`xts: ${length} bytes is not a whole number of sectors`);
}

/** A Uint32Array over a Buffer from node:crypto (copied if its offset is not 4-byte aligned). */
function words32(b: Buffer): Uint32Array {
  if ((b.byteOffset & 3) === 0) return new Uint32Array(b.buffer, b.byteOffset, b.length >>> 2);
  return new Uint32Array(Uint8Array.prototype.slice.call(b).buffer);
}

/**
 * Reusable ciphertext buffers for writes (the guest's buffer must not be changed, and the
 * ciphertext must live until its write completes). Power-of-two classes from 4 KiB; large
 * one-off buffers are not kept.
 */
export class BufferPool {
  private readonly free = new Map<number, Uint8Array[]>();
  private kept = 0;
  constructor(
    private readonly maxKeptBytes = 32 * 1024 * 1024,
    private readonly maxPooled = 4 * 1024 * 1024,
  ) {}

  acquire(length: number): Uint8Array {
    let size = 4096;
    while (size < length) size *= 2;
    const list = this.free.get(size);
    const buf = list?.pop();
    if (buf) {
      this.kept -= size;
      return buf.subarray(0, length);
    }
    return new Uint8Array(size).subarray(0, length);
  }

  release(buf: Uint8Array): void {
    const size = buf.buffer.byteLength;
    if (size > this.maxPooled || this.kept + size > this.maxKeptBytes) return;
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    list.push(new Uint8Array(buf.buffer, 0, size));
    this.kept += size;
  }
}
