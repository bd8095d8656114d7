/**
 * A second, independent front-end: DPDK's virtio-user PMD in testpmd drives vhost-user-net instead of
 * QEMU. Its own message sequence (SET_VRING_CALL before SET_FEATURES, SET_STATUS, a packed
 * SET_VRING_BASE of 0x8000 with no used half), its own memory (memfd) and its own ring code, busy
 * polling instead of interrupts. The daemon runs on a real TAP in a network namespace.
 *
 * Per ring layout and receive-buffer mode: testpmd answers ARP and pings from the namespace
 * (`icmpecho`: frames both ways, every echo answered), then sends 64-byte UDP frames as fast as it can
 * (`txonly`). Three independent counters must agree, direction by direction: testpmd's port stats,
 * the daemon's metrics and the TAP's counters.
 *
 * Needs root (network namespace, TAP) and dpdk-testpmd with its virtio driver (librte-net-virtio23).
 */
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import test, { type ExecutionContext } from 'ava';

import { startDaemon } from '../../helpers/daemon';
import { interfaceCounters, namespaceWithTap, runInNamespace, type InterfaceCounters } from '../../helpers/net-topology';
import type { Scrape } from '../../helpers/scrape';
import { TestPmd, testpmdMissingReason, type PortStats } from '../../helpers/testpmd';
import { controlMetrics, vhostctl } from '../../helpers/vhostctl';

const TAP_IP = '10.93.0.1';
const PMD_IP = '10.93.0.2';
/** testpmd's port (virtio-user `mac=`). */
const PMD_MAC = '02:00:00:93:00:02';
const BUSYBOX = '/usr/bin/busybox';
/** Small pings: more than the 256 entries of virtio-user's rings, so both rings wrap. */
const PINGS = 300;
/** Full-size pings: 1472 bytes of payload make 1514-byte frames at MTU 1500. */
const BIG_PINGS = 50;
/** txonly runs until the daemon has moved this many frames to the TAP: the tx ring wraps many times. */
const TXONLY_FRAMES = 20_000;

/** ICMP echo replies the namespace's kernel received (/proc/net/snmp, Icmp InEchoReps). */
async function echoRepliesReceived(namespace: string): Promise<number> {
  const { output } = await runInNamespace(namespace, ['cat', '/proc/net/snmp']);
  const [names, values] = output.split('\n').filter((line) => line.startsWith('Icmp:'));
  const column = names!.split(/\s+/).indexOf('InEchoReps');
  return Number(values!.split(/\s+/)[column]);
}

/** The daemon's counters summed over its queues: rx queues 2p (TAP → testpmd), tx queues 2p + 1 (testpmd → TAP). */
function daemonCounters(m: Scrape): InterfaceCounters {
  const sum = (name: string, parity: number) =>
    m.samples.filter((s) => s.name === name && Number(s.labels['queue']) % 2 === parity).reduce((n, s) => n + s.value, 0);
  return {
    txPackets: sum('vhostd_net_frames_total', 0),
    txBytes: sum('vhostd_net_bytes_total', 0),
    rxPackets: sum('vhostd_net_frames_total', 1),
    rxBytes: sum('vhostd_net_bytes_total', 1),
  };
}

