/**
 * FVD images over qcow2 templates made by qemu-img: the disk reads like `qemu-img convert -O raw`
 * of the template, before and after writes on top (against a model), after a reopen and after
 * prefetching to fully local (then without the template); zero detection at create reads only
 * allocated clusters; the CLI's create/rebase -F qcow2, convert -f qcow2, info --backing-chain;
 * commit into a qcow2 base refused. The template is byte-identical throughout.
 */
import * as assert from 'uvu/assert';
import { test } from 'uvu';
import fs from 'node:fs';
import path from 'node:path';
import { FvdImage, type CreateOptions } from '../../fvd/image.js';
import { nodeIo } from '../../storage/node-file.js';
import { Prefetcher } from '../../fvd/prefetch.js';
import { checkImage } from '../../fvd/check.js';
import { BASE_QCOW2 } from '../../fvd/format.js';
import { registerZstdFallback } from '../../daemon/zstd-fallback.js';
import { Rng } from '../helpers/rng.js';
import { DiskModel, firstMismatch, makeData } from '../helpers/model.js';
import { TempDir, assertOk, assertOneLineError, fvd, sha256File, snapshot, assertUnchanged } from '../helpers/cli.js';
import { diskPattern, qemuImg, qemuIo, qemuRead, qemuTest, writeFile } from '../helpers/qemu.js';
import { ReadCounter } from '../helpers/read-counter.js';
import { l2EntryAt, readU64, write } from '../helpers/qcow2-tamper.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const tmp = new TempDir('fvd-qcow2-base-');
registerZstdFallback();

async function readAll(img: FvdImage): Promise<Buffer> {
  const out = Buffer.alloc(img.size);
  for (let pos = 0; pos < img.size; pos += 384 * KiB) await img.read(out.subarray(pos, Math.min(img.size, pos + 384 * KiB)), pos);
  return out;
}

function same(want: Uint8Array, got: Uint8Array, what: string): void {
  const m = firstMismatch(want, got, 0);
  assert.ok(m === undefined, `${what}: ${m}`);
}

/** Templates of each kind qemu-img makes, as [name, build(dir) → template path]. */
const TEMPLATES: [string, (dir: string) => string][] = [
  [
    'zlib-compressed (convert -c)',
    (dir) => {
      const raw = writeFile(dir, 'src.raw', diskPattern(6 * MiB + 64 * KiB, 1));
      const q = path.join(dir, 'tmpl.qcow2');
      qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, q);
      fs.rmSync(raw);
      return q;
    },
  ],
  [
    'zstd-compressed, 16 KiB clusters, extended L2',
    (dir) => {
      const raw = writeFile(dir, 'src.raw', diskPattern(5 * MiB, 2));
      const q = path.join(dir, 'tmpl.qcow2');
      qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=16k,extended_l2=on', raw, q);
      qemuIo(q, 'write -P 0x3c 8k 1k', 'write -z 100k 2k');
      fs.rmSync(raw);
      return q;
    },
  ],
  [
    'a chain raw ← qcow2 (compat=0.10) ← qcow2 with zero clusters over backing data',
    (dir) => {
      const raw = writeFile(dir, 'bottom.raw', diskPattern(4 * MiB, 3));
      const mid = path.join(dir, 'mid.qcow2');
      qemuImg('create', '-f', 'qcow2', '-o', 'compat=0.10', '-b', 'bottom.raw', '-F', 'raw', mid, '6M');
      qemuIo(mid, 'write -c -P 0x21 0 64k', 'write -P 0x22 2M 200k', 'write -P 0x23 5M 64k');
      const top = path.join(dir, 'tmpl.qcow2');
      qemuImg('create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', top);
      qemuIo(top, 'write -z 0 128k', 'write -P 0x31 3M 70k', 'write -z 2M 64k');
      return top;
    },
  ],
];

