/**
 * The net device end to end through the real protocol engine and a real TAP: a test front-end plays
 * the guest driver (memfd guest memory, split and packed rings), the TAP sits on a bridge with one end
 * of a veth pair whose other end lives in a network namespace with an address, so the kernel there
 * answers ARP and ping. Nothing reaches the host's own interfaces (no address on the bridge or TAP).
 *
 * Needs root (a TAP, a bridge, a network namespace).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs from 'node:fs';

import test, { type ExecutionContext } from 'ava';

import type { NetConfig } from '../../../daemons/net/cli';
import type { NetDevice } from '../../../daemons/net/device';
import { createNetDevice, netQueueWorkers } from '../../../daemons/net/main';
import { GSO_TYPES } from '../../../daemons/net/metrics';
import { TX_DROP_REASONS } from '../../../daemons/net/net-header';
import {
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_UFO,
  VIRTIO_NET_F_GUEST_USO4,
  VIRTIO_NET_F_GUEST_USO6,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_HOST_UFO,
  VIRTIO_NET_F_HOST_USO,
  VIRTIO_NET_F_MQ,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_NET_HDR_F_DATA_VALID,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP,
  VIRTIO_NET_HDR_GSO_UDP_L4,
} from '../../../daemons/net/virtio-net';
import { ConfigError } from '../../../lib/errors';
import { silentLogger } from '../../../lib/runtime/logger';
import { VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, bit } from '../../../lib/virtio/constants';
import { encodeU64, type Completion, type Frontend, type SplitQueueDriver } from '../../helpers/frontend';
import { ProtocolFeature, Request } from '../../../lib/vhost-user/messages';
import { createBridgedTap, runInNamespace, type BridgedTap } from '../../helpers/net-topology';
import { arpRequest, echoRequest, isArpReply, isEchoReply, isUdpTo, udpFrame, type Ipv4, type Mac } from '../../helpers/frames';
import { until } from '../../helpers/until';
import { TestServer } from '../../lib/vhost-user/harness';
import { createDaemonMetrics } from '../../../lib/metrics/registry';
import { Scrape } from '../../helpers/scrape';
import { Rng } from '../../lib/vhost-user/fuzz-generator';

const GUEST_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0x79, 0x02];
const GUEST_IP: Ipv4 = [10, 79, 0, 2];
const PEER_MAC: Mac = [0x02, 0x00, 0x00, 0x00, 0x79, 0x01];
const PEER_IP: Ipv4 = [10, 79, 0, 1];
const RX = 0;
const TX = 1;
const HDR = 12;

let serial = 0;

/** A TAP on a bridge with a veth whose peer (PEER_MAC, PEER_IP) is in its own namespace. */
function bridgedTap(t: ExecutionContext): BridgedTap {
  const mac = PEER_MAC.map((b) => b.toString(16).padStart(2, '0')).join(':');
  const topology = createBridgedTap(`vhn${process.pid % 100000}x${serial++}`, mac, `${PEER_IP.join('.')}/24`);
  t.teardown(() => topology.close());
  return topology;
}

function config(tap: string, over: Partial<NetConfig> = {}): NetConfig {
  return { tap, createTap: false, queuePairs: 1, threads: 0, mtu: 1500, queueSize: 256, txUring: true, ...over };
}

interface Guest {
  fe: Frontend;
  device: NetDevice;
  tap: string;
  namespace: string;
}

async function start(t: ExecutionContext, features: bigint, opts: { rxBuffers?: number; rxSize?: number; txUring?: boolean } = {}): Promise<Guest> {
  const { tap, namespace } = bridgedTap(t);
  const device = createNetDevice(config(tap, { txUring: opts.txUring ?? true }), silentLogger);
  const ts = await TestServer.start(device);
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.server.close();
    device.close();
  });
  await fe.negotiate({ features: bit(VIRTIO_F_VERSION_1) | features });
  await fe.setMemTable();
  await fe.setupQueue(RX, 256);
  await fe.setupQueue(TX, 256);
  postRx(fe, opts.rxBuffers ?? 32, opts.rxSize ?? 2048);
  return { fe, device, tap, namespace };
}

function postRx(fe: Frontend, count: number, size: number): void {
  fe.submit(RX, Array.from({ length: count }, (_, i) => ({ writable: [{ length: size, region: i % 3 }] })));
}

/** A tx chain: the header, then the frame split in two descriptors (as a driver without any_layout). */
function txChain(frame: Uint8Array, header: Uint8Array = new Uint8Array(HDR)) {
  const pieces = [frame.subarray(0, 20), frame.subarray(20)].filter((piece) => piece.length > 0);
  return { readable: [{ data: header, region: 1 }, ...pieces.map((data, i) => ({ data, region: 2 - 2 * i }))] };
}

/** Receive until a frame passes `match` (reposting a buffer for each frame taken); returns header and frame. */
async function receive(fe: Frontend, match: (frame: Uint8Array) => boolean, size = 2048): Promise<{ header: Uint8Array; frame: Uint8Array }> {
  for (let attempt = 0; attempt < 50; attempt++) {
    for (const c of await fe.collect(RX, 1, 10_000)) {
      postRx(fe, 1, size);
      const frame = c.written.subarray(HDR);
      if (match(frame)) return { header: c.written.subarray(0, HDR), frame };
    }
  }
  throw new Error('no matching frame');
}

/**
 * Receive whole frames (merged over as many buffers as num_buffers says, each buffer reposted) until
 * `enough` says so; returns every frame with its header.
 */
