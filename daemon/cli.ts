#!/usr/bin/env node
/**
 * `fvd` command-line entry: dispatches to daemon/commands/<name>.js, each exporting
 * `run(args: string[]): Promise<number>` (the exit code). Every user-facing failure is one line
 * on stderr and a non-zero exit; an unexpected exception is reported as an internal error.
 */
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { UsageError } from './args.js';
import { FvdError } from '../fvd/errors.js';

const COMMANDS: Record<string, string> = {
  create: 'create an image: fvd create [-b BASE] [-F raw|fvd] [--layout raw|compact] IMAGE [SIZE]',
  info: 'describe an image: fvd info [--json] IMAGE',
  check: 'verify (and repair) an image: fvd check [--repair] IMAGE',
  map: 'list extents and where they live: fvd map [--json] IMAGE',
  convert: 'flatten or import: fvd convert [-O raw|fvd] SRC DST',
  commit: 'write the image into its base and empty it: fvd commit [-d] [-p] [--key-file PATH|-] IMAGE',
  rebase: 'change the base: fvd rebase -b NEWBASE -F raw|fvd [-u] [--key-file PATH|-] IMAGE (-b "" removes it)',
  resize: 'grow or shrink the disk: fvd resize [--shrink] [--key-file PATH|-] IMAGE [+|-]SIZE',
  io: 'run I/O commands: fvd io -c "write -P 0xab 0 64k" IMAGE',
  bench: 'benchmark the engine: fvd bench [options] IMAGE',
  prefetch: 'copy the base into the image until it is fully local: fvd prefetch [--max-rate SIZE] [-q] IMAGE',
  'change-key': 'change the key of an encrypted image: fvd change-key --key-file OLD --new-key-file NEW IMAGE',
  snapshot: 'internal snapshots (compact images): fvd snapshot -c NAME | -l | -d NAME | -a NAME IMAGE',
  serve: 'serve an image as /dev/ublkbN: fvd serve IMAGE [--name N] [--dev-id N] [--queues N] [--depth N]',
  list: 'list devices served by fvd: fvd list [--json]',
  stop: 'stop a served device: fvd stop NAME|DEVICE',
};

function usage(): string {
  const width = Math.max(...Object.keys(COMMANDS).map((k) => k.length));
  return ['usage: fvd COMMAND [options]', '', ...Object.entries(COMMANDS).map(([k, v]) => `  ${k.padEnd(width)}  ${v}`)].join('\n');
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '-h' || command === '--help' || command === 'help') {
    console.log(usage());
    return command ? 0 : 1;
  }
  if (!Object.hasOwn(COMMANDS, command)) {
    console.error(`fvd: unknown command '${command}' (try 'fvd --help')`);
    return 1;
  }
  try {
    const mod = (await import(`./commands/${command}.js`)) as { run(args: string[]): Promise<number> };
    return await mod.run(rest);
  } catch (err) {
    if (err instanceof UsageError) {
      console.error(`fvd ${command}: ${err.message}`);
      return err.exitCode;
    }
    if (err instanceof FvdError) {
      console.error(`fvd ${command}: ${err.message}`);
      return 1;
    }
    const e = err as NodeJS.ErrnoException;
    if (e && typeof e.code === 'string' && e.syscall) {
      console.error(`fvd ${command}: ${e.path ?? ''}${e.path ? ': ' : ''}${e.message.replace(/^[A-Z]+: /, '')}`);
      return 1;
    }
    console.error(`fvd ${command}: internal error: ${(err as Error)?.stack ?? err}`);
    return 70;
  }
}

// Run only as the program itself (also through the /usr/local/bin/fvd symlink), not when imported:
// the image fuzzer (tests/fuzz/) runs main() in a long-lived process, many commands per process.
if (process.argv[1] && fs.realpathSync(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err) => {
      console.error(`fvd: internal error: ${(err as Error)?.stack ?? err}`);
      process.exit(70);
    },
  );
}
