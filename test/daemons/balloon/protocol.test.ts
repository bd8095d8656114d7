/**
 * The balloon behind the real protocol engine, driven by the test front-end playing Linux's
 * virtio_balloon over memfd guest memory (three regions with gaps): inflated and reported pages
 * really leave the host (the memfds' allocated blocks drop, the pages read back as zeroes), deflated
 * pages can be written again, hostile buffers are skipped without stopping the queue, the stats
 * buffer is held and handed back (also by GET_VRING_BASE), and the target travels through the config
 * space with a config change notification.
 */
import fs from 'node:fs';
import path from 'node:path';

import test, { type ExecutionContext } from 'ava';

import {
  BalloonDevice,
  VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
  VIRTIO_BALLOON_F_MUST_TELL_HOST,
  VIRTIO_BALLOON_F_REPORTING,
  VIRTIO_BALLOON_F_STATS_VQ,
} from '../../../daemons/balloon/device';
import { chooseExecutor } from '../../../lib/io/choose-executor';
import { silentLogger } from '../../../lib/runtime/logger';
import { BackendRequest } from '../../../lib/vhost-user/messages';
import { bit, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from '../../../lib/virtio/constants';
import { DEFAULT_LAYOUT, type Frontend, type FrontendRegion, type RegionLayout } from '../../helpers/frontend';
import { HUGE_PAGE_SIZE, hugePagesUnavailable, reserveHugePages } from '../../helpers/hugepages';
import { until } from '../../helpers/until';
import { TestServer } from '../../lib/vhost-user/harness';

const PAGE = 4096;
const TIMEOUT = 20_000;


function device(opts: { freePageReporting?: boolean; statsIntervalMs?: number; deflateOnOom?: boolean } = {}): BalloonDevice {
  return new BalloonDevice({
    targetPages: 0,
    statsIntervalMs: opts.statsIntervalMs ?? 0,
    deflateOnOom: opts.deflateOnOom ?? false,
    freePageReporting: opts.freePageReporting ?? false,
    queueSize: 256,
    createExecutor: chooseExecutor(silentLogger).create,
    logger: silentLogger,
  });
}

function pfnBuffer(pfns: readonly number[], extraBytes = 0): Uint8Array {
  const bytes = new Uint8Array(pfns.length * 4 + extraBytes);
  const view = new DataView(bytes.buffer);
  pfns.forEach((pfn, i) => view.setUint32(4 * i, pfn, true));
  return bytes;
}

/** Bytes the memfd behind `region` has allocated (st_blocks are 512-byte units). */
function allocated(region: FrontendRegion): number {
  return fs.fstatSync(region.fd).blocks * 512;
}

/** Fill `pages` pages from `gpa` with a pattern, so the memfd allocates them. */
function dirty(fe: Frontend, gpa: number, pages: number): void {
  fe.memory.write(gpa, new Uint8Array(pages * PAGE).fill(0xab));
}

function isZero(bytes: Uint8Array): boolean {
  return bytes.every((b) => b === 0);
}

/** Start the server, negotiate `features`, map `layout` and start `queues` rings of 64. */
async function setup(
  t: ExecutionContext,
  dev: BalloonDevice,
  features: bigint,
  queues: number,
  layout: readonly RegionLayout[] = DEFAULT_LAYOUT,
): Promise<{ ts: TestServer; fe: Frontend }> {
  const ts = await TestServer.start(dev);
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
  });
  await fe.negotiate({ features: bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_MUST_TELL_HOST) | features });
  await fe.setMemTable(layout);
  for (let i = 0; i < queues; i++) await fe.setupQueue(i, 64);
  return { ts, fe };
}

