/**
 * Inflight tracking on a packed ring (vhost-user.rst "Inflight I/O tracking", QueueRegionPacked): a
 * queue that dies is replaced by a new one over the same guest memory and area, built with the base
 * QEMU gives after a crash (the base of the last start: QEMU has no packed ring state to give back),
 * and the new one resubmits exactly the chains whose completion the driver never saw, oldest first,
 * from the descriptor copies in the area, and puts its used descriptors where the driver looks next.
 * Crashes are placed between the stores of a pop, of a publish and of an unpop (PackedInflight's
 * methods are wrapped to die at those points); a randomized run dies at random points over many
 * laps. Areas that break a rule fail the queue with VIRTQ_BAD_INFLIGHT.
 */
import test from 'ava';

import { RingError } from '../../../lib/errors';
import { createVirtqueue, type Virtqueue } from '../../../lib/virtqueue';
import type { DescriptorChain } from '../../../lib/virtqueue/descriptor-chain';
import { inflightQueueBytes, PackedInflight } from '../../../lib/virtqueue/inflight';
import { packedSetup, R0_DATA, seededRandom } from './setup';

const SIZE = 8;
/** A fresh packed ring's base (indexes 0, wrap counters 1): what QEMU hands back after a crash. */
const FRESH_BASE = 0x8000_8000;

type Setup = ReturnType<typeof packedSetup>;

class Crash extends Error {}

/** The driver's view: what it offered and has not seen completed, by buffer id (serial, descriptors). */
class Guest {
  readonly outstanding = new Map<number, number>();
  readonly completed: number[] = [];
  private serial = 0;

  constructor(readonly setup: Setup) {}

  /** Offer a chain of 2 or 3 descriptors: readable 8 bytes (one or two buffers) naming its serial, writable 8. */
  offer(three = false): number {
    const serial = this.serial++;
    const id = this.setup.driver.addChain(
      three
        ? [
            { addr: this.bufferOf(serial), len: 4 },
            { addr: this.bufferOf(serial) + 4, len: 4 },
            { addr: this.bufferOf(serial) + 0x800, len: 8, writable: true },
          ]
        : [
            { addr: this.bufferOf(serial), len: 8 },
            { addr: this.bufferOf(serial) + 0x800, len: 8, writable: true },
          ],
    );
    this.setup.fake.write(this.bufferOf(serial), label(serial));
    this.outstanding.set(id, serial);
    this.setup.driver.publish();
    return id;
  }

  /** Take the used descriptors: each must name a chain in flight, with its own label written back. */
  takeUsed(): number[] {
    const ids: number[] = [];
    for (const { id } of this.setup.driver.takeUsed()) {
      const serial = this.outstanding.get(id);
      if (serial === undefined) throw new Error(`used id ${id} is not in flight (completed twice?)`);
      const written = this.setup.fake.read(this.bufferOf(serial) + 0x800, 8);
      if (!written.every((b, i) => b === label(serial)[i])) throw new Error(`chain ${serial} (id ${id}) came back with the wrong data`);
      this.outstanding.delete(id);
      this.completed.push(serial);
      ids.push(id);
    }
    return ids;
  }

  private bufferOf(serial: number): number {
    return R0_DATA + 0x1000 * (serial % 64);
  }
}

function label(serial: number): Uint8Array {
  return Uint8Array.from({ length: 8 }, (_, i) => (serial * 8 + i) & 0xff);
}

/** The device: copies the chain's readable label into its writable part. */
function complete(queue: Virtqueue, chain: DescriptorChain): void {
  const bytes = new Uint8Array(8);
  chain.read(0, bytes);
  chain.write(0, bytes);
  queue.pushUsed(chain, 8);
}

/** The queue a (re)started daemon builds: same memory and area, QEMU's stale base. */
function start(setup: Setup, inflight: Uint8Array): Virtqueue {
  return createVirtqueue({ ...setup.options, base: FRESH_BASE, inflight }, true);
}

function popAll(queue: Virtqueue): DescriptorChain[] {
  const out: DescriptorChain[] = [];
  for (let chain = queue.pop(); chain !== null; chain = queue.pop()) out.push(chain);
  return out;
}

