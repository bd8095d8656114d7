/**
 * The virtio-net requests NET_SET_MTU and SEND_RARP: offered only to devices that implement the
 * hooks, checked, and refused (NACK, connection kept) for an MTU outside virtio-net's range.
 */
import test, { type ExecutionContext } from 'ava';

import { ProtocolFeature, Request } from '../../../lib/vhost-user/messages';
import { bit } from '../../../lib/virtio/constants';
import { FrontendError, encodeU64 } from '../../helpers/frontend';
import { NetTestDevice, TestDevice } from '../../helpers/test-device';
import { TestServer, assertServes } from './harness';

async function start(t: ExecutionContext, device: TestDevice) {
  const ts = await TestServer.start(device);
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
  });
  return { ts, fe };
}

async function nack(t: ExecutionContext, promise: Promise<void>): Promise<void> {
  const err = await t.throwsAsync(promise);
  t.true(err instanceof FrontendError && err.code === 'FRONTEND_NACK', String(err));
}

test('NET_SET_MTU and SEND_RARP are offered to a device with the hooks and reach it', async (t) => {
  const device = new NetTestDevice();
  const { fe } = await start(t, device);
  const neg = await fe.negotiate();
  t.not(neg.protocolFeatures & bit(ProtocolFeature.NET_MTU), 0n);
  t.not(neg.protocolFeatures & bit(ProtocolFeature.RARP), 0n);

  await fe.request(Request.NET_SET_MTU, encodeU64(1500));
  await fe.request(Request.NET_SET_MTU, encodeU64(68));
  await fe.request(Request.NET_SET_MTU, encodeU64(9000));
  t.deepEqual(device.mtus, [1500, 68, 9000]);

  // virtio 1.2 §5.1.4.1 bounds, then the device's own limit: NACKs, and the connection stays.
  await nack(t, fe.request(Request.NET_SET_MTU, encodeU64(67)));
  await nack(t, fe.request(Request.NET_SET_MTU, encodeU64(65536)));
  await nack(t, fe.request(Request.NET_SET_MTU, encodeU64(1n << 63n)));
  await nack(t, fe.request(Request.NET_SET_MTU, encodeU64(9001)));
  t.deepEqual(device.mtus, [1500, 68, 9000], 'refused values never reach the device');

  // The MAC is the first 6 bytes of the u64; QEMU leaves the other two uninitialized.
  const payload = Uint8Array.of(0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0xde, 0xad);
  await fe.request(Request.SEND_RARP, payload);
  t.deepEqual(device.rarps, [Uint8Array.of(0x52, 0x54, 0x00, 0x12, 0x34, 0x56)]);
  t.is(await fe.getQueueNum(), 2, 'the same connection still answers');
});

test('a device without the hooks offers neither feature, and NET_SET_MTU drops the front-end', async (t) => {
  const { ts, fe } = await start(t, new TestDevice());
  const neg = await fe.negotiate();
  t.is(neg.offeredProtocolFeatures & (bit(ProtocolFeature.NET_MTU) | bit(ProtocolFeature.RARP)), 0n);
  fe.send(Request.NET_SET_MTU, encodeU64(1500));
  t.is((await ts.nextDisconnect()).code, 'VHOST_USER_PROTOCOL_FEATURE_MISSING');
  await assertServes(t, ts);
});

test('a front-end that did not acknowledge NET_MTU cannot set the MTU', async (t) => {
  const device = new NetTestDevice();
  const { ts, fe } = await start(t, device);
  const neg = await fe.negotiate({ protocolFeatures: ~bit(ProtocolFeature.NET_MTU) });
  t.not(neg.offeredProtocolFeatures & bit(ProtocolFeature.NET_MTU), 0n, 'offered');
  fe.send(Request.NET_SET_MTU, encodeU64(1500));
  t.is((await ts.nextDisconnect()).code, 'VHOST_USER_PROTOCOL_FEATURE_MISSING');
  t.deepEqual(device.mtus, []);
  await assertServes(t, ts);
});
