/**
 * `make crash-campaign`: the power-cut campaign (tests/crash-campaign/campaign.ts), long mode.
 *
 *   make crash-campaign                          CRASH_CUTS (default 10000) power cuts, a random seed
 *   CRASH_SEED=n make crash-campaign             that campaign again
 *   CRASH_SEED=n CRASH_RUN=r make crash-campaign one run (the replay line every loss prints)
 *   CRASH_KINDS=guest,commit                     only these kinds
 *
 * Prints the count of power cuts and losses; exits 1 on any loss.
 */
import { randomSeed } from '../helpers/rng.js';
import { KINDS, runCampaign, type Kind } from './campaign.js';

const env = process.env;
const seed = env.CRASH_SEED ? Number(env.CRASH_SEED) : randomSeed();
const cuts = Number(env.CRASH_CUTS ?? 10000);
const run = env.CRASH_RUN !== undefined ? Number(env.CRASH_RUN) : undefined;
const kinds = env.CRASH_KINDS ? (env.CRASH_KINDS.split(',') as Kind[]) : undefined;
if (kinds?.some((k) => !KINDS.includes(k))) {
  console.error(`CRASH_KINDS: one of ${KINDS.join(', ')}`);
  process.exit(2);
}
console.log(`# fvd power-cut campaign: CRASH_SEED=${seed}${run !== undefined ? ` CRASH_RUN=${run}` : ` CRASH_CUTS=${cuts}`}`);
const r = await runCampaign({ seed, cuts, run, kinds, log: (l) => console.log(l) });
console.log(`# ${r.runs} runs: ${[...r.byKind].map(([k, v]) => `${k} ${v}`).join(', ')}; ${(r.ms / 1000).toFixed(0)} s`);
console.log(`${r.cuts} power cuts (${r.recoveryCuts} of them during recovery), ${r.losses.length} losses (CRASH_SEED=${seed})`);
process.exit(r.losses.length ? 1 : 0);
