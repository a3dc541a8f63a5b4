/**
 * The volatile pending log (docs/FORMAT.md §14): a companion file on tmpfs that holds every
 * BITMAP_SET / TABLE_SET record queued for the journal but not yet committed.
 *
 * Why: a write is acknowledged once its data completed and its record is queued (memory only);
 * the record reaches the journal at the next flush. If the serving process dies in between, the
 * data is in the page cache but the record that exposes it is gone, and a device that survives
 * its daemon (ublk USER_RECOVERY) would then read stale data over an acknowledged write. The log
 * keeps those records across a process crash and dies with the boot: after a reboot the guest
 * rebooted too, and the ordinary power-cut rules hold (the bootId check rejects the log).
 *
 * Records are appended synchronously, one pwrite each, when they are queued, i.e. before the
 * write that produced them is acknowledged; a batch (hold … release: the writes a queue thread
 * stored, adopted together) goes in one pwrite before any of its writes is acknowledged. Each
 * record describes a write that had completed.
 */
import { closeSync, fstatSync, ftruncateSync, openSync, readFileSync, readdirSync, unlinkSync, writeSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { crc } from './format.js';
import type { JournalSink } from './journal.js';

export const PENDING_LOG_MAGIC = 0x50445646; // "FVDP" little-endian
export const PENDING_LOG_VERSION = 1;
export const PENDING_LOG_HEADER = 128;
export const PENDING_RECORD = 32;
export const PENDING_BITMAP = 1;
export const PENDING_TABLE = 2;
const BOOT_ID_FIELD = 48; // at 16
const FILE_ID_FIELD = 52; // at 64
const HEADER_CRC_AT = 116; // crc of bytes [0, 116)
const COMMITTED_AT = 120; // u64, outside the crc: rewritten alone by one 8-byte pwrite

/** Who the log belongs to: this boot and this image file. */
export interface PendingLogIdentity {
  /** Where the log lives (tmpfs, e.g. /run/fvd/pending-<dev>-<ino>.log). */
  path: string;
  /** /proc/sys/kernel/random/boot_id of the boot that wrote it. */
  bootId: string;
  /** The image file's identity ("dev:ino"). */
  fileId: string;
}

export interface PendingRecord {
  seq: number;
  kind: typeof PENDING_BITMAP | typeof PENDING_TABLE;
  /** BITMAP: first block; TABLE: chunk. */
  a: number;
  /** BITMAP: block count; TABLE: storage chunk id. */
  b: number;
}

export type PendingLogStatus = 'absent' | 'valid' | 'boot-mismatch' | 'file-mismatch' | 'bad-header';

export interface PendingLogContents {
  status: PendingLogStatus;
  committedSeq: number;
  /** Valid records in file order, up to the first torn or out-of-sequence one. */
  records: PendingRecord[];
  /** The highest sequence number seen (committedSeq when there are no records). */
  lastSeq: number;
}

function putAscii(dv: DataView, at: number, field: number, s: string): void {
  if (s.length > field) throw new Error(`pending log: identity '${s}' longer than ${field} bytes`);
  for (let i = 0; i < field; i++) dv.setUint8(at + i, i < s.length ? s.charCodeAt(i) & 0x7f : 0);
}

function getAscii(bytes: Uint8Array, at: number, field: number): string {
  let s = '';
  for (let i = 0; i < field && bytes[at + i] !== 0; i++) s += String.fromCharCode(bytes[at + i]!);
  return s;
}

export function encodePendingHeader(bootId: string, fileId: string, committedSeq: number): Uint8Array {
  const h = new Uint8Array(PENDING_LOG_HEADER);
  const dv = new DataView(h.buffer);
  dv.setUint32(0, PENDING_LOG_MAGIC, true);
  dv.setUint16(4, PENDING_LOG_VERSION, true);
  dv.setUint16(6, PENDING_LOG_HEADER, true);
  putAscii(dv, 16, BOOT_ID_FIELD, bootId);
  putAscii(dv, 64, FILE_ID_FIELD, fileId);
  dv.setUint32(HEADER_CRC_AT, crc(h.subarray(0, HEADER_CRC_AT)), true);
  dv.setBigUint64(COMMITTED_AT, BigInt(committedSeq), true);
  return h;
}

export function encodePendingRecord(r: PendingRecord): Uint8Array {
  const b = new Uint8Array(PENDING_RECORD);
  encodePendingRecordAt(b, new DataView(b.buffer), 0, r.seq, r.kind, r.a, r.b);
  return b;
}

/**
 * Encodes one record into `bytes` at `at` (`dv` views the same bytes): the writer's append path,
 * which fills its preallocated buffer instead of allocating a record per write. Sequence numbers
 * and block numbers stay below 2^53; the u64 fields are written as two u32 halves so that no
 * BigInt is made either.
 */
export function encodePendingRecordAt(bytes: Uint8Array, dv: DataView, at: number, seq: number, kind: PendingRecord['kind'], a: number, b: number): void {
  putU64(dv, at, seq);
  dv.setUint16(at + 8, kind, true);
  dv.setUint16(at + 10, 0, true);
  dv.setUint32(at + 12, b, true);
  putU64(dv, at + 16, a);
  dv.setUint32(at + 24, 0, true);
  dv.setUint32(at + 28, crc(bytes.subarray(at, at + 28)), true);
}

function putU64(dv: DataView, at: number, n: number): void {
  dv.setUint32(at, n % 0x1_0000_0000, true);
  dv.setUint32(at + 4, Math.floor(n / 0x1_0000_0000), true);
}

/** Parses a log's bytes against the expected identity (pure; the file reader is below). */
export function parsePendingLog(bytes: Uint8Array, bootId: string, fileId: string): PendingLogContents {
  const none = (status: PendingLogStatus): PendingLogContents => ({ status, committedSeq: 0, records: [], lastSeq: 0 });
  if (bytes.length < PENDING_LOG_HEADER) return none('bad-header');
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  if (dv.getUint32(0, true) !== PENDING_LOG_MAGIC || dv.getUint16(4, true) !== PENDING_LOG_VERSION) return none('bad-header');
  if (dv.getUint32(HEADER_CRC_AT, true) !== crc(bytes.subarray(0, HEADER_CRC_AT))) return none('bad-header');
  if (getAscii(bytes, 16, BOOT_ID_FIELD) !== bootId) return none('boot-mismatch');
  if (getAscii(bytes, 64, FILE_ID_FIELD) !== fileId) return none('file-mismatch');
  const committedSeq = Number(dv.getBigUint64(COMMITTED_AT, true));
  const records: PendingRecord[] = [];
  let prev = -1;
  for (let at = PENDING_LOG_HEADER; at + PENDING_RECORD <= bytes.length; at += PENDING_RECORD) {
    if (dv.getUint32(at + 28, true) !== crc(bytes.subarray(at, at + 28))) break; // torn: the end
    const seq = Number(dv.getBigUint64(at, true));
    if (prev >= 0 && seq !== prev + 1) break; // a stale tail from before a truncation
    const kind = dv.getUint16(at + 8, true);
    if (kind !== PENDING_BITMAP && kind !== PENDING_TABLE) break;
    records.push({ seq, kind, a: Number(dv.getBigUint64(at + 16, true)), b: dv.getUint32(at + 12, true) });
    prev = seq;
  }
  return { status: 'valid', committedSeq, records, lastSeq: Math.max(committedSeq, prev) };
}

export function readPendingLog(id: PendingLogIdentity): PendingLogContents {
  let bytes: Uint8Array;
  try {
    bytes = readFileSync(id.path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { status: 'absent', committedSeq: 0, records: [], lastSeq: 0 };
    throw err;
  }
  return parsePendingLog(bytes, id.bootId, id.fileId);
}

/**
 * Applies the records not yet committed (seq > committedSeq), in log order. Re-applying a record
 * the journal already holds is harmless: BITMAP_SET only sets bits and TABLE_SET is
 * last-writer-wins per chunk, so a suffix applied over a prefix gives the state at the log's end.
 */
export function applyPendingLog(log: PendingLogContents, sink: JournalSink): number {
  if (log.status !== 'valid') return 0;
  let n = 0;
  for (const r of log.records) {
    if (r.seq <= log.committedSeq) continue;
    if (r.kind === PENDING_BITMAP) sink.bitmapSet(r.a, r.b);
    else sink.tableSet(r.a, r.b);
    n++;
  }
  return n;
}

/**
 * Queue thread `qid`'s log next to the log at `path` (FORMAT.md §14.4): `pending-X.log` →
 * `pending-X.q<qid>.log`.
 */
export function queueLogPath(path: string, qid: number): string {
  return `${path.replace(/\.log$/, '')}.q${qid}.log`;
}

/** The queue logs that exist next to the log at `path`, whatever their queue numbers. */
export function existingQueueLogs(path: string): string[] {
  const stem = `${basename(path).replace(/\.log$/, '')}.q`;
  let names: string[];
  try {
    names = readdirSync(dirname(path));
  } catch {
    return [];
  }
  return names.filter((n) => n.startsWith(stem) && /^\d+\.log$/.test(n.slice(stem.length))).map((n) => join(dirname(path), n));
}

/** Reads every queue log next to the log of `id` (same identity rules as the log itself). */
export function readQueueLogs(id: PendingLogIdentity): PendingLogContents[] {
  return existingQueueLogs(id.path).map((path) => readPendingLog({ ...id, path }));
}

export function unlinkPendingLog(path: string): void {
  try {
    unlinkSync(path);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}

/**
 * A queue thread's log (FORMAT.md §14.4): the records of the writes the thread stored and answered
 * itself, appended before each answer, until the main thread has taken them into the image's own
 * log. One writer (the queue thread), one pwrite per record, no allocation. `drained[slot]` is
 * the main thread's count of this queue's records that are in its log (mod 2^32); once it equals
 * the count appended here, the records in the file are all spent and the next one starts over at
 * the first record's place (the older ones behind it end the log for a reader: their sequence
 * numbers are lower).
 */
export class QueueLogWriter {
  private seq = 0;
  /** Records in the file since it last started over. */
  private count = 0;
  /** Records appended, mod 2^32 (compared with drained[slot]). */
  private appended = 0;
  private readonly one = new Uint8Array(PENDING_RECORD);
  private readonly oneView = new DataView(this.one.buffer);

  constructor(
    private readonly fd: number,
    private readonly drained: Int32Array,
    private readonly slot: number,
  ) {}

  /** Appends BITMAP_SET(first, count); false when the write failed (nothing appended then). */
  append(first: number, count: number): boolean {
    if (this.count > 0 && ((this.appended - Atomics.load(this.drained, this.slot)) | 0) === 0) this.count = 0;
    encodePendingRecordAt(this.one, this.oneView, 0, this.seq + 1, PENDING_BITMAP, first, count);
    try {
      if (writeSync(this.fd, this.one, 0, PENDING_RECORD, PENDING_LOG_HEADER + this.count * PENDING_RECORD) !== PENDING_RECORD) return false;
    } catch {
      return false;
    }
    this.seq++;
    this.count++;
    this.appended = (this.appended + 1) | 0;
    return true;
  }

  /** Records in the file now (for tests). */
  get records(): number {
    return this.count;
  }
}

/** The writer the journal's pending queue appends to (fvd/journal.ts PendingRecords). */
export class PendingLogWriter implements JournalSink {
  private fd: number;
  private seq: number;
  private committed: number;
  /** Records in the file after the header (since the last truncation). */
  private count = 0;
  /** While held (hold): the records appended since, written together by release. */
  private holding = false;
  private held = new Uint8Array(16 * PENDING_RECORD);
  private heldView = new DataView(this.held.buffer);
  private heldCount = 0;
  /** One record, encoded in place by an unheld append (and the committed mark's 8 bytes). */
  private readonly one = new Uint8Array(PENDING_RECORD);
  private readonly oneView = new DataView(this.one.buffer);
  /** The queue logs made by createQueueLogs: closed, and removed with this log, by close. */
  private queueFds: number[] = [];

  private constructor(
    readonly path: string,
    fd: number,
    startSeq: number,
    private readonly id: PendingLogIdentity,
  ) {
    this.fd = fd;
    this.seq = startSeq;
    this.committed = startSeq;
  }

  /** Creates (or replaces) the log; sequence numbers continue after `startSeq`. */
  static create(id: PendingLogIdentity, startSeq = 0): PendingLogWriter {
    const fd = openSync(id.path, 'w', 0o600);
    try {
      writeSync(fd, encodePendingHeader(id.bootId, id.fileId, startSeq), 0, PENDING_LOG_HEADER, 0);
    } catch (err) {
      closeSync(fd);
      throw err;
    }
    return new PendingLogWriter(id.path, fd, startSeq, id);
  }

  /**
   * Creates (or replaces) the logs of queue threads 0 … queues−1 next to this one, each with this
   * log's header, and returns their descriptors for the threads' QueueLogWriters.
   */
  createQueueLogs(queues: number): number[] {
    for (let q = 0; q < queues; q++) {
      const fd = openSync(queueLogPath(this.path, q), 'w', 0o600);
      this.queueFds.push(fd);
      writeSync(fd, encodePendingHeader(this.id.bootId, this.id.fileId, 0), 0, PENDING_LOG_HEADER, 0);
    }
    return this.queueFds.slice();
  }

  /** The sequence number of the last record appended. */
  get lastSeq(): number {
    return this.seq;
  }

  get committedSeq(): number {
    return this.committed;
  }

  get size(): number {
    return this.fd >= 0 ? fstatSync(this.fd).size : 0;
  }

  bitmapSet(first: number, count: number): void {
    this.append(PENDING_BITMAP, first, count);
  }

  tableSet(chunk: number, id: number): void {
    this.append(PENDING_TABLE, chunk, id);
  }

  /** Records appended from now on are buffered until release (a batch: one write for all). */
  hold(): void {
    this.holding = true;
  }

  /**
   * Writes the records appended since hold in one pwrite, after the earlier ones, and stops
   * holding. On failure (thrown) none of them counts as appended, as when a single append fails.
   */
  release(): void {
    this.holding = false;
    const n = this.heldCount;
    if (n === 0) return;
    this.heldCount = 0;
    try {
      writeSync(this.fd, this.held, 0, n * PENDING_RECORD, PENDING_LOG_HEADER + this.count * PENDING_RECORD);
    } catch (err) {
      this.seq -= n;
      throw err;
    }
    this.count += n;
  }

  private append(kind: PendingRecord['kind'], a: number, b: number): void {
    if (this.fd < 0) return;
    if (this.holding) {
      if ((this.heldCount + 1) * PENDING_RECORD > this.held.length) {
        // Grows to the largest batch seen, then stays: no allocation per record after that.
        const bigger = new Uint8Array(this.held.length * 2);
        bigger.set(this.held);
        this.held = bigger;
        this.heldView = new DataView(bigger.buffer);
      }
      encodePendingRecordAt(this.held, this.heldView, this.heldCount * PENDING_RECORD, this.seq + 1, kind, a, b);
      this.heldCount++;
      this.seq++;
      return;
    }
    encodePendingRecordAt(this.one, this.oneView, 0, this.seq + 1, kind, a, b);
    writeSync(this.fd, this.one, 0, PENDING_RECORD, PENDING_LOG_HEADER + this.count * PENDING_RECORD);
    this.seq++;
    this.count++;
  }

  /**
   * Every record up to `seq` is durable in the image (journal commit or checkpoint). When nothing
   * newer was appended, the records are dropped, so the log stays small under regular flushes.
   */
  markCommitted(seq: number): void {
    if (this.fd < 0 || seq <= this.committed) return;
    this.committed = seq;
    putU64(this.oneView, 0, seq);
    writeSync(this.fd, this.one, 0, 8, COMMITTED_AT);
    if (seq === this.seq && this.count > 0) {
      ftruncateSync(this.fd, PENDING_LOG_HEADER);
      this.count = 0;
    }
  }

  /** Closes the file; `unlink` after a clean close (everything checkpointed). */
  close(unlink: boolean): void {
    if (this.fd < 0) return;
    closeSync(this.fd);
    this.fd = -1;
    for (const fd of this.queueFds) closeSync(fd);
    this.queueFds = [];
    if (unlink) {
      unlinkPendingLog(this.path);
      for (const path of existingQueueLogs(this.path)) unlinkPendingLog(path);
    }
  }
}
