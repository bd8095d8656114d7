/**
 * Live migration on one host (test/helpers/migration.ts): a source QEMU with its own daemon, a
 * destination QEMU (`-incoming defer`) with a second daemon on the same backing files or TAP, and
 * `migrate` over QMP while the guest works. Rows:
 * - blk and scsi: during the migration the guest reads known patterns into its page cache (pages the
 *   daemon writes, which only its dirty log gets to the destination) and writes other patterns with
 *   O_DIRECT (used ring entries the daemon writes); on the destination it checks both, and the host
 *   checks the backing file.
 * - net: the guest pings a peer behind the TAP every 100 ms throughout; the destination daemon serves
 *   the same TAP while the guest announces itself (GUEST_ANNOUNCE), or a new TAP on the bridge with
 *   `guest_announce=off`, where QEMU asks the daemon for the RARP (SEND_RARP), captured on that TAP.
 * Timings are printed with `t.log`, not asserted.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { ExecutionContext } from 'ava';

import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { guestTest } from '../helpers/guest-test';
import { LiveMigration, type LiveMigrationOptions, type MigrationTimings } from '../helpers/migration';
import { createBridgedTap } from '../helpers/net-topology';
import { capturePackets } from '../helpers/packet-capture';

const CHUNK = 64 * 1024;
/** Chunks the guest writes, 0 .. WRITES-1, one every fourth read. */
const WRITES = 256;
/** Chunks the guest reads during the migration (64 MiB: longer than the migration's first pass). */
const READS = 1024;
const BOOT_MS = 150_000;
/** One migration at a time: two QEMUs each already fill the CPUs a guest test may count on. */
const SERIAL = { serial: true };

/** The guest's chunk `i`: "chunk-<i>\n" repeated, cut to CHUNK bytes (the guest makes it with `yes`). */
function chunk(i: number): Buffer {
  const line = Buffer.from(`chunk-${i}\n`);
  const out = Buffer.alloc(CHUNK);
  for (let at = 0; at < CHUNK; at += line.length) line.copy(out, at);
  return out;
}

/**
 * The host fills chunks WRITES .. WRITES+READS-1 before boot. While the migration runs the guest reads
 * them into its page cache (buffered): the daemon writes those pages, which QEMU's own dirty tracking
 * (CPU writes) never sees. Every fourth read it also writes one of chunks 0 .. WRITES-1 with O_DIRECT.
 * After the switch it reads the cached chunks again and reads the written ones back from the device.
 */
function storageScript(device: string): string {
  return `
wait_for 30 test -b ${device}
# Linux drops a block device's page cache at its last close: fd 3 keeps ${device} open throughout.
exec 3<${device}
mark io start
i=0
w=0
while [ $i -lt ${READS} ]; do
  dd if=${device} of=/dev/null bs=${CHUNK} skip=$(( ${WRITES} + i )) count=1 2>/dev/null || echo "read $i failed"
  if [ $(( i % 4 )) -eq 0 ] && [ $w -lt ${WRITES} ]; then
    yes "chunk-$w" | head -c ${CHUNK} > /tmp/c
    dd if=/tmp/c of=${device} bs=${CHUNK} seek=$w count=1 oflag=direct conv=notrunc 2>/dev/null || echo "write $w failed"
    w=$(( w + 1 ))
  fi
  [ $(( i % 64 )) -ne 63 ] || mark written $w
  # Paced, so the I/O spans the whole migration.
  [ $(( i % 8 )) -ne 0 ] || sleep 0.05
  i=$(( i + 1 ))
done
mark io done
stale=0
i=${WRITES}
while [ $i -lt ${WRITES + READS} ]; do
  want=$(yes "chunk-$i" | head -c ${CHUNK} | md5sum | cut -d' ' -f1)
  got=$(dd if=${device} bs=${CHUNK} skip=$i count=1 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$want" = "$got" ] || stale=$(( stale + 1 ))
  i=$(( i + 1 ))
done
mark stale $stale
bad=0
i=0
while [ $i -lt ${WRITES} ]; do
  want=$(yes "chunk-$i" | head -c ${CHUNK} | md5sum | cut -d' ' -f1)
  got=$(dd if=${device} bs=${CHUNK} skip=$i count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
  [ "$want" = "$got" ] || bad=$(( bad + 1 ))
  i=$(( i + 1 ))
done
mark bad $bad
`;
}

