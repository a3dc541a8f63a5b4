/**
 * The engine's refusals: an awaited operation must reject with an error of class `cls` whose
 * message matches `re` and is one line (the CLI prints it as is).
 */
import * as assert from 'uvu/assert';

export async function rejectsOneLine<E extends Error>(p: Promise<unknown>, cls: new (...a: any[]) => E, re: RegExp, what: string): Promise<E> {
  try {
    await p;
  } catch (err) {
    assert.instance(err, cls, `${what}: expected a ${cls.name}, got ${(err as Error)?.stack ?? err}`);
    const e = err as E;
    assert.match(e.message, re, what);
    assert.not.match(e.message, /[\r\n]/, `${what}: one line`);
    return e;
  }
  assert.unreachable(`${what}: expected a refusal matching ${re}`);
  throw new Error('unreachable');
}
