/**
 * The drain loop (lib/virtqueue/drain.ts) over a real split ring in fake guest memory: what the
 * driver sees in the used ring and in used.flags after each way a drain can end.
 */
import test from 'ava';

import { RingError } from '../../../lib/errors';
import { VRING_PACKED_EVENT_FLAG_DESC, VRING_PACKED_EVENT_FLAG_ENABLE, VRING_USED_F_NO_NOTIFY } from '../../../lib/virtio/constants';
import { drainQueue, type DescriptorChain, type DrainHandler, type Virtqueue } from '../../../lib/virtqueue';
import { R0_DATA, packedSetup, splitSetup } from './setup';

/** Offer `n` chains of one 16-byte writable buffer each; returns their heads. */
function offer(driver: ReturnType<typeof splitSetup>['driver'] | ReturnType<typeof packedSetup>['driver'], n: number): number[] {
  const heads: number[] = [];
  for (let i = 0; i < n; i++) heads.push(driver.addChain([{ addr: R0_DATA + 0x100 * heads.length, len: 16, writable: true }]));
  driver.publish();
  return heads;
}

/** A handler that completes each chain at once with 16 bytes and counts batches. */
function completing(queue: ReturnType<typeof splitSetup>['queue'], extra: Partial<DrainHandler> = {}): DrainHandler & { handled: number; batches: number } {
  const h = {
    handled: 0,
    batches: 0,
    handle(chain: DescriptorChain): boolean {
      h.handled++;
      queue.pushUsed(chain, 16);
      return true;
    },
    endBatch(): void {
      h.batches++;
    },
    ...extra,
  };
  return h;
}

test('every chain is handled in one batch, published with one flush, notifications back on', (t) => {
  const s = splitSetup();
  const heads = offer(s.driver, 3);
  const h = completing(s.queue);
  t.is(drainQueue(s.queue, h), 'idle');
  t.is(h.handled, 3);
  t.is(h.batches, 1);
  t.is(s.queue.counters.batches, 1);
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    heads,
  );
  t.is(s.driver.usedFlags(), 0, 'the driver may kick again');
});

test('chains that arrive during a drain are taken in a second batch before it returns (virtio 1.2 §2.7.10)', (t) => {
  const s = splitSetup();
  offer(s.driver, 1);
  const h = completing(s.queue);
  h.endBatch = () => {
    // The driver adds a chain after the device found the ring empty, before notifications are back on.
    if (h.batches++ === 0) offer(s.driver, 1);
  };
  t.is(drainQueue(s.queue, h), 'idle');
  t.is(h.handled, 2);
  t.is(h.batches, 2);
  t.is(s.driver.takeUsed().length, 2);
});

test('ready() false pauses: the next chain stays in the ring, notifications stay off, earlier ones are published', (t) => {
  const s = splitSetup();
  const heads = offer(s.driver, 3);
  let quota = 2;
  const h = completing(s.queue, { ready: () => quota > 0 });
  const take = h.handle.bind(h);
  h.handle = (chain) => (quota--, take(chain));
  t.is(drainQueue(s.queue, h), 'paused');
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    heads.slice(0, 2),
  );
  t.is(s.driver.usedFlags(), VRING_USED_F_NO_NOTIFY, 'no kick needed: the device resumes by itself');
  t.is(s.queue.inFlight, 0, 'the third chain was not popped');
  quota = 5;
  t.is(drainQueue(s.queue, h), 'idle');
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    heads.slice(2),
  );
  t.is(s.driver.usedFlags(), 0);
});

test('handle() false pauses after that chain (an asynchronous fill in flight); it completes later', (t) => {
  const s = splitSetup();
  const heads = offer(s.driver, 2);
  let held: DescriptorChain | null = null;
  const result = drainQueue(s.queue, {
    handle: (chain) => {
      held = chain;
      return false;
    },
  });
  t.is(result, 'paused');
  t.is(s.queue.inFlight, 1, 'only the first chain was taken');
  t.is(s.driver.takeUsed().length, 0);
  s.queue.pushUsed(held!, 16);
  s.queue.flush();
  const h = completing(s.queue);
  t.is(drainQueue(s.queue, h), 'idle');
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    heads,
  );
});

