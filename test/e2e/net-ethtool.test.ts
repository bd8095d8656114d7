/**
 * vhost-user-net in a real guest, seen with the guest's own tools: `ethtool -k` shows the offloads the
 * daemon offered, `ethtool -L` moves the guest between 4 queue pairs and 1 and back, and every pair
 * carries traffic through the daemon; 1000 pings each way lose nothing, and a large TCP transfer each way
 * through busybox nc arrives with the same md5.
 *
 * Needs root (a network namespace with the TAP; the daemon and the host-side peers run inside it).
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { startDaemon } from '../helpers/daemon';
import { guestTest, runGuestWith } from '../helpers/guest-test';
import { namespaceWithTap, runInNamespace } from '../helpers/net-topology';
import { controlMetrics } from '../helpers/vhostctl';

const HOST_IP = '10.79.0.1';
const GUEST_IP = '10.79.0.2';
const BUSYBOX = '/usr/bin/busybox';
const QUEUE_PAIRS = 4;
const PINGS_PER_CPU = 5;
const PINGS = 1000;
const TRANSFER_BYTES = 64 << 20;

/** Per-queue packet counters of virtio_net's `ethtool -S`, as `name=value` words on one line. */
const QUEUE_STATS = `qstats() { ethtool -S eth0 | awk '/_queue_[0-9]+_packets:/ { sub(":", "", $1); printf "%s=%s ", $1, $2 }'; }`;

/** `rx_queue_0_packets=5 tx_queue_0_packets=7 ...` → the counters by name. */
function parseQueueStats(line: string | undefined): Map<string, number> {
  return new Map((line ?? '').trim().split(/\s+/).filter((w) => w !== '').map((w) => {
    const [name, value] = w.split('=');
    return [name!, Number(value)];
  }));
}

/** How much each queue's counters grew between two `qstats` lines. */
function growth(before: string | undefined, after: string | undefined): Record<string, number> {
  const b = parseQueueStats(before);
  return Object.fromEntries([...parseQueueStats(after)].map(([name, value]) => [name, value - (b.get(name) ?? 0)]));
}

