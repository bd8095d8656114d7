/**
 * 1000 front-ends in a row (connect → negotiate → mem table → two queues → one chain → hang up)
 * against an in-process server: afterwards the process has exactly the fds it had before, and its
 * resident memory grew by little. A leak of one fd or one mapping per connection shows here.
 */
import test from 'ava';

import { DEFAULT_LAYOUT } from '../../helpers/frontend';
import { TestDevice } from '../../helpers/test-device';
import { TestServer, collectGarbage, expectedOutput, openFds, pattern, settleFds } from './harness';

const CYCLES = 1000;
// Enough for V8 to settle its heap size (heapTotal grows for the first few hundred connections).
const WARMUP = 200;
const MiB = 1 << 20;

async function cycle(ts: TestServer, i: number): Promise<void> {
  const fe = ts.connect();
  try {
    await fe.negotiate({ packed: i % 2 === 1, eventIdx: true });
    await fe.setMemTable(DEFAULT_LAYOUT);
    await fe.setupQueue(0, 16);
    await fe.setupQueue(1, 16, { ringRegion: 2 });
    await fe.setBackendChannel();
    const data = pattern(64, i);
    const done = await fe.transfer(0, { readable: [{ data, region: 1 }], writable: [{ length: 64, region: 2 }] });
    if (done.written.length !== 64 || Buffer.compare(done.written, expectedOutput(0, [data], 64)) !== 0) {
      throw new Error(`cycle ${i}: wrong bytes`);
    }
  } finally {
    fe.close();
  }
  const ev = await ts.nextDisconnect();
  if (ev.code !== undefined) throw new Error(`cycle ${i}: dropped with ${ev.code}`);
}

test(`${CYCLES} connections leave no fd behind and little memory`, async (t) => {
  const device = new TestDevice();
  const ts = await TestServer.start(device);
  t.teardown(() => ts.close());

  // Warm up (JIT, pools, lazily created native state) before taking the baseline.
  for (let i = 0; i < WARMUP; i++) await cycle(ts, i);
  collectGarbage();
  const fdsBefore = openFds();
  const rssBefore = process.memoryUsage().rss;

  for (let i = 0; i < CYCLES; i++) await cycle(ts, i);

  collectGarbage();
  t.is(await settleFds(fdsBefore), fdsBefore, 'open fds unchanged');
  const growth = process.memoryUsage().rss - rssBefore;
  t.log(`RSS growth over ${CYCLES} connections: ${(growth / MiB).toFixed(1)} MiB`);
  t.true(growth < 20 * MiB, `RSS grew by ${(growth / MiB).toFixed(1)} MiB`);
  t.is(device.attaches, CYCLES + WARMUP);
  t.is(device.detaches, CYCLES + WARMUP);
  t.deepEqual(device.errors, [[], []]);
});