async function receiveMerged(fe: Frontend, size: number, enough: (frames: { header: Uint8Array; frame: Uint8Array }[]) => boolean) {
  const frames: { header: Uint8Array; frame: Uint8Array }[] = [];
  const pending: Completion[] = [];
  const next = async () => {
    if (pending.length === 0) pending.push(...(await fe.collect(RX, 1, 10_000)));
    return pending.shift()!;
  };
  while (!enough(frames)) {
    const first = await next();
    const count = first.written[10]! | (first.written[11]! << 8);
    const rest: Completion[] = [];
    while (rest.length < count - 1) rest.push(await next());
    postRx(fe, count, size);
    frames.push({ header: first.written.subarray(0, HDR), frame: Buffer.concat([first.written.subarray(HDR), ...rest.map((c) => c.written)]) });
  }
  return frames;
}

/** ARP for the peer, then ping it; resolves with the echo reply. */
async function ping(fe: Frontend, id: number): Promise<Uint8Array> {
  await fe.transfer(TX, txChain(arpRequest(GUEST_MAC, GUEST_IP, PEER_IP)));
  await receive(fe, isArpReply);
  const data = Array.from({ length: 56 }, (_, i) => (i * 7 + id) & 0xff);
  const done = await fe.transfer(TX, txChain(echoRequest(GUEST_MAC, GUEST_IP, PEER_MAC, PEER_IP, id, data)));
  if (done.len !== 0) throw new Error(`tx used length ${done.len}`);
  const { frame } = await receive(fe, (f) => isEchoReply(f) && f[38] === id >> 8 && f[39] === (id & 0xff));
  return frame;
}

for (const [writer, txUring] of [
  ['io_uring', true],
  ['writev (--no-tx-uring)', false],
] as const) {
  test(`a ping crosses the TAP both ways with mergeable rx buffers; num_buffers is 1 and counters move; tx with ${writer}`, async (t) => {
    await pingWithCounters(t, txUring);
  });
}

async function pingWithCounters(t: ExecutionContext, txUring: boolean): Promise<void> {
  const { fe, device } = await start(t, bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_CSUM), { txUring });
  await fe.transfer(TX, txChain(arpRequest(GUEST_MAC, GUEST_IP, PEER_IP)));
  const arp = await receive(fe, isArpReply);
  t.is(arp.header[10]! | (arp.header[11]! << 8), 1, 'num_buffers');
  t.deepEqual([...arp.frame.subarray(22, 28)], PEER_MAC, 'the peer answered');
  const reply = await ping(fe, 0x4242);
  t.deepEqual([...reply.subarray(0, 6)], GUEST_MAC);
  t.deepEqual([...reply.subarray(26, 30)], PEER_IP);
  t.true(device.queueStats(RX).frames >= 2);
  t.is(device.queueStats(TX).frames, 3);
  t.is(device.queueStats(TX).bytes, 42 + 42 + 98);
  t.like(device.status(), { txWrites: txUring ? 'io_uring' : 'writev', frontendMtu: null, pairs: [{ tapQueueOpen: true, rxEnabled: true, txEnabled: true }] });

  // A memory table change (a hot-plugged DIMM) under running queues: traffic goes on.
  await fe.addMemReg({ gpa: 0x2_0000_0000, size: 1 << 20, userAddr: 0x7f50_0000_0000, mmapOffset: 0 });
  await ping(fe, 0x4243);
}

test('packed ring without mergeable buffers: each frame takes one whole buffer', async (t) => {
  const { fe } = await start(t, bit(VIRTIO_F_RING_PACKED));
  const reply = await ping(fe, 7);
  t.deepEqual([...reply.subarray(0, 6)], GUEST_MAC);
});

test('hostile tx headers are dropped and counted; the queue keeps serving', async (t) => {
  const { fe, device } = await start(t, bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_CSUM));
  const frame = echoRequest(GUEST_MAC, GUEST_IP, PEER_MAC, PEER_IP, 1, [1, 2, 3, 4]);
  const header = (bytes: number[]) => Uint8Array.from([...bytes, ...new Array<number>(HDR - bytes.length).fill(0)]);
  const hostile = [
    // csum_start past the frame (CVE-2024-11614 class).
    txChain(frame, header([VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 0, 0, 0xff, 0xff, 0, 0])),
    // DATA_VALID is the device's flag.
    txChain(frame, header([VIRTIO_NET_HDR_F_DATA_VALID])),
    // TSO that was not negotiated.
    txChain(frame, header([VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 34, 0, 0x10, 0, 34, 0, 16, 0])),
    // USO that was not negotiated (offered on this kernel, but the driver did not take HOST_USO).
    txChain(frame, header([VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_UDP_L4, 34, 0, 0x10, 0, 34, 0, 6, 0])),
    // hdr_len past the frame.
    txChain(frame, header([0, 0, 0xff, 0x7f])),
    // 10 bytes: shorter than Ethernet.
    txChain(frame.subarray(0, 10)),
    // Over MTU + 18 without GSO.
    txChain(new Uint8Array(1600)),
    // Not even a whole header.
    { readable: [{ data: new Uint8Array(6) }] },
  ];
  fe.submit(TX, hostile);
  const done = await fe.collect(TX, hostile.length);
  t.deepEqual(
    done.map((c) => c.len),
    hostile.map(() => 0),
  );
  const dropped = Object.fromEntries(TX_DROP_REASONS.map((r, i) => [r, device.queueStats(TX).dropped[i]]));
  t.deepEqual(dropped, { bad_header: 5, too_short: 2, too_long: 1, too_many_segments: 0 });
  t.is(device.queueStats(TX).frames, 0, 'none reached the TAP');
  await ping(fe, 9);
  t.is(device.queueStats(TX).frames, 2);
});

