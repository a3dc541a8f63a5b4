/**
 * The image fuzzer's campaign: mutants of the seed images (tests/fuzz/seeds.ts, mutated by
 * tests/fuzz/mutate.ts) run through the CLI, each checked against what README.md and
 * docs/FORMAT.md promise about bad input.
 *
 * Per mutant, in a directory of its own (the image and fresh copies of its bases):
 *   read-only on the mutant:  info --json, check, map, snapshot -l, io -r (the whole disk),
 *                             convert -O raw (the whole disk);
 *   read-write on copies:     io write+flush+read-back (pattern 0x5a), prefetch (with a base),
 *                             check --repair then check, an io read outside the disk (refused:
 *                             nothing may change), snapshot -c (compact images).
 * Encrypted seeds get the key for the commands that read data.
 *
 * Failures (each a finding, with the replay command):
 *   crash        exit 70, "internal error", a stack trace, an exception escaping the command, a
 *                signal
 *   hang         no answer within the time limit (the command's process is killed)
 *   multi-line   a refusal whose stderr is not exactly one line
 *   modified     a read-only command changed the image, or a refused command changed its file
 *   base         any command changed a base file
 *   leak         a file descriptor to the mutant's files left open after the command
 *   contract     `check` said clean (exit 0) but then: reading the whole disk or converting it
 *                failed, a write + flush + read-back failed or left an image `check` calls
 *                corrupt, snapshot -c failed or left it corrupt, or a second `check` disagreed
 *                with the first; or `check --repair` said
 *                repaired (exit 3) or clean and a following `check` did not
 * Check may call a mutant clean whose data changed (a flipped bitmap bit is a valid bitmap): the
 * contract is about consistency, not about knowing the original bytes.
 */
import { fork, spawnSync, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Rng } from '../helpers/rng.js';
import { mutate, readLayout } from './mutate.js';
import { FUZZ_KEY, makeSeeds, type Seed } from './seeds.js';
import type { HostReply } from './cli-host.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const HOST = path.join(HERE, 'cli-host.js');
const CLI = path.join(HERE, '..', '..', 'daemon', 'cli.js');
const EXIT_INTERNAL = 70;

export interface FuzzOptions {
  /** Campaign seed: with the mutant index it determines each mutant. */
  seed: number;
  mutants: number;
  /** Only this mutant index (replay). */
  only?: number;
  /** Per command, ms. */
  timeoutMs?: number;
  /** Where failing mutants are kept (a directory per finding); none: not kept. */
  keepDir?: string;
  /** One line per mutant: what was changed, each command's exit code. */
  verbose?: boolean;
  log?: (line: string) => void;
}

export interface Finding {
  index: number;
  seedImage: string;
  mutation: string;
  kind: string;
  command: string;
  detail: string;
  replay: string;
}

export interface FuzzResult {
  seed: number;
  mutants: number;
  commands: number;
  checkClean: number;
  findings: Finding[];
  /** Mutants per operator family. */
  families: Map<string, number>;
  ms: number;
}

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
  leaked: string[];
  hang: boolean;
  fatal: string | null;
}

/** One CLI host process; replaced when a command hangs or kills it. */
class Host {
  private child: ChildProcess | null = null;
  private ready: Promise<void> | null = null;
  private nextId = 1;

