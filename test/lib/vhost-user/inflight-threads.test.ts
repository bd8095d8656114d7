/**
 * Crash-safe restart through the real engine (INFLIGHT_SHMFD), with the queues in worker threads
 * (each maps its own part of the inflight area) and on the main thread, split and packed rings.
 * The test front-end gets an area from the first back-end and hands it over (SET_INFLIGHT_FD); the
 * first back-end's device completes the 1st and 3rd chain per queue and keeps the rest (out of
 * order, so the ring alone cannot tell what is left: split rings need the area too); the connection drops
 * with those in flight; the front-end reconnects to a second back-end with the same area and the
 * base QEMU sends after a crash (split: used.idx; packed: the base of the last start), and the
 * second back-end completes exactly the chains the first left, oldest first, with their data, before
 * anything new.
 */
import test, { type ExecutionContext } from 'ava';

import { native } from '../../../native';
import { DEFAULT_LAYOUT, type ChainSpec } from '../../helpers/frontend';
import { TestDevice, transform, type TestDeviceOptions } from '../../helpers/test-device';
import { until } from '../../helpers/until';
import { assertServes, TestServer, pattern } from './harness';

const SIZE = 16;
const CHAINS = 6;

function workersFor(config: TestDeviceOptions): { threads: number; modulePath: string; exportName: string; config: TestDeviceOptions } {
  return { threads: 2, modulePath: require.resolve('../../helpers/test-device'), exportName: 'createTestDeviceForWorker', config };
}

async function backend(config: TestDeviceOptions, workers: boolean): Promise<{ ts: TestServer; device: TestDevice }> {
  const device = new TestDevice(config);
  const ts = await TestServer.start(device, workers ? { queueWorkers: workersFor(config) } : {});
  return { ts, device };
}

/** `held`: pop positions the first back-end keeps (never completes); it completes the others. */
async function run(t: ExecutionContext, packed: boolean, workers: boolean, held: number[]): Promise<void> {
  const HELD = held;
  const COMPLETED = [...Array(CHAINS).keys()].filter((k) => !held.includes(k));
  const negotiate = { packed, eventIdx: true };
  const first = await backend({ numQueues: 2, inflight: true, holdPops: HELD }, workers);
  t.teardown(() => first.ts.close());
  const fe = first.ts.connect();
  t.teardown(() => fe.close());
  await fe.negotiate(negotiate);
  await fe.setMemTable(DEFAULT_LAYOUT);
  // QEMU's order (vhost_user_blk_start): features, then GET_INFLIGHT_FD once, SET_INFLIGHT_FD, then the rings.
  const area = await fe.getInflightFd(2, SIZE);
  t.teardown(() => native.close(area.fd));
  await fe.setInflightFd(area);
  await fe.setupQueue(0, SIZE);
  await fe.setupQueue(1, SIZE, { ringRegion: 1 });

  const data = [0, 1].map((q) => Array.from({ length: CHAINS }, (_, i) => pattern(40 + i, 16 * q + i)));
  const specs = (q: number): ChainSpec[] => data[q]!.map((d) => ({ readable: [{ data: d, region: q }], writable: [{ length: d.length, region: q }] }));
  const ids = [fe.submit(0, specs(0)), fe.submit(1, specs(1))];
  for (const q of [0, 1]) {
    const done = await fe.collect(q, COMPLETED.length);
    t.deepEqual(
      done.map((c) => c.id),
      COMPLETED.map((k) => ids[q]![k]),
    );
    // The device took every chain: the rest are in flight when the connection drops.
    await until(() => first.ts.server.vrings[q]!.totals().requests === CHAINS, `queue ${q} popped all ${CHAINS}`);
  }
  if (workers) t.deepEqual(first.device.starts, [0, 0], 'the queues ran in worker threads');

  // The back-end goes away with those chains in flight; the front-end reconnects to a new one.
  const bases = [fe.crashBase(0), fe.crashBase(1)];
  const second = await backend({ numQueues: 2, inflight: true }, workers);
  t.teardown(() => second.ts.close());
  await fe.reconnect(second.ts.socketPath, negotiate);
  await fe.setInflightFd(area);
  await fe.restartQueue(0, bases[0]!);
  await fe.restartQueue(1, bases[1]!);
  for (const q of [0, 1]) {
    fe.kick(q);
    const again = HELD.length === 0 ? [] : await fe.collect(q, HELD.length);
    t.deepEqual(
      again.map((c) => c.id),
      HELD.map((k) => ids[q]![k]),
      `queue ${q}: the chains left in flight, oldest first`,
    );
    again.forEach((c, k) => t.deepEqual(c.written, transform(q, data[q]![HELD[k]!]!)));
    // The ring goes on: a new chain after the resubmitted ones.
    const fresh = pattern(77, 99 + q);
    const done = await fe.transfer(q, { readable: [{ data: fresh, region: q }], writable: [{ length: fresh.length, region: q }] });
    t.deepEqual(done.written, transform(q, fresh));
  }
  // A worker publishes its counters to the main thread after its pass: they may trail the completion.
  const requests = (): number => second.ts.server.vrings[0]!.totals().requests;
  await until(() => requests() === HELD.length + 1, () => `nothing completed twice, nothing new popped twice (${requests()} requests)`);
  if (workers) t.deepEqual(second.device.starts, [0, 0], 'the queues ran in worker threads');
}

