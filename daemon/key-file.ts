/**
 * `--key-file PATH` / `--key-file -` (stdin): the key material of an encrypted image
 * (docs/FORMAT.md §11). Keys are never taken on the command line (other users see argv in
 * /proc) and never printed: error messages name the file, not its content.
 *
 * The key is the file's bytes — a passphrase or random bytes alike — minus one trailing newline
 * ("\n" or "\r\n"), so `echo secret > key` and `printf secret | fvd ... --key-file -` give the
 * same key. It must be 1 byte .. 64 KiB (a larger file is almost surely the wrong file).
 */
import fs from 'node:fs';
import { MAX_KEY_MATERIAL } from '../fvd/crypto.js';
import { libc, PR_SET_DUMPABLE } from '../ffi/libc.js';
import { UsageError } from './args.js';

/** The option every command that opens images adds (daemon/command.ts declarations). */
export const KEY_FILE_OPTION = {
  'key-file': { type: 'string', arg: 'PATH|-', help: "an encrypted image's key: a file, or - for stdin" },
} as const;

let stdinTaken = false;

export function readKeyFile(spec: string | undefined, option = '--key-file'): Uint8Array | undefined {
  if (spec === undefined) return undefined;
  if (spec === '') throw new UsageError(`${option}: empty path (use - for stdin)`);
  keepOutOfCoreDumps();
  let bytes: Buffer;
  const name = spec === '-' ? 'stdin' : `key file ${spec}`;
  if (spec === '-') {
    if (stdinTaken) throw new UsageError(`${option} -: stdin was already read for another key`);
    stdinTaken = true;
    // A terminal would echo the key as it is typed: pipe it in instead.
    if (process.stdin.isTTY) throw new UsageError(`${option} -: stdin is a terminal; pipe the key in (e.g. ${option} - < FILE)`);
    bytes = readAll(0, name);
  } else {
    let fd: number;
    try {
      fd = fs.openSync(spec, 'r');
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      const why = e.code === 'ENOENT' ? 'no such file' : e.code === 'EACCES' ? 'permission denied' : e.code ?? e.message;
      throw new UsageError(`${option}: cannot open ${name}: ${why}`);
    }
    try {
      const st = fs.fstatSync(fd);
      if (st.isDirectory()) throw new UsageError(`${option}: ${name} is a directory`);
      bytes = readAll(fd, name);
    } finally {
      fs.closeSync(fd);
    }
  }
  try {
    let end = bytes.length;
    if (end > 0 && bytes[end - 1] === 0x0a) end--;
    if (end > 0 && bytes[end - 1] === 0x0d && end === bytes.length - 1) end--;
    if (end === 0) throw new UsageError(`${option}: ${name} is empty`);
    if (end > MAX_KEY_MATERIAL) throw new UsageError(`${option}: ${name} is larger than ${MAX_KEY_MATERIAL / 1024} KiB; is it the right file?`);
    // Exactly the key, in memory of its own that wipe() clears entirely (the read buffer is
    // cleared here, newline and all).
    const key = new Uint8Array(new ArrayBuffer(end));
    key.set(bytes.subarray(0, end));
    return key;
  } finally {
    bytes.fill(0); // the bytes read (readAll's buffer is zero past them)
  }
}

function readAll(fd: number, name: string): Buffer {
  // Bounded: one byte past the limit is enough to refuse an oversized file. Its own ArrayBuffer
  // (not Node's shared pool), which readKeyFile zeroes.
  const buf = Buffer.from(new ArrayBuffer(MAX_KEY_MATERIAL + 3));
  let n = 0;
  try {
    for (;;) {
      const got = fs.readSync(fd, buf, n, buf.length - n, null);
      if (got === 0 || (n += got) === buf.length) break;
    }
  } catch (err) {
    buf.fill(0);
    const e = err as NodeJS.ErrnoException;
    if (e.code === 'EAGAIN') throw new UsageError(`cannot read the key from ${name}: it is non-blocking and empty`);
    if (e.code === 'EOF') return buf.subarray(0, n);
    throw new UsageError(`cannot read the key from ${name}: ${e.code ?? e.message}`);
  }
  return buf.subarray(0, n);
}

/**
 * Marks this process non-dumpable (prctl PR_SET_DUMPABLE 0) before any key is read: no core dump
 * is written if it crashes, and processes of the same user can no longer ptrace it or read
 * /proc/PID/mem. Key copies live in V8's heap and OpenSSL's contexts, where MADV_DONTDUMP cannot
 * be applied per buffer, so the whole process is excluded. Returns false where koffi (libc) is
 * unavailable; the key is still read (the CLI stays usable), only without this protection.
 */
export function keepOutOfCoreDumps(): boolean {
  const c = libc();
  return c !== null && c.prctl(PR_SET_DUMPABLE, 0) === 0;
}

/** Best effort: overwrite key bytes once they are no longer needed. */
export function wipe(key: Uint8Array | undefined): void {
  key?.fill(0);
}
