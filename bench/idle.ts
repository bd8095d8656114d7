/**
 * `npm run bench:idle`: what an idle guest costs each daemon (issue 12: under 1% of a core). Boots the
 * test guest (test/helpers/qemu-guest.ts, as the e2e tests and `npm run demo` do) with blk, scsi, net
 * and rng attached, and the balloon when QEMU 10.2 is there (its only front-end). The guest sets every
 * device up and uses it once (a read from each disk and from /dev/hwrng, a ping through the TAP),
 * marks that it is idle and sleeps. The host waits `--settle` seconds, then reads each daemon's
 * utime+stime from /proc/PID/stat over `--window` seconds and prints % of one core per daemon, with
 * `--poll-us 0` and with `--poll-us N`, one guest boot per set-up, alternating over `--rounds`. The
 * daemons' metrics, scraped just before and after the window, show the requests the guest still made
 * and the time spent polling: polling must stop when the guest is idle.
 *
 *   node build/bench/idle.js [--rounds 2] [--window 10] [--settle 5] [--poll-us 64] [--out FILE]
 *                            [--no-metrics]  (daemons without --metrics: prom-client's event-loop
 *                                             delay monitor wakes a daemon every 100 ms; no request
 *                                             and poll counts then)
 *   (--poll-us defaults to the daemons' own default)
 *
 * Needs root (a TAP on a bridge, as the demo). A benchmark check, not a test: it prints the numbers
 * and the verdict, and exits 1 only when something failed to run. Results: build/bench/idle-results.json.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { DEFAULT_POLL_US } from '../lib/cli/common-options';
import { startDaemon, type RunningDaemon } from '../test/helpers/daemon';
import { createBridgedTap } from '../test/helpers/net-topology';
import { qemu102, runGuest } from '../test/helpers/qemu-guest';
import { Scrape } from '../test/helpers/scrape';
import { ArgReader, buildDir, fmt, formatTable, median, range, runMain, sleep, statCpuSeconds, usage, writeResults } from './common';

/** What issue 12 allows an idle guest to cost a daemon, in % of one core. */
const BUDGET_PCT = 1;

interface Options {
  rounds: number;
  windowS: number;
  settleS: number;
  pollUs: number;
  out: string;
  /** Start the daemons without --metrics (no counts over the window). */
  noMetrics: boolean;
}

interface IdleDevice {
  name: string;
  /** Daemon arguments (beyond --socket-path), files made in `work`. */
  args: string[];
  qemu(socketPath: string): string[];
  /** Guest shell lines that set the device up and use it once. */
  script: string[];
}

/** One daemon over one window. */
interface Sample {
  device: string;
  pollUs: number;
  round: number;
  cpuPct: number;
  /** Over the window, from the daemon's metrics. */
  requests: number;
  kicks: number;
  /** Time polled over the window, and since the daemon started (boot and set-up included), µs. */
  polledUs: number;
  polledUsTotal: number;
}

function parseOptions(argv: string[]): Options {
  const o: Options = { rounds: 2, windowS: 10, settleS: 5, pollUs: DEFAULT_POLL_US, out: path.join(buildDir, 'idle-results.json'), noMetrics: false };
  const args = new ArgReader(argv);
  for (let arg = args.next(); arg !== undefined; arg = args.next()) {
    switch (arg) {
      case '--rounds': o.rounds = Math.max(1, Math.floor(args.nonNegative())); break;
      case '--window': o.windowS = Math.max(1, args.nonNegative()); break;
      case '--settle': o.settleS = args.nonNegative(); break;
      case '--poll-us': o.pollUs = Math.floor(args.nonNegative()); break;
      case '--out': o.out = path.resolve(args.value()); break;
      case '--no-metrics': o.noMetrics = true; break;
      case '--help': case '-h': return usage(__filename);
      default: throw new Error(`unknown option ${arg} (see --help)`);
    }
  }
  return o;
}

function log(message: string): void {
  process.stderr.write(`bench:idle: ${message}\n`);
}

