/**
 * storage/remote-config.ts: sections by URL prefix (longest wins), every key parsed, overrides on
 * top, and errors that name the file and line but never echo a value (it may be a secret).
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadRemoteConfig, parseRemoteConfig, settingsFor } from '../../storage/remote-config.js';
import { StorageIo } from '../../storage/storage-io.js';

const text = `# templates
[https://s3.example.com/]
header = Authorization: Bearer aaa
retry-budget = 2m
[https://s3.example.com/team/]
header = Authorization: Bearer bbb
header = X-Extra: 1
query = ?X-Amz-Signature=zzz
ca-file = /etc/ca.pem
stall-timeout = 750ms
connections = 6
request-size = 512K
[nbd://storage1/]
retry-budget = 5s
`;

test('sections by prefix, the longest match wins; every key parsed; overrides on top', () => {
  const c = parseRemoteConfig('r.conf', text);
  const team = settingsFor(c, 'https://s3.example.com/team/t.raw');
  assert.equal(team.headers, { Authorization: 'Bearer bbb', 'X-Extra': '1' });
  assert.is(team.query, 'X-Amz-Signature=zzz');
  assert.is(team.caFile, '/etc/ca.pem');
  assert.equal(team.retry, { stallMs: 750 });
  assert.is(team.connections, 6);
  assert.is(team.requestBytes, 512 * 1024);
  const other = settingsFor(c, 'https://s3.example.com/other.raw');
  assert.equal(other.headers, { Authorization: 'Bearer aaa' });
  assert.equal(other.retry, { budgetMs: 120_000 });
  assert.equal(settingsFor(c, 'nbd://storage1/disk').retry, { budgetMs: 5000 });
  assert.equal(settingsFor(c, 'http://elsewhere/x'), { headers: {}, query: '', retry: {} });
  const o = settingsFor({ ...c, overrides: { retry: { budgetMs: 1 }, headers: { A: 'b' } } }, 'https://s3.example.com/team/x');
  assert.equal(o.retry, { stallMs: 750, budgetMs: 1 });
  assert.equal(o.headers, { Authorization: 'Bearer bbb', 'X-Extra': '1', A: 'b' });
});

test('errors name the file and line, never the value', () => {
  const bad: Array<[string, RegExp]> = [
    ['header = Authorization: x', /r\.conf:1: a setting before the first \[URL-prefix\] section/],
    ['[ftp://x/]', /r\.conf:1: a section names a URL prefix/],
    ['[http://x/]\nheader = SecretValueWithoutColon', /r\.conf:2: expected header = Name: value/],
    ['[http://x/]\npassword = hunter2', /r\.conf:2: unknown key 'password'/],
    ['[http://x/]\nretry-budget = soon', /r\.conf:2: expected a duration/],
    ['[http://x/]\nconnections = 0', /r\.conf:2: connections must be 1 to 64/],
    ['[http://x/]\nrequest-size = 3', /r\.conf:2: request-size must be 4K to 32M/],
    ['[http://x/]\njust text', /r\.conf:2: expected \[URL-prefix\] or key = value/],
  ];
  for (const [t, re] of bad) {
    const err = (() => {
      try {
        parseRemoteConfig('r.conf', t);
        return null;
      } catch (e) {
        return e as Error;
      }
    })();
    assert.ok(err, t);
    assert.match(err!.message, re);
    assert.not.match(err!.message, /hunter2|SecretValue/);
  }
});

test('loadRemoteConfig: a missing default file means no settings; a missing explicit file is an error; StorageIo reads it only for a URL', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'fvd-rc-'));
  try {
    const saved = process.env.FVD_REMOTE_CONFIG;
    delete process.env.FVD_REMOTE_CONFIG;
    assert.throws(() => loadRemoteConfig(path.join(dir, 'nope.conf')), /nope\.conf: ENOENT/);
    process.env.FVD_REMOTE_CONFIG = path.join(dir, 'broken.conf');
    fs.writeFileSync(process.env.FVD_REMOTE_CONFIG, 'garbage\n');
    // local files never need the remote configuration
    const io = new StorageIo();
    const f = path.join(dir, 'x.raw');
    fs.writeFileSync(f, Buffer.alloc(4096));
    await (await io.open(f, { readOnly: true })).close();
    const err = await io.open('http://127.0.0.1:9/x', { readOnly: true }).then(() => null, (e: Error) => e);
    assert.match(err?.message ?? '', /broken\.conf:1: expected \[URL-prefix\]/);
    const rw = await new StorageIo({ sections: [] }).open('http://127.0.0.1:9/x', {}).then(() => null, (e: Error) => e);
    assert.match(rw?.message ?? '', /a remote base is read-only/);
    const ftp = await new StorageIo({ sections: [] }).open('ftp://h/x', { readOnly: true }).then(() => null, (e: Error) => e);
    assert.match(ftp?.message ?? '', /unsupported base URL scheme 'ftp'/);
    if (saved === undefined) delete process.env.FVD_REMOTE_CONFIG;
    else process.env.FVD_REMOTE_CONFIG = saved;
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test.run();