/** Run `body` with PackedInflight's `method` replaced by `wrapped` (called with the original). */
function withPatched<K extends 'popped' | 'publishing' | 'published' | 'unpopped'>(
  method: K,
  wrapped: (self: PackedInflight, original: PackedInflight[K], args: Parameters<PackedInflight[K]>) => unknown,
  body: () => void,
): void {
  const proto = PackedInflight.prototype;
  const original = proto[method];
  (proto as unknown as Record<string, unknown>)[method] = function (this: PackedInflight, ...args: Parameters<PackedInflight[K]>) {
    return wrapped(this, original, args);
  };
  try {
    body();
  } finally {
    (proto as unknown as Record<string, unknown>)[method] = original;
  }
}

function words(inflight: Uint8Array): { u8: Uint8Array; u16: Uint16Array; u32: Uint32Array } {
  return { u8: inflight, u16: new Uint16Array(inflight.buffer), u32: new Uint32Array(inflight.buffer) };
}

test('a fresh area is initialized from the base: version, size, a free list of every entry, used position and wrap', (t) => {
  const inflight = new Uint8Array(inflightQueueBytes(SIZE));
  const setup = packedSetup({ size: SIZE });
  const queue = start(setup, inflight);
  const { u8, u16 } = words(inflight);
  t.is(u16[4], 1, 'version');
  t.is(u16[5], SIZE, 'desc_num');
  t.deepEqual([u16[6], u16[7], u16[8], u16[9], u8[20], u8[21]], [0, 0, 0, 0, 1, 1]);
  t.deepEqual(
    Array.from({ length: SIZE }, (_, e) => u16[(32 + 32 * e + 2) / 2]),
    Array.from({ length: SIZE }, (_, e) => e + 1),
  );
  t.is(queue.pop(), null, 'nothing to resubmit');
});

test('chains in flight at a crash come back first, in pop order, from the area; then the new ones; each completes once', (t) => {
  const inflight = new Uint8Array(inflightQueueBytes(SIZE));
  const setup = packedSetup({ size: SIZE });
  const guest = new Guest(setup);
  const first = start(setup, inflight);
  // Two laps of traffic first, so that the crash happens past a wrap of both counters.
  for (let i = 0; i < 2 * SIZE; i++) {
    guest.offer(i % 3 === 0);
    for (const chain of popAll(first)) complete(first, chain);
    first.flush();
    guest.takeUsed();
  }
  const ids = [guest.offer(), guest.offer(true), guest.offer()];
  const popped = popAll(first);
  t.deepEqual(
    popped.map((c) => c.head),
    ids,
  );
  complete(first, popped[1]!);
  first.flush();
  t.deepEqual(guest.takeUsed(), [ids[1]]);
  const later = guest.offer(true);
  // The process dies; the ring's slots of the popped chains were partly overwritten by a used
  // descriptor, so only the area still knows their descriptors.

  const second = start(setup, inflight);
  const again = popAll(second);
  t.deepEqual(
    again.map((c) => c.head),
    [ids[0], ids[2], later],
    'the two left in flight, oldest first, then the one offered meanwhile',
  );
  for (const chain of again.reverse()) complete(second, chain);
  second.flush();
  t.deepEqual(guest.takeUsed().sort(), [ids[0], ids[2], later].sort());
  t.is(guest.outstanding.size, 0);
  // The ring goes on where the driver is.
  const next = guest.offer();
  const chain = second.pop()!;
  t.is(chain.head, next);
  complete(second, chain);
  second.flush();
  t.deepEqual(guest.takeUsed(), [next]);
});

