/**
 * Queues in worker threads (lib/runtime/queue-workers.ts) through the real engine: the TestDevice's
 * two queues run in two workers (each maps guest memory itself and builds its own device from the
 * module path), while the main thread keeps the protocol and the config space.
 */
import test, { type ExecutionContext } from 'ava';
import fs from 'node:fs';

import { DEFAULT_LAYOUT, SplitQueueDriver, type Frontend, type QueueState } from '../../helpers/frontend';
import { TestDevice, transform } from '../../helpers/test-device';
import { until } from '../../helpers/until';
import { TestServer, pattern } from '../vhost-user/harness';

const WORKERS = { threads: 2, modulePath: require.resolve('../../helpers/test-device'), exportName: 'createTestDeviceForWorker', config: { numQueues: 2 } };

function openFds(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

function threads(): number {
  return Number(/^Threads:\s+(\d+)/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))![1]);
}

async function roundTrip(t: ExecutionContext, fe: Frontend, queue: number, seed: number, region = 0): Promise<void> {
  const data = pattern(100 + seed, seed);
  const done = await fe.transfer(queue, { readable: [{ data, region }], writable: [{ length: data.length, region }] });
  t.deepEqual(done.written, transform(queue, data), `queue ${queue} seed ${seed}`);
}

async function setup(device: TestDevice): Promise<{ ts: TestServer; fe: Frontend; q0: QueueState }> {
  const ts = await TestServer.start(device, { queueWorkers: WORKERS });
  const fe = ts.connect();
  await fe.negotiate({ eventIdx: true });
  await fe.setMemTable(DEFAULT_LAYOUT);
  const q0 = await fe.setupQueue(0, 16);
  await fe.setupQueue(1, 16, { ringRegion: 1 });
  return { ts, fe, q0 };
}

test.serial('two queues in two workers: data moves on both, counters come back, GET_VRING_BASE resumes', async (t) => {
  const device = new TestDevice();
  const { ts, fe } = await setup(device);
  t.teardown(() => ts.close());
  t.teardown(() => fe.close());
  for (let i = 0; i < 5; i++) {
    await roundTrip(t, fe, 0, i);
    await roundTrip(t, fe, 1, 100 + i);
  }
  // The main thread's device never saw a queue: both ran in workers.
  t.deepEqual(device.starts, [0, 0]);
  t.deepEqual(device.completed, [0, 0]);
  // Config space is still answered by the main device.
  t.deepEqual(await fe.getConfig(0, 4), Uint8Array.of(0xa0, 0xa1, 0xa2, 0xa3));
  // Counters come back through shared memory.
  await until(() => ts.server.vrings[1]!.totals().requests === 5, 'five requests counted on queue 1');
  t.is(ts.server.vrings[0]!.totals().requests, 5);
  t.true(ts.server.vrings[0]!.kicks > 0);

  // Stop queue 0: the base is the next avail index (5 chains popped), then resume and continue.
  const base = await fe.getVringBase(0);
  t.is(base, 5);
  t.false(ts.server.vrings[0]!.started);
  await roundTrip(t, fe, 1, 200);
  await fe.restartQueue(0, base);
  for (let i = 0; i < 3; i++) await roundTrip(t, fe, 0, 300 + i);
  t.is(await fe.getVringBase(0), 8);
  t.is(ts.server.vrings[0]!.totals().requests, 8, 'counters of the stopped queue are kept');
});

test.serial('device messages: each new thread\'s device gets the main device\'s state first; messageWorkers reaches every running thread and brings back answers and errors', async (t) => {
  const device = new TestDevice();
  device.stateForWorkers = { units: 3 };
  const { ts, fe } = await setup(device);
  t.teardown(() => ts.close());
  t.teardown(() => fe.close());
  await roundTrip(t, fe, 0, 1);
  await roundTrip(t, fe, 1, 2);
  await roundTrip(t, fe, 1, 3);
  for (const worker of [0, 1]) {
    const calls = ts.logs.filter((e) => e.fields?.worker === worker && e.fields.call !== undefined).map((e) => e.fields!.call);
    t.deepEqual(calls.slice(0, 2), ['message {"units":3}', 'attach'], `worker ${worker}: the state before the first queue`);
  }
  const answers = await device.context!.messageWorkers!({ ping: 1 });
  t.deepEqual(answers, [
    { message: { ping: 1 }, completed: [1, 0] },
    { message: { ping: 1 }, completed: [0, 2] },
  ], 'one answer per thread, in thread order, from the device that ran the queue');
  await t.throwsAsync(device.context!.messageWorkers!('refuse'), { message: /refused by the test device/ });
  t.deepEqual(device.calls.filter((c) => c.startsWith('message')), [], 'the main device got none of them');
});

