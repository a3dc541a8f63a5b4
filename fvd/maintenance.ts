/**
 * Offline maintenance of FVD images: `commit` (write an image's local blocks into its base and
 * empty it), `rebase` (change the base, copying what differs) and `resize` (grow or shrink the
 * virtual disk). docs/FORMAT.md §12 is the normative description, including the crash-safety
 * argument for every ordering below.
 *
 * Every operation holds the image's exclusive lock for its whole run, so a served image fails
 * with the usual "in use" error. Data moves through the engine (FvdImage), so that its bitmap,
 * lookup table and journal stay right; metadata that the engine never changes on its own (the
 * base fields, the sizes, where the regions lie) is switched here, on a *clean* image (journal
 * checkpointed, DIRTY clear), by writes that never touch a byte the live header gives meaning to,
 * followed by a single-sector header write — the one atomic step of each switch.
 *
 * Encrypted images (FORMAT.md §12.7): the key, if given, is checked right after the header;
 * data read here or through the engine is plaintext, and the engine encrypts what it stores.
 * Operations that read no data (rebase -u, growing, resize --shrink) work without the key.
 * Images with internal snapshots are refused, with the reason (FORMAT.md §12.6).
 *
 * This file is the public face; the code lives in fvd/maintenance/, one job per file:
 * offline-image.ts (the locked image, its refusals, reads of its own storage), metadata-switch.ts
 * (layout planning and the ordered header switch), data-windows.ts (runs and windows of blocks),
 * and one file per operation: commit.ts, rebase.ts, resize.ts.
 */
export { commitImage, type CommitOptions, type CommitResult } from './maintenance/commit.js';
export { rebaseImage, type RebaseOptions, type RebaseResult } from './maintenance/rebase.js';
export { resizeImage, type ResizeOptions, type ResizeResult } from './maintenance/resize.js';
