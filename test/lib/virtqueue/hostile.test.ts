/**
 * Hostile driver input, one row per ring rule (style-anchors rule 5). Each row writes a violation
 * into an otherwise valid ring and asserts: `pop` throws RingError with the row's code; the walk wrote
 * nothing anywhere in guest memory and no guard byte around it changed; no chain leaked; the same
 * error comes back on the next pop (nothing advanced), so the owner can mark the queue broken and
 * carry on serving.
 */
import test from 'ava';

import { RingError, type RingErrorCode } from '../../../lib/errors';
import type { Virtqueue } from '../../../lib/virtqueue';
import {
  VRING_DESC_F_INDIRECT as INDIRECT,
  VRING_DESC_F_NEXT as NEXT,
  VRING_DESC_F_WRITE as WRITE,
} from '../../../lib/virtio/constants';
import { PackedDriverRing, encodeDescriptor, type SplitDriverRing } from '../../helpers/driver-ring';
import type { FakeGuestMemory } from '../../helpers/fake-guest-memory';
import { GAP, R0_DATA, R1_END, R2_END, drain, packedSetup, splitSetup, type QueueSetup } from './setup';

const SIZE = 8;
/** A valid buffer address and two indirect table addresses. */
const V = R0_DATA;
const T = R0_DATA + 0x1_0000;
const T2 = R0_DATA + 0x2_0000;
const TWO_53 = 2n ** 53n;
const TOP = 2n ** 64n - 16n;

interface Row<D> {
  name: string;
  code: RingErrorCode;
  /** VIRTIO_RING_F_INDIRECT_DESC negotiated (default true). */
  indirect?: boolean;
  /** Put the violation in place (the queue is there for rows that pop valid chains first). */
  setup(driver: D, fake: FakeGuestMemory, queue: Virtqueue): void;
}

/** Write an indirect table of split descriptors [addr, len, flags, next]. */
function splitTable(fake: FakeGuestMemory, at: number, entries: [number | bigint, number, number, number][]): void {
  entries.forEach(([addr, len, flags, next], i) => fake.write(at + 16 * i, encodeDescriptor(addr, len, flags, next)));
}

/** Write an indirect table of packed descriptors [addr, len, flags]. */
function packedTable(fake: FakeGuestMemory, at: number, entries: [number | bigint, number, number][]): void {
  entries.forEach(([addr, len, flags], i) => fake.write(at + 16 * i, encodeDescriptor(addr, len, 0, flags)));
}

/** Offer descriptor `head` in the next available ring entry and publish it. */
function offer(d: SplitDriverRing, head: number): void {
  d.writeAvailRing(d.availIdx, head);
  d.availIdx = (d.availIdx + 1) & 0xffff;
  d.publish();
}

/** One-descriptor chain at head 0 with the given fields. */
function single(addr: number | bigint, len: number, flags = 0): (d: SplitDriverRing) => void {
  return (d) => {
    d.writeDescriptor(0, { addr, len, flags });
    offer(d, 0);
  };
}