for (const [kind, make] of TEMPLATES)
  for (const layout of ['raw', 'compact'] as const)
    qemuTest(`${layout} image over a ${kind} template: reads, writes, reopen, prefetch, template deleted`, async () => {
      const dir = tmp.caseDir();
      const template = make(dir);
      const chainFiles = fs.readdirSync(dir).map((f) => path.join(dir, f));
      const before = snapshot(chainFiles);
      const want = qemuRead(template);
      const img = path.join(dir, 'vm.fvd');
      const opts: CreateOptions = { base: 'tmpl.qcow2', baseFormat: 'qcow2', layout, blockSize: 64 * KiB, chunkSize: 256 * KiB, size: want.length + 2 * MiB };
      await FvdImage.create(nodeIo, img, opts);
      assert.is(fs.readFileSync(img)[66], BASE_QCOW2, 'base_format 3 is recorded');
      const model = new DiskModel(want.length + 2 * MiB, want);

      let image = await FvdImage.open(nodeIo, img);
      same(model.data, await readAll(image), 'fresh image over the template (with copy-on-read)');
      const rng = new Rng(layout === 'raw' ? 5 : 6);
      for (let i = 0; i < 30; i++) {
        const off = rng.int(model.data.length - 80 * KiB);
        const data = makeData(rng, rng.range(1, 80 * KiB), i, off, 'mixed');
        const aligned = Math.floor(off / 512) * 512;
        const len = Math.ceil(data.length / 512) * 512;
        const buf = Buffer.alloc(len);
        buf.set(data.subarray(0, len));
        await image.write(buf, aligned);
        model.write(buf, aligned);
      }
      same(model.data, await readAll(image), 'after writes on top');
      await image.close();
      image = await FvdImage.open(nodeIo, img, { readOnly: true });
      same(model.data, await readAll(image), 'after a reopen');
      await image.close();

      image = await FvdImage.open(nodeIo, img, { copyOnRead: false });
      const pf = new Prefetcher(image, { chunkBytes: 512 * KiB, seed: 1, minBytesPerSec: 0 }).start();
      const end = await pf.finished;
      assert.is(end.state, 'done', `prefetch: ${end.state} ${end.error?.message ?? ''}`);
      assert.ok(image.stats().fullyLocal);
      await image.close();
      assertUnchanged(before, 'reading, writing on top and prefetching');

      for (const f of chainFiles) fs.rmSync(f);
      image = await FvdImage.open(nodeIo, img);
      same(model.data, await readAll(image), 'fully local, template deleted');
      await image.close();
      assert.is((await checkImage(nodeIo, img)).errors.length, 0);
    });

qemuTest('zero detection at create reads only the allocated clusters of a qcow2 template', async () => {
  const dir = tmp.caseDir();
  const q = path.join(dir, 'big.qcow2');
  qemuImg('create', '-f', 'qcow2', q, '1G');
  qemuIo(q, 'write -P 0x41 0 64k', 'write -z 64M 64k', 'write -P 0x42 700M 128k', 'write -P 0 900M 64k');
  const counter = new ReadCounter(nodeIo, q);
  await FvdImage.create(counter, path.join(dir, 'vm.fvd'), { base: 'big.qcow2', baseFormat: 'qcow2' });
  // Header, L1, the L2 tables, and the 4 allocated clusters (the zero one included): well under 2 MiB of 1 GiB.
  assert.ok(counter.bytes < 2 * MiB, `read ${counter.bytes} bytes of the template`);
  const image = await FvdImage.open(nodeIo, path.join(dir, 'vm.fvd'), { readOnly: true });
  const s = image.stats();
  // Everything is zero-detected except the two blocks of data at 0 and 700M (128k = 2 blocks).
  assert.is(s.bytesInBase, 3 * 64 * KiB, `in base ${s.bytesInBase}`);
  await image.close();
});

/** The full scan create did before extents: block b is zero when its bytes below `limit` all are. */
function referenceZeroBlocks(disk: Uint8Array, limit: number, blockSize: number): boolean[] {
  const out: boolean[] = [];
  for (let a = 0; a < limit; a += blockSize) out.push(disk.subarray(a, Math.min(a + blockSize, limit)).every((v) => v === 0));
  return out;
}

