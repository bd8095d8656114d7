/**
 * The test helpers themselves: the fake memory must lay out views like the native helper, and the
 * driver ring must work across a 1 GiB view stride (a descriptor crossing it becomes two segments;
 * a ring straddling it fits in the first view's slack).
 */
import test from 'ava';

import { Translation } from '../../../lib/memory/guest-memory';
import { createVirtqueue } from '../../../lib/virtqueue';
import { MAP_VIEW_SLACK, MAP_VIEW_STRIDE } from '../../../native/layout';
import { SplitDriverRing, splitRingLayout } from '../../helpers/driver-ring';
import { FakeGuestMemory } from '../../helpers/fake-guest-memory';
import { GAP, R0_END, R1_DATA, pattern } from './setup';

test('default regions: views, translation clipping, gaps, user addresses', (t) => {
  const fake = new FakeGuestMemory();
  const [r0, r1, r2] = fake.regions;
  t.is(r0!.views.length, 1);
  t.is(r1!.views[0]!.length, r1!.mappingOffset + r1!.size);
  t.not(r1!.userAddr, r1!.guestPhysAddr);
  const tr = new Translation();
  t.true(fake.memory.translate(R0_END - 4, 8, tr));
  t.is(tr.length, 4, 'clipped at the region end');
  t.true(fake.memory.translate(R1_DATA, 8, tr));
  t.is(tr.view[tr.offset], r1!.bytes[0]);
  t.is(tr.address, r1!.hostAddress);
  t.false(fake.memory.translate(GAP, 1, tr));
  t.is(fake.userAddr(r2!.guestPhysAddr + 5), r2!.userAddr + 5);
  fake.write(R0_END - 2, Uint8Array.of(1, 2, 3, 4));
  t.deepEqual(fake.read(R0_END - 2, 4), Uint8Array.of(1, 2, 3, 4));
  t.deepEqual(r1!.bytes.subarray(0, 2), Uint8Array.of(3, 4));
  t.true(fake.guardsIntact());
  // The mapping bytes before region 1 are guard bytes, not guest memory.
  t.false(fake.containsSegment(r1!.views[0]!, 0, 16, r1!.hostAddress - r1!.mappingOffset));
  t.true(fake.containsSegment(r1!.views[0]!, r1!.mappingOffset, 16, r1!.hostAddress));
  r1!.mapping[0] = 0;
  t.false(fake.guardsIntact());
});

test('a region larger than one view stride: descriptors split at the stride, rings use the slack', (t) => {
  const gpa = 0x8000_0000;
  const size = MAP_VIEW_STRIDE + (4 << 20);
  const fake = new FakeGuestMemory([{ guestPhysAddr: gpa, size, userAddr: 0x7f40_0000_0000, mappingOffset: 0x1000 }]);
  const region = fake.regions[0]!;
  t.is(region.views.length, 2);
  t.is(region.views[0]!.length, MAP_VIEW_STRIDE + MAP_VIEW_SLACK);
  t.is(region.views[1]!.length, region.mappingOffset + size - MAP_VIEW_STRIDE);

  // The stride boundary in guest addresses (the mapping starts mappingOffset before the region).
  const boundary = gpa + MAP_VIEW_STRIDE - region.mappingOffset;
  // A ring that straddles the boundary: contiguous in view 0 thanks to the slack.
  const layout = splitRingLayout(8, boundary - 64);
  const driver = new SplitDriverRing(fake, { size: 8, ...layout });
  const queue = createVirtqueue(
    {
      size: 8,
      addresses: { descUserAddr: fake.userAddr(layout.desc), availUserAddr: fake.userAddr(layout.avail), usedUserAddr: fake.userAddr(layout.used) },
      memory: fake.memory,
      eventIdx: true,
      indirect: true,
      base: 0,
      notify: () => {},
    },
    false,
  );
  fake.write(boundary + 0x1000 - 8, pattern(24, 6));
  const head = driver.addChain([
    { addr: boundary + 0x1000 - 8 - MAP_VIEW_STRIDE / 2, len: 16 },
    { addr: boundary + 0x1000 - 8, len: 24 },
    { addr: boundary - 4, len: 8, writable: true },
  ]);
  driver.publish();
  const chain = queue.pop();
  if (chain === null) return t.fail();
  t.is(chain.head, head);
  // Descriptor 2 lies wholly after the boundary; descriptor 3 crosses it.
  t.is(chain.segments, 4);
  t.deepEqual([...chain.viewId.subarray(0, 4)], [0, 1, 0, 1]);
  t.deepEqual([...chain.length.subarray(0, 4)], [16, 24, 4, 4]);
  t.is(chain.address(3), region.hostAddress + (boundary - gpa));
  const got = new Uint8Array(24);
  chain.read(16, got);
  t.deepEqual(got, pattern(24, 6));
  chain.write(0, Uint8Array.of(9, 8, 7, 6, 5, 4, 3, 2));
  queue.pushUsed(chain, 8);
  queue.flush();
  t.deepEqual(driver.takeUsed(), [{ id: head, len: 8 }]);
  t.deepEqual(fake.read(boundary - 4, 8), Uint8Array.of(9, 8, 7, 6, 5, 4, 3, 2));
  t.true(fake.guardsIntact());
});