const splitRows: Row<SplitDriverRing>[] = [
  { name: 'head index equal to the queue size', code: 'VIRTQ_BAD_HEAD', setup: (d) => offer(d, SIZE) },
  { name: 'head index 0xffff', code: 'VIRTQ_BAD_HEAD', setup: (d) => offer(d, 0xffff) },
  { name: 'avail idx more than size ahead', code: 'VIRTQ_AVAIL_IDX_JUMP', setup: (d) => d.writeAvailIdx(SIZE + 1) },
  { name: 'avail idx moved backwards', code: 'VIRTQ_AVAIL_IDX_JUMP', setup: (d) => d.writeAvailIdx(0xffff) },
  {
    name: 'next fields forming a loop',
    code: 'VIRTQ_CHAIN_LOOP',
    setup: (d) => {
      d.writeDescriptor(0, { addr: V, len: 4, flags: NEXT, next: 1 });
      d.writeDescriptor(1, { addr: V, len: 4, flags: NEXT, next: 0 });
      offer(d, 0);
    },
  },
  { name: 'descriptor chained to itself', code: 'VIRTQ_CHAIN_LOOP', setup: (d) => single(V, 4, NEXT)(d) },
  {
    name: 'loop inside an indirect table',
    code: 'VIRTQ_CHAIN_LOOP',
    setup: (d, f) => {
      splitTable(f, T, [[V, 4, NEXT, 0]]);
      single(T, 16, INDIRECT)(d);
    },
  },
  {
    name: 'indirect descriptor inside an indirect table',
    code: 'VIRTQ_NESTED_INDIRECT',
    setup: (d, f) => {
      splitTable(f, T2, [[V, 4, 0, 0]]);
      splitTable(f, T, [[T2, 16, INDIRECT, 0]]);
      single(T, 16, INDIRECT)(d);
    },
  },
  {
    name: 'INDIRECT together with NEXT',
    code: 'VIRTQ_NESTED_INDIRECT',
    setup: (d, f) => {
      splitTable(f, T, [[V, 4, 0, 0]]);
      d.writeDescriptor(1, { addr: V, len: 4, flags: 0 });
      d.writeDescriptor(0, { addr: T, len: 16, flags: INDIRECT | NEXT, next: 1 });
      offer(d, 0);
    },
  },
  { name: 'indirect length not a multiple of 16', code: 'VIRTQ_BAD_INDIRECT_LEN', setup: single(T, 24, INDIRECT) },
  { name: 'indirect length 0', code: 'VIRTQ_BAD_INDIRECT_LEN', setup: single(T, 0, INDIRECT) },
  {
    name: 'indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC',
    code: 'VIRTQ_BAD_DESCRIPTOR',
    indirect: false,
    setup: (d, f) => {
      splitTable(f, T, [[V, 4, 0, 0]]);
      single(T, 16, INDIRECT)(d);
    },
  },
  {
    name: 'readable descriptor after a writable one',
    code: 'VIRTQ_READABLE_AFTER_WRITABLE',
    setup: (d) => {
      d.writeDescriptor(0, { addr: V, len: 4, flags: WRITE | NEXT, next: 1 });
      d.writeDescriptor(1, { addr: V, len: 4, flags: 0 });
      offer(d, 0);
    },
  },
  {
    name: 'readable indirect entry after a writable direct descriptor',
    code: 'VIRTQ_READABLE_AFTER_WRITABLE',
    setup: (d, f) => {
      splitTable(f, T, [[V, 4, 0, 0]]);
      d.writeDescriptor(0, { addr: V, len: 4, flags: WRITE | NEXT, next: 1 });
      d.writeDescriptor(1, { addr: T, len: 16, flags: INDIRECT });
      offer(d, 0);
    },
  },
  { name: 'zero-length descriptor', code: 'VIRTQ_ZERO_LENGTH', setup: single(V, 0) },
  {
    name: 'zero-length indirect entry',
    code: 'VIRTQ_ZERO_LENGTH',
    setup: (d, f) => {
      splitTable(f, T, [
        [V, 4, NEXT, 1],
        [V, 0, WRITE, 0],
      ]);
      single(T, 32, INDIRECT)(d);
    },
  },
  {
    name: 'chain of 2^32 bytes',
    code: 'VIRTQ_CHAIN_TOO_LONG',
    setup: (d) => {
      d.writeDescriptor(0, { addr: V, len: 16, flags: NEXT, next: 1 });
      d.writeDescriptor(1, { addr: V, len: 0xffff_fff0, flags: WRITE });
      offer(d, 0);
    },
  },
  { name: 'buffer address 2^53', code: 'VIRTQ_BAD_DESCRIPTOR', setup: single(TWO_53, 4) },
  { name: 'buffer address 2^64 - 16 (would wrap)', code: 'VIRTQ_BAD_DESCRIPTOR', setup: single(TOP, 32) },
  { name: 'buffer address just below 2^53', code: 'VIRTQ_BAD_DESCRIPTOR', setup: single(2 ** 53 - 4096, 4) },
  { name: 'buffer in the gap between regions', code: 'VIRTQ_BAD_DESCRIPTOR', setup: single(GAP, 4) },
  { name: 'buffer running off a region into the gap', code: 'VIRTQ_BAD_DESCRIPTOR', setup: single(R1_END - 8, 16) },
  { name: 'buffer running off the last region', code: 'VIRTQ_BAD_DESCRIPTOR', setup: single(R2_END - 8, 16, WRITE) },
  {
    name: 'next outside the descriptor table',
    code: 'VIRTQ_BAD_DESCRIPTOR',
    setup: (d) => {
      d.writeDescriptor(0, { addr: V, len: 4, flags: NEXT, next: SIZE });
      offer(d, 0);
    },
  },
  { name: 'indirect table in the gap', code: 'VIRTQ_BAD_DESCRIPTOR', setup: single(GAP, 16, INDIRECT) },
  { name: 'indirect table at 2^53', code: 'VIRTQ_BAD_DESCRIPTOR', setup: single(TWO_53, 16, INDIRECT) },
  {
    name: 'indirect next outside the table',
    code: 'VIRTQ_BAD_DESCRIPTOR',
    setup: (d, f) => {
      splitTable(f, T, [[V, 4, NEXT, 1]]);
      single(T, 16, INDIRECT)(d);
    },
  },
  {
    name: 'more chains in flight than the queue size',
    code: 'VIRTQ_TOO_MANY_IN_FLIGHT',
    setup: (d, _f, q) => {
      d.writeDescriptor(0, { addr: V, len: 4, flags: 0 });
      for (let i = 0; i < SIZE; i++) offer(d, 0);
      if (drain(q).length !== SIZE) throw new Error('setup: expected a full queue');
      q.flush(); // ends the batch (burst = size)
      offer(d, 0);
    },
  },
];