guestTest('ethtool: tso and tx-checksumming on; combined 4 → every queue pair carries traffic; combined 1 and back', async (t) => {
  const { namespace, tap } = namespaceWithTap(t, `${HOST_IP}/24`);
  const control = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-net-ethtool-')), 'control.sock');
  t.teardown(() => fs.rmSync(path.dirname(control), { recursive: true, force: true }));
  // No --threads: the vhostd_net_* counters of worker-thread queues do not reach the main thread yet.
  const daemon = await startDaemon('net', ['--tap', tap, '--queues', String(QUEUE_PAIRS), '--control', control], 10_000, {
    prefix: ['ip', 'netns', 'exec', namespace],
  });
  // virtio_net binds CPU i to tx queue i (XPS), so a ping pinned to each CPU leaves through each pair; the
  // TAP steers a flow's replies to the queue it last came from (tun's automatic flow steering), mostly.
  const pingEachCpu = `for c in 0 1 2 3; do taskset $((1 << c)) ping -c ${PINGS_PER_CPU} -i 0.05 -W 30 ${HOST_IP} > /tmp/ping.$c || echo "cpu $c: $(tail -n 2 /tmp/ping.$c)"; done`;
  try {
    const { result, why } = await runGuestWith(t, daemon, {
      qemuArgs: [
        '-smp', '4',
        '-chardev', `socket,id=c0,path=${daemon.socketPath}`,
        '-netdev', `vhost-user,id=n0,chardev=c0,queues=${QUEUE_PAIRS}`,
        // vectors: one per queue, one for the control queue, one for config changes.
        '-device', `virtio-net-pci,netdev=n0,mq=on,vectors=${2 * QUEUE_PAIRS + 2},mac=52:54:00:79:00:02`,
      ],
      timeoutMs: 240_000,
      script: [
        QUEUE_STATS,
        'ip link set eth0 up',
        `ip addr add ${GUEST_IP}/24 dev eth0`,
        'section features ethtool -k eth0',
        'section channels ethtool -l eth0',
        `section combined4 ethtool -L eth0 combined ${QUEUE_PAIRS}`,
        'mark current "$(ethtool -l eth0 | awk \'/Current/ { c = 1 } c && /Combined/ { print $2 }\')"',
        `wait_for 60 ping -c 1 -W 2 ${HOST_IP} > /dev/null`,
        'mark four_before "$(qstats)"',
        `lost=$(${pingEachCpu}); mark four_lost "$lost"`,
        'mark four_after "$(qstats)"',
        'section combined1 ethtool -L eth0 combined 1',
        'mark one_current "$(ethtool -l eth0 | awk \'/Current/ { c = 1 } c && /Combined/ { print $2 }\')"',
        'mark one_before "$(qstats)"',
        `lost=$(${pingEachCpu}); mark one_lost "$lost"`,
        'mark one_after "$(qstats)"',
        `section back ethtool -L eth0 combined ${QUEUE_PAIRS}`,
        'mark back_before "$(qstats)"',
        `lost=$(${pingEachCpu}); mark back_lost "$lost"`,
        'mark back_after "$(qstats)"',
      ].join('\n'),
    });

    // The offloads the guest accepted from the daemon's features (HOST_TSO4/6, CSUM).
    const features = result.section('features')?.output ?? '';
    t.regex(features, /^tx-checksumming: on/m, features);
    t.regex(features, /^tcp-segmentation-offload: on/m, features);
    t.regex(features, /^\s+tx-tcp-segmentation: on/m, features);
    t.regex(features, /^\s+tx-tcp6-segmentation: on/m, features);
    // The driver reads the maximum from VIRTIO_NET_F_MQ's config field.
    t.regex(result.section('channels')?.output ?? '', new RegExp(`Pre-set maximums:[^]*?Combined:\\s+${QUEUE_PAIRS}\\b`), why);
    t.is(result.section('combined4')?.status, 0, result.section('combined4')?.output);
    t.is(result.mark('current'), String(QUEUE_PAIRS), why);

    // With 4 pairs, every tx queue sent the pings of its CPU, every rx queue received replies; none was lost.
    t.is(result.mark('four_lost'), '', why);
    const everyPair = (phase: Record<string, number>, label: string) => {
      for (let q = 0; q < QUEUE_PAIRS; q++) {
        t.true((phase[`tx_queue_${q}_packets`] ?? 0) >= PINGS_PER_CPU, `tx queue ${q} ${label}: ${JSON.stringify(phase)}`);
        t.true((phase[`rx_queue_${q}_packets`] ?? 0) >= 1, `rx queue ${q} ${label}: ${JSON.stringify(phase)}`);
      }
      const rx = Object.entries(phase).filter(([name]) => name.startsWith('rx_')).reduce((n, [, v]) => n + v, 0);
      t.true(rx >= QUEUE_PAIRS * PINGS_PER_CPU, `replies ${label}: ${JSON.stringify(phase)}`);
    };
    everyPair(growth(result.mark('four_before'), result.mark('four_after')), 'with 4 pairs');
    // With 1 pair, all of it went through pair 0 and nothing else moved.
    t.is(result.section('combined1')?.status, 0, result.section('combined1')?.output);
    t.is(result.mark('one_current'), '1', why);
    t.is(result.mark('one_lost'), '', why);
    const one = growth(result.mark('one_before'), result.mark('one_after'));
    t.true((one['tx_queue_0_packets'] ?? 0) >= 4 * PINGS_PER_CPU && (one['rx_queue_0_packets'] ?? 0) >= 4 * PINGS_PER_CPU, JSON.stringify(one));
    t.deepEqual(Object.entries(one).filter(([name, n]) => !name.includes('_queue_0_') && n !== 0), [], 'only pair 0 moves with combined 1');
    // And back to 4: every pair again.
    t.is(result.section('back')?.status, 0, result.section('back')?.output);
    t.is(result.mark('back_lost'), '', why);
    everyPair(growth(result.mark('back_before'), result.mark('back_after')), 'back at 4 pairs');

    // The daemon's side: each of the 8 virtqueues moved frames (rx queues even, tx odd), none dropped.
    const metrics = await controlMetrics(control);
    for (let q = 0; q < 2 * QUEUE_PAIRS; q++) {
      const frames = metrics.sum('vhostd_net_frames_total', { queue: String(q) });
      t.true(frames >= (q % 2 === 1 ? 2 * PINGS_PER_CPU : 2), `queue ${q}: ${frames} frames`);
    }
    t.is(metrics.sum('vhostd_net_tx_dropped_total'), 0, metrics.text);
  } finally {
    t.is(await daemon.stop(), 0, `daemon exit on SIGTERM; stderr: ${daemon.stderr()}`);
  }
});

/** The host side of the TCP transfers: port 5001 sends `file` and closes; port 5002 answers the md5 of `size` bytes it receives. */
const TCP_PEER = `
const net = require('node:net');
const fs = require('node:fs');
const { createHash } = require('node:crypto');
const [file, size] = [process.argv[1], Number(process.argv[2])];
net.createServer((socket) => fs.createReadStream(file).pipe(socket)).listen(5001, '${HOST_IP}');
net.createServer((socket) => {
  const hash = createHash('md5');
  let received = 0;
  socket.on('data', (chunk) => {
    hash.update(chunk);
    received += chunk.length;
    if (received >= size) socket.end(hash.digest('hex') + ' ' + received + '\\n');
  });
}).listen(5002, '${HOST_IP}', () => console.log('listening'));
`;