/** The rings the tests run on: split, and packed with indirect descriptors and EVENT_IDX. */
const RINGS = [
  { name: 'split ring', features: 0n, indirect: false, base: (avail: number) => avail },
  {
    name: 'packed ring, indirect',
    features: bit(VIRTIO_F_RING_PACKED) | bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX),
    indirect: true,
    // GET_VRING_BASE of a packed ring (vhost-user.rst): avail index and wrap counter (bit 15) in the
    // low half, used index and wrap counter in the high half.
    base: (avail: number, used: number) => ((((used | 0x8000) << 16) | avail | 0x8000) >>> 0),
  },
] as const;

// DEFAULT_LAYOUT: region 0 at 0 (1 MiB, rings and buffers live here), region 1 at 8 MiB (1 MiB),
// region 2 at 4 GiB (2 MiB); gaps between them.
const REGION1 = 0x80_0000;
const REGION2 = 0x1_0000_0000;

for (const ring of RINGS) {
test(`${ring.name}: inflate punches the pages out of the memfds before the buffer is used; deflate gives them back to write`, async (t) => {
  const dev = device();
  const { fe } = await setup(t, dev, ring.features, 2);
  const indirect = ring.indirect;
  const [, r1, r2] = fe.memory.regions;
  dirty(fe, REGION1, 16);
  dirty(fe, REGION2, 64);
  const before = [allocated(r1!), allocated(r2!)];
  const pfns = [...Array.from({ length: 64 }, (_, i) => REGION2 / PAGE + i), ...Array.from({ length: 16 }, (_, i) => REGION1 / PAGE + i)];
  // Linux sends 256 PFNs per buffer at most: two buffers.
  fe.submit(0, [
    { readable: [{ data: pfnBuffer(pfns.slice(0, 40)) }], indirect },
    { readable: [{ data: pfnBuffer(pfns.slice(40, 60)) }, { data: pfnBuffer(pfns.slice(60)) }], indirect },
  ]);
  const used = await fe.collect(0, 2, TIMEOUT);
  t.deepEqual(used.map((u) => u.len), [0, 0]);
  t.is(allocated(r1!), before[0]! - 16 * PAGE, 'region 1 gave back its 16 pages');
  t.is(allocated(r2!), before[1]! - 64 * PAGE, 'region 2 gave back its 64 pages');
  t.true(isZero(fe.memory.read(REGION2, 64 * PAGE)), 'inflated pages read back as zeroes');
  t.is(dev.balloonPages, 80);
  t.is(dev.stats.releasedInflateBytes, 80 * PAGE);

  const deflated = await fe.transfer(1, { readable: [{ data: pfnBuffer(pfns) }], indirect }, TIMEOUT);
  t.is(deflated.len, 0);
  t.is(dev.balloonPages, 0);
  t.is(dev.stats.deflatedPages, 80);
  dirty(fe, REGION2, 64);
  t.is(allocated(r2!), before[1]!, 'deflated pages are memory again');
});
}

test('hostile inflate buffers are skipped and counted, nothing outside them is punched, and the queue goes on', async (t) => {
  const dev = device();
  const { fe } = await setup(t, dev, 0n, 2);
  // Region 0 holds the rings and the buffers (it grows as buffers are written): watch 1 and 2.
  const regions = fe.memory.regions.slice(1);
  for (const r of regions) dirty(fe, r.gpa, r.size / PAGE);
  const before = regions.map(allocated);
  const gap = 0x40_0000 / PAGE;
  const past = (REGION2 + (2 << 20)) / PAGE;
  fe.submit(0, [
    { readable: [{ data: pfnBuffer([gap, past, 0xffffffff]) }] },
    { readable: [{ data: pfnBuffer([REGION1 / PAGE], 3) }] }, // length 7: one PFN and 3 stray bytes
    { readable: [{ data: pfnBuffer([REGION1 / PAGE, REGION1 / PAGE]) }] }, // both repeats now
    { readable: [{ data: new Uint8Array(2) }] },
  ]);
  await fe.collect(0, 4, TIMEOUT);
  t.deepEqual(dev.stats.badPfns, { outside: 3, repeated: 2, 'not-inflated': 0, misaligned: 5, excess: 0 });
  t.deepEqual(
    regions.map(allocated),
    [before[0]! - PAGE, before[1]!],
    'only the one good page left the host',
  );
  // The queue still serves.
  const good = await fe.transfer(0, { readable: [{ data: pfnBuffer([REGION2 / PAGE]) }] }, TIMEOUT);
  t.is(good.len, 0);
  t.is(allocated(regions[1]!), before[1]! - PAGE);
  t.is(dev.balloonPages, 2);
});