test('a RingError from pop mid-batch: the chains before it finish (end of batch, flush), then it propagates', (t) => {
  const s = splitSetup();
  const heads = offer(s.driver, 2);
  s.driver.writeAvailRing(s.driver.availIdx, s.driver.size); // a head index out of range
  s.driver.writeAvailIdx(s.driver.availIdx + 1);
  const h = completing(s.queue);
  const err = t.throws(() => drainQueue(s.queue, h), { instanceOf: RingError });
  t.is(err?.code, 'VIRTQ_BAD_HEAD');
  t.is(h.batches, 1, 'the end-of-batch hook ran (blk submits what it staged)');
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    heads,
    'the valid chains were published',
  );
  t.is(s.notified.count, 1, 'and the driver was told');
});

test('a malformed chain thrown by the handler: earlier completions are kept, the error propagates', (t) => {
  const s = splitSetup();
  const heads = offer(s.driver, 3);
  const h = completing(s.queue);
  const take = h.handle.bind(h);
  h.handle = (chain) => {
    if (chain.head === heads[1]) throw new RingError('VIRTQ_BAD_REQUEST', 'malformed request');
    return take(chain);
  };
  const err = t.throws(() => drainQueue(s.queue, h), { instanceOf: RingError });
  t.is(err?.code, 'VIRTQ_BAD_REQUEST');
  t.is(h.handled, 1, 'nothing after the bad chain is handled');
  t.is(h.batches, 1);
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    heads.slice(0, 1),
  );
});

// Early publish (drain.ts): a driver waiting for the next used element is woken by the first
// completion of a batch, so it can refill while the device finishes the rest.

/** What the driver saw when the device took each chain: used elements so far, interrupts so far. */
interface Seen {
  used: number;
  interrupts: number;
}

/**
 * How a staging handler's end of batch completes what it staged: 'complete' pushes the used elements
 * (the drain flushes), 'flush' pushes and flushes them itself (blk: the null executor completes in
 * submit, and the completion path flushes), 'async' completes nothing (the I/O finishes later).
 */
type Completing = 'complete' | 'flush' | 'async';

/**
 * A handler like blk's: each chain is staged, and the end of a batch completes them as `mode` says.
 * Before taking each chain it records what the driver sees, through `driverUsed` (the used elements
 * it can read now).
 */
function staging(queue: Virtqueue, notified: { count: number }, driverUsed: () => number, mode: Completing = 'complete'): DrainHandler & { seen: Seen[]; batches: number } {
  const staged: DescriptorChain[] = [];
  let used = 0;
  const h = {
    seen: [] as Seen[],
    batches: 0,
    handle(chain: DescriptorChain): boolean {
      used += driverUsed();
      h.seen.push({ used, interrupts: notified.count });
      staged.push(chain);
      return true;
    },
    endBatch(): void {
      h.batches++;
      if (mode === 'async') return;
      for (const chain of staged.splice(0)) queue.pushUsed(chain, 16);
      if (mode === 'flush') queue.flush();
    },
  };
  return h;
}

/** A split EVENT_IDX ring after one round trip (the first flush always notifies), the driver re-armed at its used index. */
function warmSplit(): ReturnType<typeof splitSetup> {
  const s = splitSetup({ eventIdx: true, size: 16 });
  offer(s.driver, 1);
  drainQueue(s.queue, completing(s.queue));
  s.driver.takeUsed();
  s.driver.setUsedEvent(s.driver.lastUsed);
  s.notified.count = 0;
  return s;
}

