import fs from 'node:fs';

import test from 'ava';

import { IORING_OP, POLL_READABLE, native } from '../../native';
import { collect, fdCount, makeBatch, mappedMemfd, nativeError, PER_REQUEST_ARRAYS, shortened, tempFile } from './helpers';

const PAGE = 4096;

test('writes a file from mmap-ed memfd memory and reads it back elsewhere (zero copy), fsync, punch hole', async (t) => {
  const ring = native.createIoUring(8);
  const mem = mappedMemfd(16 * PAGE);
  const { fd, file } = tempFile(8 * PAGE);
  for (let i = 0; i < 2 * PAGE; i++) mem.view[i] = (i * 7 + 3) & 0xff;

  // WRITEV of two iovecs (page 0 and page 1 of memory) to file offset PAGE.
  const batch = makeBatch(4, 4);
  batch.opcode[0] = IORING_OP.WRITEV;
  batch.fd[0] = fd;
  batch.offset[0] = PAGE;
  batch.iovStart[0] = 0;
  batch.iovCount[0] = 2;
  batch.iovBase[0] = mem.address;
  batch.iovLen[0] = PAGE;
  batch.iovBase[1] = mem.address + PAGE;
  batch.iovLen[1] = PAGE;
  batch.userData[0] = 11;
  t.is(ring.submit(batch, 1), 1);
  t.deepEqual([...(await collect(ring, 1))], [[11, 2 * PAGE]]);
  const onDisk = fs.readFileSync(file);
  t.true(onDisk.subarray(PAGE, 3 * PAGE).equals(Buffer.from(mem.view.subarray(0, 2 * PAGE))));

  // READV back into pages 8..9, plus FSYNC (fdatasync flag) in the same batch.
  batch.opcode[0] = IORING_OP.READV;
  batch.iovStart[0] = 2;
  batch.iovCount[0] = 1;
  batch.iovBase[2] = mem.address + 8 * PAGE;
  batch.iovLen[2] = 2 * PAGE;
  batch.userData[0] = 21;
  batch.opcode[1] = IORING_OP.FSYNC;
  batch.fd[1] = fd;
  batch.arg[1] = 1; // IORING_FSYNC_DATASYNC
  batch.userData[1] = 22;
  t.is(ring.submit(batch, 2), 2);
  const done = await collect(ring, 2);
  t.is(done.get(21), 2 * PAGE);
  t.is(done.get(22), 0);
  t.deepEqual(mem.view.subarray(8 * PAGE, 10 * PAGE), mem.view.subarray(0, 2 * PAGE));

  // FALLOCATE(PUNCH_HOLE | KEEP_SIZE) over the first written page: zeroes, same size.
  batch.opcode[0] = IORING_OP.FALLOCATE;
  batch.offset[0] = PAGE;
  batch.arg[0] = 3;
  batch.iovStart[0] = 3;
  batch.iovLen[3] = PAGE;
  batch.userData[0] = 31;
  t.is(ring.submit(batch, 1), 1);
  t.is((await collect(ring, 1)).get(31), 0);
  const after = fs.readFileSync(file);
  t.is(after.length, 8 * PAGE);
  t.true(after.subarray(PAGE, 2 * PAGE).every((b) => b === 0));
  t.true(after.subarray(2 * PAGE, 3 * PAGE).equals(onDisk.subarray(2 * PAGE, 3 * PAGE)));

  ring.close();
  fs.closeSync(fd);
  mem.free();
});

test('errors come back as negative results', async (t) => {
  const ring = native.createIoUring(4);
  const mem = mappedMemfd(PAGE);
  const { fd } = tempFile(PAGE);
  const batch = makeBatch(3, 3);
  // Bad fd.
  batch.opcode[0] = IORING_OP.READV;
  batch.fd[0] = 100000;
  batch.iovCount[0] = 1;
  batch.iovStart[0] = 0;
  batch.iovBase[0] = mem.address;
  batch.iovLen[0] = PAGE;
  batch.userData[0] = 1;
  // Bad address (page 0 is never mapped).
  batch.opcode[1] = IORING_OP.WRITEV;
  batch.fd[1] = fd;
  batch.iovStart[1] = 1;
  batch.iovCount[1] = 1;
  batch.iovBase[1] = 16;
  batch.iovLen[1] = PAGE;
  batch.userData[1] = 2;
  // Bad fallocate mode (PUNCH_HOLE without KEEP_SIZE).
  batch.opcode[2] = IORING_OP.FALLOCATE;
  batch.fd[2] = fd;
  batch.arg[2] = 2;
  batch.iovStart[2] = 2;
  batch.iovLen[2] = PAGE;
  batch.userData[2] = 3;
  t.is(ring.submit(batch, 3), 3, 'a failing request does not hold back the others');
  const done = await collect(ring, 3);
  t.is(done.get(1), -9); // EBADF
  t.is(done.get(2), -14); // EFAULT
  t.is(done.get(3), -95); // EOPNOTSUPP
  ring.close();
  fs.closeSync(fd);
  mem.free();
});

