/**
 * `npm run bench:blk`: vhost-user-blk throughput, latency and CPU cost, our daemon against
 * qemu-storage-daemon (QEMU's own vhost-user-blk export), measured in one run on the same machine.
 *
 * For every device (a tmpfs image file, then a null device) and every case (4 KiB random read and
 * random write at queue depth 1 and 32), each back-end is started fresh, driven for `--runtime`
 * seconds by blk-loadgen (bench/loadgen, a C front-end that plays QEMU: memfd guest memory, split rings,
 * call eventfds), and stopped with SIGTERM. The table gives IOPS, the ratio ours/qsd, p50/p99
 * latency and back-end CPU time per I/O; build/bench/blk-results.json has everything the load
 * generator reported.
 *
 *   node build/bench/blk.js [--runtime 5] [--warmup 1] [--repeat 1] [--queues 1] [--image-size 1G]
 *                           [--only ours|qsd] [--devices file,null] [--cases randread:1,randwrite:32]
 *                           [--image PATH] [--out build/bench/blk-results.json] [--qsd-iothread] [--poll] [--verbose]
 *                           [--threads N]   (our daemon's --threads: queues in N worker threads)
 *                           [--poll-us N]   (our daemon's --poll-us; default: the daemon's default)
 *                           [--no-inline-io] (our daemon's --no-inline-io: every read and write through io_uring)
 *
 *   node build/bench/blk.js --scaling [--repeat 5] [--runtime 3] [--cases randread:32] [--devices null]
 *     Multiqueue scaling of our daemon alone (issue 12): one queue on the main thread against
 *     `--num-queues 2 --threads 2` (QD per queue), alternating run by run; prints median IOPS, the
 *     spread, the per-round ratio and where the CPU went (the load generator, the daemon's threads
 *     from /proc/PID/task/*\/stat, the whole machine) over the measured window.
 *
 * Exit status: 0 when every measurement ran (whatever the ratios), 1 when something failed to run.
 * See docs/benchmarks.md for how to read the numbers.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import {
  ArgReader, buildDir, buildLoadgens, CLK_TCK, createImage, fmt, formatTable, machineTicks, median, medianIops, range, root, runCapture, runMain, sleep, startBackend, statCpuSeconds,
  stopBackend, tail, threadCpu, usage, writeResults, type IoCase, type LoadgenResult, type Rw, type Started, type ThreadCpu,
} from './common';

const loadgenBin = path.join(buildDir, 'blk-loadgen');
const daemonMain = path.join(root, 'build', 'daemons', 'blk', 'main.js');

type Backend = 'ours' | 'qsd';
type Device = 'file' | 'null';

interface Options {
  runtime: number;
  warmup: number;
  repeat: number;
  queues: number;
  queueSize: number;
  imageSize: number;
  image?: string;
  backends: Backend[];
  devices: Device[];
  cases: IoCase[];
  out: string;
  verbose: boolean;
  /** Run qsd's export in an iothread (adaptive polling) instead of its main loop. */
  qsdIothread: boolean;
  /** Let the load generator busy-poll the used rings instead of sleeping on call eventfds. */
  poll: boolean;
  /** Our daemon's --threads (0: its main thread only). */
  threads: number;
  /** Our daemon's --poll-us (undefined: its default). */
  pollUs?: number;
  /** Our daemon's --no-inline-io. */
  noInlineIo: boolean;
  /** Measure multiqueue scaling (one queue on the main thread vs 2 queues in 2 threads) instead. */
  scaling: boolean;
}

/** Where the CPU went over a run's measured window (`--scaling`), in % of one core. */
interface CpuShare {
  /** Every thread of the daemon that used more than 1% of a core, busiest first. */
  threads: { name: string; pct: number }[];
  /** The whole daemon. */
  daemonPct: number;
  /** Time the daemon's threads were runnable but waited for a CPU (schedstat run_delay), summed. */
  daemonWaitPct: number;
  /** Time the load generator (one thread) was runnable but waited for a CPU. */
  loadgenWaitPct: number;
  /** The whole machine, busy (not idle or iowait), in % of one core (200 = both cores of a 2-CPU VM). */
  machinePct: number;
}

type ScalingResult = LoadgenResult & { cpu?: CpuShare };

interface Measurement {
  ok: boolean;
  /** The run with the median IOPS when `--repeat` > 1. */
  result?: LoadgenResult;
  /** Every run, in order. */
  runs?: LoadgenResult[];
  error?: string;
}

