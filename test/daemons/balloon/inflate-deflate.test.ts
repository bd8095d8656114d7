/**
 * Balloon bookkeeping without a front-end: PFN parsing, coalescing into runs, the hostile buffer
 * table (nothing outside guest memory is ever released), huge page tracking, deflate.
 */
import test from 'ava';

import {
  applyDeflate,
  BalloonPages,
  coalescePfns,
  HugePageTracker,
  MAX_PFNS_PER_BUFFER,
  noBadPfns,
  planInflate,
  readPfns,
  type ReleaseRange,
} from '../../../daemons/balloon/inflate-deflate';
import { GuestMemory, type GuestRegion } from '../../../lib/memory/guest-memory';
import { DescriptorChain } from '../../../lib/virtqueue/descriptor-chain';

const PAGE = 4096;
const HUGE = 2 << 20;

/** A region as the balloon sees it: guest range, fd offset and backing page size (no mapping). */
function region(guestPhysAddr: number, size: number, pageSize = PAGE, mmapOffset = 0): GuestRegion {
  return {
    guestPhysAddr,
    size,
    userAddr: 0x7f00_0000_0000 + guestPhysAddr,
    mappingOffset: 0,
    views: [],
    hostAddress: 0x7e00_0000_0000 + guestPhysAddr,
    fd: 100,
    mmapOffset,
    pageSize,
    retain() {
      return this;
    },
    release() {},
  };
}

/**
 * Guest memory of the tests: 0..1 MiB, a gap, 8 MiB..9 MiB at fd offset 64 KiB (adjacent to the next
 * region), 9 MiB..10 MiB, and 4 GiB..4 GiB+8 MiB on 2 MiB huge pages.
 */
function memory(): GuestMemory {
  return new GuestMemory([
    region(0, 1 << 20),
    region(8 << 20, 1 << 20, PAGE, 0x1_0000),
    region(9 << 20, 1 << 20),
    region(2 ** 32, 8 << 20, HUGE),
  ]);
}

/** A chain whose readable part is `bytes` (one segment in a throwaway memory map). */
function chainOf(bytes: Uint8Array): DescriptorChain {
  const view = new Uint8Array(bytes.length + 16);
  view.set(bytes, 16);
  const fake = { views: [view], viewAddress: [0] } as unknown as GuestMemory;
  const chain = new DescriptorChain();
  chain.clear(fake);
  chain.addSegment(0, 16, bytes.length, false);
  return chain;
}

function pfnBytes(pfns: readonly number[], extra = 0): Uint8Array {
  const bytes = new Uint8Array(pfns.length * 4 + extra);
  const view = new DataView(bytes.buffer);
  pfns.forEach((pfn, i) => view.setUint32(4 * i, pfn, true));
  return bytes;
}

const pfnOf = (gpa: number) => gpa / PAGE;

function summary(ranges: readonly ReleaseRange[]): string[] {
  return ranges.map((r) => `${(r.region.guestPhysAddr + r.offset).toString(16)}+${r.length.toString(16)}@${(r.region.mmapOffset + r.offset).toString(16)}`);
}

test('readPfns reads little-endian u32s and counts a partial tail', (t) => {
  const bad = noBadPfns();
  const pfns = readPfns(chainOf(pfnBytes([1, 0x12345678, 0xffffffff], 3)), bad);
  t.deepEqual([...pfns], [1, 0x12345678, 0xffffffff]);
  t.is(bad.misaligned, 3);
});

test('readPfns bounds what it reads from a huge buffer and counts the rest', (t) => {
  const bad = noBadPfns();
  const pfns = readPfns(chainOf(new Uint8Array((MAX_PFNS_PER_BUFFER + 10) * 4)), bad);
  t.is(pfns.length, MAX_PFNS_PER_BUFFER);
  t.is(bad.excess, 10);
});

test('coalescePfns joins consecutive PFNs in the order given', (t) => {
  t.deepEqual(coalescePfns([5, 6, 7, 9, 10, 3, 4]), [
    { first: 5, pages: 3 },
    { first: 9, pages: 2 },
    { first: 3, pages: 2 },
  ]);
  t.deepEqual(coalescePfns([]), []);
});

test('inflate releases runs of pages at their fd offsets, split where the run crosses into an adjacent region', (t) => {
  const mem = memory();
  const pages = new BalloonPages();
  const bad = noBadPfns();
  // 4 pages at 0x10000, then the last 2 pages of the 8 MiB region running into the 9 MiB region.
  const first = pfnOf(0x1_0000);
  const cross = pfnOf((9 << 20) - 2 * PAGE);
  const plan = planInflate(new Uint32Array([first, first + 1, first + 2, first + 3, cross, cross + 1, cross + 2]), mem, pages, new HugePageTracker(), bad);
  t.is(plan.accepted, 7);
  t.deepEqual(summary(plan.ranges), ['10000+4000@10000', '8fe000+2000@10e000', '900000+1000@0']);
  t.is(pages.count, 7);
  t.deepEqual(bad, noBadPfns());
});

const hostile: [string, number[], Partial<ReturnType<typeof noBadPfns>>][] = [
  ['a PFN past the end of guest memory', [pfnOf(2 ** 32 + (8 << 20))], { outside: 1 }],
  ['the largest PFN', [0xffffffff], { outside: 1 }],
  ['a PFN in the gap between regions', [pfnOf(4 << 20)], { outside: 1 }],
  ['a PFN just below a region', [pfnOf((8 << 20) - PAGE)], { outside: 1 }],
  ['a PFN repeated in one buffer', [7, 7, 7], { repeated: 2 }],
];

