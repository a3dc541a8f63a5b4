/**
 * The bounded run of the image fuzzer (tests/fuzz/campaign.ts) in `make test`: FUZZ_TEST_MUTANTS
 * mutants (default 200, about two minutes on a quiet 2-core machine) of a new random campaign seed
 * each run, printed for replay (`FUZZ_SEED=n make fuzz`; FUZZ_SEED also fixes this run's seed).
 * Every finding fails the test with its replay line. `make fuzz` is the long mode.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { randomSeed } from '../helpers/rng.js';
import { runFuzz, summarize } from './campaign.js';

const seed = process.env.FUZZ_SEED ? Number(process.env.FUZZ_SEED) : randomSeed();
const mutants = Number(process.env.FUZZ_TEST_MUTANTS ?? 200);

test(`image fuzzer: ${mutants} mutants through info/check/map/snapshot/io/convert/prefetch/repair (FUZZ_SEED=${seed})`, async () => {
  const lines: string[] = [];
  const r = await runFuzz({ seed, mutants, timeoutMs: 15_000, log: (l) => lines.push(l) });
  console.log(`  # fuzz FUZZ_SEED=${seed}: ${r.mutants} mutants, ${r.commands} commands, check clean on ${r.checkClean}, ${r.findings.length} findings, ${(r.ms / 1000).toFixed(0)} s`);
  assert.is(r.mutants, mutants, 'every mutant ran');
  assert.ok(r.checkClean > 0, 'some mutants passed check (the contract oracles ran)');
  assert.is(r.findings.length, 0, `findings (replay with FUZZ_SEED=${seed} FUZZ_ONLY=<mutant> make fuzz):\n${summarize(r.findings).join('\n')}\n${lines.filter((l) => l.startsWith('FAIL')).slice(0, 10).join('\n')}`);
});

test.run();