  private start(): Promise<void> {
    const child = fork(HOST, [], { execArgv: ['--no-warnings'], stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
    child.stderr!.resume(); // its own fatal line; the reply carries what matters
    this.child = child;
    this.ready = new Promise((resolve, reject) => {
      child.once('message', () => resolve());
      child.once('exit', (c) => reject(new Error(`fuzz CLI host exited (${c}) before it was ready`)));
    });
    return this.ready;
  }

  async run(args: string[], workDir: string, timeoutMs: number): Promise<Run> {
    if (!this.child) await this.start();
    await this.ready;
    const child = this.child!;
    const id = this.nextId++;
    return new Promise<Run>((resolve) => {
      let done = false;
      const finish = (r: Run) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        child.off('message', onMessage);
        child.off('exit', onExit);
        resolve(r);
      };
      const onMessage = (m: HostReply & { fatal?: string }) => {
        if (m.fatal !== undefined) finish({ code: null, stdout: m.stdout, stderr: m.stderr, leaked: [], hang: false, fatal: m.fatal });
        else if (m.id === id) finish({ code: m.code, stdout: m.stdout, stderr: m.stderr, leaked: m.leaked, hang: false, fatal: null });
      };
      const onExit = (code: number | null, signal: string | null) => {
        this.child = null;
        finish({ code, stdout: '', stderr: '', leaked: [], hang: false, fatal: `the command's process died (exit ${code}, signal ${signal})` });
      };
      const timer = setTimeout(() => {
        this.kill();
        finish({ code: null, stdout: '', stderr: '', leaked: [], hang: true, fatal: null });
      }, timeoutMs);
      child.on('message', onMessage);
      child.once('exit', onExit);
      child.send({ id, args, workDir });
    });
  }

  kill(): void {
    const c = this.child;
    this.child = null;
    if (c) {
      c.removeAllListeners('exit');
      c.kill('SIGKILL');
    }
  }
}

/**
 * A file's fingerprint: its bytes' hash, or for a huge sparse mutant its size, modification time
 * and first 64 MiB (any write changes the time).
 */
function sha(file: string): string {
  try {
    const st = fs.lstatSync(file, { bigint: true });
    if (!st.isFile()) return `${st.mode}`; // a directory, FIFO or link swapped in by a base mutation
    if (st.size <= 64n << 20n) return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
    const fd = fs.openSync(file, 'r');
    try {
      const head = Buffer.alloc(64 << 20);
      fs.readSync(fd, head, 0, head.length, 0);
      return `${st.size}/${st.mtimeNs}/${createHash('sha256').update(head).digest('hex')}`;
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return 'missing';
  }
}

/** Writes `bytes` keeping all-zero 4 KiB pages as holes (mutants of sparse images stay small). */
function writeSparse(file: string, bytes: Uint8Array, extendTo = 0): void {
  const fd = fs.openSync(file, 'w');
  try {
    for (let off = 0; off < bytes.length; off += 65536) {
      const end = Math.min(bytes.length, off + 65536);
      let nonZero = false;
      for (let i = off; i < end && !nonZero; i++) nonZero = bytes[i] !== 0;
      if (nonZero) fs.writeSync(fd, bytes, off, end - off, off);
    }
    fs.ftruncateSync(fd, Math.max(bytes.length, extendTo));
  } finally {
    fs.closeSync(fd);
  }
}

/** A mixing of campaign seed and index into the generator's seed (splitmix-style). */
function mutantSeed(seed: number, index: number): number {
  let x = (BigInt(seed >>> 0) << 32n) ^ BigInt(index >>> 0);
  x = (x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n;
  x &= (1n << 64n) - 1n;
  x = (x ^ (x >> 27n)) * 0x94d049bb133111ebn;
  x &= (1n << 64n) - 1n;
  return Number((x ^ (x >> 31n)) & 0xffffffffn) || 1;
}

/** Base files replaced or damaged (a base is the one file no command may ever write). */
function mutateBase(r: Rng, dir: string, seed: Seed): string | null {
  if (!seed.bases.length || !r.chance(0.07)) return null;
  const b = path.join(dir, seed.bases[0]!);
  switch (r.int(5)) {
    case 0: {
      const size = fs.statSync(b).size;
      const to = [0, 512, size - 512, Math.floor(size / 2)][r.int(4)]!;
      fs.truncateSync(b, to);
      return `base truncated to ${to}`;
    }
    case 1:
      fs.appendFileSync(b, Buffer.alloc(4096));
      return 'base extended by 4 KiB';
    case 2:
      fs.rmSync(b);
      return 'base deleted';
    case 3:
      fs.rmSync(b);
      fs.mkdirSync(b);
      return 'base replaced by a directory';
    default:
      fs.rmSync(b);
      fs.symlinkSync(path.basename(b), b);
      return 'base replaced by a symlink to itself';
  }
}

const lines = (s: string) => s.split('\n').filter((l) => l.trim().length > 0);

export async function runFuzz(o: FuzzOptions): Promise<FuzzResult> {
  const t0 = Date.now();
  const log = o.log ?? (() => {});
  const timeoutMs = o.timeoutMs ?? 20_000;
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-fuzz-'));
  const host = new Host();
  const result: FuzzResult = { seed: o.seed, mutants: 0, commands: 0, checkClean: 0, findings: [], families: new Map(), ms: 0 };
  try {
    const seeds = await makeSeeds(path.join(work, 'seeds'));
    const keyFile = path.join(work, 'key');
    fs.writeFileSync(keyFile, FUZZ_KEY, { mode: 0o600 });
    const first = o.only ?? 0;
    const last = o.only !== undefined ? o.only + 1 : o.mutants;
    for (let index = first; index < last; index++) {
      const r = new Rng(mutantSeed(o.seed, index));
      const seed = seeds[r.int(seeds.length)]!;
      const m = mutate(r, seed.bytes);
      const dir = path.join(work, `m${index}`);
      fs.mkdirSync(dir);
      for (const [name, bytes] of seed.baseBytes) writeSparse(path.join(dir, name), bytes);
      const baseWhat = mutateBase(r, dir, seed);
      const what = baseWhat ? `${m.what}; ${baseWhat}` : m.what;
      const family = baseWhat ? `${m.family}+base` : m.family;
      result.families.set(family.split('+')[0]!, (result.families.get(family.split('+')[0]!) ?? 0) + 1);
      const image = path.join(dir, seed.image);
      writeSparse(image, m.image, m.extendTo);
      const bases = seed.bases.map((b) => path.join(dir, b));
      const baseHashes = new Map(bases.map((b) => [b, sha(b)]));
      const imageHash = sha(image);
      const layout = readLayout(m.image);
      // The key goes with an image that says it is encrypted (a mutation may set or clear the bit).
      const key = layout.incompatible & 8n ? ['--key-file', keyFile] : [];
      const size = layout.virtualSize > 0 && layout.virtualSize <= 64 * 1024 * 1024 ? Math.floor(layout.virtualSize / 512) * 512 : 1024 * 1024;
      const replay = `FUZZ_SEED=${o.seed} FUZZ_ONLY=${index} make fuzz`;
      const found: Finding[] = [];
      const finding = (kind: string, command: string, detail: string) => {
        found.push({ index, seedImage: seed.name, mutation: what, kind, command, detail, replay });
      };
      let hung = false;
      const trace: string[] = [];

      /** Runs one command and applies the oracles that hold for every command. */
      const cmd = async (args: string[], opts: { readOnly: boolean; file: string; fileHash: string }): Promise<Run | null> => {
        if (hung) return null;
        result.commands++;
        const shown = `fvd ${args.join(' ')}`.replaceAll(work, '$W');
        const run = await host.run(args, work, timeoutMs);
        trace.push(`${args[0]}${args[1]?.startsWith('-') && args[0] !== 'io' ? args[1] : ''}=${run.hang ? 'hang' : run.code}${o.verbose && run.code && args[0] === 'info' ? ` (${lines(run.stderr)[0]?.replaceAll(work, '$W').slice(0, 120)})` : ''}`);
        if (run.hang) {
          hung = true;
          finding('hang', shown, `no answer within ${timeoutMs} ms`);
          return null;
        }
        if (run.fatal) finding('crash', shown, run.fatal.split('\n').slice(0, 3).join(' | '));
        const text = run.stdout + run.stderr;
        if (run.code === EXIT_INTERNAL || /internal error/i.test(text) || /\n\s+at .+[:(]/.test(text)) finding('crash', shown, lines(run.stderr).slice(0, 2).join(' | '));
        else if (run.code !== 0 && run.code !== null) {
          const patternFailure = run.stderr === '' && /Pattern verification failed/.test(run.stdout);
          const corruptReport = args[0] === 'check' && (run.code === 2 || run.code === 3) && run.stderr === '';
          if (!patternFailure && !corruptReport && lines(run.stderr).length !== 1) finding('multi-line', shown, `${lines(run.stderr).length} lines: ${JSON.stringify(run.stderr.slice(0, 300))}`);
        }
        if (run.leaked.length) finding('leak', shown, `descriptors left open: ${run.leaked.map((l) => l.replaceAll(work, '$W')).join(', ')}`);
        for (const [b, h] of baseHashes) if (sha(b) !== h) finding('base', shown, `${path.basename(b)} changed`);
        const now = sha(opts.file);
        const refused = run.code !== 0 && !(args[0] === 'check' && (run.code === 2 || run.code === 3)) && !(args[0] === 'io' && /Pattern verification failed/.test(run.stdout));
        if (now !== opts.fileHash && (opts.readOnly || refused)) finding('modified', shown, `${opts.readOnly ? 'a read-only command' : `a refused command (exit ${run.code})`} changed ${path.basename(opts.file)}`);
        return run;
      };
      const ro = { readOnly: true, file: image, fileHash: imageHash };
      const copy = (name: string): { readOnly: false; file: string; fileHash: string } => {
        const f = path.join(dir, name);
        writeSparse(f, m.image, m.extendTo);
        return { readOnly: false, file: f, fileHash: sha(f) };
      };

      await cmd(['info', '--json', image], ro);
      // With the key, check also verifies that it unlocks the image (without it, it cannot tell).
      const check1 = await cmd(['check', ...key, image], ro);
      await cmd(['map', image], ro);
      await cmd(['snapshot', '-l', image], ro);
      const read = await cmd(['io', '-r', ...key, '-c', `read 0 ${size}`, image], ro);
      const conv = await cmd(['convert', '-O', 'raw', ...key, image, path.join(dir, 'out.raw')], ro);
      const c1 = copy('w.fvd');
      const off = r.int(Math.max(1, Math.floor(size / 4096))) * 4096;
      const len = Math.min(4096, size - off);
      const write = len > 0 ? await cmd(['io', ...key, '-c', `write -P 0x5a ${off} ${len}`, '-c', 'flush', '-c', `read -P 0x5a ${off} ${len}`, c1.file], c1) : null;
      if (seed.bases.length) await cmd(['prefetch', '-q', ...key, path.join(dir, 'p.fvd')], copy('p.fvd'));
      const c3 = copy('r.fvd');
      const repair = await cmd(['check', '--repair', c3.file], c3);
      // A request outside the disk is refused before anything is written (a dirty image stays dirty).
      const c4 = copy('o.fvd');
      await cmd(['io', ...key, '-c', `read ${size} 4096`, c4.file], c4);
      let snap: Run | null = null;
      if (layout.incompatible & 2n) {
        const c5 = copy('s.fvd');
        snap = await cmd(['snapshot', '-c', 'fuzz', c5.file], c5);
      }

      // check's contract (see the header comment).
      if (check1?.code === 0 && !hung) {
        result.checkClean++;
        if (read && read.code !== 0) finding('contract', 'io -r read of the whole disk', `check said clean, the read exited ${read.code}: ${lines(read.stderr + read.stdout)[0] ?? ''}`);
        if (conv && conv.code !== 0) finding('contract', 'convert -O raw', `check said clean, convert exited ${conv.code}: ${lines(conv.stderr)[0] ?? ''}`);
        if (write && write.code !== 0) finding('contract', 'io write+flush+read-back', `check said clean, the write exited ${write.code}: ${lines(write.stderr + write.stdout).slice(-1)[0] ?? ''}`);
        if (write?.code === 0) {
          const after = await cmd(['check', c1.file], { readOnly: true, file: c1.file, fileHash: sha(c1.file) });
          if (after && after.code !== 0) finding('contract', 'check after a write', `check said clean, after a successful write it exits ${after.code}: ${lines(after.stdout + after.stderr).slice(0, 2).join(' | ')}`);
        }
        const check2 = await cmd(['check', ...key, image], ro);
        if (snap && snap.code !== 0) finding('contract', 'snapshot -c', `check said clean, snapshot -c exited ${snap.code}: ${lines(snap.stderr)[0] ?? ''}`);
        if (snap?.code === 0) {
          const s5 = path.join(dir, 's.fvd');
          const after = await cmd(['check', s5], { readOnly: true, file: s5, fileHash: sha(s5) });
          if (after && after.code !== 0) finding('contract', 'check after snapshot -c', `check said clean, after snapshot -c it exits ${after.code}: ${lines(after.stdout + after.stderr).slice(0, 2).join(' | ')}`);
        }
        if (check2 && (check2.code !== check1.code || check2.stdout !== check1.stdout)) finding('contract', 'check twice', `check is not deterministic: exit ${check1.code} then ${check2.code}`);
      }
      if (repair && (repair.code === 0 || repair.code === 3) && !hung) {
        const after = await cmd(['check', c3.file], { readOnly: true, file: c3.file, fileHash: sha(c3.file) });
        if (after && after.code !== 0) finding('contract', 'check after check --repair', `repair exited ${repair.code}, the next check exits ${after.code}: ${lines(after.stdout + after.stderr).slice(0, 2).join(' | ')}`);
      }

      result.mutants++;
      if (o.verbose) log(`# mutant ${index} ${seed.name}: ${what}: ${trace.join(' ')}`);
      if (found.length) {
        for (const f of found) {
          result.findings.push(f);
          log(`FAIL ${f.kind} mutant ${index} (${f.seedImage}: ${f.mutation}): ${f.command}: ${f.detail}\n     replay: ${f.replay}`);
        }
        if (o.keepDir) {
          fs.mkdirSync(o.keepDir, { recursive: true });
          const keep = path.join(o.keepDir, `seed${o.seed}-m${index}`);
          fs.rmSync(keep, { recursive: true, force: true });
          fs.mkdirSync(keep);
          writeSparse(path.join(keep, seed.image), m.image, m.extendTo);
          for (const [name, bytes] of seed.baseBytes) writeSparse(path.join(keep, name), bytes);
          fs.writeFileSync(path.join(keep, 'FINDINGS.txt'), found.map((f) => `${f.kind}: ${f.command}: ${f.detail}\nmutation: ${f.mutation}\nreplay: ${f.replay}\n`).join('\n'));
        }
      }
      fs.rmSync(dir, { recursive: true, force: true });
      if ((index + 1) % 50 === 0) log(`# ${index + 1} mutants, ${result.commands} commands, ${result.findings.length} findings, ${((Date.now() - t0) / 1000).toFixed(0)} s`);
    }
  } finally {
    host.kill();
    fs.rmSync(work, { recursive: true, force: true });
    result.ms = Date.now() - t0;
  }
  return result;
}

/** Re-runs one command through a real `node cli.js` process (for a report: same exit code?). */
export function realCli(args: string[], timeoutMs = 30_000): { code: number | null; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: timeoutMs });
  return { code: r.status, stderr: r.stderr };
}

/** The findings grouped by kind and command (first word), for a summary. */
export function summarize(findings: Finding[]): string[] {
  const groups = new Map<string, Finding[]>();
  for (const f of findings) {
    const k = `${f.kind} ${f.command.split(' ')[1] ?? ''}`;
    groups.set(k, [...(groups.get(k) ?? []), f]);
  }
  return [...groups].sort((a, b) => b[1].length - a[1].length).map(([k, fs2]) => `${String(fs2.length).padStart(5)}  ${k}  e.g. mutant ${fs2[0]!.index}: ${fs2[0]!.detail.slice(0, 140)}`);
}
