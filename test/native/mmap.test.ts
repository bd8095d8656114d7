import fs from 'node:fs';

import test from 'ava';

import { MAP_VIEW_SLACK, MAP_VIEW_STRIDE, native } from '../../native';
import { fdCount, mappingCount, nativeError } from './helpers';

test.serial('1000 mmap/munmap cycles leave the fd and mapping counts flat', (t) => {
  const fd = native.memfdCreate('vhostd-cycles', 1 << 16);
  const fds = fdCount();
  const keep = native.mmap(fd, 1 << 16, 0, false);
  t.is(mappingCount('memfd:vhostd-cycles'), 1, 'mappings of the memfd are visible');
  for (let i = 0; i < 1000; i++) {
    const m = native.mmap(fd, 1 << 16, 0, true);
    m.views[0]![i % (1 << 16)] = i & 0xff;
    native.munmap(m.id);
  }
  t.is(fdCount(), fds);
  t.is(mappingCount('memfd:vhostd-cycles'), 1, 'only the one kept');
  native.munmap(keep.id);
  t.is(mappingCount('memfd:vhostd-cycles'), 0);
  native.close(fd);
});

test('bytes written through one mapping of a memfd are seen through another', (t) => {
  const fd = native.memfdCreate('shared', 1 << 20);
  const a = native.mmap(fd, 1 << 20, 0, true);
  const b = native.mmap(fd, 1 << 20, 0, true);
  t.not(a.address, b.address);
  t.is(a.length, 1 << 20);
  t.is(a.views.length, 1);
  t.is(a.views[0]!.length, 1 << 20);
  a.views[0]!.set([1, 2, 3, 4], 4096);
  t.deepEqual([...b.views[0]!.subarray(4096, 4100)], [1, 2, 3, 4]);
  b.views[0]![(1 << 20) - 1] = 0x5a;
  t.is(a.views[0]![(1 << 20) - 1], 0x5a);
  native.munmap(a.id);
  native.munmap(b.id);
  native.close(fd);
});

test('a mapping at a file offset starts at that offset', (t) => {
  const fd = native.memfdCreate('offset', 3 * 4096);
  const whole = native.mmap(fd, 3 * 4096, 0, true);
  const tail = native.mmap(fd, 4096, 2 * 4096, false);
  whole.views[0]![2 * 4096 + 10] = 99;
  t.is(tail.views[0]![10], 99);
  native.munmap(whole.id);
  native.munmap(tail.id);
  native.close(fd);
});

test('after munmap the views are detached (length 0), munmap is idempotent', (t) => {
  const fd = native.memfdCreate('detach', 8192);
  const m = native.mmap(fd, 8192, 0, true);
  const view = m.views[0]!;
  const sub = view.subarray(100, 200);
  const buffer = view.buffer;
  native.munmap(m.id);
  t.is(view.length, 0);
  t.is(sub.length, 0);
  t.is(buffer.byteLength, 0);
  t.is(view[0], undefined, 'reads no longer reach the unmapped memory');
  t.notThrows(() => native.munmap(m.id));
  native.close(fd);
});

test('views cover 1 GiB strides and extend MAP_VIEW_SLACK past them, clipped at the end', (t) => {
  // A sparse memfd: nothing is allocated except the pages touched.
  const length = 2 * MAP_VIEW_STRIDE + (1 << 20);
  const fd = native.memfdCreate('large', length);
  const m = native.mmap(fd, length, 0, true);
  t.is(m.views.length, 3);
  t.is(m.views[0]!.length, MAP_VIEW_STRIDE + MAP_VIEW_SLACK);
  t.is(m.views[1]!.length, MAP_VIEW_STRIDE + (1 << 20), 'clipped at the end of the mapping');
  t.is(m.views[2]!.length, 1 << 20);
  // The slack of view 0 is the start of view 1.
  m.views[0]![MAP_VIEW_STRIDE + 5] = 42;
  t.is(m.views[1]![5], 42);
  m.views[2]![(1 << 20) - 1] = 7;
  t.is(m.views[1]![MAP_VIEW_STRIDE + (1 << 20) - 1], 7);
  native.munmap(m.id);
  t.true(m.views.every((v) => v.length === 0));
  native.close(fd);
});

test('a mapping of exactly one stride has one view', (t) => {
  const fd = native.memfdCreate('stride', MAP_VIEW_STRIDE);
  const m = native.mmap(fd, MAP_VIEW_STRIDE, 0, false);
  t.is(m.views.length, 1);
  t.is(m.views[0]!.length, MAP_VIEW_STRIDE);
  native.munmap(m.id);
  native.close(fd);
});

test('mmap failures are NativeErrors from mmap', (t) => {
  const bad = nativeError(() => native.mmap(100000, 4096, 0, true));
  t.is(bad.code, 'EBADF');
  t.is(bad.syscall, 'mmap');
  const fd = native.memfdCreate('errors', 8192);
  t.is(nativeError(() => native.mmap(fd, 4096, 100, true)).code, 'EINVAL', 'unaligned offset');
  t.is(nativeError(() => native.mmap(fd, 0, 0, true)).code, 'EINVAL', 'empty mapping');
  t.throws(() => native.mmap(fd, -1, 0, true), { instanceOf: RangeError });
  t.throws(() => native.mmap(fd, 4096, 0, 1 as unknown as boolean), { instanceOf: TypeError });
  native.close(fd);
});

test('a read-only mapping of a read-only fd works; a writable one is refused', (t) => {
  const fd = native.memfdCreate('ro', 4096);
  const rw = native.mmap(fd, 4096, 0, true);
  rw.views[0]![0] = 1;
  // Reopen read-only through /proc.
  const ro = fs.openSync(`/proc/self/fd/${fd}`, 'r');
  const m = native.mmap(ro, 4096, 0, false);
  t.is(m.views[0]![0], 1);
  t.is(nativeError(() => native.mmap(ro, 4096, 0, true)).code, 'EACCES');
  native.munmap(m.id);
  native.munmap(rw.id);
  fs.closeSync(ro);
  native.close(fd);
});

test('the address is the mapping base: distinct per mapping, page aligned', (t) => {
  const fd = native.memfdCreate('addr', 4096 * 4);
  const m = native.mmap(fd, 4096 * 4, 0, true);
  t.true(Number.isSafeInteger(m.address));
  t.is(m.address % 4096, 0);
  native.munmap(m.id);
  native.close(fd);
});