test('more requests than SQ entries are all queued and complete (CQ overflow included)', async (t) => {
  const ring = native.createIoUring(4);
  const mem = mappedMemfd(64 * PAGE);
  const { fd, file } = tempFile(0);
  const n = 40;
  const batch = makeBatch(n, n);
  for (let i = 0; i < n; i++) {
    mem.view.fill(i, i * PAGE, (i + 1) * PAGE);
    batch.opcode[i] = IORING_OP.WRITEV;
    batch.fd[i] = fd;
    batch.offset[i] = i * PAGE;
    batch.iovStart[i] = i;
    batch.iovCount[i] = 1;
    batch.iovBase[i] = mem.address + i * PAGE;
    batch.iovLen[i] = PAGE;
    batch.userData[i] = 1000 + i;
  }
  t.is(ring.submit(batch, n), n);
  const done = await collect(ring, n);
  t.is(done.size, n);
  t.true([...done.values()].every((r) => r === PAGE));
  const data = fs.readFileSync(file);
  for (let i = 0; i < n; i++) t.is(data[i * PAGE + 17], i);
  ring.close();
  fs.closeSync(fd);
  mem.free();
});

test('iovec storage of one submit is not disturbed by the next (the kernel copied it)', async (t) => {
  const ring = native.createIoUring(8);
  const mem = mappedMemfd(4 * PAGE);
  const { fd, file } = tempFile(0);
  mem.view.fill(0xaa, 0, PAGE);
  mem.view.fill(0xbb, PAGE, 2 * PAGE);
  const batch = makeBatch(1, 1);
  batch.opcode[0] = IORING_OP.WRITEV;
  batch.fd[0] = fd;
  batch.iovCount[0] = 1;
  batch.iovLen[0] = PAGE;
  for (let i = 0; i < 2; i++) {
    batch.offset[0] = i * PAGE;
    batch.iovBase[0] = mem.address + i * PAGE;
    batch.userData[0] = i;
    t.is(ring.submit(batch, 1), 1);
    batch.iovBase.fill(0); // the JS arrays are reused at once
  }
  await collect(ring, 2);
  const data = fs.readFileSync(file);
  t.is(data[10], 0xaa);
  t.is(data[PAGE + 10], 0xbb);
  ring.close();
  fs.closeSync(fd);
  mem.free();
});

test('bindBatch + submitBound: the bound arrays are used until the next bind, with submit\'s checks', async (t) => {
  const ring = native.createIoUring(8);
  const mem = mappedMemfd(4 * PAGE);
  const { fd, file } = tempFile(0);
  mem.view.fill(0x11, 0, PAGE);
  mem.view.fill(0x22, PAGE, 2 * PAGE);
  t.throws(() => ring.submitBound(0), { instanceOf: TypeError }, 'nothing bound yet');
  const batch = makeBatch(1, 1);
  ring.bindBatch(batch);
  batch.opcode[0] = IORING_OP.WRITEV;
  batch.fd[0] = fd;
  batch.iovCount[0] = 1;
  batch.iovBase[0] = mem.address;
  batch.iovLen[0] = PAGE;
  batch.userData[0] = 7;
  t.is(ring.submitBound(1), 1, 'element writes after bindBatch are seen');
  t.deepEqual([...(await collect(ring, 1))], [[7, PAGE]]);
  // A replaced array is not seen until the batch is bound again.
  const bigger = new Float64Array(2);
  bigger[1] = mem.address + PAGE;
  batch.iovBase = bigger;
  batch.iovStart[0] = 1;
  batch.offset[0] = PAGE;
  t.throws(() => ring.submitBound(1), { instanceOf: RangeError }, 'iovStart 1 is beyond the bound iovBase');
  t.throws(() => ring.submitBound(2), { instanceOf: RangeError }, 'count beyond the bound arrays');
  batch.iovLen = new Float64Array([0, PAGE]);
  ring.bindBatch(batch);
  t.is(ring.submitBound(1), 1);
  t.deepEqual([...(await collect(ring, 1))], [[7, PAGE]]);
  const data = fs.readFileSync(file);
  t.is(data[10], 0x11);
  t.is(data[PAGE + 10], 0x22);
  t.throws(() => ring.bindBatch({ ...batch, fd: new Uint32Array(1) as unknown as Int32Array }), { instanceOf: TypeError });
  ring.close();
  t.is(nativeError(() => ring.submitBound(0)).code, 'EBADF');
  fs.closeSync(fd);
  mem.free();
});

