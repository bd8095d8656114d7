import test from 'ava';

import { RingError } from '../../../lib/errors';
import { createVirtqueue } from '../../../lib/virtqueue';
import {
  VRING_DESC_F_WRITE,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
} from '../../../lib/virtio/constants';
import { PackedDriverRing, packedRingLayout } from '../../helpers/driver-ring';
import { FakeGuestMemory } from '../../helpers/fake-guest-memory';
import { R0_DATA, R0_END, R1_DATA, R2_DATA, drain, packedSetup, pattern, seededRandom, splitSetup } from './setup';

const USED = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;

test('pops a chained buffer across regions and writes one used descriptor the driver can read', (t) => {
  const { fake, driver, queue } = packedSetup();
  fake.write(R0_END - 10, pattern(20, 1));
  fake.write(R2_DATA + 0x40, pattern(8, 2));
  const id = driver.addChain(
    [
      { addr: R0_END - 10, len: 20 },
      { addr: R2_DATA + 0x40, len: 8 },
      { addr: R1_DATA + 0x800, len: 64, writable: true },
    ],
    { id: 5 },
  );
  t.is(queue.pop(), null, 'nothing is available before the first flags are written');
  driver.publish();
  const chain = queue.pop();
  if (chain === null) return t.fail();
  t.is(chain.head, id);
  t.is(chain.ringDescriptors, 3);
  t.is(chain.segments, 4);
  t.is(chain.readableLength, 28);
  const got = new Uint8Array(28);
  chain.read(0, got);
  t.deepEqual(got, Uint8Array.from([...pattern(20, 1), ...pattern(8, 2)]));
  chain.write(0, pattern(64, 3));
  queue.pushUsed(chain, 64);
  t.deepEqual(driver.takeUsed(), [], 'the batch is invisible before flush');
  t.is(queue.flush(), 1);
  t.deepEqual(driver.takeUsed(), [{ id: 5, len: 64, flags: USED | VRING_DESC_F_WRITE }]);
  t.deepEqual(fake.read(R1_DATA + 0x800, 64), pattern(64, 3));
  t.is(queue.pop(), null);
  t.true(fake.guardsIntact());
});

test('indirect table straddling two regions', (t) => {
  const { fake, driver, queue } = packedSetup();
  fake.write(R2_DATA, pattern(30, 7));
  const id = driver.addChain(
    [
      { addr: R2_DATA, len: 30 },
      { addr: R0_DATA, len: 12, writable: true },
      { addr: R1_DATA + 0x200, len: 12, writable: true },
    ],
    { indirect: R0_END - 24 },
  );
  driver.publish();
  const chain = queue.pop();
  if (chain === null) return t.fail();
  t.is(chain.head, id);
  t.is(chain.ringDescriptors, 1);
  t.is(chain.readableLength, 30);
  t.is(chain.writableLength, 24);
  queue.pushUsed(chain, 0);
  queue.flush();
  t.deepEqual(driver.takeUsed(), [{ id, len: 0, flags: USED }]);
});

test('out-of-order completion over many laps: wrap counters flip and slots are skipped per chain', (t) => {
  const size = 8;
  const { driver, queue } = packedSetup({ size });
  const rand = seededRandom(12345).next;
  const outstanding: { id: number; len: number }[] = [];
  let completed = 0;
  const inFlight = new Map<number, ReturnType<typeof queue.pop>>();
  for (let step = 0; step < 200; step++) {
    // Add chains of 1..3 descriptors while there is room.
    while (driver.freeSlots >= 3 && rand(3) !== 0) {
      const n = 1 + rand(3);
      const buffers = Array.from({ length: n }, (_, i) => ({ addr: R0_DATA + i * 0x100, len: 0x10, writable: i === n - 1 }));
      driver.addChain(buffers);
    }
    driver.publish();
    for (const chain of drain(queue)) inFlight.set(chain.head, chain);
    // Complete a random subset in random order.
    const ids = [...inFlight.keys()];
    while (ids.length > 0 && rand(4) !== 0) {
      const id = ids.splice(rand(ids.length), 1)[0]!;
      const chain = inFlight.get(id)!;
      inFlight.delete(id);
      const len = 1 + rand(16);
      queue.pushUsed(chain, len);
      outstanding.push({ id, len });
    }
    queue.flush();
    const used = driver.takeUsed();
    t.deepEqual(
      used.map((u) => ({ id: u.id, len: u.len })),
      outstanding.splice(0, used.length),
    );
    completed += used.length;
  }
  t.true(completed > 100, `completed ${completed}`);
  t.is(outstanding.length, 0);
});

test('a batch becomes visible at once: the first used descriptor is written last', (t) => {
  const { driver, queue, layout } = packedSetup();
  driver.addChain([{ addr: R0_DATA, len: 4 }]);
  driver.addChain([{ addr: R0_DATA, len: 4 }]);
  driver.publish();
  const [a, b] = drain(queue);
  if (!a || !b) return t.fail();
  queue.pushUsed(b, 0);
  queue.pushUsed(a, 0);
  // Nothing reaches the ring before flush (a daemon that dies here leaves the ring as it was).
  t.is(driver.descriptorFlags(0) & USED, VRING_PACKED_DESC_F_AVAIL, 'slot 0 still looks available');
  t.is(driver.descriptorFlags(1) & USED, VRING_PACKED_DESC_F_AVAIL, 'slot 1 still looks available');
  t.deepEqual(driver.takeUsed(), []);
  queue.flush();
  t.deepEqual(
    driver.takeUsed().map((u) => u.id),
    [b.head, a.head],
  );
  t.is(layout.desc, 0x1000);
});

