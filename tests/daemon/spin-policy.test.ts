/**
 * The queue thread's polling window (daemon/ublk/spin-policy.ts): full while polls find work,
 * down to none after a run of empty polls, back after a probe that finds work.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { SpinPolicy } from '../../daemon/ublk/spin-policy.js';

test('a busy queue keeps the whole window', () => {
  const p = new SpinPolicy(5000);
  for (let i = 0; i < 100; i++) {
    assert.is(p.next(), 5000);
    p.record(true);
  }
});

test('empty polls shrink the window to none; then only every 16th wait probes a small window', () => {
  const p = new SpinPolicy(5000);
  let polled = 0;
  let waits = 0;
  while (p.current > 0) {
    polled += p.next();
    p.record(false);
    waits++;
    assert.ok(waits < 20, 'the window closes within a few empty polls');
  }
  assert.ok(polled < 2 * 5000, `${polled} polls wasted before the window closed`);
  // Closed: 256 waits poll 16 probes of 5000/16 — 1/256 of a full window per wait.
  let probes = 0;
  polled = 0;
  for (let i = 0; i < 256; i++) {
    const n = p.next();
    if (n > 0) {
      probes++;
      polled += n;
      assert.is(n, 312);
      p.record(false);
    }
  }
  assert.is(probes, 16);
  assert.is(polled, 16 * 312);
});

test('a probe that finds work reopens the window, doubling up to the maximum', () => {
  const p = new SpinPolicy(5000);
  while (p.current > 0) p.record(false);
  let n = 0;
  while ((n = p.next()) === 0);
  assert.is(n, 312);
  p.record(true);
  const seen: number[] = [];
  for (let i = 0; i < 6; i++) {
    seen.push(p.next());
    p.record(true);
  }
  assert.equal(seen, [312, 624, 1248, 2496, 4992, 5000]);
});

test('half the polls finding work keeps polling (the window does not collapse)', () => {
  const p = new SpinPolicy(5000);
  for (let i = 0; i < 1000; i++) {
    p.next();
    p.record(i % 2 === 0);
  }
  assert.ok(p.current > 0, `window ${p.current}`);
});

test('0: never polls', () => {
  const p = new SpinPolicy(0);
  for (let i = 0; i < 64; i++) assert.is(p.next(), 0);
});

test.run();
