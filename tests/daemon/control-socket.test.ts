/**
 * The per-device control channel (daemon/control-socket.ts): one JSON line each way over a unix
 * socket, requests validated, handled one at a time, errors as one line, socket mode 0600, a
 * stale socket file replaced; and `fvd resize`'s client side finding the live server by the
 * image's real path (daemon/served-resize.ts).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ControlSocket, parseRequest, sendControl } from '../../daemon/control-socket.js';
import { FvdError } from '../../fvd/errors.js';
import { growServed, servedImage } from '../../daemon/served-resize.js';
import { writeState } from '../../daemon/state.js';

function tmp(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-ctl-'));
}

test('parseRequest: grow with exactly one of size and delta; anything else is a one-line EINVAL', () => {
  assert.equal(parseRequest('{"op":"grow","size":1048576}'), { op: 'grow', size: 1048576 });
  assert.equal(parseRequest('{"op":"grow","delta":512}'), { op: 'grow', delta: 512 });
  for (const bad of ['nope', '{"op":"shrink","size":1}', '{"op":"grow"}', '{"op":"grow","size":1,"delta":2}', '{"op":"grow","size":1.5}', 'null']) {
    assert.throws(() => parseRequest(bad), (e: Error) => e instanceof FvdError && /^control: /.test(e.message) && !/\n/.test(e.message), bad);
  }
});

test('ControlSocket: answers, serializes requests, reports errors, mode 0600, replaces a stale file', async () => {
  const dir = tmp();
  const file = path.join(dir, 'ublkb7.sock');
  fs.writeFileSync(file, 'stale');
  let size = 1000;
  let inFlight = 0;
  let maxInFlight = 0;
  const logged: string[] = [];
  const cs = await ControlSocket.listen(
    file,
    async (req) => {
      inFlight++;
      maxInFlight = Math.max(maxInFlight, inFlight);
      await new Promise((r) => setTimeout(r, 20));
      inFlight--;
      const target = req.size ?? size + req.delta!;
      if (target < size) throw new FvdError(`resize: can only grow (${target} < ${size})`, 'EINVAL');
      const old = size;
      size = target;
      return { oldSize: old, newSize: size };
    },
    (l) => logged.push(l),
  );
  try {
    assert.is(fs.statSync(file).mode & 0o777, 0o600);
    const [a, b] = await Promise.all([sendControl(file, { op: 'grow', delta: 24 }), sendControl(file, { op: 'grow', size: 2048 })]);
    assert.equal(a, { ok: true, oldSize: 1000, newSize: 1024 });
    assert.equal(b, { ok: true, oldSize: 1024, newSize: 2048 });
    assert.is(maxInFlight, 1, 'one request at a time');
    assert.equal(await sendControl(file, { op: 'grow', size: 10 }), { ok: false, error: 'resize: can only grow (10 < 2048)', code: 'EINVAL' });
    assert.equal(logged, ['control: resize: can only grow (10 < 2048)']);
    // A malformed line gets an error answer, not a hang.
    const raw = await new Promise<string>((resolve) => {
      const c = net.createConnection(file, () => c.write('{"op":"grow"}\n'));
      let s = '';
      c.setEncoding('utf8');
      c.on('data', (d: string) => (s += d));
      c.on('end', () => resolve(s));
    });
    assert.match(raw, /"ok":false,"error":"control: grow needs exactly one of size and delta/);
  } finally {
    cs.close();
  }
  assert.not.ok(fs.existsSync(file), 'close removes the socket');
  await rejectsFvd(sendControl(file, { op: 'grow', size: 1 }), /cannot reach the server on .*ublkb7\.sock: ENOENT/);
  fs.rmSync(dir, { recursive: true });
});

test('servedImage/growServed: the live server of the image by real path; its error is the CLI error', async () => {
  const dir = tmp();
  const runDir = path.join(dir, 'run');
  const saved = process.env.FVD_RUN_DIR;
  process.env.FVD_RUN_DIR = runDir;
  try {
    const image = path.join(dir, 'disk.fvd');
    fs.writeFileSync(image, '');
    fs.symlinkSync(image, path.join(dir, 'link.fvd'));
    const st = { name: 'd', devId: 3, device: '/dev/ublkb3', image, pid: process.pid, size: 4096, queues: 1, depth: 4, startedAt: '' };
    writeState({ ...st, devId: 4, device: '/dev/ublkb4', image: path.join(dir, 'other.fvd') });
    assert.is(servedImage(image), null, 'another image');
    writeState({ ...st, pid: 2 ** 22 + 12345 }); // no such process
    assert.is(servedImage(image), null, 'a dead server');
    writeState(st);
    assert.is(servedImage(path.join(dir, 'link.fvd'))?.devId, 3, 'found through a symlink');
    const cs = await ControlSocket.listen(path.join(runDir, 'ublkb3.sock'), async () => {
      throw new FvdError('resize: this kernel lacks UBLK_F_UPDATE_SIZE (6.14+)', 'EINVAL');
    }, () => {});
    try {
      await rejectsFvd(growServed(st, { delta: 512 }), /lacks UBLK_F_UPDATE_SIZE/);
    } finally {
      cs.close();
    }
  } finally {
    if (saved === undefined) delete process.env.FVD_RUN_DIR;
    else process.env.FVD_RUN_DIR = saved;
    fs.rmSync(dir, { recursive: true });
  }
});

async function rejectsFvd(p: Promise<unknown>, re: RegExp): Promise<void> {
  try {
    await p;
  } catch (e) {
    assert.instance(e, FvdError);
    assert.match((e as Error).message, re);
    return;
  }
  assert.unreachable('expected a rejection');
}

test.run();
