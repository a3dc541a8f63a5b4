/**
 * The metadata journal: a circular log of 512-byte sectors, each self-contained (own checksum and
 * sequence number), so a torn multi-sector write loses whole sectors, never half a record.
 *
 * Records: BITMAP_SET (a run of blocks became local) and TABLE_SET (chunk → storage chunk id).
 * Updates from concurrent requests are queued and written together by one sequential write
 * (group commit). The order of every commit is what makes the image crash-consistent:
 *   1. fdatasync the image — the data the records point at is durable first;
 *   2. write the journal sectors;
 *   3. fdatasync again — the records are durable before anyone is told so.
 * When the log would overflow, a checkpoint writes the whole bitmap and table in place and moves
 * the header's journal_start_seq past every record; the log then starts over (docs/FORMAT.md §6).
 */
import type { BlockFile } from './io.js';
import { CorruptImageError } from './errors.js';
import { MAX_JOURNAL_SEQ, SECTOR, crc } from './format.js';

export const JOURNAL_MAGIC = 0x4a445646; // "FVDJ" little-endian
export const SECTOR_HEADER = 16;
export const REC_END = 0;
export const REC_BITMAP_SET = 1;
export const REC_TABLE_SET = 2;
const BITMAP_REC_SIZE = 16;
const TABLE_REC_HEADER = 8;
const MAX_TABLE_ENTRIES = Math.floor((SECTOR - SECTOR_HEADER - TABLE_REC_HEADER) / 4);

export interface JournalSink {
  /** A run of blocks [first, first + count) is local. */
  bitmapSet(first: number, count: number): void;
  /** Chunk `chunk` maps to storage chunk `id` (or CHUNK_EMPTY). */
  tableSet(chunk: number, id: number): void;
}

/** Pending updates not yet in the journal. Bitmap runs are merged when adjacent. */
export class PendingRecords {
  bitmap: number[] = []; // flat [first, count, first, count, ...]
  table = new Map<number, number>();
  /** Storage chunks unmapped by this batch's TABLE_SET records: reusable once it is durable. */
  freed: number[] = [];

  /**
   * The volatile pending log (fvd/pending-log.ts), or null: each record added by a writer is
   * appended to it synchronously, before the write that produced it is acknowledged.
   */
  constructor(private readonly sink: JournalSink | null = null) {}

  get empty(): boolean {
    return this.bitmap.length === 0 && this.table.size === 0;
  }

  addBitmap(first: number, count: number): void {
    this.sink?.bitmapSet(first, count);
    this.mergeBitmap(first, count);
  }

  addTable(chunk: number, id: number): void {
    this.sink?.tableSet(chunk, id);
    this.table.set(chunk, id);
  }

  private mergeBitmap(first: number, count: number): void {
    const n = this.bitmap.length;
    if (n && this.bitmap[n - 2]! + this.bitmap[n - 1]! === first) this.bitmap[n - 1]! += count;
    else this.bitmap.push(first, count);
  }

  /** Appends a later batch: its table values win over this one's. Not logged again (already in the log). */
  absorb(later: PendingRecords): void {
    for (let i = 0; i < later.bitmap.length; i += 2) this.mergeBitmap(later.bitmap[i]!, later.bitmap[i + 1]!);
    for (const [c, id] of later.table) this.table.set(c, id);
    for (const id of later.freed) this.freed.push(id);
  }
}