interface StorageRow {
  readonly device: 'blk' | 'scsi';
  /** The disk in the guest. */
  readonly guestDevice: string;
  daemonArgs(file: string): string[];
  qemuDevice(chardev: string): string;
}

const storageRows: StorageRow[] = [
  { device: 'blk', guestDevice: '/dev/vda', daemonArgs: (file) => ['--file', file], qemuDevice: (id) => `vhost-user-blk-pci,chardev=${id}` },
  { device: 'scsi', guestDevice: '/dev/sda', daemonArgs: (file) => ['--lun', `0=${file}`], qemuDevice: (id) => `vhost-user-scsi-pci,chardev=${id}` },
];

function logTimings(t: ExecutionContext, timings: MigrationTimings): void {
  t.log(
    `migration: total ${timings.totalMs} ms, downtime ${timings.downtimeMs} ms, setup ${timings.setupMs} ms, ` +
      `STOP→RESUME ${timings.stopToResumeMs} ms, ${(timings.ramBytes / 2 ** 20).toFixed(1)} MiB of RAM sent`,
  );
}

/** Each side's daemon: `args` plus the metrics port off. */
function daemonOn(device: string, args: (side: 'source' | 'destination') => string[]): LiveMigrationOptions['startDaemon'] {
  return (side) => startDaemon(device, [...args(side), '--metrics', '0']);
}

function chardev(daemon: RunningDaemon): string[] {
  return ['-chardev', `socket,id=dev0,path=${daemon.socketPath}`];
}

