import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { CorGate } from '../../daemon/cor-gate.js';
import { GuestLoad, LOAD_IDLE_MS } from '../../daemon/ublk/guest-load.js';

test('a queue at most maxLoad busy hints every base read', () => {
  const g = new CorGate(2, 100);
  for (let t = 0; t < 1000; t += 7) assert.ok(g.allows(t % 2 === 0 ? 1 : 2, t), `at ${t} ms`);
});

test('one busier turn withholds hints for the quiet period, then they resume', () => {
  const g = new CorGate(2, 100);
  assert.ok(g.allows(1, 0));
  assert.not.ok(g.allows(3, 10), 'busier than maxLoad');
  assert.not.ok(g.allows(1, 11), 'light turn right after: still busy');
  assert.not.ok(g.allows(2, 109), 'still inside the quiet period');
  assert.ok(g.allows(1, 110), 'quiet for 100 ms: hinted again');
});

test('a steady deep load with light turns among the busy ones hints nothing', () => {
  const g = new CorGate(2, 100);
  let hinted = 0;
  // Every fourth turn sees 16 requests, the others one or two (how a synchronous queue sees QD16).
  for (let t = 0; t < 2000; t++) if (g.allows(t % 4 === 0 ? 16 : 1 + (t % 2), t)) hinted++;
  assert.is(hinted, 0);
});

test('guest load: in flight, this turn and the last; a wait past LOAD_IDLE_MS ends the burst', () => {
  const g = new GuestLoad(1000);
  assert.is(g.load, 0);
  // A QD16 burst served synchronously: each request completes before the next arrives.
  for (let i = 0; i < 16; i++) {
    g.arrived();
    assert.is(g.load, i + 1, 'this turn counts every arrival');
    g.completed();
  }
  assert.is(g.inFlight, 0);
  g.newTurn(1002);
  assert.is(g.load, 16, 'the next turn, 2 ms later: the last turn still counts');
  assert.is(g.turnTime, 1002);
  g.arrived();
  g.completed();
  g.newTurn(1003);
  assert.is(g.load, 1, 'a light turn replaces the burst after one turn');
  // A burst, then a long wait: the first request after it must not look busy.
  for (let i = 0; i < 16; i++) g.arrived(), g.completed();
  g.newTurn(1003 + LOAD_IDLE_MS + 1);
  assert.is(g.load, 0, 'after a wait longer than LOAD_IDLE_MS the burst is over');
  g.arrived();
  assert.is(g.load, 1, 'a QD1 read after a QD16 job: load 1');
  // Requests still in flight across turns count.
  g.arrived();
  g.arrived();
  g.newTurn(2000);
  assert.is(g.load, 3, 'three in flight');
  for (let i = 0; i < 3; i++) g.completed();
  assert.is(g.load, 0);
});

test.run();
