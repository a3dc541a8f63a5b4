/**
 * Real servers for the remote-base tests, started on loopback by the tests themselves: nginx
 * (Debian nginx-light) serving a directory, qemu-nbd and nbdkit exporting a file. Each helper
 * reports `null` when its program is not installed, so the caller can skip visibly
 * (tests/install-test-deps.sh installs them on the make/CI path).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import net from 'node:net';
import path from 'node:path';

const SBIN = ['/usr/sbin', '/usr/bin', '/sbin', '/bin'];

export function findProgram(name: string): string | null {
  for (const dir of [...(process.env.PATH ?? '').split(':'), ...SBIN]) {
    const p = path.join(dir, name);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      // next
    }
  }
  return null;
}

/** A free TCP port on 127.0.0.1 (bound and released; the server binds it next). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

export async function waitFor(check: () => Promise<boolean> | boolean, ms = 10_000, what = 'server'): Promise<void> {
  const until = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > until) throw new Error(`${what} did not come up within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export function tcpOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    s.on('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

/** A managed server process that can be stopped and started again on the same address. */
export class ServerProcess {
  private child: ChildProcess | null = null;
  constructor(
    private readonly argv: string[],
    private readonly ready: () => Promise<boolean> | boolean,
    private readonly name: string,
    private readonly beforeStart?: () => void,
  ) {}

  async start(): Promise<this> {
    if (this.child) return this;
    this.beforeStart?.();
    const child = spawn(this.argv[0]!, this.argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    child.stderr!.on('data', (d) => (err += d));
    let exited = false;
    child.on('exit', () => (exited = true));
    this.child = child;
    try {
      await waitFor(async () => {
        if (exited) throw new Error(`${this.name} exited at start: ${err.trim().split('\n').pop()}`);
        return this.ready();
      }, 15_000, this.name);
    } catch (e) {
      await this.stop();
      throw e;
    }
    return this;
  }

  /** Stops the process (SIGKILL: as a crash or a pulled cable would) and waits for it to go. */
  async stop(): Promise<void> {
    const c = this.child;
    if (!c) return;
    this.child = null;
    if (c.exitCode === null && c.signalCode === null) {
      const gone = new Promise((r) => c.once('exit', r));
      c.kill('SIGKILL');
      await gone;
    }
  }

  get running(): boolean {
    return this.child !== null;
  }
}

/** nginx serving `root` on 127.0.0.1:port; null when nginx is not installed. */
export async function nginx(root: string, work: string): Promise<{ server: ServerProcess; url: string; port: number } | null> {
  const bin = findProgram('nginx');
  if (!bin) return null;
  const port = await freePort();
  fs.mkdirSync(work, { recursive: true });
  const conf = path.join(work, 'nginx.conf');
  const t = (n: string) => path.join(work, n);
  fs.writeFileSync(
    conf,
    // As root, nginx's workers would run as nobody, who cannot read a private temporary directory.
    (process.getuid?.() === 0 ? 'user root;\n' : '') +
    `daemon off;\nmaster_process off;\nworker_processes 1;\npid ${t('nginx.pid')};\nerror_log ${t('error.log')};\nevents { worker_connections 256; }\n` +
      `http {\n  access_log off;\n  client_body_temp_path ${t('body')};\n  proxy_temp_path ${t('proxy')};\n  fastcgi_temp_path ${t('fastcgi')};\n` +
      `  uwsgi_temp_path ${t('uwsgi')};\n  scgi_temp_path ${t('scgi')};\n  keepalive_requests 100000;\n` +
      `  server {\n    listen 127.0.0.1:${port};\n    root ${root};\n    location / { }\n  }\n}\n`,
  );
  const server = new ServerProcess([bin, '-c', conf, '-p', work, '-e', t('error.log')], () => tcpOpen(port), 'nginx');
  await server.start();
  return { server, url: `http://127.0.0.1:${port}`, port };
}

/** qemu-nbd exporting `file` read-only on a unix socket; null when qemu-nbd is not installed. */
export async function qemuNbd(file: string, socket: string, format: 'raw' | 'qcow2' = 'raw', exportName = 'disk'): Promise<ServerProcess | null> {
  const bin = findProgram('qemu-nbd');
  if (!bin) return null;
  const server = new ServerProcess(
    [bin, '-r', '-t', '--shared=8', '-f', format, '-x', exportName, `--socket=${socket}`, file],
    () => fs.existsSync(socket) && unixOpen(socket),
    'qemu-nbd',
    () => fs.rmSync(socket, { force: true }),
  );
  return server.start();
}

/** qemu-nbd on TCP 127.0.0.1:port. */
export async function qemuNbdTcp(file: string, exportName = 'disk'): Promise<{ server: ServerProcess; port: number } | null> {
  const bin = findProgram('qemu-nbd');
  if (!bin) return null;
  const port = await freePort();
  const server = new ServerProcess([bin, '-r', '-t', '--shared=8', '-f', 'raw', '-x', exportName, '-b', '127.0.0.1', '-p', String(port), file], () => tcpOpen(port), 'qemu-nbd');
  await server.start();
  return { server, port };
}

/** nbdkit (file plugin) on a unix socket with filters, e.g. ['--filter=delay', 'rdelay=200ms']. */
export async function nbdkit(file: string, socket: string, filterArgs: string[]): Promise<ServerProcess | null> {
  const bin = findProgram('nbdkit');
  if (!bin) return null;
  const filters = filterArgs.filter((a) => a.startsWith('--filter='));
  const params = filterArgs.filter((a) => !a.startsWith('--filter='));
  const server = new ServerProcess(
    [bin, '-f', '-r', '-U', socket, ...filters, 'file', `file=${file}`, ...params],
    () => fs.existsSync(socket) && unixOpen(socket),
    'nbdkit',
    () => fs.rmSync(socket, { force: true }),
  );
  return server.start();
}

export function unixOpen(p: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect({ path: p });
    s.on('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
  });
}

/** Whether qemu-img can read `url` (qemu-block-extra's curl/nbd drivers). */
export function qemuImgCan(url: string): boolean {
  const bin = findProgram('qemu-img');
  if (!bin) return false;
  return spawnSync(bin, ['info', url], { encoding: 'utf8' }).status === 0;
}

/**
 * An https server on 127.0.0.1 with a fresh self-signed certificate (openssl), answering Range GETs
 * of `data` (206, ETag "v1"): for the certificate-verification tests. Null without openssl.
 * `cert` is the PEM file a client must trust; `close()` drops every connection.
 */
export async function selfSignedRangeServer(dir: string, data: Uint8Array): Promise<{ origin: string; cert: string; close: () => void } | null> {
  if (findProgram('openssl') === null) return null;
  const key = path.join(dir, 'key.pem');
  const cert = path.join(dir, 'cert.pem');
  const r = spawnSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=127.0.0.1', '-addext', 'subjectAltName=IP:127.0.0.1'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`openssl req failed: ${r.stderr}`);
  const size = data.length;
  const server = https.createServer({ key: fs.readFileSync(key), cert: fs.readFileSync(cert) }, (req, res) => {
    const m = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '')!;
    const a = Number(m[1]);
    const z = Math.min(Number(m[2]), size - 1);
    res.writeHead(206, { 'Content-Range': `bytes ${a}-${z}/${size}`, 'Content-Length': String(z - a + 1), ETag: '"v1"' });
    res.end(data.subarray(a, z + 1));
  });
  await new Promise<void>((ok) => server.listen(0, '127.0.0.1', ok));
  const origin = `https://127.0.0.1:${(server.address() as net.AddressInfo).port}`;
  return {
    origin,
    cert,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}
