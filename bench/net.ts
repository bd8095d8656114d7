/**
 * `npm run bench:net`: vhost-user-net packet rates and CPU cost, our daemon against DPDK's vhost PMD
 * bridged to a TAP (`dpdk-testpmd --vdev net_vhost0 --vdev net_tap0 --forward-mode=io`), in one run on
 * the same machine, driven by the same generator (net-loadgen, bench/loadgen: a C front-end that plays
 * the guest) with the same TAP setup: a TAP in a network namespace this runner creates, the back-end
 * and the generator run in it.
 *
 * Cases: tx at 64 and 1514 bytes (the guest's ring kept full; counted by the TAP's rx_packets, what
 * reached the kernel), rx at 64 and 1514 bytes (frames injected into the TAP with AF_PACKET from the
 * namespace side, at most --window not yet received; counted by the guest), tx of 64 KiB TSO frames
 * (Gbit/s). Each round starts each back-end fresh and runs every case on it; rounds alternate which
 * back-end goes first. Prints medians with min-max spread, ours/DPDK and back-end CPU per packet
 * (/proc/PID/stat utime+stime over the measured window). DPDK busy-polls a core whatever the load:
 * its CPU per packet is that core divided by the packets.
 *
 *   node build/bench/net.js [--runtime 3] [--warmup 1] [--repeat 3] [--only ours|dpdk]
 *                           [--cases tx64,tx1514,rx64,rx1514,tso] [--window 256] [--poll]
 *                           [--daemon-arg ARG ...] [--out build/bench/net-results.json] [--verbose]
 *
 * --daemon-arg (repeatable) goes to our daemon's command line, e.g. `--daemon-arg --no-tx-uring`.
 *
 * Needs root (network namespace, TAP, AF_PACKET), dpdk-testpmd (Debian: apt-get install dpdk-dev
 * librte-net-vhost23 librte-net-tap23 librte-mempool-ring23) and 2 MiB hugepages, which it sets up:
 * echo 512 > /proc/sys/vm/nr_hugepages; mount -t hugetlbfs nodev /dev/hugepages.
 * Exit status: 0 when every measurement ran, 1 when something failed to run.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { ArgReader, buildDir, buildLoadgens, fmt, formatTable, medianBy, root, runCapture, runMain, sleep, startBackend, stopBackend, tail, usage, writeResults, type Started } from './common';

const loadgenBin = path.join(buildDir, 'net-loadgen');
const daemonMain = path.join(root, 'build', 'daemons', 'net', 'main.js');
const hugeDir = '/dev/hugepages';

type Backend = 'ours' | 'dpdk';
const BACKENDS: Backend[] = ['ours', 'dpdk'];
const CASES = {
  tx64: ['--mode', 'tx', '--frame-size', '64'],
  tx1514: ['--mode', 'tx', '--frame-size', '1514'],
  rx64: ['--mode', 'rx', '--frame-size', '64'],
  rx1514: ['--mode', 'rx', '--frame-size', '1514'],
  tso: ['--mode', 'tx', '--tso'],
} as const;
type Case = keyof typeof CASES;

interface Options {
  runtime: number;
  warmup: number;
  repeat: number;
  backends: Backend[];
  cases: Case[];
  window: number;
  poll: boolean;
  daemonArgs: string[];
  out: string;
  verbose: boolean;
}

/** What net-loadgen prints (the fields used here; the JSON file keeps all). */
interface LoadgenResult {
  mode: 'tx' | 'rx';
  runtime_s: number;
  packets: number;
  pps: number;
  gbit_s: number;
  tap?: { rx_packets: number; rx_dropped: number; tx_packets: number; tx_dropped: number };
  backend_cpu_s: number | null;
  [key: string]: unknown;
}

/** One run of one case, as compared: packets per second delivered, and the back-end's CPU per packet. */
interface Run {
  pps: number;
  gbitS: number;
  cpuNsPerPacket: number | null;
  loadgen: LoadgenResult;
}

function log(message: string): void {
  process.stderr.write(`bench:net: ${message}\n`);
}

