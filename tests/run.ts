/**
 * Runs every compiled test file (build/tests/**\/*.test.js) under uvu in one process and ends with
 * the line CI reads: "N passed, N failed". Extra arguments narrow the file pattern.
 */
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const uvuBin = path.join(path.dirname(path.dirname(require.resolve('uvu'))), 'bin.js');
const testsDir = path.dirname(fileURLToPath(import.meta.url));
// An argument narrows by file name; only compiled test files (not their .map files) ever match.
const pattern = `(?:${process.argv[2] ?? ''})[^/]*\\.test\\.js$`;

const child = spawn(process.execPath, [uvuBin, testsDir, pattern, '--no-color'], {
  stdio: ['ignore', 'pipe', 'inherit'],
  env: { ...process.env, FORCE_COLOR: '0' },
});
let out = '';
child.stdout.setEncoding('utf8');
child.stdout.on('data', (chunk: string) => {
  out += chunk;
  process.stdout.write(chunk);
});
child.on('close', (code) => {
  const total = Number(/Total:\s+(\d+)/.exec(out)?.[1] ?? NaN);
  const passed = Number(/Passed:\s+(\d+)/.exec(out)?.[1] ?? NaN);
  if (!Number.isFinite(total) || !Number.isFinite(passed)) {
    console.log('0 passed, 1 failed');
    console.error(`test runner: uvu ended (code ${code}) without a summary`);
    process.exit(1);
  }
  const failed = total - passed;
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed === 0 && code === 0 ? 0 : 1);
});
