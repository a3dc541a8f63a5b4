/**
 * fvd io [-f raw|fvd] [--read-only] [--no-copy-on-read] [--key-file PATH|-] -c CMD [-c CMD ...] IMAGE, like qemu-io:
 *   read  [-P PATTERN] OFFSET LEN   read; with -P every byte must equal PATTERN (else exit 1)
 *   write [-P PATTERN] [-F] OFFSET LEN   write PATTERN (default 0xcd); -F = FUA
 *   discard OFFSET LEN | zero OFFSET LEN | flush
 * Commands run in order; the first failure stops the run with exit 1.
 */
import { UsageError, formatSize, parseSize } from '../args.js';
import { defineCommand, parseCommand, usageError } from '../command.js';
import { diskSize, openDisk, parseFormat, probeFormat, type Disk } from '../disk.js';
import { KEY_FILE_OPTION, readKeyFile, wipe } from '../key-file.js';
import { refuseWhilePending } from '../pending-guard.js';

interface Parsed {
  name: string;
  pattern?: number;
  fua: boolean;
  offset: number;
  length: number;
}

function parseIoCommand(text: string): Parsed {
  const words = text.trim().split(/\s+/).filter(Boolean);
  const name = words.shift();
  if (!name) throw new UsageError('empty -c command');
  if (!['read', 'write', 'discard', 'zero', 'flush'].includes(name))
    throw new UsageError(`unknown io command '${name}' (read, write, discard, zero, flush)`);
  let pattern: number | undefined;
  let fua = false;
  const rest: string[] = [];
  for (let i = 0; i < words.length; i++) {
    const w = words[i]!;
    if (w === '-P' && (name === 'read' || name === 'write')) {
      const p = words[++i];
      const v = p === undefined ? NaN : Number(p);
      if (!Number.isInteger(v) || v < 0 || v > 255) throw new UsageError(`'${name}': invalid pattern '${p ?? ''}' (0..255, e.g. 0xab)`);
      pattern = v;
    } else if (w === '-F' && name === 'write') fua = true;
    else if (w.startsWith('-') && !/^-?\d/.test(w)) throw new UsageError(`'${name}': unknown option '${w}'`);
    else rest.push(w);
  }
  if (name === 'flush') {
    if (rest.length) throw new UsageError(`'flush' takes no arguments`);
    return { name, fua, offset: 0, length: 0 };
  }
  if (rest.length !== 2) throw new UsageError(`'${name}' needs OFFSET and LEN`);
  return { name, pattern, fua, offset: parseSize(rest[0]!, 'offset'), length: parseSize(rest[1]!, 'length') };
}

