/**
 * The one place that loads koffi and libc. Lazy: code paths that never make a foreign call work
 * where koffi is missing, and callers fall back or report it.
 */
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);

type Library = { func(decl: string): (...args: any[]) => any };
let koffi: any;
let loaded: { koffi: any; libc: Library } | null | undefined;

/** The koffi module; throws where it cannot be loaded. */
export function loadKoffi(): any {
  return (koffi ??= require('koffi'));
}

/** koffi and a handle on libc.so.6, or null where koffi cannot be loaded. */
export function loadLibc(): { koffi: any; libc: Library } | null {
  if (loaded !== undefined) return loaded;
  try {
    const k = loadKoffi();
    loaded = { koffi: k, libc: k.load('libc.so.6') as Library };
  } catch {
    loaded = null;
  }
  return loaded;
}
