/** Remote base sources are read-only (FORMAT.md §2: a base is never written). */
import * as assert from 'uvu/assert';

/** A base is never written: every write-side call fails with EROFS naming the source; flush is a no-op. */
export async function assertReadOnly(src: { path: string; write(b: Uint8Array, o: number): Promise<void>; zeroRange(o: number, l: number): Promise<void>; truncate(l: number): Promise<void>; flush(): Promise<void> }): Promise<void> {
  for (const op of [() => src.write(new Uint8Array(512), 0), () => src.zeroRange(0, 512), () => src.truncate(0)]) {
    const e = (await op().then(() => null, (x: Error) => x)) as (Error & { code?: string }) | null;
    assert.is(e?.code, 'EROFS');
    assert.ok(e!.message.startsWith(`${src.path}: a remote base is read-only`), e!.message);
  }
  await src.flush();
}
