/**
 * The mutator itself, without running a command: operators stacked on whatever layout the
 * previous one left must produce a mutant rather than throw. A mutator exception fails the
 * bounded fuzz run of `make test` on some random campaign seed (it did twice: a table length of 1
 * after a header mutation gave Rng.int(0.25); a chunk size of 0 gave BigInt(NaN)), so these sweep
 * far more operator sequences than one campaign does, deterministically.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Rng } from '../helpers/rng.js';
import { fixHeaderCrc, HEADER_FIELDS, mutate, readLayout, reasonableLayout } from './mutate.js';
import { makeSeeds, type Seed } from './seeds.js';

let root = '';
let seeds: Seed[] = [];
test.before(async () => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-mutate-'));
  seeds = await makeSeeds(root);
});
test.after(() => fs.rmSync(root, { recursive: true, force: true }));

function mutateOrFail(seed: Uint8Array, rngSeed: number, stack: number, where: string): string {
  try {
    const m = mutate(new Rng(rngSeed), seed, stack);
    assert.ok(m.what.length > 0, `${where}: a mutant says what changed`);
    return m.family;
  } catch (err) {
    assert.unreachable(`${where}, Rng(${rngSeed}): ${(err as Error).stack}`);
    return '';
  }
}

test('mutator: 400 mutants of three stacked operators per seed, every family reached, none throws', () => {
  const families = new Set<string>();
  for (const [si, seed] of seeds.entries()) {
    // Else mutate() would only ever change header fields of this seed.
    assert.ok(reasonableLayout(readLayout(seed.bytes)), `seed ${seed.name}: a layout the operators apply to`);
    for (let i = 1; i <= 400; i++) {
      for (const f of mutateOrFail(seed.bytes, si * 100_003 + i, 3, `seed ${seed.name}`).split('+')) families.add(f);
    }
  }
  assert.ok(families.size >= 15, `families reached: ${[...families].sort().join(' ')}`);
});

// Every header field at its degenerate values (zero, one, unaligned, the 32-bit and 53-bit edges,
// all ones) with a valid CRC, then two operators on top: the layouts a first header mutation
// leaves for a stacked one.
test('mutator: operators stacked on each header field at a degenerate value, none throws', () => {
  for (const seed of seeds) {
    for (const [name, off, width] of HEADER_FIELDS) {
      const max = width >= 8 ? (1n << 64n) - 1n : (1n << BigInt(8 * width)) - 1n;
      for (const v of [0n, 1n, 4n, 511n, 4096n, (1n << 32n) - 1n, (1n << 53n) + 1n, max]) {
        if (v > max) continue;
        const img = new Uint8Array(seed.bytes);
        for (let i = 0; i < width; i++) img[off + i] = Number((v >> BigInt(8 * i)) & 0xffn);
        fixHeaderCrc(img);
        for (let i = 1; i <= 3; i++) mutateOrFail(img, off * 1000 + i, 2, `seed ${seed.name}, ${name} = ${v}`);
      }
    }
  }
});

test.run();
