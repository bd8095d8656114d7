import test from 'ava';

import { QueueUsageError, RingError } from '../../../lib/errors';
import { GuestMemory } from '../../../lib/memory/guest-memory';
import { HeldBuffers, createVirtqueue, type DescriptorChain, type Virtqueue, type VirtqueueOptions } from '../../../lib/virtqueue';
import {
  PackedDriverRing,
  SplitDriverRing,
  packedRingLayout,
  splitRingLayout,
  type DriverBuffer,
  type GuestPhysAccess,
  type UsedElement,
} from '../../helpers/driver-ring';
import { DEFAULT_REGIONS, FakeGuestMemory } from '../../helpers/fake-guest-memory';
import { R0_DATA, R1_DATA, R2_DATA, RING_GPA, pattern } from './setup';

/** The driver's view of guest memory, switched to the new fake when the backend's map is replaced. */
class CurrentMemory implements GuestPhysAccess {
  constructor(public fake: FakeGuestMemory) {}
  read(gpa: number, len: number): Uint8Array {
    return this.fake.read(gpa, len);
  }
  write(gpa: number, bytes: Uint8Array): void {
    this.fake.write(gpa, bytes);
  }
}

interface Driver {
  addChain(buffers: readonly DriverBuffer[], options?: { indirect?: number }): number;
  publish(): void;
  takeUsed(): UsedElement[];
}

interface Rig {
  packed: boolean;
  guest: CurrentMemory;
  driver: Driver;
  queue: Virtqueue;
  /** Build the queue the next start would build (GET_VRING_BASE then SET_VRING_BASE with `base`). */
  restart(base: number): Virtqueue;
}

/** A queue of `size` over a fake guest; split rings start at free-running index `splitStart`. */
function rig(packed: boolean, size = 8, splitStart = 0): Rig {
  const fake = new FakeGuestMemory();
  const guest = new CurrentMemory(fake);
  let driver: Driver;
  let options: VirtqueueOptions;
  const common = { size, memory: fake.memory, eventIdx: false, indirect: true, notify: () => undefined };
  if (packed) {
    const layout = packedRingLayout(size, RING_GPA);
    driver = new PackedDriverRing(guest, { size, ...layout });
    const addresses = { descUserAddr: fake.userAddr(layout.desc), availUserAddr: fake.userAddr(layout.driverEvent), usedUserAddr: fake.userAddr(layout.deviceEvent) };
    options = { ...common, addresses, base: 0x8000_8000 };
  } else {
    const layout = splitRingLayout(size, RING_GPA);
    driver = new SplitDriverRing(guest, { size, ...layout, startIdx: splitStart });
    const addresses = { descUserAddr: fake.userAddr(layout.desc), availUserAddr: fake.userAddr(layout.avail), usedUserAddr: fake.userAddr(layout.used) };
    options = { ...common, addresses, base: splitStart };
  }
  const queue = createVirtqueue(options, packed);
  const restart = (base: number): Virtqueue => createVirtqueue({ ...options, memory: guest.fake.memory, base }, packed);
  return { packed, guest, driver, queue, restart };
}

/** Pop a chain the test made available (throws when the ring looks empty). */
function popOne(queue: Virtqueue): DescriptorChain {
  const chain = queue.pop();
  if (chain === null) throw new Error('nothing to pop');
  return chain;
}

function readable(chain: DescriptorChain): Uint8Array {
  const out = new Uint8Array(chain.readableLength);
  chain.read(0, out);
  return out;
}

const layouts = [
  { name: 'split', packed: false },
  { name: 'packed', packed: true },
] as const;

