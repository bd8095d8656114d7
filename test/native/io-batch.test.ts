/**
 * transferBatch (preadv2/pwritev2 of an IoBatch on the calling thread) and fstatfs: data moves
 * between a file and mapped memory without a copy, errors are per-request -errno, a bad batch is
 * refused before any byte moves, RWF_NOWAIT reaches the kernel.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import test from 'ava';

import { MEMORY_FS_MAGIC } from '../../lib/io/backing-file';
import { IORING_OP, native, RWF_NOWAIT, type IoBatch } from '../../native';
import { makeBatch, mappedMemfd, nativeError, PER_REQUEST_ARRAYS, shortened, tempFile } from './helpers';

const PAGE = 4096;
const { EAGAIN, EBADF, EFAULT } = os.constants.errno;

/** Request `i` of `batch`: `opcode` on `fd` at `offset` over `iovecs` (address, length) from iovec `at`. */
function put(batch: IoBatch, i: number, opcode: number, fd: number, offset: number, at: number, iovecs: [number, number][], rwFlags = 0): void {
  batch.opcode[i] = opcode;
  batch.fd[i] = fd;
  batch.offset[i] = offset;
  batch.arg[i] = rwFlags;
  batch.iovStart[i] = at;
  batch.iovCount[i] = iovecs.length;
  iovecs.forEach(([base, len], k) => {
    batch.iovBase[at + k] = base;
    batch.iovLen[at + k] = len;
  });
}

test('a batch of writes and reads moves data between the file and mapped memory, one result per request', (t) => {
  const mem = mappedMemfd(16 * PAGE);
  const { fd, file } = tempFile(8 * PAGE);
  for (let i = 0; i < 3 * PAGE; i++) mem.view[i] = (i * 13 + 5) & 0xff;
  const batch = makeBatch(3, 4);
  const result = new Int32Array(3);
  // Two iovecs written at PAGE, then read back into pages 8.. in the same call (requests run in order),
  // and a read across the end of the file.
  put(batch, 0, IORING_OP.WRITEV, fd, PAGE, 0, [[mem.address, PAGE], [mem.address + PAGE, 2 * PAGE]]);
  put(batch, 1, IORING_OP.READV, fd, PAGE, 2, [[mem.address + 8 * PAGE, 3 * PAGE]]);
  put(batch, 2, IORING_OP.READV, fd, 7 * PAGE, 3, [[mem.address + 12 * PAGE, 2 * PAGE]]);
  native.transferBatch(batch, 3, result);
  t.deepEqual([...result], [3 * PAGE, 3 * PAGE, PAGE], 'the read past the end is short');
  t.true(fs.readFileSync(file).subarray(PAGE, 4 * PAGE).equals(Buffer.from(mem.view.subarray(0, 3 * PAGE))));
  t.true(Buffer.from(mem.view.subarray(8 * PAGE, 11 * PAGE)).equals(Buffer.from(mem.view.subarray(0, 3 * PAGE))));
  fs.closeSync(fd);
  mem.free();
});

test('errors are per request, as -errno; the other requests still run', (t) => {
  const mem = mappedMemfd(2 * PAGE);
  const { fd, file } = tempFile(2 * PAGE);
  mem.view.fill(0x5a, 0, PAGE);
  const batch = makeBatch(3, 3);
  const result = new Int32Array(3);
  put(batch, 0, IORING_OP.READV, 1_000_000, 0, 0, [[mem.address, PAGE]]);
  put(batch, 1, IORING_OP.WRITEV, fd, 0, 1, [[8, PAGE]]); // address 8 is not mapped
  put(batch, 2, IORING_OP.WRITEV, fd, PAGE, 2, [[mem.address, PAGE]]);
  native.transferBatch(batch, 3, result);
  t.deepEqual([...result], [-EBADF, -EFAULT, PAGE]);
  t.true(fs.readFileSync(file).subarray(PAGE).every((b) => b === 0x5a));
  fs.closeSync(fd);
  mem.free();
});

