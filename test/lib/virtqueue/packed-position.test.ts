/**
 * A packed ring without an inflight area resumes where its descriptor ring shows the device stood
 * (packed-position.ts): synthetic rings for the reading itself, and rings a device left behind (a
 * daemon gone with chains popped) picked up by a new queue told the stale base QEMU sends.
 */
import test from 'ava';

import { createVirtqueue } from '../../../lib/virtqueue';
import { findPackedPosition } from '../../../lib/virtqueue/packed-position';
import {
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
} from '../../../lib/virtio/constants';
import { R0_DATA, drain, packedSetup, seededRandom } from './setup';

const A = VRING_PACKED_DESC_F_AVAIL;
const U = VRING_PACKED_DESC_F_USED;
/** Flags of a descriptor the driver made available in a lap with wrap `w` (§2.8.1). */
const avail = (w: number): number => (w === 1 ? A : U);
/** Flags of a descriptor the device used with wrap `w`. */
const used = (w: number): number => (w === 1 ? A | U : 0);

/** A descriptor ring (le16 words) with these flags, slot by slot; the other fields hold noise. */
function ring(flags: readonly number[]): Uint16Array {
  const desc16 = new Uint16Array(flags.length * 8);
  flags.forEach((f, slot) => {
    for (let w = 0; w < 7; w++) desc16[slot * 8 + w] = (slot * 31 + w * 7) & 0xffff;
    desc16[slot * 8 + 7] = f;
  });
  return desc16;
}

/**
 * The flags a well-behaved driver and device leave: the device at slot `index` with wrap `wrap`, the
 * driver `ahead` slots further (0..size), every chain one descriptor. `extra` bits (NEXT, WRITE...) go
 * on every slot: only AVAIL and USED say where the sides stand.
 */
function modelRing(size: number, index: number, wrap: number, ahead: number, extra = 0): Uint16Array {
  const flags: number[] = [];
  for (let slot = 0; slot < size; slot++) {
    // The slot's offset from the used position, in ring order, and the wrap of its lap there.
    const k = (slot - index + size) % size;
    const lapWrap = slot >= index ? wrap : wrap ^ 1;
    // Available: made so in the lap at the used position or after; used: in the lap before that.
    flags.push((k < ahead ? avail(lapWrap) : used(lapWrap ^ 1)) | extra);
  }
  return ring(flags);
}

test('a fresh ring (zeroed, as Linux and DPDK allocate it) reads as slot 0 with wrap 1', (t) => {
  t.deepEqual(findPackedPosition(ring(new Array<number>(8).fill(0)), 8), { index: 0, wrap: 1 });
  // Linux fills a fresh rx ring at once: every slot available in lap 1.
  t.deepEqual(findPackedPosition(ring(new Array<number>(8).fill(avail(1))), 8), { index: 0, wrap: 1 });
});

test('mid-lap, just wrapped, a full lap used, the driver re-posting slots of the next lap', (t) => {
  // Used up to slot 5 in lap 1; slots 5-7 available; slots 0-1 used and made available again (lap 0).
  t.deepEqual(findPackedPosition(ring([avail(0), avail(0), used(1), used(1), used(1), avail(1), avail(1), avail(1)]), 8), { index: 5, wrap: 1 });
  // The same with nothing available: the driver is behind.
  t.deepEqual(findPackedPosition(ring([used(1), used(1), used(1), used(1), used(1), used(0), used(0), used(0)]), 8), { index: 5, wrap: 1 });
  // Lap 1 done, the device wrapped (wrap 0 at slot 0); the driver re-posted slots 0-3.
  t.deepEqual(findPackedPosition(ring([avail(0), avail(0), avail(0), avail(0), used(1), used(1), used(1), used(1)]), 8), { index: 0, wrap: 0 });
  // Every slot used in lap 1, nothing made available again.
  t.deepEqual(findPackedPosition(ring(new Array<number>(8).fill(used(1))), 8), { index: 0, wrap: 0 });
  // In lap 0: used up to slot 3, the rest still available from lap 0.
  t.deepEqual(findPackedPosition(ring([used(0), used(0), used(0), avail(0), avail(0), avail(0), avail(0), avail(0)]), 8), { index: 3, wrap: 0 });
  // The whole ring available: lap 1 from slot 5 on, lap 0 before it.
  t.deepEqual(findPackedPosition(ring([avail(0), avail(0), avail(0), avail(0), avail(0), avail(1), avail(1), avail(1)]), 8), { index: 5, wrap: 1 });
  t.deepEqual(findPackedPosition(ring([used(1)]), 1), { index: 0, wrap: 0 });
});