/**
 * A seeded random tx chain: a frame of a boundary length whose bytes are random, or a real UDP
 * datagram; a third of them with a zero header, the rest with header fields from the values the
 * checks sit on (0, the frame's edges, 0xffff).
 */
function randomTxChain(rng: Rng) {
  const length = rng.pick([0, 10, 13, 14, 15, 42, 60, 1514, 1518, 1519, 9000, 65_000, 65_536 + 18, 65_536 + 19]);
  const frame = rng.chance(0.2) ? udpFrame(GUEST, PEER, rng.bytes(Math.max(0, length - 42)), rng.chance(0.5)) : rng.bytes(length);
  const h = new Uint8Array(HDR);
  if (rng.chance(1 / 3)) return txChain(frame, h);
  const edge = (values: number[]) => rng.pick([...values, frame.length - 2, frame.length, frame.length + 1, 0xffff, rng.int(0x10000)]);
  const dv = new DataView(h.buffer);
  dv.setUint8(0, rng.pick([0, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_F_DATA_VALID, 3, 0xff]));
  const gso = rng.pick([0, 0, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4, 2, 6, 7]);
  dv.setUint8(1, rng.chance(0.15) ? gso | VIRTIO_NET_HDR_GSO_ECN : gso);
  dv.setUint16(2, edge([0, 14, 34, 42, 54, 66]), true); // hdr_len
  dv.setUint16(4, edge([0, 1, 536, 1400, 1448]), true); // gso_size
  dv.setUint16(6, edge([0, 14, 34, 54]), true); // csum_start
  dv.setUint16(8, edge([0, 6, 16]), true); // csum_offset
  return txChain(frame, h);
}

test('random tx headers and frames (seeded): every chain comes back, each counted once as sent, dropped or refused by the TAP, and the queue serves on', async (t) => {
  const features = [VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_HOST_USO];
  const { fe, device, tap } = await start(t, features.reduce((f, n) => f | bit(n), 0n));
  const tapBefore = tapCounter(tap, 'rx_packets');
  let chains = 0;
  for (const seed of [1, 2, 3]) {
    const rng = new Rng(seed);
    for (let round = 0; round < 8; round++) {
      // 16 chains of 3 descriptors each fit the 256-entry ring at once.
      const batch = Array.from({ length: 16 }, () => randomTxChain(rng));
      fe.submit(TX, batch);
      const done = await fe.collect(TX, batch.length);
      t.deepEqual(done.map((c) => c.len), batch.map(() => 0), `seed ${seed} round ${round}: every chain used, 0 bytes written`);
      chains += batch.length;
    }
  }
  const stats = device.queueStats(TX);
  const dropped = stats.dropped.reduce((a, b) => a + b, 0);
  t.log(`${chains} chains: ${stats.frames} sent, ${dropped} dropped by the checks, ${stats.tapErrors} refused by the TAP`);
  t.is(stats.frames + dropped + stats.tapErrors, chains, 'each chain counted once');
  t.true(stats.frames > 0 && dropped > 0, 'the seeds reach both outcomes');
  t.is(tapCounter(tap, 'rx_packets') - tapBefore, stats.frames, 'the TAP counted exactly the frames counted as sent');
  await ping(fe, 0x77);
});

test('with no rx buffers the daemon stops reading; frames wait in the TAP until the guest posts some', async (t) => {
  const { fe, device } = await start(t, bit(VIRTIO_NET_F_MRG_RXBUF), { rxBuffers: 0 });
  await fe.transfer(TX, txChain(arpRequest(GUEST_MAC, GUEST_IP, PEER_IP)));
  await until(() => device.queueStats(RX).ringEmpty > 0, 'a frame found the rx ring empty', 10_000);
  t.is(device.queueStats(RX).frames, 0);
  postRx(fe, 8, 2048);
  const arp = await receive(fe, isArpReply);
  t.deepEqual([...arp.frame.subarray(22, 28)], PEER_MAC, 'the reply read after the buffers came is the one the kernel kept');
});

test('with MRG_RXBUF a burst waiting in the TAP is read into whole-frame buffers and a small one before them; each frame takes one buffer', async (t) => {
  const { fe, device, namespace } = await start(t, bit(VIRTIO_NET_F_MRG_RXBUF), { rxBuffers: 0 });
  // Four ARP requests: the peer's four replies (seen arriving on the bridge's veth, net-topology.ts)
  // wait in the TAP while the guest has no buffers.
  const veth = `${namespace}v`;
  const replies = tapCounter(veth, 'rx_packets');
  for (let i = 0; i < 4; i++) await fe.transfer(TX, txChain(arpRequest(GUEST_MAC, GUEST_IP, PEER_IP)));
  await until(() => tapCounter(veth, 'rx_packets') >= replies + 4, 'the four replies on the veth', 10_000);
  // A buffer too small for the largest frame (read alone, over as many buffers as it needs), then
  // three that each hold one (read as a batch).
  fe.submit(RX, [100, 2048, 2048, 2048].map((length, i) => ({ writable: [{ length, region: i % 3 }] })));
  const done = await fe.collect(RX, 4, 10_000);
  // The host's own stack may put a frame of its own in the TAP too (an IGMP report of the bridge,
  // seen under load): it takes a buffer like any frame, and the replies it displaced come next.
  let arpReplies = done.filter((c) => isArpReply(c.written.subarray(HDR))).length;
  while (arpReplies < 4) {
    fe.submit(RX, [{ writable: [{ length: 2048 }] }]);
    const [next] = await fe.collect(RX, 1, 10_000);
    done.push(next!);
    if (isArpReply(next!.written.subarray(HDR))) arpReplies++;
  }
  for (const c of done) t.is(c.written[10]! | (c.written[11]! << 8), 1, 'num_buffers');
  t.is(arpReplies, 4);
  t.is(device.queueStats(RX).frames, done.length);
  t.is(device.queueStats(RX).tapErrors, 0);
});

