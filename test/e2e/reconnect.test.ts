/**
 * Restarting a daemon under a running guest, as an operator upgrade or systemd's Restart=on-failure
 * does: the daemon gets SIGTERM, a new process serves the same socket path two seconds later (on a
 * path it creates again, or on a listening socket that outlived the old one, as with systemd socket
 * activation), QEMU (chardev `reconnect`) connects again and sets the device up from scratch, and the
 * guest carries on after a pause.
 *
 * Host and guest meet through console markers: the guest prints `restart=now` and pauses for a second;
 * the host's onConsoleLine stops the daemon and starts the new one; the guest's next request, made
 * while no daemon runs, waits in its ring until the new daemon runs it (bounded by `timeout` and
 * `wait_for`). The new daemon's log and metrics show that it set up the device and did the I/O.
 *
 * The disk is idle when the daemon stops (the guest synced and waits): a request the old daemon had
 * taken but not completed is recovered through VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, tested with
 * SIGKILL under load in inflight.test.ts.
 *
 * net (no inflight area: QEMU gives vhost-user-net none) is replaced while the guest pings, after
 * SIGTERM or SIGKILL (three times in a row), with split and packed rings; a packed ring's position then comes from its
 * descriptor ring (lib/virtqueue/packed-position.ts).
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { ExecutionContext } from 'ava';

import { native } from '../../native';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { guestTest } from '../helpers/guest-test';
import { namespaceWithTap } from '../helpers/net-topology';
import { reconnectOption, runGuest, type GuestResult } from '../helpers/qemu-guest';

const MiB = 1 << 20;
const RESTART_MARKER = 'VHOSTD-MARK restart=now';

interface RestartOptions {
  /** Time with no daemon at all (systemd's RestartSec, an upgrade): the guest's requests wait in the ring. */
  readonly gapMs?: number;
  /** A listening socket the test keeps, handed to every daemon as systemd socket activation does. */
  readonly listenFd?: number;
  /** Run each daemon under this command (`ip netns exec NS`: net's TAP lives in a namespace). */
  readonly prefix?: readonly string[];
  /** How the first daemon ends: SIGTERM (an upgrade, the default) or SIGKILL (a crash). */
  readonly kill?: 'SIGTERM' | 'SIGKILL';
}

/** A daemon that the test replaces with a new process on the same socket path while the guest runs. */
class RestartingDaemon {
  current: RunningDaemon | undefined;
  /** The one stopped last, kept for its exit code and stderr. */
  previous: RunningDaemon | undefined;
  previousExit: number | null | undefined;
  restartMs: number | undefined;
  /** Restarts done or under way (one per marker line seen while none was under way). */
  restarts = 0;
  private restarting: Promise<void> | undefined;
  private busy = false;
  private failure: Error | undefined;

  constructor(
    private readonly device: string,
    private readonly args: readonly string[],
    readonly socketPath: string,
    private readonly options: RestartOptions = {},
  ) {}

  async start(): Promise<void> {
    this.current = await this.launch();
  }

  private launch(): Promise<RunningDaemon> {
    const { listenFd, prefix } = this.options;
    return startDaemon(this.device, this.args, 10_000, { socketPath: this.socketPath, listenFd, prefix });
  }

  /** From onConsoleLine: stop the daemon and start a new one; errors surface in `settle()`. */
  onLine(line: string): void {
    if (this.busy || !line.includes(RESTART_MARKER)) return;
    this.busy = true;
    this.restarts++;
    const begin = Date.now();
    this.restarting = (async () => {
      this.previous = this.current;
      this.current = undefined;
      if (this.options.kill === 'SIGKILL') this.previous!.process.kill('SIGKILL');
      this.previousExit = await this.previous!.stop();
      await new Promise((resolve) => setTimeout(resolve, this.options.gapMs ?? 0));
      this.current = await this.launch();
      this.restartMs = Date.now() - begin;
      this.busy = false;
    })().catch((err: Error) => {
      this.failure = err;
    });
  }

