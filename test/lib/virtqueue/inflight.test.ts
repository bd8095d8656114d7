/**
 * Inflight tracking on a split ring (vhost-user.rst "Inflight I/O tracking"): a queue that dies with
 * chains popped but not completed is replaced by a new queue over the same guest memory and the same
 * inflight area, as a restarted daemon is, and the new one hands those chains out first, oldest
 * first, then the ones the driver added meanwhile; every chain is completed exactly once. Areas that
 * break a rule fail the queue's construction with VIRTQ_BAD_INFLIGHT.
 */
import test from 'ava';

import { RingError } from '../../../lib/errors';
import { createVirtqueue, type Virtqueue } from '../../../lib/virtqueue';
import { inflightQueueBytes } from '../../../lib/virtqueue/inflight';
import { R0_DATA, splitSetup } from './setup';

const SIZE = 8;

function area(): Uint8Array {
  return new Uint8Array(inflightQueueBytes(SIZE));
}

/** A chain of one 16-byte writable buffer per request, `n` of them. */
function offer(setup: ReturnType<typeof splitSetup>, n: number, first = 0): number[] {
  const heads: number[] = [];
  for (let i = 0; i < n; i++) heads.push(setup.driver.addChain([{ addr: R0_DATA + 0x100 * (first + i), len: 16, writable: true }]));
  setup.driver.publish();
  return heads;
}

/** The queue a restarted daemon builds: same memory and area, base = used.idx (QEMU after a crash). */
function restart(setup: ReturnType<typeof splitSetup>, inflight: Uint8Array, usedIdx: number): Virtqueue {
  return createVirtqueue({ ...setup.options, base: usedIdx, inflight }, false);
}

function popAll(queue: Virtqueue): number[] {
  const heads: number[] = [];
  for (let chain = queue.pop(); chain !== null; chain = queue.pop()) heads.push(chain.head);
  return heads;
}

test('chains popped but never completed come back first, in pop order, then the new ones; each is used once', (t) => {
  const inflight = area();
  const setup = splitSetup({ size: SIZE });
  const first = createVirtqueue({ ...setup.options, inflight }, false);
  const offered = offer(setup, 5);
  const popped: ReturnType<Virtqueue['pop']>[] = [];
  for (let i = 0; i < 5; i++) popped.push(first.pop());
  // Two complete (out of order) and are published; three are in flight when the process dies.
  first.pushUsed(popped[3]!, 16);
  first.pushUsed(popped[1]!, 16);
  first.flush();
  t.deepEqual(setup.driver.takeUsed().map((u) => u.id), [offered[3], offered[1]]);
  offer(setup, 2, 5);

  const second = restart(setup, inflight, 2);
  const heads = popAll(second);
  t.deepEqual(heads.slice(0, 3), [offered[0], offered[2], offered[4]], 'the three left in flight, oldest first');
  t.is(heads.length, 5, 'then the two offered meanwhile');
  t.is(second.inFlight, 5);
});

test('a crash after used.idx was published but before the batch was marked done does not resubmit it', (t) => {
  const inflight = area();
  const setup = splitSetup({ size: SIZE });
  const first = createVirtqueue({ ...setup.options, inflight }, false);
  offer(setup, 3);
  const chains = [first.pop()!, first.pop()!, first.pop()!];
  const headsPopped = chains.map((c) => c.head);
  first.pushUsed(chains[0]!, 16);
  first.pushUsed(chains[2]!, 16);
  first.flush();
  // Undo what publish did after the used.idx store: the batch's inflight flags and used_idx, as if the
  // process died right after the store.
  const u16 = new Uint16Array(inflight.buffer);
  u16[7] = 0;
  inflight[16 + 16 * chains[0]!.head] = 1;
  inflight[16 + 16 * chains[2]!.head] = 1;

  const second = restart(setup, inflight, 2);
  t.deepEqual(popAll(second), [headsPopped[1]], 'only the one still in flight');
  t.is(u16[7], 2, 'used_idx caught up with the used ring');
});

test('a crash before used.idx was published resubmits the completed chains (their used elements were never seen)', (t) => {
  const inflight = area();
  const setup = splitSetup({ size: SIZE });
  const first = createVirtqueue({ ...setup.options, inflight }, false);
  offer(setup, 2);
  const a = first.pop()!;
  const b = first.pop()!;
  const heads = [a.head, b.head];
  first.pushUsed(b, 16); // written, not published: the process dies before flush
  const second = restart(setup, inflight, 0);
  t.deepEqual(popAll(second), heads);
  t.deepEqual(setup.driver.takeUsed(), []);
});