function devices(work: string, tap: string, peer: string, balloon: boolean): IdleDevice[] {
  const image = path.join(work, 'disk.img');
  const lun = path.join(work, 'lun0.img');
  for (const f of [image, lun]) {
    fs.writeFileSync(f, '');
    fs.truncateSync(f, 64 << 20);
  }
  const list: IdleDevice[] = [
    {
      name: 'rng',
      args: [],
      qemu: (s) => ['-chardev', `socket,id=rng0,path=${s}`, '-device', 'vhost-user-rng-pci,chardev=rng0'],
      script: ['dd if=/dev/hwrng of=/dev/null bs=16 count=1 2>/dev/null'],
    },
    {
      name: 'blk',
      args: ['--file', image, '--num-queues', '2'],
      qemu: (s) => ['-chardev', `socket,id=blk0,path=${s}`, '-device', 'vhost-user-blk-pci,chardev=blk0,num-queues=2'],
      script: ['wait_for 30 test -b /dev/vda', 'dd if=/dev/vda of=/dev/null bs=4096 count=16 2>/dev/null'],
    },
    {
      name: 'scsi',
      args: ['--lun', `0=${lun}`, '--num-queues', '2'],
      qemu: (s) => ['-chardev', `socket,id=scsi0,path=${s}`, '-device', 'vhost-user-scsi-pci,chardev=scsi0,num_queues=2'],
      script: [
        `wait_for 30 sh -c '[ -n "$(ls /sys/class/scsi_disk 2>/dev/null)" ]'`,
        'dd if=/dev/$(ls /sys/class/scsi_disk/*/device/block) of=/dev/null bs=4096 count=16 2>/dev/null',
      ],
    },
    {
      name: 'net',
      args: ['--tap', tap],
      qemu: (s) => ['-chardev', `socket,id=net0,path=${s}`, '-netdev', 'vhost-user,id=n0,chardev=net0', '-device', 'virtio-net-pci,netdev=n0,mac=52:54:00:79:0a:02'],
      script: ['ip link set eth0 up', `ip addr add ${peer.replace(/\.1$/, '.2')}/24 dev eth0`, `ping -c 1 -W 30 ${peer} >/dev/null`],
    },
  ];
  if (balloon) {
    list.push({
      name: 'balloon',
      args: [],
      qemu: (s) => ['-chardev', `socket,id=bal0,path=${s}`, '-device', 'vhost-user-test-device-pci,chardev=bal0,virtio-id=5,num_vqs=3,config_size=8'],
      script: [],
    });
  }
  return list;
}

/** The daemon's Prometheus port, from what it logged at start (`--metrics 0`). */
async function scrape(daemon: RunningDaemon): Promise<Scrape> {
  const port = /metrics on http:\/\/127\.0\.0\.1:(\d+)/.exec(daemon.stderr())?.[1];
  if (port === undefined) throw new Error(`no metrics port in the daemon's log: ${daemon.stderr()}`);
  return Scrape.fromText(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text());
}

/** One guest boot with every device on daemons started with `--poll-us pollUs`; a sample per daemon. */
async function measureRound(o: Options, pollUs: number, round: number, qemu: { binary: string } | { missing: string }): Promise<Sample[]> {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-bench-idle-'));
  const peer = '10.79.10.1';
  const network = createBridgedTap(`vhidle${process.pid % 10000}`, '02:00:00:00:79:0a', `${peer}/24`);
  const list = devices(work, network.tap, peer, 'binary' in qemu);
  const daemons: RunningDaemon[] = [];
  try {
    for (const d of list) daemons.push(await startDaemon(d.name, [...d.args, '--poll-us', String(pollUs), ...(o.noMetrics ? [] : ['--metrics', '0'])]));
    let measured: Promise<Sample[]> | undefined;
    const measure = async (): Promise<Sample[]> => {
      await sleep(o.settleS * 1000);
      const scrapeAll = () => (o.noMetrics ? undefined : Promise.all(daemons.map(scrape)));
      const before = await scrapeAll();
      const cpu0 = daemons.map((d) => statCpuSeconds(`/proc/${d.process.pid}/stat`)!);
      const t0 = performance.now();
      await sleep(o.windowS * 1000);
      const cpu1 = daemons.map((d) => statCpuSeconds(`/proc/${d.process.pid}/stat`)!);
      const wall = (performance.now() - t0) / 1000;
      const after = await scrapeAll();
      return list.map((d, i) => {
        const delta = (name: string) => (after && before ? after[i]!.sum(name) - before[i]!.sum(name) : NaN);
        return {
          device: d.name,
          pollUs,
          round,
          cpuPct: (100 * (cpu1[i]! - cpu0[i]!)) / wall,
          requests: delta('vhostd_queue_requests_total'),
          kicks: delta('vhostd_queue_kicks_total'),
          polledUs: 1e6 * delta('vhostd_queue_poll_seconds_total'),
          polledUsTotal: after ? 1e6 * after[i]!.sum('vhostd_queue_poll_seconds_total') : NaN,
        };
      });
    };
    // The guest sleeps through the settling time, the window and the scrapes, with room to spare.
    const idleS = Math.ceil(o.settleS + o.windowS + 10);
    const result = await runGuest({
      qemu: 'binary' in qemu ? qemu.binary : undefined,
      memory: '512M',
      qemuArgs: ['-smp', '1', ...list.flatMap((d, i) => d.qemu(daemons[i]!.socketPath))],
      script: [...list.flatMap((d) => d.script), 'mark idle yes', `sleep ${idleS}`].join('\n'),
      onConsoleLine: (line) => {
        if (line.includes('VHOSTD-MARK idle=yes')) measured ??= measure();
      },
      timeoutMs: 180_000 + idleS * 1000,
    });
    if (result.exitStatus !== 0 || measured === undefined) throw new Error(`guest script failed (status ${result.exitStatus}):\n${result.tail(30)}`);
    return await measured;
  } finally {
    for (const daemon of daemons) await daemon.stop();
    network.close();
    fs.rmSync(work, { recursive: true, force: true });
  }
}

