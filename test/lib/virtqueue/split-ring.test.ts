import test from 'ava';

import { MemoryError, RingError } from '../../../lib/errors';
import { GuestMemory } from '../../../lib/memory/guest-memory';
import { createVirtqueue } from '../../../lib/virtqueue';
import { VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../../../lib/virtio/constants';
import { SplitDriverRing, encodeDescriptor, splitRingLayout } from '../../helpers/driver-ring';
import { FakeGuestMemory } from '../../helpers/fake-guest-memory';
import { R0_DATA, R0_END, R1_DATA, R1_END, R2_DATA, drain, pattern, splitSetup } from './setup';

test('pops a chain spanning two regions and one above 4 GiB; the driver sees the used length', (t) => {
  const { fake, driver, queue } = splitSetup();
  const a = pattern(32, 1);
  const b = pattern(64, 2);
  fake.write(R0_END - 16, a); // crosses from region 0 into region 1
  fake.write(R2_DATA + 0x100, b);
  const head = driver.addChain([
    { addr: R0_END - 16, len: 32 },
    { addr: R2_DATA + 0x100, len: 64 },
    { addr: R1_DATA + 0x1000, len: 100, writable: true },
  ]);
  driver.publish();

  const chain = queue.pop();
  t.truthy(chain);
  if (chain === null) return;
  t.is(chain.head, head);
  t.is(chain.segments, 4);
  t.is(chain.readableSegments, 3);
  t.is(chain.readableLength, 96);
  t.is(chain.writableLength, 100);
  t.deepEqual([...chain.length.subarray(0, 4)], [16, 16, 64, 100]);
  t.is(chain.address(0), fake.regions[0]!.hostAddress + R0_END - 16);
  t.is(chain.address(1), fake.regions[1]!.hostAddress);
  t.is(chain.address(2), fake.regions[2]!.hostAddress + 0x100);

  const readable = new Uint8Array(96);
  t.is(chain.read(0, readable), 96);
  t.deepEqual(readable, Uint8Array.from([...a, ...b]));
  t.is(chain.write(0, pattern(100, 9)), 100);
  t.is(queue.inFlight, 1);

  queue.pushUsed(chain, 100);
  t.is(queue.inFlight, 0);
  t.deepEqual(driver.takeUsed(), [], 'nothing is visible before flush');
  t.is(queue.flush(), 1);
  t.deepEqual(driver.takeUsed(), [{ id: head, len: 100 }]);
  t.deepEqual(fake.read(R1_DATA + 0x1000, 100), pattern(100, 9));
  t.deepEqual(queue.counters, { requests: 1, bytesRead: 96, bytesWritten: 100, notifications: 1, batches: 1 });
  t.is(queue.pop(), null);
  t.true(fake.guardsIntact());
});

test('indirect tables, including one that straddles two regions, and a chain ending in an indirect descriptor', (t) => {
  const { fake, driver, queue } = splitSetup();
  fake.write(R2_DATA, pattern(40, 3));
  // Table of 3 at R0_END - 8: entry 0 is split across regions 0 and 1.
  const straddling = driver.addChain(
    [
      { addr: R2_DATA, len: 40 },
      { addr: R1_DATA + 0x100, len: 8, writable: true },
      { addr: R0_DATA, len: 24, writable: true },
    ],
    { indirect: R0_END - 8 },
  );
  const plain = driver.addChain([{ addr: R2_DATA + 0x800, len: 16, writable: true }], { indirect: R0_DATA + 0x4000 });
  // Direct descriptor 6 (readable) chained to descriptor 7 pointing at an indirect table (§2.7.5.3.2).
  fake.write(R0_DATA + 0x5000, pattern(16, 4));
  fake.write(R0_DATA + 0x6000, pattern(16, 5));
  fake.write(R0_DATA + 0x7000, new Uint8Array(32));
  const table = R0_DATA + 0x7000;
  fake.write(table, Uint8Array.from([...encodeDescriptor(R0_DATA + 0x6000, 16, VRING_DESC_F_NEXT, 1), ...encodeDescriptor(R0_DATA + 0x6100, 4, VRING_DESC_F_WRITE, 0)]));
  driver.writeDescriptor(6, { addr: R0_DATA + 0x5000, len: 16, flags: VRING_DESC_F_NEXT, next: 7 });
  driver.writeDescriptor(7, { addr: table, len: 32, flags: VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE });
  driver.writeAvailRing(driver.availIdx, 6);
  driver.availIdx++;
  driver.publish();

  const [c1, c2, c3] = drain(queue);
  t.truthy(c1 && c2 && c3);
  if (!c1 || !c2 || !c3) return;
  t.is(c1.head, straddling);
  t.is(c1.readableLength, 40);
  t.is(c1.writableLength, 32);
  const got = new Uint8Array(40);
  c1.read(0, got);
  t.deepEqual(got, pattern(40, 3));
  t.is(c2.head, plain);
  t.is(c2.readableSegments, 0);
  t.is(c2.writableLength, 16);
  t.is(c3.head, 6);
  t.is(c3.readableLength, 32);
  t.is(c3.writableLength, 4);
  const both = new Uint8Array(32);
  c3.read(0, both);
  t.deepEqual(both, Uint8Array.from([...pattern(16, 4), ...pattern(16, 5)]));
});

test('completes out of order; used elements carry each chain head and length; descriptors are reused', (t) => {
  const { driver, queue } = splitSetup({ size: 4 });
  const heads = [0, 1, 2].map((i) => driver.addChain([{ addr: R0_DATA + i * 0x100, len: 0x100, writable: true }]));
  driver.publish();
  const chains = drain(queue);
  t.is(chains.length, 3);
  queue.pushUsed(chains[2]!, 30);
  queue.pushUsed(chains[0]!, 10);
  t.is(queue.flush(), 2);
  queue.pushUsed(chains[1]!, 20);
  t.is(queue.flush(), 1);
  t.deepEqual(driver.takeUsed(), [
    { id: heads[2]!, len: 30 },
    { id: heads[0]!, len: 10 },
    { id: heads[1]!, len: 20 },
  ]);
  // Four more rounds through the freed descriptors.
  for (let round = 0; round < 4; round++) {
    const ids = [0, 1, 2, 3].map((i) => driver.addChain([{ addr: R1_DATA + i * 0x100, len: 8, writable: true }]));
    driver.publish();
    const popped = drain(queue);
    t.deepEqual(
      popped.map((c) => c.head),
      ids,
    );
    for (const c of popped.reverse()) queue.pushUsed(c, c.head);
    queue.flush();
    t.deepEqual(
      driver.takeUsed().map((u) => u.id),
      [...ids].reverse(),
    );
  }
  t.is(queue.inFlight, 0);
});

test('indexes wrap at 2^16 and base() reports the next avail index', (t) => {
  const { driver, queue } = splitSetup({ size: 4, base: 0xfffe });
  t.is(queue.base(), 0xfffe);
  for (let i = 0; i < 5; i++) {
    driver.addChain([{ addr: R0_DATA, len: 4 }]);
    driver.publish();
    const chain = queue.pop();
    t.truthy(chain);
    if (chain) queue.pushUsed(chain, 0);
    queue.flush();
    t.is(driver.takeUsed().length, 1);
  }
  t.is(queue.base(), 3);
  t.is(driver.usedIdx(), 3);
});

test('base round trip: a new queue built from base() continues where the old one stopped', (t) => {
  const s = splitSetup({ size: 8 });
  for (let i = 0; i < 3; i++) s.driver.addChain([{ addr: R0_DATA + i * 64, len: 64 }]);
  s.driver.publish();
  for (const c of drain(s.queue)) s.queue.pushUsed(c, 0);
  s.queue.flush();
  s.driver.takeUsed();
  const next = s.driver.addChain([{ addr: R0_DATA + 0x1000, len: 7 }]);
  s.driver.publish();

  const base = s.queue.base();
  t.is(base, 3);
  const resumed = createVirtqueue({ ...s.options, base }, false);
  const chain = resumed.pop();
  t.is(chain?.head, next);
  t.is(chain?.readableLength, 7);
  if (chain) resumed.pushUsed(chain, 0);
  resumed.flush();
  t.deepEqual(s.driver.takeUsed(), [{ id: next, len: 0 }]);
});

test('a base that disagrees with used.idx (DPDK virtio-user sends 0, also when it reconnects) resumes at used.idx', (t) => {
  // The driver posted 8 chains into a ring of 4 and the device completed 6 of them, then went away.
  const s = splitSetup({ size: 4 });
  for (let round = 0; round < 2; round++) {
    for (let i = 0; i < 3; i++) s.driver.addChain([{ addr: R0_DATA, len: 8 }]);
    s.driver.publish();
    for (const c of drain(s.queue)) s.queue.pushUsed(c, 0);
    s.queue.flush();
    s.driver.takeUsed();
  }
  const pending = [0, 1].map(() => s.driver.addChain([{ addr: R0_DATA, len: 8 }]));
  s.driver.publish();
  // A new back-end is told base 0: avail.idx 8 would be 8 ahead of it in a ring of 4.
  const resumed = createVirtqueue({ ...s.options, base: 0 }, false);
  t.is(resumed.base(), 6);
  const chains = drain(resumed);
  t.deepEqual(
    chains.map((c) => c.head),
    pending,
  );
  for (const c of chains) resumed.pushUsed(c, 0);
  resumed.flush();
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    pending,
  );
  t.is(s.driver.usedIdx(), 8);
});

