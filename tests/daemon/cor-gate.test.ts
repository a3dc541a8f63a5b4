import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { CorGate } from '../../daemon/cor-gate.js';

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

test.run();
