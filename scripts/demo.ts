/**
 * `npm run demo`: start every vhostd daemon, boot a real Linux guest under QEMU with all of them
 * attached, use each device from inside the guest, then print what the guest saw and what the
 * daemons' metrics say, and clean up. Halfway, the demo acts as an operator would on a running
 * guest: it grows the blk image and runs `vhostctl status` and `vhostctl resize` on the daemon's
 * control socket; the guest sees the bigger disk without a reboot. The net device's TAP sits on a
 * bridge with a veth into a network namespace whose address the guest pings (root, as the demo runs).
 * The balloon's only front-end is QEMU 10.2's vhost-user-test-device-pci, so the guest runs on the QEMU
 * 10.2 that scripts/qemu-10.2.sh builds once into the cache (about 10 minutes the first time); the
 * operator sets a balloon target with vhostctl and the guest gives that memory back.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { startDaemon, type RunningDaemon } from '../test/helpers/daemon';
import { createBridgedTap } from '../test/helpers/net-topology';
import { qemu102, runGuest } from '../test/helpers/qemu-guest';
import { vhostctl, type VhostctlRun } from '../test/helpers/vhostctl';

interface DemoDevice {
  name: string;
  /** Extra daemon arguments (beyond --socket-path). */
  args: string[];
  /** QEMU arguments attaching the device to the socket. */
  qemu(socketPath: string): string[];
  /** Guest shell lines that exercise the device and `mark` what they found. */
  script: string[];
  /** One line of summary from the guest's marks. */
  summary(mark: (key: string) => string | undefined): string;
  /** Run on the host when the guest marks `operator=<name>` (the guest waits for the effect). */
  operator?(): Promise<VhostctlRun[]>;
}

/** What the operator asks the balloon to take back from the 512 MiB guest. */
const BALLOON_TARGET = 128 << 20;

function metricsPort(daemon: RunningDaemon): string | undefined {
  return /metrics on http:\/\/127\.0\.0\.1:(\d+)/.exec(daemon.stderr())?.[1];
}

