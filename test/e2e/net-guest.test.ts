/**
 * vhost-user-net in a real guest: the Linux virtio-net driver binds, the guest and a TAP in a network
 * namespace the test makes ping each other, and 8 MiB go each way over TCP (HTTP through busybox
 * wget and a small node server on the TAP side) with equal checksums on both ends.
 *
 * Needs root (network namespaces, a TAP). The daemon runs inside the namespace, where its TAP is.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';

import type { ExecutionContext } from 'ava';

import { startDaemon } from '../helpers/daemon';
import { namespaceWithTap, runInNamespace } from '../helpers/net-topology';
import { vhostctl } from '../helpers/vhostctl';
import { guestTest } from '../helpers/guest-test';
import { runGuest } from '../helpers/qemu-guest';

interface Metric {
  name: string;
  values: { labels: Record<string, string>; value: number }[];
}

const HOST_IP = '10.78.0.1';
const GUEST_IP = '10.78.0.2';
const PORT = 8080;
const TRANSFER_BYTES = 8 << 20;
const BUSYBOX = '/usr/bin/busybox';

/** Deterministic bytes the server sends for GET /data (the test computes their md5 itself). */
const SERVER = `
const http = require('node:http');
const { createHash } = require('node:crypto');
const size = Number(process.argv[1]);
function data() {
  const out = Buffer.alloc(size);
  let x = 12345;
  for (let i = 0; i < size; i++) { x = (Math.imul(x, 1103515245) + 12345) >>> 0; out[i] = x >>> 24; }
  return out;
}
http.createServer((req, res) => {
  if (req.method === 'GET') { res.end(data()); return; }
  const hash = createHash('md5');
  req.on('data', (chunk) => hash.update(chunk));
  req.on('end', () => res.end(hash.digest('hex')));
}).listen(${PORT}, '${HOST_IP}', () => console.log('listening'));
`;