test('reads avail.idx once per batch: a later jump is seen only when the cache runs out', (t) => {
  const { driver, queue } = splitSetup({ size: 8 });
  driver.addChain([{ addr: R0_DATA, len: 4 }]);
  driver.addChain([{ addr: R0_DATA, len: 4 }]);
  driver.publish();
  t.truthy(queue.pop());
  driver.writeAvailIdx(40); // hostile, but the device already knows 2 are there
  t.truthy(queue.pop());
  const err = t.throws(() => queue.pop(), { instanceOf: RingError });
  t.is(err?.code, 'VIRTQ_AVAIL_IDX_JUMP');
});

test('burst: pop stops after `burst` chains until flush, and enableNotification reports the rest', (t) => {
  const { driver, queue } = splitSetup({ size: 8, burst: 2 });
  for (let i = 0; i < 5; i++) driver.addChain([{ addr: R0_DATA, len: 4 }]);
  driver.publish();
  const popped = [];
  let rounds = 0;
  do {
    queue.disableNotification();
    for (let chain; (chain = queue.pop()) !== null; ) {
      popped.push(chain.head);
      queue.pushUsed(chain, 0);
    }
    t.true(queue.flush() <= 2);
    rounds++;
  } while (queue.enableNotification());
  t.is(popped.length, 5);
  t.is(rounds, 3);
  t.is(driver.takeUsed().length, 5);
});