for (const mode of ['complete', 'flush'] as const) {
  test(`EVENT_IDX, end of batch ${mode === 'flush' ? 'flushes itself' : 'completes'}: a driver waiting for the next used element is interrupted after the first completion of a batch, not the last`, (t) => {
  const s = warmSplit();
  const heads = offer(s.driver, 6);
  const h = staging(s.queue, s.notified, () => s.driver.takeUsed().length, mode);
  t.is(drainQueue(s.queue, h), 'idle');
  t.deepEqual(h.seen[0], { used: 0, interrupts: 0 });
  t.deepEqual(h.seen.slice(1), Array(5).fill({ used: 1, interrupts: 1 }), 'while the device took chains 2..6, the first was published and signalled');
  t.is(s.notified.count, 1, 'one interrupt for the batch: the driver had not re-armed');
  t.is(s.driver.takeUsed().length, 5);
  t.is(s.driver.usedIdx(), (1 + heads.length) & 0xffff);
  t.is(h.batches, 2, 'the early end of batch and the final one');
});
}

test('EVENT_IDX: a driver that asked for an interrupt at the end of the batch gets exactly one, when all is published', (t) => {
  const s = warmSplit();
  offer(s.driver, 6);
  s.driver.setUsedEvent(s.driver.lastUsed + 5); // like Linux virtqueue_enable_cb_delayed
  const h = staging(s.queue, s.notified, () => s.driver.takeUsed().length);
  drainQueue(s.queue, h);
  t.deepEqual(h.seen, Array(6).fill({ used: 0, interrupts: 0 }), 'nothing published before the end');
  t.is(s.notified.count, 1);
  t.is(s.driver.takeUsed().length, 6);
  t.is(h.batches, 1);
});

test('EVENT_IDX: a driver busy consuming (used_event behind) gets no interrupt and one publish per batch', (t) => {
  const s = warmSplit();
  s.driver.setUsedEvent(s.driver.lastUsed - 1);
  offer(s.driver, 6);
  const h = staging(s.queue, s.notified, () => s.driver.takeUsed().length);
  drainQueue(s.queue, h);
  t.deepEqual(h.seen, Array(6).fill({ used: 0, interrupts: 0 }));
  t.is(s.notified.count, 0);
  t.is(h.batches, 1);
  t.is(s.queue.counters.batches, 1 + 1, 'the warm-up and this batch');
});

for (const mode of ['complete', 'flush'] as const) {
  test(`EVENT_IDX, end of batch ${mode === 'flush' ? 'flushes itself' : 'completes'}: a driver that answers the early call within the batch wakes fast: the rest is published once, and early calls pause`, (t) => {
  const s = warmSplit();
  /** The driver takes what is published and goes back to waiting (used_event = what it has seen). */
  const fastDriver = (): number => {
    const n = s.driver.takeUsed().length;
    s.driver.setUsedEvent(s.driver.lastUsed);
    return n;
  };
  offer(s.driver, 6);
  const h = staging(s.queue, s.notified, fastDriver, mode);
  drainQueue(s.queue, h);
  t.deepEqual(
    h.seen.map((x) => x.interrupts),
    [0, 1, 1, 1, 1, 1],
    'one early call, then the batch as usual',
  );
  t.is(s.notified.count, 2, 'the early call and the end of the batch');
  t.is(s.driver.takeUsed().length, 5);
  s.driver.setUsedEvent(s.driver.lastUsed);

  // The next pass publishes once (backing off one pass), the one after it tries an early call again.
  const early = (driverUsed = fastDriver): number[] => {
    s.notified.count = 0;
    offer(s.driver, 4);
    const hh = staging(s.queue, s.notified, driverUsed, mode);
    drainQueue(s.queue, hh);
    s.driver.takeUsed();
    s.driver.setUsedEvent(s.driver.lastUsed);
    return hh.seen.map((x) => x.interrupts);
  };
  t.deepEqual(early(), [0, 0, 0, 0], 'backing off: no early call');
  t.deepEqual(early(), [0, 1, 1, 1], 'probing again');
  t.deepEqual(early(), [0, 0, 0, 0], 'fast again: two passes without early calls');
  t.deepEqual(early(), [0, 0, 0, 0]);
  t.deepEqual(early(), [0, 1, 1, 1], 'probing again, fast again: four passes without');

  // The driver turns slow (its early call is still unanswered when the batch ends): the back-off
  // halves at each probe that paid, down to early calls in every pass.
  const slowDriver = (): number => 0;
  const passes = Array.from({ length: 14 }, () => early(slowDriver)[1]);
  t.deepEqual(passes, [0, 0, 0, 0, 1, 0, 0, 1, 0, 1, 1, 1, 1, 1]);
});
}