function expectedDownload(): string {
  const out = Buffer.alloc(TRANSFER_BYTES);
  let x = 12345;
  for (let i = 0; i < TRANSFER_BYTES; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return createHash('md5').update(out).digest('hex');
}

function startServer(t: ExecutionContext, namespace: string): Promise<ChildProcess> {
  const server = spawn('ip', ['netns', 'exec', namespace, process.execPath, '-e', SERVER, String(TRANSFER_BYTES)], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.teardown(() => server.kill());
  return new Promise((resolve, reject) => {
    server.stdout!.once('data', () => resolve(server));
    server.once('exit', (code) => reject(new Error(`server exited with ${code}`)));
  });
}

guestTest('the guest pings the TAP side and back, and 8 MiB cross each way with equal md5', async (t) => {
  const { namespace, tap } = namespaceWithTap(t, `${HOST_IP}/24`);
  await startServer(t, namespace);
  // The daemon lives in the namespace, so its metrics are read over the control socket (a file).
  const control = `/tmp/vhostd-net-control-${process.pid}.sock`;
  const daemon = await startDaemon('net', ['--tap', tap, '--control', control], 10_000, { prefix: ['ip', 'netns', 'exec', namespace] });
  let hostPing: Promise<string> | undefined;
  try {
    const result = await runGuest({
      qemuArgs: [
        '-chardev', `socket,id=c0,path=${daemon.socketPath}`,
        '-netdev', 'vhost-user,id=n0,chardev=c0',
        '-device', 'virtio-net-pci,netdev=n0,mac=52:54:00:78:00:02',
      ],
      timeoutMs: 240_000,
      onConsoleLine: (line) => {
        // Once the guest has its address, the TAP side pings it; the guest waits for those echoes.
        if (line.includes('VHOSTD-MARK configured') && hostPing === undefined) {
          hostPing = runInNamespace(namespace, [BUSYBOX, 'ping', '-c', '10', '-W', '60', GUEST_IP]).then((run) => run.output);
        }
      },
      script: [
        'ip link set eth0 up',
        `ip addr add ${GUEST_IP}/24 dev eth0`,
        'mark configured',
        `section ping ping -c 20 -i 0.2 -W 60 ${HOST_IP}`,
        // ICMP echo requests this guest answered (/proc/net/snmp, Icmp InEchos).
        `echos() { awk '/^Icmp:/ { n++; if (n == 1) for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i; if (n == 2) print $c }' /proc/net/snmp; }`,
        'echos_at_least() { [ "$(echos)" -ge "$1" ]; }',
        'wait_for 120 echos_at_least 10',
        'mark echos "$(echos)"',
        `wget -q -O /tmp/in http://${HOST_IP}:${PORT}/data`,
        'mark down_bytes "$(wc -c < /tmp/in)"',
        'mark down_md5 "$(md5sum < /tmp/in | cut -d" " -f1)"',
        // busybox wget posts the file as a C string: leave out the zero bytes.
        `dd if=/dev/urandom bs=65536 count=${TRANSFER_BYTES / 65536} 2>/dev/null | tr -d "\\000" > /tmp/out`,
        'mark up_bytes "$(wc -c < /tmp/out)"',
        'mark up_md5 "$(md5sum < /tmp/out | cut -d" " -f1)"',
        `mark up_reply "$(wget -q -O - --post-file /tmp/out http://${HOST_IP}:${PORT}/up)"`,
        'cat /proc/net/dev',
      ].join('\n'),
    });
    t.is(result.exitStatus, 0, result.tail(40));
    t.regex(result.section('ping')?.output ?? '', /20 packets transmitted, 20 packets received/, result.tail(40));
    t.true(Number(result.mark('echos')) >= 10, `guest answered ${result.mark('echos')} pings; host ping said: ${await hostPing}`);
    t.regex((await hostPing) ?? '', /10 packets transmitted, 10 packets received/);
    t.is(Number(result.mark('down_bytes')), TRANSFER_BYTES);
    t.is(result.mark('down_md5'), expectedDownload());
    t.true(Number(result.mark('up_bytes')) > TRANSFER_BYTES * 0.99, `uploaded ${result.mark('up_bytes')} bytes`);
    t.regex(result.mark('up_md5') ?? '', /^[0-9a-f]{32}$/);
    t.is(result.mark('up_reply'), result.mark('up_md5'), 'the TAP side received what the guest sent');

    // The operator sees the traffic in the metrics: frames both ways, nothing dropped.
    const run = await vhostctl('--control', control, '--json', 'call', 'metrics');
    t.is(run.status, 0, run.stderr);
    const metrics = (JSON.parse(run.stdout) as { metrics: Metric[] }).metrics;
    const values = (name: string) => metrics.find((m) => m.name === name)?.values ?? [];
    const value = (name: string, queue: number) => values(name).find((v) => v.labels.queue === String(queue))?.value ?? 0;
    t.true(value('vhostd_net_bytes_total', 0) >= TRANSFER_BYTES, `rx bytes: ${value('vhostd_net_bytes_total', 0)}`);
    t.true(value('vhostd_net_bytes_total', 1) >= TRANSFER_BYTES * 0.99, `tx bytes: ${value('vhostd_net_bytes_total', 1)}`);
    // TSO (TCP over IPv4) both ways: frames larger than the MTU crossed the TAP unsegmented.
    const tso = (queue: number) => values('vhostd_net_gso_frames_total').find((v) => v.labels.queue === String(queue) && v.labels.type === 'tcpv4')?.value ?? 0;
    t.true(tso(0) > 0, 'TSO frames TAP → guest');
    t.true(tso(1) > 0, 'TSO frames guest → TAP');
    t.deepEqual(values('vhostd_net_tx_dropped_total').filter((v) => v.value > 0), []);
  } finally {
    const code = await daemon.stop();
    t.is(code, 0, `daemon exit on SIGTERM; stderr: ${daemon.stderr()}`);
  }
});

guestTest('packed rings, two queue pairs in two threads each carry traffic; 9000-byte MTU from host_mtu, jumbo pings both ways', async (t) => {
  const { namespace, tap } = namespaceWithTap(t, `${HOST_IP}/24`, 9000);
  const control = `/tmp/vhostd-net-control-${process.pid}-mq.sock`;
  const daemon = await startDaemon('net', ['--tap', tap, '--queues', '2', '--threads', '2', '--mtu', '9000', '--control', control], 10_000, {
    prefix: ['ip', 'netns', 'exec', namespace],
  });
  let hostPing: Promise<string> | undefined;
  try {
    const result = await runGuest({
      qemuArgs: [
        '-smp', '2',
        '-chardev', `socket,id=c0,path=${daemon.socketPath}`,
        '-netdev', 'vhost-user,id=n0,chardev=c0,queues=2',
        '-device', 'virtio-net-pci,netdev=n0,mq=on,packed=on,host_mtu=9000,mac=52:54:00:78:00:03',
      ],
      timeoutMs: 240_000,
      onConsoleLine: (line) => {
        if (line.includes('VHOSTD-MARK configured') && hostPing === undefined) {
          hostPing = runInNamespace(namespace, [BUSYBOX, 'ping', '-c', '5', '-s', '8972', '-W', '60', GUEST_IP]).then((run) => run.output);
        }
      },
      script: [
        'mark queues "$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"',
        // VIRTIO_NET_F_MTU: the driver starts at the MTU QEMU's host_mtu= announced (after NET_SET_MTU).
        'mark initial_mtu "$(cat /sys/class/net/eth0/mtu)"',
        'ip link set eth0 mtu 9000 up',
        `ip addr add ${GUEST_IP}/24 dev eth0`,
        'mark configured',
        // virtio_net maps CPU i to tx queue i (XPS): a ping on each CPU uses each queue pair.
        `section cpu0 taskset 1 ping -c 5 -s 8972 -W 60 ${HOST_IP}`,
        `section cpu1 taskset 2 ping -c 5 -s 8972 -W 60 ${HOST_IP}`,
        `echos() { awk '/^Icmp:/ { n++; if (n == 1) for (i = 1; i <= NF; i++) if ($i == "InEchos") c = i; if (n == 2) print $c }' /proc/net/snmp; }`,
        'echos_at_least() { [ "$(echos)" -ge "$1" ]; }',
        'wait_for 120 echos_at_least 5',
      ].join('\n'),
    });
    t.is(result.exitStatus, 0, result.tail(40));
    t.is(result.mark('queues'), '2');
    t.is(result.mark('initial_mtu'), '9000');
    for (const cpu of ['cpu0', 'cpu1']) t.regex(result.section(cpu)?.output ?? '', /5 packets transmitted, 5 packets received/, cpu);
    t.regex((await hostPing) ?? '', /5 packets transmitted, 5 packets received/);

    // Both tx queues (1 and 3) moved frames; the worker threads' queue counters reach the main thread.
    const run = await vhostctl('--control', control, '--json', 'call', 'metrics');
    t.is(run.status, 0, run.stderr);
    const metrics = (JSON.parse(run.stdout) as { metrics: Metric[] }).metrics;
    const requests = metrics.find((m) => m.name === 'vhostd_queue_requests_total')?.values ?? [];
    const perQueue = (q: number) => requests.find((v) => v.labels.queue === String(q))?.value ?? 0;
    t.true(perQueue(1) >= 5 && perQueue(3) >= 5, `tx requests: queue 1 ${perQueue(1)}, queue 3 ${perQueue(3)}`);
    t.true(perQueue(0) + perQueue(2) >= 10, `rx requests: queue 0 ${perQueue(0)}, queue 2 ${perQueue(2)}`);
    t.regex(daemon.stderr(), /queues run in 2 worker thread/);
  } finally {
    const code = await daemon.stop();
    t.is(code, 0, `daemon exit on SIGTERM; stderr: ${daemon.stderr()}`);
  }
});
