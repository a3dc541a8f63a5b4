/**
 * Power-cut simulation. CrashIo wraps a MemIo and, from startRecording() on, logs every write,
 * zeroRange, truncate, create and flush per file, in order, each with a global sequence number at
 * submission (`start`) and at completion (`end`). A crash point k is a position in that sequence:
 * exactly the events numbered < k have happened.
 *
 * rebuild(k, rng) reconstructs the files as they could be found after a power cut at k:
 *  - the state at startRecording() is durable;
 *  - for each file, D = the submission number of the last flush on that file that completed
 *    before k; every write/zeroRange/truncate that completed before D is durable (fdatasync
 *    semantics: a flush covers writes that completed before it was issued);
 *  - every other write/zeroRange submitted before k (completed or still in flight) is independently
 *    kept, lost, or torn: a random subset of its 512-byte sectors (by absolute file offset) kept;
 *  - a non-durable truncate is kept or lost; a create of a file that existed changes nothing
 *    (it never truncates: OpenOptions.create); a file that did not exist and was created is there after the crash only if a
 *    directory sync of its directory (IoBackend.syncDirectoryOf) submitted after the create
 *    completed before k — else it is kept or lost (gone, with everything written to it), like any
 *    other non-durable event: an fdatasync makes data durable, not the name.
 * Events are replayed in completion order (in-flight ones last, by submission), so a later write
 * wins over an earlier one wherever both were kept.
 */
import path from 'node:path';
import type { BlockFile, IoBackend, OpenOptions } from '../../fvd/io.js';
import { MemData, MemIo } from './mem-io.js';
import type { Rng } from './rng.js';

export type CrashEventKind = 'write' | 'zero' | 'truncate' | 'create' | 'flush' | 'dirsync';

export interface CrashEvent {
  kind: CrashEventKind;
  /** Resolved path (MemIo.key). */
  path: string;
  offset: number;
  length: number;
  /** The bytes written (write only). */
  data?: Uint8Array;
  /** Sequence number at submission. */
  start: number;
  /** Sequence number at completion; undefined while in flight (or if it failed). */
  end?: number;
  failed?: boolean;
}

export interface TearWeights {
  keep: number;
  lose: number;
  tear: number;
}

export interface RebuildResult {
  io: MemIo;
  /** Counts of what happened to the non-durable events. */
  durable: number;
  kept: number;
  lost: number;
  torn: number;
  /** One line per non-durable event, for failure reports. */
  choices: string[];
}

export const SECTOR = 512;

/** Applies `ev` (a write or zero) restricted to the sectors selected by `keepSector` to `data`. */
function applyPieces(data: MemData, ev: CrashEvent, keepSector: (i: number) => boolean): void {
  let pos = ev.offset;
  const end = ev.offset + ev.length;
  let i = 0;
  while (pos < end) {
    const next = Math.min(end, (Math.floor(pos / SECTOR) + 1) * SECTOR);
    if (keepSector(i)) {
      if (ev.kind === 'write') {
        data.write(ev.data!.subarray(pos - ev.offset, next - ev.offset), pos);
      } else {
        data.zero(pos, next - pos);
      }
    }
    pos = next;
    i++;
  }
}

function sectorCount(ev: CrashEvent): number {
  if (ev.length === 0) return 0;
  return Math.floor((ev.offset + ev.length - 1) / SECTOR) - Math.floor(ev.offset / SECTOR) + 1;
}