interface Row {
  device: Device;
  rw: Rw;
  iodepth: number;
  ours?: Measurement;
  qsd?: Measurement;
  ratio?: number;
}

function parseOptions(argv: string[]): Options {
  const o: Options = {
    runtime: 5,
    warmup: 1,
    repeat: 1,
    queues: 1,
    queueSize: 256,
    imageSize: 1 << 30,
    backends: ['ours', 'qsd'],
    devices: ['file', 'null'],
    cases: [
      { rw: 'randread', iodepth: 1 },
      { rw: 'randread', iodepth: 32 },
      { rw: 'randwrite', iodepth: 1 },
      { rw: 'randwrite', iodepth: 32 },
    ],
    out: path.join(buildDir, 'blk-results.json'),
    verbose: false,
    qsdIothread: false,
    poll: false,
    threads: 0,
    noInlineIo: false,
    scaling: false,
  };
  const given = new Set(argv);
  const args = new ArgReader(argv);
  for (let arg = args.next(); arg !== undefined; arg = args.next()) {
    switch (arg) {
      case '--runtime': o.runtime = args.positive(); break;
      case '--warmup': o.warmup = args.nonNegative(); break;
      case '--repeat': o.repeat = Math.floor(args.positive()); break;
      case '--queues': o.queues = Math.floor(args.positive()); break;
      case '--queue-size': o.queueSize = Math.floor(args.positive()); break;
      case '--image-size': o.imageSize = args.size(); break;
      case '--image': o.image = args.value(); break;
      case '--out': o.out = path.resolve(args.value()); break;
      case '--verbose': case '-v': o.verbose = true; break;
      case '--qsd-iothread': o.qsdIothread = true; break;
      case '--poll': o.poll = true; break;
      case '--threads': o.threads = Math.floor(args.nonNegative()); break;
      case '--poll-us': o.pollUs = Math.floor(args.nonNegative()); break;
      case '--no-inline-io': o.noInlineIo = true; break;
      case '--scaling': o.scaling = true; break;
      case '--only': {
        const v = args.value();
        if (v !== 'ours' && v !== 'qsd') throw new Error('--only takes ours or qsd');
        o.backends = [v];
        break;
      }
      case '--devices':
        o.devices = args.value().split(',').map((d) => {
          if (d !== 'file' && d !== 'null') throw new Error(`unknown device ${d} (file, null)`);
          return d;
        });
        break;
      case '--cases':
        o.cases = args.ioCases();
        break;
      case '--help': case '-h': return usage(__filename);
      default: throw new Error(`unknown option ${arg} (see --help)`);
    }
  }
  if (o.scaling) {
    // What issue 12 asks for: the null device (the engine's own cost), QD32 per queue, several rounds.
    o.backends = ['ours'];
    if (!given.has('--devices')) o.devices = ['null'];
    if (!given.has('--cases')) o.cases = [{ rw: 'randread', iodepth: 32 }];
    if (!given.has('--repeat')) o.repeat = 5;
    if (!given.has('--runtime')) o.runtime = 3;
    if (given.has('--queues') || given.has('--threads')) throw new Error('--scaling sets --queues and --threads itself (1 queue, then 2 queues in 2 threads)');
  }
  return o;
}

function log(message: string): void {
  process.stderr.write(`bench:blk: ${message}\n`);
}

function qsdArgs(device: Device, image: string, socket: string, o: Options): string[] {
  const disk =
    device === 'file'
      ? [
          '--blockdev', `driver=file,node-name=file0,filename=${image},cache.direct=off`,
          '--blockdev', 'driver=raw,node-name=disk0,file=file0',
        ]
      : // read-zeroes=off: reads leave guest memory alone, as our --null does; both are pure overhead.
        ['--blockdev', `driver=null-co,node-name=disk0,size=${o.imageSize},read-zeroes=off`];
  const iothread = o.qsdIothread ? ['--object', 'iothread,id=iothread0'] : [];
  return [
    ...iothread,
    ...disk,
    '--export',
    `type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=${socket},writable=on,num-queues=${o.queues}` +
      (o.qsdIothread ? ',iothread=iothread0' : ''),
  ];
}