test.serial('a memory table change under running worker queues', async (t) => {
  const { ts, fe } = await setup(new TestDevice());
  t.teardown(() => ts.close());
  t.teardown(() => fe.close());
  await roundTrip(t, fe, 0, 1);
  const added = await fe.addMemReg({ gpa: 0x4000_0000, size: 1 << 20, userAddr: 0x7f60_0000_0000, mmapOffset: 0x5000 });
  const index = fe.memory.regions.indexOf(added);
  await roundTrip(t, fe, 0, 2, index);
  await roundTrip(t, fe, 1, 3, index);
  const extra = fe.memory.add({ gpa: 0x2_0000_0000, size: 1 << 20, userAddr: 0x7f70_0000_0000 });
  await fe.sendMemTable();
  await roundTrip(t, fe, 1, 4, fe.memory.regions.indexOf(extra));
  await fe.remMemReg(0x4000_0000);
  await roundTrip(t, fe, 0, 5);
  await roundTrip(t, fe, 1, 6);
});

test.serial('a ring violation in a worker breaks only that queue', async (t) => {
  const { ts, fe, q0 } = await setup(new TestDevice());
  t.teardown(() => ts.close());
  t.teardown(() => fe.close());
  await roundTrip(t, fe, 0, 1);
  const driver = q0.driver as SplitQueueDriver;
  driver.pushHead(19);
  driver.publish();
  fe.kick(0);
  await fe.waitErr(0);
  t.true(ts.logged('VIRTQ_BAD_HEAD').length > 0, 'the ring error code is logged');
  t.is(ts.server.vrings[0]!.brokenCount, 1);
  await roundTrip(t, fe, 1, 2);
  t.false(fe.backendClosed);
  t.is(ts.disconnects.length, 0);
});

test.serial('disconnect: threads exit and no fd stays open', async (t) => {
  const ts = await TestServer.start(new TestDevice(), { queueWorkers: WORKERS });
  t.teardown(() => ts.close());
  const fdsBefore = openFds();
  const threadsBefore = threads();
  for (let round = 0; round < 2; round++) {
    const fe = ts.connect();
    await fe.negotiate({ eventIdx: true });
    await fe.setMemTable(DEFAULT_LAYOUT);
    await fe.setupQueue(0, 16);
    await fe.setupQueue(1, 16, { ringRegion: 1 });
    await roundTrip(t, fe, 0, round);
    await roundTrip(t, fe, 1, round + 10);
    t.true(threads() >= threadsBefore + 2, 'two worker threads run');
    fe.close();
    await ts.nextDisconnect();
    await until(() => threads() <= threadsBefore, () => `threads back to ${threadsBefore} (now ${threads()})`);
    await until(() => openFds() === fdsBefore, () => `fds back to ${fdsBefore} (now ${openFds()})`);
  }
});

/** Start a 4-queue TestDevice with `queueGroups` over two threads, move data on every queue, say where each queue ran. */
async function placement(t: ExecutionContext, queueGroups: (number | null)[]): Promise<{ device: TestDevice; ts: TestServer; threadOf: (number | 'main')[] }> {
  const device = new TestDevice({ numQueues: 4, queueGroups });
  const ts = await TestServer.start(device, { queueWorkers: { ...WORKERS, config: { numQueues: 4 } } });
  t.teardown(() => ts.close());
  const fe = ts.connect();
  t.teardown(() => fe.close());
  await fe.negotiate({ eventIdx: true });
  await fe.setMemTable(DEFAULT_LAYOUT);
  for (let i = 0; i < 4; i++) await fe.setupQueue(i, 16);
  for (let i = 0; i < 4; i++) await roundTrip(t, fe, i, i);
  const threadOf = [0, 1, 2, 3].map((i): number | 'main' => {
    if (device.starts[i] === 1) return 'main';
    const start = ts.logs.find((e) => e.fields?.call === `start ${i}`);
    return start === undefined ? -1 : Number(start.fields!.worker);
  });
  return { device, ts, threadOf };
}

test.serial('queue groups: a net-like pair per thread, rx and tx of a pair together', async (t) => {
  const { device, ts, threadOf } = await placement(t, [0, 0, 1, 1]);
  t.deepEqual(device.starts, [0, 0, 0, 0], 'no queue on the main thread');
  const attaches = ts.logs.filter((e) => e.fields?.call === 'attach').map((e) => e.fields!.worker);
  t.deepEqual(attaches.sort(), [0, 1], 'each worker device is attached once, for its two queues');
  t.is(threadOf[0], threadOf[1], 'queues 0 and 1 share a thread');
  t.is(threadOf[2], threadOf[3], 'queues 2 and 3 share a thread');
  t.not(threadOf[0], threadOf[2], 'the two pairs run in different threads');
  t.deepEqual(threadOf.map((w) => typeof w), ['number', 'number', 'number', 'number']);
});

test.serial('queue groups: a scsi-like layout keeps control and event on the main thread, spreads the request queues', async (t) => {
  const { device, threadOf } = await placement(t, [null, null, 0, 1]);
  t.deepEqual(threadOf.slice(0, 2), ['main', 'main']);
  t.deepEqual(device.completed.slice(0, 2), [1, 1], 'the main device processed queues 0 and 1');
  t.deepEqual(device.completed.slice(2), [0, 0]);
  t.true(typeof threadOf[2] === 'number' && threadOf[2] >= 0);
  t.true(typeof threadOf[3] === 'number' && threadOf[3] >= 0);
  t.not(threadOf[2], threadOf[3], 'one request queue per thread');
});
