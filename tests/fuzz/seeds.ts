/**
 * The fuzzer's seed images: small valid images covering every structure the format has — both
 * layouts, raw and FVD bases (a chain of two), a zero-detected base, copy-on-write and
 * copy-on-read data, a dirty image whose journal holds bitmap and table records, internal
 * snapshots (refcount table, directory, saved states), encryption, a fully local image. Made by
 * the engine itself, deterministically (fixed data, fixed key); encrypted seeds use a cheap scrypt
 * so that each command's unlock costs little.
 */
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';

const KiB = 1024;
const MiB = 1024 * KiB;
export const FUZZ_KEY = Buffer.from('fuzz-key: not a secret');
const FAST_KDF = { log2N: 10, r: 8, p: 1 };

export interface Seed {
  name: string;
  dir: string;
  /** The image file, and the files it reads through (never to be written). */
  image: string;
  bases: string[];
  encrypted: boolean;
  /** The image's bytes and its base files' bytes, to lay out each mutant's directory. */
  bytes: Uint8Array;
  baseBytes: Map<string, Uint8Array>;
}

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = (x >>> 0) & 0xff;
  }
  return b;
}

/** A raw base: data, holes, and whole zero blocks (found by create's zero detection). */
function rawBase(file: string, size: number, seed: number): void {
  const b = pattern(size, seed);
  for (let off = size / 4; off < size / 2; off++) b[off] = 0;
  fs.writeFileSync(file, b);
}

interface Step {
  write?: [number, number, number][]; // [offset, length, pattern seed]
  read?: [number, number][];
  snapshot?: string;
  prefetch?: boolean;
}

async function build(dir: string, name: string, create: CreateOptions, steps: Step[], end: 'close' | 'abandon'): Promise<void> {
  const file = path.join(dir, name);
  await FvdImage.create(nodeIo, file, { journalSize: 16 * KiB, ...create });
  const key = create.encrypt?.key;
  for (const [i, step] of steps.entries()) {
    const img = await FvdImage.open(nodeIo, file, { key, copyOnRead: true });
    for (const [off, len, s] of step.write ?? []) await img.write(pattern(len, s), off);
    for (const [off, len] of step.read ?? []) await img.read(Buffer.alloc(len), off);
    if (step.snapshot) await img.snapshots.create(step.snapshot);
    if (step.prefetch) {
      const st = img.stats();
      for (let off = 0; off < st.virtualSize; off += 256 * KiB) await img.read(Buffer.alloc(Math.min(256 * KiB, st.virtualSize - off)), off);
    }
    await img.flush();
    if (i === steps.length - 1 && end === 'abandon') await img.abandon();
    else await img.close();
  }
}