async function main(o: Options): Promise<number> {
  fs.mkdirSync(buildDir, { recursive: true });
  const other = process.env['VHOSTD_QEMU'];
  const qemu = other ? { missing: `VHOSTD_QEMU=${other} has no front-end for a vhost-user balloon` } : qemu102();
  if ('missing' in qemu) log(`no balloon: ${qemu.missing}`);
  const loadavgStart = os.loadavg();
  const settings = [0, o.pollUs];
  const samples: Sample[] = [];
  for (let round = 0; round < o.rounds; round++) {
    // Alternate which set-up goes first, so drift in the machine's load hits both alike.
    for (const pollUs of round % 2 === 0 ? settings : [...settings].reverse()) {
      log(`round ${round + 1}/${o.rounds}, --poll-us ${pollUs}: booting the guest`);
      const got = await measureRound(o, pollUs, round, qemu);
      samples.push(...got);
      log(got.map((s) => `${s.device} ${fmt(s.cpuPct, 2)}%`).join(', '));
    }
  }

  const names = [...new Set(samples.map((s) => s.device))];
  const header = ['daemon', ...settings.flatMap((p) => [`--poll-us ${p}: % core (median)`, 'rounds', 'requests', 'polled µs', 'polled µs since start'])];
  const body = names.map((name) => [
    name,
    ...settings.flatMap((p) => {
      const mine = samples.filter((s) => s.device === name && s.pollUs === p);
      return [fmt(median(mine.map((s) => s.cpuPct)), 2), range(mine.map((s) => s.cpuPct), 2), range(mine.map((s) => s.requests)), range(mine.map((s) => s.polledUs)), range(mine.map((s) => s.polledUsTotal))];
    }),
  ]);
  const worst = Math.max(...samples.map((s) => s.cpuPct));
  const la = (l: number[]) => l.map((x) => x.toFixed(1)).join(' ');
  process.stdout.write(
    [
      `Idle guest, every device set up and used once; daemon CPU (utime+stime, /proc/PID/stat) over ${o.windowS} s after ${o.settleS} s of settling, ${o.rounds} round(s)` +
        `, daemons ${o.noMetrics ? 'without' : 'with'} --metrics`,
      ...formatTable(header, body),
      `"requests" and "polled µs" are the daemon's own metrics over the window (vhostd_queue_requests_total, vhostd_queue_poll_seconds_total); "since start" includes the boot.`,
      `highest sample ${fmt(worst, 2)}% of a core: ${worst < BUDGET_PCT ? 'under' : 'NOT under'} the ${BUDGET_PCT}% budget of issue 12`,
      `machine: ${os.cpus().length} CPUs, load average ${la(loadavgStart)} at start, ${la(os.loadavg())} at end`,
    ].join('\n') + '\n',
  );
  writeResults(o.out, { date: new Date().toISOString(), config: o, loadavg_at_start: loadavgStart, loadavg_at_end: os.loadavg(), samples });
  return 0;
}

runMain(parseOptions, main, log);