qemuTest('zero detection over qcow2 templates (own clusters, compressed, zero, over a sparse raw backing) equals a full scan', async () => {
  for (const [seed, blockSize, extendedL2] of [
    [1, 16 * KiB, false],
    [2, 64 * KiB, false],
    [3, 4 * KiB, true],
  ] as const) {
    const dir = tmp.caseDir();
    const rng = new Rng(seed);
    // A sparse raw backing file, not a block multiple long, with scattered unaligned data.
    const rawSize = 7 * MiB + 3 * 512 + 77;
    const raw = path.join(dir, 'backing.raw');
    const fd = fs.openSync(raw, 'w');
    fs.ftruncateSync(fd, rawSize);
    const rawWritten: [number, number][] = [];
    for (let k = 0; k < 12; k++) {
      const len = 1 + rng.int(40 * KiB);
      const at = rng.int(rawSize - len);
      const data = Buffer.alloc(len);
      if (k % 4) for (let i = 0; i < len; i++) data[i] = rng.int(256); // every 4th piece: written zeros
      fs.writeSync(fd, data, 0, len, at);
      rawWritten.push([at, at + len]);
    }
    fs.closeSync(fd);
    const q = path.join(dir, 'tmpl.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', `extended_l2=${extendedL2 ? 'on' : 'off'}${extendedL2 ? ',cluster_size=128k' : ''}`, '-b', 'backing.raw', '-F', 'raw', q, `${8 * MiB}`);
    // One compressed cluster: a whole one, onto an unallocated one (qemu-io refuses anything else).
    qemuIo(q, `write -c -P 0x33 ${4 * MiB} ${extendedL2 ? 128 * KiB : 64 * KiB}`);
    const cmds: string[] = [];
    for (let k = 0; k < 16; k++) {
      const len = 512 * (1 + rng.int(64));
      const at = 512 * rng.int((8 * MiB - len) / 512);
      const kind = rng.int(4);
      cmds.push(kind === 0 ? `write -z ${at} ${len}` : kind === 1 ? `write -P 0 ${at} ${len}` : `write -P ${1 + rng.int(255)} ${at} ${len}`);
    }
    qemuIo(q, ...cmds);
    const disk = qemuRead(q);

    const counter = new ReadCounter(nodeIo, raw);
    const img = path.join(dir, 'vm.fvd');
    await FvdImage.create(counter, img, { base: 'tmpl.qcow2', baseFormat: 'qcow2', blockSize });
    // The raw backing is read only in its data: at most the blocks its pieces touch.
    const touched = new Set<number>();
    for (const [a, z] of rawWritten) for (let b = Math.floor(a / blockSize); b * blockSize < z; b++) touched.add(b);
    assert.ok(counter.bytes <= touched.size * blockSize, `seed ${seed}: read ${counter.bytes} bytes of the backing file, its data blocks hold ${touched.size * blockSize}`);

    const image = await FvdImage.open(nodeIo, img, { readOnly: true });
    try {
      const want = referenceZeroBlocks(disk, disk.length, blockSize);
      const ext = image.extents();
      const got = want.map((_, b) => ext.find((e) => e.offset <= b * blockSize && b * blockSize < e.offset + e.length)!.kind !== 'base');
      const diff = want.findIndex((z, b) => z !== got[b]);
      assert.is(diff, -1, `seed ${seed}: block ${diff} zero=${want[diff]} but local=${got[diff]}`);
      assert.ok(want.some((z) => !z) && want.some((z) => z), `seed ${seed}: both zero and data blocks`);
      same(disk, await readAll(image), `seed ${seed}: the image reads like its template`);
    } finally {
      await image.close();
    }
  }
});

