/**
 * native.getrandom fills exactly the asked range of a buffer (guest memory in the rng daemon) and
 * refuses ranges outside it, also on a view detached by munmap.
 */
import test from 'ava';

import { native } from '../../native';

test('fills exactly view[offset .. offset + length) with random bytes', (t) => {
  const view = new Uint8Array(64 * 1024);
  t.is(native.getrandom(view, 4096, 32 * 1024), 32 * 1024);
  t.true(view.subarray(0, 4096).every((b) => b === 0), 'nothing before the range');
  t.true(view.subarray(4096 + 32 * 1024).every((b) => b === 0), 'nothing after the range');
  const filled = view.subarray(4096, 4096 + 32 * 1024);
  const zeros = filled.reduce((n, b) => n + (b === 0 ? 1 : 0), 0);
  t.true(zeros < (filled.length / 256) * 1.5, `${zeros} zero bytes of ${filled.length}`);
  t.is(native.getrandom(view, 0, 0), 0, 'an empty request');
});

test('a range outside the view is a RangeError and nothing is written', (t) => {
  const view = new Uint8Array(16);
  t.throws(() => native.getrandom(view, 8, 9), { instanceOf: RangeError });
  t.throws(() => native.getrandom(view, 17, 0), { instanceOf: RangeError });
  t.throws(() => native.getrandom(view, -1, 4), { instanceOf: RangeError });
  t.throws(() => native.getrandom(new Uint16Array(8) as unknown as Uint8Array, 0, 4), { instanceOf: TypeError });
  t.true(view.every((b) => b === 0));
});

test('a view of guest memory detached by munmap takes no bytes', (t) => {
  const fd = native.memfdCreate('getrandom-test', 4096);
  const mapping = native.mmap(fd, 4096, 0, true);
  const view = mapping.views[0]!;
  t.is(native.getrandom(view, 0, 4096), 4096);
  native.munmap(mapping.id);
  native.close(fd);
  t.is(view.length, 0);
  t.throws(() => native.getrandom(view, 0, 1), { instanceOf: RangeError });
});
