/** Command-line helpers shared by every `fvd` subcommand: sizes, user errors, option parsing. */
import { parseArgs, type ParseArgsConfig } from 'node:util';

/** An error whose message is shown to the user as one line, with a non-zero exit. */
export class UsageError extends Error {
  constructor(message: string, readonly exitCode = 1) {
    super(message);
  }
}

const SUFFIX: Record<string, number> = { '': 1, b: 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4, p: 1024 ** 5 };

/** Parses "64k", "1G", "512", "1.5M" (binary units, like qemu-img). Throws UsageError. */
export function parseSize(text: string, what = 'size'): number {
  const m = /^(\d+(?:\.\d+)?)\s*([bkmgtp]?)(?:i?b)?$/i.exec(text.trim());
  if (!m) throw new UsageError(`invalid ${what} '${text}': expected a number with an optional K/M/G/T suffix`);
  const value = Number(m[1]) * SUFFIX[m[2]!.toLowerCase()]!;
  if (!Number.isSafeInteger(value)) throw new UsageError(`invalid ${what} '${text}': not a whole number of bytes`);
  return value;
}

/** Parses an integer option in [min, max]. */
export function parseInteger(text: string, what: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (!/^-?\d+$/.test(text.trim())) throw new UsageError(`invalid ${what} '${text}': expected a whole number`);
  const value = Number(text);
  if (value < min || value > max) throw new UsageError(`invalid ${what} '${text}': must be between ${min} and ${max}`);
  return value;
}

/** Parses a percentage ("10", "2.5", "10%") in [0, 1000]. */
export function parsePercent(text: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*%?$/.exec(text.trim());
  if (!m || Number(m[1]) > 1000) throw new UsageError(`invalid ${what} '${text}': expected a percentage from 0 to 1000`);
  return Number(m[1]);
}

/**
 * node:util parseArgs with errors turned into one-line UsageErrors. `_command` names the caller
 * for readers; the CLI entry already prefixes messages with "fvd COMMAND: ".
 */
export function parseOptions<T extends ParseArgsConfig['options']>(
  _command: string,
  args: string[],
  options: T,
) {
  try {
    return parseArgs({ args, options, allowPositionals: true, strict: true });
  } catch (err) {
    const msg = (err as Error).message.split('\n')[0]!.replace(/\. To specify.*$/, '');
    throw new UsageError(msg);
  }
}

/** qemu-img style progress on stderr ("    (12.34/100%)", redrawn); `done()` ends the line. */
export function progressPrinter(enabled: boolean): { update(done: number, total: number): void; done(): void } {
  let last = -1;
  let shown = false;
  return {
    update(done, total) {
      if (!enabled) return;
      const pct = total > 0 ? Math.floor((10000 * done) / total) / 100 : 100;
      if (pct === last) return;
      last = pct;
      shown = true;
      process.stderr.write(`\r    (${pct.toFixed(2)}/100%)`);
    },
    done() {
      if (enabled && shown) process.stderr.write('\n');
    },
  };
}

/** Formats bytes for humans: 1.5 GiB. */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(v < 10 && v !== Math.floor(v) ? 2 : v === Math.floor(v) ? 0 : 1)} ${units[i]}`;
}