function oursArgs(device: Device, image: string, socket: string, o: Options): string[] {
  const disk = device === 'file' ? ['--file', image] : ['--null', '--null-size', String(o.imageSize)];
  const threads = o.threads > 0 ? ['--threads', String(o.threads)] : [];
  const poll = o.pollUs !== undefined ? ['--poll-us', String(o.pollUs)] : [];
  const inline = o.noInlineIo ? ['--no-inline-io'] : [];
  return [daemonMain, '--socket-path', socket, ...disk, '--num-queues', String(o.queues), ...threads, ...poll, ...inline, '--log-level', 'warn'];
}

/**
 * The CPU shares of `pid`'s threads and of the machine from `startMs` to `endMs` after now (inside the
 * load generator's measured window; the edges are left out, as the set-up and the drain are).
 */
async function sampleCpu(pid: number, loadgenPid: Promise<number>, startMs: number, endMs: number): Promise<CpuShare | undefined> {
  await sleep(startMs);
  const loadgen = await loadgenPid;
  const waiting = () => threadCpu(loadgen).reduce((n, t) => n + t.waitSeconds, 0);
  const loadgenBefore = waiting();
  const before = new Map(threadCpu(pid).map((t) => [t.tid, t]));
  const processBefore = statCpuSeconds(`/proc/${pid}/stat`);
  const machineBefore = machineTicks();
  const t0 = performance.now();
  await sleep(endMs - startMs);
  const after = threadCpu(pid);
  const loadgenAfter = waiting();
  const processAfter = statCpuSeconds(`/proc/${pid}/stat`);
  const machineAfter = machineTicks();
  const wall = (performance.now() - t0) / 1000;
  if (processBefore === undefined || processAfter === undefined) return undefined;
  const pct = (s: number) => (100 * s) / wall;
  const label = (t: ThreadCpu) => (t.tid === pid ? 'main' : t.name.startsWith('iou-wrk') ? 'io-wq' : t.name);
  const threads = after
    .map((t) => ({ name: label(t), pct: pct(t.seconds - (before.get(t.tid)?.seconds ?? 0)) }))
    .filter((t) => t.pct > 1)
    .sort((a, b) => b.pct - a.pct);
  const waited = after.reduce((n, t) => n + t.waitSeconds - (before.get(t.tid)?.waitSeconds ?? 0), 0);
  return {
    threads,
    daemonWaitPct: pct(waited),
    loadgenWaitPct: pct(loadgenAfter - loadgenBefore),
    daemonPct: pct(processAfter - processBefore),
    machinePct: pct((machineAfter.busy - machineBefore.busy) / CLK_TCK),
  };
}

async function measureOnce(backend: Backend, device: Device, rw: Rw, iodepth: number, image: string, o: Options, runDir: string): Promise<ScalingResult> {
  const socket = path.join(runDir, `${backend}.sock`);
  const logFile = path.join(buildDir, 'logs', `${backend}-${device}-${rw}-qd${iodepth}.log`);
  const [cmd, args] =
    backend === 'ours' ? [process.execPath, oursArgs(device, image, socket, o)] : ['qemu-storage-daemon', qsdArgs(device, image, socket, o)];
  if (o.verbose) log(`start ${cmd} ${args.join(' ')}`);
  const started: Started = await startBackend(backend, cmd, args, socket, logFile);
  let result: ScalingResult | undefined;
  let failure: string | undefined;
  try {
    const loadgenArgs = [
      '--socket-path', socket, '--rw', rw, '--bs', '4096', '--iodepth', String(iodepth), '--queues', String(o.queues),
      '--queue-size', String(o.queueSize), '--runtime', String(o.runtime), '--warmup', String(o.warmup),
      '--backend-pid', String(started.child.pid),
      ...(o.poll ? ['--poll'] : []),
    ];
    if (o.verbose) log(`run blk-loadgen ${loadgenArgs.join(' ')}`);
    const window = [o.warmup * 1000 + 300, (o.warmup + o.runtime) * 1000 - 200] as const;
    let spawned: (pid: number) => void = () => {};
    const loadgenPid = new Promise<number>((resolve) => (spawned = resolve));
    const [r, cpu] = await Promise.all([
      runCapture(loadgenBin, loadgenArgs, spawned),
      o.scaling && window[1] > window[0] ? sampleCpu(started.child.pid!, loadgenPid, ...window) : undefined,
    ]);
    if (r.code !== 0) {
      failure = `blk-loadgen exited ${r.code}: ${r.stderr.trim()}`;
    } else {
      if (r.stderr.trim()) log(`${backend} ${device} ${rw} QD${iodepth}: ${r.stderr.trim()}`);
      result = { ...(JSON.parse(r.stdout) as LoadgenResult), cpu };
    }
  } finally {
    const stopError = await stopBackend(started, backend);
    if (stopError) failure = failure ? `${failure}; ${stopError}` : stopError;
  }
  // The log is read once the back-end has exited, so its last words are in it.
  if (failure || !result) throw new Error(`${failure ?? 'no result'}\n  ${backend} log ${logFile}:\n${tail(logFile)}`);
  return result;
}