/** Polls `read` until `done` holds for its value (every 50 ms, at most 30 s) and returns that value. */
async function until<T>(read: () => Promise<T>, done: (value: T) => boolean, what: string): Promise<T> {
  const deadline = Date.now() + 30_000;
  for (;;) {
    const value = await read();
    if (done(value)) return value;
    if (Date.now() > deadline) throw new Error(`${what}: still ${JSON.stringify(value)} after 30 s`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/**
 * `count` pings of `size` bytes from `namespace` to testpmd, then wait until the namespace has `before`
 * + `count` echo replies: ping gives up on late replies, the kernel counts every one, however late.
 */
async function pingAnswered(t: ExecutionContext, namespace: string, count: number, size: number, before: number, show: (what: string) => string): Promise<void> {
  const ping = await runInNamespace(namespace, [BUSYBOX, 'ping', '-q', '-c', String(count), '-i', '0.005', '-s', String(size), PMD_IP]);
  t.regex(ping.output, new RegExp(`${count} packets transmitted`), show(ping.output));
  await until(async () => echoRepliesReceived(namespace), (n) => n === before + count, 'echo replies in the namespace');
}

async function exchange(t: ExecutionContext, vdevArgs: string, queuePairs: number): Promise<void> {
  const { namespace, tap } = namespaceWithTap(t, `${TAP_IP}/24`);
  // No IPv6 chatter (router solicitations, MLD): every frame counted is one of the test's.
  execFileSync('ip', ['netns', 'exec', namespace, 'sysctl', '-qw', `net.ipv6.conf.${tap}.disable_ipv6=1`]);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-dpdk-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const control = path.join(dir, 'control.sock');
  const daemon = await startDaemon('net', ['--tap', tap, '--queues', String(queuePairs), '--control', control], 10_000, { prefix: ['ip', 'netns', 'exec', namespace] });
  t.teardown(() => daemon.stop());
  // The TAP's rx is what the daemon wrote into it (testpmd's tx), its tx what the kernel handed the daemon.
  const tapAtStart = interfaceCounters(tap, namespace);

  const pmd = await TestPmd.start(daemon.socketPath, `,mac=${PMD_MAC}${vdevArgs}`, queuePairs);
  t.teardown(() => pmd.kill());
  const show = (what: string) => `${what}\n--- daemon:\n${daemon.stderr()}\n--- testpmd:\n${pmd.log()}`;

  // Both directions: the namespace pings testpmd, which answers each echo. A permanent neighbour
  // entry stands for ARP (which testpmd answers too, but an ARP that times out on this loaded machine
  // would drop the pings queued behind it), so testpmd receives exactly the pings.
  execFileSync('ip', ['-n', namespace, 'neigh', 'replace', PMD_IP, 'lladdr', PMD_MAC, 'nud', 'permanent', 'dev', tap]);
  await pmd.command('set fwd icmpecho');
  await pmd.command('start');
  await pingAnswered(t, namespace, PINGS, 56, 0, show);
  await pingAnswered(t, namespace, BIG_PINGS, 1472, PINGS, show);
  await pmd.command('stop');

  // Volume one way: testpmd's txonly fills the tx ring as fast as it can.
  await pmd.command('set fwd txonly');
  await pmd.command('start');
  await until(() => controlMetrics(control).then(daemonCounters), (c) => c.rxPackets >= TXONLY_FRAMES, 'frames into the TAP');
  await pmd.command('stop');

  // Once the daemon has taken everything testpmd put in its tx ring, every counter must agree.
  const pmdStats = await pmd.portStats();
  const ours = await until(() => controlMetrics(control).then(daemonCounters), (c) => c.rxPackets === pmdStats.txPackets, 'daemon tx frames vs testpmd TX-packets');
  const tapDelta = ((now: InterfaceCounters): InterfaceCounters => ({
    rxPackets: now.rxPackets - tapAtStart.rxPackets,
    rxBytes: now.rxBytes - tapAtStart.rxBytes,
    txPackets: now.txPackets - tapAtStart.txPackets,
    txBytes: now.txBytes - tapAtStart.txBytes,
  }))(interfaceCounters(tap, namespace));
  t.log(`testpmd ${JSON.stringify(pmdStats)}; daemon ${JSON.stringify(ours)}; TAP ${JSON.stringify(tapDelta)}`);

  const pings = PINGS + BIG_PINGS;
  const fromPmd = (s: PortStats): InterfaceCounters => ({ rxPackets: s.txPackets, rxBytes: s.txBytes, txPackets: s.rxPackets, txBytes: s.rxBytes });
  // TAP → testpmd: the pings, nothing else; testpmd → TAP: their replies and the txonly frames.
  t.is(pmdStats.rxPackets, pings);
  t.true(pmdStats.txPackets >= pings + TXONLY_FRAMES);
  t.deepEqual(ours, fromPmd(pmdStats), 'daemon metrics = testpmd port stats, both directions');
  t.deepEqual(tapDelta, ours, 'TAP counters = daemon metrics, both directions');

  const metrics = await controlMetrics(control);
  // txonly sends on every tx queue testpmd has: each of the daemon's tx queues carried frames.
  for (let pair = 0; pair < queuePairs; pair++) {
    t.true((metrics.value('vhostd_net_frames_total', { queue: String(2 * pair + 1) }) ?? 0) > 0, `tx queue ${2 * pair + 1} carried frames`);
  }
  t.is(metrics.sum('vhostd_net_tx_dropped_total'), 0, 'no frame of testpmd refused');
  t.is(metrics.sum('vhostd_net_tap_errors_total'), 0);
  // What an operator sees with `vhostctl status`: the TAP, and tx through io_uring on every pair.
  const status = await vhostctl('--control', control, '--json', 'status');
  t.is(status.status, 0, status.stderr);
  t.like(JSON.parse(status.stdout), {
    device: 'net',
    state: { tap, txWrites: 'io_uring', pairs: Array.from({ length: queuePairs }, () => ({ tapQueueOpen: true, rxEnabled: true, txEnabled: true })) },
  });

  t.is(await pmd.quit(), 0, show('testpmd exit'));
  t.is(await daemon.stop(), 0, show('daemon exit on SIGTERM'));
  t.regex(daemon.stderr(), /front-end disconnected/);
  t.notRegex(daemon.stderr(), /error|broken/i, show('daemon log'));
}

const ROWS: [name: string, vdevArgs: string, queuePairs: number][] = [
  ['split ring, mergeable rx buffers', '', 1],
  ['split ring, one buffer per frame', ',mrg_rxbuf=0', 1],
  ['packed ring, mergeable rx buffers', ',packed_vq=1', 1],
  ['packed ring, one buffer per frame', ',packed_vq=1,mrg_rxbuf=0', 1],
  ['split ring, 2 queue pairs', '', 2],
  ['packed ring, 2 queue pairs', ',packed_vq=1', 2],
];

const missing = testpmdMissingReason();
for (const [name, vdevArgs, queuePairs] of ROWS) {
  const title = `DPDK virtio-user (testpmd) exchanges frames with the daemon: ${name}`;
  const run = (t: ExecutionContext) => exchange(t, vdevArgs, queuePairs);
  if (missing === undefined) test.serial(title, run);
  // CI installs testpmd (scripts/install-deps.sh): there its absence is a failure.
  else if (process.env['CI']) test(title, (t) => t.fail(`CI is set but ${missing}`));
  else test.skip(`${title} [skipped: ${missing}]`, run);
}

/**
 * testpmd as the server (`server=1`), the daemon connecting to it (`--connect`): the daemon is
 * restarted with testpmd's rings in use, testpmd sets them up again on the new connection (a split
 * ring with SET_VRING_BASE 0 although its indexes moved on: the daemon resumes at used.idx), pings
 * are answered again, and a txonly burst after each (re)connection reaches the TAP frame for frame.
 */
async function restart(t: ExecutionContext, vdevArgs: string): Promise<void> {
  const { namespace, tap } = namespaceWithTap(t, `${TAP_IP}/24`);
  execFileSync('ip', ['netns', 'exec', namespace, 'sysctl', '-qw', `net.ipv6.conf.${tap}.disable_ipv6=1`]);
  execFileSync('ip', ['-n', namespace, 'neigh', 'replace', PMD_IP, 'lladdr', PMD_MAC, 'nud', 'permanent', 'dev', tap]);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-dpdk-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const socketPath = path.join(dir, 'virtio-user.sock');
  // testpmd in server mode waits for a back-end before it gives its prompt: start the first daemon once
  // its socket is there.
  const starting = TestPmd.start(socketPath, `,server=1,mac=${PMD_MAC}${vdevArgs}`);
  starting.then((p) => t.teardown(() => p.kill())).catch(() => {});
  const startOurs = (round: number) =>
    startDaemon('net', ['--tap', tap, '--control', path.join(dir, `control-${round}.sock`)], 10_000, { socketPath, connect: true, prefix: ['ip', 'netns', 'exec', namespace] });
  await until(async () => fs.existsSync(socketPath), (there) => there, 'testpmd listening');
  const tapRxBefore = interfaceCounters(tap, namespace).rxPackets;
  let daemon = await startOurs(1);
  const pmd = await starting;
  await pmd.command('set fwd icmpecho');
  await pmd.command('start');
  const daemonLogs: string[] = [];
  const show = (what: string) => `${what}\n--- daemons:\n${daemonLogs.join('\n---\n')}\n--- testpmd:\n${pmd.log()}`;
  let answered = 0;
  let sentBefore = 0;
  for (const round of [1, 2]) {
    if (round > 1) {
      daemon = await startOurs(round);
      // Frames of the moment testpmd takes the new back-end may be lost (as for a NIC that was briefly
      // down); the count starts once it says it has set up its rings again.
      await until(async () => pmd.log(), (log) => log.includes('reconnection succeeds'), 'testpmd reconnecting');
    }
    t.teardown(() => daemon.stop());
    const control = path.join(dir, `control-${round}.sock`);
    await pingAnswered(t, namespace, PINGS, 56, answered, show);
    answered += PINGS;
    const ours = daemonCounters(await controlMetrics(control));
    t.is(ours.txPackets, PINGS, `round ${round}: pings to testpmd through this daemon`);
    t.is(ours.rxPackets, PINGS, `round ${round}: replies from testpmd through this daemon`);
    // Volume on the new connection: every frame testpmd sends this round reaches the TAP.
    await pmd.command('stop');
    await pmd.command('set fwd txonly');
    await pmd.command('start');
    await until(() => controlMetrics(control).then(daemonCounters), (c) => c.rxPackets >= PINGS + TXONLY_FRAMES / 4, `round ${round}: txonly frames into the TAP`);
    await pmd.command('stop');
    const sent = (await pmd.portStats()).txPackets;
    await until(() => controlMetrics(control).then(daemonCounters), (c) => c.rxPackets === sent - sentBefore, `round ${round}: daemon tx frames vs testpmd TX-packets`);
    sentBefore = sent;
    t.is(interfaceCounters(tap, namespace).rxPackets - tapRxBefore, sent, `round ${round}: the TAP counted every frame testpmd sent`);
    await pmd.command('set fwd icmpecho');
    await pmd.command('start');
    t.is(await daemon.stop(), 0, show(`round ${round}: daemon exit`));
    daemonLogs.push(daemon.stderr());
    t.notRegex(daemon.stderr(), /error|broken/i, show(`round ${round}: daemon log`));
  }
  const stats = await pmd.portStats();
  t.is(stats.rxPackets, 2 * PINGS);
  t.is(stats.txPackets, sentBefore);
  t.is(await pmd.quit(), 0, show('testpmd exit'));
}

for (const [name, vdevArgs] of [
  ['split ring', ''],
  ['packed ring', ',packed_vq=1'],
] as const) {
  const title = `DPDK virtio-user in server mode reconnects to a restarted daemon; pings and a txonly burst go on: ${name}`;
  const run = (t: ExecutionContext) => restart(t, vdevArgs);
  if (missing === undefined) test.serial(title, run);
  else if (process.env['CI']) test(title, (t) => t.fail(`CI is set but ${missing}`));
  else test.skip(`${title} [skipped: ${missing}]`, run);
}
