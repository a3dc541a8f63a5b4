/**
 * A remote base that could not be reached when the image was opened, opened on first use.
 *
 * The recovery of a live device opens its image this way (daemon/server.ts): the kernel holds the
 * guest's I/O while no server runs, and refusing the recovery because the template's server is
 * down would turn a network outage into a dead disk. (So does `fvd info`, which reads no data.)
 * With this stand-in the recovered device serves local blocks and writes at once, and a read
 * that needs the base tries to open it: it waits for one open attempt (the source's retry budget
 * bounds it) and fails with EIO while the server stays away — what a served image does when its
 * server dies (DESIGN.md §7). A fresh `serve` or `create` still refuses an unreachable base with
 * one line.
 *
 * The real base is opened with the image's own checks (fvd/base-chain.ts baseOpener): a template
 * whose size or identity changed while it was away is refused then, every read of it fails, and
 * no byte of it is ever returned.
 */
import { isUrl, redactUrl } from './base-location.js';
import { FvdError } from './errors.js';
import type { BaseFormat } from './format.js';
import type { BaseChainEntry, BaseImage } from './image-types.js';

export class DeferredBase implements BaseImage {
  readonly remote = true;
  private base: BaseImage | null = null;
  /** The open in progress, shared by every read that waits for it. */
  private opening: Promise<BaseImage> | null = null;
  /** Set by a refusal (wrong size or identity): no later read opens the base again. */
  private refused: FvdError | null = null;
  private closed = false;

  constructor(
    private readonly openBase: () => Promise<BaseImage>,
    readonly size: number,
    readonly identity: string | undefined,
    private readonly entry: BaseChainEntry,
    /** Told once when the base opens, and once when it is refused for good. */
    private readonly report: DeferredBaseReport = () => {},
  ) {}

  get isOpen(): boolean {
    return this.base !== null;
  }

  /** 'unreachable' until an open succeeds, 'refused' after a refusal (for status lines). */
  get state(): 'unreachable' | 'open' | 'refused' {
    return this.base ? 'open' : this.refused ? 'refused' : 'unreachable';
  }

  get inFlightBytes(): number | undefined {
    return this.base?.inFlightBytes;
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    const base = this.base ?? (await this.open());
    return base.read(buf, offset);
  }

  async knownZero(offset: number, length: number): Promise<boolean> {
    // Unknown until the base is open: the read that follows fails or reads the bytes.
    return this.base ? this.base.knownZero(offset, length) : false;
  }

  describe(): BaseChainEntry[] {
    return this.base ? this.base.describe() : [this.entry];
  }

  fileIds(): string[] {
    return this.base ? this.base.fileIds() : [];
  }

  async close(): Promise<void> {
    this.closed = true;
    const pending = this.opening;
    if (pending) await pending.catch(() => {});
    await this.base?.close();
    this.base = null;
  }

  private open(): Promise<BaseImage> {
    if (this.refused) return Promise.reject(this.refused);
    if (this.closed) return Promise.reject(new FvdError(`${this.entry.path}: read after close`, 'EIO'));
    this.opening ??= this.openBase().then(
      async (base) => {
        this.opening = null;
        if (this.closed) {
          await base.close();
          throw new FvdError(`${this.entry.path}: read after close`, 'EIO');
        }
        this.base = base;
        this.report('opened', this.entry.path);
        return base;
      },
      (err: unknown) => {
        this.opening = null;
        const e = err instanceof FvdError ? err : new FvdError(err instanceof Error ? err.message : String(err), 'EIO');
        // A changed template stays changed: refuse it for good, once, in the log.
        if (e.code === 'EINVAL') {
          this.refused = new FvdError(e.message, 'EIO');
          this.report('refused', e.message);
          throw this.refused;
        }
        throw new FvdError(e.message, 'EIO');
      },
    );
    return this.opening;
  }
}

/** What a deferred base tells its image's opener: the first failure, the late open, a refusal. */
export type DeferredBaseReport = (event: 'unreachable' | 'opened' | 'refused', detail: string) => void;

/**
 * Opens the remote base at `path` with `open`, or, when `report` is given and the base cannot be
 * reached, returns a DeferredBase that opens it on first use. A refusal (EINVAL: wrong size or
 * identity) is thrown either way, as is any failure of a local base.
 */
export async function openOrDefer(
  open: () => Promise<BaseImage>,
  path: string,
  format: BaseFormat,
  size: number,
  identity: string | null,
  report: DeferredBaseReport | undefined,
): Promise<BaseImage> {
  if (!report || !isUrl(path)) return open();
  try {
    return await open();
  } catch (err) {
    if (!(err instanceof FvdError) || err.code === 'EINVAL') throw err;
    report('unreachable', err.message);
    return new DeferredBase(open, size, identity ?? undefined, { path: redactUrl(path), format, size }, report);
  }
}
