import fs from 'node:fs';

import test from 'ava';

import { MADV_DONTNEED, MADV_REMOVE, native } from '../../native';
import { nativeError } from './helpers';

const PAGE = 4096;
const PAGES = 16;

function filled() {
  const memfd = native.memfdCreate('reclaim', PAGES * PAGE);
  const mapping = native.mmap(memfd, PAGES * PAGE, 0, true);
  const view = mapping.views[0]!;
  view.fill(0xa5);
  return {
    memfd,
    mapping,
    view,
    free() {
      native.munmap(mapping.id);
      native.close(memfd);
    },
  };
}

/** 512-byte blocks the memfd holds (st_blocks). */
function blocks(fd: number): number {
  return fs.fstatSync(fd).blocks;
}

test('MADV_REMOVE zeroes a range of a memfd mapping and frees its pages', (t) => {
  const m = filled();
  t.teardown(() => m.free());
  const before = blocks(m.memfd);
  t.true(before >= (PAGES * PAGE) / 512);

  native.madvise(m.mapping.id, 4 * PAGE, 8 * PAGE, MADV_REMOVE);
  t.is(before - blocks(m.memfd), (8 * PAGE) / 512, 'eight pages given back');
  t.true(m.view.subarray(4 * PAGE, 12 * PAGE).every((b) => b === 0), 'the range reads as zeroes');
  t.true(m.view.subarray(0, 4 * PAGE).every((b) => b === 0xa5), 'before the range: untouched');
  t.true(m.view.subarray(12 * PAGE).every((b) => b === 0xa5), 'after the range: untouched');
  const fromFile = Buffer.alloc(PAGE);
  fs.readSync(m.memfd, fromFile, 0, PAGE, 5 * PAGE);
  t.true(fromFile.every((b) => b === 0), 'the file has a hole there');
});

test('MADV_DONTNEED on a shared mapping keeps the data in the file', (t) => {
  // Why the balloon needs MADV_REMOVE for shared guest memory: DONTNEED only drops this mapping's
  // page table entries, the memfd keeps the pages.
  const m = filled();
  t.teardown(() => m.free());
  const before = blocks(m.memfd);
  native.madvise(m.mapping.id, 0, PAGES * PAGE, MADV_DONTNEED);
  t.is(blocks(m.memfd), before);
  t.true(m.view.every((b) => b === 0xa5));
});

test('madvise refuses ranges outside the mapping, unknown mappings and other advice', (t) => {
  const m = filled();
  t.teardown(() => m.free());
  t.throws(() => native.madvise(m.mapping.id, 15 * PAGE, 2 * PAGE, MADV_REMOVE), { instanceOf: RangeError });
  t.throws(() => native.madvise(m.mapping.id, 17 * PAGE, 0, MADV_REMOVE), { instanceOf: RangeError });
  t.throws(() => native.madvise(m.mapping.id, 0, PAGE, 100 /* MADV_HWPOISON */), { instanceOf: RangeError });
  t.is(nativeError(() => native.madvise(m.mapping.id, 100, PAGE, MADV_REMOVE)).code, 'EINVAL', 'unaligned start');
  t.true(m.view.every((b) => b === 0xa5), 'nothing was released');
  native.munmap(m.mapping.id);
  t.throws(() => native.madvise(m.mapping.id, 0, PAGE, MADV_REMOVE), { instanceOf: RangeError });
});