for (const ring of RINGS) {
test(`${ring.name}: free page reporting releases each reported range and uses the buffer`, async (t) => {
  const dev = device({ freePageReporting: true });
  // Without STATS_VQ the reporting queue is index 2 (an absent queue takes no index).
  const { fe } = await setup(t, dev, bit(VIRTIO_BALLOON_F_REPORTING) | ring.features, 3);
  const r2 = fe.memory.regions[2]!;
  dirty(fe, REGION2, 512);
  const before = allocated(r2);
  const used = await fe.transfer(
    2,
    { writable: [{ gpa: REGION2, length: 1 << 20 }, { gpa: REGION2 + (1 << 20), length: 256 * 1024 }], indirect: ring.indirect },
    TIMEOUT,
  );
  t.is(used.len, 0);
  t.is(allocated(r2), before - (1 << 20) - 256 * 1024);
  t.is(dev.stats.releasedReportingBytes, (1 << 20) + 256 * 1024);
  t.is(dev.balloonPages, 0, 'reported pages stay the guest\'s');
  dirty(fe, REGION2, 512);
  t.is(allocated(r2), before, 'and it writes them again at will');
});
}

// Guest memory on huge pages: four 2 MiB pages at 4 GiB in a file of a private hugetlbfs, after the
// memfd region that holds the rings and buffers. The mount's free count shows what was punched.
const HUGE_REGION = 0x1_0000_0000;
const PAGES_PER_HUGE = HUGE_PAGE_SIZE / PAGE;
const hugeUnavailable = hugePagesUnavailable();

function pfnRange(first: number, count: number): number[] {
  return Array.from({ length: count }, (_, i) => first + i);
}

/** Inflate (queue 0) or deflate (queue 1) `pfns` in buffers of 256 PFNs, as Linux sends them. */
async function sendPfns(fe: Frontend, queue: number, pfns: readonly number[]): Promise<void> {
  const chains = [];
  for (let i = 0; i < pfns.length; i += 256) chains.push({ readable: [{ data: pfnBuffer(pfns.slice(i, i + 256)) }] });
  fe.submit(queue, chains);
  await fe.collect(queue, chains.length, TIMEOUT);
}