for (const { name, packed } of layouts) {
  for (const indirect of [false, true]) {
    test(`${name}${indirect ? ', indirect' : ''}: a held chain taken after the memory table was replaced reads and writes through the new mapping`, (t) => {
      const { guest, driver, queue } = rig(packed);
      const old = guest.fake;
      old.write(R2_DATA, pattern(16, 1));
      const id = driver.addChain(
        [
          { addr: R2_DATA, len: 16 },
          { addr: R1_DATA + 0x100, len: 32, writable: true },
        ],
        indirect ? { indirect: R0_DATA } : {},
      );
      driver.publish();
      const held = new HeldBuffers(queue);
      held.hold(popOne(queue));
      t.is(held.count, 1);

      // SET_MEM_TABLE with the same memfds: new mappings (region 1 now sits 0x5000 into its mapping),
      // the old map is closed and its regions released.
      const remapped = old.remapped(DEFAULT_REGIONS.map((r, i) => (i === 1 ? { ...r, mappingOffset: 0x5000 } : r)));
      guest.fake = remapped;
      queue.setMemory(remapped.memory);
      old.memory.close();
      t.true(
        old.regions.every((r) => r.refs === 1),
        'the old map holds no region: nothing pinned it',
      );
      const before = old.snapshot();

      const chain = held.take();
      if (chain === null) return t.fail();
      t.is(held.count, 0);
      t.is(chain.head, id);
      t.is(chain.memory, remapped.memory);
      for (let i = 0; i < chain.segments; i++) {
        t.true(remapped.containsSegment(chain.memory.views[chain.viewId[i]!]!, chain.offset[i]!, chain.length[i]!, chain.address(i)));
      }
      t.deepEqual(readable(chain), pattern(16, 1));
      t.is(chain.write(0, pattern(32, 2)), 32);
      queue.pushUsed(chain, 32);
      queue.flush();
      t.deepEqual(
        driver.takeUsed().map((u) => ({ id: u.id, len: u.len })),
        [{ id, len: 32 }],
      );
      t.deepEqual(remapped.read(R1_DATA + 0x100, 32), pattern(32, 2), 'the bytes are in guest memory as mapped now');
      t.deepEqual(old.changedSince(before), [], 'nothing went through the old mapping');
      t.true(remapped.guardsIntact());
      t.is(queue.inFlight, 0);
    });
  }

  test(`${name}: taking a held chain whose memory was removed throws RingError and leaves it unheld`, (t) => {
    const { guest, driver, queue } = rig(packed);
    driver.addChain([{ addr: R2_DATA, len: 16, writable: true }]);
    driver.publish();
    const held = new HeldBuffers(queue);
    held.hold(popOne(queue));
    // REM_MEM_REG of region 2 (the rings stay in region 0).
    queue.setMemory(new GuestMemory(guest.fake.regions.slice(0, 2)));
    t.is(t.throws(() => held.take(), { instanceOf: RingError })?.code, 'VIRTQ_BAD_DESCRIPTOR');
    t.is(held.count, 0);
  });

  test(`${name}: returnAll gives the held buffers back; a queue restarted from base() pops them again`, (t) => {
    const { guest, driver, queue, restart } = rig(packed);
    const chains = [0, 1, 2].map((k) => {
      guest.write(R0_DATA + 0x100 * k, pattern(8, 10 + k));
      return driver.addChain([
        { addr: R0_DATA + 0x100 * k, len: 8 },
        { addr: R1_DATA + 0x100 * k, len: 8, writable: true },
      ]);
    });
    driver.publish();
    const baseBefore = queue.base();
    const first = popOne(queue);
    queue.pushUsed(first, 0);
    queue.flush();
    const baseAfterFirst = queue.base();
    t.deepEqual(
      driver.takeUsed().map((u) => u.id),
      [chains[0]],
    );
    const held = new HeldBuffers(queue);
    held.hold(popOne(queue));
    held.hold(popOne(queue));
    t.is(queue.inFlight, 2);
    t.not(queue.base(), baseAfterFirst);

    held.returnAll();
    t.is(held.count, 0);
    t.is(queue.inFlight, 0);
    t.is(queue.base(), baseAfterFirst, 'GET_VRING_BASE now reports the position of the oldest held buffer');
    t.not(queue.base(), baseBefore);
    t.is(queue.counters.requests, 1, 'a buffer given back is not counted as a request');

    const next = restart(queue.base());
    const again = [popOne(next), popOne(next)];
    t.deepEqual(
      again.map((c) => c.head),
      [chains[1], chains[2]],
    );
    t.deepEqual(
      again.map((c) => readable(c)),
      [pattern(8, 11), pattern(8, 12)],
    );
    t.is(next.pop(), null);
  });

  test(`${name}: only the latest popped chain still in flight goes back to the ring`, (t) => {
    const { driver, queue } = rig(packed);
    for (let k = 0; k < 3; k++) driver.addChain([{ addr: R0_DATA + 0x100 * k, len: 8, writable: true }]);
    driver.publish();
    const a = popOne(queue);
    const afterA = queue.base();
    const b = popOne(queue);
    const afterB = queue.base();
    const c = popOne(queue);

    t.is(t.throws(() => queue.unpop(a), { instanceOf: QueueUsageError })?.code, 'VIRTQ_UNPOP_NOT_LATEST');
    t.is(queue.inFlight, 3, 'a refused unpop changes nothing');
    queue.unpop(c);
    t.is(queue.base(), afterB);
    t.is(t.throws(() => queue.unpop(c), { instanceOf: QueueUsageError })?.code, 'VIRTQ_NOT_IN_FLIGHT');

    // b used while a is held: a cannot go back without b coming back too.
    const held = new HeldBuffers(queue);
    held.hold(a);
    queue.pushUsed(b, 0);
    t.is(t.throws(() => held.returnAll(), { instanceOf: QueueUsageError })?.code, 'VIRTQ_UNPOP_NOT_LATEST');
    t.is(held.count, 1, 'the chain that could not go back is still held');
    t.is(queue.base(), afterB);
    t.is(t.throws(() => queue.rewalk(b), { instanceOf: QueueUsageError })?.code, 'VIRTQ_NOT_IN_FLIGHT');
    t.not(afterA, afterB);
  });
}

