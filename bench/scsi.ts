/**
 * `npm run bench:scsi`: our vhost-user-scsi daemon against our vhost-user-blk daemon on the same image,
 * in one run. bench/blk-loadgen drives both (`--device scsi`: READ(10)/WRITE(10) CDBs in virtio-scsi
 * request headers on request queue 2, LUN 0; `--device blk`: virtio-blk requests on queue 0): 4 KiB
 * random read and random write at queue depth 1 and 32. Each daemon is started fresh per run, the two
 * alternate run by run (so drift in machine load hits both alike); the table gives median IOPS with
 * the spread (min-max) over `--repeat` runs, the ratio scsi/blk, p50/p99 latency and the daemons'
 * CPU time per I/O; build/bench/scsi-results.json has every run.
 *
 *   node build/bench/scsi.js [--runtime 5] [--warmup 1] [--repeat 3] [--image-size 1G]
 *                            [--cases randread:1,randread:32,randwrite:1,randwrite:32]
 *                            [--out build/bench/scsi-results.json] [--verbose]
 *
 * Exit status: 0 when every measurement ran (whatever the ratios), 1 when something failed to run.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { ArgReader, buildDir, buildLoadgens, createImage, fmt, medianIops, root, runCapture, runMain, startBackend, stopBackend, tail, usage, type IoCase, type LoadgenResult, type Rw } from './common';

const loadgenBin = path.join(buildDir, 'blk-loadgen');

const DAEMONS = ['scsi', 'blk'] as const;
type Daemon = (typeof DAEMONS)[number];

interface Options {
  runtime: number;
  warmup: number;
  repeat: number;
  imageSize: number;
  cases: IoCase[];
  out: string;
  verbose: boolean;
}

function log(message: string): void {
  process.stderr.write(`bench:scsi: ${message}\n`);
}

function parseOptions(argv: string[]): Options {
  const o: Options = {
    runtime: 5,
    warmup: 1,
    repeat: 3,
    imageSize: 1 << 30,
    cases: [
      { rw: 'randread', iodepth: 1 },
      { rw: 'randread', iodepth: 32 },
      { rw: 'randwrite', iodepth: 1 },
      { rw: 'randwrite', iodepth: 32 },
    ],
    out: path.join(buildDir, 'scsi-results.json'),
    verbose: false,
  };
  const args = new ArgReader(argv);
  for (let arg = args.next(); arg !== undefined; arg = args.next()) {
    switch (arg) {
      case '--runtime': o.runtime = args.positive(); break;
      case '--warmup': o.warmup = args.nonNegative(); break;
      case '--repeat': o.repeat = Math.floor(args.positive()); break;
      case '--image-size': o.imageSize = args.size(); break;
      case '--cases': o.cases = args.ioCases(); break;
      case '--out': o.out = args.value(); break;
      case '--verbose': o.verbose = true; break;
      case '--help': case '-h': return usage(__filename);
      default:
        throw new Error(`unknown option ${arg} (see --help)`);
    }
  }
  return o;
}

function daemonArgs(daemon: Daemon, image: string, socket: string): string[] {
  const main = path.join(root, 'build', 'daemons', daemon, 'main.js');
  const disk = daemon === 'scsi' ? ['--lun', `0=${image}`] : ['--file', image];
  return [main, '--socket-path', socket, ...disk, '--log-level', 'warn'];
}

async function measureOnce(daemon: Daemon, rw: Rw, iodepth: number, image: string, o: Options, runDir: string): Promise<LoadgenResult> {
  const socket = path.join(runDir, `${daemon}.sock`);
  const logFile = path.join(buildDir, 'logs', `scsi-bench-${daemon}-${rw}-qd${iodepth}.log`);
  const started = await startBackend(daemon, process.execPath, daemonArgs(daemon, image, socket), socket, logFile);
  let result: LoadgenResult | undefined;
  let failure: string | undefined;
  try {
    const args = [
      '--device', daemon, '--socket-path', socket, '--rw', rw, '--bs', '4096', '--iodepth', String(iodepth),
      '--size', String(o.imageSize), '--runtime', String(o.runtime), '--warmup', String(o.warmup), '--backend-pid', String(started.child.pid),
    ];
    if (o.verbose) log(`run blk-loadgen ${args.join(' ')}`);
    const r = await runCapture(loadgenBin, args);
    if (r.code !== 0) failure = `blk-loadgen exited ${r.code}: ${r.stderr.trim()}`;
    else result = JSON.parse(r.stdout) as LoadgenResult;
  } finally {
    const stopError = await stopBackend(started, daemon);
    if (stopError) failure = failure ? `${failure}; ${stopError}` : stopError;
  }
  if (failure || !result) throw new Error(`${failure ?? 'no result'}\n  ${daemon} log ${logFile}:\n${tail(logFile)}`);
  return result;
}

interface Row {
  rw: Rw;
  iodepth: number;
  runs: Record<Daemon, LoadgenResult[]>;
  errors: string[];
}

function summary(runs: LoadgenResult[]): string {
  const m = medianIops(runs);
  if (!m) return 'n/a | n/a | n/a | n/a';
  const iops = runs.map((r) => r.iops);
  const spread = `${fmt(Math.min(...iops))}-${fmt(Math.max(...iops))}`;
  const lat = `${fmt(m.lat_us.p50, 1)}/${fmt(m.lat_us.p99, 1)}`;
  return `${fmt(m.iops)} | ${spread} | ${lat} | ${fmt(m.backend_cpu_us_per_io, 2)}`;
}

function table(rows: Row[], o: Options): string {
  const lines = [
    `4 KiB random I/O, ${o.runtime} s per run, median of ${o.repeat} alternating runs (spread: min-max IOPS); latency p50/p99 in µs; CPU: daemon µs per I/O`,
    '',
    '| case | scsi IOPS | scsi spread | scsi lat | scsi CPU | blk IOPS | blk spread | blk lat | blk CPU | scsi/blk |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ];
  for (const row of rows) {
    const s = medianIops(row.runs.scsi);
    const b = medianIops(row.runs.blk);
    const ratio = s && b ? fmt(s.iops / b.iops, 2) : 'n/a';
    lines.push(`| ${row.rw} QD${row.iodepth} | ${summary(row.runs.scsi)} | ${summary(row.runs.blk)} | ${ratio} |`);
  }
  return lines.join('\n');
}

async function main(o: Options): Promise<number> {
  for (const daemon of DAEMONS) {
    if (!fs.existsSync(path.join(root, 'build', 'daemons', daemon, 'main.js'))) {
      log(`build/daemons/${daemon}/main.js is missing (npm run build:ts)`);
      return 1;
    }
  }
  fs.mkdirSync(path.join(buildDir, 'logs'), { recursive: true });
  buildLoadgens();
  const loadavgStart = os.loadavg();
  const runDir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-bench-scsi-'));
  const image = path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : runDir, `vhostd-bench-scsi-${process.pid}.img`);
  const cleanup = () => {
    fs.rmSync(image, { force: true });
    fs.rmSync(runDir, { recursive: true, force: true });
  };
  process.once('SIGINT', () => {
    cleanup();
    process.exit(130);
  });
  const rows: Row[] = [];
  try {
    log(`creating ${o.imageSize >> 20} MiB image ${image}`);
    createImage(image, o.imageSize);
    for (const c of o.cases) {
      const row: Row = { ...c, runs: { scsi: [], blk: [] }, errors: [] };
      for (let rep = 0; rep < o.repeat; rep++) {
        // Alternate which daemon goes first, so neither always runs on a warmer page cache.
        const order = rep % 2 === 0 ? DAEMONS : [...DAEMONS].reverse();
        for (const daemon of order) {
          try {
            const r = await measureOnce(daemon, c.rw, c.iodepth, image, o, runDir);
            row.runs[daemon].push(r);
            log(`${daemon}: ${c.rw} QD${c.iodepth} run ${rep + 1}/${o.repeat}: ${fmt(r.iops)} IOPS`);
          } catch (e) {
            row.errors.push(`${daemon}: ${(e as Error).message}`);
            log(`${daemon}: ${c.rw} QD${c.iodepth}: FAILED: ${(e as Error).message}`);
          }
        }
      }
      rows.push(row);
    }
  } finally {
    cleanup();
  }
  const report = table(rows, o);
  process.stdout.write(`${report}\n\nload average before ${loadavgStart.map((l) => l.toFixed(2)).join(' ')}, after ${os.loadavg().map((l) => l.toFixed(2)).join(' ')}; ${os.cpus().length} CPUs\n`);
  fs.writeFileSync(o.out, JSON.stringify({ options: o, rows, loadavgStart, loadavgEnd: os.loadavg() }, null, 2));
  return rows.some((r) => r.errors.length > 0) ? 1 : 0;
}

runMain(parseOptions, main, log);