guestTest('1000 pings each way without loss; TCP through busybox nc, each way, md5 equal on both ends', async (t) => {
  const { namespace, tap } = namespaceWithTap(t, `${HOST_IP}/24`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-net-nc-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const data = randomBytes(TRANSFER_BYTES);
  const dataFile = path.join(dir, 'data');
  fs.writeFileSync(dataFile, data);
  const dataMd5 = createHash('md5').update(data).digest('hex');
  const stopPeer = new AbortController();
  t.teardown(() => stopPeer.abort());
  let peer: Promise<{ status: number | null; output: string }> | undefined;
  await new Promise<void>((listening, failed) => {
    peer = runInNamespace(namespace, [process.execPath, '-e', TCP_PEER, dataFile, String(TRANSFER_BYTES)], {
      signal: stopPeer.signal,
      onOutput: (text) => text.includes('listening') && listening(),
    });
    void peer.then((run) => failed(new Error(`TCP peer exited with ${run.status}: ${run.output}`)));
  });
  const control = path.join(dir, 'control.sock');
  const daemon = await startDaemon('net', ['--tap', tap, '--control', control], 10_000, { prefix: ['ip', 'netns', 'exec', namespace] });
  let hostPing: Promise<{ status: number | null; output: string }> | undefined;
  try {
    const { result, why } = await runGuestWith(t, daemon, {
      memory: '512M',
      qemuArgs: [
        '-chardev', `socket,id=c0,path=${daemon.socketPath}`,
        '-netdev', 'vhost-user,id=n0,chardev=c0',
        '-device', 'virtio-net-pci,netdev=n0,mac=52:54:00:79:00:03',
      ],
      timeoutMs: 300_000,
      onConsoleLine: (line) => {
        // -A: the next echo request as soon as the reply is in, as fast as the guest answers.
        if (line.includes('VHOSTD-MARK configured') && hostPing === undefined) {
          hostPing = runInNamespace(namespace, [BUSYBOX, 'ping', '-A', '-q', '-c', String(PINGS), '-W', '60', GUEST_IP]);
        }
      },
      script: [
        'ip link set eth0 up',
        `ip addr add ${GUEST_IP}/24 dev eth0`,
        `wait_for 60 ping -c 1 -W 2 ${HOST_IP} > /dev/null`,
        'mark configured',
        `section ping ping -A -q -c ${PINGS} -W 60 ${HOST_IP}`,
        `echos() { awk '/^Icmp:/ { n++; if (n == 1) for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i; if (n == 2) print $c }' /proc/net/snmp; }`,
        'echos_at_least() { [ "$(echos)" -ge "$1" ]; }',
        `wait_for 120 echos_at_least ${PINGS}`,
        'now() { cut -d" " -f1 /proc/uptime; }',
        `t0=$(now); nc ${HOST_IP} 5001 > /tmp/in; t1=$(now)`,
        'mark down "$(wc -c < /tmp/in) $(md5sum < /tmp/in | cut -d" " -f1) $t0 $t1"',
        `t0=$(now); reply=$(nc ${HOST_IP} 5002 < /tmp/in); t1=$(now)`,
        'mark up "$reply $t0 $t1"',
      ].join('\n'),
    });
    t.regex(result.section('ping')?.output ?? '', new RegExp(`${PINGS} packets transmitted, ${PINGS} packets received, 0% packet loss`), why);
    const host = await hostPing;
    t.regex(host?.output ?? '', new RegExp(`${PINGS} packets transmitted, ${PINGS} packets received, 0% packet loss`), host?.output);

    const [downBytes, downMd5, d0, d1] = result.mark('down')?.split(' ') ?? [];
    t.is(Number(downBytes), TRANSFER_BYTES, why);
    t.is(downMd5, dataMd5, 'the guest received what the TAP side sent');
    const [upMd5, upBytes, u0, u1] = result.mark('up')?.split(' ') ?? [];
    t.is(Number(upBytes), TRANSFER_BYTES, why);
    t.is(upMd5, dataMd5, 'the TAP side received what the guest sent');
    const rate = (bytes: number, from?: string, to?: string) => `${((bytes / (Number(to) - Number(from))) / (1 << 20)).toFixed(1)} MiB/s`;
    t.log(`${TRANSFER_BYTES >> 20} MiB down in ${(Number(d1) - Number(d0)).toFixed(2)} s (${rate(TRANSFER_BYTES, d0, d1)}), up in ${(Number(u1) - Number(u0)).toFixed(2)} s (${rate(TRANSFER_BYTES, u0, u1)}); run ${result.durationMs} ms`);

    const metrics = await controlMetrics(control);
    t.true(metrics.sum('vhostd_net_gso_frames_total', { queue: '0', type: 'tcpv4' }) > 0, 'TSO frames TAP → guest');
    t.true(metrics.sum('vhostd_net_gso_frames_total', { queue: '1', type: 'tcpv4' }) > 0, 'TSO frames guest → TAP');
    t.is(metrics.sum('vhostd_net_tx_dropped_total'), 0, metrics.text);
  } finally {
    t.is(await daemon.stop(), 0, `daemon exit on SIGTERM; stderr: ${daemon.stderr()}`);
  }
});
