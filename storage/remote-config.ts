/**
 * Settings and credentials for remote base sources, by URL prefix. The file (default
 * /etc/fvd/remote.conf, or $FVD_REMOTE_CONFIG, or `REMOTE_CONFIG=` of an instance configuration)
 * holds sections named by a URL prefix; the longest prefix that matches a base URL applies:
 *
 *   [https://s3.example.com/templates/]
 *   header = Authorization: Bearer abc...      # sent with every request (repeatable)
 *   query = X-Amz-Algorithm=...&X-Amz-Signature=...   # appended to the URL (S3 presigned)
 *   ca-file = /etc/fvd/ca.pem                 # extra trusted CA (verification stays on)
 *   retry-budget = 30s                        # longest time one read may take, retries included
 *   stall-timeout = 10s                       # an attempt without progress this long is retried
 *   connections = 4                           # requests in flight
 *   request-size = 4M                         # bytes per range request
 *
 * Credentials (header, query) live only here and in memory: never in an image header, never in a
 * log line or an error message (errors name the file and line, not the value).
 */
import fs from 'node:fs';
import { FvdError } from '../fvd/errors.js';
import type { RetryOptions } from './retry.js';

export interface RemoteSettings {
  headers: Record<string, string>;
  query: string;
  caFile?: string;
  retry: Partial<RetryOptions>;
  connections?: number;
  requestBytes?: number;
}

export interface RemoteConfig {
  /** Sections by URL prefix, longest first. */
  sections: Array<{ prefix: string; settings: RemoteSettings }>;
  /** Settings for every URL, overriding the file (tests, command-line options). */
  overrides?: Partial<RemoteSettings>;
}

export const EMPTY_REMOTE_CONFIG: RemoteConfig = { sections: [] };

const DURATION = /^(\d+(?:\.\d+)?)(ms|s|m)?$/;
const SIZE = /^(\d+)([kKmM]?)$/;

function duration(file: string, line: number, value: string): number {
  const m = DURATION.exec(value);
  if (!m) throw new FvdError(`${file}:${line}: expected a duration like 500ms, 30s or 2m`, 'EINVAL');
  const n = Number(m[1]);
  return m[2] === 'ms' ? n : m[2] === 'm' ? n * 60_000 : n * 1000;
}

export function parseRemoteConfig(file: string, text: string): RemoteConfig {
  const sections: RemoteConfig['sections'] = [];
  let current: RemoteSettings | null = null;
  text.split('\n').forEach((raw, i) => {
    const n = i + 1;
    const line = raw.trim();
    if (!line || line.startsWith('#')) return;
    const sec = /^\[(.+)\]$/.exec(line);
    if (sec) {
      const prefix = sec[1]!.trim();
      if (!/^(https?|nbd|nbd\+unix):\/\//.test(prefix)) throw new FvdError(`${file}:${n}: a section names a URL prefix (http://, https://, nbd://, nbd+unix://)`, 'EINVAL');
      current = { headers: {}, query: '', retry: {} };
      sections.push({ prefix, settings: current });
      return;
    }
    const kv = /^([a-z-]+)\s*=\s*(.*)$/.exec(line);
    if (!kv) throw new FvdError(`${file}:${n}: expected [URL-prefix] or key = value`, 'EINVAL');
    if (!current) throw new FvdError(`${file}:${n}: a setting before the first [URL-prefix] section`, 'EINVAL');
    const s: RemoteSettings = current;
    const [, key, value] = kv as unknown as [string, string, string];
    switch (key) {
      case 'header': {
        const h = /^([A-Za-z0-9-]+):\s*(.+)$/.exec(value);
        if (!h) throw new FvdError(`${file}:${n}: expected header = Name: value`, 'EINVAL');
        s.headers[h[1]!] = h[2]!;
        break;
      }
      case 'query':
        s.query = value.replace(/^\?/, '');
        break;
      case 'ca-file':
        s.caFile = value;
        break;
      case 'retry-budget':
        s.retry.budgetMs = duration(file, n, value);
        break;
      case 'stall-timeout':
        s.retry.stallMs = duration(file, n, value);
        break;
      case 'connections': {
        const v = Number(value);
        if (!Number.isInteger(v) || v < 1 || v > 64) throw new FvdError(`${file}:${n}: connections must be 1 to 64`, 'EINVAL');
        s.connections = v;
        break;
      }
      case 'request-size': {
        const m = SIZE.exec(value);
        const v = m ? Number(m[1]) * (m[2]!.toLowerCase() === 'k' ? 1024 : m[2]!.toLowerCase() === 'm' ? 1048576 : 1) : NaN;
        if (!(v >= 4096 && v <= 32 * 1048576 && v % 512 === 0)) throw new FvdError(`${file}:${n}: request-size must be 4K to 32M, a multiple of 512`, 'EINVAL');
        s.requestBytes = v;
        break;
      }
      default:
        throw new FvdError(`${file}:${n}: unknown key '${key}' (header, query, ca-file, retry-budget, stall-timeout, connections, request-size)`, 'EINVAL');
    }
  });
  sections.sort((a, b) => b.prefix.length - a.prefix.length);
  return { sections };
}

/** Reads the configuration file; a missing default file means no settings. */
export function loadRemoteConfig(file?: string): RemoteConfig {
  const explicit = file ?? process.env.FVD_REMOTE_CONFIG;
  const path = explicit ?? '/etc/fvd/remote.conf';
  let text: string;
  try {
    text = fs.readFileSync(path, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT' && !explicit) return EMPTY_REMOTE_CONFIG;
    throw new FvdError(`remote configuration ${path}: ${(err as NodeJS.ErrnoException).code ?? 'unreadable'}`, 'EINVAL');
  }
  return parseRemoteConfig(path, text);
}

/** The settings for `url`: its longest matching section, then the overrides. */
export function settingsFor(config: RemoteConfig, url: string): RemoteSettings {
  const hit = config.sections.find((s) => url.startsWith(s.prefix))?.settings;
  const base: RemoteSettings = hit ? { ...hit, headers: { ...hit.headers }, retry: { ...hit.retry } } : { headers: {}, query: '', retry: {} };
  const o = config.overrides;
  if (!o) return base;
  return {
    ...base,
    ...o,
    headers: { ...base.headers, ...o.headers },
    query: o.query ?? base.query,
    retry: { ...base.retry, ...o.retry },
  };
}