test('EVENT_IDX: a driver slow to wake (still asleep when the batch ends) gets an early call in every batch', (t) => {
  const s = warmSplit();
  for (let round = 0; round < 4; round++) {
    s.notified.count = 0;
    offer(s.driver, 4);
    const h = staging(s.queue, s.notified, () => 0);
    drainQueue(s.queue, h);
    t.deepEqual(
      h.seen.map((x) => x.interrupts),
      [0, 1, 1, 1],
    );
    t.is(s.notified.count, 1);
    t.is(s.driver.takeUsed().length, 4);
    s.driver.setUsedEvent(s.driver.lastUsed);
  }
});

test('EVENT_IDX: a single chain for a waiting driver is one batch: nothing to overlap with, no early end', (t) => {
  const s = warmSplit();
  offer(s.driver, 1);
  const h = staging(s.queue, s.notified, () => s.driver.takeUsed().length);
  drainQueue(s.queue, h);
  t.is(h.batches, 1);
  t.is(s.notified.count, 1);
  t.is(s.driver.takeUsed().length, 1);
});

test('EVENT_IDX: with asynchronous completions the early end of batch happens once per pass, not per chain', (t) => {
  const s = warmSplit();
  offer(s.driver, 6);
  const h = staging(s.queue, s.notified, () => 0, 'async');
  drainQueue(s.queue, h);
  t.is(h.batches, 2, 'one early submit (it published nothing), then the end of the batch');
  t.is(s.notified.count, 0);
});

test('without EVENT_IDX nothing is published early: one flush and one interrupt per batch', (t) => {
  const s = splitSetup({ size: 16 });
  offer(s.driver, 6);
  const h = staging(s.queue, s.notified, () => s.driver.takeUsed().length);
  drainQueue(s.queue, h);
  t.deepEqual(h.seen, Array(6).fill({ used: 0, interrupts: 0 }));
  t.is(s.notified.count, 1);
  t.is(h.batches, 1);
});

test('packed EVENT_IDX: a driver waiting with RING_EVENT_FLAGS_DESC at the next used slot is interrupted after the first completion', (t) => {
  const s = packedSetup({ eventIdx: true, size: 16 });
  offer(s.driver, 1);
  drainQueue(s.queue, completing(s.queue));
  s.driver.takeUsed();
  s.driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_DESC, s.driver.nextUsed, s.driver.usedWrap);
  s.notified.count = 0;
  offer(s.driver, 6);
  const h = staging(s.queue, s.notified, () => s.driver.takeUsed().length);
  drainQueue(s.queue, h);
  t.deepEqual(h.seen.slice(1), Array(5).fill({ used: 1, interrupts: 1 }));
  t.is(s.notified.count, 1);
  t.is(s.driver.takeUsed().length, 5);

  // RING_EVENT_FLAGS_ENABLE: the driver wants every batch signalled but does not say it sleeps.
  s.driver.setDriverEvent(VRING_PACKED_EVENT_FLAG_ENABLE);
  s.notified.count = 0;
  offer(s.driver, 6);
  const h2 = staging(s.queue, s.notified, () => s.driver.takeUsed().length);
  drainQueue(s.queue, h2);
  t.deepEqual(h2.seen, Array(6).fill({ used: 0, interrupts: 0 }));
  t.is(s.notified.count, 1);
});
