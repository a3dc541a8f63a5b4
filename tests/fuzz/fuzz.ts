/**
 * `make fuzz`: the structure-aware image fuzzer (tests/fuzz/campaign.ts), long mode.
 *
 *   make fuzz                          FUZZ_MUTANTS (default 2000) mutants, a random seed (printed)
 *   FUZZ_SEED=n make fuzz              that campaign again, mutant for mutant
 *   FUZZ_SEED=n FUZZ_ONLY=i make fuzz  one mutant (the replay line every finding prints)
 *   FUZZ_KEEP=DIR                      keep each failing mutant (image, bases, FINDINGS.txt) in DIR
 *   FUZZ_TIMEOUT=ms                    per command (default 20000): longer is a hang
 *   FUZZ_VERBOSE=1                     a line per mutant: the mutation, each command's exit code
 *
 * Prints each finding as it happens, then the counts, and exits 1 if there was any.
 */
import { randomSeed } from '../helpers/rng.js';
import { runFuzz, summarize } from './campaign.js';

const env = process.env;
const seed = env.FUZZ_SEED ? Number(env.FUZZ_SEED) : randomSeed();
const mutants = Number(env.FUZZ_MUTANTS ?? 2000);
const only = env.FUZZ_ONLY !== undefined ? Number(env.FUZZ_ONLY) : undefined;
console.log(`# fvd image fuzzer: FUZZ_SEED=${seed}${only !== undefined ? ` FUZZ_ONLY=${only}` : ` FUZZ_MUTANTS=${mutants}`}`);
const r = await runFuzz({
  seed,
  mutants,
  only,
  timeoutMs: Number(env.FUZZ_TIMEOUT ?? 20000),
  keepDir: env.FUZZ_KEEP,
  verbose: env.FUZZ_VERBOSE === '1',
  log: (l) => console.log(l),
});
console.log(`# ${r.mutants} mutants (${[...r.families].map(([k, v]) => `${k} ${v}`).join(', ')}), ${r.commands} commands, check clean on ${r.checkClean}, ${(r.ms / 1000).toFixed(0)} s`);
for (const line of summarize(r.findings)) console.log(line);
console.log(`${r.findings.length} findings (FUZZ_SEED=${seed})`);
process.exit(r.findings.length ? 1 : 0);