test('ringFd is readable while completions wait and not once they are reaped', async (t) => {
  const ring = native.createIoUring(8);
  const { fd } = tempFile(0);
  t.true(ring.ringFd >= 0);
  t.not(ring.ringFd, ring.eventFd);
  const batch = makeBatch(2, 0);
  for (let i = 0; i < 2; i++) {
    batch.opcode[i] = IORING_OP.FSYNC;
    batch.fd[i] = fd;
    batch.userData[i] = i;
  }
  const ud = new Uint32Array(4);
  const res = new Int32Array(4);
  let reaped = 0;
  let wakeups = 0;
  await new Promise<void>((resolve) => {
    const watcher = native.watch(ring.ringFd, POLL_READABLE, () => {
      wakeups++;
      reaped += ring.reap(ud, res);
      if (reaped === 2) {
        // Level-triggered on the completion queue: empty now, so no further wakeup.
        setTimeout(() => {
          watcher.stop();
          resolve();
        }, 50);
      }
    });
    t.is(ring.submit(batch, 2), 2);
  });
  t.is(reaped, 2);
  t.true(wakeups <= 2, `${wakeups} wakeups`);
  ring.close();
  fs.closeSync(fd);
});

test('reap returns 0 when nothing completed and stops at the array length', async (t) => {
  const ring = native.createIoUring(8);
  const { fd } = tempFile(0);
  t.is(ring.reap(new Uint32Array(4), new Int32Array(4)), 0);
  const batch = makeBatch(3, 0);
  for (let i = 0; i < 3; i++) {
    batch.opcode[i] = IORING_OP.FSYNC;
    batch.fd[i] = fd;
    batch.userData[i] = i;
  }
  t.is(ring.submit(batch, 3), 3);
  await new Promise((resolve) => setTimeout(resolve, 100));
  const ud = new Uint32Array(2);
  const res = new Int32Array(2);
  t.is(ring.reap(ud, res), 2);
  t.is(ring.reap(ud, res), 1);
  t.is(ring.reap(ud, res), 0);
  ring.close();
  fs.closeSync(fd);
});

test('bad batches are refused before anything is queued', (t) => {
  const ring = native.createIoUring(4);
  const batch = makeBatch(2, 1);
  batch.opcode[0] = IORING_OP.FSYNC;
  batch.opcode[1] = 99;
  t.throws(() => ring.submit(batch, 2), { instanceOf: RangeError });
  t.throws(() => ring.submit(batch, 3), { instanceOf: RangeError }, 'count beyond the arrays');
  batch.opcode[1] = IORING_OP.READV;
  batch.iovStart[1] = 0;
  batch.iovCount[1] = 2;
  t.throws(() => ring.submit(batch, 2), { instanceOf: RangeError }, 'iovecs beyond iovBase');
  batch.iovCount[1] = 1;
  batch.iovBase[0] = 0.5;
  t.throws(() => ring.submit(batch, 2), { instanceOf: RangeError }, 'fractional address');
  t.throws(() => ring.submit({ ...batch, fd: new Uint32Array(2) as unknown as Int32Array }, 1), {
    instanceOf: TypeError,
  });
  t.is(ring.reap(new Uint32Array(4), new Int32Array(4)), 0, 'nothing was queued');
  ring.close();
});

test('every per-request array must cover count, in submit and submitBound: a shorter one refuses the batch', async (t) => {
  const ring = native.createIoUring(4);
  const { fd } = tempFile(0);
  const batch = makeBatch(2, 0);
  batch.opcode.fill(IORING_OP.FSYNC);
  batch.fd.fill(fd);
  batch.userData.set([1, 2]);
  for (const key of PER_REQUEST_ARRAYS) {
    const short = shortened(batch, key, 1);
    t.throws(() => ring.submit(short, 2), { instanceOf: RangeError }, `a ${key} array shorter than count`);
    ring.bindBatch(short);
    t.throws(() => ring.submitBound(2), { instanceOf: RangeError }, `a bound ${key} array shorter than count`);
  }
  t.is(ring.reap(new Uint32Array(4), new Int32Array(4)), 0, 'nothing was queued');
  t.is(ring.submit(batch, 2), 2, 'the whole batch runs');
  const done = await collect(ring, 2);
  t.deepEqual([done.get(1), done.get(2)], [0, 0], 'both fsyncs completed');
  ring.close();
  fs.closeSync(fd);
});

test.serial('close is idempotent, closes the eventfd, and later use throws EBADF', (t) => {
  const before = fdCount();
  const ring = native.createIoUring(4);
  t.true(ring.eventFd >= 0);
  t.is(fdCount(), before + 2, 'the ring fd and the eventfd');
  ring.close();
  ring.close();
  t.is(fdCount(), before);
  const err = nativeError(() => ring.submit(makeBatch(1, 1), 0));
  t.is(err.code, 'EBADF');
  t.is(nativeError(() => ring.reap(new Uint32Array(1), new Int32Array(1))).code, 'EBADF');
});

test('createIoUring with an invalid size throws from io_uring_setup', (t) => {
  const err = nativeError(() => native.createIoUring(0));
  t.is(err.code, 'EINVAL');
  t.is(err.syscall, 'io_uring_setup');
});