/** Pop three chains, complete the first and third in one batch, crash in `crash`; return the guest after a restart drained everything. */
function crashInPublish(t: import('ava').ExecutionContext, method: 'publishing' | 'published', when: 'before' | 'after' | 'midway', expectResubmitted: 'batch' | 'rest'): void {
  const inflight = new Uint8Array(inflightQueueBytes(SIZE));
  const setup = packedSetup({ size: SIZE });
  const guest = new Guest(setup);
  const first = start(setup, inflight);
  const ids = [guest.offer(), guest.offer(true), guest.offer()];
  const [a, , c] = popAll(first);
  complete(first, a!);
  complete(first, c!);
  const { u8, u16 } = words(inflight);
  withPatched(
    method,
    (self, original, args) => {
      if (when === 'before') throw new Crash();
      const before = { oldUsedIdx: u16[9]!, oldWrap: u8[21]! };
      (original as (...a: unknown[]) => void).apply(self, args);
      // midway through the commit: old_free_head stored, old_used_idx and the old wrap not yet.
      if (when === 'midway') {
        u16[9] = before.oldUsedIdx;
        u8[21] = before.oldWrap;
      }
      throw new Crash();
    },
    () => t.throws(() => first.flush(), { instanceOf: Crash }),
  );
  const seenBefore = guest.takeUsed();
  const second = start(setup, inflight);
  const again = popAll(second).map((chain) => {
    complete(second, chain);
    return chain.head;
  });
  second.flush();
  guest.takeUsed();
  if (expectResubmitted === 'batch') {
    t.deepEqual(seenBefore, [], 'the driver saw nothing of the batch');
    t.deepEqual(again, ids, 'the batch and the chain still in flight, in pop order');
  } else {
    t.deepEqual(seenBefore, [ids[0], ids[2]], 'the driver saw the batch');
    t.deepEqual(again, [ids[1]], 'only the chain still in flight');
  }
  t.is(guest.outstanding.size, 0, 'every chain completed exactly once');
}

test('crash in a publish before anything was written: the batch is resubmitted', (t) => crashInPublish(t, 'publishing', 'before', 'batch'));
test('crash after the free list and used_idx moved, before the used flags went out: rolled back and resubmitted', (t) =>
  crashInPublish(t, 'publishing', 'after', 'batch'));
test('crash after the used flags went out, before inflight was cleared: committed, not resubmitted', (t) => crashInPublish(t, 'published', 'before', 'rest'));
test('crash in the middle of the commit (old_free_head stored, old_used_idx not): committed, not resubmitted', (t) =>
  crashInPublish(t, 'published', 'midway', 'rest'));

test('crash in the middle of a pop (before old_free_head): the chain is popped again from the ring, not resubmitted', (t) => {
  const inflight = new Uint8Array(inflightQueueBytes(SIZE));
  const setup = packedSetup({ size: SIZE });
  const guest = new Guest(setup);
  const first = start(setup, inflight);
  const ids = [guest.offer(), guest.offer(true)];
  first.pop();
  const { u16 } = words(inflight);
  withPatched(
    'popped',
    (self, original, args) => {
      const oldFreeHead = u16[7]!;
      (original as (...a: unknown[]) => number).apply(self, args);
      u16[7] = oldFreeHead; // every store but the last
      throw new Crash();
    },
    () => t.throws(() => first.pop(), { instanceOf: Crash }),
  );
  const second = start(setup, inflight);
  t.deepEqual(
    popAll(second).map((c) => c.head),
    ids,
    'the first resubmitted, the second read from the ring again',
  );
});

test('a resubmitted chain given back (unpop) is popped again before the ring and completes once', (t) => {
  const inflight = new Uint8Array(inflightQueueBytes(SIZE));
  const setup = packedSetup({ size: SIZE });
  const guest = new Guest(setup);
  const first = start(setup, inflight);
  const [a, b, c] = [guest.offer(), guest.offer(true), guest.offer()];
  const popped = popAll(first);
  // The middle one completes: the two in flight at the crash are not the ring's last chains.
  complete(first, popped[1]!);
  first.flush();
  t.deepEqual(guest.takeUsed(), [b]);
  const d = guest.offer();

  const second = start(setup, inflight);
  const held = second.pop()!;
  t.is(held.head, a);
  second.unpop(held);
  t.is(second.inFlight, 0);
  const again = popAll(second);
  t.deepEqual(
    again.map((chain) => chain.head),
    [a, c, d],
    'the given-back chain first, then the other resubmitted one, then the new one',
  );
  for (const chain of again) complete(second, chain);
  second.flush();
  t.deepEqual(guest.takeUsed().sort(), [a, c, d].sort(), 'each completed once');
  t.is(guest.outstanding.size, 0);
});