/** Packs records into sectors with consecutive sequence numbers starting at `seq`. */
export function encodeRecords(records: PendingRecords, seq: number): Uint8Array {
  const sectors: Uint8Array[] = [];
  let cur: Uint8Array | null = null;
  let dv: DataView | null = null;
  let pos = 0;
  const room = (need: number) => {
    if (cur && pos + need <= SECTOR) return;
    cur = new Uint8Array(SECTOR);
    dv = new DataView(cur.buffer);
    sectors.push(cur);
    pos = SECTOR_HEADER;
  };
  // TABLE_SET before BITMAP_SET: replay applies a prefix of the sectors, and a bit must never
  // become visible without the chunk mapping its data lives in (compact layout).
  const chunks = [...records.table.keys()].sort((a, b) => a - b);
  for (let i = 0; i < chunks.length; ) {
    let j = i + 1;
    while (j < chunks.length && chunks[j] === chunks[j - 1]! + 1 && j - i < MAX_TABLE_ENTRIES) j++;
    let n = j - i;
    room(TABLE_REC_HEADER + 4);
    n = Math.min(n, Math.floor((SECTOR - pos - TABLE_REC_HEADER) / 4));
    dv!.setUint16(pos, REC_TABLE_SET, true);
    dv!.setUint16(pos + 2, n, true);
    dv!.setUint32(pos + 4, chunks[i]!, true);
    for (let k = 0; k < n; k++) dv!.setUint32(pos + 8 + 4 * k, records.table.get(chunks[i + k]!)!, true);
    pos += TABLE_REC_HEADER + 4 * n;
    i += n;
  }
  const bm = records.bitmap;
  for (let i = 0; i < bm.length; i += 2) {
    let first = bm[i]!;
    let count = bm[i + 1]!;
    while (count > 0) {
      const n = Math.min(count, 0xffffffff);
      room(BITMAP_REC_SIZE);
      dv!.setUint16(pos, REC_BITMAP_SET, true);
      dv!.setUint32(pos + 4, n, true);
      dv!.setBigUint64(pos + 8, BigInt(first), true);
      pos += BITMAP_REC_SIZE;
      first += n;
      count -= n;
    }
  }
  const out = new Uint8Array(sectors.length * SECTOR);
  sectors.forEach((s, k) => {
    const sdv = new DataView(s.buffer);
    sdv.setUint32(0, JOURNAL_MAGIC, true);
    sdv.setBigUint64(8, BigInt(seq + k), true);
    sdv.setUint32(4, crc(s.subarray(8)), true);
    out.set(s, k * SECTOR);
  });
  return out;
}

/**
 * Parses one sector. Returns false when it is not the valid sector `seq` (end of the log);
 * throws CorruptImageError when a checksummed sector holds malformed records.
 */
export function decodeSector(path: string, s: Uint8Array, seq: number, sink: JournalSink): boolean {
  const dv = new DataView(s.buffer, s.byteOffset, SECTOR);
  if (dv.getUint32(0, true) !== JOURNAL_MAGIC) return false;
  if (dv.getUint32(4, true) !== crc(s.subarray(8, SECTOR))) return false;
  if (dv.getBigUint64(8, true) !== BigInt(seq)) return false;
  let pos = SECTOR_HEADER;
  while (pos + 2 <= SECTOR) {
    const type = dv.getUint16(pos, true);
    if (type === REC_END) break;
    if (type === REC_BITMAP_SET) {
      if (pos + BITMAP_REC_SIZE > SECTOR) throw new CorruptImageError(path, `journal record overruns sector (seq ${seq})`);
      const first = Number(dv.getBigUint64(pos + 8, true));
      sink.bitmapSet(first, dv.getUint32(pos + 4, true));
      pos += BITMAP_REC_SIZE;
    } else if (type === REC_TABLE_SET) {
      const n = dv.getUint16(pos + 2, true);
      if (pos + TABLE_REC_HEADER + 4 * n > SECTOR) throw new CorruptImageError(path, `journal record overruns sector (seq ${seq})`);
      const first = dv.getUint32(pos + 4, true);
      for (let k = 0; k < n; k++) sink.tableSet(first + k, dv.getUint32(pos + 8 + 4 * k, true));
      pos += TABLE_REC_HEADER + 4 * n;
    } else {
      throw new CorruptImageError(path, `unknown journal record type ${type} (seq ${seq})`);
    }
  }
  return true;
}

/** Replay reads the log this many sectors at a time (1 MiB), never the whole region at once. */
const REPLAY_WINDOW_SECTORS = 2048;

