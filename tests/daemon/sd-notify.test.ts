import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  sdNotify,
  sdNotifySocket,
  sdNotifyTransport,
  sockaddrUn,
  watchdogPingIntervalMs,
} from '../../ffi/sd-notify.js';
import { AF_UNIX, MSG_DONTWAIT, SOCK_CLOEXEC, SOCK_DGRAM, syscalls } from '../../ffi/syscalls.js';

const savedNotify = process.env.NOTIFY_SOCKET;
const tmpDir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-notify-'));

/** A bound AF_UNIX datagram socket standing in for systemd's notify socket. */
class Receiver {
  readonly fd: number;
  constructor(readonly name: string) {
    const sys = syscalls()!;
    this.fd = sys.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    assert.ok(this.fd >= 0, 'socket()');
    const sa = sockaddrUn(name)!;
    assert.is(sys.bind(this.fd, sa.addr, sa.len), 0, `bind(${name}): errno ${sys.errno()}`);
  }
  /** The next datagram, or null if none is queued (non-blocking). */
  recv(): string | null {
    const buf = Buffer.alloc(4096);
    const n = syscalls()!.recv(this.fd, buf, buf.length, MSG_DONTWAIT);
    return n < 0 ? null : buf.subarray(0, n).toString('utf8');
  }
  close(): void {
    syscalls()!.close(this.fd);
  }
}

function withNotifySocket<T>(name: string | undefined, fn: () => T): T {
  if (name === undefined) delete process.env.NOTIFY_SOCKET;
  else process.env.NOTIFY_SOCKET = name;
  try {
    return fn();
  } finally {
    if (savedNotify === undefined) delete process.env.NOTIFY_SOCKET;
    else process.env.NOTIFY_SOCKET = savedNotify;
  }
}

test('no NOTIFY_SOCKET: sdNotify is a no-op returning 0', () => {
  withNotifySocket(undefined, () => {
    assert.is(sdNotifyTransport(), 'none');
    assert.is(sdNotify('READY=1'), 0);
  });
});

test('sockaddr_un encoding: path keeps a NUL terminator, abstract gets a leading NUL and no terminator', () => {
  const p = sockaddrUn('/run/x.sock')!;
  assert.is(p.addr.readUInt16LE(0), AF_UNIX);
  assert.is(p.len, 2 + 11 + 1);
  assert.is(p.addr.subarray(2, 13).toString(), '/run/x.sock');
  assert.is(p.addr[13], 0);
  const a = sockaddrUn('@fvd/notify')!;
  assert.is(a.len, 2 + 11);
  assert.is(a.addr[2], 0);
  assert.is(a.addr.subarray(3, 13).toString(), 'fvd/notify');
  assert.is(sockaddrUn('relative'), null);
  assert.is(sockaddrUn('/' + 'x'.repeat(200)), null);
});

for (const kind of ['path', 'abstract'] as const) {
  test(`READY=1 reaches a ${kind} notify socket through sdNotify and the raw socket sender`, () => {
    const name =
      kind === 'path'
        ? path.join(tmpDir, `notify-${process.pid}.sock`)
        : `@fvd-test-notify-${process.pid}-${Math.random().toString(36).slice(2)}`;
    const rx = new Receiver(name);
    try {
      withNotifySocket(name, () => {
        const transport = sdNotifyTransport();
        assert.ok(transport === 'libsystemd' || transport === 'socket');
        const r = sdNotify('READY=1');
        assert.ok(r > 0, `sdNotify via ${transport} returned ${r}`);
        assert.is(rx.recv(), 'READY=1');
        assert.is(rx.recv(), null, 'exactly one datagram');
      });
      // Our own sender (used when libsystemd is missing), independent of the environment.
      assert.is(sdNotifySocket(name, 'STATUS=serving\nWATCHDOG=1'), 1);
      assert.is(rx.recv(), 'STATUS=serving\nWATCHDOG=1');
    } finally {
      rx.close();
      if (kind === 'path') fs.rmSync(name, { force: true });
    }
  });
}

test('a NOTIFY_SOCKET nobody listens on gives a negative errno, not an exception', () => {
  const name = path.join(tmpDir, 'nobody.sock');
  assert.ok(sdNotifySocket(name, 'READY=1') < 0);
  withNotifySocket(name, () => assert.ok(sdNotify('READY=1') < 0));
  assert.ok(sdNotifySocket('vsock:2:1234', 'READY=1') < 0);
});

test('watchdog interval: half of WATCHDOG_USEC, only for our PID', () => {
  const pid = process.pid;
  assert.is(watchdogPingIntervalMs({ WATCHDOG_USEC: '3000000', WATCHDOG_PID: String(pid) }, pid), 1500);
  assert.is(watchdogPingIntervalMs({ WATCHDOG_USEC: '3000000' }, pid), 1500);
  assert.is(watchdogPingIntervalMs({ WATCHDOG_USEC: '3000000', WATCHDOG_PID: String(pid + 1) }, pid), 0);
  assert.is(watchdogPingIntervalMs({}, pid), 0);
  assert.is(watchdogPingIntervalMs({ WATCHDOG_USEC: 'abc' }, pid), 0);
  assert.is(watchdogPingIntervalMs({ WATCHDOG_USEC: '0' }, pid), 0);
});

test.after(() => fs.rmSync(tmpDir, { recursive: true, force: true }));

test.run();
