/**
 * The drain loop (lib/virtqueue/drain.ts) over a real split ring in fake guest memory: what the
 * driver sees in the used ring and in used.flags after each way a drain can end.
 */
import test from 'ava';

import { RingError } from '../../../lib/errors';
import { VRING_USED_F_NO_NOTIFY } from '../../../lib/virtio/constants';
import { drainQueue, type DescriptorChain, type DrainHandler } from '../../../lib/virtqueue';
import { R0_DATA, splitSetup } from './setup';

/** Offer `n` chains of one 16-byte writable buffer each; returns their heads. */
function offer(driver: ReturnType<typeof splitSetup>['driver'], n: number): number[] {
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
