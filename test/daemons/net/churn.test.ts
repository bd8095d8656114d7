/**
 * Connection churn on the net device over a real bridged TAP: 200 front-ends in a row (connect,
 * negotiate, memory table, a queue pair, an ARP request out and its reply in, hang up). Each
 * connection opens a TAP queue and maps tx header and rx overflow areas; afterwards the process has
 * exactly the fds it had before, no extra mapping, and its resident memory outside V8's heap grew by
 * little (test/helpers/process-memory.ts says why V8's pages are left out).
 */
import fs from 'node:fs';

import test from 'ava';

import { createNetDevice } from '../../../daemons/net/main';
import { VIRTIO_NET_F_MRG_RXBUF } from '../../../daemons/net/virtio-net';
import { silentLogger } from '../../../lib/runtime/logger';
import { VIRTIO_F_VERSION_1, bit } from '../../../lib/virtio/constants';
import { arpRequest, isArpReply } from '../../helpers/frames';
import { createBridgedTap } from '../../helpers/net-topology';
import { rssOutsideV8 } from '../../helpers/process-memory';
import { TestServer, collectGarbage, openFds, settleFds } from '../../lib/vhost-user/harness';

const MiB = 1 << 20;
const CYCLES = 200;
const WARMUP = 50;
/**
 * The measured cycles run as windows: a leak grows RSS in every window, while the noise of a loaded
 * machine (malloc arenas, V8) lands in one or two, so the smallest window's growth is what is bounded.
 */
const WINDOWS = 4;
const MAX_WINDOW_GROWTH = 2 * MiB;
const GUEST_MAC = [0x02, 0x00, 0x00, 0x00, 0x7a, 0x02];
const GUEST_IP = [10, 79, 1, 2];
const PEER_IP = [10, 79, 1, 1];

/** Mappings of this process whose name is one of the net device's own memfds. */
function netMappings(): number {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((line) => line.includes('vhostd-net-')).length;
}

test(`${CYCLES} connections with traffic leave no fd, mapping or TAP queue behind`, async (t) => {
  const topology = createBridgedTap(`vhc${process.pid % 100000}`, '02:00:00:00:7a:01', `${PEER_IP.join('.')}/24`);
  t.teardown(() => topology.close());
  const device = createNetDevice({ tap: topology.tap, createTap: false, queuePairs: 1, threads: 0, mtu: 1500, queueSize: 256, txUring: true }, silentLogger);
  const ts = await TestServer.start(device);
  t.teardown(async () => {
    await ts.close();
    device.close();
  });

  let mappedWhileConnected = 0;
  const cycle = async (i: number) => {
    const fe = ts.connect();
    try {
      await fe.negotiate({ features: bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF), packed: i % 2 === 1, eventIdx: true });
      await fe.setMemTable();
      await fe.setupQueue(0, 64);
      await fe.setupQueue(1, 64);
      fe.submit(0, Array.from({ length: 8 }, () => ({ writable: [{ length: 2048 }] })));
      await fe.transfer(1, { readable: [{ data: new Uint8Array(12) }, { data: arpRequest(GUEST_MAC, GUEST_IP, PEER_IP) }] });
      for (let found = false; !found; ) found = (await fe.collect(0, 1, 10_000)).some((c) => isArpReply(c.written.subarray(12)));
      mappedWhileConnected = netMappings();
    } finally {
      fe.close();
    }
    const ev = await ts.nextDisconnect();
    if (ev.code !== undefined) throw new Error(`cycle ${i}: dropped with ${ev.code}`);
  };

  for (let i = 0; i < WARMUP; i++) await cycle(i);
  collectGarbage();
  const fdsBefore = openFds();
  const mappingsBefore = netMappings();
  const windowGrowth: number[] = [];
  for (let w = 0; w < WINDOWS; w++) {
    const rssBefore = rssOutsideV8();
    for (let i = 0; i < CYCLES / WINDOWS; i++) await cycle(i);
    collectGarbage();
    windowGrowth.push(rssOutsideV8() - rssBefore);
  }
  t.is(await settleFds(fdsBefore), fdsBefore, 'open fds unchanged (TAP queues closed)');
  t.is(netMappings(), mappingsBefore, 'tx header and rx overflow areas unmapped');
  t.is(netMappings(), 0);
  t.is(mappedWhileConnected, 2, 'the check sees them while a connection runs');
  const shown = windowGrowth.map((g) => (g / MiB).toFixed(1)).join(', ');
  t.log(`RSS outside V8's heap grew by ${shown} MiB in windows of ${CYCLES / WINDOWS} connections`);
  t.true(Math.min(...windowGrowth) < MAX_WINDOW_GROWTH, `RSS outside V8's heap grew by ${shown} MiB: in every window`);
  t.is(device.queueStats(1).frames, CYCLES + WARMUP);
});
