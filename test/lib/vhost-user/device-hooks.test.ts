/**
 * The device's lifecycle hooks (device-backend.ts): which ones the engine calls, in which order, for
 * queues on the main thread and for queues in worker threads (the worker's own device instance).
 */
import test, { type ExecutionContext } from 'ava';

import { Request } from '../../../lib/vhost-user/messages';
import { DEFAULT_LAYOUT, type Frontend } from '../../helpers/frontend';
import { TestDevice, transform } from '../../helpers/test-device';
import { TestServer, pattern } from './harness';

const REGIONS = DEFAULT_LAYOUT.length;
const ADDED = { gpa: 0x4000_0000, size: 1 << 20, userAddr: 0x7f60_0000_0000, mmapOffset: 0x5000 };

/** The calls up to both queues running. A ring starts at SET_VRING_KICK; SET_VRING_ENABLE (or the implicit enable) follows. */
const RUNNING = ['attach', `memory ${REGIONS}`, 'start 0', 'enabled 0 true', 'start 1', 'enabled 1 true'];

async function roundTrip(t: ExecutionContext, fe: Frontend, queue: number, seed: number): Promise<void> {
  const data = pattern(64, seed);
  const done = await fe.transfer(queue, { readable: [{ data }], writable: [{ length: data.length }] });
  t.deepEqual(done.written, transform(queue, data));
}

/** The same session for every test: queues 0 and 1 run, 1 is disabled twice and enabled, memory grows, 0 stops, reset, disconnect. */
async function session(t: ExecutionContext, ts: TestServer, legacy = false): Promise<void> {
  const fe = ts.connect();
  await fe.negotiate({ legacy });
  await fe.setMemTable(DEFAULT_LAYOUT);
  await fe.setupQueue(0, 16);
  await fe.setupQueue(1, 16);
  await roundTrip(t, fe, 0, 1);
  if (!legacy) {
    await fe.setVringEnable(1, false);
    await fe.setVringEnable(1, false); // no change: not reported again
    await fe.setVringEnable(1, true);
  }
  await roundTrip(t, fe, 1, 2);
  if (legacy) {
    fe.memory.add(ADDED);
    await fe.sendMemTable(); // ADD_MEM_REG needs a protocol feature
  } else {
    await fe.addMemReg(ADDED);
  }
  await fe.getVringBase(0);
  if (!legacy) await fe.request(Request.RESET_DEVICE);
  fe.close();
  await ts.nextDisconnect();
}

test('queues on the main thread: hooks in order, enable changes reported once, reset before detach', async (t) => {
  const device = new TestDevice();
  const ts = await TestServer.start(device);
  t.teardown(() => ts.close());
  await session(t, ts);
  t.deepEqual(device.calls, [
    ...RUNNING,
    'enabled 1 false',
    'enabled 1 true',
    `memory ${REGIONS + 1}`,
    'stop 0', // GET_VRING_BASE
    'stop 1', // RESET_DEVICE stops what still runs, then resets
    'reset',
    'reset', // the disconnect resets too
    'detach',
  ]);
});

test('a front-end without protocol features: rings are enabled implicitly, reported right after startQueue', async (t) => {
  const device = new TestDevice();
  const ts = await TestServer.start(device);
  t.teardown(() => ts.close());
  await session(t, ts, true);
  t.deepEqual(device.calls, [...RUNNING, `memory ${REGIONS + 1}`, 'stop 0', 'stop 1', 'reset', 'detach']);
});

test.serial('queues in worker threads: each worker device sees its queue hooks and the resets, the main device the rest', async (t) => {
  const device = new TestDevice();
  const ts = await TestServer.start(device, {
    queueWorkers: { threads: 2, modulePath: require.resolve('../../helpers/test-device'), exportName: 'createTestDeviceForWorker', config: { numQueues: 2 } },
  });
  t.teardown(() => ts.close());
  await session(t, ts);
  // The main device runs no queue but hears of memory, reset and the connection.
  t.deepEqual(device.calls, ['attach', `memory ${REGIONS}`, `memory ${REGIONS + 1}`, 'reset', 'reset', 'detach']);
  const callsOf = (worker: number): string[] => ts.logs.filter((e) => e.fields?.call !== undefined && e.fields.worker === worker).map((e) => String(e.fields!.call));
  const deadline = Date.now() + 5000;
  while (!callsOf(0).includes('detach') || !callsOf(1).includes('detach')) {
    if (Date.now() > deadline) break;
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
  // Each worker device is reset as the main one is: by RESET_DEVICE, then by the disconnect, before detach.
  t.deepEqual(callsOf(0), ['attach', 'start 0', 'enabled 0 true', `memory ${REGIONS + 1}`, 'stop 0', 'reset', 'reset', 'detach']);
  t.deepEqual(callsOf(1), ['attach', 'start 1', 'enabled 1 true', 'enabled 1 false', 'enabled 1 true', `memory ${REGIONS + 1}`, 'stop 1', 'reset', 'reset', 'detach']);
});
