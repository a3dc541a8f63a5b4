/**
 * Per-request trace of the served device (FVD_TRACE=<file>, daemon/trace-file.ts writes it): when
 * each request passed each stage, on one clock shared by all threads, so that a summary
 * (bench/trace-report.ts) can say where the microseconds of a request go.
 *
 * Memory, all in SharedArrayBuffers made once by the main thread:
 *  - `current`: one record per request slot (slot = qid * depth + tag) being served. The queue
 *    thread that got the request begins it, the engine on the main thread stamps its stages in
 *    it (FvdImage.read/write with the slot), the queue thread ends it at the commit.
 *  - per queue a `log`: a ring of finished records with a count. Its one writer is the queue
 *    thread (at the commit); the main thread drains it (TraceDrain) about once a second, so
 *    the ring only laps (and drops the oldest) above `capacity` requests per second.
 * The engine's stamps reach the queue thread's copy through the completion ring's atomics,
 * which order them before the commit.
 *
 * Per request: no allocation, promise or closure — stores into preallocated Float64Arrays.
 * Off (no FVD_TRACE), callers hold a null recorder / pass slot -1 and test only that.
 */

/** Stages, in the order a request passes them; a record's stamp is 0 where it did not pass. */
export const STAGE_CQE = 0; // queue thread: the request's FETCH completion reaped
export const STAGE_POSTED = 1; // queue thread: handed to the main thread ('slow' message)
export const STAGE_ENGINE_START = 2; // main thread: the engine starts it
export const STAGE_BASE_START = 3; // first base read issued (engine, or the queue thread's own)
export const STAGE_BASE_END = 4; // last base read done
export const STAGE_WRITE_START = 5; // first image data write issued (engine)
export const STAGE_WRITE_END = 6; // last image data write done
export const STAGE_ENGINE_DONE = 7; // main thread: the engine finished, result pushed back
export const STAGE_COMMIT = 8; // queue thread: COMMIT_AND_FETCH queued with the result
export const STAGES = 9;
export const STAGE_NAMES = ['cqe', 'posted', 'engine', 'base-start', 'base-end', 'write-start', 'write-end', 'engine-done', 'commit'];

/** Record fields: op (UBLK_IO_OP_*), route (ROUTE_*), length in bytes, then STAGES stamps (ms). */
export const F_OP = 0;
export const F_ROUTE = 1;
export const F_LENGTH = 2;
export const F_STAMPS = 3;
export const RECORD = F_STAMPS + STAGES;

/** Where the queue thread sent the request (fvd/mapping.ts's kinds, plus the engine). */
export const ROUTE_ENGINE = 0;
export const ROUTE_STORED = 1;
export const ROUTE_ZERO = 2;
export const ROUTE_BASE = 3;
export const ROUTE_NAMES = ['engine', 'stored', 'zero', 'base'];

/** Default ring size per queue: ~6 MB of records, drained once a second. */
export const DEFAULT_LOG_CAPACITY = 1 << 16;

/**
 * The clock: CLOCK_MONOTONIC in ms, the same for every thread. performance.now() is cheap and
 * allocation-free but counts from each thread's own origin (a worker's performance.timeOrigin
 * is its own start), and process.hrtime.bigint() is absolute but allocates a BigInt: so each
 * thread measures once, at load, the offset between the two (the tightest of a few samples, an
 * error of half its bracket — well under a µs natively) and stamps performance.now() + offset.
 */
function clockOffset(): number {
  let best = Infinity;
  let offset = 0;
  for (let i = 0; i < 16; i++) {
    const t0 = performance.now();
    const h = process.hrtime.bigint();
    const t1 = performance.now();
    if (t1 - t0 < best) {
      best = t1 - t0;
      offset = Number(h) / 1e6 - (t0 + t1) / 2;
    }
  }
  return offset;
}
const OFFSET = clockOffset();

/** Now, in ms of CLOCK_MONOTONIC (comparable across threads). */
export function traceNow(): number {
  return performance.now() + OFFSET;
}

/** The shared buffers of one served device's trace (sent to each queue thread). */
export interface TraceShared {
  depth: number;
  capacity: number;
  current: SharedArrayBuffer;
  /** Per queue: Int32 [count] then Float64 records (TraceLog). */
  logs: SharedArrayBuffer[];
}

export function createTrace(queues: number, depth: number, capacity = DEFAULT_LOG_CAPACITY): TraceShared {
  const logs: SharedArrayBuffer[] = [];
  for (let q = 0; q < queues; q++) logs.push(new SharedArrayBuffer(8 + capacity * RECORD * 8));
  return { depth, capacity, current: new SharedArrayBuffer(queues * depth * RECORD * 8), logs };
}