/** Why `backend` cannot be measured at all, if it cannot. */
function unavailable(backend: Backend): string | undefined {
  if (backend === 'ours' && !fs.existsSync(daemonMain)) {
    return `${path.relative(root, daemonMain)} is missing (build the blk daemon, or pass --only qsd)`;
  }
  return undefined;
}

function latency(m?: Measurement): string {
  const r = m?.result;
  if (!r) return 'n/a';
  return `${fmt(r.lat_us.p50, r.lat_us.p50 < 100 ? 1 : 0)}/${fmt(r.lat_us.p99, r.lat_us.p99 < 100 ? 1 : 0)}`;
}

/**
 * The spread of a row with `--repeat` > 1: the lowest and highest ratio of the rounds (ours run i over
 * qsd run i: the two ran back to back, under the same machine load), and the IOPS range of each side.
 */
function spread(r: Row): string {
  const ours = r.ours?.runs ?? [];
  const qsd = r.qsd?.runs ?? [];
  const n = Math.min(ours.length, qsd.length);
  if (n < 2) return '-';
  const ratios = Array.from({ length: n }, (_, i) => ours[i]!.iops / qsd[i]!.iops);
  return `${fmt(Math.min(...ratios), 2)}–${fmt(Math.max(...ratios), 2)}`;
}

function table(rows: Row[], o: Options): string {
  const header = ['case', 'ours IOPS', 'qsd IOPS', 'ours/qsd', 'rounds ours/qsd', 'ours p50/p99 µs', 'qsd p50/p99 µs', 'ours CPU µs/IO', 'qsd CPU µs/IO'];
  const body = rows.map((r) => [
    `${r.device} ${r.rw} QD${r.iodepth}`,
    r.ours ? (r.ours.ok ? fmt(r.ours.result!.iops) : 'FAILED') : '-',
    r.qsd ? (r.qsd.ok ? fmt(r.qsd.result!.iops) : 'FAILED') : '-',
    r.ratio !== undefined ? fmt(r.ratio, 2) : '-',
    spread(r),
    latency(r.ours),
    latency(r.qsd),
    fmt(r.ours?.result?.backend_cpu_us_per_io, 1),
    fmt(r.qsd?.result?.backend_cpu_us_per_io, 1),
  ]);
  return [
    `vhost-user-blk, 4 KiB random I/O, ${o.queues} queue(s), ${o.runtime} s per case (+${o.warmup} s warm-up), median of ${o.repeat}` +
      `${o.pollUs !== undefined ? `, ours --poll-us ${o.pollUs}` : ''}${o.noInlineIo ? ', ours --no-inline-io' : ''}${o.poll ? ', front-end polling' : ''}${o.qsdIothread ? ', qsd in an iothread' : ''}`,
    ...formatTable(header, body),
  ].join('\n');
}

/** The two set-ups `--scaling` compares. */
const SCALING_SETUPS = [
  { name: '1 queue, main thread', queues: 1, threads: 0 },
  { name: '2 queues, --threads 2', queues: 2, threads: 2 },
] as const;

interface ScalingRow {
  device: Device;
  rw: Rw;
  iodepth: number;
  /** Runs per set-up (SCALING_SETUPS order), round by round. */
  runs: ScalingResult[][];
  error?: string;
}

/**
 * `--scaling`: per case, `--repeat` rounds of both set-ups back to back (the order swaps every round,
 * so drift in the machine's load hits both alike).
 */