test('base round trip across a wrap: a queue built from base() continues', (t) => {
  const size = 4;
  const s = packedSetup({ size });
  // 3 single-descriptor chains, then 3 more: crosses the end of the ring once.
  for (let round = 0; round < 2; round++) {
    for (let i = 0; i < 3; i++) s.driver.addChain([{ addr: R0_DATA, len: 8 }]);
    s.driver.publish();
    for (const c of drain(s.queue)) s.queue.pushUsed(c, 0);
    s.queue.flush();
    t.is(s.driver.takeUsed().length, 3);
  }
  const base = s.queue.base();
  // next avail 2, wrap 0 (flipped once); next used 2, wrap 0.
  t.is(base, 2 | (0 << 15) | (2 << 16) | (0 << 31));
  const id = s.driver.addChain([{ addr: R0_DATA, len: 9 }]);
  s.driver.publish();
  const resumed = createVirtqueue({ ...s.options, base }, true);
  const chain = resumed.pop();
  t.is(chain?.head, id);
  t.is(chain?.readableLength, 9);
  if (chain) resumed.pushUsed(chain, 0);
  resumed.flush();
  t.is(resumed.base(), 3 | (3 << 16));
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    [id],
  );
  const fresh = packedSetup({ size });
  t.is(fresh.queue.base(), 0x8000_8000);
});

test('a base with no used half (DPDK virtio-user: 0x8000 for a fresh ring) resumes used where avail is', (t) => {
  // The driver's ring is fresh (both wrap counters 1); the device is told only the avail half, as
  // DPDK's and SPDK's virtio-user do. The used descriptors must carry wrap 1 or the driver never sees them.
  const s = packedSetup({ size: 4 });
  const fromAvailHalf = createVirtqueue({ ...s.options, base: 0x8000 }, true);
  t.is(fromAvailHalf.base(), 0x8000_8000);
  // Two rounds of 3: the second crosses the end of the ring, so the used wrap counter flips with avail's.
  for (let round = 0; round < 2; round++) {
    const ids = [0, 1, 2].map(() => s.driver.addChain([{ addr: R0_DATA, len: 8 }]));
    s.driver.publish();
    for (const c of drain(fromAvailHalf)) fromAvailHalf.pushUsed(c, 0);
    fromAvailHalf.flush();
    t.deepEqual(
      s.driver.takeUsed().map((u) => u.id),
      ids,
    );
  }
  // Stopped after the wrap (avail 2, wrap 0): a restart told only "2" goes on at slot 2 with wrap 0.
  t.is(fromAvailHalf.base(), 2 | (2 << 16));
  const restarted = createVirtqueue({ ...s.options, base: 2 }, true);
  const id = s.driver.addChain([{ addr: R0_DATA, len: 8 }]);
  s.driver.publish();
  for (const c of drain(restarted)) restarted.pushUsed(c, 0);
  restarted.flush();
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    [id],
  );
  t.is(restarted.base(), 3 | (3 << 16));
});

test('a base outside the ring is refused (VIRTQ_BAD_BASE); ring areas must be aligned (VIRTQ_NO_RING)', (t) => {
  const fake = new FakeGuestMemory();
  const layout = packedRingLayout(8, 0x1000);
  new PackedDriverRing(fake, { size: 8, ...layout });
  const addresses = {
    descUserAddr: fake.userAddr(layout.desc),
    availUserAddr: fake.userAddr(layout.driverEvent),
    usedUserAddr: fake.userAddr(layout.deviceEvent),
  };
  const options = { size: 8, memory: fake.memory, eventIdx: true, indirect: true, base: 0x8000_8000, notify: () => {} };
  t.notThrows(() => createVirtqueue({ ...options, addresses }, true));
  const badBase = t.throws(() => createVirtqueue({ ...options, addresses, base: 9 }, true), { instanceOf: RingError });
  t.is(badBase?.code, 'VIRTQ_BAD_BASE');
  for (const bad of [
    { ...addresses, descUserAddr: addresses.descUserAddr + 4 },
    { ...addresses, availUserAddr: addresses.availUserAddr + 2 },
    { ...addresses, usedUserAddr: addresses.usedUserAddr + 1 },
    { ...addresses, usedUserAddr: 0x10 },
  ]) {
    const err = t.throws(() => createVirtqueue({ ...options, addresses: bad }, true), { instanceOf: RingError });
    t.is(err?.code, 'VIRTQ_NO_RING');
  }
});

test('burst limits one batch; enableNotification reports what is left', (t) => {
  const { driver, queue } = packedSetup({ burst: 3 });
  for (let i = 0; i < 7; i++) driver.addChain([{ addr: R0_DATA, len: 4 }]);
  driver.publish();
  let popped = 0;
  let rounds = 0;
  do {
    queue.disableNotification();
    for (let c; (c = queue.pop()) !== null; popped++) queue.pushUsed(c, 0);
    queue.flush();
    rounds++;
  } while (queue.enableNotification());
  t.is(popped, 7);
  t.is(rounds, 3);
  t.is(driver.takeUsed().length, 7);
});

test('an indirect table longer than the queue size is accepted, as Linux builds them (split and packed)', (t) => {
  for (const setup of [packedSetup, splitSetup]) {
    const { driver, queue } = setup({ size: 8 });
    const buffers = Array.from({ length: 20 }, (_, i) => ({ addr: R1_DATA + i * 0x100, len: 0x100, writable: i >= 10 }));
    driver.addChain(buffers, { indirect: R0_DATA + 0x8000 });
    driver.publish();
    const chain = queue.pop();
    if (chain === null) return t.fail();
    t.is(chain.readableLength, 10 * 0x100);
    t.is(chain.writableLength, 10 * 0x100);
    queue.pushUsed(chain, 0);
    queue.flush();
  }
});