  /** Wait for a restart in progress; throws what it threw. */
  async settle(): Promise<void> {
    await this.restarting;
    if (this.failure !== undefined) throw this.failure;
  }

  /** Stop whatever runs; returns its exit code. */
  async stop(): Promise<number | null | undefined> {
    await this.restarting;
    return this.current?.stop();
  }

  get killed(): boolean {
    return this.options.kill === 'SIGKILL';
  }

  stderr(): string {
    return `--- first daemon ---\n${this.previous?.stderr() ?? this.current?.stderr() ?? ''}\n--- second daemon ---\n${this.previous !== undefined ? (this.current?.stderr() ?? '') : ''}`;
  }
}

function socketDir(device: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `vhostd-reconnect-${device}-`));
}

/** The value of a queue counter of the daemon's metrics, summed over queues. */
async function queueMetric(daemon: RunningDaemon, name: string): Promise<number> {
  const port = /metrics on http:\/\/127\.0\.0\.1:(\d+)/.exec(daemon.stderr())?.[1];
  if (port === undefined) throw new Error(`no metrics port in the daemon's log:\n${daemon.stderr()}`);
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  let sum = 0;
  for (const m of text.matchAll(new RegExp(`^${name}\\{[^}]*\\} (\\d+)`, 'gm'))) sum += Number(m[1]);
  return sum;
}

/** What an assertion failure should show: guest console tail, QEMU's stderr, both daemons' logs. */
function explain(result: GuestResult, daemon: RestartingDaemon): string {
  return `${result.tail(30)}\n--- QEMU stderr ---\n${result.qemuStderr.trim()}\n${daemon.stderr()}`;
}

function checkRestart(t: ExecutionContext, daemon: RestartingDaemon, why: string): void {
  t.truthy(daemon.previous, `the restart marker was never seen\n${why}`);
  // SIGTERM: a clean exit; SIGKILL: killed (no exit code).
  t.is(daemon.previousExit, daemon.killed ? null : 0, `the first daemon's exit\n${why}`);
  t.log(`daemon replaced in ${daemon.restartMs ?? '?'} ms`);
  // QEMU connected to the new process and set the device up again.
  t.regex(daemon.current?.stderr() ?? '', /front-end connected/, why);
  t.regex(daemon.current?.stderr() ?? '', /request SET_VRING_KICK/, why);
}

/*
 * QEMU cannot do this yet, whatever the back-end does (10.0.2, the default here, and 10.2.2, built by
 * scripts/qemu-10.2.sh, behave the same):
 * - vhost-user-rng-pci's realize does not wait for its chardev, and with `reconnect` the chardev
 *   connects asynchronously, after realize: QEMU 10.0.2 and 10.2.2 exit at start-up with "Failed to set
 *   msg fds. vhost_backend_init failed: Protocol error"; 7.2 aborts there (`*errp == NULL` assertion).
 *   vhost-user-blk waits for the connection (qemu_chr_fe_wait_connected) and has no such problem.
 * - Hot-plugged (device_add) once the chardev has connected, the device works on 10.0.2 and 10.2.2, but
 *   on the daemon's restart vhost-user-base's disconnect handler frees the vhost device
 *   (vhost_dev_cleanup) and its connect handler starts it again without vhost_dev_init: QEMU aborts
 *   ("vhost_dev_start: Assertion `hdev->vhost_ops' failed") as the new daemon accepts, before sending
 *   it anything. QEMU master's hw/virtio/vhost-user-base.c reads the same.
 * So the test is registered as a known failure; it reports itself once a QEMU gets it right (run it
 * with VHOSTD_QEMU set to a newer QEMU to check one).
 */