async function measureScaling(image: string, o: Options, runDir: string): Promise<ScalingRow[]> {
  const rows: ScalingRow[] = [];
  for (const device of o.devices) {
    for (const c of o.cases) {
      const row: ScalingRow = { device, rw: c.rw, iodepth: c.iodepth, runs: SCALING_SETUPS.map(() => []) };
      rows.push(row);
      for (let rep = 0; rep < o.repeat && row.error === undefined; rep++) {
        const order = rep % 2 === 0 ? [0, 1] : [1, 0];
        for (const i of order) {
          const setup = SCALING_SETUPS[i]!;
          const what = `${setup.name}: ${device} ${c.rw} QD${c.iodepth} per queue (round ${rep + 1}/${o.repeat})`;
          try {
            const r = await measureOnce('ours', device, c.rw, c.iodepth, image, { ...o, queues: setup.queues, threads: setup.threads }, runDir);
            row.runs[i]!.push(r);
            log(`${what}: ${fmt(r.iops)} IOPS, daemon ${fmt(r.cpu?.daemonPct)}% of a core, load generator ${fmt(loadgenPct(r))}%`);
          } catch (e) {
            row.error = `${what}: ${(e as Error).message}`;
            log(`${what} FAILED: ${(e as Error).message}`);
            break;
          }
        }
      }
    }
  }
  return rows;
}

/** The load generator's CPU in % of one core over its measured window. */
function loadgenPct(r: LoadgenResult): number {
  return (r.loadgen_cpu_us_per_io * r.iops) / 1e4;
}

function scalingTable(rows: ScalingRow[], o: Options): string {
  const lines = [`vhost-user-blk multiqueue scaling, ours only, 4 KiB, ${o.runtime} s per run (+${o.warmup} s warm-up), ${o.repeat} alternating rounds` + `${o.pollUs !== undefined ? `, --poll-us ${o.pollUs}` : ''}`];
  for (const row of rows) {
    lines.push('', `${row.device} ${row.rw} QD${row.iodepth} per queue${row.error ? ` (FAILED: ${row.error.split('\n')[0]})` : ''}`);
    const header = ['set-up', 'median IOPS', 'min–max IOPS', 'p50/p99 µs', 'daemon CPU µs/IO', 'daemon % core', 'daemon waiting for a CPU %', 'busiest daemon threads % core', 'loadgen % core', 'loadgen waiting %', 'loadgen µs/IO', 'machine busy % core'];
    const body = SCALING_SETUPS.map((setup, i) => {
      const runs = row.runs[i]!;
      const m = medianIops(runs);
      const cpus = runs.flatMap((r) => (r.cpu ? [r.cpu] : []));
      const mc = m?.cpu;
      return [
        setup.name,
        fmt(m?.iops),
        range(runs.map((r) => r.iops)),
        m ? latency({ ok: true, result: m }) : 'n/a',
        fmt(m?.backend_cpu_us_per_io, 2),
        range(cpus.map((c) => c.daemonPct)),
        range(cpus.map((c) => c.daemonWaitPct)),
        mc ? mc.threads.slice(0, 4).map((t) => `${t.name} ${fmt(t.pct)}`).join(', ') : 'n/a',
        range(runs.map(loadgenPct)),
        range(cpus.map((c) => c.loadgenWaitPct)),
        fmt(m?.loadgen_cpu_us_per_io, 2),
        range(cpus.map((c) => c.machinePct)),
      ];
    });
    lines.push(...formatTable(header, body));
    const [one, two] = row.runs;
    const n = Math.min(one!.length, two!.length);
    if (n > 0) {
      const ratios = Array.from({ length: n }, (_, i) => two![i]!.iops / one![i]!.iops);
      const ratioOfMedians = medianIops(two!)!.iops / medianIops(one!)!.iops;
      lines.push(
        `2 queues / 1 queue: ${fmt(ratioOfMedians, 2)} (ratio of the medians); per round ${ratios.map((r) => fmt(r, 2)).join(' ')}, median ${fmt(median(ratios), 2)}; goal ≥ 1.7`,
      );
    }
  }
  return lines.join('\n');
}