test('a bad batch is refused with a RangeError before any byte moves', (t) => {
  const mem = mappedMemfd(PAGE);
  const { fd, file } = tempFile(PAGE);
  mem.view.fill(0xee);
  const batch = makeBatch(2, 2);
  const result = new Int32Array(2);
  const good = () => put(batch, 0, IORING_OP.WRITEV, fd, 0, 0, [[mem.address, PAGE]]);
  good();
  put(batch, 1, IORING_OP.WRITEV, fd, 0, 1, [[mem.address, PAGE]]);
  const refuse = (why: string, count = 2, out = result) => {
    t.throws(() => native.transferBatch(batch, count, out), { instanceOf: RangeError }, why);
    t.true(fs.readFileSync(file).every((b) => b === 0), `${why}: nothing written`);
  };
  batch.iovCount[1] = 2; // iovecs 1..2 of a 2-entry array
  refuse('iovecs beyond the arrays');
  batch.iovCount[1] = 1;
  batch.iovLen[1] = 0.5;
  refuse('a fractional length');
  batch.iovLen[1] = PAGE;
  batch.offset[1] = -2;
  refuse('an offset below -1');
  batch.offset[1] = 0;
  batch.arg[1] = 1; // RWF_HIPRI: not accepted
  refuse('unknown RWF flags');
  batch.arg[1] = 0;
  batch.opcode[1] = IORING_OP.FSYNC;
  refuse('an opcode other than READV/WRITEV');
  batch.opcode[1] = IORING_OP.WRITEV;
  refuse('count beyond the batch arrays', 3);
  refuse('count beyond the result array', 2, new Int32Array(1));
  for (const key of PER_REQUEST_ARRAYS) {
    t.throws(() => native.transferBatch(shortened(batch, key, 1), 2, result), { instanceOf: RangeError }, `a ${key} array shorter than count`);
  }
  t.throws(() => native.transferBatch({ ...batch, iovLen: new Uint32Array(2) } as unknown as IoBatch, 1, result), { instanceOf: TypeError });
  native.transferBatch(batch, 2, result);
  t.deepEqual([...result], [PAGE, PAGE], 'the same batch, fixed, runs');
  fs.closeSync(fd);
  mem.free();
});

test('RWF_NOWAIT reaches the kernel: a read that would wait fails with EAGAIN at once', (t) => {
  const mem = mappedMemfd(PAGE);
  const [reader, writer] = native.socketPair();
  const batch = makeBatch(1, 1);
  const result = new Int32Array(1);
  // A socket without data: a plain read would block forever, RWF_NOWAIT answers EAGAIN.
  put(batch, 0, IORING_OP.READV, reader, -1, 0, [[mem.address, PAGE]], RWF_NOWAIT);
  native.setNonBlocking(reader, false);
  native.transferBatch(batch, 1, result);
  t.is(result[0], -EAGAIN);
  native.close(reader);
  native.close(writer);
  mem.free();
});

test('fstatfs tells tmpfs from other file systems; a bad fd throws with its errno', (t) => {
  const shm = path.join('/dev/shm', `vhostd-io-batch-${process.pid}`);
  fs.writeFileSync(shm, '');
  const fd = fs.openSync(shm, 'r');
  t.is(native.fstatfs(fd), MEMORY_FS_MAGIC.TMPFS);
  fs.closeSync(fd);
  fs.rmSync(shm);
  const proc = fs.openSync('/proc/self/status', 'r');
  t.is(native.fstatfs(proc), 0x9fa0, 'PROC_SUPER_MAGIC');
  fs.closeSync(proc);
  const err = nativeError(() => native.fstatfs(1_000_000));
  t.is(err.code, 'EBADF');
  t.is(err.errno, EBADF);
  t.is(err.syscall, 'fstatfs');
});
