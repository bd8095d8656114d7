import fs from 'node:fs';

import test from 'ava';

import { MemoryError } from '../../../lib/errors';
import { MappedRegion } from '../../../lib/memory/mapped-region';
import { MADV_DONTNEED, native } from '../../../native';

const PAGE = 4096;

/** A 16-page region at guest address 1 MiB whose fd starts one page before it (mmap_offset 4096). */
function region() {
  const memfd = native.memfdCreate('mapped-region', 17 * PAGE);
  const r = new MappedRegion({ guestPhysAddr: 1 << 20, size: 16 * PAGE, userAddr: 0, mmapOffset: PAGE }, memfd);
  const view = r.views[0]!.subarray(r.mappingOffset, r.mappingOffset + r.size);
  view.fill(0x5a);
  return { r, view, memfd };
}

test('discard frees whole pages of the region and they read back as zeroes', (t) => {
  const { r, view, memfd } = region();
  t.teardown(() => r.release());
  const before = fs.fstatSync(memfd).blocks;
  r.discard(2 * PAGE, 3 * PAGE);
  t.is(before - fs.fstatSync(memfd).blocks, (3 * PAGE) / 512);
  t.true(view.subarray(2 * PAGE, 5 * PAGE).every((b) => b === 0));
  t.true(view.subarray(0, 2 * PAGE).every((b) => b === 0x5a));
  t.true(view.subarray(5 * PAGE).every((b) => b === 0x5a));
  r.discard(0, PAGE, MADV_DONTNEED);
  t.is(view[0], 0x5a, 'DONTNEED keeps the shared pages');
});

test('discard refuses ranges that are outside the region or not whole pages', (t) => {
  const { r, view } = region();
  t.teardown(() => r.release());
  for (const [offset, length] of [
    [15 * PAGE, 2 * PAGE],
    [16 * PAGE, PAGE],
    [-PAGE, PAGE],
    [100, PAGE],
    [0, 100],
    [0, Number.MAX_SAFE_INTEGER + 1],
  ] as const) {
    const err = t.throws(() => r.discard(offset, length), { instanceOf: MemoryError });
    t.is(err?.code, 'GUEST_ADDR_OVERFLOW', `${offset} + ${length}`);
  }
  t.true(view.every((b) => b === 0x5a), 'nothing was released');
});