function parseOptions(argv: string[]): Options {
  const o: Options = {
    runtime: 3, warmup: 1, repeat: 3, backends: BACKENDS, cases: Object.keys(CASES) as Case[], window: 256, poll: false, daemonArgs: [],
    out: path.join(buildDir, 'net-results.json'), verbose: false,
  };
  const args = new ArgReader(argv);
  for (let arg = args.next(); arg !== undefined; arg = args.next()) {
    switch (arg) {
      case '--runtime': o.runtime = args.positive(); break;
      case '--warmup': o.warmup = args.nonNegative(); break;
      case '--repeat': o.repeat = Math.floor(args.positive()); break;
      case '--window': o.window = Math.floor(args.positive()); break;
      case '--poll': o.poll = true; break;
      case '--daemon-arg': o.daemonArgs.push(args.value()); break;
      case '--out': o.out = path.resolve(args.value()); break;
      case '--verbose': case '-v': o.verbose = true; break;
      case '--only': {
        const v = args.value();
        if (v !== 'ours' && v !== 'dpdk') throw new Error('--only takes ours or dpdk');
        o.backends = [v];
        break;
      }
      case '--cases':
        o.cases = args.value().split(',').map((c) => {
          if (!(c in CASES)) throw new Error(`unknown case ${c} (${Object.keys(CASES).join(', ')})`);
          return c as Case;
        });
        break;
      case '--help': case '-h': return usage(__filename);
      default: throw new Error(`unknown option ${arg} (see --help)`);
    }
  }
  return o;
}

function run(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error) throw new Error(`${cmd}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr.trim()}`);
}

/**
 * 2 MiB hugepages for DPDK: at least 512 reserved and hugetlbfs mounted, or the commands to run.
 * Returns the restore step: the reservation as it was (testpmd runs with --huge-unlink, so its
 * pages go back when it exits and nothing stays behind in the hugetlbfs).
 */
function setUpHugepages(): () => void {
  const nr = '/proc/sys/vm/nr_hugepages';
  const before = fs.readFileSync(nr, 'utf8').trim();
  if (Number(before) < 512) fs.writeFileSync(nr, '512');
  if (Number(fs.readFileSync(nr, 'utf8')) < 256) throw new Error(`could not reserve hugepages: echo 512 > ${nr}`);
  const mounted = fs.readFileSync('/proc/mounts', 'utf8').split('\n').some((l) => l.split(' ')[1] === hugeDir && l.split(' ')[2] === 'hugetlbfs');
  if (!mounted) {
    fs.mkdirSync(hugeDir, { recursive: true });
    run('mount', ['-t', 'hugetlbfs', 'nodev', hugeDir]);
  }
  return () => fs.writeFileSync(nr, before);
}

/** The network namespace and the TAPs: ours persistent (multi_queue vnet_hdr), DPDK's made by its tap PMD. */
class Namespace {
  readonly name = `vhostd-bench-${process.pid}`;
  readonly oursTap = 'vhb-ours';
  readonly dpdkTap = 'vhb-dpdk';

  create(): void {
    run('ip', ['netns', 'add', this.name]);
    run('ip', ['-n', this.name, 'link', 'set', 'lo', 'up']);
    // No IPv6 autoconfiguration chatter on the TAPs: only the generator's frames cross them.
    run('ip', ['netns', 'exec', this.name, 'sysctl', '-qw', 'net.ipv6.conf.all.disable_ipv6=1', 'net.ipv6.conf.default.disable_ipv6=1']);
    run('ip', ['-n', this.name, 'tuntap', 'add', 'dev', this.oursTap, 'mode', 'tap', 'multi_queue', 'vnet_hdr']);
    run('ip', ['-n', this.name, 'link', 'set', this.oursTap, 'up']);
  }

  destroy(): void {
    spawnSync('ip', ['netns', 'del', this.name]);
  }

  /** `cmd args` run inside the namespace (ip netns exec execs it: the pid is the program's). */
  exec(cmd: string, args: string[]): [string, string[]] {
    return ['ip', ['netns', 'exec', this.name, cmd, ...args]];
  }

  tap(backend: Backend): string {
    return backend === 'ours' ? this.oursTap : this.dpdkTap;
  }
}

