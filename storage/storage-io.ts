/**
 * The IoBackend the CLI and the daemon give the engine: local paths through node:fs (NodeFile),
 * base URLs through the remote sources — http(s):// (HttpSource) and nbd:// / nbd+unix://
 * (NbdSource) — with settings and credentials from the remote configuration
 * (storage/remote-config.ts). The engine sees only BlockFiles either way.
 */
import type { BlockFile, IoBackend, OpenOptions } from '../fvd/io.js';
import { nodeIo } from './node-file.js';
import { isUrl } from '../fvd/base-location.js';
import { FvdError } from '../fvd/errors.js';
// The remote sources are loaded when a URL is first opened: serving a local image never loads
// them (each module costs start-up time, tens of milliseconds under emulation).
import type { HttpSource, RemoteStats } from './http-source.js';
import type { NbdSource } from './nbd-source.js';
import type { RemoteConfig } from './remote-config.js';
import type { RetryOptions } from './retry.js';

export type RemoteSource = HttpSource | NbdSource;

export class StorageIo implements IoBackend {
  /** Remote sources opened through this backend (open or closed), for their statistics. */
  readonly remotes: RemoteSource[] = [];
  private config: RemoteConfig | null;

  constructor(
    config?: RemoteConfig,
    private readonly local: IoBackend = nodeIo,
    private readonly options: StorageIoOptions = {},
  ) {
    this.config = config ?? null;
  }

  /** The directory entry of a new local file made durable (URLs are never created). */
  syncDirectoryOf(path: string): Promise<void> {
    return isUrl(path) || !this.local.syncDirectoryOf ? Promise.resolve() : this.local.syncDirectoryOf(path);
  }

  /** A local file's BlockFile.fileId (device and inode); a URL names no local file (null). */
  identify(path: string): Promise<string | null> {
    return isUrl(path) || !this.local.identify ? Promise.resolve(null) : this.local.identify(path);
  }

  async open(path: string, options: OpenOptions = {}): Promise<BlockFile> {
    if (!isUrl(path)) return this.local.open(path, options);
    if (!options.readOnly || options.create) throw new FvdError(`${path}: a remote base is read-only`, 'EROFS');
    // The file is read only when a URL is first met, so local-only commands never need it.
    const { loadRemoteConfig, settingsFor } = await import('./remote-config.js');
    this.config ??= loadRemoteConfig();
    const scheme = path.slice(0, path.indexOf(':')).toLowerCase();
    const s = settingsFor(this.config, path);
    if (this.options.retryCapMs !== undefined) s.retry = capRetry((await import('./retry.js')).retryOptions(s.retry), this.options.retryCapMs);
    let src: RemoteSource;
    if (scheme === 'http' || scheme === 'https') {
      const { HttpSource } = await import('./http-source.js');
      src = await HttpSource.open(path, { headers: s.headers, query: s.query, caFile: s.caFile, connections: s.connections, requestBytes: s.requestBytes, retry: s.retry });
    } else if (scheme === 'nbd' || scheme === 'nbd+unix' || scheme === 'nbds' || scheme === 'nbds+unix') {
      const { NbdSource } = await import('./nbd-source.js');
      src = await NbdSource.open(path, { connections: s.connections, requestBytes: s.requestBytes, retry: s.retry });
    } else {
      throw new FvdError(`${path}: unsupported base URL scheme '${scheme}' (http, https, nbd, nbd+unix)`, 'EINVAL');
    }
    this.remotes.push(src);
    return src;
  }

  /** Totals over every remote source opened so far (fetched bytes, requests, retries, failures). */
  remoteStats(): RemoteStats | null {
    if (!this.remotes.length) return null;
    const t: RemoteStats = { url: this.remotes[0]!.path, bytesFetched: 0, requests: 0, retries: 0, failures: 0 };
    for (const r of this.remotes) {
      t.bytesFetched += r.stats.bytesFetched;
      t.requests += r.stats.requests;
      t.retries += r.stats.retries;
      t.failures += r.stats.failures;
    }
    return t;
  }
}

export interface StorageIoOptions {
  /**
   * Caps the retry budget and stall time of every remote request (ms). For commands that only
   * look: `fvd info` should say "base reachable: no" in seconds, not wait out the budget a guest's
   * read gets.
   */
  retryCapMs?: number;
}

function capRetry(full: RetryOptions, capMs: number): RetryOptions {
  return { ...full, budgetMs: Math.min(full.budgetMs, capMs), stallMs: Math.min(full.stallMs, capMs) };
}

/** A backend with the default remote configuration ($FVD_REMOTE_CONFIG or /etc/fvd/remote.conf). */
export function storageIo(config?: RemoteConfig, options?: StorageIoOptions): StorageIo {
  return new StorageIo(config, nodeIo, options);
}