for (const row of storageRows) {
  guestTest(`${row.device}: live migration to a second QEMU and daemon while the guest reads and writes; every chunk verifies in the guest and the file`, async (t) => {
    t.timeout(360_000);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vhostd-migration-${row.device}-`));
    const file = path.join(dir, 'disk.img');
    const prefilled = Buffer.alloc((WRITES + READS) * CHUNK);
    for (let i = WRITES; i < WRITES + READS; i++) chunk(i).copy(prefilled, i * CHUNK);
    fs.writeFileSync(file, prefilled);
    let migration: LiveMigration | undefined;
    try {
      migration = await LiveMigration.start({
        script: storageScript(row.guestDevice),
        // Page cache pages are then not zeroed by the CPU on allocation, which would mark them dirty in
        // QEMU's own tracking and hide a missing mark of the daemon's.
        append: 'init_on_alloc=0',
        startDaemon: daemonOn(row.device, () => row.daemonArgs(file)),
        deviceArgs: (daemon) => [...chardev(daemon), '-device', row.qemuDevice('dev0')],
      });
      const { source, destination } = migration;
      await source.qemu.waitMark('io', BOOT_MS);
      // Slow enough that the first pass over guest memory overlaps many of the guest's reads and writes.
      const timings = await migration.migrate({ 'max-bandwidth': 32 * 1024 * 1024 });
      logTimings(t, timings);
      // The switch came while the guest was at work: the source never saw the end of it.
      t.deepEqual(source.qemu.marks('io'), ['start'], 'the migration finished before the guest stopped its I/O');
      // Writes went on across the switch: some before it, the rest on the destination.
      const writtenBefore = Number(source.qemu.marks('written').pop() ?? 0);
      t.log(`chunks written before the switch: about ${writtenBefore} of ${WRITES}`);
      t.true(writtenBefore < WRITES, 'the guest was still writing at the switch');
      await source.qemu.kill();
      t.is(await destination.qemu.waitMark('stale', 200_000), '0', 'pages the daemon read into guest memory during the migration reached the destination');
      t.is(await destination.qemu.waitMark('bad', 200_000), '0', 'every chunk written across the migration reads back in the guest');
      t.deepEqual(destination.qemu.marks('io'), ['done'], 'the guest finished its I/O on the destination');
      t.true(destination.qemu.marks('written').length > 0, 'the guest went on writing on the destination');
      t.false(destination.qemu.lines.some((l) => / failed$/.test(l)), destination.qemu.tail(40));
      const disk = fs.readFileSync(file);
      let mismatched = 0;
      for (let i = 0; i < WRITES; i++) {
        const want = createHash('md5').update(chunk(i)).digest('hex');
        const got = createHash('md5').update(disk.subarray(i * CHUNK, (i + 1) * CHUNK)).digest('hex');
        if (want !== got) mismatched++;
      }
      t.is(mismatched, 0, 'every written chunk is in the backing file');
      t.regex(source.daemon.stderr(), /dirty page log: \d+ bytes/, 'QEMU gave the source daemon its dirty page log');
    } finally {
      await migration?.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, SERIAL);
}

const PEER_IP = '10.83.0.1';
const GUEST_IP = '10.83.0.2';
const GUEST_MAC = [0x52, 0x54, 0x00, 0x83, 0x00, 0x02];
const PINGS = 300;
const PING_INTERVAL_MS = 100;
const ETH_P_ARP = 0x0806;
const ETH_P_RARP = 0x8035;

/** RFC 903 reverse request for `mac` (what QEMU's announce sends), zero-padded to Ethernet's 60 bytes. */
function rarpRequest(mac: readonly number[]): Buffer {
  const frame = Buffer.alloc(60);
  Buffer.from([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, ...mac, 0x80, 0x35]).copy(frame, 0);
  // htype Ethernet, ptype IPv4, hlen 6, plen 4, op 3 (reverse request), sha, spa 0, tha, tpa 0.
  Buffer.from([0, 1, 8, 0, 6, 4, 0, 3, ...mac, 0, 0, 0, 0, ...mac, 0, 0, 0, 0]).copy(frame, 14);
  return frame;
}

/** Whether `frame` is a gratuitous ARP from `mac` for `ip`: sender and target address both `ip`. */
function isGratuitousArp(frame: Buffer, mac: readonly number[], ip: string): boolean {
  const ipBytes = Buffer.from(ip.split('.').map(Number));
  return (
    frame.readUInt16BE(12) === ETH_P_ARP &&
    frame.subarray(6, 12).equals(Buffer.from(mac)) &&
    frame.subarray(28, 32).equals(ipBytes) &&
    frame.subarray(38, 42).equals(ipBytes)
  );
}

interface NetRow {
  readonly title: string;
  /** virtio-net-pci's guest_announce. */
  readonly guestAnnounce: boolean;
  /** The destination daemon serves a TAP of its own on the bridge (the capture watches it). */
  readonly newTap: boolean;
}

const netRows: NetRow[] = [
  { title: 'the destination daemon shares the TAP; the guest announces itself (GUEST_ANNOUNCE)', guestAnnounce: true, newTap: false },
  { title: 'guest_announce=off, the destination daemon on a new TAP sends the RARP QEMU asks for (SEND_RARP)', guestAnnounce: false, newTap: true },
];

let netSerial = 0;

for (const row of netRows) {
  guestTest(`net: live migration while the guest pings a peer every ${PING_INTERVAL_MS} ms: ${row.title}`, async (t) => {
    t.timeout(360_000);
    const topology = createBridgedTap(`vhmg${process.pid % 100000}x${netSerial++}`, '02:00:00:00:83:01', `${PEER_IP}/24`, 2);
    const [sourceTap, destinationTap] = [topology.taps[0]!, topology.taps[row.newTap ? 1 : 0]!];
    const mac = GUEST_MAC.map((b) => b.toString(16).padStart(2, '0')).join(':');
    let migration: LiveMigration | undefined;
    // What the destination's daemon (and, on a shared TAP, the source's) writes into the TAP.
    const capture = await capturePackets(destinationTap, [ETH_P_ARP, ETH_P_RARP]);
    try {
      migration = await LiveMigration.start({
        script: [
          'ip link set eth0 up',
          `ip addr add ${GUEST_IP}/24 dev eth0`,
          `wait_for 60 ping -c 1 -W 1 ${PEER_IP}`,
          'mark ping start',
          `ping -c ${PINGS} -i ${PING_INTERVAL_MS / 1000} -W 5 ${PEER_IP} > /tmp/ping 2>&1`,
          'mark ping "$(grep "packets transmitted" /tmp/ping)"',
        ].join('\n'),
        startDaemon: daemonOn('net', (side) => ['--tap', side === 'source' ? sourceTap : destinationTap]),
        deviceArgs: (daemon) => [
          ...chardev(daemon),
          '-netdev', 'vhost-user,id=n0,chardev=dev0',
          '-device', `virtio-net-pci,netdev=n0,mac=${mac},guest_announce=${row.guestAnnounce ? 'on' : 'off'}`,
        ],
      });
      const { source, destination } = migration;
      await source.qemu.waitMark('ping', BOOT_MS);
      // Announcements come after the switch: frames from before (the source guest's ARP) do not count.
      const earlier = capture.frames.length;
      const timings = await migration.migrate();
      logTimings(t, timings);
      t.deepEqual(source.qemu.marks('ping'), ['start'], 'the migration finished while the guest was pinging');
      await source.qemu.kill();
      const summary = await destination.qemu.waitMark('ping', PINGS * PING_INTERVAL_MS * 4 + 60_000, (v) => v !== 'start');
      const received = /(\d+) packets transmitted, (\d+) packets received/.exec(summary);
      t.truthy(received, `ping summary: ${summary}\n${destination.qemu.tail(20)}`);
      const lost = Number(received?.[1]) - Number(received?.[2]);
      // Pings sent while the guest was stopped, plus one whose reply was in flight at the switch.
      const allowed = Math.ceil(timings.stopToResumeMs / PING_INTERVAL_MS) + 1;
      t.log(`pings: ${summary}; ${lost} lost (allowed ${allowed})`);
      t.is(Number(received?.[1]), PINGS);
      t.true(lost <= allowed, `${lost} of ${PINGS} pings lost, more than the ${allowed} the switch explains: ${summary}`);

      // By now (the guest pinged for seconds after the switch) every announcement has been made.
      const announced = capture.frames.slice(earlier);
      const rarps = announced.filter((f) => f.readUInt16BE(12) === ETH_P_RARP);
      const gratuitous = announced.filter((f) => isGratuitousArp(f, GUEST_MAC, GUEST_IP));
      t.log(`captured on ${destinationTap}: ${rarps.length} RARP, ${gratuitous.length} gratuitous ARP`);
      if (row.guestAnnounce) {
        t.true(gratuitous.length > 0, 'the guest announced itself on the destination');
        t.is(rarps.length, 0, 'QEMU asks for no RARP when the guest announces itself');
      } else {
        t.true(rarps.length > 0, `the destination daemon sent the RARP; destination daemon stderr: ${destination.daemon.stderr()}`);
        for (const frame of rarps) t.deepEqual(frame.toString('hex'), rarpRequest(GUEST_MAC).toString('hex'), 'the RARP of RFC 903 for the guest MAC');
        t.regex(destination.daemon.stderr(), new RegExp(`RARP announcement for ${mac} sent`));
      }
      t.regex(source.daemon.stderr(), /dirty page log: \d+ bytes/, 'QEMU gave the source daemon its dirty page log');
    } finally {
      capture.stop();
      await migration?.close();
      topology.close();
    }
  }, SERIAL);
}