for (const packed of [false, true]) {
  const rings = packed ? 'packed' : 'split';
  for (const workers of [true, false]) {
    const where = workers ? 'worker threads' : 'main thread';
    test.serial(`chains in flight when the back-end went away are resubmitted by the next one: ${rings} rings, ${where}`, (t) => run(t, packed, workers, [1, 3, 4, 5]));
  }
  // A daemon that exits with nothing in flight (SIGTERM) still leaves the ring position: QEMU has
  // none to give for a packed ring, whose base after the reconnect is the one of the last start.
  test.serial(`after a back-end went away with nothing in flight the next one goes on where the ring is: ${rings} rings, worker threads`, (t) =>
    run(t, packed, true, []));
}

for (const workers of [true, false]) {
  test.serial(`an area the front-end filled with a bad record refuses the ring and the daemon keeps serving: packed ring, ${workers ? 'worker thread' : 'main thread'}`, async (t) => {
    const { ts } = await backend({ numQueues: 2, inflight: true }, workers);
    t.teardown(() => ts.close());
    const fe = ts.connect();
    t.teardown(() => fe.close());
    await fe.negotiate({ packed: true });
    await fe.setMemTable(DEFAULT_LAYOUT);
    const area = await fe.getInflightFd(2, SIZE);
    t.teardown(() => native.close(area.fd));
    // Queue 0's record: version 1, the right size, a free list whose head is past the ring.
    const mapping = native.mmap(area.fd, Number(area.mmapSize), 0, true);
    t.teardown(() => native.munmap(mapping.id));
    const u16 = new Uint16Array(mapping.views[0]!.buffer, mapping.views[0]!.byteOffset, 16);
    u16[4] = 1;
    u16[5] = SIZE;
    u16[6] = u16[7] = 0x7fff;
    await fe.setInflightFd(area);
    if (workers) {
      // The worker maps its part and reports the ring broken; the connection stays.
      await fe.setupQueue(0, SIZE);
      await until(() => ts.server.vrings[0]!.broken, 'queue 0 broken');
      t.true(ts.logged('VIRTQ_BAD_INFLIGHT').length > 0);
      const data = pattern(50, 3);
      await fe.setupQueue(1, SIZE, { ringRegion: 1 });
      t.deepEqual((await fe.transfer(1, { readable: [{ data, region: 1 }], writable: [{ length: data.length, region: 1 }] })).written, transform(1, data), 'the other ring serves');
    } else {
      // On the main thread the ring start fails the message: the connection is dropped with the code.
      await t.throwsAsync(() => fe.setupQueue(0, SIZE));
      t.is((await ts.nextDisconnect()).code, 'VHOST_USER_BAD_INFLIGHT');
      await assertServes(t, ts);
    }
  });
}
