/**
 * Runs the compiled test files (build/tests/**\/*.test.js) under uvu and ends with the line CI
 * reads: "N passed, N failed".
 *
 *   node build/tests/run.js [PATTERN] [--jobs N]
 *
 * PATTERN (a regular expression) narrows by file name. --jobs N (or FVD_TEST_JOBS) splits the files
 * into N uvu processes that run at the same time: most files wait on child processes, fsync and
 * servers more than they compute, so two processes on two cores take a little over half the time of
 * one. Files are dealt out longest first by the durations in TYPICAL_SECONDS (measured on the CI
 * machine; a file not listed counts as SHORT_FILE_SECONDS), and each process's report is printed
 * whole when it ends, so reports never interleave.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const uvuBin = path.join(path.dirname(path.dirname(require.resolve('uvu'))), 'bin.js');
const testsDir = path.dirname(fileURLToPath(import.meta.url));

/**
 * Relative durations of the long files (seconds, measured 2026-12-02 on the 2-core CI machine with
 * two files at a time and other jobs running: only their proportions matter); the rest are short.
 */
const TYPICAL_SECONDS: Record<string, number> = {
  'properties/crash.test.js': 515,
  'cli/cli.test.js': 387,
  'cli/encryption-cli.test.js': 352,
  'fuzz/fuzz.test.js': 320,
  'cli/bad-input.test.js': 318,
  'cli/cli-admin.test.js': 111,
  'cli/maintenance-encrypted-cli.test.js': 111,
  'properties/differential.test.js': 107,
  'cli/maintenance-cli.test.js': 89,
  'fvd/prefetch.test.js': 68,
  'properties/maintenance-encrypted-crash.test.js': 60,
  'fvd/qcow2-base.test.js': 55,
  'daemon/remote-http.test.js': 46,
  'fvd/change-key.test.js': 41,
  'fvd/snapshot-repair.test.js': 27,
  'crash-campaign/crash-campaign.test.js': 25,
  'fvd/qcow2.test.js': 24,
  'fvd/qcow2-bad-input.test.js': 24,
  'daemon/remote-engine.test.js': 20,
  'fvd/storage-grow.test.js': 20,
  'cli/bench-cli.test.js': 19,
  'cli/remote-cli.test.js': 16,
  'daemon/fast-crypt.test.js': 16,
  'fvd/image.test.js': 15,
  'properties/maintenance-crash.test.js': 15,
  'properties/crash-crypt.test.js': 14,
  'fvd/prefetch-pipeline.test.js': 12,
};
const SHORT_FILE_SECONDS = 5;

interface Options {
  pattern: string;
  jobs: number;
}

function parseArgs(argv: string[]): Options {
  let pattern = '';
  let jobs = Number(process.env.FVD_TEST_JOBS ?? 1);
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--jobs') jobs = Number(argv[++i]);
    else if (argv[i].startsWith('--jobs=')) jobs = Number(argv[i].slice('--jobs='.length));
    else pattern = argv[i];
  }
  if (!Number.isInteger(jobs) || jobs < 1) {
    console.error(`test runner: --jobs wants a positive integer, got ${jobs}`);
    process.exit(2);
  }
  return { pattern, jobs };
}

/** Test files under testsDir as uvu names them (paths relative to testsDir, '/'-separated). */
function listTestFiles(pattern: RegExp): string[] {
  const out: string[] = [];
  const walk = (dir: string, prefix: string): void => {
    for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
      const name = prefix + entry.name;
      if (entry.isDirectory()) walk(path.join(dir, entry.name), name + '/');
      else if (pattern.test(name)) out.push(name);
    }
  };
  walk(testsDir, '');
  return out.sort();
}

/** Longest first onto the least loaded shard (LPT): within 4/3 of the best split. */
function shardFiles(files: string[], jobs: number): string[][] {
  const shards = Array.from({ length: Math.min(jobs, files.length) }, () => ({ load: 0, files: [] as string[] }));
  const weight = (f: string): number => TYPICAL_SECONDS[f] ?? SHORT_FILE_SECONDS;
  for (const f of [...files].sort((a, b) => weight(b) - weight(a))) {
    const lightest = shards.reduce((a, b) => (b.load < a.load ? b : a));
    lightest.files.push(f);
    lightest.load += weight(f);
  }
  return shards.map((s) => s.files.sort());
}

const escapeRegExp = (s: string): string => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

interface UvuResult {
  total: number;
  passed: number;
  code: number | null;
  output: string;
}

/** One uvu process over the files PATTERN matches; streams its report when STREAM is set. */
function runUvu(pattern: string, stream: boolean): Promise<UvuResult> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [uvuBin, testsDir, pattern, '--no-color'], {
      stdio: ['ignore', 'pipe', 'inherit'],
      env: { ...process.env, FORCE_COLOR: '0' },
    });
    let output = '';
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk: string) => {
      output += chunk;
      if (stream) process.stdout.write(chunk);
    });
    child.on('close', (code) => {
      resolve({
        total: Number(/Total:\s+(\d+)/.exec(output)?.[1] ?? NaN),
        passed: Number(/Passed:\s+(\d+)/.exec(output)?.[1] ?? NaN),
        code,
        output,
      });
    });
  });
}

async function main(): Promise<void> {
  const { pattern, jobs } = parseArgs(process.argv.slice(2));
  // Only compiled test files (not their .map files) ever match.
  const filePattern = `(?:${pattern})[^/]*\\.test\\.js$`;
  let results: UvuResult[];
  if (jobs === 1) {
    results = [await runUvu(filePattern, true)];
  } else {
    const shards = shardFiles(listTestFiles(new RegExp(filePattern, 'i')), jobs);
    const t0 = Date.now();
    results = await Promise.all(
      shards.map(async (files, i) => {
        const r = await runUvu(`^(?:${files.map(escapeRegExp).join('|')})$`, false);
        const secs = ((Date.now() - t0) / 1000).toFixed(0);
        process.stdout.write(`\n== test process ${i + 1}/${shards.length} (${files.length} files, ${secs} s) ==\n${r.output}`);
        return r;
      }),
    );
  }
  let passed = 0;
  let failed = 0;
  let ok = true;
  for (const r of results) {
    if (!Number.isFinite(r.total) || !Number.isFinite(r.passed)) {
      console.error(`test runner: uvu ended (code ${r.code}) without a summary`);
      failed += 1;
      ok = false;
      continue;
    }
    passed += r.passed;
    failed += r.total - r.passed;
    if (r.code !== 0) ok = false;
  }
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 && ok ? 0 : 1);
}

void main();
