/**
 * Adaptive polling in the queue runtime (QueueDriver, `--poll-us`), as a front-end sees it: while the
 * daemon polls after a batch it tells the driver not to kick and still serves what the driver adds;
 * once polling gave up it asks for kicks again and spends nothing; `--poll-us 0` never polls. Split
 * and packed rings, with and without EVENT_IDX.
 */
import test, { type ExecutionContext } from 'ava';

import { MAX_POLL_US } from '../../../lib/cli/common-options';
import { DEFAULT_LAYOUT, type Frontend, type QueueState } from '../../helpers/frontend';
import { TestDevice, transform } from '../../helpers/test-device';
import { TestServer, pattern } from './harness';

const RINGS = [
  { name: 'split, EVENT_IDX', packed: false, eventIdx: true },
  { name: 'split, no EVENT_IDX', packed: false, eventIdx: false },
  { name: 'packed, EVENT_IDX', packed: true, eventIdx: true },
  { name: 'packed, no EVENT_IDX', packed: true, eventIdx: false },
] as const;

async function start(t: ExecutionContext, pollUs: number, ring: (typeof RINGS)[number]): Promise<{ ts: TestServer; fe: Frontend; q: QueueState }> {
  const ts = await TestServer.start(new TestDevice(), { pollUs });
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
  });
  await fe.negotiate({ packed: ring.packed, eventIdx: ring.eventIdx });
  await fe.setMemTable(DEFAULT_LAYOUT);
  const q = await fe.setupQueue(0, 16);
  return { ts, fe, q };
}

async function roundTrip(t: ExecutionContext, fe: Frontend, seed: number): Promise<void> {
  const data = pattern(64, seed);
  const done = await fe.transfer(0, { readable: [{ data }], writable: [{ length: data.length }] });
  t.deepEqual(done.written, transform(0, data));
}

const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

for (const ring of RINGS) {
  test(`${ring.name}: chains added while the queue polls are served without a kick`, async (t) => {
    // The largest window: the poll outlasts anything this test does between two requests.
    const { ts, fe, q } = await start(t, MAX_POLL_US, ring);
    await roundTrip(t, fe, 1);
    const kicks = ts.server.vrings[0]!.kicks;
    for (let seed = 2; seed < 6; seed++) {
      t.false(q.driver.kickWanted(), 'the driver is told not to kick while the queue polls');
      await roundTrip(t, fe, seed); // publish() sees no request for a kick, so none is sent
    }
    t.is(ts.server.vrings[0]!.kicks, kicks);
    t.true(ts.server.vrings[0]!.polls.hits >= 4);
  });

  test(`${ring.name}: an idle queue stops polling, asks for kicks and spends nothing until the next one`, async (t) => {
    const { ts, fe, q } = await start(t, 1, ring);
    await roundTrip(t, fe, 1);
    // The 1 µs window runs out on its own; the daemon then re-enables notifications.
    while (!q.driver.kickWanted()) await turn();
    const vring = ts.server.vrings[0]!;
    const polled = vring.polls.seconds;
    for (let i = 0; i < 20; i++) await fe.sync();
    t.is(vring.polls.seconds, polled, 'no poll round runs while the queue sleeps');
    const kicks = vring.kicks;
    await roundTrip(t, fe, 2);
    t.is(vring.kicks, kicks + 1, 'the next chain comes with a kick and is served');
  });

  test(`${ring.name}: --poll-us 0 never polls; every chain after an idle ring is kicked`, async (t) => {
    const { ts, fe, q } = await start(t, 0, ring);
    const vring = ts.server.vrings[0]!;
    for (let seed = 1; seed < 5; seed++) {
      const kicks = vring.kicks;
      await roundTrip(t, fe, seed);
      t.is(vring.kicks, kicks + 1);
      t.true(q.driver.kickWanted(), 'notifications are back on as soon as the batch is done');
    }
    t.deepEqual(vring.polls, { hits: 0, seconds: 0 });
  });
}