test('an unpopped chain is not resubmitted, even after a crash between its two stores', (t) => {
  for (const midway of [false, true]) {
    const inflight = new Uint8Array(inflightQueueBytes(SIZE));
    const setup = packedSetup({ size: SIZE });
    const guest = new Guest(setup);
    const first = start(setup, inflight);
    const ids = [guest.offer(), guest.offer(true)];
    first.pop();
    const held = first.pop()!;
    withPatched(
      'unpopped',
      (self, original, args) => {
        if (!midway) return (original as (...a: unknown[]) => void).apply(self, args);
        // free_head and old_free_head moved back, inflight not yet cleared.
        const { u16 } = words(inflight);
        u16[6] = args[0] as number;
        u16[7] = args[0] as number;
        throw new Crash();
      },
      () => {
        try {
          first.unpop(held);
        } catch (err) {
          if (!(err instanceof Crash)) throw err;
        }
      },
    );
    const second = start(setup, inflight);
    t.deepEqual(
      popAll(second).map((c) => c.head),
      ids,
      midway ? 'crash midway' : 'clean unpop',
    );
  }
});

test('a clean stop clears the record: the next start takes the base, in either layout', (t) => {
  const inflight = new Uint8Array(inflightQueueBytes(SIZE));
  const setup = packedSetup({ size: SIZE });
  const guest = new Guest(setup);
  const first = start(setup, inflight);
  guest.offer();
  for (const chain of popAll(first)) complete(first, chain);
  first.flush();
  guest.takeUsed();
  first.clearInflight();
  t.is(new Uint16Array(inflight.buffer)[4], 0, 'version 0: uninitialized');
  const second = createVirtqueue({ ...setup.options, base: first.base(), inflight }, true);
  const id = guest.offer();
  t.is(second.pop()?.head, id);
  // With a chain in flight the record stays.
  second.clearInflight();
  t.is(new Uint16Array(inflight.buffer)[4], 1);
});

test('randomized: crashes at random points over many laps never lose or repeat a completion', (t) => {
  const random = seededRandom(0x1f1);
  const inflight = new Uint8Array(inflightQueueBytes(SIZE));
  const setup = packedSetup({ size: SIZE });
  const guest = new Guest(setup);
  let queue = start(setup, inflight);
  let held: DescriptorChain[] = [];
  let crashes = 0;
  let resubmitted = 0;
  for (let step = 0; step < 8000; step++) {
    const action = random.next(10);
    if (action < 4 && setup.driver.freeSlots >= 3) {
      guest.offer(random.next(2) === 0);
    } else if (action < 6) {
      const chain = queue.pop();
      if (chain !== null) held.push(chain);
    } else if (action < 8 && held.length > 0) {
      complete(queue, held.splice(random.next(held.length), 1)[0]!);
    } else if (action === 8) {
      // Crash, sometimes inside the publish of a batch.
      const where = random.next(3);
      if (where === 0) {
        queue.flush();
      } else {
        withPatched(
          where === 1 ? 'publishing' : 'published',
          () => {
            throw new Crash();
          },
          () => {
            try {
              queue.flush();
            } catch (err) {
              if (!(err instanceof Crash)) throw err;
            }
          },
        );
      }
      guest.takeUsed();
      const inFlight = guest.outstanding.size;
      queue = start(setup, inflight);
      held = [];
      crashes++;
      resubmitted += inFlight;
    } else {
      queue.flush();
      guest.takeUsed();
    }
  }
  for (let round = 0; guest.outstanding.size > 0 && round < 10; round++) {
    for (const chain of [...held, ...popAll(queue)]) complete(queue, chain);
    held = [];
    queue.flush();
    guest.takeUsed();
  }
  t.true(crashes > 100, `${crashes} crashes`);
  t.true(resubmitted > 100, `${resubmitted} chains in flight at a crash`);
  t.is(guest.outstanding.size, 0, 'every chain offered came back exactly once');
  t.true(guest.completed.length > 600, `${guest.completed.length} chains completed`);
});