qemuTest('CLI: create -F qcow2, info --backing-chain, convert -f qcow2 to raw and fvd, rebase -F qcow2, commit refused', async () => {
  const dir = tmp.caseDir();
  const raw = writeFile(dir, 'os.raw', diskPattern(4 * MiB, 9));
  const q = path.join(dir, 'os.qcow2');
  qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, q);
  const mid = path.join(dir, 'mid.qcow2');
  qemuImg('create', '-f', 'qcow2', '-b', 'os.qcow2', '-F', 'qcow2', mid);
  qemuIo(mid, 'write -P 0x55 1M 64k');
  const want = qemuRead(mid);
  const before = snapshot([q, mid]);

  const vm = path.join(dir, 'vm.fvd');
  assertOk(fvd('create', '-b', 'mid.qcow2', '-F', 'qcow2', vm));
  const info = fvd('info', '--backing-chain', vm);
  assertOk(info);
  assert.match(info.stdout, /base image: .*mid\.qcow2 \(qcow2, 4 MiB\)\n {2}based on: .*os\.qcow2 \(qcow2, 4 MiB\)/);
  assert.match(info.stdout, /image: .*mid\.qcow2\nfile format: qcow2\nvirtual size: 4 MiB \(4194304 bytes\)\ndisk size: .*\ncluster size: 64 KiB\ncompat: 1\.1\ncompression type: zlib\nextended l2: no\nbacking file: os\.qcow2 \(qcow2\)/);
  // qemu-img map's shape: depth 0 is this image, 1 the qcow2 template above os.qcow2, 2 os.qcow2.
  const map = JSON.parse(fvd('map', '--output=json', vm).stdout) as { start: number; length: number; depth: number; data: boolean }[];
  assert.is(map.reduce((n, e) => n + e.length, 0), 4 * MiB, 'map covers the disk');
  assert.ok(map.some((e) => e.depth >= 1 && e.data), 'map shows what is read from the qcow2 base');
  const json = JSON.parse(fvd('info', '--json', vm).stdout) as { baseChain: { format: string; qcow2?: { clusterSize: number } }[] };
  assert.equal(json.baseChain.map((e) => e.format), ['qcow2', 'qcow2']);
  assert.is(json.baseChain[1]!.qcow2!.clusterSize, 64 * KiB);

  // convert: the template itself (probed by magic, and with -f), to raw and to FVD; and the FVD image.
  for (const args of [['-f', 'qcow2', '-O', 'raw'], ['-O', 'raw']]) {
    const out = path.join(dir, `out${args.length}.raw`);
    assertOk(fvd('convert', ...args, mid, out));
    same(want, fs.readFileSync(out), `convert ${args.join(' ')}`);
  }
  const outFvd = path.join(dir, 'flat.fvd');
  assertOk(fvd('convert', '-f', 'qcow2', '-O', 'fvd', mid, outFvd));
  let image = await FvdImage.open(nodeIo, outFvd, { readOnly: true });
  same(want, await readAll(image), 'convert -f qcow2 -O fvd');
  await image.close();
  assertOk(fvd('convert', '-O', 'raw', vm, path.join(dir, 'vm.raw')));
  same(want, fs.readFileSync(path.join(dir, 'vm.raw')), 'convert of the image over the template');
  assertOneLineError(fvd('convert', '-O', 'qcow2', vm, path.join(dir, 'x.qcow2')), /does not write them: -O raw or -O fvd/);

  // commit into a qcow2 base: refused, nothing written anywhere.
  assertOk(fvd('io', '-c', 'write -P 0x77 0 64k', vm));
  const withVm = snapshot([q, mid, vm]);
  assertOneLineError(fvd('commit', vm), /commit refuses an image over a qcow2 base: fvd reads qcow2 bases but never writes them/);
  assertUnchanged(withVm, 'a refused commit');

  // rebase: from the qcow2 chain onto its flattened raw copy (safe: nothing differs, nothing copied) and back.
  const flatRaw = path.join(dir, 'out4.raw');
  assertOk(fvd('rebase', '-b', path.basename(flatRaw), '-F', 'raw', vm));
  assertOk(fvd('rebase', '-b', 'mid.qcow2', '-F', 'qcow2', vm));
  const expect = Buffer.from(want);
  expect.fill(0x77, 0, 64 * KiB);
  image = await FvdImage.open(nodeIo, vm, { readOnly: true });
  same(expect, await readAll(image), 'after rebasing away from and back onto the qcow2 chain');
  assert.is(image.stats().baseChain[0]!.format, 'qcow2');
  await image.close();
  assertOneLineError(fvd('rebase', '-b', 'mid.qcow2', '-F', 'vmdk', vm), /invalid base format 'vmdk': expected raw, qcow2 or fvd/);
  assertOneLineError(fvd('create', '-b', 'os.raw', '-F', 'qcow2', path.join(dir, 'wrong.fvd')), /bad magic \(not a qcow2 image\)/);
  assertUnchanged(before, 'every command above');
  assert.is(sha256File(q), before[q]);
});

