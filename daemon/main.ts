/**
 * The `fvd` command line: dispatches to daemon/commands/<name>.js, each exporting its declaration
 * `spec` (daemon/command.ts) and `run(args: string[]): Promise<number>` (the exit code). Every
 * user-facing failure is one line on stderr and a non-zero exit; an unexpected exception is
 * reported as an internal error (exit 70).
 */
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { UsageError } from './args.js';
import { HelpRequested, formatHelp, type CommandSpec } from './command.js';
import { FvdError, oneLine } from '../fvd/errors.js';
import { UblkError } from './ublk/errors.js';
import { registerZstdFallback } from './zstd-fallback.js';

/**
 * Every command with its one-line summary, in the order `fvd --help` lists them. The summaries are
 * copies of each command's spec.summary (tests/cli/cli-admin.test.ts holds them equal), so that
 * `fvd --help` loads no command module: loading all of them took seconds under emulation.
 */
export const COMMAND_SUMMARIES = {
  create: 'create an image, empty or as a copy-on-write layer over a base',
  info: 'describe an image: layout, sizes, base chain, data / zeros / in base, dirty flag',
  map: 'list the extents of the disk: written data, zeros, or in which base',
  check: 'verify an image (and repair what can be repaired): exit 0 clean, 2 corrupt, 3 repaired',
  measure: 'how much space SRC converted (or a new image of --size) needs, e.g. to size an LV',
  compare: 'whether two disks read the same: exit 0 identical, 1 different, 2 error',
  convert: 'copy a disk into a new file: flatten an image with its base chain, or import a raw file',
  commit: 'write the image\'s data into its base, then empty the image',
  rebase: 'change the base of an image (-b "" removes it), keeping what the image reads',
  resize: 'grow or shrink the virtual disk',
  snapshot: 'internal snapshots of a compact image: create, list, apply (revert to), delete',
  io: 'run I/O commands on an image or raw file, like qemu-io',
  bench: 'benchmark the engine, like qemu-img bench',
  prefetch: 'copy the rest of the base into the image until it is fully local (progress, rate, ETA)',
  'change-key': 'change the key of an encrypted image (re-wraps the data key; nothing re-encrypted)',
  serve: 'serve an image as a block device /dev/ublkbN until stopped',
  list: 'list the devices served by fvd on this host',
  stop: 'stop a served device (by name, /dev path or device number) and wait for it',
} as const;

/** In the order `fvd --help` lists them. */
export const COMMANDS = Object.keys(COMMAND_SUMMARIES) as (keyof typeof COMMAND_SUMMARIES)[];

interface CommandModule {
  spec: CommandSpec;
  run(args: string[]): Promise<number>;
}

const load = (name: string) => import(`./commands/${name}.js`) as Promise<CommandModule>;

export function version(): string {
  const pkg = fileURLToPath(new URL('../../package.json', import.meta.url));
  try {
    return (JSON.parse(fs.readFileSync(pkg, 'utf8')) as { version: string }).version;
  } catch {
    return 'unknown';
  }
}

/** End of life of the Node.js LTS lines fvd is tested on (the Node.js release schedule). */
const NODE_END_OF_LIFE: Readonly<Record<number, string>> = { 20: '2026-04-30', 22: '2027-04-30', 24: '2028-04-30', 26: '2029-04-30' };

/**
 * ", end of life since DATE" when `nodeVersion`'s line is past its end of life at `now`, else ''.
 * `fvd --version` is where an admin checks what runs the daemon; a line out of security support
 * is worth saying there (make install INSTALL_NODE= pins another).
 */
export function endOfLifeNote(nodeVersion: string, now: Date): string {
  const eol = NODE_END_OF_LIFE[Number(nodeVersion.split('.')[0])];
  return eol !== undefined && now.getTime() >= Date.parse(`${eol}T00:00:00Z`) ? `, end of life since ${eol}` : '';
}

function usage(): string {
  const width = Math.max(...COMMANDS.map((c) => c.length));
  return [
    'usage: fvd COMMAND [options] ARGS...',
    '       fvd help COMMAND | fvd COMMAND --help   (every option of COMMAND)',
    '       fvd --version',
    '',
    'Commands:',
    ...COMMANDS.map((c) => `  ${c.padEnd(width)}  ${COMMAND_SUMMARIES[c]}`),
  ].join('\n');
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === '--version' || command === '-V') {
    console.log(`fvd ${version()} (Node.js ${process.versions.node}${endOfLifeNote(process.versions.node, new Date())})`);
    return 0;
  }
  if (!command || command === '-h' || command === '--help' || (command === 'help' && rest.length === 0)) {
    console.log(usage());
    return command ? 0 : 1;
  }
  if (command === 'help') {
    const [topic, ...extra] = rest;
    if (extra.length || !(COMMANDS as readonly string[]).includes(topic!)) {
      console.error(oneLine(`fvd help: unknown command '${rest.join(' ')}' (try 'fvd --help')`));
      return 1;
    }
    console.log(formatHelp((await load(topic!)).spec));
    return 0;
  }
  // Internal, not in the help: the expiry watcher `fvd serve --recovery-wait` starts (daemon/warden.ts).
  if (command === '__warden') return (await import('./warden.js')).runWarden(rest);
  if (!(COMMANDS as readonly string[]).includes(command)) {
    console.error(oneLine(`fvd: unknown command '${command}' (try 'fvd --help')`));
    return 1;
  }
  try {
    return await (await load(command)).run(rest);
  } catch (err) {
    if (err instanceof HelpRequested) {
      console.log(formatHelp(err.spec));
      return 0;
    }
    // The engine names the operation in some messages ("resize: ..."): say it once.
    // One line, always: messages quote paths and names, which may hold control characters.
    const text = (m: string) => oneLine(`fvd ${command}: ${m.startsWith(`${command}: `) ? m.slice(command.length + 2) : m}`);
    if (err instanceof UsageError) {
      console.error(text(err.message));
      return err.exitCode;
    }
    if (err instanceof FvdError || err instanceof UblkError) {
      console.error(text(err.message));
      return 1;
    }
    const e = err as NodeJS.ErrnoException;
    if (e && typeof e.code === 'string' && e.syscall) {
      console.error(oneLine(`fvd ${command}: ${e.path ?? ''}${e.path ? ': ' : ''}${e.message.replace(/^[A-Z]+: /, '')}`));
      return 1;
    }
    console.error(`fvd ${command}: internal error: ${(err as Error)?.stack ?? err}`);
    return 70;
  }
}

/** Runs the CLI and exits with its code (from daemon/cli.ts, after the Node version check). */
export function start(argv: string[]): void {
  registerZstdFallback(); // zstd-compressed qcow2 bases on Node versions without node:zlib zstd
  main(argv).then(
    (code) => process.exit(code),
    (err) => {
      console.error(`fvd: internal error: ${(err as Error)?.stack ?? err}`);
      process.exit(70);
    },
  );
}
