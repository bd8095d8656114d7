/**
 * Seeded randomized rings (in the spirit of vm-virtio's fuzz targets): thousands of random descriptor
 * tables, indirect tables and available entries, biased towards region edges, the gap, huge values
 * and flag combinations. The walker must either return chains whose every segment lies inside a
 * region, or throw RingError: never another exception, never a segment outside guest memory, never a
 * write outside the rings. Fixed seeds: a failure reproduces.
 */
import test, { type ExecutionContext } from 'ava';

import { RingError } from '../../../lib/errors';
import type { DescriptorChain, Virtqueue } from '../../../lib/virtqueue';
import { createVirtqueue } from '../../../lib/virtqueue';
import { VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../../../lib/virtio/constants';
import {
  PackedDriverRing,
  SplitDriverRing,
  encodeDescriptor,
  packedRingLayout,
  splitRingLayout,
} from '../../helpers/driver-ring';
import { FakeGuestMemory } from '../../helpers/fake-guest-memory';
import { GAP, R0_DATA, R0_END, R1_END, R2_DATA, R2_END, RING_GPA, seededRandom } from './setup';

const ITERATIONS = 2500;
/** Indirect tables live here: one plain, one straddling regions 0 and 1, one above 4 GiB. */
const TABLES = [R0_DATA + 0x8000, R0_END - 40, R2_DATA + 0x100];
const TABLE_ENTRIES = 20;

type Rand = ReturnType<typeof seededRandom>;

/**
 * One random draw context: `h` is the chance that any one field is hostile, chosen per iteration
 * (from nearly valid rings to mostly garbage), so both valid chains and every kind of violation occur.
 */
interface Gen {
  r: Rand;
  h: number;
  size: number;
}

const bad = (g: Gen): boolean => g.r.float() < g.h;

function validAddress(r: Rand): number {
  switch (r.next(4)) {
    case 0:
      return R0_DATA + r.next(0xf_0000);
    case 1:
      return R0_END - r.next(64); // a short buffer here spans regions 0 and 1
    case 2:
      return R2_DATA + r.next(0xf_0000);
    default:
      return r.next(0x4000); // near the rings
  }
}

function hostileAddress(r: Rand): number | bigint {
  switch (r.next(7)) {
    case 0:
      return R1_END - r.next(64);
    case 1:
      return R2_END - r.next(64);
    case 2:
      return GAP + r.next(0x1000);
    case 3:
      return (BigInt(r.next(0x1_0000_0000)) << 32n) | BigInt(r.next(0x1_0000_0000));
    case 4:
      return 2 ** 53 - r.next(0x1000);
    case 5:
      return 2n ** 64n - BigInt(r.next(0x1000));
    default:
      return r.next(0x1_0000_0000);
  }
}

function hostileLength(r: Rand): number {
  switch (r.next(5)) {
    case 0:
      return 0;
    case 1:
      return 0xffff_ffff - r.next(32);
    case 2:
      return r.next(0x1_0000_0000);
    case 3:
      return 16 * r.next(TABLE_ENTRIES + 2) + r.next(2) * r.next(16);
    default:
      return 0x8000_0000 + r.next(0x1000);
  }
}

function hostileFlags(r: Rand): number {
  return r.next(2) === 0 ? r.next(8) : r.next(0x10000);
}

/** A descriptor: a buffer (sometimes an indirect table reference), each field hostile with chance h. */
function randomDescriptor(g: Gen, inTable: boolean): { addr: number | bigint; len: number; flags: number } {
  const { r } = g;
  if (!inTable && r.next(6) === 0) {
    const addr = bad(g) ? hostileAddress(r) : TABLES[r.next(TABLES.length)]!;
    const len = bad(g) ? hostileLength(r) : 16 * (1 + r.next(TABLE_ENTRIES));
    return { addr, len, flags: VRING_DESC_F_INDIRECT | (bad(g) ? hostileFlags(r) : 0) };
  }
  const addr = bad(g) ? hostileAddress(r) : validAddress(r);
  const len = bad(g) ? hostileLength(r) : 1 + r.next(0x800);
  let flags = r.next(3) === 0 ? VRING_DESC_F_WRITE : 0;
  if (r.next(2) === 0) flags |= VRING_DESC_F_NEXT;
  if (bad(g)) flags |= hostileFlags(r);
  return { addr, len, flags };
}

/** Fill the indirect tables: mostly sequential `next` links, with hostile fields at chance h. */
function randomTables(fake: FakeGuestMemory, g: Gen, packed: boolean): void {
  for (const table of TABLES) {
    for (let i = 0; i < TABLE_ENTRIES; i++) {
      const d = randomDescriptor(g, true);
      const next = bad(g) ? g.r.next(0x10000) : i + 1;
      const bytes = packed
        ? encodeDescriptor(d.addr, d.len, g.r.next(0x10000), d.flags & ~VRING_DESC_F_NEXT)
        : encodeDescriptor(d.addr, d.len, d.flags, next);
      fake.write(table + 16 * i, bytes);
    }
  }
}

const HOSTILITY = [0.005, 0.03, 0.15, 0.6];

interface Tally {
  chains: number;
  errors: Map<string, number>;
}

/** Pop until empty or broken, checking every chain; complete them in random order. */
function exercise(t: ExecutionContext, fake: FakeGuestMemory, queue: Virtqueue, r: Rand, tally: Tally): void {
  const held: DescriptorChain[] = [];
  for (let n = 0; n < 3 * queue.size + 2; n++) {
    let chain: DescriptorChain | null;
    try {
      chain = queue.pop();
    } catch (err) {
      if (!(err instanceof RingError)) {
        t.fail(`pop threw ${String(err)}`);
        throw err;
      }
      tally.errors.set(err.code, (tally.errors.get(err.code) ?? 0) + 1);
      break;
    }
    if (chain === null) break;
    tally.chains++;
    checkChain(t, fake, chain);
    held.push(chain);
    if (r.next(3) === 0) {
      const c = held.splice(r.next(held.length), 1)[0]!;
      queue.pushUsed(c, r.next(c.writableLength + 2));
    }
    if (r.next(4) === 0) queue.flush();
  }
  while (held.length > 0) {
    const c = held.splice(r.next(held.length), 1)[0]!;
    queue.pushUsed(c, r.next(c.writableLength + 2));
  }
  queue.flush();
  queue.enableNotification();
}

function checkChain(t: ExecutionContext, fake: FakeGuestMemory, chain: DescriptorChain): void {
  let readable = 0;
  let writable = 0;
  for (let i = 0; i < chain.segments; i++) {
    const view = chain.memory.views[chain.viewId[i]!];
    const ok = view !== undefined && fake.containsSegment(view, chain.offset[i]!, chain.length[i]!, chain.address(i));
    if (!ok) t.fail(`segment ${i} (view ${chain.viewId[i]}, offset ${chain.offset[i]}, length ${chain.length[i]}) is outside guest memory`);
    if (chain.length[i] === 0) t.fail('empty segment');
    if (i < chain.readableSegments) readable += chain.length[i]!;
    else writable += chain.length[i]!;
  }
  if (readable !== chain.readableLength || writable !== chain.writableLength) t.fail('segment lengths disagree with totals');
  if (readable + writable >= 2 ** 32) t.fail('chain of 2^32 bytes or more');
}

function report(t: ExecutionContext, tally: Tally): void {
  t.log(`chains ${tally.chains}, errors ${JSON.stringify(Object.fromEntries(tally.errors))}`);
  // The generator must reach both outcomes and most rules, or the test proves little.
  t.true(tally.chains > 500);
  t.true(tally.errors.size >= 6);
}

test('split: random descriptor tables and available rings only ever yield in-bounds chains or RingError', (t) => {
  const r = seededRandom(0x5eed_0001);
  const fake = new FakeGuestMemory();
  const tally: Tally = { chains: 0, errors: new Map() };
  for (let iter = 0; iter < ITERATIONS; iter++) {
    const size = [2, 4, 8, 16][r.next(4)]!;
    const layout = splitRingLayout(size, RING_GPA);
    const startIdx = r.next(0x10000);
    const g: Gen = { r, h: HOSTILITY[r.next(HOSTILITY.length)]!, size };
    const driver = new SplitDriverRing(fake, { size, ...layout, startIdx });
    for (let i = 0; i < size; i++) {
      const next = bad(g) ? r.next(0x10000) : r.next(size);
      driver.writeDescriptor(i, { ...randomDescriptor(g, false), next });
    }
    randomTables(fake, g, false);
    for (let i = 0; i < size; i++) driver.writeAvailRing(startIdx + i, bad(g) ? r.next(0x10000) : r.next(size));
    driver.writeAvailIdx(bad(g) ? r.next(0x10000) : startIdx + r.next(size + 1));
    const queue = createVirtqueue(
      {
        size,
        addresses: { descUserAddr: fake.userAddr(layout.desc), availUserAddr: fake.userAddr(layout.avail), usedUserAddr: fake.userAddr(layout.used) },
        memory: fake.memory,
        eventIdx: r.next(2) === 0,
        indirect: !bad(g),
        base: startIdx,
        notify: () => {},
      },
      false,
    );
    exercise(t, fake, queue, r, tally);
  }
  t.true(fake.guardsIntact());
  report(t, tally);
});

test('packed: random descriptor rings only ever yield in-bounds chains or RingError', (t) => {
  const r = seededRandom(0x5eed_0002);
  const fake = new FakeGuestMemory();
  const tally: Tally = { chains: 0, errors: new Map() };
  for (let iter = 0; iter < ITERATIONS; iter++) {
    const size = [1, 3, 4, 8, 13, 16][r.next(6)]!;
    const layout = packedRingLayout(size, RING_GPA);
    const nextAvail = r.next(size);
    const availWrap = r.next(2);
    const g: Gen = { r, h: HOSTILITY[r.next(HOSTILITY.length)]!, size };
    const driver = new PackedDriverRing(fake, { size, ...layout, nextAvail, availWrap });
    for (let i = 0; i < size; i++) {
      // Marked available for the lap each slot belongs to, unless hostile.
      const wrap = i >= nextAvail ? availWrap : availWrap ^ 1;
      const avail = bad(g) ? r.next(0x10000) & 0x8080 : PackedDriverRing.availBits(wrap);
      const d = randomDescriptor(g, false);
      driver.writeDescriptor(i, { addr: d.addr, len: d.len, id: r.next(0x10000), flags: (d.flags & ~0x8080) | avail });
    }
    randomTables(fake, g, true);
    const usedIdx = r.next(size);
    const base = (nextAvail | (availWrap << 15) | (usedIdx << 16) | (r.next(2) << 31)) >>> 0;
    const queue = createVirtqueue(
      {
        size,
        addresses: {
          descUserAddr: fake.userAddr(layout.desc),
          availUserAddr: fake.userAddr(layout.driverEvent),
          usedUserAddr: fake.userAddr(layout.deviceEvent),
        },
        memory: fake.memory,
        eventIdx: r.next(2) === 0,
        indirect: !bad(g),
        base,
        notify: () => {},
      },
      true,
    );
    exercise(t, fake, queue, r, tally);
  }
  t.true(fake.guardsIntact());
  report(t, tally);
});
