#!/usr/bin/env node
/**
 * `fvd` entry point. Before anything else is loaded, it checks the Node.js version: on an older
 * Node the rest of the CLI would fail in some obscure way (a missing API, koffi refusing to load),
 * so it says what is needed in one line instead. This file therefore imports nothing statically.
 */
const MIN = [20, 15] as const;
const [major = 0, minor = 0] = process.versions.node.split('.').map(Number);
if (major < MIN[0] || (major === MIN[0] && minor < MIN[1])) {
  process.stderr.write(`fvd: Node.js ${process.versions.node} is too old: fvd needs Node.js ${MIN.join('.')} or newer (tested on 20, 24 and 26)\n`);
  process.exit(1);
}
import('./main.js').then(
  (m: typeof import('./main.js')) => m.start(process.argv.slice(2)),
  (err: unknown) => {
    process.stderr.write(`fvd: cannot load the CLI: ${(err as Error)?.message ?? err}\n`);
    process.exit(70);
  },
);