class CrashFile implements BlockFile {
  constructor(
    private readonly owner: CrashIo,
    private readonly inner: BlockFile,
    private readonly key: string,
  ) {}
  get path(): string {
    return this.inner.path;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get isBlockDevice(): boolean {
    return this.inner.isBlockDevice;
  }
  read(buf: Uint8Array, offset: number): Promise<void> {
    return this.inner.read(buf, offset);
  }
  write(buf: Uint8Array, offset: number): Promise<void> {
    const ev = this.owner.begin({ kind: 'write', path: this.key, offset, length: buf.length, data: buf.slice() });
    return this.owner.track(ev, this.inner.write(buf, offset), () => {
      if (ev) ev.data = buf.slice();
    });
  }
  zeroRange(offset: number, length: number): Promise<void> {
    const ev = this.owner.begin({ kind: 'zero', path: this.key, offset, length });
    return this.owner.track(ev, this.inner.zeroRange(offset, length));
  }
  truncate(length: number): Promise<void> {
    const ev = this.owner.begin({ kind: 'truncate', path: this.key, offset: 0, length });
    return this.owner.track(ev, this.inner.truncate(length));
  }
  flush(): Promise<void> {
    const ev = this.readOnly ? undefined : this.owner.begin({ kind: 'flush', path: this.key, offset: 0, length: 0 });
    return this.owner.track(ev, this.inner.flush());
  }
  size(): number {
    return this.inner.size();
  }
  nextData(offset: number): number | null {
    return this.inner.nextData?.(offset) ?? null;
  }
  nextHole(offset: number): number | null {
    return this.inner.nextHole?.(offset) ?? null;
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

export class CrashIo implements IoBackend {
  /** The next sequence number; a crash point k lies in [0, seq]. */
  seq = 0;
  events: CrashEvent[] = [];
  private initial?: Map<string, Uint8Array>;
  /** Labelled positions, for failure reports (e.g. "flush #3 acked"). */
  marks: { seq: number; label: string }[] = [];

  constructor(readonly inner: MemIo) {}

  get recording(): boolean {
    return this.initial !== undefined;
  }

  /** Snapshots the current files as the durable starting state and starts logging. */
  startRecording(): void {
    this.initial = this.inner.snapshot();
    this.events = [];
    this.marks = [];
    this.seq = 0;
  }

  mark(label: string): void {
    this.marks.push({ seq: this.seq, label });
  }

  begin(ev: Omit<CrashEvent, 'start'>): CrashEvent | undefined {
    if (!this.recording) return undefined;
    const e: CrashEvent = { ...ev, start: this.seq++ };
    this.events.push(e);
    return e;
  }

  track(ev: CrashEvent | undefined, p: Promise<void>, onDone?: () => void): Promise<void> {
    if (!ev) return p;
    return p.then(
      () => {
        onDone?.();
        ev.end = this.seq++;
      },
      (err: unknown) => {
        ev.failed = true;
        throw err;
      },
    );
  }

  /** Records a directory sync (of `p`'s directory), which completes at once. */
  syncDirectoryOf(p: string): Promise<void> {
    const ev = this.begin({ kind: 'dirsync', path: path.dirname(MemIo.key(p)), offset: 0, length: 0 });
    return this.track(ev, Promise.resolve());
  }

  /** Whether the name of `file`, created by event `create`, is durable at crash point k. */
  private nameDurable(file: string, create: CrashEvent, k: number): boolean {
    if (create.end === undefined || create.end >= k) return false;
    const dir = path.dirname(file);
    return this.events.some((e) => e.kind === 'dirsync' && e.path === dir && e.start > create.end! && e.end !== undefined && e.end < k);
  }

  async open(p: string, options: OpenOptions = {}): Promise<BlockFile> {
    const key = MemIo.key(p);
    const ev = options.create ? this.begin({ kind: 'create', path: key, offset: 0, length: 0 }) : undefined;
    const f = await this.track(ev, Promise.resolve()).then(() => this.inner.open(p, options));
    return new CrashFile(this, f, key);
  }

  /** D for a file at crash point k: submission number of the last flush completed before k, or -1. */
  durablePoint(path: string, k: number): number {
    let d = -1;
    for (const e of this.events) {
      if (e.kind === 'flush' && e.path === path && e.end !== undefined && e.end < k && e.start > d) d = e.start;
    }
    return d;
  }

  /**
   * Power-cut points (0..seq) to test: all of them when seq + 1 ≤ `max`; otherwise the point right after every completed flush, topped up with random ones to
   * `max`. Sorted.
   */
  crashPoints(max: number, rng: Rng): number[] {
    const n = this.seq;
    const points = new Set<number>();
    if (n + 1 <= max) for (let k = 0; k <= n; k++) points.add(k);
    else {
      for (const e of this.events) if (e.kind === 'flush' && e.end !== undefined) points.add(e.end + 1);
      while (points.size < max) points.add(rng.int(n + 1));
    }
    return [...points].sort((a, b) => a - b);
  }

  /** Reconstructs the files after a power cut at k (see the file comment). */
  rebuild(k: number, rng: Rng, weights: TearWeights = { keep: 1, lose: 1, tear: 1 }): RebuildResult {
    return this.rebuildWith(k, (_e, n) => {
      const choice = rng.weighted([weights.keep, weights.lose, n > 1 ? weights.tear : 0]);
      if (choice === 0) return 'keep';
      if (choice === 1) return 'lose';
      const mask: boolean[] = [];
      for (let i = 0; i < n; i++) mask.push(rng.chance(0.5));
      return mask;
    });
  }

  /**
   * Like rebuild, with the fate of each non-durable event decided by `decide` (given the event and
   * its number of sectors; a truncate counts as one): keep it, lose it, or keep the sectors whose
   * mask entry is true. For hand-made crash states in regression tests.
   */
  rebuildWith(k: number, decide: (e: CrashEvent, sectors: number) => 'keep' | 'lose' | boolean[]): RebuildResult {
    if (!this.initial) throw new Error('CrashIo.rebuild before startRecording');
    if (k < 0 || k > this.seq) throw new RangeError(`crash point ${k} outside [0, ${this.seq}]`);
    const res: RebuildResult = { io: new MemIo(), durable: 0, kept: 0, lost: 0, torn: 0, choices: [] };
    const files = new Map<string, MemData>();
    for (const [p, c] of this.initial) files.set(p, new MemData(c.slice()));
    const paths = new Set<string>(files.keys());
    const lostFiles = new Set<string>();
    for (const e of this.events) if (e.kind !== 'dirsync') paths.add(e.path);
    for (const path of [...paths].sort()) {
      const d = this.durablePoint(path, k);
      const evs = this.events
        .filter((e) => e.path === path && e.start < k && e.kind !== 'flush' && !e.failed)
        .map((e) => ({ e, key: e.end !== undefined && e.end < k ? e.end : Number.MAX_SAFE_INTEGER }))
        .sort((a, b) => a.key - b.key || a.e.start - b.e.start)
        .map((x) => x.e);
      for (const e of evs) {
        if (e.kind === 'dirsync') continue;
        let data = files.get(path);
        if (e.kind === 'create') {
          if (data) {
            // never truncates (OpenOptions.create)
          } else if (this.nameDurable(path, e, k)) files.set(path, new MemData());
          else {
            const label = `${path} create (name not durable) [${e.start},${e.end ?? 'inflight'}]`;
            const choice = decide(e, 1);
            if (choice === 'lose' || (Array.isArray(choice) && !choice[0])) {
              res.lost++;
              res.choices.push(`${label}: lost (the file is gone)`);
              lostFiles.add(path);
              break;
            }
            res.kept++;
            res.choices.push(`${label}: kept`);
            files.set(path, new MemData());
          }
          continue;
        }
        if (!data) {
          data = new MemData();
          files.set(path, data);
        }
        const durable = e.end !== undefined && e.end < k && e.end < d;
        if (durable) {
          res.durable++;
          if (e.kind === 'truncate') data.truncate(e.length);
          else applyPieces(data, e, () => true);
          continue;
        }
        const n = e.kind === 'truncate' ? 1 : sectorCount(e);
        let choice = decide(e, n);
        if (Array.isArray(choice) && e.kind === 'truncate') choice = choice[0] ? 'keep' : 'lose';
        const label = `${path} ${e.kind} @${e.offset}+${e.length} [${e.start},${e.end ?? 'inflight'}]`;
        if (choice === 'keep') {
          res.kept++;
          res.choices.push(`${label}: kept`);
          if (e.kind === 'truncate') data.truncate(e.length);
          else applyPieces(data, e, () => true);
        } else if (choice === 'lose') {
          res.lost++;
          res.choices.push(`${label}: lost`);
        } else {
          const mask = choice;
          res.torn++;
          res.choices.push(`${label}: torn ${mask.map((b) => (b ? '1' : '0')).join('')}`);
          applyPieces(data, e, (i) => !!mask[i]);
        }
      }
    }
    for (const [p, d] of files) if (!lostFiles.has(p)) res.io.files.set(p, d);
    return res;
  }
}
