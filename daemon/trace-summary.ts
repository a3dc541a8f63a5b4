/**
 * Summary of a per-request trace (fvd/trace.ts records): requests grouped by kind, and for each
 * kind the time between consecutive stages it passed (median, p90, and share of the kind's total
 * time: the segment's sum over the total's sum, so the shares add up to 100 %).
 */
import { F_LENGTH, F_OP, F_ROUTE, F_STAMPS, RECORD, ROUTE_BASE, ROUTE_STORED, ROUTE_ZERO, STAGES, STAGE_BASE_START, STAGE_COMMIT, STAGE_CQE, STAGE_NAMES, STAGE_WRITE_START } from '../fvd/trace.js';
import { UBLK_IO_OP_DISCARD, UBLK_IO_OP_FLUSH, UBLK_IO_OP_READ, UBLK_IO_OP_WRITE, UBLK_IO_OP_WRITE_ZEROES } from './ublk/abi.js';

export interface SegmentStats {
  /** "from→to" stage names. */
  name: string;
  count: number;
  medianUs: number;
  p90Us: number;
  /** Share of the kind's total time (0..1). */
  share: number;
}

export interface KindStats {
  kind: string;
  count: number;
  bytes: number;
  totalMedianUs: number;
  totalP90Us: number;
  totalMeanUs: number;
  segments: SegmentStats[];
}

/** What happened to a request, from its route and the stages it passed. */
export function kindOf(r: Float64Array, at: number): string {
  const op = r[at + F_OP]!;
  const route = r[at + F_ROUTE]!;
  const base = r[at + F_STAMPS + STAGE_BASE_START]! > 0;
  const wrote = r[at + F_STAMPS + STAGE_WRITE_START]! > 0;
  if (op === UBLK_IO_OP_READ) {
    if (route === ROUTE_STORED) return 'read local';
    if (route === ROUTE_ZERO) return 'read zero';
    if (route === ROUTE_BASE) return 'read base (queue thread)';
    return base ? 'read copy-on-read (engine)' : 'read engine';
  }
  if (op === UBLK_IO_OP_WRITE) {
    if (route === ROUTE_STORED) return 'write local';
    if (base) return 'write copy-on-write';
    return wrote ? 'write engine (bitmap/allocation)' : 'write engine';
  }
  if (op === UBLK_IO_OP_FLUSH) return 'flush';
  if (op === UBLK_IO_OP_DISCARD) return 'discard';
  if (op === UBLK_IO_OP_WRITE_ZEROES) return 'write-zeroes';
  return `op ${op}`;
}

/** The q-quantile (0..1) of sorted values, nearest rank. */
function quantile(sorted: number[], q: number): number {
  if (sorted.length === 0) return 0;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}

export function summarize(records: Float64Array): KindStats[] {
  const kinds = new Map<string, { bytes: number; totals: number[]; segs: Map<string, { order: number; us: number[] }> }>();
  for (let at = 0; at + RECORD <= records.length; at += RECORD) {
    const t0 = records[at + F_STAMPS + STAGE_CQE]!;
    const t1 = records[at + F_STAMPS + STAGE_COMMIT]!;
    if (!(t0 > 0 && t1 >= t0)) continue; // incomplete
    const kind = kindOf(records, at);
    let k = kinds.get(kind);
    if (!k) kinds.set(kind, (k = { bytes: 0, totals: [], segs: new Map() }));
    k.bytes += records[at + F_LENGTH]!;
    k.totals.push((t1 - t0) * 1000);
    let prev = STAGE_CQE;
    for (let s = 1; s < STAGES; s++) {
      const t = records[at + F_STAMPS + s]!;
      if (t === 0) continue;
      const name = `${STAGE_NAMES[prev]}→${STAGE_NAMES[s]}`;
      let seg = k.segs.get(name);
      if (!seg) k.segs.set(name, (seg = { order: prev * STAGES + s, us: [] }));
      seg.us.push((t - records[at + F_STAMPS + prev]!) * 1000);
      prev = s;
    }
  }
  const out: KindStats[] = [];
  for (const [kind, k] of kinds) {
    const totalSum = k.totals.reduce((a, b) => a + b, 0);
    const totals = [...k.totals].sort((a, b) => a - b);
    const segments = [...k.segs.entries()]
      .sort((a, b) => a[1].order - b[1].order)
      .map(([name, seg]) => {
        const sorted = [...seg.us].sort((a, b) => a - b);
        const sum = seg.us.reduce((a, b) => a + b, 0);
        return { name, count: sorted.length, medianUs: quantile(sorted, 0.5), p90Us: quantile(sorted, 0.9), share: totalSum > 0 ? sum / totalSum : 0 };
      });
    out.push({
      kind,
      count: totals.length,
      bytes: k.bytes,
      totalMedianUs: quantile(totals, 0.5),
      totalP90Us: quantile(totals, 0.9),
      totalMeanUs: totalSum / totals.length,
      segments,
    });
  }
  return out.sort((a, b) => b.count - a.count);
}

export function formatSummary(kinds: KindStats[]): string {
  const f = (x: number) => x.toFixed(x < 10 ? 1 : 0);
  const lines: string[] = [];
  for (const k of kinds) {
    lines.push(`${k.kind}: ${k.count} requests, ${(k.bytes / k.count / 1024).toFixed(1)} KiB avg; total µs median ${f(k.totalMedianUs)} p90 ${f(k.totalP90Us)} mean ${f(k.totalMeanUs)}`);
    lines.push(`  ${'stage'.padEnd(26)} ${'n'.padStart(7)} ${'med µs'.padStart(8)} ${'p90 µs'.padStart(8)} ${'share'.padStart(6)}`);
    for (const s of k.segments)
      lines.push(`  ${s.name.padEnd(26)} ${String(s.count).padStart(7)} ${f(s.medianUs).padStart(8)} ${f(s.p90Us).padStart(8)} ${(s.share * 100).toFixed(1).padStart(5)}%`);
  }
  return lines.join('\n');
}
