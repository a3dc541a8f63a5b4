/**
 * The bounded part of the power-cut campaign (tests/crash-campaign/campaign.ts) in `make test`:
 * CRASH_TEST_CUTS power cuts (default 400) of a fresh random seed each run, printed for replay
 * (`CRASH_SEED=n make crash-campaign`; CRASH_SEED also fixes this run's seed). `make
 * crash-campaign` is the long mode (10,000 cuts).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { randomSeed } from '../helpers/rng.js';
import { runCampaign } from './campaign.js';

const seed = process.env.CRASH_SEED ? Number(process.env.CRASH_SEED) : randomSeed();
const cuts = Number(process.env.CRASH_TEST_CUTS ?? 400);

test(`power-cut campaign: at least ${cuts} power cuts, recovery cut twice, no loss (CRASH_SEED=${seed})`, async () => {
  const lines: string[] = [];
  const r = await runCampaign({ seed, cuts, log: (l) => lines.push(l) });
  console.log(`  # crash campaign CRASH_SEED=${seed}: ${r.runs} runs, ${r.cuts} power cuts (${r.recoveryCuts} during recovery), ${r.losses.length} losses, ${(r.ms / 1000).toFixed(0)} s`);
  assert.ok(r.cuts >= cuts, `only ${r.cuts} power cuts`);
  assert.ok(r.recoveryCuts > 0, 'some recoveries were cut');
  assert.is(r.losses.length, 0, `losses (replay: CRASH_SEED=${seed} CRASH_RUN=<run> make crash-campaign):\n${lines.filter((l) => l.startsWith('LOSS')).slice(0, 8).join('\n')}`);
});

test.run();
