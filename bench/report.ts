/**
 * Bench helper for bench/compare.sh: reads its results file (one run per line:
 * "CASE<TAB>TOOL<TAB>OPS_PER_S<TAB>MIB_PER_S<TAB>CPU_US_PER_OP") and prints the table of medians with the ratios
 * FVD/qcow2, FVD/raw (qemu-img) and FVD/raw (fvd bench -f raw, i.e. the same harness), for each
 * FVD layout's row.
 *   node build/bench/report.js RESULTS CASE_LABELS...   (CASE_LABELS: "id=description")
 */
import fs from 'node:fs';
import { median } from './stats.js';

const TOOLS: [string, string][] = [
  ['fvd', 'FVD raw layout (fvd bench)'],
  ['fvd-compact', 'FVD compact layout (fvd bench)'],
  ['qcow2', 'qcow2 (qemu-img bench)'],
  ['raw-qemu', 'raw (qemu-img bench)'],
  ['raw-fvd', 'raw (fvd bench -f raw)'],
  ['fvd-uring', 'FVD raw layout (fvd bench --io uring)'],
  ['raw-uring', 'raw (fvd bench -f raw --io uring)'],
];

const [file, ...labels] = process.argv.slice(2);
if (!file) {
  console.error('usage: report RESULTS CASE=LABEL...');
  process.exit(2);
}
const runs = new Map<string, { ops: number[]; mib: number[]; cpu: number[] }>();
for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
  if (!line.trim()) continue;
  const [c, tool, ops, mib, cpu] = line.split('\t');
  const key = `${c}\t${tool}`;
  const r = runs.get(key) ?? { ops: [], mib: [], cpu: [] };
  r.ops.push(Number(ops));
  r.mib.push(Number(mib));
  r.cpu.push(Number(cpu));
  runs.set(key, r);
}

const ratio = (a: number | undefined, b: number | undefined) => (a && b ? (a / b).toFixed(2) : '-');
const rows: string[][] = [['case', 'engine', 'ops/s', 'MiB/s', 'CPU us/op', 'runs (ops/s)', 'FVD/qcow2', 'FVD/raw(qemu)', 'FVD/raw(fvd)']];
for (const label of labels) {
  const eq = label.indexOf('=');
  const id = label.slice(0, eq);
  const desc = label.slice(eq + 1);
  const med = (tool: string) => {
    const r = runs.get(`${id}\t${tool}`);
    return r ? { ops: median(r.ops), mib: median(r.mib), cpu: median(r.cpu), all: r.ops } : undefined;
  };
  TOOLS.filter(([tool]) => runs.has(`${id}\t${tool}`)).forEach(([tool, name], i) => {
    const m = med(tool);
    const isFvd = tool.startsWith('fvd');
    rows.push([
      i === 0 ? desc : '',
      name,
      m ? m.ops.toFixed(0) : '-',
      m ? m.mib.toFixed(1) : '-',
      m && Number.isFinite(m.cpu) ? m.cpu.toFixed(2) : '-',
      m ? m.all.map((x) => x.toFixed(0)).join(' ') : '-',
      isFvd ? ratio(m?.ops, med('qcow2')?.ops) : '',
      isFvd ? ratio(m?.ops, med('raw-qemu')?.ops) : '',
      isFvd ? ratio(m?.ops, med(tool.endsWith('-uring') ? 'raw-uring' : 'raw-fvd')?.ops) : '',
    ]);
  });
}
const legend = [
  'ratios are of median ops/s (>1: FVD faster); FVD/raw(fvd) compares with raw through the same fvd bench',
  'harness and I/O backend (node:fs, or io_uring for the --io uring row), i.e. the engine overhead alone.',
  'CPU us/op: process user+system CPU per request, start-up/open/close subtracted (all threads).',
];
const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
for (const [i, r] of rows.entries()) {
  console.log(r.map((cell, c) => (c >= 2 && c !== 5 ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!))).join('  ').trimEnd());
  if (i === 0) console.log(widths.map((w) => '-'.repeat(w)).join('  '));
}
for (const line of legend) console.log(line);