const hostile: { name: string; corrupt(u8: Uint8Array, u16: Uint16Array, u32: Uint32Array): void }[] = [
  { name: 'version 2', corrupt: (_u8, u16) => void (u16[4] = 2) },
  { name: 'unknown feature flags', corrupt: (_u8, _u16, u32) => void (u32[1] = 1) },
  { name: 'desc_num not the queue size', corrupt: (_u8, u16) => void (u16[5] = SIZE + 1) },
  { name: 'free_head past the ring (CVE-2021-3839 class)', corrupt: (_u8, u16) => void (u16[6] = u16[7] = 0x7fff) },
  { name: 'used_idx past the ring', corrupt: (_u8, u16) => void (u16[8] = u16[9] = SIZE) },
  { name: 'a wrap counter of 2', corrupt: (u8) => void (u8[20] = u8[21] = 2) },
  { name: 'an inflight flag of 7 on an entry of a chain', corrupt: (u8) => void (u8[32 + 32 * 1] = 7) },
  { name: 'a free list that loops', corrupt: (_u8, u16) => void (u16[(32 + 32 * 6 + 2) / 2] = 4) },
  { name: 'a free-list link past the ring', corrupt: (_u8, u16) => void (u16[(32 + 32 * 6 + 2) / 2] = 0x4000) },
  { name: 'a free list running into a chain in flight', corrupt: (_u8, u16) => void (u16[(32 + 32 * 7 + 2) / 2] = 2) },
  { name: 'entries neither free nor in flight', corrupt: (_u8, u16) => void (u16[(32 + 32 * 5 + 2) / 2] = SIZE) },
  { name: 'a chain of 0 descriptors', corrupt: (u8, u16) => void ((u8[32 + 32 * 0] = 1), (u16[(32 + 32 * 0 + 6) / 2] = 0)) },
  { name: 'a chain longer than the ring', corrupt: (u8, u16) => void ((u8[32 + 32 * 0] = 1), (u16[(32 + 32 * 0 + 6) / 2] = SIZE + 1)) },
  {
    name: 'a counter of 2^53 or more',
    corrupt: (_u8, _u16, u32) => void (u32[(32 + 32 * 0 + 8) / 4 + 1] = 0x0020_0000),
  },
  {
    name: 'two chains with the same counter',
    corrupt: (_u8, _u16, u32) => {
      u32[(32 + 32 * 0 + 8) / 4] = 9;
      u32[(32 + 32 * 2 + 8) / 4] = 9;
    },
  },
  { name: 'a head naming another entry as its last', corrupt: (_u8, u16) => void (u16[(32 + 32 * 0 + 4) / 2] = 7) },
  { name: 'NEXT on the last descriptor of a chain', corrupt: (_u8, u16) => void (u16[(32 + 32 * 1 + 18) / 2] = 0x8003) },
];

for (const row of hostile) {
  test(`an area with ${row.name} fails the queue with VIRTQ_BAD_INFLIGHT`, (t) => {
    const inflight = new Uint8Array(inflightQueueBytes(SIZE));
    const setup = packedSetup({ size: SIZE });
    const guest = new Guest(setup);
    const first = start(setup, inflight);
    // Two chains of two descriptors in flight: entries 0-1 and 2-3, the free list 4..7.
    guest.offer();
    guest.offer();
    popAll(first);
    row.corrupt(inflight, new Uint16Array(inflight.buffer), new Uint32Array(inflight.buffer));
    const err = t.throws(() => start(setup, inflight), { instanceOf: RingError });
    t.is(err?.code, 'VIRTQ_BAD_INFLIGHT');
  });
}

test('an area too small for a packed ring fails the queue', (t) => {
  const setup = packedSetup({ size: SIZE });
  const err = t.throws(() => start(setup, new Uint8Array(16 + 16 * SIZE)), { instanceOf: RingError });
  t.is(err?.code, 'VIRTQ_BAD_INFLIGHT');
});

test('more descriptors in flight than the ring has slots (a driver reusing slots) fails the pop', (t) => {
  const inflight = new Uint8Array(inflightQueueBytes(4));
  const setup = packedSetup({ size: 4 });
  const guest = new Guest(setup);
  const queue = start(setup, inflight);
  guest.offer(true);
  queue.pop();
  // The driver makes slot 3 and then slots 0.. (still the device's) available again: 3 + 3 descriptors.
  setup.driver.writeDescriptor(3, { addr: R0_DATA, len: 4, id: 5, flags: 0x80 | 0x1 });
  setup.driver.writeDescriptor(0, { addr: R0_DATA, len: 4, id: 5, flags: 0x8000 | 0x1 });
  setup.driver.writeDescriptor(1, { addr: R0_DATA + 0x800, len: 4, id: 5, flags: 0x8000 | 0x2 });
  const err = t.throws(() => queue.pop(), { instanceOf: RingError });
  t.is(err?.code, 'VIRTQ_TOO_MANY_IN_FLIGHT');
});
