/**
 * Errors the engine reports to users: a corrupt or truncated image, a wrong base, an out-of-range
 * request. The message is one line naming the file and the problem.
 */
export class FvdError extends Error {
  constructor(
    message: string,
    /** errno-like classification for the daemon: EIO for corrupt/failed, EINVAL for bad requests. */
    readonly code: 'EINVAL' | 'EIO' | 'ENOSPC' | 'EROFS' | 'EBUSY' | 'ENOENT' = 'EIO',
  ) {
    super(message);
    this.name = 'FvdError';
  }
}

/** The image's on-disk state is inconsistent or unreadable. */
export class CorruptImageError extends FvdError {
  constructor(path: string, what: string) {
    super(`${path}: corrupt image: ${what}`, 'EIO');
  }
}