async function main(): Promise<void> {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-demo-'));
  const image = path.join(work, 'disk.img');
  const blkControl = path.join(work, 'blk-control.sock');
  const balloonControl = path.join(work, 'balloon-control.sock');
  fs.writeFileSync(image, Buffer.alloc(0));
  fs.truncateSync(image, 64 << 20);
  const netPeer = '10.79.9.1';
  const network = createBridgedTap(`vhdemo${process.pid % 10000}`, '02:00:00:00:79:01', `${netPeer}/24`);
  const scsiImages = [path.join(work, 'lun0.img'), path.join(work, 'lun1.img')];
  fs.writeFileSync(scsiImages[0]!, Buffer.alloc(0));
  fs.truncateSync(scsiImages[0]!, 32 << 20);
  fs.writeFileSync(scsiImages[1]!, Buffer.alloc(8 << 20, 0x5a));

  const everyDevice: DemoDevice[] = [
    {
      name: 'rng',
      args: ['--max-bytes', '65536', '--period-ms', '100'],
      qemu: (s) => ['-chardev', `socket,id=rng0,path=${s}`, '-device', 'vhost-user-rng-pci,chardev=rng0'],
      script: [
        'mark rng_driver "$(cat /sys/class/misc/hw_random/rng_current)"',
        'mark rng_sample "$(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d " \\n")"',
        'mark rng_bytes "$(dd if=/dev/hwrng bs=4096 count=16 2>/dev/null | wc -c)"',
      ],
      summary: (m) => `rng: driver ${m('rng_driver')}, read ${m('rng_bytes')} bytes from /dev/hwrng, e.g. ${m('rng_sample')}`,
    },
    {
      name: 'blk',
      args: ['--file', image, '--serial', 'vhostd-demo', '--num-queues', '2', '--control', blkControl],
      qemu: (s) => ['-chardev', `socket,id=blk0,path=${s}`, '-device', 'vhost-user-blk-pci,chardev=blk0,num-queues=2'],
      script: [
        'mark blk_size "$(cat /sys/block/vda/size)"',
        'mark blk_serial "$(cat /sys/block/vda/serial 2>/dev/null)"',
        'echo "hello from the guest via vhost-user-blk" > /tmp/msg',
        'dd if=/tmp/msg of=/dev/vda bs=512 seek=2048 conv=fsync 2>/dev/null',
        'echo 3 > /proc/sys/vm/drop_caches',
        'mark blk_readback "$(dd if=/dev/vda bs=512 skip=2048 count=1 2>/dev/null | head -n1)"',
        'mark blk_queues "$(ls /sys/block/vda/mq | wc -l)"',
        'mark operator blk',
        `wait_for 30 sh -c '[ "$(cat /sys/block/vda/size)" -gt ${(64 << 20) / 512} ]'; mark blk_grown "$(cat /sys/block/vda/size)"`,
      ],
      summary: (m) =>
        `blk: /dev/vda ${Number(m('blk_size')) / 2048} MiB, serial ${m('blk_serial')}, ${m('blk_queues')} queues, wrote and read back "${m('blk_readback')}"; ` +
        `after vhostctl resize: ${Number(m('blk_grown')) / 2048} MiB`,
      async operator() {
        fs.truncateSync(image, 96 << 20);
        const status = await vhostctl('--control', blkControl, 'status');
        return [status, await vhostctl('--control', blkControl, 'resize')];
      },
    },
    {
      name: 'net',
      args: ['--tap', network.tap],
      qemu: (s) => ['-chardev', `socket,id=net0,path=${s}`, '-netdev', 'vhost-user,id=n0,chardev=net0', '-device', 'virtio-net-pci,netdev=n0,mac=52:54:00:79:09:02'],
      script: [
        'ip link set eth0 up',
        'ip addr add 10.79.9.2/24 dev eth0',
        'mark net_mac "$(cat /sys/class/net/eth0/address)"',
        `mark net_ping "$(ping -c 3 -W 30 ${netPeer} | grep 'packets transmitted')"`,
      ],
      summary: (m) => `net: eth0 ${m('net_mac')}, ping ${netPeer} through the TAP ${network.tap}: ${m('net_ping')}`,
    },
    {
      name: 'scsi',
      args: ['--lun', `0=${scsiImages[0]},discard,serial=DEMO-LUN0`, '--lun', `1=${scsiImages[1]},ro`, '--num-queues', '2'],
      qemu: (s) => ['-chardev', `socket,id=scsi0,path=${s}`, '-device', 'vhost-user-scsi-pci,chardev=scsi0,num_queues=2'],
      script: [
        `wait_for 30 sh -c '[ "$(ls /sys/class/scsi_disk | wc -l)" -ge 2 ]'`,
        'S0=$(ls /sys/class/scsi_disk/*:0:0:0/device/block); S1=$(ls /sys/class/scsi_disk/*:0:0:1/device/block)',
        'mark scsi_luns "$(ls /sys/class/scsi_disk | tr "\\n" " ")"',
        'mark scsi_size "$(cat /sys/block/$S0/size)"',
        'mark scsi_dev "$S0 $S1"',
        'echo "hello from the guest via vhost-user-scsi" > /tmp/smsg',
        'dd if=/tmp/smsg of=/dev/$S0 bs=512 seek=100 conv=fsync 2>/dev/null',
        'echo 3 > /proc/sys/vm/drop_caches',
        'mark scsi_readback "$(dd if=/dev/$S0 bs=512 skip=100 count=1 2>/dev/null | head -n1)"',
        'mark scsi_ro "$(blockdev --getro /dev/$S1)"',
      ],
      summary: (m) =>
        `scsi: LUNs ${m('scsi_luns')?.trim()} as ${m('scsi_dev')}, LUN 0 ${Number(m('scsi_size')) / 2048} MiB, wrote and read back "${m('scsi_readback')}"; ` +
        `LUN 1 read-only: ${m('scsi_ro') === '1' ? 'yes' : 'no'}`,
    },
    {
      name: 'balloon',
      args: ['--control', balloonControl, '--stats-interval', '1'],
      qemu: (s) => ['-chardev', `socket,id=bal0,path=${s}`, '-device', 'vhost-user-test-device-pci,chardev=bal0,virtio-id=5,num_vqs=3,config_size=8'],
      script: [
        "balloon_memtotal() { awk '/MemTotal/ { print $2 }' /proc/meminfo; }",
        'balloon_shrunk() { [ "$(balloon_memtotal)" -le $(( balloon_before - $1 )) ]; }',
        'balloon_before=$(balloon_memtotal)',
        'mark operator balloon',
        `wait_for 120 balloon_shrunk ${BALLOON_TARGET / 1024}`,
        'mark balloon_memtotal "$balloon_before $(balloon_memtotal)"',
        // Stay up a moment: the operator reads the daemon's status while the guest is attached.
        'sleep 3',
      ],
      summary: (m) => {
        const [before, after] = (m('balloon_memtotal') ?? '').split(' ').map(Number);
        return `balloon: MemTotal ${Math.round(before! / 1024)} MiB, after vhostctl set-target ${BALLOON_TARGET >> 20}M: ${Math.round(after! / 1024)} MiB`;
      },
      async operator() {
        const target = await vhostctl('--control', balloonControl, 'set-target', `${BALLOON_TARGET >> 20}M`);
        // The guest inflates meanwhile; the daemon's status shows the pages it punched out of the memfd.
        for (let i = 0; i < 120; i++) {
          const status = await vhostctl('--control', balloonControl, '--json', 'status');
          const state = (JSON.parse(status.stdout || '{}') as { state?: { actualPages?: number } }).state;
          if (status.status !== 0 || (state?.actualPages ?? 0) * 4096 >= BALLOON_TARGET) break;
          await new Promise((resolve) => setTimeout(resolve, 500));
        }
        return [target, await vhostctl('--control', balloonControl, 'status')];
      },
    },
  ];
  // The balloon needs QEMU 10.2; without it (the build failed, or VHOSTD_QEMU names another QEMU, e.g.
  // 7.2 as docs/testing.md describes) the others run on that QEMU.
  const other = process.env['VHOSTD_QEMU'];
  const qemu = other ? { missing: `VHOSTD_QEMU=${other} has no front-end for a vhost-user balloon` } : qemu102();
  if ('missing' in qemu) process.stdout.write(`no balloon in this demo: ${qemu.missing}\n`);
  const devices = everyDevice.filter(
    (d) => fs.existsSync(path.join(__dirname, '..', 'daemons', d.name, 'main.js')) && (d.name !== 'balloon' || 'binary' in qemu),
  );

  const daemons: RunningDaemon[] = [];
  try {
    for (const device of devices) daemons.push(await startDaemon(device.name, [...device.args, '--metrics', '0']));
    process.stdout.write(`started ${devices.map((d) => `vhost-user-${d.name}`).join(', ')}; booting the guest (TCG, ~10 s)...\n`);
    const operatorRuns: Promise<{ name: string; runs: VhostctlRun[] }>[] = [];
    const result = await runGuest({
      qemu: 'binary' in qemu ? qemu.binary : undefined,
      memory: '512M',
      qemuArgs: ['-smp', '2', ...devices.flatMap((d, i) => d.qemu(daemons[i]!.socketPath))],
      onConsoleLine: (line) => {
        const name = /VHOSTD-MARK operator=(\w+)/.exec(line)?.[1];
        const device = devices.find((d) => d.name === name);
        if (device?.operator !== undefined) operatorRuns.push(device.operator().then((runs) => ({ name: device.name, runs })));
      },
      script: devices.flatMap((d) => d.script).join('\n'),
      timeoutMs: 180_000,
    });
    process.stdout.write(`\nguest booted in ${((result.bootMs ?? 0) / 1000).toFixed(1)} s and says:\n`);
    for (const device of devices) process.stdout.write(`  ${device.summary((key) => result.mark(key))}\n`);
    for (const { name, runs } of await Promise.all(operatorRuns)) {
      process.stdout.write(`\nthe operator, while the guest ran (${name}'s control socket):\n`);
      for (const run of runs) process.stdout.write(`${`${run.stdout}${run.stderr}`.trimEnd().replace(/^/gm, '  ')}\n`);
      if (runs.some((r) => r.status !== 0)) throw new Error(`vhostctl failed on ${name}'s control socket`);
    }
    process.stdout.write('\ndaemon metrics (selected):\n');
    for (const [i, device] of devices.entries()) {
      const port = metricsPort(daemons[i]!);
      const text = port === undefined ? '' : await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      for (const line of text.split('\n')) {
        if (/^vhostd_(queue_(requests|written_bytes|read_bytes|kicks|notifications)_total|protocol_requests_total\{request="SET_MEM_TABLE"|net_(frames|bytes)_total|balloon_released_bytes_total)/.test(line)) {
          process.stdout.write(`  [${device.name}] ${line}\n`);
        }
      }
    }
    if (result.exitStatus !== 0) throw new Error(`guest script failed (status ${result.exitStatus}):\n${result.tail(30)}`);
  } finally {
    for (const daemon of daemons) await daemon.stop();
    network.close();
    fs.rmSync(work, { recursive: true, force: true });
  }
  process.stdout.write('\ndemo finished; daemons stopped.\n');
}

main().catch((err: Error) => {
  process.stderr.write(`demo failed: ${err.stack ?? err.message}\n`);
  process.exit(1);
});