test('packed: a held chain whose ring slots were overwritten by later used descriptors is still walked right', (t) => {
  const { guest, driver, queue } = rig(true);
  guest.write(R0_DATA, pattern(24, 5));
  // Slots 0 and 1.
  const idA = driver.addChain([
    { addr: R0_DATA, len: 24 },
    { addr: R1_DATA, len: 40, writable: true },
  ]);
  // Slot 2.
  const idB = driver.addChain([{ addr: R2_DATA, len: 4, writable: true }]);
  driver.publish();
  const held = new HeldBuffers(queue);
  held.hold(popOne(queue));
  const b = popOne(queue);
  queue.pushUsed(b, 4);
  queue.flush();
  // §2.8.6: B's used descriptor went to slot 0, over A's first descriptor.
  t.deepEqual(
    driver.takeUsed().map((u) => u.id),
    [idB],
  );
  const a = held.take();
  if (a === null) return t.fail();
  t.is(a.head, idA);
  t.is(a.ringDescriptors, 2);
  t.is(a.readableLength, 24);
  t.is(a.writableLength, 40);
  t.deepEqual(readable(a), pattern(24, 5));
  a.write(0, pattern(40, 6));
  queue.pushUsed(a, 40);
  queue.flush();
  t.deepEqual(
    driver.takeUsed().map((u) => ({ id: u.id, len: u.len })),
    [{ id: idA, len: 40 }],
  );
  t.deepEqual(guest.read(R1_DATA, 40), pattern(40, 6));
});

test('packed: a chain given back across the ring end moves the position and the wrap counter back', (t) => {
  const size = 4;
  const { guest, driver, queue, restart } = rig(true, size);
  // Take slots 0..2 once round, so the next chain occupies slots 3 and 0 (crossing the wrap).
  driver.addChain([
    { addr: R0_DATA, len: 8 },
    { addr: R0_DATA + 8, len: 8 },
    { addr: R0_DATA + 16, len: 8, writable: true },
  ]);
  driver.publish();
  queue.pushUsed(popOne(queue), 0);
  queue.flush();
  driver.takeUsed();
  t.is(queue.base() & 0xffff, 3 | (1 << 15), 'next avail slot 3, wrap counter 1');

  guest.write(R2_DATA, pattern(12, 9));
  const id = driver.addChain([
    { addr: R2_DATA, len: 12 },
    { addr: R1_DATA, len: 20, writable: true },
  ]);
  driver.publish();
  const held = new HeldBuffers(queue);
  const chain = popOne(queue);
  t.is(chain.ringDescriptors, 2);
  held.hold(chain);
  t.is(queue.base() & 0xffff, 1, 'past the ring end: slot 1, wrap counter 0');

  const usedHalf = queue.base() >>> 16;
  held.returnAll();
  t.is(queue.base() & 0xffff, 3 | (1 << 15));
  t.is(queue.base() >>> 16, usedHalf, 'the used position does not move');

  const next = restart(queue.base());
  const again = popOne(next);
  t.is(again.head, id);
  t.is(again.ringDescriptors, 2);
  t.deepEqual(readable(again), pattern(12, 9));
  again.write(0, pattern(20, 3));
  next.pushUsed(again, 20);
  next.flush();
  t.deepEqual(
    driver.takeUsed().map((u) => ({ id: u.id, len: u.len })),
    [{ id, len: 20 }],
  );
  t.deepEqual(guest.read(R1_DATA, 20), pattern(20, 3));
});

test('split: indexes given back across 2^16 wrap back too', (t) => {
  const { driver, queue, restart } = rig(false, 8, 0xffff);
  const heads = [driver.addChain([{ addr: R0_DATA, len: 4 }]), driver.addChain([{ addr: R0_DATA + 4, len: 4 }])];
  driver.publish();
  const held = new HeldBuffers(queue);
  held.hold(popOne(queue));
  held.hold(popOne(queue));
  t.is(queue.base(), 1);
  held.returnAll();
  t.is(queue.base(), 0xffff);
  const next = restart(queue.base());
  t.deepEqual(
    [popOne(next).head, popOne(next).head],
    heads,
  );
});
