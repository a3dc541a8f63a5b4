/**
 * Where a base image lives: a path (relative to the image's directory) or a URL (a remote source
 * such as http://, https://, nbd:// or nbd+unix://, opened by the IoBackend). The engine treats a
 * URL as an opaque name: it never resolves it against the file system.
 */
import path from 'node:path';

const SCHEME = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//;

/** True for "scheme://..." names. */
export function isUrl(name: string): boolean {
  return SCHEME.test(name);
}

/**
 * The base as the IoBackend is asked to open it: a URL as it is; a path relative to the image's
 * directory — or, for an image that is itself reached by URL (a remote FVD base), relative to
 * that URL.
 */
export function resolveBasePath(imagePath: string, basePath: string): string {
  if (isUrl(basePath)) return basePath;
  if (isUrl(imagePath)) return new URL(basePath, imagePath).href;
  return path.resolve(path.dirname(path.resolve(imagePath)), basePath);
}

/** An image's own name for loop detection: URLs as they are, paths made absolute. */
export function canonicalName(name: string): string {
  return isUrl(name) ? name : path.resolve(name);
}

/** A URL as it may be shown: without user information, query or fragment (credentials live there). */
export function redactUrl(name: string): string {
  if (!isUrl(name)) return name;
  try {
    const u = new URL(name);
    u.username = '';
    u.password = '';
    u.search = '';
    u.hash = '';
    return u.href;
  } catch {
    return name.replace(/\/\/[^/]*@/, '//').replace(/[?#].*$/, '');
  }
}
