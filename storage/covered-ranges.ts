/**
 * The byte ranges of a read request that reply chunks have covered so far (NBD structured replies
 * may split a read into chunks in any order; each byte must be covered exactly once). Kept sorted,
 * disjoint and merged in one flat array [start0, end0, start1, end1, ...], so that an overlap is
 * found by a binary search and chunks that arrive in order stay one range: a server that splits a
 * read into thousands of chunks costs O(log n) per chunk, not a scan of every earlier chunk (which
 * a hostile server could make quadratic: 2 MiB in 1-byte chunks).
 */
export class CoveredRanges {
  private readonly r: number[] = [];

  /** Adds [a, z) (a < z). False, and nothing added, if it overlaps a range already covered. */
  add(a: number, z: number): boolean {
    const r = this.r;
    const n = r.length >> 1;
    // The first range that ends after a: those before it end at or before a.
    let lo = 0;
    let hi = n;
    while (lo < hi) {
      const m = (lo + hi) >> 1;
      if (r[2 * m + 1]! <= a) lo = m + 1;
      else hi = m;
    }
    // It overlaps [a, z) iff it starts before z; every later range starts after its end (> a) and
    // after its start, so if it starts at or after z, they all do.
    if (lo < n && r[2 * lo]! < z) return false;
    const joinsPrevious = lo > 0 && r[2 * lo - 1] === a;
    const joinsNext = lo < n && r[2 * lo] === z;
    if (joinsPrevious && joinsNext) {
      r[2 * lo - 1] = r[2 * lo + 1]!;
      r.splice(2 * lo, 2);
    } else if (joinsPrevious) r[2 * lo - 1] = z;
    else if (joinsNext) r[2 * lo] = a;
    else r.splice(2 * lo, 0, a, z);
    return true;
  }

  /** True when exactly [0, length) is covered (length > 0). */
  coversWhole(length: number): boolean {
    return this.r.length === 2 && this.r[0] === 0 && this.r[1] === length;
  }

  /** Bytes covered. */
  bytes(): number {
    let s = 0;
    for (let i = 0; i < this.r.length; i += 2) s += this.r[i + 1]! - this.r[i]!;
    return s;
  }

  /** Separate ranges held (1 once chunks that arrived in order joined up). */
  get ranges(): number {
    return this.r.length >> 1;
  }
}
