import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { libc, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, SEEK_DATA } from '../../ffi/libc.js';
import { ioFlusher, setIoFlusher, syscalls } from '../../ffi/syscalls.js';

test('libc: fallocate punches a hole that reads back as zeros', () => {
  const c = libc();
  assert.ok(c, 'koffi/libc must load');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-libc-'));
  const file = path.join(dir, 'f');
  const fd = fs.openSync(file, 'w+');
  try {
    fs.writeSync(fd, Buffer.alloc(256 * 1024, 0xab), 0, 256 * 1024, 0);
    assert.is(c!.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 64 * 1024, 64 * 1024), 0);
    const back = Buffer.alloc(64 * 1024, 1);
    fs.readSync(fd, back, 0, back.length, 64 * 1024);
    assert.ok(back.every((b) => b === 0));
    assert.is(fs.fstatSync(fd).size, 256 * 1024);
    assert.is(c!.lseek(fd, 64 * 1024, SEEK_DATA), 128 * 1024);
  } finally {
    fs.closeSync(fd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

/** CAP_SYS_RESOURCE (bit 24) in this process's effective set: PR_SET_IO_FLUSHER needs it. */
const CAP_SYS_RESOURCE = 24n;
const capEff = BigInt('0x' + (/^CapEff:\s*([0-9a-f]+)/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))?.[1] ?? '0'));
const hasSysResource = ((capEff >> CAP_SYS_RESOURCE) & 1n) === 1n;
if (!hasSysResource) console.log('# skip - PR_SET_IO_FLUSHER on a thread: no CAP_SYS_RESOURCE here (the device suite checks it in the guest)');
else console.log('# skip - PR_SET_IO_FLUSHER refused: this process has CAP_SYS_RESOURCE');

/** Runs setIoFlusher in a fresh worker thread; resolves with what that thread read back. */
function ioFlusherInWorker(): Promise<{ set: number; after: number }> {
  const url = new URL('../../ffi/syscalls.js', import.meta.url).href;
  const code = `const { parentPort } = require('node:worker_threads');
    import(${JSON.stringify(url)}).then((m) => {
      const sys = m.syscalls();
      const set = m.setIoFlusher(sys);
      parentPort.postMessage({ set, after: m.ioFlusher(sys) });
    });`;
  return new Promise((resolve, reject) => {
    const w = new Worker(code, { eval: true });
    w.once('message', (m) => void w.terminate().then(() => resolve(m)));
    w.once('error', reject);
  });
}

(hasSysResource ? test : test.skip)('PR_SET_IO_FLUSHER marks the calling thread only', async () => {
  const sys = syscalls()!;
  assert.is(ioFlusher(sys), 0, 'the main thread starts without it');
  const w = await ioFlusherInWorker();
  assert.is(w.set, 1, 'the worker reads its own flag back as set');
  assert.is(w.after, 1);
  assert.is(ioFlusher(sys), 0, "another thread's flag does not spread to this one");
});

(hasSysResource ? test.skip : test)('PR_SET_IO_FLUSHER without CAP_SYS_RESOURCE: -EPERM, flag unchanged', async () => {
  const w = await ioFlusherInWorker();
  assert.is(w.set, -1, 'EPERM');
  assert.is(w.after, -1, 'PR_GET_IO_FLUSHER is refused as well');
});

test.run();