const AVAIL = PackedDriverRing.availBits(1);

/** Slot 0 (and following) of a fresh packed ring: [addr, len, flags without AVAIL/USED]. */
function slots(entries: [number | bigint, number, number][]): (d: PackedDriverRing) => void {
  return (d) => {
    entries.forEach(([addr, len, flags], i) => {
      if (i > 0) d.writeDescriptor(i, { addr, len, id: 0, flags: flags | AVAIL });
    });
    const [addr, len, flags] = entries[0]!;
    d.writeDescriptor(0, { addr, len, id: 0, flags: flags | AVAIL });
  };
}

const packedRows: Row<PackedDriverRing>[] = [
  {
    name: 'NEXT on every descriptor of the ring',
    code: 'VIRTQ_CHAIN_LOOP',
    setup: slots(Array.from({ length: SIZE }, () => [V, 4, NEXT] as [number, number, number])),
  },
  {
    // Longer than the queue size is allowed (Linux builds such tables); past 32768 entries it is not.
    name: 'indirect table of more than 32768 descriptors',
    code: 'VIRTQ_CHAIN_TOO_LONG',
    setup: (d, f) => {
      packedTable(
        f,
        T,
        Array.from({ length: 32769 }, () => [V, 4, 0] as [number, number, number]),
      );
      slots([[T, 16 * 32769, INDIRECT]])(d);
    },
  },
  {
    name: 'INDIRECT together with NEXT',
    code: 'VIRTQ_NESTED_INDIRECT',
    setup: (d, f) => {
      packedTable(f, T, [[V, 4, 0]]);
      slots([
        [T, 16, INDIRECT | NEXT],
        [V, 4, 0],
      ])(d);
    },
  },
  {
    name: 'indirect descriptor inside a NEXT-linked list',
    code: 'VIRTQ_NESTED_INDIRECT',
    setup: (d, f) => {
      packedTable(f, T, [[V, 4, 0]]);
      slots([
        [V, 4, NEXT],
        [T, 16, INDIRECT],
      ])(d);
    },
  },
  {
    name: 'indirect descriptor inside an indirect table',
    code: 'VIRTQ_NESTED_INDIRECT',
    setup: (d, f) => {
      packedTable(f, T2, [[V, 4, 0]]);
      packedTable(f, T, [[T2, 16, INDIRECT]]);
      slots([[T, 16, INDIRECT]])(d);
    },
  },
  { name: 'indirect length not a multiple of 16', code: 'VIRTQ_BAD_INDIRECT_LEN', setup: slots([[T, 40, INDIRECT]]) },
  { name: 'indirect length 0', code: 'VIRTQ_BAD_INDIRECT_LEN', setup: slots([[T, 0, INDIRECT]]) },
  {
    name: 'indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC',
    code: 'VIRTQ_BAD_DESCRIPTOR',
    indirect: false,
    setup: (d, f) => {
      packedTable(f, T, [[V, 4, 0]]);
      slots([[T, 16, INDIRECT]])(d);
    },
  },
  {
    name: 'readable descriptor after a writable one',
    code: 'VIRTQ_READABLE_AFTER_WRITABLE',
    setup: slots([
      [V, 4, WRITE | NEXT],
      [V, 4, 0],
    ]),
  },
  {
    name: 'readable indirect entry after a writable one',
    code: 'VIRTQ_READABLE_AFTER_WRITABLE',
    setup: (d, f) => {
      packedTable(f, T, [
        [V, 4, WRITE],
        [V, 4, 0],
      ]);
      slots([[T, 32, INDIRECT]])(d);
    },
  },
  { name: 'zero-length descriptor', code: 'VIRTQ_ZERO_LENGTH', setup: slots([[V, 0, 0]]) },
  {
    name: 'chain of 2^32 bytes',
    code: 'VIRTQ_CHAIN_TOO_LONG',
    setup: slots([
      [V, 16, NEXT],
      [V, 0xffff_fff0, WRITE],
    ]),
  },
  { name: 'buffer address 2^53', code: 'VIRTQ_BAD_DESCRIPTOR', setup: slots([[TWO_53, 4, 0]]) },
  { name: 'buffer address 2^64 - 16 (would wrap)', code: 'VIRTQ_BAD_DESCRIPTOR', setup: slots([[TOP, 32, 0]]) },
  { name: 'buffer in the gap between regions', code: 'VIRTQ_BAD_DESCRIPTOR', setup: slots([[GAP, 4, 0]]) },
  { name: 'buffer running off a region into the gap', code: 'VIRTQ_BAD_DESCRIPTOR', setup: slots([[R1_END - 1, 2, WRITE]]) },
  { name: 'indirect table in the gap', code: 'VIRTQ_BAD_DESCRIPTOR', setup: slots([[GAP, 32, INDIRECT]]) },
  {
    name: 'more chains in flight than the queue size',
    code: 'VIRTQ_TOO_MANY_IN_FLIGHT',
    setup: (d, _f, q) => {
      for (let i = 0; i < SIZE; i++) d.addChain([{ addr: V, len: 4 }]);
      d.publish();
      if (drain(q).length !== SIZE) throw new Error('setup: expected a full queue');
      q.flush(); // ends the batch (burst = size)
      // The device owns every slot; the driver marks slot 0 available again for the next lap.
      d.writeDescriptor(0, { addr: V, len: 4, id: 0, flags: PackedDriverRing.availBits(0) });
    },
  },
];

