/**
 * A new image's name is durable (docs/FORMAT.md §7): create fsyncs the directory that holds the
 * image after the image's own fdatasync, and `convert` does the same for a new raw output. The
 * engine asks its backend (IoBackend.syncDirectoryOf); the CLI is checked under strace, which sees
 * the real openat of the directory and the fsync of that descriptor.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import type { BlockFile, IoBackend, OpenOptions } from '../../fvd/io.js';
import { MemIo } from '../helpers/mem-io.js';
import { CLI, TempDir } from '../helpers/cli.js';

/** MemIo that logs opens, flushes and directory syncs in order. */
class SpyIo implements IoBackend {
  readonly events: string[] = [];
  constructor(readonly mem = new MemIo()) {}
  async open(p: string, o?: OpenOptions): Promise<BlockFile> {
    const f = await this.mem.open(p, o);
    const events = this.events;
    return new Proxy(f, {
      get(target, prop, recv) {
        if (prop === 'flush') return () => (events.push(`flush ${p}`), target.flush());
        const v = Reflect.get(target, prop, recv);
        return typeof v === 'function' ? v.bind(target) : v;
      },
    });
  }
  async syncDirectoryOf(p: string): Promise<void> {
    this.events.push(`dirsync ${p}`);
  }
}

test('create syncs the image\'s directory, after the image\'s last flush', async () => {
  const io = new SpyIo();
  await FvdImage.create(io, '/d/a.fvd', { size: 1 << 20 });
  const last = io.events.lastIndexOf('dirsync /d/a.fvd');
  assert.ok(last >= 0, `no directory sync: ${io.events.join(', ')}`);
  assert.ok(io.events.lastIndexOf('flush /d/a.fvd') < last, 'the directory is synced after the file');
});

const tmp = new TempDir('fvd-dirsync-');
test.after(() => tmp.cleanup());

function strace(args: string[]): string[] | null {
  const log = tmp.file(`strace-${Math.random().toString(36).slice(2)}.log`);
  const r = spawnSync('strace', ['-f', '-qq', '-e', 'trace=openat,fsync', '-o', log, process.execPath, CLI, ...args], { encoding: 'utf8' });
  if (r.error) return null; // no strace here
  assert.is(r.status, 0, `fvd ${args.join(' ')}: ${r.stderr}`);
  return fs.readFileSync(log, 'utf8').split('\n');
}

/**
 * Whether the trace shows `dir` opened and, later, that descriptor fsync'ed. With -f, a call that
 * another thread interrupts is split into "<unfinished ...>" and "<... resumed>" lines.
 */
function dirFsynced(trace: string[], dir: string): boolean {
  const fds = new Set<string>();
  const pendingOpen = new Set<string>(); // pids inside an openat of `dir`
  const pendingSync = new Map<string, string>(); // pid -> fd of an unfinished fsync
  const quoted = `"${dir}", O_RDONLY`;
  for (const l of trace) {
    const pid = l.split(' ')[0]!;
    if (l.includes('openat(AT_FDCWD, ' + quoted)) {
      const m = /\) = (\d+)$/.exec(l);
      if (m) fds.add(m[1]!);
      else if (l.includes('<unfinished ...>')) pendingOpen.add(pid);
    } else if (pendingOpen.has(pid) && l.includes('<... openat resumed>')) {
      pendingOpen.delete(pid);
      const m = /= (\d+)$/.exec(l);
      if (m) fds.add(m[1]!);
    }
    const sync = /fsync\((\d+)(\)\s+= 0| <unfinished)/.exec(l);
    if (sync && fds.has(sync[1]!)) {
      if (sync[2]!.startsWith(')')) return true;
      pendingSync.set(pid, sync[1]!);
    }
    if (pendingSync.has(pid) && /<\.\.\. fsync resumed>\s*\)\s+= 0/.test(l)) return true;
  }
  return false;
}

test('CLI under strace: create, convert -O fvd and convert -O raw fsync the new file\'s directory', () => {
  const d = tmp.caseDir();
  const t1 = strace(['create', path.join(d, 'a.fvd'), '4M']);
  if (!t1) {
    console.log('  # skip: strace is not installed');
    return;
  }
  assert.ok(dirFsynced(t1, d), 'create: no fsync of the directory');
  const d2 = tmp.caseDir();
  assert.ok(dirFsynced(strace(['convert', '-O', 'fvd', path.join(d, 'a.fvd'), path.join(d2, 'b.fvd')])!, d2), 'convert -O fvd');
  const d3 = tmp.caseDir();
  assert.ok(dirFsynced(strace(['convert', '-O', 'raw', path.join(d, 'a.fvd'), path.join(d3, 'c.raw')])!, d3), 'convert -O raw');
});

test.run();
