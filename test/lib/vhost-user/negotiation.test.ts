/**
 * Negotiation as QEMU does it, config space, the backend channel and the connection lifecycle seen
 * from the front-end and from the device.
 */
import test, { type ExecutionContext } from 'ava';

import { BackendRequest, ProtocolFeature, Request } from '../../../lib/vhost-user/messages';
import {
  VHOST_USER_F_PROTOCOL_FEATURES,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
  bit,
} from '../../../lib/virtio/constants';
import { DEFAULT_LAYOUT, Frontend, FrontendError, encodeU64 } from '../../helpers/frontend';
import { TestDevice, initialTestConfig } from '../../helpers/test-device';
import { TestServer, assertServes } from './harness';

async function start(t: ExecutionContext): Promise<{ ts: TestServer; fe: Frontend; device: TestDevice }> {
  const device = new TestDevice();
  const ts = await TestServer.start(device);
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
  });
  return { ts, fe, device };
}

test('features and protocol features offered', async (t) => {
  const { fe } = await start(t);
  const neg = await fe.negotiate({ packed: true, eventIdx: true, indirect: true });
  for (const b of [VIRTIO_F_VERSION_1, VIRTIO_F_RING_PACKED, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VHOST_USER_F_PROTOCOL_FEATURES]) {
    t.not(neg.offeredFeatures & bit(b), 0n, `feature bit ${b} offered`);
    t.not(neg.features & bit(b), 0n, `feature bit ${b} negotiated`);
  }
  for (const b of [ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIG, ProtocolFeature.BACKEND_REQ, ProtocolFeature.CONFIGURE_MEM_SLOTS]) {
    t.not(neg.offeredProtocolFeatures & bit(b), 0n, `protocol feature ${b} offered`);
  }
  t.is(await fe.getQueueNum(), 2);
  t.true((await fe.getMaxMemSlots()) >= 8);
  // GET_FEATURES keeps answering after SET_FEATURES.
  t.is(await fe.getFeatures(), neg.offeredFeatures);
});

test('every request without a reply body is acknowledged with 0 under REPLY_ACK', async (t) => {
  const { fe } = await start(t);
  await fe.negotiate();
  t.true(fe.replyAck);
  // fe.request sets NEED_REPLY and fails unless the ack is 0.
  await fe.setMemTable(DEFAULT_LAYOUT);
  await fe.setupQueue(0, 32);
  await fe.setupQueue(1, 64);
  await fe.setVringEnable(1, false);
  await fe.request(Request.SET_FEATURES, encodeU64(fe.negotiated!.features));
  t.pass();
});

test('config space: read, write, refusal of read-only bytes', async (t) => {
  const { fe, device } = await start(t);
  await fe.negotiate();
  t.deepEqual(await fe.getConfig(0, 16), initialTestConfig());
  t.deepEqual(await fe.getConfig(4, 4), Uint8Array.of(0xa4, 0xa5, 0xa6, 0xa7));
  await fe.setConfig(8, Uint8Array.of(1, 2, 3));
  t.deepEqual(await fe.getConfig(6, 6), Uint8Array.of(0xa6, 0xa7, 1, 2, 3, 0xab));
  t.deepEqual(device.config.subarray(8, 11), Uint8Array.of(1, 2, 3));
  // The device refuses a write to bytes 0..7: the guest chose those bytes, so the front-end gets a
  // NACK and the connection stays up.
  const err = await t.throwsAsync(fe.setConfig(0, Uint8Array.of(9)));
  t.true(err instanceof FrontendError && err.code === 'FRONTEND_NACK', String(err));
  t.is(device.config[0], 0xa0, 'read-only byte unchanged');
  t.deepEqual(await fe.getConfig(8, 3), Uint8Array.of(1, 2, 3), 'the same connection still answers');
});

test('CONFIG_CHANGE_MSG reaches the front-end through the backend channel', async (t) => {
  const { fe, device } = await start(t);
  await fe.negotiate();
  t.false(await device.context!.notifyConfigChange(), 'without a channel nothing is sent');
  await fe.setBackendChannel();
  t.true(await device.context!.notifyConfigChange(), 'delivered and acked');
  const msg = await fe.waitBackendMessage(BackendRequest.CONFIG_CHANGE_MSG);
  t.is(msg.flags & 0x3, 1, 'version 1');
  t.is(msg.payload.length, 0);
  t.not(msg.flags & 0x8, 0, 'NEED_REPLY set under REPLY_ACK');
});

test('the device sees attach, queue start/stop and detach; the server accepts the next front-end', async (t) => {
  const { fe, device, ts } = await start(t);
  await fe.negotiate();
  t.is(device.attaches, 1);
  await fe.setMemTable(DEFAULT_LAYOUT);
  await fe.setupQueue(0, 16);
  await fe.setupQueue(1, 16);
  t.deepEqual(device.starts, [1, 1]);
  fe.close();
  const ev = await ts.nextDisconnect();
  t.is(ev.code, undefined);
  t.deepEqual(device.stops, [1, 1], 'running queues are stopped on disconnect');
  t.is(device.detaches, 1);
  await assertServes(t, ts);
  t.is(device.attaches, 2);
  t.is(ts.connections, 2);
});

test('a second front-end waits until the first one leaves', async (t) => {
  const { fe, ts } = await start(t);
  await fe.negotiate();
  const second = ts.connect();
  t.teardown(() => second.close());
  second.send(Request.GET_FEATURES);
  await t.throwsAsync(second.reply(Request.GET_FEATURES, 300), { instanceOf: FrontendError });
  fe.close();
  await ts.nextDisconnect();
  const reply = await second.reply(Request.GET_FEATURES);
  t.is(reply.payload.length, 8);
});