qemuTest('convert -f qcow2 of a template many 4 MiB pieces long (reads run ahead of writes): the bytes of qemu-img convert; a bad cluster in a middle piece is one line', () => {
  const dir = tmp.caseDir();
  const data = diskPattern(22 * MiB + 64 * KiB, 21);
  data.fill(0, 5 * MiB, 9 * MiB); // a whole piece of zeros: not read, not written
  const raw = writeFile(dir, 'os.raw', data);
  for (const type of ['zlib', 'zstd']) {
    const q = path.join(dir, `${type}.qcow2`);
    qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, raw, q);
    const out = path.join(dir, `${type}.raw`);
    assertOk(fvd('convert', '-f', 'qcow2', '-O', 'raw', q, out));
    same(data, fs.readFileSync(out), `${type}: convert of ${Math.ceil(data.length / (4 * MiB))} pieces`);
  }
  // Garbage in the compressed streams of clusters in two neighbouring pieces (14 and 18 MiB):
  // the first fails the convert while the next is still being read, which must not surface as
  // a second error or an unhandled rejection.
  const q = path.join(dir, 'zlib.qcow2');
  const shift = 62n - 8n; // 64 KiB clusters: the host offset's bits
  for (const guest of [14 * MiB, 18 * MiB]) {
    const at = l2EntryAt(q, guest);
    assert.is(readU64(q, at) >> 62n, 1n, `guest ${guest} is stored compressed`);
    write(q, Number(readU64(q, at) & ((1n << shift) - 1n)), Buffer.alloc(64, 0xff));
  }
  const before = snapshot([q]);
  assertOneLineError(fvd('convert', '-f', 'qcow2', '-O', 'raw', q, path.join(dir, 'bad.raw')), /zlib\.qcow2: corrupt qcow2 image: compressed cluster .* does not decompress/);
  assertUnchanged(before, 'a failed convert');
});