for (const [name, pfns, expected] of hostile) {
  test(`inflate skips and counts ${name}, releasing nothing outside guest memory`, (t) => {
    const mem = memory();
    const bad = noBadPfns();
    const plan = planInflate(new Uint32Array(pfns), mem, new BalloonPages(), new HugePageTracker(), bad);
    t.deepEqual(bad, { ...noBadPfns(), ...expected });
    for (const range of plan.ranges) {
      t.true(range.offset >= 0 && range.offset + range.length <= range.region.size, 'inside its region');
    }
    t.is(plan.accepted + Object.values(expected).reduce((a, b) => a + b, 0), pfns.length);
  });
}

test('a page inflated again in a later buffer is a repeat and is not released twice', (t) => {
  const mem = memory();
  const pages = new BalloonPages();
  const huge = new HugePageTracker();
  const bad = noBadPfns();
  t.is(planInflate(new Uint32Array([3]), mem, pages, huge, bad).ranges.length, 1);
  const again = planInflate(new Uint32Array([3]), mem, pages, huge, bad);
  t.deepEqual(again, { accepted: 0, ranges: [] });
  t.is(bad.repeated, 1);
});

test('on huge pages, a huge page is released once all its 4 KiB pages are in, not before', (t) => {
  const mem = memory();
  const pages = new BalloonPages();
  const huge = new HugePageTracker();
  const bad = noBadPfns();
  const base = pfnOf(2 ** 32 + HUGE); // the second huge page of the region
  const perHuge = HUGE / PAGE;
  const firstHalf = Uint32Array.from({ length: perHuge / 2 }, (_, i) => base + i);
  const secondHalf = Uint32Array.from({ length: perHuge / 2 }, (_, i) => base + perHuge / 2 + i);
  t.deepEqual(planInflate(firstHalf, mem, pages, huge, bad).ranges, []);
  t.deepEqual([huge.partial, huge.unreleasedPages], [1, perHuge / 2]);
  const plan = planInflate(secondHalf, mem, pages, huge, bad);
  t.deepEqual(summary(plan.ranges), [`${(2 ** 32 + HUGE).toString(16)}+200000@200000`]);
  t.deepEqual([huge.partial, huge.unreleasedPages], [0, 0]);
  // A page deflated out of it and inflated again completes it again (it faulted back in meanwhile).
  t.is(applyDeflate(new Uint32Array([base + 5]), mem, pages, huge, bad), 1);
  t.deepEqual([huge.partial, huge.unreleasedPages], [1, perHuge - 1], 'the other pages stay in the balloon, but are backed again');
  t.is(planInflate(new Uint32Array([base + 5]), mem, pages, huge, bad).ranges.length, 1);
  t.deepEqual([huge.partial, huge.unreleasedPages], [0, 0]);
  t.is(applyDeflate(secondHalf, mem, pages, huge, bad), perHuge / 2);
  t.deepEqual([huge.partial, huge.unreleasedPages], [1, perHuge / 2]);
  huge.clear();
  t.deepEqual([huge.partial, huge.unreleasedPages], [0, 0]);
});

test('a huge page the region does not wholly hold is never released', (t) => {
  // The region starts 1 MiB into a huge page of its fd: its first huge page is only half inside.
  const mem = new GuestMemory([region(0, 4 << 20, HUGE, 1 << 20)]);
  const pages = new BalloonPages();
  const huge = new HugePageTracker();
  const pfns = Uint32Array.from({ length: (1 << 20) / PAGE }, (_, i) => i);
  const plan = planInflate(pfns, mem, pages, huge, noBadPfns());
  t.is(plan.accepted, pfns.length);
  t.deepEqual(plan.ranges, []);
  t.deepEqual([huge.partial, huge.unreleasedPages], [0, pfns.length], 'in the balloon, still held by the host');
  t.is(applyDeflate(pfns.subarray(0, 10), mem, pages, huge, noBadPfns()), 10);
  t.is(huge.unreleasedPages, pfns.length - 10);
});

test('deflate takes pages out and counts PFNs that were not in the balloon', (t) => {
  const mem = memory();
  const pages = new BalloonPages();
  const huge = new HugePageTracker();
  const bad = noBadPfns();
  planInflate(new Uint32Array([1, 2, 3]), mem, pages, huge, bad);
  t.is(applyDeflate(new Uint32Array([2, 3, 4, 0xffffffff]), mem, pages, huge, bad), 2);
  t.is(bad['not-inflated'], 2);
  t.is(pages.count, 1);
  t.true(pages.has(1));
  t.false(pages.has(2));
});

test('BalloonPages counts distinct pages across chunks', (t) => {
  const pages = new BalloonPages();
  t.true(pages.add(0));
  t.true(pages.add(0xffffffff));
  t.false(pages.add(0));
  t.is(pages.count, 2);
  t.true(pages.delete(0xffffffff));
  t.false(pages.delete(0xffffffff));
  t.is(pages.count, 1);
  pages.clear();
  t.is(pages.count, 0);
  t.false(pages.has(0));
});
