/**
 * The user_data layout of a ublk queue's ring: bits 0–15 tag, 16–23 kind (UD_KIND_*), 24–39 target
 * data (free for the target: which of a request's I/Os). Like ublksrv's build_user_data, but below
 * 2^53 so it stays a plain JS number (ffi/uring.ts writes user_data as two u32 halves); no flag in
 * bit 63.
 */

// Bits 0–15 tag, 16–23 kind (UD_KIND_*), 24–39 target data (free for the target: which of a request's I/Os).
// Like ublksrv's build_user_data, but below 2^53 so it stays a plain JS number (ffi/uring.ts
// writes user_data as two u32 halves); no flag in bit 63.

/** A FETCH_REQ or COMMIT_AND_FETCH_REQ of `tag`: its completion is a new request (or an abort). */
export const UD_KIND_UBLK_CMD = 0;
/** I/O the target put on the ring for `tag` (handleTargetIo). */
export const UD_KIND_TARGET_IO = 1;
/** The read of the queue's eventfd (handleEvent); its tag is 0. */
export const UD_KIND_EVENT = 2;
/** The loop's one-second timeout (it wakes an idle loop for everySecond and the buffer trim); tag 0. */
export const UD_KIND_TIMER = 3;
/**
 * A batched-I/O command (UBLK_F_BATCH_IO, daemon/ublk/batch-io.ts); the tag field names which
 * (BATCH_SLOT_*), the target data of a commit its element count.
 */
export const UD_KIND_BATCH = 4;

const TAG_SPAN = 0x10000;
const KIND_SPAN = 0x100;
const TARGET_DATA_SPAN = 0x10000;

/** user_data of one SQE; every field must be within its range (tag < 65536, kind < 256, targetData < 65536). */
export function encodeUserData(tag: number, kind: number, targetData = 0): number {
  return tag + kind * TAG_SPAN + targetData * (TAG_SPAN * KIND_SPAN);
}
export function userDataTag(userData: number): number {
  return userData % TAG_SPAN;
}
export function userDataKind(userData: number): number {
  return Math.floor(userData / TAG_SPAN) % KIND_SPAN;
}
export function userDataTargetData(userData: number): number {
  return Math.floor(userData / (TAG_SPAN * KIND_SPAN)) % TARGET_DATA_SPAN;
}
/** All fields at once (allocates: for tests and diagnostics, not the request path). */
export function decodeUserData(userData: number): { tag: number; kind: number; targetData: number } {
  return { tag: userDataTag(userData), kind: userDataKind(userData), targetData: userDataTargetData(userData) };
}
