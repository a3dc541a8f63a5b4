/**
 * Instance configuration for `systemctl start fvd@NAME`: /etc/fvd/NAME.conf, KEY=VALUE lines
 * (systemd EnvironmentFile style, '#' comments, optional quotes). Without the file the instance
 * serves /var/lib/fvd/NAME.fvd with defaults. FVD_CONF_DIR and FVD_STATE_DIR override the
 * directories (tests).
 */
import fs from 'node:fs';
import path from 'node:path';
import { UsageError } from './args.js';

export interface InstanceConfig {
  image: string;
  devId?: string;
  queues?: string;
  depth?: string;
  maxIo?: string;
  copyOnRead?: boolean;
  prefetch?: boolean;
  /** fvd serve --zero-copy. */
  zeroCopy?: boolean;
  prefetchRate?: string;
  /** Allowed rise of the guest's mean request latency while prefetching, in percent. */
  prefetchShare?: string;
  /** Key file of an encrypted image (relative to the configuration directory). */
  keyFile?: string;
  /** Storage grow command of a compact image on a block device (fvd serve --grow-cmd). */
  growCmd?: string;
  growFree?: string;
  /** Prometheus textfile of the device's figures (fvd serve --metrics-file). */
  metricsFile?: string;
  /** Remote base settings and credentials (storage/remote-config.ts), relative to the configuration directory. */
  remoteConfig?: string;
  /** Seconds the device waits for a new server after this one died (fvd serve --recovery-wait); default INSTANCE_RECOVERY_WAIT. */
  recoveryWait?: string;
}

/**
 * Under systemd the device outlives its server by default: Restart=on-failure then recovers it,
 * and `systemctl restart` hands it over (docs/DESIGN.md §7). RECOVERY_WAIT=0 turns this off.
 */
export const INSTANCE_RECOVERY_WAIT = '60';

const KEYS = new Set(['IMAGE', 'DEV_ID', 'QUEUES', 'DEPTH', 'MAX_IO', 'COPY_ON_READ', 'PREFETCH', 'ZERO_COPY', 'PREFETCH_RATE', 'PREFETCH_SHARE', 'KEY_FILE', 'GROW_CMD', 'GROW_FREE', 'METRICS_FILE', 'REMOTE_CONFIG', 'RECOVERY_WAIT']);
const YES_NO = /^(yes|no|true|false|1|0)$/i;

export function readInstanceConfig(name: string): InstanceConfig {
  if (!/^[A-Za-z0-9_.:-]+$/.test(name) || name.startsWith('.')) throw new UsageError(`invalid instance name '${name}'`);
  const confDir = process.env.FVD_CONF_DIR ?? '/etc/fvd';
  const stateDir = process.env.FVD_STATE_DIR ?? '/var/lib/fvd';
  const file = path.join(confDir, `${name}.conf`);
  const config: InstanceConfig = { image: path.join(stateDir, `${name}.fvd`) };
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return config;
    throw new UsageError(`${file}: ${(err as Error).message}`);
  }
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (!line || line.startsWith('#')) return;
    const m = /^([A-Z_]+)\s*=\s*(.*)$/.exec(line);
    if (!m) throw new UsageError(`${file}:${i + 1}: expected KEY=VALUE`);
    const key = m[1]!;
    const value = m[2]!.replace(/^"(.*)"$/, '$1').replace(/^'(.*)'$/, '$1');
    if (!KEYS.has(key)) throw new UsageError(`${file}:${i + 1}: unknown key ${key} (known: ${[...KEYS].join(', ')})`);
    switch (key) {
      case 'IMAGE':
        config.image = path.resolve(confDir, value);
        break;
      case 'DEV_ID':
        config.devId = value;
        break;
      case 'QUEUES':
        config.queues = value;
        break;
      case 'DEPTH':
        config.depth = value;
        break;
      case 'MAX_IO':
        config.maxIo = value;
        break;
      case 'COPY_ON_READ':
      case 'PREFETCH':
      case 'ZERO_COPY': {
        if (!YES_NO.test(value)) throw new UsageError(`${file}:${i + 1}: ${key} must be yes or no`);
        const on = /^(yes|true|1)$/i.test(value);
        if (key === 'PREFETCH') config.prefetch = on;
        else if (key === 'ZERO_COPY') config.zeroCopy = on;
        else config.copyOnRead = on;
        break;
      }
      case 'PREFETCH_RATE':
        config.prefetchRate = value;
        break;
      case 'PREFETCH_SHARE':
        config.prefetchShare = value;
        break;
      case 'GROW_CMD':
        config.growCmd = value;
        break;
      case 'GROW_FREE':
        config.growFree = value;
        break;
      case 'METRICS_FILE':
        config.metricsFile = path.resolve(confDir, value);
        break;
      case 'KEY_FILE':
        if (!value) throw new UsageError(`${file}:${i + 1}: KEY_FILE is empty`);
        config.keyFile = path.resolve(confDir, value);
        break;
      case 'RECOVERY_WAIT':
        config.recoveryWait = value;
        break;
      case 'REMOTE_CONFIG':
        if (!value) throw new UsageError(`${file}:${i + 1}: REMOTE_CONFIG is empty`);
        config.remoteConfig = path.resolve(confDir, value);
        break;
    }
  });
  return config;
}

/**
 * The remote configuration file of `fvd serve --instance`: --remote-config, else the instance's
 * REMOTE_CONFIG=, else the systemd credential `remote` ($CREDENTIALS_DIRECTORY/remote, from
 * LoadCredential=remote:/etc/fvd/NAME.remote); undefined: the default (/etc/fvd/remote.conf).
 */
export function instanceRemoteConfig(conf: InstanceConfig, given: string | undefined): string | undefined {
  const file = given ?? conf.remoteConfig;
  if (file !== undefined) return file;
  const dir = process.env.CREDENTIALS_DIRECTORY;
  const credential = dir ? path.join(dir, 'remote') : '';
  return credential && fs.existsSync(credential) ? credential : undefined;
}