test('a clean stop leaves nothing in flight: the next queue resumes at the base', (t) => {
  const inflight = area();
  const setup = splitSetup({ size: SIZE });
  const first = createVirtqueue({ ...setup.options, inflight }, false);
  offer(setup, 3);
  for (let chain = first.pop(); chain !== null; chain = first.pop()) first.pushUsed(chain, 0);
  first.flush();
  offer(setup, 1, 3);
  const second = restart(setup, inflight, first.base());
  t.is(popAll(second).length, 1);
});

test('a chain given back unused (unpop) is not in flight any more', (t) => {
  const inflight = area();
  const setup = splitSetup({ size: SIZE });
  const first = createVirtqueue({ ...setup.options, inflight }, false);
  offer(setup, 2);
  first.pop();
  const held = first.pop()!;
  first.unpop(held);
  const second = restart(setup, inflight, 0);
  // The first chain is resubmitted, the given-back one comes from the available ring again.
  t.is(popAll(second).length, 2);
});

test('a resubmitted chain given back (unpop) is popped again before the ring, and stays in flight in the area', (t) => {
  const inflight = area();
  const setup = splitSetup({ size: SIZE });
  const first = createVirtqueue({ ...setup.options, inflight }, false);
  const offered = offer(setup, 3);
  const popped = [first.pop()!, first.pop()!, first.pop()!];
  // The middle one completes: the two in flight at the crash are not the ring's last entries.
  first.pushUsed(popped[1]!, 16);
  first.flush();
  t.deepEqual(setup.driver.takeUsed().map((u) => u.id), [offered[1]]);
  const expected = [offered[0], offered[2], ...offer(setup, 1, 3)];

  const second = restart(setup, inflight, 1);
  const held = second.pop()!;
  t.is(held.head, expected[0]!);
  second.unpop(held);
  t.is(second.inFlight, 0);
  t.deepEqual(popAll(second), expected, 'the given-back chain first, then the other resubmitted one, then the new one');

  const third = restart(setup, inflight, 1);
  t.deepEqual(popAll(third), expected, 'all three in flight in the area, the given-back one too');
});

const hostile: { name: string; corrupt(u8: Uint8Array, u16: Uint16Array, u32: Uint32Array): void }[] = [
  { name: 'version 2', corrupt: (_u8, u16) => void (u16[4] = 2) },
  { name: 'unknown feature flags', corrupt: (_u8, _u16, u32) => void (u32[0] = 4) },
  { name: 'desc_num not the queue size', corrupt: (_u8, u16) => void (u16[5] = SIZE * 2) },
  { name: 'an inflight flag of 7', corrupt: (u8) => void (u8[16 + 16 * 3] = 7) },
  {
    name: 'last_batch_head past the ring (CVE-2021-3839 class)',
    corrupt: (_u8, u16) => {
      u16[6] = 0xffff;
      u16[7] = 0xffff; // one entry of a batch is pending (used ring idx 0): the list is followed
    },
  },
  { name: 'used_idx more than a ring behind', corrupt: (_u8, u16) => void (u16[7] = 0x8000) },
  {
    name: 'a counter of 2^53 or more',
    corrupt: (u8, _u16, u32) => {
      u8[16] = 1;
      u32[(16 + 8) / 4 + 1] = 0x0020_0000;
    },
  },
  {
    name: 'two entries with the same counter',
    corrupt: (u8, _u16, u32) => {
      u8[16] = 1;
      u8[32] = 1;
      u32[(16 + 8) / 4] = 5;
      u32[(32 + 8) / 4] = 5;
    },
  },
];

for (const row of hostile) {
  test(`an inflight area with ${row.name} fails the queue with VIRTQ_BAD_INFLIGHT`, (t) => {
    const inflight = area();
    const setup = splitSetup({ size: SIZE });
    createVirtqueue({ ...setup.options, inflight }, false); // initializes it
    row.corrupt(inflight, new Uint16Array(inflight.buffer), new Uint32Array(inflight.buffer));
    const err = t.throws(() => createVirtqueue({ ...setup.options, inflight }, false), { instanceOf: RingError });
    t.is(err?.code, 'VIRTQ_BAD_INFLIGHT');
  });
}

test('an area too small for the ring fails the queue', (t) => {
  const setup = splitSetup({ size: SIZE });
  const err = t.throws(() => createVirtqueue({ ...setup.options, inflight: new Uint8Array(64) }, false), { instanceOf: RingError });
  t.is(err?.code, 'VIRTQ_BAD_INFLIGHT');
});
