/**
 * systemd's sd_notify protocol (READY=1, STATUS=…, WATCHDOG=1, EXTEND_TIMEOUT_USEC=…) without a
 * native addon: Node's dgram has no AF_UNIX, so we either call libsystemd's own sd_notify through
 * koffi (it also knows vsock and credential passing) or send the datagram ourselves with
 * socket/sendto through libc.
 *
 * Return values follow sd_notify(3): 0 when NOTIFY_SOCKET is unset (not under systemd, nothing to
 * do), > 0 when sent, -errno on failure. Never throws: a failed notification must not take the
 * daemon down.
 */
import { createRequire } from 'node:module';
import { AF_UNIX, MSG_NOSIGNAL, SOCK_CLOEXEC, SOCK_DGRAM, syscalls } from './syscalls.js';

const require = createRequire(import.meta.url);

const ENOSYS = 38;
const EINVAL = 22;
const EAFNOSUPPORT = 97;
/** sizeof(struct sockaddr_un): sa_family_t (2 B) + sun_path[108]. */
const SOCKADDR_UN_SIZE = 110;
const SUN_PATH_MAX = 108;

/**
 * Builds a struct sockaddr_un for `name`: "/path" (NUL-terminated, addrlen counts the NUL as
 * systemd does) or "@abstract" (the '@' becomes a leading NUL, no terminator, so
 * addrlen = 2 + name.length: abstract names are length-delimited and a trailing NUL would be part
 * of the name). Returns null when the name is too long or neither form.
 */
export function sockaddrUn(name: string): { addr: Buffer; len: number } | null {
  const bytes = Buffer.from(name, 'utf8');
  const abstract = bytes[0] === 0x40; // '@'
  if (!abstract && bytes[0] !== 0x2f) return null; // '/'
  if (bytes.length > (abstract ? SUN_PATH_MAX : SUN_PATH_MAX - 1)) return null;
  const addr = Buffer.alloc(SOCKADDR_UN_SIZE);
  addr.writeUInt16LE(AF_UNIX, 0);
  bytes.copy(addr, 2);
  if (abstract) addr[2] = 0;
  return { addr, len: 2 + bytes.length + (abstract ? 0 : 1) };
}

/** Sends `state` as one datagram to `socketName` ("/path" or "@abstract"); 1 or -errno. */
export function sdNotifySocket(socketName: string, state: string): number {
  const sys = syscalls();
  if (!sys) return -ENOSYS;
  const sa = sockaddrUn(socketName);
  if (!sa) return socketName.startsWith('vsock') ? -EAFNOSUPPORT : -EINVAL;
  const fd = sys.socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -sys.errno();
  try {
    const msg = Buffer.from(state, 'utf8');
    const n = sys.sendto(fd, msg, msg.length, MSG_NOSIGNAL, sa.addr, sa.len);
    return n < 0 ? -sys.errno() : 1;
  } finally {
    sys.close(fd);
  }
}

interface Libsystemd {
  sdNotify(unsetEnvironment: number, state: string): number;
  getenv(name: string): string | null;
}

let libsystemd: Libsystemd | null | undefined;

function loadLibsystemd(): Libsystemd | null {
  if (libsystemd !== undefined) return libsystemd;
  try {
    const koffi = require('koffi');
    const lib = koffi.load('libsystemd.so.0');
    const fn = lib.func('int sd_notify(int unset_environment, const char *state)');
    const getenv = koffi.load('libc.so.6').func('const char *getenv(const char *name)');
    libsystemd = {
      sdNotify: (u, s) => fn(u, s) as number,
      getenv: (n) => getenv(n) as string | null,
    };
  } catch {
    libsystemd = null;
  }
  return libsystemd;
}

/** Which transport sdNotify will use for `socketName` (for logs and tests). */
export function sdNotifyTransport(socketName = process.env.NOTIFY_SOCKET): 'none' | 'libsystemd' | 'socket' {
  if (!socketName) return 'none';
  const sd = loadLibsystemd();
  // libsystemd reads the C environment; in a worker thread (or after an unusual env change)
  // process.env may differ from it, and then only our own sender honours what JS sees.
  if (sd && sd.getenv('NOTIFY_SOCKET') === socketName) return 'libsystemd';
  return 'socket';
}

/** sd_notify(0, state): 0 without NOTIFY_SOCKET, > 0 when sent, -errno on failure. */
export function sdNotify(state: string): number {
  const socketName = process.env.NOTIFY_SOCKET;
  switch (sdNotifyTransport(socketName)) {
    case 'none':
      return 0;
    case 'libsystemd':
      return loadLibsystemd()!.sdNotify(0, state);
    default:
      return sdNotifySocket(socketName!, state);
  }
}

/**
 * The watchdog ping interval in milliseconds: half of $WATCHDOG_USEC (as sd_watchdog_enabled(3)
 * recommends), or 0 when the watchdog is off or meant for another process ($WATCHDOG_PID set and
 * not ours).
 */
export function watchdogPingIntervalMs(env: NodeJS.ProcessEnv = process.env, pid = process.pid): number {
  const usecText = env.WATCHDOG_USEC;
  if (!usecText || !/^\d+$/.test(usecText)) return 0;
  const usec = Number(usecText);
  if (usec <= 0) return 0;
  const pidText = env.WATCHDOG_PID;
  if (pidText !== undefined && pidText !== '' && Number(pidText) !== pid) return 0;
  return Math.max(1, Math.floor(usec / 2000));
}

/**
 * Pings WATCHDOG=1 every watchdogPingIntervalMs() on an unref'd timer; returns a stop function
 * (a no-op when the watchdog is off). The timer only proves the event loop is alive: a daemon
 * whose I/O threads can hang should ping from a health check instead.
 */
export function startWatchdog(): () => void {
  const ms = watchdogPingIntervalMs();
  if (ms === 0) return () => {};
  const timer = setInterval(() => sdNotify('WATCHDOG=1'), ms);
  timer.unref();
  return () => clearInterval(timer);
}
