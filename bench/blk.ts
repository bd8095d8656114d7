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
 * Exit status: 0 when every measurement ran (whatever the ratios), 1 when something failed to run.
 * See docs/benchmarks.md for how to read the numbers.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { buildDir, buildLoadgens, createImage, fmt, formatTable, medianIops, root, runCapture, startBackend, stopBackend, tail, usage, type LoadgenResult, type Started } from './common';

const loadgenBin = path.join(buildDir, 'blk-loadgen');
const daemonMain = path.join(root, 'build', 'daemons', 'blk', 'main.js');

type Backend = 'ours' | 'qsd';
type Device = 'file' | 'null';
type Rw = 'randread' | 'randwrite';

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
  cases: { rw: Rw; iodepth: number }[];
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
}

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

function parseSize(text: string): number {
  const m = /^(\d+)([KMGT]?)$/i.exec(text);
  if (!m) throw new Error(`not a size: ${text}`);
  const shift = { '': 0, K: 10, M: 20, G: 30, T: 40 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  return Number(m[1]) * 2 ** shift;
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
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const value = (): string => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${arg} needs a value`);
      return v;
    };
    const positive = (): number => {
      const v = Number(value());
      if (!(v > 0) || !Number.isFinite(v)) throw new Error(`${arg} needs a positive number`);
      return v;
    };
    switch (arg) {
      case '--runtime': o.runtime = positive(); break;
      case '--warmup': o.warmup = Number(value()); break;
      case '--repeat': o.repeat = Math.floor(positive()); break;
      case '--queues': o.queues = Math.floor(positive()); break;
      case '--queue-size': o.queueSize = Math.floor(positive()); break;
      case '--image-size': o.imageSize = parseSize(value()); break;
      case '--image': o.image = value(); break;
      case '--out': o.out = path.resolve(value()); break;
      case '--verbose': case '-v': o.verbose = true; break;
      case '--qsd-iothread': o.qsdIothread = true; break;
      case '--poll': o.poll = true; break;
      case '--threads': o.threads = Math.floor(Number(value())); break;
      case '--poll-us': o.pollUs = Math.floor(Number(value())); break;
      case '--no-inline-io': o.noInlineIo = true; break;
      case '--only': {
        const v = value();
        if (v !== 'ours' && v !== 'qsd') throw new Error('--only takes ours or qsd');
        o.backends = [v];
        break;
      }
      case '--devices':
        o.devices = value().split(',').map((d) => {
          if (d !== 'file' && d !== 'null') throw new Error(`unknown device ${d} (file, null)`);
          return d;
        });
        break;
      case '--cases':
        o.cases = value().split(',').map((c) => {
          const m = /^(randread|randwrite):(\d+)$/.exec(c);
          if (!m) throw new Error(`bad case ${c} (want randread:1,randwrite:32,...)`);
          return { rw: m[1] as Rw, iodepth: Number(m[2]) };
        });
        break;
      case '--help': case '-h': return usage(__filename);
      default: throw new Error(`unknown option ${arg} (see --help)`);
    }
  }
  if (!(o.warmup >= 0)) throw new Error('--warmup needs a number >= 0');
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

async function measureOnce(backend: Backend, device: Device, rw: Rw, iodepth: number, image: string, o: Options, runDir: string): Promise<LoadgenResult> {
  const socket = path.join(runDir, `${backend}.sock`);
  const logFile = path.join(buildDir, 'logs', `${backend}-${device}-${rw}-qd${iodepth}.log`);
  const [cmd, args] =
    backend === 'ours' ? [process.execPath, oursArgs(device, image, socket, o)] : ['qemu-storage-daemon', qsdArgs(device, image, socket, o)];
  if (o.verbose) log(`start ${cmd} ${args.join(' ')}`);
  const started: Started = await startBackend(backend, cmd, args, socket, logFile);
  let result: LoadgenResult | undefined;
  let failure: string | undefined;
  try {
    const loadgenArgs = [
      '--socket-path', socket, '--rw', rw, '--bs', '4096', '--iodepth', String(iodepth), '--queues', String(o.queues),
      '--queue-size', String(o.queueSize), '--runtime', String(o.runtime), '--warmup', String(o.warmup),
      '--backend-pid', String(started.child.pid),
      ...(o.poll ? ['--poll'] : []),
    ];
    if (o.verbose) log(`run blk-loadgen ${loadgenArgs.join(' ')}`);
    const r = await runCapture(loadgenBin, loadgenArgs);
    if (r.code !== 0) {
      failure = `blk-loadgen exited ${r.code}: ${r.stderr.trim()}`;
    } else {
      if (r.stderr.trim()) log(`${backend} ${device} ${rw} QD${iodepth}: ${r.stderr.trim()}`);
      result = JSON.parse(r.stdout) as LoadgenResult;
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

function qsdVersion(): string | undefined {
  const r = spawnSync('qemu-storage-daemon', ['--version'], { encoding: 'utf8' });
  return r.status === 0 ? r.stdout.split('\n')[0] : undefined;
}

async function main(): Promise<number> {
  let o: Options;
  try {
    o = parseOptions(process.argv.slice(2));
  } catch (e) {
    log((e as Error).message);
    return 2;
  }
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
    for (const device of o.devices) {
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

  process.stdout.write(`${table(rows, o)}\n`);
  const la = (l: number[]) => l.map((x) => x.toFixed(1)).join(' ');
  process.stdout.write(`machine: ${os.cpus().length} CPUs, load average ${la(loadavgStart)} at start, ${la(os.loadavg())} at end; ${qsd ?? 'no qsd'}\n`);
  const failures = rows.flatMap((r) => o.backends.filter((b) => r[b] && !r[b]!.ok).map((b) => `${b} ${r.device} ${r.rw} QD${r.iodepth}: ${r[b]!.error}`));
  const report = {
    date: new Date().toISOString(),
    host: { cpus: os.cpus().length, cpuModel: os.cpus()[0]?.model, kernel: os.release(), node: process.version, qsd },
    config: {
      runtime_s: o.runtime, warmup_s: o.warmup, repeat: o.repeat, queues: o.queues, queue_size: o.queueSize,
      image_size: o.imageSize, bs: 4096, qsd_iothread: o.qsdIothread, poll_us: o.pollUs ?? null, no_inline_io: o.noInlineIo, loadgen_poll: o.poll, loadavg_at_start: loadavgStart, loadavg_at_end: os.loadavg(),
    },
    rows,
    failures,
  };
  fs.writeFileSync(o.out, `${JSON.stringify(report, null, 2)}\n`);
  process.stdout.write(`results: ${path.relative(process.cwd(), o.out) || o.out}\n`);
  if (failures.length) {
    process.stdout.write(`${failures.length} measurement(s) failed to run:\n${failures.map((f) => `  ${f}`).join('\n')}\n`);
    return 1;
  }
  return 0;
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    log(`failed: ${(e as Error).stack ?? String(e)}`);
    process.exit(1);
  },
);