test('a missing TAP, and one without multi_queue, fail at start with the ip tuntap line to run', (t) => {
  const missing = t.throws(() => createNetDevice(config('vhnmissing0'), silentLogger), { instanceOf: ConfigError });
  t.is(missing?.code, 'CONFIG_UNAVAILABLE');
  t.regex(missing?.message ?? '', /ip tuntap add dev vhnmissing0 mode tap multi_queue vnet_hdr/);

  const single = `vhn${process.pid % 100000}s`;
  execFileSync('ip', ['tuntap', 'add', 'dev', single, 'mode', 'tap', 'vnet_hdr']);
  t.teardown(() => execFileSync('ip', ['link', 'del', single]));
  const err = t.throws(() => createNetDevice(config(single), silentLogger), { instanceOf: ConfigError });
  t.is(err?.code, 'CONFIG_UNAVAILABLE');
  t.regex(err?.message ?? '', /multi_queue/);
});

/** A counter of an interface, the TAP or the bridge's veth (/sys/class/net/IF/statistics). */
function tapCounter(tap: string, name: string): number {
  return Number(fs.readFileSync(`/sys/class/net/${tap}/statistics/${name}`, 'utf8'));
}

test('SEND_RARP puts one RARP broadcast from the guest MAC into the TAP; NET_SET_MTU above --mtu is refused', async (t) => {
  const { fe, tap } = await start(t, bit(VIRTIO_NET_F_MRG_RXBUF));
  t.true(fe.hasProtocolFeature(ProtocolFeature.RARP));
  t.true(fe.hasProtocolFeature(ProtocolFeature.NET_MTU));
  // Frames the daemon writes into the TAP are what the TAP interface receives.
  const before = tapCounter(tap, 'rx_packets');
  await fe.request(Request.SEND_RARP, Uint8Array.from([...GUEST_MAC, 0, 0]));
  t.is(tapCounter(tap, 'rx_packets'), before + 1);

  await fe.request(Request.NET_SET_MTU, encodeU64(1500n));
  // 9000 is above --mtu 1500: REPLY_ACK carries the refusal and the connection stays.
  await t.throwsAsync(fe.request(Request.NET_SET_MTU, encodeU64(9000n)), { code: 'FRONTEND_NACK' });
  await ping(fe, 3);
});

test('--create-tap makes a missing TAP, which goes away with the daemon', async (t) => {
  const name = `vhn${process.pid % 100000}c`;
  const device = createNetDevice(config(name, { createTap: true }), silentLogger);
  t.true(fs.existsSync(`/sys/class/net/${name}`));
  device.close();
  await until(() => !fs.existsSync(`/sys/class/net/${name}`), `${name} gone`);
  t.pass();
});

test('a ring error met while reading the TAP breaks the rx queue (err fd), and tx keeps serving', async (t) => {
  const { fe, device } = await start(t, bit(VIRTIO_NET_F_MRG_RXBUF), { rxBuffers: 0 });
  // The driver puts head 300 (not below the queue size 256) in the rx available ring, without a kick:
  // only the TAP's readability makes the device look at it.
  const rx = fe.queues.get(RX)!.driver as SplitQueueDriver;
  rx.pushHead(300);
  rx.publish();
  await fe.transfer(TX, txChain(arpRequest(GUEST_MAC, GUEST_IP, PEER_IP)));
  await fe.waitErr(RX, 10_000);
  t.is(fe.queues.get(RX)!.errors, 1);
  t.is(device.queueStats(RX).frames, 0);
  await fe.transfer(TX, txChain(arpRequest(GUEST_MAC, GUEST_IP, PEER_IP)));
  t.is(device.queueStats(TX).frames, 2);
  t.false(fe.backendClosed);
});

test('a queue pair the guest disables is detached from the TAP (the kernel drops instead of queueing), and attached again', async (t) => {
  const { fe, tap, namespace } = await start(t, bit(VIRTIO_NET_F_MRG_RXBUF));
  await ping(fe, 11);
  await fe.setVringEnable(RX, false);
  await fe.setVringEnable(TX, false);
  // The peer's ARP broadcasts for the guest reach the TAP, which has no attached queue now.
  const dropped = tapCounter(tap, 'tx_dropped');
  spawnSync('ip', ['netns', 'exec', namespace, '/usr/bin/busybox', 'ping', '-c', '2', '-W', '1', GUEST_IP.join('.')]);
  t.true(tapCounter(tap, 'tx_dropped') > dropped, 'frames for a detached queue are dropped by the kernel');
  await fe.setVringEnable(RX, true);
  await fe.setVringEnable(TX, true);
  await ping(fe, 12);
});

