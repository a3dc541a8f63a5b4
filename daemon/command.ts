/**
 * One declaration per `fvd` command: its synopsis, summary and every option with its help text.
 * The same declaration drives option parsing (node:util parseArgs) and the help (`fvd help CMD`,
 * `fvd CMD --help`, the command list of `fvd --help`), so the two cannot drift apart.
 */
import { parseArgs } from 'node:util';
import { UsageError } from './args.js';

export interface OptionSpec {
  readonly type: 'string' | 'boolean';
  readonly short?: string;
  readonly multiple?: boolean;
  readonly default?: string | boolean;
  /** Placeholder of the value in the help (string options): SIZE, PATH, raw|fvd. */
  readonly arg?: string;
  readonly help: string;
}

export interface CommandSpec<O extends Record<string, OptionSpec> = Record<string, OptionSpec>> {
  readonly name: string;
  /** One line for the command list of `fvd --help`. */
  readonly summary: string;
  /** Synopsis lines, without the leading "fvd NAME ". */
  readonly usage: readonly string[];
  readonly options: O;
  /** Paragraphs after the option list (arguments, exit codes, examples). */
  readonly details?: string;
  /**
   * Arguments that look like negative numbers ("-5G", "-1") are values, not options: `resize
   * IMAGE -5G`. Off for commands where no positional can be negative.
   */
  readonly signedValues?: boolean;
}

/** The option every command has. */
const HELP_OPTION: Record<string, OptionSpec> = { help: { type: 'boolean', short: 'h', help: 'show this help and exit' } };

/** `--output=json|human` and its older spelling `--json`, for commands with a JSON output. */
export const OUTPUT_OPTIONS = {
  output: { type: 'string', arg: 'human|json', help: 'output format (default human); json is meant for programs' },
  json: { type: 'boolean', help: 'the same as --output=json' },
} as const;

export function defineCommand<O extends Record<string, OptionSpec>>(spec: CommandSpec<O>): CommandSpec<O> {
  return spec;
}

/** Thrown by parseCommand when -h/--help is given: the CLI prints the help and exits 0. */
export class HelpRequested extends Error {
  constructor(readonly spec: CommandSpec) {
    super(`help for ${spec.name}`);
  }
}

type ParsedValues<O extends Record<string, OptionSpec>> = {
  -readonly [K in keyof O]: O[K]['type'] extends 'boolean'
    ? O[K]['multiple'] extends true
      ? boolean[]
      : O[K]['default'] extends boolean
        ? boolean
        : boolean | undefined
    : O[K]['multiple'] extends true
      ? string[] | undefined
      : O[K]['default'] extends string
        ? string
        : string | undefined;
};

/** Parses `args` by the command's declaration; -h/--help throws HelpRequested. */
export function parseCommand<O extends Record<string, OptionSpec>>(
  spec: CommandSpec<O>,
  args: string[],
): { values: ParsedValues<O>; positionals: string[] } {
  const options: Record<string, { type: 'string' | 'boolean'; short?: string; multiple?: boolean; default?: string | boolean }> = {};
  for (const [name, o] of Object.entries({ ...spec.options, ...HELP_OPTION })) {
    options[name] = { type: o.type, ...(o.short ? { short: o.short } : {}), ...(o.multiple ? { multiple: true } : {}), ...(o.default !== undefined ? { default: o.default } : {}) };
  }
  // "-5G" as a value: hide such arguments from the option parser behind placeholders that cannot
  // be options, and put them back afterwards (as positionals or as option values alike).
  const hidden: string[] = [];
  const input = spec.signedValues
    ? args.map((a) => {
        if (!/^-\d/.test(a)) return a;
        hidden.push(a);
        return `\u0000${hidden.length - 1}`;
      })
    : args;
  const restore = (v: string) => (v.startsWith('\u0000') && hidden[Number(v.slice(1))] !== undefined ? hidden[Number(v.slice(1))]! : v);
  let parsed;
  try {
    parsed = parseArgs({ args: input, options, allowPositionals: true, strict: true });
  } catch (err) {
    if (input.includes('--help') || input.includes('-h')) throw new HelpRequested(spec);
    const msg = (err as Error).message.split('\n')[0]!.replace(/\. To specify.*$/, '');
    throw new UsageError(msg);
  }
  if (parsed.values.help) throw new HelpRequested(spec);
  const values: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(parsed.values)) {
    if (k === 'help') continue;
    values[k] = typeof v === 'string' ? restore(v) : Array.isArray(v) ? v.map((x) => (typeof x === 'string' ? restore(x) : x)) : v;
  }
  return { values: values as ParsedValues<O>, positionals: parsed.positionals.map(restore) };
}

/** The usage line(s) of a command, for errors about its arguments. */
export function usageOf(spec: CommandSpec): string {
  return spec.usage.map((u, i) => `${i ? '   or: ' : 'usage: '}fvd ${spec.name} ${u}`).join('\n');
}

/** A UsageError that shows the command's synopsis (its first line) after `what`. */
export function usageError(spec: CommandSpec, what?: string): UsageError {
  const synopsis = `usage: fvd ${spec.name} ${spec.usage[0]}`;
  return new UsageError(what ? `${what}; ${synopsis}` : spec.usage.length > 1 ? `${synopsis} (see 'fvd help ${spec.name}')` : synopsis);
}

/** The full help of a command: synopsis, summary, every option, details. */
export function formatHelp(spec: CommandSpec): string {
  const rows: Array<[string, string]> = Object.entries({ ...spec.options, ...HELP_OPTION }).map(([name, o]) => {
    const value = o.type === 'string' ? ` ${o.arg ?? 'VALUE'}` : '';
    const long = name.length === 1 && o.short === name ? '' : `--${name}${value}`;
    const flags = o.short ? `-${o.short}${long ? `, ${long}` : value}` : `    ${long}`;
    const dflt = o.default !== undefined && o.default !== false ? ` (default ${o.default})` : '';
    return [flags, o.help + dflt];
  });
  const width = Math.min(30, Math.max(...rows.map(([f]) => f.length)));
  const lines = [usageOf(spec), '', spec.summary.charAt(0).toUpperCase() + spec.summary.slice(1) + '.', '', 'Options:'];
  for (const [flags, text] of rows) {
    if (flags.length > width) lines.push(`  ${flags}`, `  ${''.padEnd(width)}  ${text}`);
    else lines.push(`  ${flags.padEnd(width)}  ${text}`);
  }
  if (spec.details) lines.push('', spec.details.trim());
  return lines.join('\n');
}

/** --output / --json → 'json' | 'human'. */
export function outputFormat(values: { output?: string; json?: boolean }): 'json' | 'human' {
  if (values.output !== undefined && values.output !== 'json' && values.output !== 'human')
    throw new UsageError(`invalid --output '${values.output}': expected human or json`);
  if (values.json && values.output === 'human') throw new UsageError('--json and --output=human contradict each other');
  return values.json || values.output === 'json' ? 'json' : 'human';
}