test('used length is clamped to the writable part, and completing a chain twice throws', (t) => {
  const { driver, queue } = splitSetup();
  driver.addChain([
    { addr: R0_DATA, len: 4 },
    { addr: R0_DATA + 64, len: 10, writable: true },
  ]);
  driver.publish();
  const chain = queue.pop();
  if (chain === null) return t.fail();
  queue.pushUsed(chain, 1000);
  t.throws(() => queue.pushUsed(chain, 1));
  queue.flush();
  t.deepEqual(driver.takeUsed(), [{ id: chain.head, len: 10 }]);
  t.is(queue.counters.bytesWritten, 10);
});

test('setMemory re-resolves the rings; a map without them throws MemoryError', (t) => {
  const { fake, driver, queue } = splitSetup();
  const remapped = new GuestMemory(fake.regions);
  queue.setMemory(remapped);
  driver.addChain([{ addr: R2_DATA, len: 4 }]);
  driver.publish();
  const chain = queue.pop();
  t.is(chain?.memory, remapped);
  const withoutRings = new GuestMemory(fake.regions.slice(1));
  t.throws(() => queue.setMemory(withoutRings), { instanceOf: MemoryError });
});

test('ring areas must be mapped and aligned (VIRTQ_NO_RING)', (t) => {
  const fake = new FakeGuestMemory();
  const layout = splitRingLayout(8, 0x1000);
  const good = {
    descUserAddr: fake.userAddr(layout.desc),
    availUserAddr: fake.userAddr(layout.avail),
    usedUserAddr: fake.userAddr(layout.used),
  };
  new SplitDriverRing(fake, { size: 8, ...layout });
  const base = { size: 8, memory: fake.memory, eventIdx: true, indirect: true, base: 0, notify: () => {} };
  t.notThrows(() => createVirtqueue({ ...base, addresses: good }, false));
  const regionEnd = fake.userAddr(R0_END - 16);
  const bad = [
    { ...good, descUserAddr: good.descUserAddr + 8 },
    { ...good, availUserAddr: good.availUserAddr + 1 },
    { ...good, usedUserAddr: good.usedUserAddr + 2 },
    { ...good, descUserAddr: 0x1000 },
    { ...good, usedUserAddr: regionEnd },
    { ...good, availUserAddr: fake.userAddr(R1_END - 4) + 4 },
  ];
  for (const addresses of bad) {
    const err = t.throws(() => createVirtqueue({ ...base, addresses }, false), { instanceOf: RingError });
    t.is(err?.code, 'VIRTQ_NO_RING');
  }
});