test('with MRG_RXBUF a frame larger than one buffer spreads over several; num_buffers counts them', async (t) => {
  const { fe } = await start(t, bit(VIRTIO_NET_F_MRG_RXBUF), { rxBuffers: 64, rxSize: 128 });
  await fe.transfer(TX, txChain(arpRequest(GUEST_MAC, GUEST_IP, PEER_IP)));
  await receive(fe, isArpReply, 128);
  const data = Array.from({ length: 1000 }, (_, i) => (i * 13) & 0xff);
  await fe.transfer(TX, txChain(echoRequest(GUEST_MAC, GUEST_IP, PEER_MAC, PEER_IP, 0x77, data)));
  // A frame's first buffer carries num_buffers for it and the ones after it.
  const reply = (await receiveMerged(fe, 128, (got) => got.some((f) => isEchoReply(f.frame)))).find((f) => isEchoReply(f.frame))!;
  t.is(reply.header[10]! | (reply.header[11]! << 8), Math.ceil((HDR + reply.frame.length) / 128), 'as many 128-byte buffers as the frame needs');
  t.deepEqual([...reply.frame.subarray(42)], data, 'the payload reassembles');
});

test('without MRG_RXBUF a frame too big for its buffer is lost and counted; the queue goes on', async (t) => {
  const { fe, device } = await start(t, 0n, { rxBuffers: 8, rxSize: 80 });
  await fe.transfer(TX, txChain(arpRequest(GUEST_MAC, GUEST_IP, PEER_IP)));
  await receive(fe, isArpReply, 80); // 12 + 42 bytes fit
  // An echo reply with 200 bytes of data does not fit in 80 bytes.
  await fe.transfer(TX, txChain(echoRequest(GUEST_MAC, GUEST_IP, PEER_MAC, PEER_IP, 5, new Array<number>(200).fill(1))));
  await until(() => device.queueStats(RX).tapErrors > 0, 'a frame too big counted', 10_000);
  // Its buffer came back empty rather than holding a cut-off frame (other frames may come and go).
  const done = fe.takeCompletions(RX);
  t.true(done.some((c) => c.len === 0));
  t.false(done.some((c) => c.len > 0 && isEchoReply(c.written.subarray(HDR))), 'no cut-off echo reply reached the guest');
  // Frames that fit still arrive.
  await fe.transfer(TX, txChain(arpRequest(GUEST_MAC, GUEST_IP, PEER_IP)));
  await receive(fe, isArpReply, 80);
});

test('--threads 2: two queue pairs in two worker threads both move frames; /metrics counts them', async (t) => {
  const topology = bridgedTap(t);
  const netConfig = config(topology.tap, { queuePairs: 2, threads: 2 });
  const device = createNetDevice(netConfig, silentLogger);
  const ts = await TestServer.start(device, { queueWorkers: netQueueWorkers(netConfig) });
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.server.close();
    device.close();
  });
  await fe.negotiate({ features: bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_MQ) });
  await fe.setMemTable();
  for (let q = 0; q < 4; q++) await fe.setupQueue(q, 256);
  for (const rx of [0, 2]) fe.submit(rx, Array.from({ length: 16 }, () => ({ writable: [{ length: 2048 }] })));
  // Each pair sends an ARP request; the replies come back on whichever rx queue the kernel picks.
  for (const tx of [1, 3]) t.is((await fe.transfer(tx, txChain(arpRequest(GUEST_MAC, GUEST_IP, PEER_IP)))).len, 0);
  let replies = 0;
  await until(() => {
    for (const rx of [0, 2]) replies += fe.takeCompletions(rx).filter((c) => isArpReply(c.written.subarray(HDR))).length;
    return replies >= 2;
  }, () => `two ARP replies (${replies} so far)`, 10_000);
  t.is(replies, 2);
  // Worker queues publish their counters to the main thread after each pass and every 250 ms.
  await until(() => ts.server.vrings[1]!.totals().requests === 1 && ts.server.vrings[3]!.totals().requests === 1, 'one request counted on each tx queue', 10_000);
  // The device counters of the worker instances reach the main thread's /metrics.
  const m = await Scrape.of(createDaemonMetrics(ts.server));
  for (const tx of ['1', '3']) {
    t.is(m.value('vhostd_net_frames_total', { queue: tx }), 1, `tx queue ${tx}: one ARP request`);
    t.is(m.value('vhostd_net_bytes_total', { queue: tx }), 42);
  }
  t.true(m.value('vhostd_net_frames_total', { queue: '0' })! + m.value('vhostd_net_frames_total', { queue: '2' })! >= replies, 'the rx queues count the replies');
});

test('a frame in more pieces than one writev takes is dropped as too_many_segments; the queue goes on', async (t) => {
  const { fe, device } = await start(t, bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_INDIRECT_DESC));
  const frame = arpRequest(GUEST_MAC, GUEST_IP, PEER_IP);
  const pieces = Array.from({ length: 1100 }, (_, i) => ({ data: Uint8Array.of(frame[i % frame.length]!) }));
  const done = await fe.transfer(TX, { readable: [{ data: new Uint8Array(HDR) }, ...pieces], indirect: true });
  t.is(done.len, 0);
  t.is(device.queueStats(TX).dropped[TX_DROP_REASONS.indexOf('too_many_segments')], 1);
  t.is(device.queueStats(TX).frames, 0);
  await ping(fe, 21);
});

// UDP segmentation offloads (USO, gso_type UDP_L4) and UFO (gso_type UDP), with real datagrams
// through the TAP, the bridge and the peer's namespace.