(hugeUnavailable === undefined ? test : test.skip)(
  `on hugetlbfs, a huge page is punched once all its 4 KiB pages are in the balloon, not before; reporting releases the whole huge pages of a range${hugeUnavailable === undefined ? '' : ` [skipped: ${hugeUnavailable}]`}`,
  async (t) => {
    const huge = reserveHugePages(4, 'balloon-protocol');
    t.teardown(() => huge.close()); // runs after setup's teardown has closed both ends
    const dev = device({ freePageReporting: true });
    const layout = [DEFAULT_LAYOUT[0]!, { gpa: HUGE_REGION, size: 4 * HUGE_PAGE_SIZE, file: path.join(huge.mount, 'guest') }];
    // Without STATS_VQ the reporting queue is index 2.
    const { fe } = await setup(t, dev, bit(VIRTIO_BALLOON_F_REPORTING), 3, layout);
    const region = fe.memory.regions[1]!;
    dirty(fe, HUGE_REGION, 4 * PAGES_PER_HUGE);
    t.is(huge.free(), 0, "the front-end's mapping holds the mount's four huge pages");
    t.is(allocated(region), 4 * HUGE_PAGE_SIZE);
    const first = HUGE_REGION / PAGE;

    // All but the last 4 KiB page of huge page 0: nothing can be freed yet.
    await sendPfns(fe, 0, pfnRange(first, PAGES_PER_HUGE - 1));
    t.is(huge.free(), 0);
    t.is(dev.stats.releasedInflateBytes, 0);
    t.deepEqual([dev.partialHugePages, dev.unreleasedPages], [1, PAGES_PER_HUGE - 1]);
    t.is(fe.memory.read(HUGE_REGION + HUGE_PAGE_SIZE - PAGE, 1)[0], 0xab, 'the page still outside the balloon keeps its bytes');
    t.is(fe.memory.read(HUGE_REGION, 1)[0], 0xab, 'and so do the inflated pages of its huge page: nothing was punched');

    // Its last page, with the second half of huge page 1 in reverse order: huge page 0 goes, alone.
    await sendPfns(fe, 0, [first + PAGES_PER_HUGE - 1, ...pfnRange(first + 1.5 * PAGES_PER_HUGE, PAGES_PER_HUGE / 2).reverse()]);
    t.is(huge.free(), 1);
    t.is(allocated(region), 3 * HUGE_PAGE_SIZE);
    t.is(dev.stats.releasedInflateBytes, HUGE_PAGE_SIZE);
    t.is(fe.memory.read(HUGE_REGION + HUGE_PAGE_SIZE, 1)[0], 0xab, 'huge page 1 is only half in the balloon');
    t.deepEqual([dev.partialHugePages, dev.unreleasedPages], [1, PAGES_PER_HUGE / 2]);

    // The first half of huge page 1 completes it.
    await sendPfns(fe, 0, pfnRange(first + PAGES_PER_HUGE, PAGES_PER_HUGE / 2));
    t.is(huge.free(), 2);
    t.is(dev.stats.releasedInflateBytes, 2 * HUGE_PAGE_SIZE);

    // Deflate one page of huge page 0 and write it: the whole huge page is allocated again; inflating
    // that page once more releases the huge page again.
    await sendPfns(fe, 1, [first + 7]);
    t.is(huge.free(), 2, 'a deflate frees and allocates nothing');
    dirty(fe, HUGE_REGION + 7 * PAGE, 1);
    t.is(huge.free(), 1);
    await sendPfns(fe, 0, [first + 7]);
    t.is(huge.free(), 2);
    t.is(dev.stats.releasedInflateBytes, 3 * HUGE_PAGE_SIZE);
    t.is(dev.balloonPages, 2 * PAGES_PER_HUGE);
    t.deepEqual([dev.partialHugePages, dev.unreleasedPages], [0, 0]);
    t.is(fe.memory.read(HUGE_REGION + 2 * HUGE_PAGE_SIZE, 1)[0], 0xab, 'huge pages 2 and 3 were never touched');

    // A free range reported from the middle of huge page 2 to the end of huge page 3: only huge
    // page 3 is wholly in it, and only it is released and counted.
    const used = await fe.transfer(2, { writable: [{ gpa: HUGE_REGION + 5 * 2 ** 20, length: 3 * 2 ** 20 }] }, TIMEOUT);
    t.is(used.len, 0);
    t.is(huge.free(), 3);
    t.is(dev.stats.releasedReportingBytes, HUGE_PAGE_SIZE);
    // (The test front-end zeroes a writable buffer before it offers it; before the range is untouched.)
    t.is(fe.memory.read(HUGE_REGION + 5 * 2 ** 20 - PAGE, 1)[0], 0xab, 'huge page 2 keeps its bytes');
    t.is(allocated(region), HUGE_PAGE_SIZE, 'huge page 2, in part reported, is the one left');
    t.is(dev.stats.releaseErrors, 0);
    // Last, as reading a hole of a hugetlbfs mapping allocates a (zeroed) huge page again.
    t.true(isZero(fe.memory.read(HUGE_REGION, 2 * HUGE_PAGE_SIZE)), 'the released huge pages read back as zeroes');
    t.true(isZero(fe.memory.read(HUGE_REGION + 3 * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE)));
    t.is(huge.free(), 0);
  },
);