test('every position, wrap and driver lead of a well-behaved ring reads back exactly', (t) => {
  for (const size of [1, 2, 8, 256]) {
    for (let index = 0; index < size; index++) {
      for (const wrap of [0, 1]) {
        for (let ahead = 0; ahead <= size; ahead += size > 8 ? 17 : 1) {
          for (const extra of [0, VRING_DESC_F_WRITE, VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT]) {
            const got = findPackedPosition(modelRing(size, index, wrap, ahead, extra), size);
            if (typeof got === 'string' || got.index !== index || got.wrap !== wrap) {
              t.fail(`size ${size} index ${index} wrap ${wrap} ahead ${ahead} extra ${extra}: ${JSON.stringify(got)}`);
              return;
            }
          }
        }
      }
    }
  }
  t.pass();
});

test('ambiguous rings are refused: a used chain of two descriptors, a batch never published', (t) => {
  // A two-descriptor chain at slots 2-3 used: slot 3 keeps the driver's flags of lap 1.
  const twoDescriptors = findPackedPosition(ring([used(1), used(1), used(1), avail(1), used(1), avail(1), avail(1), avail(1)]), 8);
  t.regex(String(twoDescriptors), /used flags change more than once \(at slots 3 and 4\)/);
  // A batch of used descriptors at 4-6 written, its first (slot 3) not published.
  const unpublished = findPackedPosition(ring([used(1), used(1), used(1), avail(1), used(1), used(1), used(1), avail(1)]), 8);
  t.is(typeof unpublished, 'string');
  // An available slot past the used run (the driver cannot skip slots).
  const gap = findPackedPosition(ring([used(1), used(1), avail(1), used(0), avail(1), used(0), used(0), used(0)]), 8);
  t.regex(String(gap), /slot 3 is used between the used position 2 and available slots after it/);
  t.is(findPackedPosition(new Uint16Array(8 * 4), 8), 'the descriptor ring is not mapped');
});

test('hostile flags: a refusal or a slot of the ring with a wrap of 0 or 1, never anything else', (t) => {
  const rand = seededRandom(808);
  let read = 0;
  for (let round = 0; round < 5000; round++) {
    const size = 1 + rand.next(16);
    // Mostly few distinct flag values, so that some rings read as a position.
    const choices = [0, A, U, A | U, rand.next(0x10000)];
    const flags = Array.from({ length: size }, () => choices[rand.next(choices.length)]!);
    const got = findPackedPosition(ring(flags), size);
    if (typeof got === 'string') continue;
    read++;
    if (!Number.isInteger(got.index) || got.index < 0 || got.index >= size || (got.wrap !== 0 && got.wrap !== 1)) {
      t.fail(`${JSON.stringify(flags)} gave ${JSON.stringify(got)}`);
      return;
    }
  }
  t.true(read > 100, `${read} rings read as a position`);
});

/**
 * A device runs `chains` single-descriptor chains through a ring of 8, completing all but the last
 * `popped`, and goes away; a new queue starts on the same ring with `base`, as QEMU restarts it.
 */
function restartAfter(chains: number, popped: number, base = 0x8000) {
  const s = packedSetup({ size: 8 });
  let left = chains;
  const held: ReturnType<typeof drain> = [];
  while (left > 0) {
    const n = Math.min(left, s.driver.freeSlots);
    for (let i = 0; i < n; i++) s.driver.addChain([{ addr: R0_DATA, len: 64, writable: true }]);
    s.driver.publish();
    left -= n;
    const got = drain(s.queue);
    // The last `popped` chains of the run stay popped.
    for (const c of got.splice(0, Math.max(0, got.length - (left === 0 ? popped : 0)))) s.queue.pushUsed(c, 10);
    held.push(...got);
    s.queue.flush();
    s.driver.takeUsed();
  }
  const heldIds = held.map((c) => c.head);
  const resumed = createVirtqueue({ ...s.options, base }, true);
  return { s, resumed, heldIds };
}

