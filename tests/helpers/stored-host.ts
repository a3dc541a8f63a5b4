/**
 * The queue worker's storage-read/write decision as the older tests state it: the file offset of
 * a request that `directRoute` serves from one STORED extent, or -1 for every other route.
 */
import { STORED, directRoute, newRun, type SharedMappingView, type SharedView } from '../../fvd/mapping.js';

const run = newRun();

export function storedHost(v: SharedMappingView & Partial<SharedView>, offset: number, length: number, write: boolean): number {
  return directRoute(v, offset, length, write, run) === STORED ? run.host : -1;
}
