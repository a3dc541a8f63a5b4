/**
 * What a storage admin expects of the command line: per-command help generated from each
 * command's declaration, --version, the Node.js version check, "-5G" as a value, qemu-img-shaped
 * JSON (map compared with qemu-img's own output on the same files where the formats overlap),
 * space figures that tell written data from never-written zeros, measure and compare.
 */
import type { MapEntry } from '../../daemon/space.js';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { CLI, TempDir, assertNoCrash, assertOk, assertOneLineError, fvd, json } from '../helpers/cli.js';
import { COMMANDS, COMMAND_SUMMARIES, endOfLifeNote } from '../../daemon/main.js';
import type { CommandSpec } from '../../daemon/command.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const tmp = new TempDir('fvd-cli-admin-');
test.after(() => tmp.cleanup());

const hasQemuImg = spawnSync('sh', ['-c', 'command -v qemu-img && command -v qemu-io']).status === 0;
function qemu(tool: string, ...args: string[]): string {
  const r = spawnSync(tool, args, { encoding: 'utf8' });
  assert.is(r.status, 0, `${tool} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

const mapJson = (...args: string[]) => json<MapEntry[]>(fvd('map', '--output=json', ...args));
const strip = (m: MapEntry[]) => m.map(({ offset: _o, ...rest }) => rest);

/** A raw file with data at the given [offset, length, byte] ranges and holes elsewhere. */
function rawWith(file: string, size: number, ranges: Array<[number, number, number]>): void {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  const fd = fs.openSync(file, 'r+');
  for (const [off, len, byte] of ranges) fs.writeSync(fd, Buffer.alloc(len, byte), 0, len, off);
  fs.closeSync(fd);
}

async function specs(): Promise<CommandSpec[]> {
  return Promise.all(COMMANDS.map(async (c) => ((await import(`../../daemon/commands/${c}.js`)) as { spec: CommandSpec }).spec));
}

test('help: fvd help CMD and fvd CMD --help print the same text, naming every declared option; each is accepted', async () => {
  for (const spec of await specs()) {
    const a = fvd('help', spec.name);
    const b = fvd(spec.name, '--help');
    const c = fvd(spec.name, '-h');
    assertOk(a);
    assertOk(b);
    assert.is(b.stdout, a.stdout, `${spec.name}: help and --help differ`);
    assert.is(c.stdout, a.stdout, `${spec.name}: -h`);
    assert.match(a.stdout, new RegExp(`^usage: fvd ${spec.name} `), spec.name);
    for (const [name, o] of Object.entries(spec.options)) {
      const flag = name.length === 1 && o.short === name ? `-${name}` : `--${name}`;
      assert.ok(a.stdout.includes(flag), `${spec.name}: help lacks ${flag}`);
      // The parser knows the option: it is never "Unknown option" (the command may refuse the
      // combination for other reasons, or lack its arguments).
      const r = fvd(spec.name, ...(o.type === 'string' ? [`${flag}`, 'x'] : [flag]), '--no-such-image-arg-x', '/nonexistent/x');
      assertNoCrash(r);
      assert.not.match(r.stderr, new RegExp(`Unknown option '${flag}'`), `${spec.name} ${flag}: ${r.stderr}`);
    }
  }
  // The general help lists every command; an unknown topic is one line.
  const all = fvd('--help');
  assertOk(all);
  // Its summaries are main.ts's copies (so that it loads no command module): each the command's own.
  for (const spec of await specs()) {
    assert.is(COMMAND_SUMMARIES[spec.name as keyof typeof COMMAND_SUMMARIES], spec.summary, `${spec.name}: main.ts's summary differs from the command's`);
    assert.match(all.stdout, new RegExp(`^  ${spec.name} +${spec.summary.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}$`, 'm'), spec.name);
  }
  assertOneLineError(fvd('help', 'nosuch'), /unknown command 'nosuch'/);
  // An unknown option is still refused, naming it.
  assertOneLineError(fvd('create', '--no-such-option', 'x.fvd', '1M'), /--no-such-option/);
});

test('--version prints package.json\'s version and the Node.js version (with its end of life once past)', () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(path.dirname(CLI), '..', '..', 'package.json'), 'utf8')) as { version: string };
  const r = fvd('--version');
  assertOk(r);
  assert.is(r.stdout, `fvd ${pkg.version} (Node.js ${process.versions.node}${endOfLifeNote(process.versions.node, new Date())})\n`);
  // A Node.js 20 (end of life 2026-04-30) as the CLI sees it: the note is in the line.
  const old = spawnSync(process.execPath, ['--import', 'data:text/javascript,Object.defineProperty(process.versions,"node",{value:"20.20.2"})', CLI, '--version'], { encoding: 'utf8' });
  assert.is(old.status, 0, old.stderr);
  const note = Date.now() >= Date.parse('2026-04-30T00:00:00Z') ? ', end of life since 2026-04-30' : '';
  assert.is(old.stdout, `fvd ${pkg.version} (Node.js 20.20.2${note})\n`);
});

test('endOfLifeNote: from the end-of-life day on, per LTS line; other lines and earlier days get none', () => {
  const day = (d: string) => new Date(`${d}T12:00:00Z`);
  assert.is(endOfLifeNote('20.20.2', day('2026-04-29')), '');
  assert.is(endOfLifeNote('20.20.2', day('2026-04-30')), ', end of life since 2026-04-30');
  assert.is(endOfLifeNote('22.15.0', day('2026-12-06')), '');
  assert.is(endOfLifeNote('22.15.0', day('2027-05-01')), ', end of life since 2027-04-30');
  assert.is(endOfLifeNote('24.22.3', day('2026-12-06')), '');
  assert.is(endOfLifeNote('24.22.3', day('2028-04-30')), ', end of life since 2028-04-30');
  assert.is(endOfLifeNote('26.1.0', day('2029-04-30')), ', end of life since 2029-04-30');
  assert.is(endOfLifeNote('25.2.1', day('2030-01-01')), '', 'a line not in the table');
});

test('an unsupported Node.js version: one line before anything else runs, exit 1', () => {
  const dir = tmp.caseDir();
  for (const v of ['18.19.1', '20.14.0']) {
    const r = spawnSync(process.execPath, ['--import', `data:text/javascript,Object.defineProperty(process.versions,"node",{value:"${v}"})`, CLI, 'create', path.join(dir, 'x.fvd'), '1M'], { encoding: 'utf8' });
    assert.is(r.status, 1, r.stderr);
    assert.is(r.stderr, `fvd: Node.js ${v} is too old: fvd needs Node.js 20.15 or newer (tested on 20, 24 and 26)\n`);
    assert.not.ok(fs.existsSync(path.join(dir, 'x.fvd')), 'nothing was run');
  }
});

test('resize IMAGE -1M: a relative size, not an option; errors are prefixed once', () => {
  const f = path.join(tmp.caseDir(), 'r.fvd');
  assertOk(fvd('create', f, '4M'));
  const r = fvd('resize', f, '-1M');
  assertOk(r);
  assert.match(r.stdout, /4 MiB -> 3 MiB/);
  assertOk(fvd('io', '-c', 'write -P 0x11 2M 64k', f));
  const e = assertOneLineError(fvd('resize', f, '-2M'), /would discard data/);
  assert.not.match(e, /resize: resize:/, e);
  assert.match(e, /^fvd resize: /);
});

test('map --output=json on a raw file is qemu-img map --output=json', () => {
  if (!hasQemuImg) {
    console.log('  skip: qemu-img not installed');
    return;
  }
  const f = path.join(tmp.caseDir(), 'holes.raw');
  rawWith(f, 8 * MiB, [[0, 64 * KiB, 1], [1 * MiB, 300 * KiB, 2], [7 * MiB, 1 * MiB, 3]]);
  const ours = mapJson('-f', 'raw', f);
  const theirs = JSON.parse(qemu('qemu-img', 'map', '--output=json', '-f', 'raw', f)) as MapEntry[];
  assert.equal(ours, theirs);
  assert.ok(ours.some((e) => e.zero) && ours.some((e) => e.data), 'both kinds present');
});

test('map --output=json of a compact FVD image over a raw base equals qemu-img map of a qcow2 overlay written alike (but offsets)', () => {
  if (!hasQemuImg) {
    console.log('  skip: qemu-img not installed');
    return;
  }
  const d = tmp.caseDir();
  const base = path.join(d, 'base.raw');
  rawWith(base, 4 * MiB, [[0, 1 * MiB, 7]]);
  const fv = path.join(d, 'top.fvd');
  const qc = path.join(d, 'top.qcow2');
  // Without zero detection: FVD would otherwise know the base's holes read as zeros (depth 0).
  assertOk(fvd('create', '--layout', 'compact', '--no-detect-zeroes', '-b', 'base.raw', '-F', 'raw', fv, '8M'));
  qemu('qemu-img', 'create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', qc, '8M');
  // Whole chunks (1 MiB): one in the base's range over a hole of the base, one past the base's end.
  const writes = ['write -P 0x21 2M 1M', 'write -P 0x22 5M 1M'];
  assertOk(fvd('io', ...writes.flatMap((w) => ['-c', w]), fv));
  qemu('qemu-io', ...writes.flatMap((w) => ['-c', w]), qc);
  const ours = mapJson(fv);
  const theirs = JSON.parse(qemu('qemu-img', 'map', '--output=json', qc)) as MapEntry[];
  assert.equal(strip(ours), strip(theirs));
  // Offsets: the base's are the virtual offsets; ours at depth 0 lie in the image's data area.
  for (const e of ours.filter((x) => x.depth === 1 && x.offset !== undefined)) assert.is(e.offset, e.start);
  for (const e of ours.filter((x) => x.depth === 0 && x.data)) assert.ok(e.offset! >= 1 * MiB && e.offset! + e.length <= fs.statSync(fv).size);
});

test('info and map tell written data from never-written zeros (raw-like over a base: the issue\'s case)', () => {
  const d = tmp.caseDir();
  const base = path.join(d, 'b.raw');
  rawWith(base, 64 * MiB, [[0, 8 * MiB, 9]]);
  const img = path.join(d, 't.fvd');
  assertOk(fvd('create', '--block-size', '64K', '-b', 'b.raw', '-F', 'raw', img, '128M'));
  assertOk(fvd('io', '-c', 'write -P 1 70M 1M', img));
  const info = json<Record<string, number | string | boolean>>(fvd('info', '--output=json', img));
  assert.is(info.bytesData, 1 * MiB, 'data written: 1 MiB');
  assert.is(info.bytesInBase, 8 * MiB, 'the base\'s zero blocks were detected at create: only its 8 MiB of data remain in it');
  assert.is(info.bytesZero, 128 * MiB - 9 * MiB);
  assert.is((info.bytesData as number) + (info.bytesZero as number) + (info.bytesInBase as number), info['virtual-size']);
  // qemu-img's keys
  assert.is(info.filename, img);
  assert.is(info.format, 'fvd');
  assert.is(info['virtual-size'], 128 * MiB);
  assert.is(info['cluster-size'], 64 * KiB);
  assert.is(info['dirty-flag'], false);
  assert.is(info['backing-filename-format'], 'raw');
  assert.is(info['full-backing-filename'], base);
  const human = fvd('info', img).stdout;
  assert.match(human, /^data: 1 MiB \(0\.8%\) written in this image$/m);
  assert.match(human, /^zero: 119 MiB \(93\.0%\) never written/m);
  assert.match(human, /^in base: 8 MiB \(6\.3%\)$/m);
  // map says "zero" for the never-written ranges
  const m = mapJson(img);
  assert.equal(
    m.map((e) => [e.start, e.length, e.depth, e.data, e.zero]),
    [
      [0, 8 * MiB, 1, true, false],
      [8 * MiB, 62 * MiB, 0, false, true],
      [70 * MiB, 1 * MiB, 0, true, false],
      [71 * MiB, 57 * MiB, 0, false, true],
    ],
  );
  assert.match(fvd('map', img).stdout, /^0x800000\s+0x3e00000\s+zero\s/m);
  // --backing-chain: the image, then its base
  const chain = json<Array<Record<string, unknown>>>(fvd('info', '--output=json', '--backing-chain', img));
  assert.equal(chain.map((c) => [c.filename, c.format, c['virtual-size']]), [[img, 'fvd', 128 * MiB], [base, 'raw', 64 * MiB]]);
  const text = fvd('info', '--backing-chain', img).stdout;
  assert.match(text, new RegExp(`\\n\\nimage: ${base.replace(/[.]/g, '\\.')}\\nfile format: raw\\n`));
});

test('info: a compact image counts mapped chunks as data, unmapped ones as zeros; discard makes zeros', () => {
  const img = path.join(tmp.caseDir(), 'c.fvd');
  assertOk(fvd('create', '--layout', 'compact', img, '16M'));
  assertOk(fvd('io', '-c', 'write -P 5 0 2M', '-c', 'write -P 6 8M 1M', img));
  let info = json<Record<string, number>>(fvd('info', '--json', img));
  assert.is(info.bytesData, 3 * MiB);
  assert.is(info.bytesZero, 13 * MiB);
  assertOk(fvd('io', '-c', 'discard 0 1M', img));
  info = json<Record<string, number>>(fvd('info', '--json', img));
  assert.is(info.bytesData, 2 * MiB, 'a discarded chunk no longer counts as data');
  const m = mapJson(img);
  assert.equal(m[0], { start: 0, length: 1 * MiB, depth: 0, present: false, zero: true, data: false });
});

test('check --output=json: qemu-img check\'s keys', () => {
  const img = path.join(tmp.caseDir(), 'k.fvd');
  assertOk(fvd('create', '--layout', 'compact', img, '8M'));
  assertOk(fvd('io', '-c', 'write -P 5 0 128k', img));
  const r = fvd('check', '--output=json', img);
  assert.is(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout) as Record<string, unknown>;
  assert.is(j.filename, img);
  assert.is(j.format, 'fvd');
  assert.is(j['check-errors'], 0);
  assert.is(j['total-clusters'], 8 * MiB / (64 * KiB));
  assert.is(j['allocated-clusters'], 2);
  assert.is(j['image-end-offset'], fs.statSync(img).size);
  assert.not.ok('corruptions' in j);
});

test('--output: human/json/bad value; --json is the same as --output=json', () => {
  const img = path.join(tmp.caseDir(), 'o.fvd');
  assertOk(fvd('create', '--layout', 'compact', img, '1M'));
  assert.is(fvd('info', '--json', img).stdout, fvd('info', '--output=json', img).stdout);
  assert.is(fvd('info', '--output', 'human', img).stdout, fvd('info', img).stdout);
  assertOneLineError(fvd('info', '--output=xml', img), /invalid --output 'xml': expected human or json/);
  for (const args of [['list'], ['snapshot', '-l'], ['map'], ['check'], ['measure', '--size', '1G']]) {
    const withImage = args[0] === 'list' || args[0] === 'measure' ? args : [...args, img];
    const r = fvd(...withImage.slice(0, 1), '--output=json', ...withImage.slice(1));
    assert.is(r.code, 0, `${r.cmd}: ${r.stderr}`);
    JSON.parse(r.stdout);
  }
});

test('measure: raw output and --size like qemu-img measure; compact figures bound what convert and a full write use', () => {
  const d = tmp.caseDir();
  const src = path.join(d, 's.raw');
  rawWith(src, 32 * MiB, [[0, 3 * MiB, 1], [20 * MiB, 512 * KiB, 2]]);
  if (hasQemuImg) {
    const theirs = JSON.parse(qemu('qemu-img', 'measure', '--output=json', '-O', 'raw', '-f', 'raw', src));
    assert.equal(json(fvd('measure', '--output=json', '-O', 'raw', '-f', 'raw', src)), theirs);
    const sized = JSON.parse(qemu('qemu-img', 'measure', '--output=json', '-O', 'raw', '--size', '1G'));
    assert.equal(json(fvd('measure', '--output=json', '-O', 'raw', '--size', '1G')), sized);
  }
  const m = json<{ required: number; 'fully-allocated': number }>(fvd('measure', '--output=json', '--layout', 'compact', src));
  const out = path.join(d, 'o.fvd');
  assertOk(fvd('convert', '-O', 'fvd', '--layout', 'compact', src, out));
  const size = fs.statSync(out).size;
  assert.ok(size <= m.required, `converted: ${size} > required ${m.required}`);
  assert.ok(m.required - size < 1 * MiB, `required ${m.required} is tight (file ${size})`);
  assertOk(fvd('io', '-c', 'write -P 3 0 32M', out));
  const full = fs.statSync(out).size;
  assert.ok(full <= m['fully-allocated'], `fully written: ${full} > ${m['fully-allocated']}`);
  assert.ok(m['fully-allocated'] - full < 1 * MiB);
  assert.match(fvd('measure', '--size', '10G', '--layout', 'compact').stdout, /^required size: \d+ \(.*\)\nfully allocated size: \d+ \(.*\)\n$/);
  assertOneLineError(fvd('measure', '--size', '1G', src), /give SRC or --size SIZE/);
});

test('compare: exit 0 identical, 1 different (first differing offset), 2 on errors; -s strict; same verdicts as qemu-img compare', () => {
  const d = tmp.caseDir();
  const a = path.join(d, 'a.raw');
  rawWith(a, 4 * MiB, [[1 * MiB, 64 * KiB, 4]]);
  const img = path.join(d, 'a.fvd');
  assertOk(fvd('convert', '-O', 'fvd', a, img));
  const same = fvd('compare', a, img);
  assert.is(same.code, 0, same.stderr);
  assert.is(same.stdout, 'Images are identical.\n');
  assertOk(fvd('io', '-c', 'write -P 9 3000 512', img));
  const diff = fvd('compare', a, img);
  assert.is(diff.code, 1, diff.stderr);
  assert.is(diff.stdout, 'Content mismatch at offset 2560!\n');
  assert.equal(JSON.parse(fvd('compare', '--output=json', a, img).stdout), { identical: false, 'first-difference': 2560, reason: 'content' });
  // A longer disk that reads zeros past the end: identical, but not under -s.
  const longer = path.join(d, 'long.raw');
  rawWith(longer, 6 * MiB, [[1 * MiB, 64 * KiB, 4]]);
  assert.is(fvd('compare', a, longer).code, 0);
  assert.is(fvd('compare', '-s', a, longer).code, 1);
  // Errors: exit 2, one line.
  assertOneLineError(fvd('compare', a, path.join(d, 'missing.raw')), [], 2);
  assertOneLineError(fvd('compare', a), /usage: fvd compare/, 2);
  if (hasQemuImg) {
    const changed = path.join(d, 'changed.raw');
    assertOk(fvd('convert', '-O', 'raw', img, changed));
    for (const [x, y, want] of [[a, longer, 0], [a, changed, 1], [a, path.join(d, 'missing.raw'), 2]] as const) {
      const q = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', x, y]);
      assert.is(q.status, want, `qemu-img compare ${x} ${y}`);
      assert.is(fvd('compare', '-f', 'raw', '-F', 'raw', x, y).code, want, `fvd compare ${x} ${y}`);
    }
  }
});

test('convert -p: progress on stderr, ending at 100%', () => {
  const d = tmp.caseDir();
  const src = path.join(d, 's.raw');
  rawWith(src, 8 * MiB, [[0, 4 * MiB, 1]]);
  const r = fvd('convert', '-p', '-O', 'fvd', src, path.join(d, 'o.fvd'));
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stderr, /\(100\.00\/100%\)\n$/);
});

test('create --preallocation falloc: the whole file allocated, size and content as without it; bad values and layouts refused', () => {
  const dir = tmp.caseDir();
  const base = path.join(dir, 'base.raw');
  rawWith(base, 64 * MiB, [[64 * KiB, 64 * KiB, 0x5a]]); // big enough that the data area, not the journal, is most of the file
  const plain = path.join(dir, 'plain.fvd');
  const pre = path.join(dir, 'pre.fvd');
  assertOk(fvd('create', '-b', base, '-F', 'raw', plain));
  const r = fvd('create', '-b', base, '-F', 'raw', '--preallocation', 'falloc', pre);
  assertOk(r);
  assert.match(r.stdout, /preallocation=falloc/);
  const st = fs.statSync(pre);
  assert.is(st.size, fs.statSync(plain).size, 'size unchanged');
  assert.ok(st.blocks * 512 >= st.size, `every byte allocated (${st.blocks * 512} of ${st.size})`);
  assert.ok(fs.statSync(plain).blocks * 512 < st.size / 2, 'without it the file is sparse');
  const local = (img: string) => json<{ bytesLocal: number }>(fvd('info', '--json', img)).bytesLocal;
  assert.is(local(pre), local(plain), 'allocation is not data: the bitmaps are the same');
  // The same disk: base bytes through, zeros elsewhere; a write lands; reopened, it is there.
  assertOk(fvd('io', '-r', '-c', 'read -P 0x5a 64k 64k', '-c', 'read -P 0 0 64k', '-c', 'read -P 0 1M 3M', pre));
  assertOk(fvd('io', '-c', 'write -P 0x33 128k 4k', pre));
  assertOk(fvd('io', '-r', '-c', 'read -P 0x33 128k 4k', '-c', 'read -P 0x5a 64k 64k', pre));
  assertOk(fvd('check', pre));

  const other = path.join(dir, 'other.fvd');
  assertOneLineError(fvd('create', '--preallocation', 'full', other, '1M'), /invalid preallocation 'full': expected off or falloc/);
  assertOneLineError(fvd('create', '--layout', 'compact', '--preallocation', 'falloc', other, '1M'), /needs --layout raw/);
  assert.not.ok(fs.existsSync(other), 'nothing created');
  assertOk(fvd('create', '--preallocation', 'off', other, '1M'));
});

test.run();
