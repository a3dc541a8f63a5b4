/**
 * The engine over the real node:fs backend (pwrite, fdatasync, ftruncate, hole punching and
 * SEEK_DATA through koffi), with the power cut taken at flush boundaries: after each flush the
 * image file is copied while nothing is in flight — the state a power cut right after that
 * fdatasync leaves (everything flushed is on disk; nothing else was written since). Each copy must
 * open (journal replay, the DIRTY flag set), pass check, and read every flushed write. The
 * in-memory campaign covers the states between flushes (torn and reordered writes); this covers
 * the real backend's behaviour at the boundaries the campaign trusts.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { FvdImage } from '../../fvd/image.js';
import { checkImage } from '../../fvd/check.js';
import { nodeIo } from '../../storage/node-file.js';
import { Rng, randomSeed } from '../helpers/rng.js';
import { makeData, firstMismatch } from '../helpers/model.js';

const KiB = 1024;
const seed = process.env.FVD_SEED ? Number(process.env.FVD_SEED) : randomSeed();

for (const layout of ['raw', 'compact'] as const) {
  test(`real files, ${layout}: a copy taken after each flush opens, checks clean, holds every flushed write (FVD_SEED=${seed})`, async () => {
    const r = new Rng(seed ^ (layout === 'raw' ? 1 : 2));
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-realcut-'));
    try {
      const size = 1024 * KiB;
      const base = r.bytes(512 * KiB);
      fs.writeFileSync(path.join(dir, 'base.raw'), base);
      const img = path.join(dir, 'disk.fvd');
      await FvdImage.create(nodeIo, img, { size, layout, blockSize: 4 * KiB, chunkSize: 16 * KiB, journalSize: 8 * KiB, base: 'base.raw', baseFormat: 'raw' });
      const live = new Uint8Array(size);
      live.set(base);
      const image = await FvdImage.open(nodeIo, img, { copyOnRead: true });
      const cuts: { file: string; want: Uint8Array }[] = [];
      for (let round = 0; round < 12; round++) {
        const ps: Promise<void>[] = [];
        const taken: [number, number][] = [];
        for (let j = r.range(1, 6); j > 0; j--) {
          const off = r.int(size / 512) * 512;
          const len = Math.min(size - off, r.pick([1, 8, 33, 64]) * 512);
          if (taken.some(([a, b]) => off < b && a < off + len)) continue;
          taken.push([off, off + len]);
          if (r.chance(0.2)) {
            live.fill(0, off, off + len);
            ps.push(image.writeZeroes(off, len));
          } else {
            const data = makeData(r, len, round * 10 + j, off, 'random');
            live.set(data, off);
            ps.push(image.write(data, off));
          }
        }
        if (r.chance(0.3)) ps.push(image.read(new Uint8Array(64 * KiB), r.int(8) * 64 * KiB)); // copy-on-read
        await Promise.all(ps);
        await image.flush();
        const copy = path.join(dir, `cut${round}.fvd`);
        fs.copyFileSync(img, copy);
        cuts.push({ file: copy, want: live.slice() });
      }
      await image.close();
      for (const [i, c] of cuts.entries()) {
        const report = await checkImage(nodeIo, c.file);
        assert.equal(report.errors, [], `cut ${i}: check`);
        const opened = await FvdImage.open(nodeIo, c.file); // read-write: replays the journal on disk
        const got = new Uint8Array(size);
        await opened.read(got, 0);
        await opened.close();
        const m = firstMismatch(c.want, got, 0);
        assert.ok(m === undefined, `cut ${i}: ${m}`);
        assert.equal((await checkImage(nodeIo, c.file)).errors, [], `cut ${i}: check after recovery`);
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
}

test.run();
