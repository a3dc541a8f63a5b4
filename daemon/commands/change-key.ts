/**
 * fvd change-key --key-file OLD|- --new-key-file NEW|- [--kdf-log2n N] IMAGE
 *
 * Re-wraps an encrypted image's master key under a new key (docs/FORMAT.md §11.2; fvd/change-key.ts):
 * one atomic header-sector write, no data re-encrypted. The old key is verified first; a wrong
 * one changes nothing. At most one key may come from stdin, and not both from the same file.
 */
import fs from 'node:fs';
import path from 'node:path';
import { changeKey } from '../../fvd/change-key.js';
import { KDF_LIMITS } from '../../fvd/crypto.js';
import { storageIo } from '../../storage/storage-io.js';
import { UsageError } from '../args.js';
import { defineCommand, parseCommand, usageError } from '../command.js';
import { readKeyFile, wipe } from '../key-file.js';
import { oneLine } from '../../fvd/errors.js';
import { refuseWhilePending } from '../pending-guard.js';


/** True when both names are the same file (path or hard link). */
function sameFile(a: string, b: string): boolean {
  if (path.resolve(a) === path.resolve(b)) return true;
  try {
    const sa = fs.statSync(a);
    const sb = fs.statSync(b);
    return sa.dev === sb.dev && sa.ino === sb.ino;
  } catch {
    return false; // a missing file: readKeyFile reports it
  }
}

export const spec = defineCommand({
  name: 'change-key',
  summary: 'change the key of an encrypted image (re-wraps the data key; nothing re-encrypted)',
  usage: ['--key-file OLD|- --new-key-file NEW|- [--kdf-log2n N] IMAGE'],
  options: {
    'key-file': { type: 'string', arg: 'OLD|-', help: 'the current key (- = stdin)' },
    'new-key-file': { type: 'string', arg: 'NEW|-', help: 'the new key (- = stdin; at most one of the two)' },
    'kdf-log2n': { type: 'string', arg: 'N', help: `scrypt cost 2^N for the new key (${KDF_LIMITS.log2N[0]}..${KDF_LIMITS.log2N[1]}; default: keep the image's)` },
  },
});
const USAGE = `usage: fvd change-key ${spec.usage[0]}`;

export async function run(args: string[]): Promise<number> {
  const { values, positionals } = parseCommand(spec, args);
  if (positionals.length !== 1) throw usageError(spec);
  const oldSpec = values['key-file'];
  const newSpec = values['new-key-file'];
  if (oldSpec === undefined) throw new UsageError(`the current key is needed: --key-file OLD (${USAGE})`);
  if (newSpec === undefined) throw new UsageError(`the new key is needed: --new-key-file NEW (${USAGE})`);
  if (oldSpec === '-' && newSpec === '-') throw new UsageError('--key-file and --new-key-file cannot both be stdin');
  if (oldSpec !== '-' && newSpec !== '-' && oldSpec !== '' && newSpec !== '' && sameFile(oldSpec, newSpec))
    throw new UsageError('--key-file and --new-key-file name the same file');
  let log2N: number | undefined;
  if (values['kdf-log2n'] !== undefined) {
    const v = values['kdf-log2n'];
    log2N = /^\d{1,3}$/.test(v) ? Number(v) : NaN;
    const [lo, hi] = KDF_LIMITS.log2N;
    if (!(log2N >= lo && log2N <= hi)) throw new UsageError(`--kdf-log2n: '${v}' is not an integer in ${lo}..${hi}`);
  }
  const image = positionals[0]!;
  refuseWhilePending(image, 'change the key');
  const oldKey = readKeyFile(oldSpec);
  let newKey: Uint8Array | undefined;
  try {
    newKey = readKeyFile(newSpec, '--new-key-file');
    const res = await changeKey(storageIo(), image, oldKey!, newKey!, log2N === undefined ? {} : { log2N });
    console.log(oneLine(`${image}: key changed (scrypt log2 N ${res.kdf.log2N}, r ${res.kdf.r}, p ${res.kdf.p}); the old key no longer opens it`));
    return 0;
  } finally {
    wipe(oldKey);
    wipe(newKey);
  }
}
