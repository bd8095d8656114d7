/**
 * Early publishing in the queue runtime (lib/virtqueue/drain.ts), as a front-end sees it: a driver
 * that sleeps until its next completion (EVENT_IDX used_event at the used index it has seen) gets
 * that completion and its interrupt while the daemon is still taking the rest of a big batch, so it
 * can refill in parallel; a driver that asked to be called when the whole batch is done gets exactly
 * one interrupt, after the last. The device is the in-process TestDevice, whose pop hook runs inside
 * the daemon's drain: what the front-end sees there is what it would see concurrently.
 */
import test, { type ExecutionContext } from 'ava';

import { native } from '../../../native';
import { DEFAULT_LAYOUT, SplitQueueDriver, type ChainSpec, type Frontend, type QueueState } from '../../helpers/frontend';
import { TestDevice, transform } from '../../helpers/test-device';
import { TestServer, pattern } from './harness';

const BATCH = 8;

/** What the front-end sees as the daemon takes a chain: the used index and whether a call is pending. */
interface Seen {
  usedIdx: number;
  called: boolean;
}

async function start(t: ExecutionContext): Promise<{ fe: Frontend; q: QueueState; ring: SplitQueueDriver['ring']; seen: Seen[] }> {
  const seen: Seen[] = [];
  let look: (() => void) | null = null;
  const ts = await TestServer.start(new TestDevice({ onPop: () => look?.() }));
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
  });
  await fe.negotiate({ eventIdx: true });
  await fe.setMemTable(DEFAULT_LAYOUT);
  const q = await fe.setupQueue(0, 64);
  const ring = (q.driver as SplitQueueDriver).ring;
  // One round trip first: the daemon's first publish always signals, whatever used_event says.
  const warm = pattern(16, 0);
  t.deepEqual((await fe.transfer(0, { readable: [{ data: warm }], writable: [{ length: 16 }] })).written, transform(0, warm));
  look = () => {
    // Peek at the call eventfd without taking the call from the front-end's watcher.
    const pending = native.eventfdRead(q.callFd);
    if (pending > 0) native.eventfdWrite(q.callFd, pending);
    seen.push({ usedIdx: ring.usedIdx(), called: pending > 0 });
  };
  return { fe, q, ring, seen };
}

function batch(): ChainSpec[] {
  return Array.from({ length: BATCH }, (_, i) => ({ readable: [{ data: pattern(16, i + 1) }], writable: [{ length: 16 }] }));
}

async function collectBatch(t: ExecutionContext, fe: Frontend, chains: readonly ChainSpec[]): Promise<void> {
  const ids = fe.submit(0, chains);
  const done = await fe.collect(0, BATCH);
  for (const c of done) {
    const spec = chains[ids.indexOf(c.id)]!;
    t.deepEqual(c.written, transform(0, spec.readable![0]!.data!));
  }
}

test('a front-end waiting for its next completion gets it, and its call, while the daemon still takes the rest of the batch', async (t) => {
  const { fe, q, ring, seen } = await start(t);
  const used = ring.usedIdx();
  t.is(ring.lastUsed, used, 'used_event is at the used index the driver has seen: it waits');
  const calls = q.calls;
  await collectBatch(t, fe, batch());
  t.is(seen.length, BATCH);
  t.deepEqual(seen[0], { usedIdx: used, called: false });
  t.deepEqual(seen.slice(1), Array(BATCH - 1).fill({ usedIdx: (used + 1) & 0xffff, called: true }), 'the first completion was out before the second chain was taken');
  t.is(q.calls, calls + 1, 'one call for the batch: the driver had not re-armed when the rest was published');
});

test('a front-end that asked to be called when the whole batch is done is called once, after the last completion', async (t) => {
  const { fe, q, ring, seen } = await start(t);
  const used = ring.usedIdx();
  const calls = q.calls;
  const chains = batch();
  const ids = fe.submit(0, chains);
  // As Linux virtqueue_enable_cb_delayed: interrupt when the last of these is used.
  ring.setUsedEvent((ring.lastUsed + BATCH - 1) & 0xffff);
  await fe.waitCall(0); // collect would re-arm used_event at once
  const done = fe.takeCompletions(0);
  t.deepEqual(
    done.map((c) => c.id),
    ids,
  );
  t.deepEqual(seen, Array(BATCH).fill({ usedIdx: used, called: false }), 'nothing published or signalled before the end of the batch');
  t.is(q.calls, calls + 1);
});
