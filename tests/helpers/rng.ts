/**
 * A small seeded PRNG (sfc32, seeded through splitmix32) for deterministic, replayable tests.
 * Same seed ⇒ same sequence on every run and every platform (pure 32-bit integer arithmetic).
 */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;
  readonly seed: number;

  constructor(seed: number) {
    this.seed = seed >>> 0;
    let s = this.seed;
    const splitmix = (): number => {
      s = (s + 0x9e3779b9) | 0;
      let z = s;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b);
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35);
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.a = splitmix();
    this.b = splitmix();
    this.c = splitmix();
    this.d = splitmix();
    for (let i = 0; i < 12; i++) this.u32();
  }

  /** Uniform unsigned 32-bit integer. */
  u32(): number {
    const t = (((this.a + this.b) | 0) + this.d) | 0;
    this.d = (this.d + 1) | 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) | 0;
    this.c = (this.c << 21) | (this.c >>> 11);
    this.c = (this.c + t) | 0;
    return t >>> 0;
  }

  /** Uniform float in [0, 1). */
  float(): number {
    return this.u32() / 4294967296;
  }

  /** Uniform integer in [0, n) (n ≤ 2^32; rejection sampling, no modulo bias). */
  int(n: number): number {
    if (!(n >= 1)) throw new RangeError(`Rng.int(${n})`);
    if (n > 4294967296) return Math.floor(this.float() * n);
    const limit = 4294967296 - (4294967296 % n);
    for (;;) {
      const x = this.u32();
      if (x < limit) return x % n;
    }
  }

  /** Uniform integer in [lo, hi] inclusive. */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  /** True with probability p. */
  chance(p: number): boolean {
    return this.float() < p;
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new RangeError('Rng.pick of an empty list');
    return items[this.int(items.length)]!;
  }

  /** Picks an index by relative weights. */
  weighted(weights: readonly number[]): number {
    let total = 0;
    for (const w of weights) total += w;
    let x = this.float() * total;
    for (let i = 0; i < weights.length; i++) {
      x -= weights[i]!;
      if (x < 0) return i;
    }
    return weights.length - 1;
  }

  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      const t = items[i]!;
      items[i] = items[j]!;
      items[j] = t;
    }
    return items;
  }

  /** Fills buf with pseudo-random bytes. */
  fill(buf: Uint8Array): Uint8Array {
    let i = 0;
    for (; i + 4 <= buf.length; i += 4) {
      const x = this.u32();
      buf[i] = x & 0xff;
      buf[i + 1] = (x >>> 8) & 0xff;
      buf[i + 2] = (x >>> 16) & 0xff;
      buf[i + 3] = x >>> 24;
    }
    if (i < buf.length) {
      const x = this.u32();
      for (let k = 0; i < buf.length; i++, k++) buf[i] = (x >>> (8 * k)) & 0xff;
    }
    return buf;
  }

  bytes(n: number): Uint8Array {
    return this.fill(new Uint8Array(n));
  }

  /** An independent generator derived from this one (consumes one draw). */
  fork(): Rng {
    return new Rng(this.u32());
  }
}

/** A fresh random seed (for runs without FVD_SEED). */
export function randomSeed(): number {
  return (Math.floor(Math.random() * 0xffffffff) ^ (Date.now() & 0xffffffff)) >>> 0;
}

/** Seed from the FVD_SEED environment variable, or undefined. Accepts decimal or 0x hex. */
export function envSeed(): number | undefined {
  const s = process.env.FVD_SEED;
  if (s === undefined || s.trim() === '') return undefined;
  const n = Number(s.trim());
  if (!Number.isFinite(n) || n < 0 || n > 0xffffffff || !Number.isInteger(n)) {
    throw new Error(`FVD_SEED must be an integer in [0, 2^32): ${s}`);
  }
  return n >>> 0;
}

/** A positive scale factor from FVD_STEPS (a step count multiplier base), or the default. */
export function envSteps(defaultSteps: number): number {
  const s = process.env.FVD_STEPS;
  if (s === undefined || s.trim() === '') return defaultSteps;
  const n = Number(s.trim());
  if (!Number.isFinite(n) || n <= 0) throw new Error(`FVD_STEPS must be a positive number: ${s}`);
  return Math.max(1, Math.round(n));
}