async function startOne(backend: Backend, ns: Namespace, socket: string, o: Options, round: number): Promise<Started> {
  const logFile = path.join(buildDir, 'logs', `net-${backend}-${round}.log`);
  const [cmd, args] =
    backend === 'ours'
      ? ns.exec(process.execPath, [daemonMain, '--socket-path', socket, '--tap', ns.oursTap, '--log-level', 'warn', ...o.daemonArgs])
      : // stdbuf: testpmd's "Press enter to exit" (forwarding started) reaches the log at once.
        ns.exec('stdbuf', [
          '-oL', 'dpdk-testpmd', '-l', '0,1', '--no-pci', '--huge-dir', hugeDir, '--file-prefix', `${ns.name}`, '--huge-unlink', '-m', '512',
          '--vdev', `net_vhost0,iface=${socket},queues=1,tso=1`, '--vdev', `net_tap0,iface=${ns.dpdkTap}`,
          '--', '--forward-mode=io', '--nb-cores=1', '--disable-link-check',
        ]);
  if (o.verbose) log(`start ${cmd} ${args.join(' ')}`);
  return startBackend(backend, cmd, args, socket, logFile, backend === 'dpdk' ? 'pipe' : 'ignore');
}

async function measure(backend: Backend, started: Started, ns: Namespace, socket: string, c: Case, o: Options): Promise<Run> {
  const tap = ns.tap(backend);
  const args = [
    '--socket-path', socket, ...CASES[c], '--runtime', String(o.runtime), '--warmup', String(o.warmup), '--tap', tap,
    '--backend-pid', String(started.child.pid), '--window', String(o.window),
    ...(CASES[c][1] === 'rx' ? ['--inject-iface', tap] : []), ...(o.poll ? ['--poll'] : []),
  ];
  const [cmd, nsArgs] = ns.exec(loadgenBin, args);
  if (o.verbose) log(`run ${cmd} ${nsArgs.join(' ')}`);
  const r = await runCapture(cmd, nsArgs);
  if (r.code !== 0) throw new Error(`net-loadgen exited ${r.code}: ${r.stderr.trim()}\n  ${backend} log ${started.logFile}:\n${tail(started.logFile)}`);
  if (r.stderr.trim()) log(`${backend} ${c}: ${r.stderr.trim()}`);
  const result = JSON.parse(r.stdout) as LoadgenResult;
  // tx: what reached the kernel (the TAP's rx side), not what the back-end took from the ring.
  const packets = result.mode === 'tx' ? result.tap!.rx_packets : result.packets;
  const pps = packets / result.runtime_s;
  const gbitS = result.mode === 'tx' ? (result.gbit_s * packets) / result.packets : result.gbit_s;
  return { pps, gbitS, cpuNsPerPacket: result.backend_cpu_s === null ? null : (result.backend_cpu_s * 1e9) / packets, loadgen: result };
}

/** testpmd forwards once its ports started: wait for the line it prints then. */
async function dpdkForwarding(s: Started): Promise<void> {
  const deadline = Date.now() + 30000;
  while (!/Press enter to exit|Start automatic packet forwarding/.test(fs.readFileSync(s.logFile, 'utf8'))) {
    if (s.child.exitCode !== null) throw new Error(`dpdk-testpmd exited; log ${s.logFile}:\n${tail(s.logFile)}`);
    if (Date.now() > deadline) throw new Error(`dpdk-testpmd did not start forwarding in 30 s; log ${s.logFile}:\n${tail(s.logFile)}`);
    await sleep(100);
  }
}

function spread(runs: Run[], key: (r: Run) => number, digits = 0): string {
  const m = medianBy(runs, key);
  if (!m) return 'n/a';
  const values = runs.map(key);
  return runs.length > 1 ? `${fmt(key(m), digits)} (${fmt(Math.min(...values), digits)}-${fmt(Math.max(...values), digits)})` : fmt(key(m), digits);
}

