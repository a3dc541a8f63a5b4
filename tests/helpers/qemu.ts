/**
 * QEMU's own tools as the reference for qcow2 tests: images are made by qemu-img and qemu-io
 * (Debian qemu-utils, installed by tests/host-tools.sh), and what a qcow2 image holds is what
 * `qemu-img convert -O raw` says. Tests that need them are skipped — visibly — where they are
 * missing (`qemuTest`).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { test } from 'uvu';

export const HAVE_QEMU = ['qemu-img', 'qemu-io'].every((t) => spawnSync(t, ['--version'], { stdio: 'ignore' }).status === 0);
let warned = false;

/** A uvu test that needs qemu-img/qemu-io: registered as skipped (and said so once) without them. */
export function qemuTest(name: string, fn: () => Promise<void> | void): void {
  if (HAVE_QEMU) {
    test(name, fn);
    return;
  }
  if (!warned) console.log('qcow2 differential tests SKIPPED: qemu-img/qemu-io not installed (apt-get install qemu-utils)');
  warned = true;
  test.skip(name, fn);
}

export function qemuImg(...args: string[]): string {
  // qemu-img's LUKS key set-up times PBKDF2 by thread CPU time and gives up with "Unable to get
  // accurate CPU usage" when a busy host leaves the thread unscheduled for a whole round: a
  // fixture hiccup, not a result, so that one failure is tried again (a few times).
  for (let attempt = 1; ; attempt++) {
    try {
      return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (err) {
      const stderr = String((err as { stderr?: unknown }).stderr ?? '');
      if (attempt >= 5 || !/Unable to get accurate CPU usage/.test(stderr)) throw err;
    }
  }
}

/** qemu-io commands on a qcow2 image (each one a -c), as a hypervisor would write it. */
export function qemuIo(file: string, ...commands: string[]): void {
  const args = ['-f', 'qcow2'];
  for (const c of commands) args.push('-c', c);
  execFileSync('qemu-io', [...args, file], { stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Every byte of the image as QEMU reads it. */
export function qemuRead(file: string, format = 'qcow2'): Buffer {
  const out = `${file}.ref-${process.pid}.raw`;
  try {
    qemuImg('convert', '-f', format, '-O', 'raw', file, out);
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

/**
 * Disk contents that compress like a real disk: pseudo-random runs, text, and zero runs, chosen
 * per 4 KiB from `seed`, so each test's data differs but replays exactly.
 */
export function diskPattern(size: number, seed: number): Buffer {
  const b = Buffer.alloc(size);
  let s = seed >>> 0 || 1;
  const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0), s);
  for (let off = 0; off < size; off += 4096) {
    const end = Math.min(size, off + 4096);
    const kind = next() % 4;
    if (kind === 0) continue; // zeros
    if (kind === 1) for (let i = off; i < end; i++) b[i] = next() >>> 24;
    else if (kind === 2) b.write(`block ${off} of seed ${seed}: the quick brown fox. `.repeat(120), off, end - off, 'latin1');
    else b.fill((next() & 0xfe) + 1, off, end);
  }
  return b;
}

export function writeFile(dir: string, name: string, data: Uint8Array): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, data);
  return p;
}