export const spec = defineCommand({
  name: 'io',
  summary: 'run I/O commands on an image or raw file, like qemu-io',
  usage: ['[-f raw|fvd|qcow2] [-r] [--no-copy-on-read] [--key-file PATH|-] -c CMD [-c CMD ...] IMAGE'],
  options: {
    c: { type: 'string', short: 'c', multiple: true, arg: 'CMD', help: 'a command to run (repeatable; see below)' },
    f: { type: 'string', short: 'f', arg: 'raw|fvd|qcow2', help: "IMAGE's format (default: probed; a probed raw file's sector 0 is not written)" },
    'read-only': { type: 'boolean', short: 'r', default: false, help: 'open read-only' },
    'no-copy-on-read': { type: 'boolean', default: false, help: 'do not store base data read into the image' },
    ...KEY_FILE_OPTION,
  },
  details: `Commands (OFFSET and LEN take K/M/G suffixes):
  read [-P PATTERN] OFFSET LEN     read; with -P every byte must equal PATTERN (else exit 1)
  write [-P PATTERN] [-F] OFFSET LEN
                                   write PATTERN (default 0xcd); -F: FUA
  discard OFFSET LEN | zero OFFSET LEN | flush
Commands run in order; the first failure stops the run with exit 1.`,
});

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 1) throw usageError(spec);
  refuseWhilePending(positionals[0]!, 'retry');
  const commands = (values.c ?? []).map(parseIoCommand);
  if (!commands.length) throw new UsageError('no commands given (-c "read -P 0xab 0 64k")');
  const format = parseFormat(values.f, 'format');
  // As qemu does: when the format was only guessed as raw, refuse to write its first sector (a
  // damaged FVD header would otherwise be overwritten as if it were guest data).
  if (!format && probeFormat(positionals[0]!) === 'raw') {
    const hitsSector0 = commands.find((c) => c.name !== 'read' && c.name !== 'flush' && c.offset < 512 && c.length > 0);
    if (hitsSector0) throw new UsageError(`refusing to ${hitsSector0.name} sector 0 of an image whose format was probed as raw: pass -f raw`);
  }
  // Every request is checked against the disk's size before the image is opened for writing: a
  // read-write open replays the journal of a dirty image and sets DIRTY, and a refused command
  // must leave the file byte-identical.
  const size = await diskSize(positionals[0]!, format);
  for (const cmd of commands) {
    if (cmd.name !== 'flush' && cmd.offset + cmd.length > size)
      throw new UsageError(`${cmd.name} at ${cmd.offset}+${cmd.length} is outside the disk (${size} bytes)`);
  }
  const key = readKeyFile(values['key-file']);
  const disk = await openDisk(positionals[0]!, format, {
    readOnly: values['read-only'],
    copyOnRead: !values['no-copy-on-read'],
    key,
  }).finally(() => wipe(key));
  try {
    for (const cmd of commands) if (!(await execute(disk, cmd))) return 1;
  } finally {
    await disk.close();
  }
  return 0;
}

/** Reads and writes go in pieces of at most this much: a request may be larger than any buffer. */
const PIECE = 64 * 1024 * 1024;

async function execute(disk: Disk, cmd: Parsed): Promise<boolean> {
  const t0 = process.hrtime.bigint();
  const at = `${cmd.length}/${cmd.length} bytes at offset ${cmd.offset}`;
  const end = cmd.offset + cmd.length;
  switch (cmd.name) {
    case 'read': {
      const buf = Buffer.alloc(Math.min(cmd.length, PIECE));
      const expect = cmd.pattern === undefined ? null : Buffer.alloc(buf.length, cmd.pattern);
      for (let pos = cmd.offset; pos < end; pos += PIECE) {
        const piece = buf.subarray(0, Math.min(PIECE, end - pos));
        await disk.read(piece, pos);
        if (expect && !piece.equals(expect.subarray(0, piece.length))) {
          const bad = pos + piece.findIndex((b) => b !== cmd.pattern);
          console.log(`Pattern verification failed at offset ${bad}, ${end - bad} bytes`);
          return false;
        }
      }
      console.log(`read ${at}`);
      break;
    }
    case 'write': {
      const buf = Buffer.alloc(Math.min(cmd.length, PIECE), cmd.pattern ?? 0xcd);
      for (let pos = cmd.offset; pos < end; pos += PIECE) {
        const n = Math.min(PIECE, end - pos);
        // FUA on the last piece: its commit makes the earlier pieces, completed before it, durable too.
        await disk.write(buf.subarray(0, n), pos, cmd.fua && pos + n === end);
      }
      console.log(`wrote ${at}`);
      break;
    }
    case 'discard':
      await disk.discard(cmd.offset, cmd.length);
      console.log(`discard ${at}`);
      break;
    case 'zero':
      await disk.writeZeroes(cmd.offset, cmd.length);
      console.log(`wrote zeroes ${at}`);
      break;
    case 'flush':
      await disk.flush();
      return true;
  }
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  console.log(`${formatSize(cmd.length)}, 1 ops; ${secs.toFixed(4)} sec (${formatSize(cmd.length / Math.max(secs, 1e-9))}/sec)`);
  return true;
}
