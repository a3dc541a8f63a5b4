/**
 * Names for ublk feature masks (UBLK_F_*, ./abi.ts): what GET_FEATURES says the kernel supports,
 * and what a device was given at ADD_DEV (dev_info.flags in the reply: the flags asked for plus
 * those the kernel always forces on). The server decides from GET_FEATURES, never from the kernel
 * version: distributions backport ublk changes.
 *
 * Kernels (from the driver's history): bits 0–8 exist in 6.12 (ZERO_COPY there is accepted but
 * masked off at ADD_DEV, real zero copy came with 6.15); USER_RECOVERY_FAIL_IO 6.13; UPDATE_SIZE
 * 6.14–6.16; AUTO_BUF_REG, QUIESCE, PER_IO_DAEMON, BUF_REG_OFF_DAEMON 6.16–6.17; BATCH_IO,
 * INTEGRITY, SAFE_STOP_DEV, NO_AUTO_PART_SCAN, SHMEM_ZC 6.19–7.1; IO_DESC_SIZE 7.3.
 *
 * ADD_DEV also sets bits nobody asked for, describing what the driver does anyway: always
 * CMD_IOCTL_ENCODE and URING_CMD_COMP_IN_TASK, and on newer kernels PER_IO_DAEMON (a tag may be
 * served by any one task; one thread per queue, as here, stays valid), BUF_REG_OFF_DAEMON and
 * SAFE_STOP_DEV. Debian's 7.3 gives a device that asked for nothing 0x26042.
 */
import {
  UBLK_F_AUTO_BUF_REG,
  UBLK_F_BATCH_IO,
  UBLK_F_BUF_REG_OFF_DAEMON,
  UBLK_F_CMD_IOCTL_ENCODE,
  UBLK_F_INTEGRITY,
  UBLK_F_IO_DESC_SIZE,
  UBLK_F_NEED_GET_DATA,
  UBLK_F_NO_AUTO_PART_SCAN,
  UBLK_F_PER_IO_DAEMON,
  UBLK_F_QUIESCE,
  UBLK_F_SAFE_STOP_DEV,
  UBLK_F_SHMEM_ZC,
  UBLK_F_SUPPORT_ZERO_COPY,
  UBLK_F_UNPRIVILEGED_DEV,
  UBLK_F_UPDATE_SIZE,
  UBLK_F_URING_CMD_COMP_IN_TASK,
  UBLK_F_USER_COPY,
  UBLK_F_USER_RECOVERY,
  UBLK_F_USER_RECOVERY_FAIL_IO,
  UBLK_F_USER_RECOVERY_REISSUE,
  UBLK_F_ZONED,
} from './abi.js';

/** The uapi names without the UBLK_F_ prefix, in bit order. */
const FEATURE_NAMES: ReadonlyArray<readonly [bigint, string]> = [
  [UBLK_F_SUPPORT_ZERO_COPY, 'SUPPORT_ZERO_COPY'],
  [UBLK_F_URING_CMD_COMP_IN_TASK, 'URING_CMD_COMP_IN_TASK'],
  [UBLK_F_NEED_GET_DATA, 'NEED_GET_DATA'],
  [UBLK_F_USER_RECOVERY, 'USER_RECOVERY'],
  [UBLK_F_USER_RECOVERY_REISSUE, 'USER_RECOVERY_REISSUE'],
  [UBLK_F_UNPRIVILEGED_DEV, 'UNPRIVILEGED_DEV'],
  [UBLK_F_CMD_IOCTL_ENCODE, 'CMD_IOCTL_ENCODE'],
  [UBLK_F_USER_COPY, 'USER_COPY'],
  [UBLK_F_ZONED, 'ZONED'],
  [UBLK_F_USER_RECOVERY_FAIL_IO, 'USER_RECOVERY_FAIL_IO'],
  [UBLK_F_UPDATE_SIZE, 'UPDATE_SIZE'],
  [UBLK_F_AUTO_BUF_REG, 'AUTO_BUF_REG'],
  [UBLK_F_QUIESCE, 'QUIESCE'],
  [UBLK_F_PER_IO_DAEMON, 'PER_IO_DAEMON'],
  [UBLK_F_BUF_REG_OFF_DAEMON, 'BUF_REG_OFF_DAEMON'],
  [UBLK_F_BATCH_IO, 'BATCH_IO'],
  [UBLK_F_INTEGRITY, 'INTEGRITY'],
  [UBLK_F_SAFE_STOP_DEV, 'SAFE_STOP_DEV'],
  [UBLK_F_NO_AUTO_PART_SCAN, 'NO_AUTO_PART_SCAN'],
  [UBLK_F_SHMEM_ZC, 'SHMEM_ZC'],
  [UBLK_F_IO_DESC_SIZE, 'IO_DESC_SIZE'],
];

/** The names of the bits set in `mask`, lowest first; a bit newer than this table is "bit N". */
export function featureNames(mask: bigint): string[] {
  const names: string[] = [];
  for (let bit = 0n; bit < 64n; bit++) {
    const flag = 1n << bit;
    if ((mask & flag) === 0n) continue;
    names.push(FEATURE_NAMES.find(([f]) => f === flag)?.[1] ?? `bit ${bit}`);
  }
  return names;
}

function hexAndNames(mask: bigint): string {
  const names = featureNames(mask);
  return `0x${mask.toString(16)} (${names.length ? names.join(' ') : 'none'})`;
}

/**
 * The one line `fvd serve` logs about ublk features: what the kernel offers (null: it has no
 * GET_FEATURES, i.e. is older than 6.5) and what this device uses.
 */
export function describeFeatures(kernelRelease: string, offered: bigint | null, used: bigint): string {
  const kernel = offered === null ? 'unknown (no GET_FEATURES: Linux < 6.5)' : hexAndNames(offered);
  return `ublk on Linux ${kernelRelease}: kernel features ${kernel}; this device uses ${hexAndNames(used)}`;
}

/**
 * What zero copy asks of a device: the kernel puts each request's pages in the queue ring's
 * fixed-buffer table (AUTO_BUF_REG, 6.16+) and the server can still reach a request's bytes when
 * it must see them (USER_COPY: pread/pwrite of /dev/ublkcN).
 */
export const ZERO_COPY_FLAGS = UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY;

/** True when `flags` (offered features, or a device's flags) hold both zero-copy bits. */
export function hasZeroCopy(flags: bigint | null): boolean {
  return flags !== null && (flags & ZERO_COPY_FLAGS) === ZERO_COPY_FLAGS;
}
