/** At most `max` async jobs at once; the rest wait in FIFO order (requests in flight to a server). */
export class Limiter {
  private active = 0;
  private readonly waiting: Array<() => void> = [];
  constructor(readonly max: number) {}

  async run<T>(job: () => Promise<T>): Promise<T> {
    if (this.active >= this.max) await new Promise<void>((r) => this.waiting.push(r));
    else this.active++;
    try {
      return await job();
    } finally {
      const next = this.waiting.shift();
      if (next) next(); // the slot passes straight to the next waiter
      else this.active--;
    }
  }
}

/**
 * Runs every job and waits for all of them, then throws the first error. Unlike Promise.all it
 * never returns while a job still runs: the jobs write into the caller's buffer, which the caller
 * reuses (a prefetch scratch buffer, a ublk request buffer) as soon as the read returns.
 */
export async function allSettledOrThrow(jobs: Array<Promise<unknown>>): Promise<void> {
  const results = await Promise.allSettled(jobs);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}

/** Splits [offset, offset + length) into pieces of at most `piece` bytes. */
export function splitRange(offset: number, length: number, piece: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let pos = offset; pos < offset + length; pos += piece) out.push([pos, Math.min(piece, offset + length - pos)]);
  return out;
}
