/**
 * What a failed ublk request completes with, and how the daemon reports failures without flooding
 * its log.
 *
 * ublk hands a negative result to the block layer through errno_to_blk_status(), so the errno
 * chosen here is what the guest's kernel sees: -ENOSPC becomes BLK_STS_NOSPC ("critical space
 * allocation", returned to the submitter as ENOSPC, as dm-thin does when its pool is full), every
 * other failure -EIO (BLK_STS_IOERR). A full file system under the image is thus told apart from a
 * broken disk; EDQUOT (a quota under the image) is the same condition for the guest.
 */
export const EIO = 5;
export const ENOSPC = 28;
const EDQUOT = 122;

/** -errno for a request whose engine call threw `err` (a Node errno error or an FvdError). */
export function requestErrno(err: unknown): number {
  const code = (err as { code?: unknown })?.code;
  return code === 'ENOSPC' || code === 'EDQUOT' ? -ENOSPC : -EIO;
}

/** -errno for a request whose own file transfer returned `res` (a negative errno). */
export function requestErrnoOf(res: number): number {
  return res === -ENOSPC || res === -EDQUOT ? -ENOSPC : -EIO;
}

/**
 * One log line per burst of request failures: a failing disk fails every request, and a line per
 * request would bury everything else (and cost the daemon more than the I/O). The first failure
 * starts a burst; the burst is reported when no failure came for `quietMs`, or every `maxMs`
 * while it lasts, as "N requests failed in T s (first: ...; last: ...)". flush() reports what is
 * pending at once (the daemon calls it when it stops). The errors counter in STATUS= counts every
 * failure either way.
 */
export class BurstLog {
  private count = 0;
  private first = '';
  private last = '';
  private startedAt = 0;
  private lastAt = 0;
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly log: (line: string) => void,
    private readonly quietMs = 1000,
    private readonly maxMs = 10_000,
    private readonly now: () => number = Date.now,
  ) {}

  /** A request failed: `what` says which and why (one line). */
  failure(what: string): void {
    const t = this.now();
    if (this.count === 0) {
      this.first = what;
      this.startedAt = t;
    }
    this.count++;
    this.last = what;
    this.lastAt = t;
    if (t - this.startedAt >= this.maxMs) this.flush();
    else this.arm();
  }

  private arm(): void {
    if (this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.count === 0) return;
      const idle = this.now() - this.lastAt;
      if (idle >= this.quietMs) this.flush();
      else this.arm();
    }, this.quietMs);
  }

  /** Reports the burst in progress, if any. */
  flush(): void {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    if (this.count === 0) return;
    const secs = ((this.lastAt - this.startedAt) / 1000).toFixed(1);
    this.log(
      this.count === 1
        ? `request failed: ${this.first}`
        : `${this.count} requests failed in ${secs} s (first: ${this.first}; last: ${this.last})`,
    );
    this.count = 0;
  }
}