guestTest('rng: the guest keeps reading /dev/hwrng across a daemon restart', async (t) => {
  const dir = socketDir('rng');
  const daemon = new RestartingDaemon('rng', ['--metrics', '0', '--log-level', 'debug'], path.join(dir, 'rng.sock'), { gapMs: 2000 });
  try {
    await daemon.start();
    const result = await runGuest({
      qemuArgs: ['-chardev', `socket,id=rng0,path=${daemon.socketPath},${reconnectOption()}`, '-device', 'vhost-user-rng-pci,chardev=rng0'],
      timeoutMs: 60_000,
      onConsoleLine: (line) => daemon.onLine(line),
      script: `
set -e
dd if=/dev/hwrng of=/tmp/a bs=4096 count=4 2>/dev/null
mark before "$(wc -c < /tmp/a)"
mark restart now
# The host is stopping the daemon now (SIGTERM takes milliseconds); a read from here on waits in the
# ring until QEMU has reconnected to the new one. Each try is bounded; the whole wait too.
sleep 1
t0=$(cut -d" " -f1 /proc/uptime)
wait_for 30 sh -c 'timeout 10 dd if=/dev/hwrng of=/tmp/b bs=4096 count=16 2>/dev/null && [ "$(wc -c < /tmp/b)" -eq 65536 ]'
t1=$(cut -d" " -f1 /proc/uptime)
mark waited "$(echo "$t0 $t1" | awk '{print $2 - $1}')"
mark after "$(wc -c < /tmp/b)"
mark distinct "$(od -An -v -tu1 /tmp/b | tr -s " " "\\n" | grep -v "^$" | sort -u | wc -l)"
# And again, plainly: the device stays usable.
mark again "$(dd if=/dev/hwrng bs=4096 count=4 2>/dev/null | wc -c)"
`,
    });
    await daemon.settle();
    const why = explain(result, daemon);
    t.is(result.exitStatus, 0, why);
    checkRestart(t, daemon, why);
    t.log(`guest waited ${result.mark('waited') ?? '?'} s for its first read after the restart`);
    t.is(result.mark('before'), '16384', why);
    t.is(result.mark('after'), '65536', why);
    t.true(Number(result.mark('distinct')) > 250, `only ${result.mark('distinct')} distinct byte values\n${why}`);
    t.is(result.mark('again'), '16384', why);
    // The bytes after the restart came from the new process.
    t.true((await queueMetric(daemon.current!, 'vhostd_queue_written_bytes_total')) >= 65536 + 16384, why);
  } finally {
    t.is(await daemon.stop(), 0, daemon.stderr());
    fs.rmSync(dir, { recursive: true, force: true });
  }
}, { knownFailure: "QEMU's vhost-user-rng cannot reconnect (start-up and reconnect bugs, see above)" });

/**
 * The guest wrote 4 MiB before the restart (mark `one`, at 1 MiB of the disk) and 4 MiB after it
 * (`two`, at 16 MiB): both read back in the guest (`one_back`, `two_back`) and the host image holds them.
 */
function checkDataAcrossRestart(t: ExecutionContext, result: GuestResult, image: string, why: string): void {
  const one = result.mark('one');
  const two = result.mark('two');
  t.truthy(one, why);
  t.truthy(two, why);
  t.is(result.mark('one_back'), one, why);
  t.is(result.mark('two_back'), two, why);
  const file = fs.readFileSync(image);
  const md5 = (from: number): string => createHash('md5').update(file.subarray(from, from + 4 * MiB)).digest('hex');
  t.is(md5(1 * MiB), one ?? '', 'host file holds the data written before the restart');
  t.is(md5(16 * MiB), two ?? '', 'host file holds the data written after the restart');
}

/**
 * blk across a restart. With `activation`, the test holds the listening socket, as a systemd socket
 * unit does, and hands it to each daemon (`--fd`): the path never goes away, QEMU's reconnect succeeds at
 * once and its first requests wait in the socket until the new daemon reads them.
 */