/** A stats buffer: le16 tag, le64 value entries. */
function statsBuffer(entries: [number, number][]): Uint8Array {
  const bytes = new Uint8Array(entries.length * 10);
  const view = new DataView(bytes.buffer);
  entries.forEach(([tag, value], i) => {
    view.setUint16(i * 10, tag, true);
    view.setBigUint64(i * 10 + 2, BigInt(value), true);
  });
  return bytes;
}

for (const ring of RINGS) {
test(`${ring.name}: the stats buffer is held, handed back for fresh numbers, and returned to the ring by GET_VRING_BASE`, async (t) => {
  const dev = device();
  const { fe } = await setup(t, dev, bit(VIRTIO_BALLOON_F_STATS_VQ) | ring.features, 3);
  fe.submit(2, { readable: [{ data: statsBuffer([[4, 100 << 20], [5, 512 << 20], [99, 1]]) }] });
  await until(() => dev.stats.statsUpdates === 1, 'the first stats buffer', TIMEOUT);
  t.deepEqual(dev.guestStats, { free_bytes: 100 << 20, total_bytes: 512 << 20 });
  t.deepEqual(fe.takeCompletions(2), [], 'the device keeps the buffer');

  // Ask for fresh numbers: the buffer comes back; the driver refills and re-adds it.
  const refreshed = dev.refreshStats(TIMEOUT);
  await fe.collect(2, 1, TIMEOUT);
  fe.submit(2, { readable: [{ data: statsBuffer([[4, 50 << 20], [2, 7]]) }] });
  t.true(await refreshed);
  t.deepEqual(dev.guestStats, { free_bytes: 50 << 20, major_faults: 7 });

  // Stopping the ring gives the held buffer back: the base points at it, and a restart pops it again.
  const base = await fe.getVringBase(2);
  t.is(base, ring.base(1, 1), 'one buffer used, the held one back in the ring');
  await fe.restartQueue(2, base);
  fe.kick(2);
  await until(() => dev.stats.statsUpdates === 3, 'the held buffer popped again', TIMEOUT);
  t.deepEqual(dev.guestStats, { free_bytes: 50 << 20, major_faults: 7 });
});
}

test('the target travels in num_pages with a config change notification; the guest writes only actual', async (t) => {
  const dev = device();
  const { fe } = await setup(t, dev, bit(VIRTIO_BALLOON_F_STATS_VQ), 0);
  await fe.setBackendChannel();
  const config = async () => {
    const bytes = await fe.getConfig(0, 8);
    const view = new DataView(bytes.buffer, bytes.byteOffset, 8);
    return { numPages: view.getUint32(0, true), actual: view.getUint32(4, true) };
  };
  t.deepEqual(await config(), { numPages: 0, actual: 0 });
  const setTarget = dev.controlMethods()['set-target']!;
  const result = (await setTarget.call({ bytes: 256 << 20 })) as { targetPages: number; notified: boolean };
  t.is(result.targetPages, (256 << 20) / PAGE);
  t.true(result.notified);
  await fe.waitBackendMessage(BackendRequest.CONFIG_CHANGE_MSG, TIMEOUT);
  t.deepEqual(await config(), { numPages: 65536, actual: 0 });

  // QEMU forwards all 8 bytes with its stale num_pages: only actual is taken.
  const write = new Uint8Array(8);
  new DataView(write.buffer).setUint32(0, 0, true);
  new DataView(write.buffer).setUint32(4, 1234, true);
  await fe.setConfig(0, write);
  t.deepEqual(await config(), { numPages: 65536, actual: 1234 });
  t.is(dev.actualPages, 1234);

  const byPages = (await setTarget.call({ pages: 10 })) as { targetPages: number };
  t.is(byPages.targetPages, 10);
  const refused = await t.throwsAsync(async () => setTarget.call({ pages: 1, bytes: 4096 }));
  t.is((refused as { code?: number }).code, -32602);
});

