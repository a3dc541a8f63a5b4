/**
 * Prints the summary of a per-request trace written by a server run with FVD_TRACE=<file>:
 * per kind of request, each stage's median/p90 µs and share of the total (daemon/trace-summary.ts).
 *   node build/bench/trace-report.js TRACE_FILE
 */
import { readTraceFile } from '../daemon/trace-file.js';
import { formatSummary, summarize } from '../daemon/trace-summary.js';

const file = process.argv[2];
if (!file) {
  console.error('usage: trace-report TRACE_FILE');
  process.exit(2);
}
try {
  console.log(formatSummary(summarize(readTraceFile(file))));
} catch (err) {
  console.error(`trace-report: ${(err as Error).message}`);
  process.exit(1);
}
