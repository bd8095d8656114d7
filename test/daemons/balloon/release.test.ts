/**
 * PageReleaser on its own, under both executors: ranges of a memfd region are punched (the fd's
 * blocks drop, the bytes read back as zeroes); a range the host refuses is counted as failed and
 * logged once, and the request still completes, so the balloon's buffer is used either way. Where
 * fallocate is refused (EOPNOTSUPP), the madvise(MADV_REMOVE) fallback frees the mapped pages.
 */
import fs from 'node:fs';
import os from 'node:os';

import test from 'ava';

import type { ReleaseRange } from '../../../daemons/balloon/inflate-deflate';
import { PageReleaser, type ReleaseResult } from '../../../daemons/balloon/release';
import { ThreadPoolExecutor } from '../../../lib/io/thread-pool-executor';
import { chooseExecutor } from '../../../lib/io/choose-executor';
import { NullExecutor, type ExecutorFactory } from '../../../lib/io/executor';
import type { GuestRegion } from '../../../lib/memory/guest-memory';
import { mapGuestMemory } from '../../../lib/memory/mapped-region';
import { silentLogger, type Logger } from '../../../lib/runtime/logger';
import { native } from '../../../native';

const PAGE = 4096;

const EXECUTORS: [string, ExecutorFactory][] = [
  ['io_uring (or what chooseExecutor picks)', chooseExecutor(silentLogger).create],
  ['thread pool', (capacity, sink) => new ThreadPoolExecutor(capacity, sink)],
];

function release(releaser: PageReleaser, ranges: ReleaseRange[]): Promise<ReleaseResult> {
  const done = new Promise<ReleaseResult>((resolve) => releaser.release(ranges, resolve));
  releaser.submit();
  return done;
}

for (const [name, createExecutor] of EXECUTORS) {
  test(`${name}: ranges of a memfd region are punched out`, async (t) => {
    const fd = native.memfdCreate('vhostd-release-test', 64 * PAGE);
    const memory = mapGuestMemory([{ guestPhysAddr: 0x10_0000, size: 60 * PAGE, userAddr: 0x7f00_0000_0000, mmapOffset: 4 * PAGE }], [fd]);
    const region = memory.regions[0]!;
    const releaser = new PageReleaser(createExecutor, 8, silentLogger);
    try {
      const view = region.views[0]!;
      view.fill(0xab, region.mappingOffset, region.mappingOffset + 60 * PAGE);
      const before = fs.fstatSync(region.fd!).blocks * 512;
      const result = await release(releaser, [
        { region, offset: 0, length: 2 * PAGE },
        { region, offset: 10 * PAGE, length: 8 * PAGE },
      ]);
      t.deepEqual(result, { released: 10 * PAGE, failed: 0 });
      t.is(fs.fstatSync(region.fd!).blocks * 512, before - 10 * PAGE);
      const at = (page: number) => view[region.mappingOffset + page * PAGE]!;
      t.deepEqual([at(0), at(1), at(2), at(10), at(17), at(18)], [0, 0, 0xab, 0, 0, 0xab]);
      t.deepEqual(await release(releaser, []), { released: 0, failed: 0 }, 'nothing to release completes at once');
      await releaser.drained();
    } finally {
      releaser.close();
      memory.close();
    }
  });

  test(`${name}: a range the host refuses is counted, logged once, and the request completes`, async (t) => {
    // fallocate on a procfs file is EOPNOTSUPP; the fallback (madvise) needs a mapped region, which
    // this one is not: the range fails.
    const fd = fs.openSync('/proc/self/comm', 'w');
    const warnings: string[] = [];
    const logger: Logger = { ...silentLogger, warn: (message) => warnings.push(message) };
    const region: GuestRegion = {
      guestPhysAddr: 0,
      size: 2 * PAGE,
      userAddr: 0,
      mappingOffset: 0,
      views: [],
      hostAddress: 0,
      fd,
      mmapOffset: 0,
      pageSize: PAGE,
      retain() {
        return this;
      },
      release() {},
    };
    const releaser = new PageReleaser(createExecutor, 8, logger);
    try {
      const result = await release(releaser, [
        { region, offset: 0, length: PAGE },
        { region, offset: PAGE, length: PAGE },
      ]);
      t.deepEqual(result, { released: 0, failed: 2 });
      t.is(warnings.length, 1, warnings.join(' | '));
      await releaser.drained();
    } finally {
      releaser.close();
      fs.closeSync(fd);
    }
  });
}

test('fallocate refused (EOPNOTSUPP): the madvise(MADV_REMOVE) fallback frees the mapped pages of the region', async (t) => {
  // A file system without hole punching answers fallocate(PUNCH_HOLE) with EOPNOTSUPP: this executor
  // answers every op so, and the fallback runs on a real memfd mapping.
  const refusing: ExecutorFactory = (capacity, sink) =>
    new NullExecutor(capacity, (userData, results, count) => {
      results.fill(-os.constants.errno.EOPNOTSUPP, 0, count);
      sink(userData, results, count);
    });
  const fd = native.memfdCreate('vhostd-release-fallback', 32 * PAGE);
  const memory = mapGuestMemory([{ guestPhysAddr: 0, size: 32 * PAGE, userAddr: 0x7f00_0000_0000, mmapOffset: 0 }], [fd]);
  const region = memory.regions[0]!;
  const warnings: string[] = [];
  const releaser = new PageReleaser(refusing, 8, { ...silentLogger, warn: (message) => warnings.push(message) });
  try {
    const view = region.views[0]!;
    view.fill(0x5a, region.mappingOffset, region.mappingOffset + 32 * PAGE);
    const before = fs.fstatSync(region.fd!).blocks * 512;
    const result = await release(releaser, [
      { region, offset: 4 * PAGE, length: 4 * PAGE },
      { region, offset: 20 * PAGE, length: PAGE },
    ]);
    t.deepEqual(result, { released: 5 * PAGE, failed: 0 });
    t.is(fs.fstatSync(region.fd!).blocks * 512, before - 5 * PAGE, 'the memfd gave the pages back');
    const at = (page: number) => view[region.mappingOffset + page * PAGE]!;
    t.deepEqual([at(3), at(4), at(7), at(8), at(20), at(21)], [0x5a, 0, 0, 0x5a, 0, 0x5a]);
    t.deepEqual(warnings, [], 'a fallback that works is no failure');
    await releaser.drained();
  } finally {
    releaser.close();
    memory.close();
  }
});
