/**
 * `fvd bench`: runs on small images and reports sane numbers, rejects bad arguments with one line,
 * and its writes really land in the image.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { FvdImage } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { readWholeDisk } from '../helpers/model.js';

const cli = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', '..', 'daemon', 'cli.js');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-bench-test-'));
const MiB = 1024 * 1024;

function fvd(...args: string[]) {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

function benchJson(...args: string[]) {
  const r = fvd('bench', '--json', ...args);
  assert.is(r.code, 0, `fvd bench ${args.join(' ')} failed: ${r.stderr}`);
  const lines = r.stdout.trim().split('\n');
  assert.is(lines.length, 1, 'one JSON line');
  return JSON.parse(lines[0]!) as Record<string, number | string | null>;
}

function assertSane(res: Record<string, number | string | null>, count: number, bufferSize: number) {
  assert.is(res.count, count);
  assert.is(res.bufferSize, bufferSize);
  assert.is(res.bytes, count * bufferSize);
  for (const k of ['elapsedSeconds', 'opsPerSecond', 'mibPerSecond'] as const) {
    assert.type(res[k], 'number');
    assert.ok((res[k] as number) > 0 && Number.isFinite(res[k] as number), `${k} = ${res[k]}`);
  }
  for (const k of ['cpuUserSeconds', 'cpuSystemSeconds', 'closeSeconds'] as const) {
    assert.ok(typeof res[k] === 'number' && (res[k] as number) >= 0, `${k} = ${res[k]}`);
  }
  // ops/s and MiB/s agree with each other and with the elapsed time
  const ops = count / (res.elapsedSeconds as number);
  assert.ok(Math.abs((res.opsPerSecond as number) - ops) / ops < 1e-9);
  assert.ok(Math.abs((res.mibPerSecond as number) - (ops * bufferSize) / MiB) / (res.mibPerSecond as number) < 1e-9);
}

async function newImage(name: string, size: number, layout: 'raw' | 'compact' = 'raw'): Promise<string> {
  const file = path.join(dir, name);
  await FvdImage.create(nodeIo, file, { size, layout });
  return file;
}

test('bench -f raw: reads and writes a raw file, prints one human line and sane JSON', () => {
  const file = path.join(dir, 'plain.raw');
  fs.writeFileSync(file, Buffer.alloc(MiB));
  const w = benchJson('-f', 'raw', '-w', '-c', '256', '-d', '4', '-s', '4k', '--fill', '0x3c', file);
  assertSane(w, 256, 4096);
  assert.is(w.op, 'write');
  assert.is(w.format, 'raw');
  assert.ok(fs.readFileSync(file).every((b) => b === 0x3c), 'the raw file holds the written bytes');

  const r = benchJson('-f', 'raw', '-c', '100', '-d', '8', '--pattern', 'rand', '--seed', '7', file);
  assertSane(r, 100, 4096);
  assert.is(r.op, 'read');
  assert.is(r.pattern, 'rand');

  const human = fvd('bench', '-f', 'raw', '-c', '32', '-d', '2', file);
  assert.is(human.code, 0, human.stderr);
  const lines = human.stdout.trim().split('\n');
  assert.is(lines.length, 1);
  assert.match(lines[0]!, /\d+ ops\/s, \d+\.\d MiB\/s, \d+\.\d{3} s$/);
});

test('bench: a write bench on an FVD image really writes (read back through FvdImage)', async () => {
  const file = await newImage('w.fvd', MiB);
  // 256 x 4 KiB sequential writes with 8 in flight cover the whole 1 MiB image exactly once.
  const res = benchJson('-w', '-c', '256', '-d', '8', '-s', '4k', '--fill', '0x5a', file);
  assertSane(res, 256, 4096);
  assert.is(res.format, 'fvd');
  assert.is(res.imageSize, MiB);
  const data = await readWholeDisk(nodeIo, file);
  assert.ok(data.every((b) => b === 0x5a), 'every byte of the image was written by the bench');
});

test('bench: the stride (-S) pattern wraps like qemu-img and writes only where it should', async () => {
  const file = await newImage('stride.fvd', MiB);
  // 64 KiB image blocks of 4 KiB: step 5 blocks, 8 requests -> blocks 0,5,10,...,35 (no wrap)
  // then a second run wrapping: start at block 250, step 3 -> 250,253,0(256 mod 256),3
  assertSane(benchJson('-w', '-c', '8', '-d', '3', '-S', '20k', '--fill', '0x11', file), 8, 4096);
  assertSane(benchJson('-w', '-c', '4', '-d', '2', '-o', `${250 * 4096}`, '-S', '12k', '--fill', '0x22', file), 4, 4096);
  const data = await readWholeDisk(nodeIo, file);
  const expect = new Uint8Array(MiB);
  for (let i = 0; i < 8; i++) expect.fill(0x11, i * 5 * 4096, (i * 5 + 1) * 4096);
  for (const b of [250, 253, 0, 3]) expect.fill(0x22, b * 4096, (b + 1) * 4096);
  assert.ok(Buffer.from(data).equals(Buffer.from(expect)), 'exactly the strided blocks were written');
});

test('bench: reads, rand pattern, flush interval and a compact image all run', async () => {
  const file = await newImage('r.fvd', 2 * MiB);
  assertSane(benchJson('-w', '-c', '32', '-d', '4', '-s', '64k', '--flush-interval', '8', file), 32, 65536);
  assertSane(benchJson('-w', '-c', '32', '-d', '4', '-s', '64k', '--flush-interval', '8', '--no-drain', file), 32, 65536);
  assertSane(benchJson('-c', '200', '-d', '16', '--pattern', 'rand', file), 200, 4096);
  assertSane(benchJson('-c', '200', '-d', '1', '--no-copy-on-read', file), 200, 4096);
  const compact = await newImage('c.fvd', MiB, 'compact');
  assertSane(benchJson('-w', '-c', '100', '-d', '4', '--pattern', 'rand', '--seed', '3', compact), 100, 4096);
  assertSane(benchJson('-c', '100', '-d', '4', compact), 100, 4096);
});

test('bench --io uring: the same loop over the io_uring backend, storage/uring-file.ts (or a one-line refusal)', async () => {
  const file = await newImage('uring.fvd', MiB);
  const r = fvd('bench', '--json', '--io', 'uring', '-w', '-c', '256', '-d', '8', '--fill', '0x77', file);
  if (r.code !== 0) {
    // io_uring can be missing (old kernel, seccomp): then one line saying so, not a crash.
    assert.is(r.stderr.trimEnd().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, /^fvd bench: (--io uring: io_uring is not available|.*(ENOSYS|EPERM|io_uring))/i);
    return;
  }
  const res = JSON.parse(r.stdout) as Record<string, number | string | null>;
  assertSane(res, 256, 4096);
  assert.is(res.io, 'uring');
  assert.ok((await readWholeDisk(nodeIo, file)).every((b) => b === 0x77), 'the io_uring write bench wrote the whole image');
  assertSane(benchJson('--io', 'uring', '-c', '300', '-d', '16', '--pattern', 'rand', file), 300, 4096);
  const raw = path.join(dir, 'uring.raw');
  fs.writeFileSync(raw, Buffer.alloc(MiB));
  assertSane(benchJson('--io', 'uring', '-f', 'raw', '-w', '-c', '256', '-d', '4', '--fill', '9', raw), 256, 4096);
  assert.ok(fs.readFileSync(raw).every((b) => b === 9));
});

test('bench: bad arguments are one-line usage errors with a non-zero exit', async () => {
  const file = await newImage('bad.fvd', MiB);
  const cases: string[][] = [
    [],
    [file, file],
    ['-c', '0', file],
    ['-c', 'ten', file],
    ['-d', '0', file],
    ['-s', '12x', file],
    ['--pattern', 'zigzag', file],
    ['--pattern', 'rand', '-S', '8k', file],
    ['--seed', '3', file],
    ['--flush-interval', '10', file],
    ['-w', '-d', '8', '--flush-interval', '4', file],
    ['-f', 'qcow2', file],
    ['--io', 'aio', file],
    ['--bogus', file],
    ['-o', '1M', file],
    ['-s', '4k', '-S', '5000', '-c', '300', file],
    ['-f', 'raw', path.join(dir, 'does-not-exist')],
  ];
  for (const args of cases) {
    const r = fvd('bench', ...args);
    const what = `fvd bench ${args.join(' ')}`;
    assert.ok(r.code !== 0 && r.code !== null, `${what}: exit code ${r.code}`);
    assert.is(r.code !== 70, true, `${what}: internal error: ${r.stderr}`);
    assert.is(r.stdout, '', `${what}: nothing on stdout`);
    const lines = r.stderr.trimEnd().split('\n');
    assert.is(lines.length, 1, `${what}: one line, got ${JSON.stringify(r.stderr)}`);
    assert.match(lines[0]!, /^fvd bench: \S/);
  }
});

test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

test.run();
