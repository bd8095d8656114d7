/**
 * SlotPool: one preallocated slot per ring entry; peek shows the next, take hands it out, put takes it
 * back, and nothing is handed out twice while in use.
 */
import test from 'ava';

import { SlotPool } from '../../../lib/virtqueue/slot-pool';

class Slot {
  constructor(readonly index: number) {}
}

test('hands out every slot once, then none until one is put back', (t) => {
  const pool = new SlotPool((i) => new Slot(i));
  pool.ensure(4);
  const taken = new Set<number>();
  for (let i = 0; i < 4; i++) {
    const next = pool.peek()!;
    t.is(pool.take(), next, 'take hands out what peek showed');
    taken.add(next.index);
  }
  t.is(taken.size, 4);
  t.is(pool.peek(), undefined, 'all in use');
  pool.put(pool.slots[2]!);
  t.is(pool.peek(), pool.slots[2]);
  t.is(pool.take().index, 2);
  t.is(pool.peek(), undefined);
});

test('ensure grows to the queue size and keeps the slots it made', (t) => {
  const pool = new SlotPool((i) => new Slot(i));
  pool.ensure(2);
  const first = pool.slots[0];
  pool.ensure(8);
  t.is(pool.slots.length, 8);
  t.is(pool.slots[0], first);
  pool.ensure(4);
  t.is(pool.slots.length, 8, 'never shrinks');
  t.deepEqual(pool.slots.map((s) => s.index), [0, 1, 2, 3, 4, 5, 6, 7]);
});
