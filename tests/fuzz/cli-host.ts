/**
 * A child process that runs `fvd` commands through the built CLI's own entry point (main() of
 * build/daemon/main.js: the same argument parsing, error handling and exit codes), many commands
 * per process: starting Node for each of thousands of commands would cost the fuzzer most of its
 * time. The parent (tests/fuzz/campaign.ts) sends {id, args} over IPC and gets back the exit
 * code, what the command wrote to stdout and stderr, and file descriptors it left open under the
 * work directory (a leaked descriptor holds its file's lock). An exception that escapes main()
 * (uncaught, or an unhandled rejection from background work) is reported and ends this process,
 * as it would end the CLI; a hang is the parent's to detect (it kills this process).
 */
import fs from 'node:fs';
import path from 'node:path';
import { main } from '../../daemon/main.js';

interface Request {
  id: number;
  args: string[];
  /** Descriptors pointing under this directory after the command are reported (and closed). */
  workDir: string;
}

export interface HostReply {
  id: number;
  code: number;
  stdout: string;
  stderr: string;
  leaked: string[];
}

let current: Request | null = null;
let out = '';
let err = '';
const realOut = process.stdout.write.bind(process.stdout);
const realErr = process.stderr.write.bind(process.stderr);
process.stdout.write = ((chunk: string | Uint8Array) => {
  out += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
  return true;
}) as typeof process.stdout.write;
process.stderr.write = ((chunk: string | Uint8Array) => {
  err += typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
  return true;
}) as typeof process.stderr.write;

function openUnder(dir: string): { fd: number; target: string }[] {
  const found: { fd: number; target: string }[] = [];
  for (const name of fs.readdirSync('/proc/self/fd')) {
    try {
      const target = fs.readlinkSync(`/proc/self/fd/${name}`);
      if (target.startsWith(dir + path.sep)) found.push({ fd: Number(name), target });
    } catch {
      // closed meanwhile (the readdir's own descriptor)
    }
  }
  return found;
}

function fatal(kind: string, e: unknown): void {
  const text = `${kind}: ${(e as Error)?.stack ?? String(e)}`;
  process.send?.({ id: current?.id ?? -1, fatal: text, stdout: out, stderr: err });
  realErr(text + '\n');
  process.exit(99);
}
process.on('uncaughtException', (e) => fatal('uncaught exception', e));
process.on('unhandledRejection', (e) => fatal('unhandled rejection', e));

process.on('message', (req: Request) => {
  current = req;
  out = '';
  err = '';
  void main(req.args).then(
    (code) => {
      // Commands that install signal handlers (prefetch) would pile them up across commands.
      for (const sig of ['SIGINT', 'SIGTERM'] as const) process.removeAllListeners(sig);
      const leaked = openUnder(req.workDir);
      for (const l of leaked) fs.closeSync(l.fd); // so that later commands do not meet its lock
      const reply: HostReply = { id: req.id, code, stdout: out, stderr: err, leaked: leaked.map((l) => l.target) };
      current = null;
      process.send!(reply);
    },
    (e) => fatal('main() rejected', e),
  );
});

realOut(''); // keep the reference used
process.send!({ ready: true });
