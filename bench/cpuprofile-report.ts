/**
 * Summarizes V8 .cpuprofile files (written by `node --cpu-prof`, one per thread): per file, the
 * busy share of the samples and the top functions by self time and by inclusive time (a function
 * counted once per sample however deep it recurses). Used by bench/device-trace.sh PROFILE=1.
 *   node build/bench/cpuprofile-report.js [--top N] FILE.cpuprofile...
 */
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';

interface CallFrame { functionName: string; url: string; lineNumber: number }
interface ProfileNode { id: number; callFrame: CallFrame; hitCount?: number; children?: number[] }
interface Profile { nodes: ProfileNode[]; samples?: number[] }

// Samples V8 attributes to no JavaScript: waiting (idle) is not CPU; the others are.
const IDLE = '(idle)';

function frameName(f: CallFrame): string {
  const file = f.url ? f.url.replace(/^file:\/\//, '').replace(/^.*\/build\//, '').replace(/^node:/, 'node:') : '';
  return `${f.functionName || '(anonymous)'}${file ? ` ${file}:${f.lineNumber + 1}` : ''}`;
}

function report(path: string, top: number): string {
  const p = JSON.parse(readFileSync(path, 'utf8')) as Profile;
  const byId = new Map<number, ProfileNode>();
  const parent = new Map<number, number>();
  for (const n of p.nodes) {
    byId.set(n.id, n);
    for (const c of n.children ?? []) parent.set(c, n.id);
  }
  // Per-node sample counts: from samples[] when present (exact), else hitCount.
  const hits = new Map<number, number>();
  if (p.samples && p.samples.length > 0) for (const s of p.samples) hits.set(s, (hits.get(s) ?? 0) + 1);
  else for (const n of p.nodes) hits.set(n.id, n.hitCount ?? 0);
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
if (args[0] === '--top') { top = Number(args[1]); args.splice(0, 2); }
if (args.length === 0 || !Number.isInteger(top) || top <= 0) {
  console.error('usage: cpuprofile-report [--top N] FILE.cpuprofile...');
  process.exit(2);
}
try {
  for (const f of args) console.log(report(f, top));
} catch (err) {
  console.error(`cpuprofile-report: ${(err as Error).message}`);
  process.exit(1);
}