test('a new driver starts with an empty balloon; the operator\'s target stays', async (t) => {
  const dev = device();
  const { ts, fe } = await setup(t, dev, 0n, 2);
  await dev.setTarget(100);
  await fe.transfer(0, { readable: [{ data: pfnBuffer([REGION1 / PAGE, REGION1 / PAGE + 1]) }] }, TIMEOUT);
  const actual = new Uint8Array(8);
  new DataView(actual.buffer).setUint32(4, 2, true);
  await fe.setConfig(0, actual);
  t.is(dev.balloonPages, 2);
  fe.close();
  await ts.nextDisconnect(TIMEOUT);
  t.is(dev.balloonPages, 0);
  t.is(dev.actualPages, 0);
  t.is(dev.targetPages, 100);
  // The same pages inflate again for the next driver: they are not repeats.
  const next = ts.connect();
  t.teardown(() => next.close());
  await next.negotiate({ features: bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_BALLOON_F_MUST_TELL_HOST) });
  await next.setMemTable();
  await next.setupQueue(0, 64);
  await next.transfer(0, { readable: [{ data: pfnBuffer([REGION1 / PAGE, REGION1 / PAGE + 1]) }] }, TIMEOUT);
  t.is(dev.balloonPages, 2);
  t.is(dev.stats.badPfns.repeated, 0);
});

test('targets set while a notification is on its way: the driver is told again and reads the last one', async (t) => {
  const dev = device();
  const { fe } = await setup(t, dev, 0n, 0);
  await fe.setBackendChannel();
  const results = await Promise.all([dev.setTarget(1), dev.setTarget(2), dev.setTarget(3)]);
  t.deepEqual(results, [true, true, true]);
  await fe.waitBackendMessage(BackendRequest.CONFIG_CHANGE_MSG, TIMEOUT);
  await fe.waitBackendMessage(BackendRequest.CONFIG_CHANGE_MSG, TIMEOUT);
  const config = await fe.getConfig(0, 8);
  t.is(new DataView(config.buffer, config.byteOffset, 8).getUint32(0, true), 3);
});

test('with --stats-interval the device hands the stats buffer back by itself, again and again', async (t) => {
  const dev = device({ statsIntervalMs: 50 });
  const { fe } = await setup(t, dev, bit(VIRTIO_BALLOON_F_STATS_VQ), 3);
  for (let round = 1; round <= 3; round++) {
    fe.submit(2, { readable: [{ data: statsBuffer([[4, round]]) }] });
    await fe.collect(2, 1, TIMEOUT); // given back without being asked
    t.is(dev.guestStats.free_bytes, round);
  }
  t.is(dev.stats.statsUpdates, 3);
});

test('offered features: MUST_TELL_HOST and STATS_VQ always, DEFLATE_ON_OOM and REPORTING when asked, never FREE_PAGE_HINT or PAGE_POISON', async (t) => {
  const plain = await TestServer.start(device());
  const asked = await TestServer.start(device({ deflateOnOom: true, freePageReporting: true }));
  t.teardown(async () => {
    await plain.close();
    await asked.close();
  });
  const offered = async (ts: TestServer) => {
    const fe = ts.connect();
    try {
      return (await fe.getFeatures()) & 0xffffffn; // virtio 1.2 §6: bits 0 to 23 are the device type's
    } finally {
      fe.close();
    }
  };
  t.is(await offered(plain), bit(VIRTIO_BALLOON_F_MUST_TELL_HOST) | bit(VIRTIO_BALLOON_F_STATS_VQ));
  t.is(
    await offered(asked),
    bit(VIRTIO_BALLOON_F_MUST_TELL_HOST) | bit(VIRTIO_BALLOON_F_STATS_VQ) | bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) | bit(VIRTIO_BALLOON_F_REPORTING),
  );
});