/** Builds every seed under `root` (once per campaign) and returns them. */
export async function makeSeeds(root: string): Promise<Seed[]> {
  const enc = { key: FUZZ_KEY, kdf: FAST_KDF };
  const specs: { name: string; make: (dir: string) => Promise<void>; image: string; bases: string[]; encrypted?: boolean }[] = [
    {
      name: 'raw-plain',
      image: 'a.fvd',
      bases: [],
      make: (d) => build(d, 'a.fvd', { size: 1 * MiB, blockSize: 4 * KiB }, [{ write: [[0, 8 * KiB, 1], [300 * KiB, 20 * KiB, 2]] }], 'close'),
    },
    {
      name: 'raw-over-raw-dirty',
      image: 'a.fvd',
      bases: ['base.raw'],
      make: async (d) => {
        rawBase(path.join(d, 'base.raw'), 1 * MiB, 3);
        await build(d, 'a.fvd', { size: 1 * MiB, blockSize: 4 * KiB, base: 'base.raw', baseFormat: 'raw' }, [{ write: [[6 * KiB, 2 * KiB, 4], [700 * KiB, 12 * KiB, 5]], read: [[100 * KiB, 16 * KiB]] }], 'abandon');
      },
    },
    {
      name: 'compact-plain',
      image: 'a.fvd',
      bases: [],
      make: (d) => build(d, 'a.fvd', { size: 2 * MiB, layout: 'compact', blockSize: 4 * KiB, chunkSize: 64 * KiB }, [{ write: [[0, 4 * KiB, 6], [1 * MiB + 100 * KiB, 70 * KiB, 7]] }], 'close'),
    },
    {
      name: 'compact-over-raw-dirty',
      image: 'a.fvd',
      bases: ['base.raw'],
      make: async (d) => {
        rawBase(path.join(d, 'base.raw'), 1 * MiB, 8);
        await build(d, 'a.fvd', { size: 2 * MiB, layout: 'compact', blockSize: 4 * KiB, chunkSize: 64 * KiB, base: 'base.raw', baseFormat: 'raw' }, [
          { write: [[10 * KiB, 6 * KiB, 9]], read: [[200 * KiB, 64 * KiB]] },
          { write: [[600 * KiB, 8 * KiB, 10], [1500 * KiB, 100 * KiB, 11]] },
        ], 'abandon');
      },
    },
    {
      name: 'compact-snapshots',
      image: 'a.fvd',
      bases: ['base.raw'],
      make: async (d) => {
        rawBase(path.join(d, 'base.raw'), 512 * KiB, 12);
        await build(d, 'a.fvd', { size: 1 * MiB, layout: 'compact', blockSize: 4 * KiB, chunkSize: 64 * KiB, base: 'base.raw', baseFormat: 'raw' }, [
          { write: [[0, 20 * KiB, 13]], snapshot: 'one' },
          { write: [[8 * KiB, 8 * KiB, 14], [700 * KiB, 64 * KiB, 15]], snapshot: 'two' },
          { write: [[16 * KiB, 4 * KiB, 16]] },
        ], 'close');
      },
    },
    {
      name: 'chain-fvd-over-raw',
      image: 'top.fvd',
      bases: ['mid.fvd', 'base.raw'],
      make: async (d) => {
        rawBase(path.join(d, 'base.raw'), 1 * MiB, 17);
        await build(d, 'mid.fvd', { size: 1 * MiB, blockSize: 16 * KiB, base: 'base.raw', baseFormat: 'raw' }, [{ write: [[64 * KiB, 16 * KiB, 18]] }], 'close');
        await build(d, 'top.fvd', { size: 2 * MiB, layout: 'compact', blockSize: 16 * KiB, chunkSize: 128 * KiB, base: 'mid.fvd', baseFormat: 'fvd' }, [{ write: [[40 * KiB, 8 * KiB, 19]] }], 'close');
      },
    },
    {
      name: 'encrypted-raw',
      image: 'a.fvd',
      bases: [],
      encrypted: true,
      make: (d) => build(d, 'a.fvd', { size: 1 * MiB, blockSize: 4 * KiB, encrypt: enc }, [{ write: [[0, 12 * KiB, 20]] }], 'close'),
    },
    {
      name: 'encrypted-compact-over-raw-dirty',
      image: 'a.fvd',
      bases: ['base.raw'],
      encrypted: true,
      make: async (d) => {
        rawBase(path.join(d, 'base.raw'), 1 * MiB, 21);
        await build(d, 'a.fvd', { size: 1 * MiB, layout: 'compact', blockSize: 4 * KiB, chunkSize: 64 * KiB, base: 'base.raw', baseFormat: 'raw', encrypt: enc }, [{ write: [[4 * KiB, 4 * KiB, 22], [520 * KiB, 40 * KiB, 23]], read: [[64 * KiB, 8 * KiB]] }], 'abandon');
      },
    },
    {
      name: 'fully-local',
      image: 'a.fvd',
      bases: ['base.raw'],
      make: async (d) => {
        rawBase(path.join(d, 'base.raw'), 512 * KiB, 24);
        await build(d, 'a.fvd', { size: 512 * KiB, blockSize: 4 * KiB, base: 'base.raw', baseFormat: 'raw' }, [{ prefetch: true }, { write: [[0, 4 * KiB, 25]] }], 'close');
      },
    },
  ];
  const seeds: Seed[] = [];
  for (const s of specs) {
    const dir = path.join(root, s.name);
    fs.mkdirSync(dir, { recursive: true });
    await s.make(dir);
    const baseBytes = new Map<string, Uint8Array>();
    for (const b of s.bases) baseBytes.set(b, fs.readFileSync(path.join(dir, b)));
    seeds.push({
      name: s.name,
      dir,
      image: s.image,
      bases: s.bases,
      encrypted: !!s.encrypted,
      bytes: new Uint8Array(fs.readFileSync(path.join(dir, s.image))),
      baseBytes,
    });
  }
  return seeds;
}