const USO_PORT = 9000;
const PAYLOAD_BYTES = 60 * 1024;
const USO_MSS = 1400;
const GUEST = { mac: GUEST_MAC, ip: GUEST_IP, port: 4000 };
const PEER = { mac: PEER_MAC, ip: PEER_IP, port: USO_PORT };
/** fd77::1 and fd77::2 (unique local addresses of RFC 4193), for the IPv6 rows. */
const GUEST_IP6 = [0xfd, 0x77, ...new Array<number>(13).fill(0), 1];
const PEER_IP6 = [0xfd, 0x77, ...new Array<number>(13).fill(0), 2];
const GUEST6 = { mac: GUEST_MAC, ip: GUEST_IP6, port: 4000 };
const PEER6 = { mac: PEER_MAC, ip: PEER_IP6, port: USO_PORT };
/** Ethernet + IPv4 headers (csum_start of a UDP/IPv4 frame), and + IPv6. */
const L3_END = { 4: 34, 6: 54 } as const;

/** PEER_IP6 on the peer's interface (its namespace starts with IPv6 off); no duplicate address detection to wait for. */
function peerIpv6(namespace: string): void {
  execFileSync('ip', ['netns', 'exec', namespace, 'sysctl', '-qw', `net.ipv6.conf.${namespace}p.disable_ipv6=0`]);
  execFileSync('ip', ['-n', namespace, '-6', 'addr', 'add', 'fd77::2/64', 'dev', `${namespace}p`, 'nodad']);
}

/** An IPv6 address as Python's socket module takes it. */
function ipv6Text(ip: readonly number[]): string {
  return Array.from({ length: 8 }, (_, i) => ((ip[2 * i]! << 8) | ip[2 * i + 1]!).toString(16)).join(':');
}

/** 60 KiB that differ from one offset to the next (a misplaced segment changes the digest). */
function udpPayload(): Uint8Array {
  return Uint8Array.from({ length: PAYLOAD_BYTES }, (_, i) => (i * 7 + (i >> 8)) & 0xff);
}

/** A virtio-net header (little-endian) for a UDP frame (IPv4 unless `ipVersion` 6) whose checksum is left to the device. */
function udpHeader(gsoType: number, gsoSize: number, over: { flags?: number; hdrLen?: number; csumOffset?: number; ipVersion?: 4 | 6 } = {}): Uint8Array {
  const l3End = L3_END[over.ipVersion ?? 4];
  const h = new Uint8Array(HDR);
  const dv = new DataView(h.buffer);
  dv.setUint8(0, over.flags ?? VIRTIO_NET_HDR_F_NEEDS_CSUM);
  dv.setUint8(1, gsoType);
  dv.setUint16(2, over.hdrLen ?? l3End + 8, true);
  dv.setUint16(4, gsoSize, true);
  dv.setUint16(6, l3End, true);
  dv.setUint16(8, over.csumOffset ?? 6, true);
  return h;
}

/**
 * A UDP socket on PEER_IP:USO_PORT in the peer's namespace that takes datagrams until one reads
 * "end", then reports (`report`) how many came before it, their bytes and their SHA-256. Resolves
 * once it listens.
 */
async function udpReceiver(namespace: string, ipVersion: 4 | 6 = 4): Promise<{ report: Promise<{ datagrams: number; bytes: number; sha256: string }> }> {
  const script = [
    'import hashlib, socket, sys',
    `s = socket.socket(socket.${ipVersion === 6 ? 'AF_INET6' : 'AF_INET'}, socket.SOCK_DGRAM)`,
    `s.bind(("${ipVersion === 6 ? ipv6Text(PEER_IP6) : PEER_IP.join('.')}", ${USO_PORT}))`,
    'print("listening", flush=True)',
    'n = b = 0; h = hashlib.sha256()',
    'while True:',
    '    d = s.recv(65536)',
    '    if d == b"end": break',
    '    n += 1; b += len(d); h.update(d)',
    'print(n, b, h.hexdigest(), flush=True)',
  ].join('\n');
  let listening!: () => void;
  const ready = new Promise<void>((resolve) => (listening = resolve));
  const done = runInNamespace(namespace, ['python3', '-c', script], { onOutput: (text) => text.includes('listening') && listening() });
  await Promise.race([ready, done.then(({ output }) => Promise.reject(new Error(`UDP receiver: ${output}`)))]);
  const report = done.then(({ status, output }) => {
    const [datagrams, bytes, sha256] = output.replace('listening', '').trim().split(/\s+/);
    if (status !== 0) throw new Error(`UDP receiver exited ${status}: ${output}`);
    return { datagrams: Number(datagrams), bytes: Number(bytes), sha256: sha256! };
  });
  return { report };
}

/**
 * Turn transmit checksum offload off on `iface` (ETHTOOL_STXCSUM, as `ethtool -K IF tx off`): the
 * kernel then finishes every checksum, and segments every GSO packet, before the frame goes out, so
 * the peer's stack checks real checksums instead of trusting partial ones.
 */
function txChecksumOff(iface: string): void {
  const script = [
    'import array, fcntl, socket, struct, sys',
    'value = array.array("I", [0x17, 0])  # struct ethtool_value { ETHTOOL_STXCSUM, 0 }',
    'fcntl.ioctl(socket.socket(), 0x8946, struct.pack("16sP", sys.argv[1].encode(), value.buffer_info()[0]))  # SIOCETHTOOL',
  ].join('\n');
  execFileSync('python3', ['-c', script, iface]);
}

/**
 * The peer's UDP counters in its namespace (/proc/net/snmp, or /proc/net/snmp6 for IPv6): datagrams
 * taken, and dropped for a bad checksum.
 */