test('a new queue told the stale base 0x8000 resumes where the old device stood, and stays in step', (t) => {
  for (const [chains, popped] of [
    [5, 0], // mid-lap
    [8, 0], // just wrapped
    [8, 3], // three popped, the last three slots of the lap
    [21, 2], // mid-lap, third lap
    [30, 6],
  ] as const) {
    const { s, resumed, heldIds } = restartAfter(chains, popped);
    const usedAt = (chains - popped) % 8;
    const wrap = Math.floor((chains - popped) / 8) % 2 === 0 ? 1 : 0;
    t.is(resumed.base(), (usedAt | (wrap << 15) | (usedAt << 16) | (wrap << 31)) >>> 0, `${chains} chains, ${popped} popped`);
    t.is(resumed.resumeNote === null, usedAt === 0 && wrap === 1, `note only when the base was wrong: ${resumed.resumeNote}`);
    // The chains popped and never completed come again, first; then new ones, over three laps.
    let expected = [...heldIds];
    for (let round = 0; round < 6; round++) {
      const added: number[] = [];
      while (s.driver.freeSlots > 0 && added.length < 5) added.push(s.driver.addChain([{ addr: R0_DATA, len: 64, writable: true }]));
      s.driver.publish();
      expected = [...expected, ...added];
      const got = drain(resumed);
      t.deepEqual(
        got.map((c) => c.head),
        expected,
        `${chains} chains, ${popped} popped, round ${round}`,
      );
      for (const c of got) resumed.pushUsed(c, 10);
      resumed.flush();
      t.deepEqual(
        s.driver.takeUsed().map((u) => u.id),
        expected,
      );
      expected = [];
    }
  }
});

test('chains of several descriptors: the device marks their other slots used, so the ring still reads', (t) => {
  const s = packedSetup({ size: 8 });
  const twoDescriptors = (): number =>
    s.driver.addChain([
      { addr: R0_DATA, len: 8 },
      { addr: R0_DATA + 64, len: 8, writable: true },
    ]);
  // 2 + 1 + 2 + 2 descriptors, then a chain across the end of the ring: used at 7, its second slot 0.
  const ids = [twoDescriptors(), s.driver.addChain([{ addr: R0_DATA, len: 8 }]), twoDescriptors(), twoDescriptors()];
  s.driver.publish();
  for (const c of drain(s.queue)) s.queue.pushUsed(c, 8);
  s.queue.flush();
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    ids,
  );
  const last = twoDescriptors();
  s.driver.publish();
  for (const c of drain(s.queue)) s.queue.pushUsed(c, 8);
  s.queue.flush();
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    [last],
  );
  // Every slot shows "used" with its lap's wrap counter: slot 0 in lap 0, the others in lap 1.
  t.deepEqual(
    [0, 1, 2, 3, 4, 5, 6, 7].map((slot) => s.driver.descriptorFlags(slot) & (A | U)),
    [0, A | U, A | U, A | U, A | U, A | U, A | U, A | U],
  );
  const resumed = createVirtqueue({ ...s.options, base: 0x8000 }, true);
  t.is(resumed.base(), (1 | (0 << 15) | (1 << 16) | (0 << 31)) >>> 0);
  const next = twoDescriptors();
  s.driver.publish();
  const got = drain(resumed);
  t.deepEqual(
    got.map((c) => c.head),
    [next],
  );
  for (const c of got) resumed.pushUsed(c, 8);
  resumed.flush();
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    [next],
  );
});

test('a ring that does not read unambiguously keeps the base and says why; a right base changes nothing', (t) => {
  const s = packedSetup({ size: 8 });
  // A two-descriptor chain and a one-descriptor chain, used; then the second slot gets the driver's
  // flags back, as a device that skips those slots without marking them leaves it.
  s.driver.addChain([
    { addr: R0_DATA, len: 8 },
    { addr: R0_DATA + 64, len: 8, writable: true },
  ]);
  s.driver.addChain([{ addr: R0_DATA, len: 8 }]);
  s.driver.publish();
  for (const c of drain(s.queue)) s.queue.pushUsed(c, 8);
  s.queue.flush();
  s.driver.takeUsed();
  s.fake.write(s.layout.desc + 16 + 14, Uint8Array.of(A & 0xff, A >>> 8));
  const resumed = createVirtqueue({ ...s.options, base: 0x8000 }, true);
  t.is(resumed.base(), 0x8000_8000);
  t.regex(resumed.resumeNote ?? '', /not read from the descriptor ring \(the used flags change more than once.*resuming at the front-end's base 0x8000/);
  // The base of a clean stop names the position the ring shows: nothing to say.
  const { s: clean } = restartAfter(13, 0);
  t.is(createVirtqueue({ ...clean.options, base: clean.queue.base() }, true).resumeNote, null);
});