function qsdVersion(): string | undefined {
  const r = spawnSync('qemu-storage-daemon', ['--version'], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.split('\n')[0] : undefined;
}

async function main(o: Options): Promise<number> {
  fs.mkdirSync(path.join(buildDir, 'logs'), { recursive: true });
  buildLoadgens();

  const qsd = qsdVersion();
  // Other work on the machine skews absolute numbers; the report records how busy it was.
  const loadavgStart = os.loadavg();
  if (o.backends.includes('qsd') && !qsd) {
    log('qemu-storage-daemon not found (Debian: apt-get install qemu-system-common, or qemu-utils from backports)');
    return 1;
  }

  const runDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-bench-blk-'));
  const ownImage = o.image === undefined;
  const image = o.image ?? path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : runDir, `vhostd-bench-blk-${process.pid}.img`);
  const cleanup = () => {
    if (ownImage) fs.rmSync(image, { force: true });
    fs.rmSync(runDir, { recursive: true, force: true });
  };
  process.once('SIGINT', () => {
    cleanup();
    process.exit(130);
  });

  const rows: Row[] = [];
  let scalingRows: ScalingRow[] = [];
  try {
    if (ownImage && o.devices.includes('file')) {
      const fsInfo = fs.statfsSync(path.dirname(image));
      if (fsInfo.bavail * fsInfo.bsize < o.imageSize * 1.1) {
        throw new Error(`not enough room in ${path.dirname(image)} for a ${o.imageSize >> 20} MiB image (use --image-size or --image)`);
      }
      log(`creating ${o.imageSize >> 20} MiB image ${image}`);
      createImage(image, o.imageSize);
    } else if (!ownImage) {
      o.imageSize = fs.statSync(image).size;
    }
    if (o.scaling) scalingRows = await measureScaling(image, o, runDir);
    for (const device of o.scaling ? [] : o.devices) {
      for (const c of o.cases) {
        const row: Row = { device, rw: c.rw, iodepth: c.iodepth };
        const runs = new Map<Backend, LoadgenResult[]>(o.backends.map((b) => [b, []]));
        const errors = new Map<Backend, string>();
        for (const b of o.backends) {
          const why = unavailable(b);
          if (why) errors.set(b, why);
        }
        // Alternate the back-ends run by run, so drift in machine load hits both alike.
        for (let rep = 0; rep < o.repeat; rep++) {
          for (const backend of o.backends) {
            if (errors.has(backend)) continue;
            const what = `${backend}: ${device} ${c.rw} QD${c.iodepth}${o.repeat > 1 ? ` (run ${rep + 1}/${o.repeat})` : ''}`;
            try {
              const r = await measureOnce(backend, device, c.rw, c.iodepth, image, o, runDir);
              runs.get(backend)!.push(r);
              log(`${what}: ${fmt(r.iops)} IOPS, ${fmt(r.backend_cpu_us_per_io, 1)} µs CPU/IO`);
            } catch (e) {
              errors.set(backend, (e as Error).message);
              log(`${what} FAILED: ${(e as Error).message}`);
            }
          }
        }
        for (const backend of o.backends) {
          const error = errors.get(backend);
          row[backend] = error ? { ok: false, error, runs: runs.get(backend) } : { ok: true, result: medianIops(runs.get(backend)!), runs: runs.get(backend) };
        }
        if (row.ours?.ok && row.qsd?.ok) row.ratio = row.ours.result!.iops / row.qsd.result!.iops;
        rows.push(row);
      }
    }
  } finally {
    cleanup();
  }

  process.stdout.write(`${o.scaling ? scalingTable(scalingRows, o) : table(rows, o)}\n`);
  const la = (l: number[]) => l.map((x) => x.toFixed(1)).join(' ');
  process.stdout.write(`machine: ${os.cpus().length} CPUs, load average ${la(loadavgStart)} at start, ${la(os.loadavg())} at end; ${qsd ?? 'no qsd'}\n`);
  const failures = [
    ...rows.flatMap((r) => o.backends.filter((b) => r[b] && !r[b]!.ok).map((b) => `${b} ${r.device} ${r.rw} QD${r.iodepth}: ${r[b]!.error}`)),
    ...scalingRows.flatMap((r) => (r.error ? [r.error] : [])),
  ];
  const report = {
    date: new Date().toISOString(),
    host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, kernel: os.release(), node: process.version, qsd },
    config: {
      runtime_s: o.runtime, warmup_s: o.warmup, repeat: o.repeat, queues: o.queues, queue_size: o.queueSize,
      image_size: o.imageSize, bs: 4096, qsd_iothread: o.qsdIothread, poll_us: o.pollUs ?? null, no_inline_io: o.noInlineIo, loadgen_poll: o.poll, scaling: o.scaling, loadavg_at_start: loadavgStart, loadavg_at_end: os.loadavg(),
    },
    rows: o.scaling ? scalingRows : rows,
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
