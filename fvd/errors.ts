/**
 * Errors the engine reports to users: a corrupt or truncated image, a wrong base, an out-of-range
 * request. The message is one line naming the file and the problem.
 */

/**
 * `text` with its control characters escaped (\n, \r, \t, \xHH), so a message that quotes a path
 * or a name from a hostile header stays one line on a terminal and in logs. Idempotent: the
 * escaped text holds no control character (backslashes are left alone).
 */
export function oneLine(text: string): string {
  return text.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029]/g, (c) => {
    if (c === '\n') return '\\n';
    if (c === '\r') return '\\r';
    if (c === '\t') return '\\t';
    const code = c.charCodeAt(0);
    return code < 0x100 ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16)}`;
  });
}

export class FvdError extends Error {
  constructor(
    message: string,
    /** errno-like classification for the daemon: EIO for corrupt/failed, EINVAL for bad requests. */
    readonly code: 'EINVAL' | 'EIO' | 'ENOSPC' | 'EROFS' | 'EBUSY' | 'ENOENT' = 'EIO',
  ) {
    // Paths and names in messages may come from the user or from a header: never print them raw.
    super(oneLine(message));
    this.name = 'FvdError';
  }
}

/** The image's on-disk state is inconsistent or unreadable. */
export class CorruptImageError extends FvdError {
  constructor(path: string, what: string) {
    super(`${path}: corrupt image: ${what}`, 'EIO');
  }
}
