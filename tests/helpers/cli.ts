/**
 * Helpers for tests that drive the `fvd` command line: run it, check that a failure is one clear
 * line (no stack trace, no internal-error exit), hash files to prove a refused command left them
 * alone, and manage temporary directories.
 */
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as assert from 'uvu/assert';

/** build/tests/helpers/.. /.. → build/daemon/cli.js */
export const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'daemon', 'cli.js');

/** Exit code the CLI uses for an internal error (a bug). */
export const EXIT_INTERNAL = 70;

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  /** The command line, for assertion messages. */
  cmd: string;
}

/** Runs `node build/daemon/cli.js ...args` synchronously. */
export function fvd(...args: string[]): CliResult {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: 120_000, cwd: os.tmpdir() });
  if (r.error) throw r.error;
  return { code: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr, cmd: `fvd ${args.join(' ')}` };
}

/** Runs the CLI without blocking the event loop (needed when this process holds an image open). */
export function fvdAsync(...args: string[]): Promise<CliResult> {
  return fvdWithin(120_000, ...args);
}

/**
 * fvdAsync, killed (SIGKILL: `signal` is set, which assertNoCrash reports) after `ms`
 * milliseconds: for commands that must not hang, so a hang fails fast.
 */
export function fvdWithin(ms: number, ...args: string[]): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [CLI, ...args], { cwd: os.tmpdir(), stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), ms);
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, cmd: `fvd ${args.join(' ')}` });
    });
  });
}

function describe(r: CliResult): string {
  return `${r.cmd}\n  exit: ${r.code}${r.signal ? ` (signal ${r.signal})` : ''}\n  stdout: ${JSON.stringify(r.stdout)}\n  stderr: ${JSON.stringify(r.stderr)}`;
}

/** Exit 0, nothing on stderr. */
export function assertOk(r: CliResult): void {
  assert.is(r.code, 0, `expected success:\n${describe(r)}`);
  assert.is(r.stderr, '', `expected an empty stderr:\n${describe(r)}`);
}

/** No crash: not an internal error, not killed, no stack trace anywhere. */
export function assertNoCrash(r: CliResult): void {
  assert.is(r.signal, null, `killed by a signal:\n${describe(r)}`);
  assert.ok(r.code !== EXIT_INTERNAL, `internal error (exit 70) = a bug:\n${describe(r)}`);
  assert.not.match(r.stderr, /internal error/i, `internal error reported:\n${describe(r)}`);
  for (const text of [r.stderr, r.stdout]) assert.not.match(text, /\n\s+at .+[:(]/, `stack trace in the output:\n${describe(r)}`);
}

/**
 * A user-facing refusal: non-zero exit (`code` if given), exactly one non-empty line on stderr
 * matching every pattern, no crash.
 */
export function assertOneLineError(r: CliResult, patterns: RegExp | RegExp[] = [], code?: number): string {
  assertNoCrash(r);
  if (code !== undefined) assert.is(r.code, code, `expected exit ${code}:\n${describe(r)}`);
  else assert.ok(r.code !== 0 && r.code !== null, `expected a non-zero exit:\n${describe(r)}`);
  const lines = r.stderr.split('\n').filter((l) => l.length > 0);
  assert.is(lines.length, 1, `expected exactly one line on stderr:\n${describe(r)}`);
  assert.ok(r.stderr.endsWith('\n'), `stderr line should end with a newline:\n${describe(r)}`);
  const line = lines[0]!;
  assert.ok(line.trim().length > 10, `error line too short to name the problem:\n${describe(r)}`);
  for (const p of Array.isArray(patterns) ? patterns : [patterns]) assert.match(line, p, `stderr does not match ${p}:\n${describe(r)}`);
  return line;
}

export function sha256File(file: string): string {
  // In pieces: sparse test images can be larger than one Buffer read allows (2 GiB).
  const hash = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(8 << 20);
    for (let pos = 0; ; ) {
      const n = fs.readSync(fd, buf, 0, buf.length, pos);
      if (n === 0) break;
      hash.update(buf.subarray(0, n));
      pos += n;
    }
  } finally {
    fs.closeSync(fd);
  }
  return hash.digest('hex');
}

/** Hashes of several files (missing files hash as 'missing'). */
export function snapshot(files: string[]): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of files) out[f] = fs.existsSync(f) ? sha256File(f) : 'missing';
  return out;
}

export function assertUnchanged(before: Record<string, string>, what: string): void {
  for (const [f, h] of Object.entries(before)) {
    const now = fs.existsSync(f) ? sha256File(f) : 'missing';
    assert.is(now, h, `${path.basename(f)} was modified by ${what}`);
  }
}

/** A temporary directory under os.tmpdir(), removed by `cleanup()`. */
export class TempDir {
  readonly path: string;
  constructor(prefix: string) {
    this.path = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  }
  private cases = 0;
  file(name: string): string {
    return path.join(this.path, name);
  }
  /** A fresh sub-directory per test case, so relative base paths never collide. */
  caseDir(): string {
    const d = this.file(`case${++this.cases}`);
    fs.mkdirSync(d);
    return d;
  }
  cleanup(): void {
    fs.rmSync(this.path, { recursive: true, force: true });
  }
}

/**
 * Runs fn with FVD_RUN_DIR (the daemon's /run/fvd) pointing at a fresh temporary directory, for
 * this process and the CLIs it spawns with process.env; restores the old value and removes the
 * directory afterwards, whether fn throws or not.
 */
export async function withRunDir<T>(prefix: string, fn: (tmp: TempDir) => T | Promise<T>): Promise<T> {
  const tmp = new TempDir(prefix);
  const saved = process.env.FVD_RUN_DIR;
  process.env.FVD_RUN_DIR = tmp.path;
  try {
    return await fn(tmp);
  } finally {
    if (saved === undefined) delete process.env.FVD_RUN_DIR;
    else process.env.FVD_RUN_DIR = saved;
    tmp.cleanup();
  }
}

/** Deterministic pseudo-random bytes (xorshift32), never all-zero blocks. */
export function patternBytes(length: number, seed = 1): Buffer {
  const b = Buffer.alloc(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = (x & 0xff) | 1;
  }
  return b;
}

/** Parses `fvd info --json` / `fvd map --json` output after asserting success. */
export function json<T = any>(r: CliResult): T {
  assertOk(r);
  try {
    return JSON.parse(r.stdout) as T;
  } catch (err) {
    assert.unreachable(`not JSON: ${describe(r)}`);
    throw err;
  }
}
