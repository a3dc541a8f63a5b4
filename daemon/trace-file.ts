/**
 * The per-request trace's file (FVD_TRACE=<file>, fvd/trace.ts): the main thread drains the
 * queues' logs once a second (off the request path) and appends the records, so a run longer
 * than the rings still keeps every request. Format: 8 bytes "FVDTRACE", Int32 LE record length
 * (numbers), Int32 LE stage count, then the records as little-endian float64 (fvd/trace.ts's
 * fields; stamps in ms of CLOCK_MONOTONIC, 0 = stage not passed).
 */
import fs from 'node:fs';
import { RECORD, STAGES, TraceDrain, type TraceShared } from '../fvd/trace.js';

const MAGIC = 'FVDTRACE';
const HEADER = 16;

export class TraceFile {
  private readonly fd: number;
  private readonly drain: TraceDrain;
  private readonly timer: NodeJS.Timeout;
  records = 0;

  constructor(
    readonly path: string,
    shared: TraceShared,
  ) {
    this.fd = fs.openSync(path, 'w', 0o644);
    const header = Buffer.alloc(HEADER);
    header.write(MAGIC, 0, 'latin1');
    header.writeInt32LE(RECORD, 8);
    header.writeInt32LE(STAGES, 12);
    fs.writeSync(this.fd, header);
    this.drain = new TraceDrain(shared);
    this.timer = setInterval(() => this.flush(), 1000);
    this.timer.unref();
  }

  /** Appends what the queues finished since the last flush. */
  flush(): void {
    this.records += this.drain.drain((r) => fs.writeSync(this.fd, new Uint8Array(r.buffer, r.byteOffset, r.byteLength)));
  }

  /** The last records (the queues have stopped), then closed; returns a one-line summary. */
  close(): string {
    clearInterval(this.timer);
    this.flush();
    fs.closeSync(this.fd);
    return `trace: ${this.records} requests written to ${this.path}${this.drain.lost ? ` (${this.drain.lost} lost: the ring lapped)` : ''}`;
  }
}

/** Reads a trace file's records (RECORD numbers each); one-line error when it is not one. */
export function readTraceFile(path: string): Float64Array {
  const buf = fs.readFileSync(path);
  if (buf.length < HEADER || buf.toString('latin1', 0, 8) !== MAGIC) throw new Error(`${path}: not an fvd trace file`);
  if (buf.readInt32LE(8) !== RECORD || buf.readInt32LE(12) !== STAGES)
    throw new Error(`${path}: trace records of ${buf.readInt32LE(8)} numbers / ${buf.readInt32LE(12)} stages, this build reads ${RECORD} / ${STAGES}`);
  const body = buf.subarray(HEADER);
  const n = Math.floor(body.length / (RECORD * 8)) * RECORD;
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) out[i] = body.readDoubleLE(i * 8);
  return out;
}
