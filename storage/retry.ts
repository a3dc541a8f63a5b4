/**
 * Retries with exponential back-off under a time budget, for remote base sources (HTTP, NBD).
 *
 * One budget per request: every attempt, its back-off sleeps and its own time limit fit inside
 * `budgetMs` from the request's start, so a request never takes longer than the budget (plus one
 * timer tick) however the server misbehaves — a guest read of a block that is not local yet fails
 * with EIO then instead of hanging. Only transient failures (connection refused or reset,
 * timeouts, 5xx, truncated or malformed responses) are retried; permanent ones (404, 403, a
 * template that changed) fail at once.
 */
import { FvdError } from '../fvd/errors.js';

export interface RetryOptions {
  /** Longest time one request may take, all attempts and back-offs included (ms). */
  budgetMs: number;
  /** Longest time one attempt may go without progress (connect, headers, or between body bytes). */
  stallMs: number;
  /** First back-off; doubled after each failed attempt up to maxBackoffMs, with ±50 % jitter. */
  initialBackoffMs: number;
  maxBackoffMs: number;
}

/** Less time than this left in the budget: no further attempt (it could hardly connect). */
const LAST_ATTEMPT_MS = 50;

export const DEFAULT_RETRY: RetryOptions = { budgetMs: 30_000, stallMs: 10_000, initialBackoffMs: 100, maxBackoffMs: 2000 };

/** A failure worth another attempt (the server may recover). */
export class TransientError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TransientError';
  }
}

/**
 * An attempt cut off because the budget ran out. Not the cause worth reporting when an earlier
 * attempt failed for a reason of its own (the give-up message names that one instead).
 */
export class BudgetSpent extends TransientError {
  constructor() {
    super('no complete answer within the retry budget');
  }
}

/** Counters a source keeps across requests, for STATUS and tests. */
export interface RetryCounters {
  retries: number;
  failures: number;
}

/**
 * Runs `attempt(deadline)` until it succeeds, fails permanently, or the budget is spent. The
 * attempt must give up by `deadline` (a performance.now() time) on its own — it is handed the
 * deadline for its timers. The final error is an FvdError naming `what` and the last cause.
 */
export async function withRetries<T>(
  what: string,
  options: RetryOptions,
  counters: RetryCounters,
  attempt: (deadline: number) => Promise<T>,
): Promise<T> {
  const start = performance.now();
  const deadline = start + options.budgetMs;
  let backoff = options.initialBackoffMs;
  let tries = 0;
  /** The last failure that was not the budget running out: what the give-up message names. */
  let cause: string | null = null;
  for (;;) {
    tries++;
    try {
      return await attempt(deadline);
    } catch (err) {
      if (!(err instanceof TransientError)) {
        counters.failures++;
        throw err;
      }
      if (!(err instanceof BudgetSpent)) cause = err.message;
      const now = performance.now();
      // The budget is spent, not merely estimated: a back-off that would overrun it is shortened
      // so that a last attempt still fits (giving up as soon as the next back-off looked too long
      // gave up after 1.6 s of a 4 s budget, failing reads a server would have answered in time).
      const left = deadline - now;
      const wait = Math.min(backoff * (0.5 + Math.random()), left - LAST_ATTEMPT_MS);
      if (left <= LAST_ATTEMPT_MS) {
        counters.failures++;
        const secs = ((now - start) / 1000).toFixed(1);
        throw new FvdError(`${what}: ${cause ?? err.message} (gave up after ${tries} attempt${tries === 1 ? '' : 's'} in ${secs} s)`, 'EIO');
      }
      counters.retries++;
      await new Promise((r) => setTimeout(r, wait));
      backoff = Math.min(options.maxBackoffMs, backoff * 2);
    }
  }
}

/** Node's socket errors that mean "try again" (the server went away, restarted, or is slow). */
export function isTransientSocketError(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException)?.code;
  return (
    code === 'ECONNREFUSED' ||
    code === 'ECONNRESET' ||
    code === 'EPIPE' ||
    code === 'ETIMEDOUT' ||
    code === 'EHOSTUNREACH' ||
    code === 'ENETUNREACH' ||
    code === 'EAI_AGAIN' ||
    code === 'ENOENT' || // a unix socket not there (yet): the server is restarting
    code === 'UND_ERR_SOCKET'
  );
}

/** Parses retry settings given as milliseconds; unknown or bad values are refused by the caller. */
export function retryOptions(overrides: Partial<RetryOptions> = {}): RetryOptions {
  const o = { ...DEFAULT_RETRY, ...overrides };
  for (const [k, v] of Object.entries(o)) {
    if (!Number.isFinite(v) || v < 0) throw new FvdError(`invalid retry setting ${k}=${v}`, 'EINVAL');
  }
  return o;
}
