/**
 * A guest driver that breaks a ring rule breaks only that queue (style-anchors rule 6): the backend
 * signals the queue's err eventfd and logs the ring error code; the connection and the other queue
 * keep working; a new front-end gets a working queue again.
 */
import test from 'ava';

import { DEFAULT_LAYOUT, SplitQueueDriver } from '../../helpers/frontend';
import { TestDevice, transform } from '../../helpers/test-device';
import { TestServer, assertServes, pattern } from './harness';

test('a head index out of range breaks that queue only', async (t) => {
  const device = new TestDevice();
  const ts = await TestServer.start(device);
  t.teardown(() => ts.close());
  const fe = ts.connect();
  t.teardown(() => fe.close());

  await fe.negotiate();
  await fe.setMemTable(DEFAULT_LAYOUT);
  const q0 = await fe.setupQueue(0, 16);
  await fe.setupQueue(1, 16, { ringRegion: 1 });

  const data = pattern(64, 1);
  t.deepEqual((await fe.transfer(0, { readable: [{ data }], writable: [{ length: 64 }] })).written, transform(0, data));
  t.deepEqual((await fe.transfer(1, { readable: [{ data }], writable: [{ length: 64 }] })).written, transform(1, data));

  // The driver puts head 16 + 3 (≥ queue size 16) in the available ring and kicks.
  const driver = q0.driver as SplitQueueDriver;
  driver.pushHead(19);
  driver.publish();
  fe.kick(0);

  await fe.waitErr(0);
  t.true(ts.logged('VIRTQ_BAD_HEAD').length > 0, 'the ring error code is logged');
  t.true(device.errors[0]!.some((e) => (e as { code?: string }).code === 'VIRTQ_BAD_HEAD'), 'pop() threw VIRTQ_BAD_HEAD');

  // Queue 1 and the connection are unaffected.
  const more = pattern(200, 2);
  const done = await fe.transfer(1, { readable: [{ data: more, region: 2 }], writable: [{ length: 256, region: 1 }] });
  t.deepEqual(done.written, transform(1, more));
  t.deepEqual(await fe.getConfig(0, 4), Uint8Array.of(0xa0, 0xa1, 0xa2, 0xa3));
  t.false(fe.backendClosed);
  t.is(ts.disconnects.length, 0);
  t.is(q0.errors, 1);

  fe.close();
  t.is((await ts.nextDisconnect()).code, undefined);
  // A new front-end gets a working queue 0.
  await assertServes(t, ts);
});
