/**
 * Errors of the ublk layer, with no knowledge of the image format behind the device: daemon/ublk/
 * talks to the kernel driver only. Like the engine's errors they carry an errno-like `code` and a
 * one-line message that the CLI prints as it is (daemon/main.ts), not as an internal error.
 * A failed control command is the subclass UblkCommandError (./control.ts), with its errno.
 */
export class UblkError extends Error {
  constructor(
    message: string,
    /** errno-like classification: ENOENT when the driver is missing, EIO for a failed command, EBUSY for a device that did not reach a state in time. */
    readonly code: 'EIO' | 'ENOENT' | 'EBUSY' = 'EIO',
  ) {
    super(message);
    this.name = 'UblkError';
  }
}