function peerUdpCounters(namespace: string, ipVersion: 4 | 6 = 4): { inDatagrams: number; inCsumErrors: number } {
  const read = (file: string) => execFileSync('ip', ['netns', 'exec', namespace, 'cat', file], { encoding: 'utf8' }).split('\n');
  if (ipVersion === 6) {
    const get = (name: string) => Number(read('/proc/net/snmp6').find((line) => line.startsWith(`${name} `))!.trim().split(/\s+/)[1]);
    return { inDatagrams: get('Udp6InDatagrams'), inCsumErrors: get('Udp6InCsumErrors') };
  }
  const lines = read('/proc/net/snmp').filter((line) => line.startsWith('Udp:'));
  const [names, values] = lines.map((line) => line.split(/\s+/).slice(1));
  const get = (name: string) => Number(values![names!.indexOf(name)]);
  return { inDatagrams: get('InDatagrams'), inCsumErrors: get('InCsumErrors') };
}

const sha256 = (bytes: Uint8Array) => createHash('sha256').update(bytes).digest('hex');

for (const [name, feature, gsoType, gsoSize, datagrams, gsoLabel, ipVersion] of [
  // USO: the kernel cuts 44 datagrams of 1400 bytes (the last 1240) from the one frame.
  ['USO (gso_type UDP_L4, gso_size 1400): the kernel cuts 44 datagrams', VIRTIO_NET_F_HOST_USO, VIRTIO_NET_HDR_GSO_UDP_L4, USO_MSS, Math.ceil(PAYLOAD_BYTES / USO_MSS), 'udp_l4', 4],
  ['USO over IPv6 (csum_start 54): the kernel cuts 44 datagrams', VIRTIO_NET_F_HOST_USO, VIRTIO_NET_HDR_GSO_UDP_L4, USO_MSS, Math.ceil(PAYLOAD_BYTES / USO_MSS), 'udp_l4', 6],
  // UFO: the kernel sends IP fragments of 1480 bytes; the peer reassembles the one datagram.
  ['UFO (gso_type UDP, gso_size 1480): IP fragments make one datagram', VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_HDR_GSO_UDP, 1480, 1, 'udp', 4],
] as const) {
  test(`tx ${name} of 60 KiB on the peer's socket, bytes equal`, async (t) => {
    const { fe, device, namespace } = await start(t, bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(feature));
    t.true((fe.negotiated!.features & bit(feature)) !== 0n, 'the daemon offers it on this kernel');
    txChecksumOff(`${namespace}v`);
    if (ipVersion === 6) peerIpv6(namespace);
    const [from, to] = ipVersion === 6 ? [GUEST6, PEER6] : [GUEST, PEER];
    const received = await udpReceiver(namespace, ipVersion);
    const payload = udpPayload();
    const frame = udpFrame(from, to, payload, true);
    t.is((await fe.transfer(TX, txChain(frame, udpHeader(gsoType, gsoSize, { ipVersion })))).len, 0);
    await fe.transfer(TX, txChain(udpFrame(from, to, new TextEncoder().encode('end'))));
    const got = await received.report;
    t.deepEqual(got, { datagrams, bytes: PAYLOAD_BYTES, sha256: sha256(payload) });
    // USO segments reach the peer with checksums the kernel finished from the frame's partial one, and
    // the peer checks them (a wrong seed in the frame: 0 datagrams, 44 InCsumErrors). Software UFO
    // marks its fragments' checksum as verified, so there the SHA-256 is the check.
    t.deepEqual(peerUdpCounters(namespace, ipVersion), { inDatagrams: datagrams + 1, inCsumErrors: 0 }, 'datagrams (and "end") the peer took');
    t.is(device.queueStats(TX).tapErrors, 0);
    t.is(device.queueStats(TX).gsoFrames[GSO_TYPES.indexOf(gsoLabel)], 1);
  });
}

/**
 * Send `payload` as one UDP datagram from the peer's namespace to the guest's port, with the
 * UDP_SEGMENT socket option (SOL_UDP 103) at `segment` bytes when given: one sendto then leaves the
 * stack as one GSO packet of datagrams of that size.
 */
function sendFromPeer(namespace: string, payload: Uint8Array, segment?: number): void {
  execFileSync('ip', ['-n', namespace, 'neigh', 'replace', GUEST_IP.join('.'), 'lladdr', GUEST_MAC.map((b) => b.toString(16)).join(':'), 'dev', `${namespace}p`]);
  const script = [
    'import socket, sys',
    's = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)',
    ...(segment === undefined ? [] : [`s.setsockopt(17, 103, ${segment})`]),
    `s.sendto(sys.stdin.buffer.read(), ("${GUEST_IP.join('.')}", ${GUEST.port}))`,
  ].join('\n');
  execFileSync('ip', ['netns', 'exec', namespace, 'python3', '-c', script], { input: payload });
}

