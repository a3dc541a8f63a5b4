import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { libc, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, SEEK_DATA } from '../ffi/libc.js';

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

test.run();