/** A thread's writer into the current records (any thread may stamp a slot it serves). */
export class TraceRecorder {
  readonly current: Float64Array;
  constructor(readonly shared: TraceShared) {
    this.current = new Float64Array(shared.current);
  }

  /** The slot of a queue's tag: slot = qid * depth + tag. */
  slotOf(qid: number, tag: number): number {
    return qid * this.shared.depth + tag;
  }

  /** Stamps `stage` of the request in `slot` now (overwriting: the last pass counts). */
  stamp(slot: number, stage: number): void {
    this.current[slot * RECORD + F_STAMPS + stage] = traceNow();
  }

  /** Stamps `stage` only if it was not stamped yet (the first of several base reads/writes). */
  stampFirst(slot: number, stage: number): void {
    const i = slot * RECORD + F_STAMPS + stage;
    if (this.current[i] === 0) this.current[i] = traceNow();
  }
}

/** The queue thread's side: begins a request's record and logs it at the commit. */
export class QueueTrace extends TraceRecorder {
  private readonly first: number;
  private readonly count: Int32Array;
  private readonly log: Float64Array;
  private readonly capacity: number;

  constructor(shared: TraceShared, qid: number) {
    super(shared);
    this.first = this.slotOf(qid, 0);
    this.capacity = shared.capacity;
    this.count = new Int32Array(shared.logs[qid]!, 0, 1);
    this.log = new Float64Array(shared.logs[qid]!, 8);
  }

  /** The slot of this queue's tag (the main thread derives it from the 'slow' message's qid and tag). */
  slot(tag: number): number {
    return this.first + tag;
  }

  begin(tag: number, op: number, length: number): void {
    const at = (this.first + tag) * RECORD;
    const cur = this.current;
    cur.fill(0, at, at + RECORD);
    cur[at + F_OP] = op;
    cur[at + F_LENGTH] = length;
    cur[at + F_STAMPS + STAGE_CQE] = traceNow();
  }

  route(tag: number, route: number): void {
    this.current[(this.first + tag) * RECORD + F_ROUTE] = route;
  }

  /** The commit: the record is complete; append it to the log (the oldest is lost on a lap). */
  commit(tag: number): void {
    const at = (this.first + tag) * RECORD;
    const cur = this.current;
    cur[at + F_STAMPS + STAGE_COMMIT] = traceNow();
    const n = this.count[0]!;
    const to = (n % this.capacity) * RECORD;
    const log = this.log;
    for (let i = 0; i < RECORD; i++) log[to + i] = cur[at + i]!; // no subarray: no view per request
    Atomics.store(this.count, 0, n + 1);
  }
}

/**
 * The main thread's reader of the queues' logs: returns the records finished since the last
 * call (a lap while not drained loses the oldest: counted in `lost`).
 */
export class TraceDrain {
  private readonly counts: Int32Array[];
  private readonly logs: Float64Array[];
  private readonly read: number[];
  lost = 0;

  constructor(private readonly shared: TraceShared) {
    this.counts = shared.logs.map((b) => new Int32Array(b, 0, 1));
    this.logs = shared.logs.map((b) => new Float64Array(b, 8));
    this.read = shared.logs.map(() => 0);
  }

  /** Calls `out` with each queue's new records (a copy, RECORD numbers each). */
  drain(out: (records: Float64Array) => void): number {
    const cap = this.shared.capacity;
    let total = 0;
    for (let q = 0; q < this.logs.length; q++) {
      const n = Atomics.load(this.counts[q]!, 0);
      let from = this.read[q]!;
      if (n - from > cap) {
        this.lost += n - from - cap;
        from = n - cap;
      }
      const records = new Float64Array((n - from) * RECORD);
      for (let i = from; i < n; i++) records.set(this.logs[q]!.subarray((i % cap) * RECORD, (i % cap + 1) * RECORD), (i - from) * RECORD);
      this.read[q] = n;
      if (n > from) out(records);
      total += n - from;
    }
    return total;
  }
}

/**
 * The main thread's recorder for the engine's stamps (FvdImage.read/write get the slot; -1 means
 * untraced, and then nothing here is touched). Installed by the server while it traces.
 */
let engineRecorder: TraceRecorder | null = null;

export function installEngineTrace(r: TraceRecorder | null): void {
  engineRecorder = r;
}

/** The engine's stamp: only called with slot >= 0, i.e. while a recorder is installed. */
export function engineStamp(slot: number, stage: number): void {
  engineRecorder?.stamp(slot, stage);
}

export function engineStampFirst(slot: number, stage: number): void {
  engineRecorder?.stampFirst(slot, stage);
}