qemuTest('info -f qcow2 / -f raw describe a template as qemu-img info does; without -f a qcow2 file is refused in one line that names it; io -f qcow2 reads it', () => {
  const dir = tmp.caseDir();
  const raw = writeFile(dir, 'os.raw', diskPattern(4 * MiB, 3));
  const q = path.join(dir, 'os.qcow2');
  qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'compression_type=zstd,cluster_size=32k', raw, q);
  const mid = path.join(dir, 'mid.qcow2');
  qemuImg('create', '-f', 'qcow2', '-b', 'os.qcow2', '-F', 'qcow2', mid);
  qemuIo(mid, 'write -P 0x55 1M 64k', 'write -z 2M 128k');
  const before = snapshot([raw, q, mid]);

  // The header facts, against qemu-img's own reading of the same file.
  const theirs = JSON.parse(qemuImg('info', '--output=json', mid)) as Record<string, unknown> & { 'format-specific': { data: Record<string, unknown> } };
  const r = fvd('info', '-f', 'qcow2', '--json', mid);
  assertOk(r);
  const ours = JSON.parse(r.stdout) as Record<string, unknown> & { 'format-specific': { data: Record<string, unknown> }; baseChain: { path: string; format: string }[] };
  for (const k of ['format', 'virtual-size', 'cluster-size', 'backing-filename', 'backing-filename-format']) assert.equal(ours[k], theirs[k], k);
  for (const k of ['compat', 'compression-type', 'extended-l2']) assert.equal(ours['format-specific'].data[k], theirs['format-specific'].data[k], k);
  // The space figures: 64 KiB written and 128 KiB of zero clusters in mid, the rest from os.qcow2.
  assert.equal([ours.bytesData, ours.bytesZero, ours.bytesInBase], [64 * KiB, 128 * KiB, 4 * MiB - 192 * KiB]);
  assert.equal(ours.baseChain.map((e) => [path.basename(e.path), e.format]), [['os.qcow2', 'qcow2']]);

  const text = fvd('info', '-f', 'qcow2', '--backing-chain', mid);
  assertOk(text);
  assert.match(text.stdout, /^image: .*mid\.qcow2\nfile format: qcow2\nvirtual size: 4 MiB \(4194304 bytes\)\n/);
  assert.match(text.stdout, /\nbacking file: os\.qcow2 \(qcow2\)\ndata: 64 KiB \(1\.6%\) in this file's clusters\nzero: 128 KiB \(3\.1%\)/);
  // --backing-chain: os.qcow2 follows, with its own compression and cluster size.
  assert.match(text.stdout, /\n\nimage: .*os\.qcow2\nfile format: qcow2\n.*\n.*\ncluster size: 32 KiB\ncompat: 1\.1\ncompression type: zstd\n/);

  const flat = fvd('info', '-f', 'raw', '--json', raw);
  assertOk(flat);
  const rawInfo = JSON.parse(flat.stdout) as Record<string, unknown>;
  assert.equal([rawInfo.format, rawInfo['virtual-size']], ['raw', 4 * MiB]);

  // Never probed: the default (fvd) names what the file is; a key with a qcow2 file is refused.
  assertOneLineError(fvd('info', mid), /mid\.qcow2: not an FVD image \(bad magic; it is a qcow2 image\)/);
  assertOneLineError(fvd('info', raw), /os\.raw: not an FVD image \(bad magic\)$/m);
  const keyFile = writeFile(dir, 'key', Buffer.alloc(64, 1));
  assertOneLineError(fvd('info', '-f', 'qcow2', '--key-file', keyFile, mid), /a key was given, but this is a qcow2 file/);
  assertOneLineError(fvd('info', '-f', 'vmdk', mid), /invalid format 'vmdk': expected raw, fvd or qcow2/);

  // io -f qcow2 (its size from the qcow2 header, checked before the open): reads, never writes.
  assertOk(fvd('io', '-f', 'qcow2', '-r', '-c', 'read -P 0x55 1M 64k', '-c', 'read -P 0 2M 128k', mid));
  assertOneLineError(fvd('io', '-f', 'qcow2', '-r', '-c', 'read 4M 4k', mid), /read at 4194304\+4096 is outside the disk \(4194304 bytes\)/);
  assertOneLineError(fvd('io', '-f', 'qcow2', '-c', 'write 0 4k', mid), /fvd reads qcow2 images but never writes them/);
  assertUnchanged(before, 'info and io');
});

qemuTest('a refusal deep in the chain names the level: an encrypted qcow2 below a qcow2 below the FVD image', async () => {
  const dir = tmp.caseDir();
  const enc = path.join(dir, 'enc.qcow2');
  qemuImg('create', '-f', 'qcow2', '--object', 'secret,id=s,data=123456', '-o', 'encrypt.format=luks,encrypt.key-secret=s', enc, '1M');
  const mid = path.join(dir, 'mid.qcow2');
  qemuImg('create', '-f', 'qcow2', '-u', '-b', 'enc.qcow2', '-F', 'qcow2', mid, '1M');
  const r = fvd('create', '-b', 'mid.qcow2', '-F', 'qcow2', path.join(dir, 'vm.fvd'));
  assertOneLineError(r, /base image 'mid\.qcow2': .*enc\.qcow2: qcow2 image is encrypted \(LUKS\)/);
  assert.not.ok(fs.existsSync(path.join(dir, 'vm.fvd')), 'a refused create leaves no image behind');
});

test.after(() => tmp.cleanup());
test.run();