/**
 * Replays the log from `startSeq`: applies sectors startSeq, startSeq+1, ... until the first one
 * that is missing, torn or stale, or numbered MAX_JOURNAL_SEQ (no writer uses that number, so a
 * replayed image can always checkpoint, FORMAT.md §6.1). Returns the next sequence number to
 * write. Reads go window by window from the start sector, so memory stays bounded and a log that
 * ends early costs one read.
 */
export async function replayJournal(
  file: BlockFile,
  offset: number,
  length: number,
  startSeq: number,
  sink: JournalSink,
): Promise<{ nextSeq: number; sectors: number }> {
  const nsec = length / SECTOR;
  if (nsec === 0) return { nextSeq: startSeq, sectors: 0 };
  const limit = Math.min(startSeq + nsec, MAX_JOURNAL_SEQ);
  const window = new Uint8Array(Math.min(nsec, REPLAY_WINDOW_SECTORS) * SECTOR);
  let seq = startSeq;
  while (seq < limit) {
    // The sectors from index seq mod nsec up to the region's end (the log wraps there), at most a window.
    const idx = seq % nsec;
    const n = Math.min(nsec - idx, window.length / SECTOR, limit - seq);
    const piece = window.subarray(0, n * SECTOR);
    await file.read(piece, offset + idx * SECTOR);
    let k = 0;
    while (k < n && decodeSector(file.path, piece.subarray(k * SECTOR, (k + 1) * SECTOR), seq, sink)) {
      k++;
      seq++;
    }
    if (k < n) break;
  }
  return { nextSeq: seq, sectors: seq - startSeq };
}

/** What the journal needs from the image: a checkpoint that persists all in-memory metadata. */
export interface CheckpointTarget {
  /**
   * Persists the whole bitmap and table in place and sets the header's journal_start_seq to
   * `nextSeq`. Must snapshot the in-memory metadata before its first fdatasync.
   */
  checkpoint(nextSeq: number): Promise<void>;
}

/** Where queued records are also appended, and told which of them became durable. */
export interface PendingSink extends JournalSink {
  /** Sequence number of the last record appended. */
  readonly lastSeq: number;
  /** Every record up to `seq` is durable in the image. */
  markCommitted(seq: number): void;
}

/** The writer side: queue, group commit, wrap-around, checkpoint when full. */
export class Journal {
  pending = new PendingRecords();
  private log: PendingSink | null = null;
  private nsec: number;
  private used: number; // sectors written since the last checkpoint
  private chain: Promise<void> = Promise.resolve();
  private queuedCommit: Promise<void> | null = null;
  /** Number of group commits and sectors written, for `info` and benchmarks. */
  stats = { commits: 0, sectors: 0, checkpoints: 0, bitmapRuns: 0, tableEntries: 0 };

  constructor(
    private readonly file: BlockFile,
    private offset: number,
    length: number,
    private nextSeq: number,
    usedSectors: number,
    private readonly target: CheckpointTarget,
    /** Called when a batch of records became durable (by a commit or a checkpoint). */
    private readonly onDurable: (batch: PendingRecords) => void,
  ) {
    this.nsec = length / SECTOR;
    this.used = usedSectors;
  }

  /**
   * Appends every record queued from now on to `log` too (the volatile pending log). Records
   * queued before (none after a fresh open, whose checkpoint emptied the queue) are not.
   */
  attachPendingLog(log: PendingSink | null): void {
    this.log = log;
    const next = new PendingRecords(log);
    next.absorb(this.pending);
    this.pending = next;
  }

  private freshPending(): PendingRecords {
    return new PendingRecords(this.log);
  }

  get sectorsUsed(): number {
    return this.used;
  }

  get capacity(): number {
    return this.nsec;
  }

  get sequence(): number {
    return this.nextSeq;
  }