function check<D, L>(t: import('ava').ExecutionContext, s: QueueSetup<D, L>, code: RingErrorCode): void {
  const before = s.fake.snapshot();
  const inFlight = s.queue.inFlight;
  const counters = { ...s.queue.counters };
  const err = t.throws(() => s.queue.pop(), { instanceOf: RingError });
  t.is(err?.code, code);
  t.deepEqual(s.fake.changedSince(before), [], 'the walk wrote nothing to guest memory');
  t.true(s.fake.guardsIntact(), 'no byte outside the regions changed');
  t.is(s.queue.inFlight, inFlight, 'no chain leaked from the pool');
  t.deepEqual(s.queue.counters, counters);
  const again = t.throws(() => s.queue.pop(), { instanceOf: RingError });
  t.is(again?.code, code, 'nothing advanced: the same violation is reported again');
  t.is(s.queue.flush(), 0);
  t.deepEqual(s.fake.changedSince(before), []);
}

for (const row of splitRows) {
  test(`split rejects ${row.name} (${row.code})`, (t) => {
    const s = splitSetup({ size: SIZE, indirect: row.indirect ?? true, eventIdx: true });
    row.setup(s.driver, s.fake, s.queue);
    check(t, s, row.code);
  });
}

for (const row of packedRows) {
  test(`packed rejects ${row.name} (${row.code})`, (t) => {
    const s = packedSetup({ size: SIZE, indirect: row.indirect ?? true, eventIdx: true });
    row.setup(s.driver, s.fake, s.queue);
    check(t, s, row.code);
  });
}

test('every rule has a row in both layouts where the layout has the rule', (t) => {
  const split = new Set(splitRows.map((r) => r.code));
  const packed = new Set(packedRows.map((r) => r.code));
  const all: RingErrorCode[] = [
    'VIRTQ_CHAIN_LOOP',
    'VIRTQ_NESTED_INDIRECT',
    'VIRTQ_BAD_INDIRECT_LEN',
    'VIRTQ_BAD_DESCRIPTOR',
    'VIRTQ_READABLE_AFTER_WRITABLE',
    'VIRTQ_ZERO_LENGTH',
    'VIRTQ_CHAIN_TOO_LONG',
    'VIRTQ_TOO_MANY_IN_FLIGHT',
  ];
  for (const code of [...all, 'VIRTQ_BAD_HEAD', 'VIRTQ_AVAIL_IDX_JUMP'] as RingErrorCode[]) t.true(split.has(code), code);
  for (const code of all) t.true(packed.has(code), code);
});