for (const [name, features, uso] of [
  ['with GUEST_USO4 and GUEST_USO6: ONE frame, gso_type UDP_L4, gso_size 1400', bit(VIRTIO_NET_F_GUEST_USO4) | bit(VIRTIO_NET_F_GUEST_USO6), true],
  // Linux takes TUN_F_USO4 only with TUN_F_USO6: the TAP then cuts the datagram itself.
  ['with GUEST_USO4 alone: MTU-sized frames (the TAP takes USO4 only with USO6)', bit(VIRTIO_NET_F_GUEST_USO4), false],
  ['without GUEST_USO: MTU-sized frames', 0n, false],
] as const) {
  test(`rx USO, a UDP_SEGMENT sender in the peer's namespace: ${name}`, async (t) => {
    const { fe, device, namespace } = await start(t, bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_GUEST_CSUM) | features, { rxBuffers: 64 });
    t.is(fe.negotiated!.features & (bit(VIRTIO_NET_F_GUEST_USO4) | bit(VIRTIO_NET_F_GUEST_USO6)), features, 'the daemon offers them on this kernel');
    const payload = udpPayload();
    sendFromPeer(namespace, payload, USO_MSS);
    const isOurs = (f: Uint8Array) => isUdpTo(f, GUEST.port);
    const frames = (await receiveMerged(fe, 2048, (got) => got.filter((f) => isOurs(f.frame)).reduce((n, f) => n + f.frame.length - 42, 0) >= PAYLOAD_BYTES)).filter((f) => isOurs(f.frame));
    t.deepEqual(Buffer.concat(frames.map((f) => f.frame.subarray(42))), Buffer.from(payload), 'the payload, in order');
    const gso = frames.map((f) => ({ type: f.header[1], size: f.header[4]! | (f.header[5]! << 8) }));
    if (uso) {
      t.is(frames.length, 1);
      t.deepEqual(gso, [{ type: VIRTIO_NET_HDR_GSO_UDP_L4, size: USO_MSS }]);
      t.true(frames[0]!.frame.length > 1514, 'larger than the MTU');
      t.is(device.queueStats(RX).gsoFrames[GSO_TYPES.indexOf('udp_l4')], 1);
    } else {
      t.is(frames.length, Math.ceil(PAYLOAD_BYTES / USO_MSS));
      t.true(gso.every((g) => g.type === 0), 'no GSO frame');
      t.true(frames.every((f) => f.frame.length <= 1514), 'MTU-sized');
      t.is(device.queueStats(RX).gsoFrames.reduce((n, c) => n + c, 0), 0);
    }
  });
}

test('hostile USO headers with HOST_USO negotiated are dropped and counted; a good USO frame follows', async (t) => {
  const { fe, device, namespace } = await start(t, bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_HOST_USO));
  const frame = udpFrame(GUEST, PEER, udpPayload(), true);
  const hostile = [
    udpHeader(VIRTIO_NET_HDR_GSO_UDP_L4, 0), // gso_size 0
    udpHeader(VIRTIO_NET_HDR_GSO_UDP_L4, frame.length + 1), // gso_size past the frame
    udpHeader(VIRTIO_NET_HDR_GSO_UDP_L4, USO_MSS, { hdrLen: frame.length + 1 }), // hdr_len past the frame
    udpHeader(VIRTIO_NET_HDR_GSO_UDP_L4, USO_MSS, { flags: 0 }), // no NEEDS_CSUM (Linux refuses USO without it)
    udpHeader(VIRTIO_NET_HDR_GSO_UDP_L4, USO_MSS, { csumOffset: 16 }), // the checksum not at the UDP check field
    udpHeader(VIRTIO_NET_HDR_GSO_UDP_L4 | VIRTIO_NET_HDR_GSO_ECN, USO_MSS), // ECN is for TCP
    udpHeader(VIRTIO_NET_HDR_GSO_UDP, 1480), // UFO, not negotiated here
  ].map((header) => txChain(frame, header));
  fe.submit(TX, hostile);
  const done = await fe.collect(TX, hostile.length);
  t.deepEqual(
    done.map((c) => c.len),
    hostile.map(() => 0),
  );
  t.is(device.queueStats(TX).dropped[TX_DROP_REASONS.indexOf('bad_header')], hostile.length);
  t.is(device.queueStats(TX).frames, 0, 'none reached the TAP');
  t.is(device.queueStats(TX).tapErrors, 0, 'none was refused by the kernel either');
  // The queue goes on: a good USO frame reaches the peer.
  const received = await udpReceiver(namespace);
  await fe.transfer(TX, txChain(frame, udpHeader(VIRTIO_NET_HDR_GSO_UDP_L4, USO_MSS)));
  await fe.transfer(TX, txChain(udpFrame(GUEST, PEER, new TextEncoder().encode('end'))));
  t.is((await received.report).bytes, PAYLOAD_BYTES);
});

test('rx with GUEST_UFO: a 60 KiB datagram from the peer comes as IP fragments (Linux hands no UFO frame to a TAP)', async (t) => {
  const { fe, device, namespace } = await start(t, bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_UFO), { rxBuffers: 64 });
  t.true((fe.negotiated!.features & bit(VIRTIO_NET_F_GUEST_UFO)) !== 0n, 'the daemon offers it on this kernel');
  sendFromPeer(namespace, udpPayload());
  // IPv4 UDP from the peer: the fragments of the one datagram (8 bytes of UDP header, then the payload).
  const isFragment = (f: Uint8Array) => f[12] === 0x08 && f[13] === 0x00 && f[23] === 17 && f.subarray(26, 30).every((b, i) => b === PEER_IP[i]);
  const ipPayload = (f: Uint8Array) => ((f[16]! << 8) | f[17]!) - 20;
  const frames = (await receiveMerged(fe, 2048, (got) => got.filter((f) => isFragment(f.frame)).reduce((n, f) => n + ipPayload(f.frame), 0) >= 8 + PAYLOAD_BYTES)).filter((f) =>
    isFragment(f.frame),
  );
  t.is(frames.length, Math.ceil((8 + PAYLOAD_BYTES) / 1480), '1480 bytes of datagram per fragment');
  t.true(frames.every((f) => f.header[1] === 0 && f.frame.length <= 1514), 'MTU-sized, no GSO frame');
  t.is(device.queueStats(RX).gsoFrames.reduce((n, c) => n + c, 0), 0);
});
