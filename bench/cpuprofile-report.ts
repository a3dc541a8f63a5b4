/**
 * Summarizes V8 .cpuprofile files (written by `node --cpu-prof`, one per thread): per file, the
 * busy share of the samples and the top functions by self time and by inclusive time (a function
 * counted once per sample however deep it recurses). Used by bench/device-trace.sh PROFILE=1.
 * `--window FROM TO` keeps only the samples taken between FROM and TO, in µs of CLOCK_MONOTONIC
 * (the clock of the profile's startTime and of /proc/uptime in a guest that never suspends), so
 * the daemon's start-up (module loading: seconds under TCG) does not drown the job's samples.
 *   node build/bench/cpuprofile-report.js [--top N] [--window FROM_US TO_US] FILE.cpuprofile...
 */
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';

interface CallFrame { functionName: string; url: string; lineNumber: number }
interface ProfileNode { id: number; callFrame: CallFrame; hitCount?: number; children?: number[] }
interface Profile { nodes: ProfileNode[]; samples?: number[]; timeDeltas?: number[]; startTime: number }

// Samples V8 attributes to no JavaScript: waiting (idle) is not CPU; the others are.
const IDLE = '(idle)';

function frameName(f: CallFrame): string {
  const file = f.url ? f.url.replace(/^file:\/\//, '').replace(/^.*\/build\//, '').replace(/^node:/, 'node:') : '';
  return `${f.functionName || '(anonymous)'}${file ? ` ${file}:${f.lineNumber + 1}` : ''}`;
}

function report(path: string, top: number, window: [number, number] | null): string {
  const p = JSON.parse(readFileSync(path, 'utf8')) as Profile;
  const byId = new Map<number, ProfileNode>();
  const parent = new Map<number, number>();
  for (const n of p.nodes) {
    byId.set(n.id, n);
    for (const c of n.children ?? []) parent.set(c, n.id);
  }
  // Per-node sample counts: from samples[] when present (exact), else hitCount.
  const hits = new Map<number, number>();
  if (p.samples && p.samples.length > 0) {
    let t = p.startTime;
    for (let i = 0; i < p.samples.length; i++) {
      t += p.timeDeltas?.[i] ?? 0;
      if (window && (t < window[0] || t > window[1])) continue;
      hits.set(p.samples[i]!, (hits.get(p.samples[i]!) ?? 0) + 1);
    }
  } else {
    if (window) throw new Error(`${path}: no samples[] to cut a window from`);
    for (const n of p.nodes) hits.set(n.id, n.hitCount ?? 0);
  }
  let total = 0, idle = 0;
  const self = new Map<string, number>();
  const incl = new Map<string, number>();
  for (const [id, count] of hits) {
    if (count === 0) continue;
    const node = byId.get(id)!;
    const name = frameName(node.callFrame);
    total += count;
    if (node.callFrame.functionName === IDLE) { idle += count; continue; }
    self.set(name, (self.get(name) ?? 0) + count);
    const seen = new Set<string>();
    for (let cur: number | undefined = id; cur !== undefined; cur = parent.get(cur)) {
      const n = frameName(byId.get(cur)!.callFrame);
      if (n === '(root)' || seen.has(n)) continue;
      seen.add(n);
      incl.set(n, (incl.get(n) ?? 0) + count);
    }
  }
  const busy = total - idle;
  const pct = (n: number) => (busy ? ((100 * n) / busy).toFixed(1) : '0.0').padStart(5);
  const rows = (m: Map<string, number>) => [...m].sort((a, b) => b[1] - a[1]).slice(0, top)
    .map(([n, c]) => `  ${pct(c)}%  ${String(c).padStart(6)}  ${n}`).join('\n');
  return [
    `-- ${basename(path)}: ${total} samples, busy ${busy} (${total ? ((100 * busy) / total).toFixed(0) : 0}%), % of busy:`,
    ' self:', rows(self),
    ' inclusive:', rows(incl),
  ].join('\n');
}

const args = process.argv.slice(2);
let top = 25;
let window: [number, number] | null = null;
for (;;) {
  if (args[0] === '--top') { top = Number(args[1]); args.splice(0, 2); }
  else if (args[0] === '--window') { window = [Number(args[1]), Number(args[2])]; args.splice(0, 3); }
  else break;
}
if (args.length === 0 || !Number.isInteger(top) || top <= 0 || (window && !(window[0] < window[1]))) {
  console.error('usage: cpuprofile-report [--top N] [--window FROM_US TO_US] FILE.cpuprofile...');
  process.exit(2);
}
try {
  for (const f of args) console.log(report(f, top, window));
} catch (err) {
  console.error(`cpuprofile-report: ${(err as Error).message}`);
  process.exit(1);
}
