/**
 * IoEngine over the real executors (io_uring and the thread-pool fallback) on real files and pipes,
 * from memfd-backed memory as guest memory would be.
 */
import fs from 'node:fs';

import test from 'ava';

import { IoEngine, RESUBMIT_SHORT } from '../../../lib/io/engine';
import type { ExecutorFactory } from '../../../lib/io/executor';
import { IoUringExecutor } from '../../../lib/io/io-uring-executor';
import { ThreadPoolExecutor } from '../../../lib/io/thread-pool-executor';
import { silentLogger } from '../../../lib/runtime/logger';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, IORING_FSYNC_DATASYNC, IORING_OP, OFFSET_CURRENT, native } from '../../../native';
import { fdCount, mappedMemfd, tempFile } from '../../native/helpers';

const PAGE = 4096;

const executors: [string, ExecutorFactory][] = [
  ['io_uring', (capacity, sink) => new IoUringExecutor(capacity, sink, silentLogger)],
  ['thread-pool', (capacity, sink) => new ThreadPoolExecutor(capacity, sink)],
];

/** An engine whose completions resolve `next(n)` once n have arrived (map userData → result). */
function engineOn(create: ExecutorFactory, capacity = 8) {
  const results = new Map<number, number>();
  let want = 0;
  let wake: (() => void) | null = null;
  const engine = new IoEngine(create, capacity, (userData, result, count) => {
    for (let i = 0; i < count; i++) results.set(userData[i]!, result[i]!);
    if (wake !== null && results.size >= want) wake();
  });
  return {
    engine,
    /** Submit what is staged and wait until `n` results are in; returns them and clears. */
    async run(n: number): Promise<Map<number, number>> {
      engine.submit();
      if (results.size < n) {
        want = n;
        await new Promise<void>((resolve) => (wake = resolve));
        wake = null;
      }
      const out = new Map(results);
      results.clear();
      return out;
    },
  };
}

function stage(engine: IoEngine, opcode: typeof IORING_OP.READV | typeof IORING_OP.WRITEV, fd: number, offset: number, iovecs: [number, number][], userData: number, flags = RESUBMIT_SHORT): void {
  engine.reserveIovecs(iovecs.length);
  iovecs.forEach(([base, len], k) => {
    engine.iovBase[engine.iovUsed + k] = base;
    engine.iovLen[engine.iovUsed + k] = len;
  });
  engine.addReadWrite(opcode, fd, offset, iovecs.length, userData, flags);
}

for (const [kind, create] of executors) {
  test.serial(`${kind}: write, read back, fdatasync, punch a hole, read across the end of the file`, async (t) => {
    const before = fdCount();
    const { engine, run } = engineOn(create);
    t.is(engine.kind, kind);
    const mem = mappedMemfd(16 * PAGE);
    const { fd, file } = tempFile(4 * PAGE);
    for (let i = 0; i < 2 * PAGE; i++) mem.view[i] = (i * 13 + 5) & 0xff;

    stage(engine, IORING_OP.WRITEV, fd, PAGE, [[mem.address, PAGE], [mem.address + PAGE, PAGE]], 1);
    engine.addFsync(fd, IORING_FSYNC_DATASYNC, 2);
    const written = await run(2);
    t.is(written.get(1), 2 * PAGE);
    t.is(written.get(2), 0);
    t.true(fs.readFileSync(file).subarray(PAGE, 3 * PAGE).equals(Buffer.from(mem.view.subarray(0, 2 * PAGE))));

    stage(engine, IORING_OP.READV, fd, PAGE, [[mem.address + 8 * PAGE, 2 * PAGE]], 3);
    t.is((await run(1)).get(3), 2 * PAGE);
    t.deepEqual(mem.view.subarray(8 * PAGE, 10 * PAGE), mem.view.subarray(0, 2 * PAGE));

    engine.addFallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, PAGE, PAGE, 4);
    t.is((await run(1)).get(4), 0);
    const after = fs.readFileSync(file);
    t.is(after.length, 4 * PAGE);
    t.true(after.subarray(PAGE, 2 * PAGE).every((b) => b === 0));

    // Three pages asked from 3 pages into a 4-page file: the rest is past the end.
    stage(engine, IORING_OP.READV, fd, 3 * PAGE, [[mem.address, 3 * PAGE]], 5);
    t.is((await run(1)).get(5), PAGE, 'the bytes up to the end of the file');

    await engine.drained();
    t.is(engine.inFlight, 0);
    engine.close();
    fs.closeSync(fd);
    mem.free();
    t.is(fdCount(), before, 'no descriptor left behind');
  });

  test.serial(`${kind}: READV/WRITEV at OFFSET_CURRENT on a socket (no file position, like a TAP fd)`, async (t) => {
    const { engine, run } = engineOn(create);
    const mem = mappedMemfd(PAGE);
    const [readEnd, writeEnd] = native.socketPair();
    mem.view.set([1, 2, 3, 4, 5], 0);
    stage(engine, IORING_OP.WRITEV, writeEnd, OFFSET_CURRENT, [[mem.address, 3], [mem.address + 3, 2]], 1, 0);
    t.is((await run(1)).get(1), 5);
    // A read asking for more than the socket holds: without RESUBMIT_SHORT the short read is the result.
    stage(engine, IORING_OP.READV, readEnd, OFFSET_CURRENT, [[mem.address + 100, 64]], 2, 0);
    t.is((await run(1)).get(2), 5);
    t.deepEqual([...mem.view.subarray(100, 105)], [1, 2, 3, 4, 5]);
    engine.close();
    native.close(readEnd);
    native.close(writeEnd);
    mem.free();
  });
}

test.serial('io_uring: more ops than ring entries all complete (the submission queue refills as completions free it)', async (t) => {
  const { engine, run } = engineOn(executors[0]![1], 2);
  const mem = mappedMemfd(64 * PAGE);
  const { fd, file } = tempFile(0);
  const n = 48;
  for (let i = 0; i < n; i++) {
    mem.view.fill(i + 1, i * PAGE, (i + 1) * PAGE);
    stage(engine, IORING_OP.WRITEV, fd, i * PAGE, [[mem.address + i * PAGE, PAGE]], i);
  }
  const done = await run(n);
  t.is(done.size, n);
  t.true([...done.values()].every((r) => r === PAGE));
  const data = fs.readFileSync(file);
  for (let i = 0; i < n; i++) t.is(data[i * PAGE + 100], i + 1);
  engine.close();
  fs.closeSync(fd);
  mem.free();
});
