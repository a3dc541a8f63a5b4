/**
 * `make install DESTDIR=... PREFIX=/usr` into a temporary root: the unit's paths follow PREFIX and
 * `systemd-analyze verify --root` accepts it (it resolves ExecStart= inside the root, so a unit
 * pointing at /usr/local/bin/fvd fails there); /etc/fvd and /var/lib/fvd exist; only production
 * dependencies and no tests or benchmarks are installed; the installed `fvd` runs.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const root = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-install-'));
const have = (cmd: string) => spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;

test.after(() => fs.rmSync(root, { recursive: true, force: true }));

test('make install DESTDIR PREFIX=/usr: unit follows PREFIX, verified by systemd-analyze; production files only; fvd runs', () => {
  if (!have('make') || !have('npm')) {
    console.log('  skip: make or npm missing');
    return;
  }
  // -o build: the suite runs on a fresh build already; install must not need to rebuild.
  const r = spawnSync('make', ['-s', '-C', repo, '-o', 'build', '-o', 'deps', 'install', `DESTDIR=${root}`, 'PREFIX=/usr'], { encoding: 'utf8', timeout: 300_000 });
  assert.is(r.status, 0, `make install failed: ${r.stderr}${r.stdout}`);

  const unit = fs.readFileSync(path.join(root, 'usr/lib/systemd/system/fvd@.service'), 'utf8');
  assert.match(unit, /^ExecStart=\/usr\/bin\/fvd serve --instance %i$/m);
  assert.match(unit, /^Documentation=file:\/\/\/usr\/lib\/fvd\/README\.md$/m);
  assert.not.match(unit, /\/usr\/local/, 'no /usr/local path left in the unit');
  assert.match(unit, /^ExecStopPost=\+\/bin\/sh -c 'exec systemctl start --no-block "fvd-expire@%i\.service"'$/m);
  const expire = fs.readFileSync(path.join(root, 'usr/lib/systemd/system/fvd-expire@.service'), 'utf8');
  assert.match(expire, /^ExecStart=\/usr\/bin\/fvd __warden --instance %i$/m);
  assert.not.match(expire, /\/usr\/local/, 'no /usr/local path left in fvd-expire@.service');
  assert.ok(fs.existsSync(path.join(root, 'usr/lib/fvd/README.md')), 'the Documentation= file is installed');
  for (const d of ['etc/fvd', 'var/lib/fvd']) assert.ok(fs.statSync(path.join(root, d)).isDirectory(), `${d} created`);

  const lib = path.join(root, 'usr/lib/fvd');
  assert.equal(fs.readdirSync(path.join(lib, 'build')).sort(), ['daemon', 'ffi', 'fvd', 'storage'], 'no tests or benchmarks installed');
  const modules = fs.readdirSync(path.join(lib, 'node_modules')).filter((m) => !m.startsWith('.'));
  for (const dev of ['typescript', 'uvu', '@types']) assert.not.ok(modules.includes(dev), `devDependency ${dev} installed: ${modules}`);
  assert.ok(modules.includes('koffi'), 'koffi (a production dependency) installed');

  // The installed CLI runs from the install tree (bin/fvd is a symlink to an absolute path inside
  // PREFIX, so run its target within the root).
  assert.is(fs.readlinkSync(path.join(root, 'usr/bin/fvd')), '/usr/lib/fvd/build/daemon/cli.js');
  const cli = path.join(lib, 'build/daemon/cli.js');
  assert.ok((fs.statSync(cli).mode & 0o111) !== 0, 'cli.js is executable');
  // Run as bin/fvd runs it, through its #! line.
  const direct = spawnSync(cli, ['--version'], { encoding: 'utf8', env: { ...process.env, PATH: `${path.dirname(process.execPath)}:/usr/bin:/bin` } });
  assert.is(direct.status, 0, `cli.js run through its #! line: ${direct.stderr}`);
  assert.match(direct.stdout, /^fvd \d+\.\d+\.\d+ \(Node\.js /);
  const img = path.join(root, 'x.fvd');
  const c = spawnSync(process.execPath, [cli, 'create', '--layout', 'compact', img, '4M'], { encoding: 'utf8' });
  assert.is(c.status, 0, c.stderr);
  const v = spawnSync(process.execPath, [cli, '--version'], { encoding: 'utf8' });
  assert.match(v.stdout, /^fvd \d+\.\d+\.\d+ \(Node\.js /);
  // koffi loads from the installed node_modules: check takes the image's lock through it.
  const chk = spawnSync(process.execPath, [cli, 'check', img], { encoding: 'utf8' });
  assert.is(chk.status, 0, chk.stderr);

  if (!have('systemd-analyze')) {
    console.log('  skip: systemd-analyze missing (apt-get install systemd): the unit was not verified');
    return;
  }
  // verify --root needs the units fvd@.service refers to (targets, modprobe@.service) in the root.
  const units = path.join(root, 'usr/lib/systemd/system');
  for (const name of fs.readdirSync('/usr/lib/systemd/system')) {
    const from = path.join('/usr/lib/systemd/system', name);
    if (!fs.existsSync(path.join(units, name)) && fs.statSync(from).isFile()) fs.copyFileSync(from, path.join(units, name));
  }
  // ExecStop=/ExecStopPost= run /bin/sh, which verify looks for in the root too.
  fs.mkdirSync(path.join(root, 'bin'), { recursive: true });
  if (!fs.existsSync(path.join(root, 'bin/sh'))) fs.copyFileSync(fs.realpathSync('/bin/sh'), path.join(root, 'bin/sh'));
  fs.chmodSync(path.join(root, 'bin/sh'), 0o755);
  const verify = (): ReturnType<typeof spawnSync> =>
    spawnSync('systemd-analyze', ['verify', `--root=${root}`, 'fvd@test.service', 'fvd-expire@test.service'], { encoding: 'utf8' });
  const ok = verify();
  assert.is(ok.status, 0, `systemd-analyze verify: ${ok.stderr}`);
  // The check can fail: a unit whose ExecStart= is not in the root is refused.
  fs.renameSync(path.join(root, 'usr/bin/fvd'), path.join(root, 'usr/bin/fvd.moved'));
  const bad = verify();
  fs.renameSync(path.join(root, 'usr/bin/fvd.moved'), path.join(root, 'usr/bin/fvd'));
  assert.is.not(bad.status, 0, 'verify must refuse a unit whose ExecStart= is missing');
  assert.match(String(bad.stderr), /\/usr\/bin\/fvd/);
});

test('make install INSTALL_NODE=: bin/fvd runs the CLI on that node, with no node on PATH; a bad INSTALL_NODE installs nothing', () => {
  if (!have('make') || !have('npm')) {
    console.log('  skip: make or npm missing');
    return;
  }
  // Another Node where CI has one (FVD_ALT_NODE), so the version printed tells which node ran.
  const pinned = process.env.FVD_ALT_NODE || process.execPath;
  const pinnedVersion = spawnSync(pinned, ['-p', 'process.versions.node'], { encoding: 'utf8' }).stdout.trim();
  const dest = path.join(root, 'pinned');
  const install = (node: string, into: string) =>
    spawnSync('make', ['-s', '-C', repo, '-o', 'build', '-o', 'deps', 'install', `DESTDIR=${into}`, 'PREFIX=/usr', `INSTALL_NODE=${node}`], { encoding: 'utf8', timeout: 300_000 });
  const r = install(pinned, dest);
  assert.is(r.status, 0, `make install failed: ${r.stderr}${r.stdout}`);

  const bin = path.join(dest, 'usr/bin/fvd');
  const st = fs.lstatSync(bin);
  assert.ok(st.isFile() && (st.mode & 0o111) !== 0, 'bin/fvd is an executable file, not a symlink');
  const script = fs.readFileSync(bin, 'utf8');
  assert.match(script, /^#!\/bin\/sh\n/);
  assert.ok(script.includes(`exec "${pinned}" "/usr/lib/fvd/build/daemon/cli.js" "$@"`), script);
  // Run it against the staged tree (its paths point at /usr/lib/fvd, the final place).
  const staged = path.join(root, 'fvd-staged.sh');
  fs.writeFileSync(staged, script.replace('/usr/lib/fvd/', `${dest}/usr/lib/fvd/`));
  const v = spawnSync('/bin/sh', [staged, '--version'], { encoding: 'utf8', env: { PATH: '/nonexistent' } });
  assert.is(v.status, 0, v.stderr);
  assert.match(v.stdout.trim().replace(/^fvd \S+ /, ''), new RegExp(`^\\(Node\\.js ${pinnedVersion.replace(/\./g, '\\.')}(, end of life since [0-9-]+)?\\)$`));
  const unit = fs.readFileSync(path.join(dest, 'usr/lib/systemd/system/fvd@.service'), 'utf8');
  assert.match(unit, /^ExecStart=\/usr\/bin\/fvd serve --instance %i$/m, 'the unit runs bin/fvd, so the service uses the pinned node');

  for (const bad of ['node', '/bin/false', path.join(root, 'no-such-node')]) {
    const into = path.join(root, 'bad');
    const b = install(bad, into);
    assert.is.not(b.status, 0, `INSTALL_NODE=${bad} accepted`);
    assert.match(b.stderr, /make install: (INSTALL_NODE must be an absolute path|the CLI does not run on INSTALL_NODE=)/);
    assert.not.ok(fs.existsSync(into), `INSTALL_NODE=${bad}: nothing may be installed`);
  }
});

test.run();