async function main(o: Options): Promise<number> {
  if (process.getuid?.() !== 0) {
    log('needs root: a network namespace, TAPs, AF_PACKET and hugepages (run it with sudo)');
    return 1;
  }
  if (o.backends.includes('ours') && !fs.existsSync(daemonMain)) {
    log(`${path.relative(root, daemonMain)} is missing (npm run build:ts)`);
    return 1;
  }
  let restoreHugepages = (): void => undefined;
  if (o.backends.includes('dpdk')) {
    if (spawnSync('dpdk-testpmd', ['--version']).error) {
      log('dpdk-testpmd not found; as root: apt-get install dpdk-dev librte-net-vhost23 librte-net-tap23 librte-mempool-ring23');
      return 1;
    }
    restoreHugepages = setUpHugepages();
  }
  fs.mkdirSync(path.join(buildDir, 'logs'), { recursive: true });
  buildLoadgens();
  const loadavgStart = os.loadavg();
  const runDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-bench-net-'));
  const ns = new Namespace();
  const cleanup = () => {
    ns.destroy();
    fs.rmSync(runDir, { recursive: true, force: true });
    restoreHugepages();
  };
  process.once('SIGINT', () => {
    cleanup();
    process.exit(130);
  });

  const runs = new Map<string, Run[]>();
  const failures: string[] = [];
  try {
    ns.create();
    for (let round = 0; round < o.repeat; round++) {
      // Alternate which back-end goes first, so drift in machine load hits both alike.
      const order = round % 2 === 0 ? o.backends : [...o.backends].reverse();
      for (const backend of order) {
        const socket = path.join(runDir, `${backend}.sock`);
        let started: Started | undefined;
        try {
          started = await startOne(backend, ns, socket, o, round);
          if (backend === 'dpdk') await dpdkForwarding(started);
          for (const c of o.cases) {
            const what = `${backend} ${c} (round ${round + 1}/${o.repeat})`;
            try {
              const r = await measure(backend, started, ns, socket, c, o);
              const key = `${backend}:${c}`;
              runs.set(key, [...(runs.get(key) ?? []), r]);
              log(`${what}: ${fmt(r.pps)} pps${c === 'tso' ? `, ${fmt(r.gbitS, 2)} Gbit/s` : ''}, ${fmt(r.cpuNsPerPacket)} ns CPU/packet`);
            } catch (e) {
              failures.push(`${what}: ${(e as Error).message}`);
              log(`${what} FAILED: ${(e as Error).message}`);
            }
          }
        } catch (e) {
          failures.push(`${backend} round ${round + 1}: ${(e as Error).message}`);
          log(`${backend} FAILED to start: ${(e as Error).message}`);
        } finally {
          if (started) {
            const stopError = await stopBackend(started, backend);
            if (stopError) log(stopError);
          }
        }
      }
    }
  } finally {
    cleanup();
  }

  const header = ['case', 'ours pps', 'DPDK pps', 'ours/DPDK', 'ours CPU ns/pkt', 'DPDK CPU ns/pkt'];
  const body = o.cases.map((c) => {
    const ours = runs.get(`ours:${c}`) ?? [];
    const dpdk = runs.get(`dpdk:${c}`) ?? [];
    const key = c === 'tso' ? (r: Run) => r.gbitS : (r: Run) => r.pps;
    const mo = medianBy(ours, key);
    const md = medianBy(dpdk, key);
    return [
      c === 'tso' ? 'tso Gbit/s' : c,
      spread(ours, key, c === 'tso' ? 2 : 0),
      spread(dpdk, key, c === 'tso' ? 2 : 0),
      mo && md ? fmt(key(mo) / key(md), 2) : '-',
      fmt(mo?.cpuNsPerPacket),
      fmt(md?.cpuNsPerPacket),
    ];
  });
  process.stdout.write(
    [
      `vhost-user-net, 1 queue pair, ${o.runtime} s per case (+${o.warmup} s warm-up), median (min-max) of ${o.repeat} alternating rounds` +
        `${o.poll ? ', generator polling' : ''}; tx counted at the TAP, rx by the guest`,
      ...formatTable(header, body),
      '',
    ].join('\n'),
  );
  const la = (l: number[]) => l.map((x) => x.toFixed(1)).join(' ');
  process.stdout.write(`machine: ${os.cpus().length} CPUs, load average ${la(loadavgStart)} at start, ${la(os.loadavg())} at end\n`);
  const report = {
    date: new Date().toISOString(),
    host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, kernel: os.release(), node: process.version },
    config: { ...o, loadavg_at_start: loadavgStart, loadavg_at_end: os.loadavg() },
    runs: Object.fromEntries(runs),
    failures,
  };
  writeResults(o.out, report);
  if (failures.length) {
    process.stdout.write(`${failures.length} measurement(s) failed to run:\n${failures.map((f) => `  ${f}`).join('\n')}\n`);
    return 1;
  }
  return 0;
}

runMain(parseOptions, main, log);