  /**
   * Makes every record queued before this call durable (and all completed data writes, since a
   * commit begins with fdatasync). Concurrent callers share one commit: while one runs, every
   * later caller waits for the single next commit, which takes everything queued meanwhile.
   */
  commit(): Promise<void> {
    if (this.queuedCommit) return this.queuedCommit;
    const p = this.chain.then(() => {
      this.queuedCommit = null;
      return this.runCommit();
    });
    this.queuedCommit = p;
    this.chain = p.catch(() => {});
    return p;
  }

  /** Writes all metadata in place and empties the log (clean close, `check --repair`). */
  checkpoint(): Promise<void> {
    const p = this.chain.then(() => this.runCheckpoint(null));
    this.chain = p.catch(() => {});
    return p;
  }

  /**
   * Moves the log (a served compact image's grow, FvdImage.growOnline): in the journal's order —
   * after every commit queued before this call, before any queued after — a checkpoint empties
   * the log (every record queued so far joins it), then `change` rewrites the layout while no
   * commit can run and returns where the log now lives. If `change` throws, the log stays where
   * it was (its records are in place already); the error goes to the caller.
   */
  relocate(change: () => Promise<{ offset: number; length: number; startSeq: number }>): Promise<void> {
    const p = this.chain.then(async () => {
      await this.runCheckpoint(null);
      const r = await change();
      this.offset = r.offset;
      this.nsec = r.length / SECTOR;
      this.nextSeq = r.startSeq;
      this.used = 0;
    });
    this.chain = p.catch(() => {});
    return p;
  }

  private async runCommit(): Promise<void> {
    const batch = this.pending;
    // The log's records up to here are all in this batch (records are appended as they are queued).
    const logSeq = this.log?.lastSeq ?? 0;
    if (batch.empty) {
      await this.file.flush();
      return;
    }
    this.pending = this.freshPending();
    const bytes = encodeRecords(batch, this.nextSeq);
    const n = bytes.length / SECTOR;
    // A full log, or sequence numbers used up (only a damaged or hostile header starts near the
    // limit, FORMAT.md §6.1): the in-memory metadata already contains this batch, and a
    // checkpoint persists it without using a number, so the header stays valid.
    if (this.used + n > this.nsec || this.nextSeq + n > MAX_JOURNAL_SEQ) {
      await this.runCheckpoint(batch);
      return;
    }
    try {
      await this.file.flush();
      const idx = this.nextSeq % this.nsec;
      const first = Math.min(n, this.nsec - idx);
      const writes = [this.file.write(bytes.subarray(0, first * SECTOR), this.offset + idx * SECTOR)];
      if (first < n) writes.push(this.file.write(bytes.subarray(first * SECTOR), this.offset));
      await Promise.all(writes);
      await this.file.flush();
    } catch (err) {
      this.requeue(batch);
      throw err;
    }
    this.nextSeq += n;
    this.used += n;
    this.stats.commits++;
    this.stats.sectors += n;
    this.stats.bitmapRuns += batch.bitmap.length / 2;
    this.stats.tableEntries += batch.table.size;
    this.log?.markCommitted(logSeq);
    this.onDurable(batch);
  }

  /**
   * `taken` is a batch already removed from the queue (or null). The target snapshots the
   * in-memory metadata synchronously, before its first await, so it covers every record queued
   * up to this call.
   */
  private async runCheckpoint(taken: PendingRecords | null = null): Promise<void> {
    const batch = taken ?? new PendingRecords();
    batch.absorb(this.pending);
    this.pending = this.freshPending();
    // The target snapshots the in-memory metadata synchronously below: it holds every logged record.
    const logSeq = this.log?.lastSeq ?? 0;
    try {
      await this.target.checkpoint(this.nextSeq);
    } catch (err) {
      this.requeue(batch);
      throw err;
    }
    this.used = 0;
    this.stats.checkpoints++;
    this.log?.markCommitted(logSeq);
    this.onDurable(batch);
  }

  /** Puts a failed batch back in front of what was queued since, so nothing is lost. */
  private requeue(batch: PendingRecords): void {
    const next = this.freshPending();
    next.absorb(batch);
    next.absorb(this.pending);
    this.pending = next;
  }
}
