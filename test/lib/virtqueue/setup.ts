/**
 * Shared construction for the virtqueue tests: a fake guest, a driver ring in it and the device queue
 * over it. Rings live in region 0 at {@link RING_GPA}; buffers go wherever a test puts them.
 */
import { createVirtqueue, type DescriptorChain, type Virtqueue, type VirtqueueOptions } from '../../../lib/virtqueue';
import {
  PackedDriverRing,
  SplitDriverRing,
  packedRingLayout,
  splitRingLayout,
  type PackedRingLayout,
  type SplitRingLayout,
} from '../../helpers/driver-ring';
import { FakeGuestMemory, type FakeRegionSpec } from '../../helpers/fake-guest-memory';

export const RING_GPA = 0x1000;
/** Free space for buffers and tables in each default region. */
export const R0_DATA = 0x10_0000;
export const R0_END = 0x20_0000;
export const R1_DATA = 0x20_0000;
export const R1_END = 0x30_0000;
export const R2_DATA = 0x1_0000_0000;
export const R2_END = 0x1_0010_0000;
/** An address in the gap between region 1 and region 2. */
export const GAP = 0x40_0000;

export interface SetupOptions {
  size?: number;
  eventIdx?: boolean;
  indirect?: boolean;
  base?: number;
  burst?: number;
  regions?: readonly FakeRegionSpec[];
  fake?: FakeGuestMemory;
}

export interface QueueSetup<D, L> {
  fake: FakeGuestMemory;
  driver: D;
  layout: L;
  queue: Virtqueue;
  options: VirtqueueOptions;
  /** Number of times the queue called notify. */
  notified: { count: number };
}

export function splitSetup(opts: SetupOptions = {}): QueueSetup<SplitDriverRing, SplitRingLayout> {
  const size = opts.size ?? 8;
  const fake = opts.fake ?? new FakeGuestMemory(opts.regions);
  const layout = splitRingLayout(size, RING_GPA);
  const driver = new SplitDriverRing(fake, { size, ...layout, startIdx: opts.base ?? 0 });
  const notified = { count: 0 };
  const options: VirtqueueOptions = {
    size,
    addresses: { descUserAddr: fake.userAddr(layout.desc), availUserAddr: fake.userAddr(layout.avail), usedUserAddr: fake.userAddr(layout.used) },
    memory: fake.memory,
    eventIdx: opts.eventIdx ?? false,
    indirect: opts.indirect ?? true,
    base: opts.base ?? 0,
    notify: () => notified.count++,
    ...(opts.burst !== undefined ? { burst: opts.burst } : {}),
  };
  const queue = createVirtqueue(options, false);
  return { fake, driver, layout, queue, options, notified };
}

export function packedSetup(opts: SetupOptions = {}): QueueSetup<PackedDriverRing, PackedRingLayout> {
  const size = opts.size ?? 8;
  const fake = opts.fake ?? new FakeGuestMemory(opts.regions);
  const layout = packedRingLayout(size, RING_GPA);
  const base = opts.base ?? 0x8000_8000;
  const driver = new PackedDriverRing(fake, {
    size,
    ...layout,
    nextAvail: base & 0x7fff,
    availWrap: (base >>> 15) & 1,
    nextUsed: (base >>> 16) & 0x7fff,
    usedWrap: base >>> 31,
  });
  const notified = { count: 0 };
  const options: VirtqueueOptions = {
    size,
    addresses: {
      descUserAddr: fake.userAddr(layout.desc),
      availUserAddr: fake.userAddr(layout.driverEvent),
      usedUserAddr: fake.userAddr(layout.deviceEvent),
    },
    memory: fake.memory,
    eventIdx: opts.eventIdx ?? false,
    indirect: opts.indirect ?? true,
    base,
    notify: () => notified.count++,
    ...(opts.burst !== undefined ? { burst: opts.burst } : {}),
  };
  const queue = createVirtqueue(options, true);
  return { fake, driver, layout, queue, options, notified };
}

/** Bytes 0..n-1 of a recognisable pattern starting at `seed`. */
export function pattern(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = (seed + i * 7) & 0xff;
  return out;
}

/** Pop every available chain (throws if more than `limit`). */
export function drain(queue: Virtqueue, limit = 1 << 16): DescriptorChain[] {
  const out: DescriptorChain[] = [];
  for (let chain; (chain = queue.pop()) !== null; ) {
    out.push(chain);
    if (out.length > limit) throw new Error('drain did not end');
  }
  return out;
}

/** A small seeded PRNG (mulberry32): `next(n)` is an integer in 0..n-1. Same seed, same sequence. */
export function seededRandom(seed: number): { next(n: number): number; float(): number } {
  let state = seed >>> 0;
  const float = (): number => {
    state = (state + 0x6d2b79f5) >>> 0;
    let z = state;
    z = Math.imul(z ^ (z >>> 15), z | 1);
    z ^= z + Math.imul(z ^ (z >>> 7), z | 61);
    return ((z ^ (z >>> 14)) >>> 0) / 4294967296;
  };
  return { float, next: (n: number) => Math.floor(float() * n) };
}