async function blkRestart(t: ExecutionContext, activation: boolean): Promise<void> {
  const dir = socketDir('blk');
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 32 * MiB);
  const socketPath = path.join(dir, 'blk.sock');
  const listenFd = activation ? native.listenUnix(socketPath, 1) : undefined;
  const args = ['--file', image, '--metrics', '0', '--log-level', 'debug'];
  const daemon = new RestartingDaemon('blk', args, socketPath, { gapMs: 2000, listenFd });
  try {
    await daemon.start();
    const result = await runGuest({
      qemuArgs: [
        '-chardev', `socket,id=blk0,path=${daemon.socketPath},${reconnectOption()}`,
        '-device', 'vhost-user-blk-pci,chardev=blk0',
      ],
      timeoutMs: 60_000,
      onConsoleLine: (line) => daemon.onLine(line),
      script: `
set -e
md5() { md5sum | cut -d" " -f1; }
# 4 MiB at 1 MiB, on the disk (fsync) before the restart.
dd if=/dev/urandom of=/tmp/one bs=65536 count=64 2>/dev/null
dd if=/tmp/one of=/dev/vda bs=65536 seek=16 conv=notrunc,fsync 2>/dev/null
sync
mark one "$(md5 < /tmp/one)"
# The disk is idle from here: the host restarts the daemon.
mark restart now
sleep 1
# The first request after the restart waits in the ring until the new daemon runs it.
t0=$(cut -d" " -f1 /proc/uptime)
wait_for 30 timeout 10 dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null
t1=$(cut -d" " -f1 /proc/uptime)
mark waited "$(echo "$t0 $t1" | awk '{print $2 - $1}')"
echo 3 > /proc/sys/vm/drop_caches
mark one_back "$(dd if=/dev/vda bs=65536 skip=16 count=64 2>/dev/null | md5)"
# More data through the new daemon: 4 MiB at 16 MiB, then both regions again from the device.
dd if=/dev/urandom of=/tmp/two bs=65536 count=64 2>/dev/null
dd if=/tmp/two of=/dev/vda bs=65536 seek=256 conv=notrunc,fsync 2>/dev/null
mark two "$(md5 < /tmp/two)"
echo 3 > /proc/sys/vm/drop_caches
mark two_back "$(dd if=/dev/vda bs=65536 skip=256 count=64 2>/dev/null | md5)"
mark one_again "$(dd if=/dev/vda bs=65536 skip=16 count=64 2>/dev/null | md5)"
`,
    });
    await daemon.settle();
    const why = explain(result, daemon);
    t.is(result.exitStatus, 0, why);
    checkRestart(t, daemon, why);
    // INFLIGHT_SHMFD: the first daemon made the inflight area, QEMU kept it and handed it to the second.
    t.regex(daemon.previous?.stderr() ?? '', /request GET_INFLIGHT_FD/, why);
    t.regex(daemon.current?.stderr() ?? '', /request SET_INFLIGHT_FD/, why);
    t.log(`guest waited ${result.mark('waited') ?? '?'} s for its first request after the restart`);
    checkDataAcrossRestart(t, result, image, why);
    t.is(result.mark('one_again'), result.mark('one'), why);
    // The reads and writes after the restart went through the new process: 4 MiB + 4 KiB read back
    // at least twice over, 4 MiB written.
    t.true((await queueMetric(daemon.current!, 'vhostd_queue_written_bytes_total')) >= 8 * MiB, why);
    t.true((await queueMetric(daemon.current!, 'vhostd_queue_read_bytes_total')) >= 4 * MiB, why);
  } finally {
    t.is(await daemon.stop(), 0, daemon.stderr());
    if (listenFd !== undefined) native.close(listenFd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

guestTest('blk: data written before a daemon restart reads back after it, and new writes land', (t) => blkRestart(t, false));

guestTest('blk under socket activation (--fd, the socket outlives the daemon): the same across a restart', (t) =>
  blkRestart(t, true),
);

/**
 * scsi across a restart, split or packed rings: the guest's disk stays (QEMU reconnects and sets the
 * rings up again), data written before reads back after, new writes go through the new daemon.
 */
async function scsiRestart(t: ExecutionContext, packed: boolean): Promise<void> {
  const dir = socketDir('scsi');
  const image = path.join(dir, 'lun0.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 32 * MiB);
  const socketPath = path.join(dir, 'scsi.sock');
  const daemon = new RestartingDaemon('scsi', ['--lun', `0=${image}`, '--metrics', '0', '--log-level', 'debug'], socketPath, { gapMs: 2000 });
  try {
    await daemon.start();
    const result = await runGuest({
      qemuArgs: [
        '-chardev', `socket,id=scsi0,path=${daemon.socketPath},${reconnectOption()}`,
        '-device', `vhost-user-scsi-pci,chardev=scsi0${packed ? ',packed=on' : ''}`,
      ],
      timeoutMs: 90_000,
      onConsoleLine: (line) => daemon.onLine(line),
      script: `
set -e
md5() { md5sum | cut -d" " -f1; }
wait_for 60 sh -c 'ls /sys/class/scsi_disk/*:0:0:0/device/block >/dev/null 2>&1'
D=/dev/$(ls /sys/class/scsi_disk/*:0:0:0/device/block)
# Feature bit 34 (VIRTIO_F_RING_PACKED) as the guest driver negotiated it: character 35 of the bit string.
for v in /sys/bus/virtio/devices/*; do if [ "$(cat $v/device)" = 0x0008 ]; then mark packed "$(cut -c35 $v/features)"; fi; done
dd if=/dev/urandom of=/tmp/one bs=65536 count=64 2>/dev/null
dd if=/tmp/one of=$D bs=65536 seek=16 conv=notrunc,fsync 2>/dev/null
mark one "$(md5 < /tmp/one)"
mark restart now
sleep 1
t0=$(cut -d" " -f1 /proc/uptime)
wait_for 30 timeout 10 dd if=$D of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null
t1=$(cut -d" " -f1 /proc/uptime)
mark waited "$(echo "$t0 $t1" | awk '{print $2 - $1}')"
echo 3 > /proc/sys/vm/drop_caches
mark one_back "$(dd if=$D bs=65536 skip=16 count=64 2>/dev/null | md5)"
dd if=/dev/urandom of=/tmp/two bs=65536 count=64 2>/dev/null
dd if=/tmp/two of=$D bs=65536 seek=256 conv=notrunc,fsync 2>/dev/null
mark two "$(md5 < /tmp/two)"
echo 3 > /proc/sys/vm/drop_caches
mark two_back "$(dd if=$D bs=65536 skip=256 count=64 2>/dev/null | md5)"
`,
    });
    await daemon.settle();
    const why = explain(result, daemon);
    t.is(result.exitStatus, 0, why);
    checkRestart(t, daemon, why);
    t.is(result.mark('packed'), packed ? '1' : '0', `the driver negotiated ${packed ? 'packed' : 'split'} rings\n${why}`);
    checkDataAcrossRestart(t, result, image, why);
    t.true((await queueMetric(daemon.current!, 'vhostd_queue_written_bytes_total')) >= 4 * MiB, why);
  } finally {
    t.is(await daemon.stop(), 0, daemon.stderr());
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/*
 * Packed rings across a back-end that went away: QEMU asks the old daemon for the ring state
 * (GET_VRING_BASE) only while it is connected; once it is gone, virtio_queue_packed_restore_last_avail_idx
 * (hw/virtio/virtio.c) restores nothing ("We don't have a reference like avail idx in shared memory"),
 * so the new daemon is told the base of the last start. The ring position comes from the inflight
 * area instead (QueueRegionPacked's used index and wrap counter, kept over a daemon exit). And a
 * request the guest sent while the daemon was away completes before QEMU installs its irqfd (the
 * last SET_VRING_CALL): the new call fd is signalled once (vring.ts setFd), or the guest waits forever.
 */
guestTest('scsi with packed rings (packed=on): data written before a daemon restart reads back after it', (t) => scsiRestart(t, true));
guestTest('scsi with split rings: data written before a daemon restart reads back after it', (t) => scsiRestart(t, false));

const NET_HOST_IP = '10.78.4.1';
const NET_GUEST_IP = '10.78.4.2';
const AFTER_PINGS = 600;

/**
 * net across a restart: the guest pings the TAP side before, while (a flood in the background) and
 * after the daemon is replaced. Without an inflight area (QEMU gives net none) a split ring resumes at
 * its used index; a packed ring at the position the new daemon reads from its descriptor ring, as QEMU
 * sends the base of the last start (packed-ring.ts, recoverPackedPosition). 600 pings of 1000 bytes
 * after the restart wrap both rings (256 entries) twice over: every one must come back, which a device
 * and a driver that disagree about the ring position cannot do.
 */
async function netRestart(t: ExecutionContext, packed: boolean, kill: 'SIGTERM' | 'SIGKILL', restarts: number): Promise<void> {
  const { namespace, tap } = namespaceWithTap(t, `${NET_HOST_IP}/24`);
  const dir = socketDir('net');
  const daemon = new RestartingDaemon('net', ['--tap', tap, '--log-level', 'debug'], path.join(dir, 'net.sock'), {
    prefix: ['ip', 'netns', 'exec', namespace],
    kill,
  });
  try {
    await daemon.start();
    const result = await runGuest({
      qemuArgs: [
        '-chardev', `socket,id=c0,path=${daemon.socketPath},${reconnectOption()}`,
        '-netdev', 'vhost-user,id=n0,chardev=c0',
        '-device', `virtio-net-pci,netdev=n0,mac=52:54:00:78:04:02${packed ? ',packed=on' : ''}`,
      ],
      timeoutMs: 240_000,
      onConsoleLine: (line) => daemon.onLine(line),
      script: `
ip link set eth0 up
ip addr add ${NET_GUEST_IP}/24 dev eth0
# Feature bit 34 (VIRTIO_F_RING_PACKED) as the guest driver negotiated it: character 35 of the bit string.
for v in /sys/bus/virtio/devices/*; do if [ "$(cat $v/device)" = 0x0001 ]; then mark packed "$(cut -c35 $v/features)"; fi; done
section before ping -c 100 -i 0.02 -W 60 ${NET_HOST_IP}
for round in $(seq ${restarts}); do
  # The daemon goes away with frames in flight both ways.
  ping -c 400 -i 0.01 ${NET_HOST_IP} > /tmp/during 2>&1 &
  sleep 1
  mark restart now
  wait
  mark during "$(grep -o "[0-9]* packets received" /tmp/during)"
  # Until the new daemon runs, pings go nowhere; then every one comes back.
  wait_for 120 ping -c 1 -W 2 ${NET_HOST_IP} > /dev/null
done
section after ping -c ${AFTER_PINGS} -i 0.01 -s 1000 -W 60 ${NET_HOST_IP}
`,
    });
    await daemon.settle();
    const why = explain(result, daemon);
    t.is(result.exitStatus, 0, why);
    checkRestart(t, daemon, why);
    t.is(result.mark('packed'), packed ? '1' : '0', `the driver negotiated ${packed ? 'packed' : 'split'} rings\n${why}`);
    t.regex(result.section('before')?.output ?? '', /100 packets transmitted, 100 packets received/, why);
    t.is(daemon.restarts, restarts, why);
    t.log(`pings sent while the daemon was replaced (the last time): ${result.mark('during') ?? '?'} of 400`);
    // The rings were well past their first slots: a packed one resumed where its descriptors said.
    if (packed) t.regex(daemon.current?.stderr() ?? '', /packed ring resumes at slot \d+ wrap \d as its descriptor ring shows/, why);
    t.regex(result.section('after')?.output ?? '', new RegExp(`${AFTER_PINGS} packets transmitted, ${AFTER_PINGS} packets received`), why);
  } finally {
    await daemon.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

guestTest('net with split rings: traffic resumes after a daemon restart (SIGTERM)', (t) => netRestart(t, false, 'SIGTERM', 1));
guestTest('net with packed rings (packed=on): traffic resumes after the daemon is SIGKILLed and restarted, three times', (t) =>
  netRestart(t, true, 'SIGKILL', 3),
);
guestTest('net with packed rings (packed=on): traffic resumes after a daemon restart (SIGTERM)', (t) => netRestart(t, true, 'SIGTERM', 1));
