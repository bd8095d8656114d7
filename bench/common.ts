/**
 * What the benchmark runners (blk.ts, scsi.ts, net.ts, idle.ts) share: building the load generators,
 * images, starting a back-end until its socket appears, stopping it, running a load generator for its
 * JSON, medians and number formatting, the results file and the process exit.
 */
import { spawn, spawnSync, type ChildProcess, type StdioOptions } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export const root = path.resolve(__dirname, '..', '..');
export const buildDir = path.join(root, 'build', 'bench');

/** Prints the first doc comment of `file` (the runner's usage) and exits. */
export function usage(file: string): never {
  process.stdout.write(fs.readFileSync(file, 'utf8').match(/\/\*\*([\s\S]*?)\*\//)![1]!.replace(/^ \* ?/gm, ''));
  process.exit(0);
}

/** A random-I/O case of blk-loadgen: `--cases randread:1,randwrite:32`. */
export type Rw = 'randread' | 'randwrite';
export interface IoCase {
  rw: Rw;
  iodepth: number;
}

/**
 * Walks a runner's command line: `next()` gives each option in turn, and the other methods read the
 * argument after it, throwing a message that names the option when it is missing or wrong.
 */
export class ArgReader {
  private index = -1;

  constructor(private readonly argv: readonly string[]) {}

  /** The next option, or undefined at the end. */
  next(): string | undefined {
    return this.argv[++this.index];
  }

  value(): string {
    const option = this.argv[this.index];
    const v = this.argv[++this.index];
    if (v === undefined) throw new Error(`${option} needs a value`);
    return v;
  }

  positive(): number {
    const v = Number(this.value());
    if (!(v > 0) || !Number.isFinite(v)) throw new Error(`${this.argv[this.index - 1]} needs a positive number`);
    return v;
  }

  nonNegative(): number {
    const v = Number(this.value());
    if (!(v >= 0) || !Number.isFinite(v)) throw new Error(`${this.argv[this.index - 1]} needs a number >= 0`);
    return v;
  }

  /** A size in bytes with an optional K, M, G or T suffix (powers of 1024). */
  size(): number {
    const text = this.value();
    const m = /^(\d+)([KMGT]?)$/i.exec(text);
    if (!m) throw new Error(`${this.argv[this.index - 1]}: not a size: ${text}`);
    return Number(m[1]) * 2 ** { '': 0, K: 10, M: 20, G: 30, T: 40 }[m[2]!.toUpperCase() as '' | 'K' | 'M' | 'G' | 'T'];
  }

  /** `randread:1,randwrite:32,...` */
  ioCases(): IoCase[] {
    return this.value()
      .split(',')
      .map((c) => {
        const m = /^(randread|randwrite):(\d+)$/.exec(c);
        if (!m) throw new Error(`${this.argv[this.index - 1]}: expected randread:N or randwrite:N, got ${c}`);
        return { rw: m[1] as Rw, iodepth: Number(m[2]) };
      });
  }
}

/** Writes a runner's results as JSON to `file` and says on stdout where they are. */
export function writeResults(file: string, report: unknown): void {
  fs.writeFileSync(file, `${JSON.stringify(report, null, 2)}\n`);
  process.stdout.write(`results: ${path.relative(process.cwd(), file) || file}\n`);
}

/**
 * Runs a runner: parses its command line (`parse` throws on a bad option: the message is logged and the
 * exit status is 2), runs `main` and exits with its status; an exception is reported through `log`
 * with its stack, and exits 1 (something failed to run).
 */
export function runMain<O>(parse: (argv: string[]) => O, main: (options: O) => Promise<number>, log: (message: string) => void): void {
  let options: O;
  try {
    options = parse(process.argv.slice(2));
  } catch (e) {
    log((e as Error).message);
    process.exit(2);
  }
  main(options).then(
    (code) => process.exit(code),
    (e: unknown) => {
      log(`failed: ${(e as Error).stack ?? String(e)}`);
      process.exit(1);
    },
  );
}

/** Builds build/bench/blk-loadgen and net-loadgen (bench/loadgen, make). */
export function buildLoadgens(): void {
  const r = spawnSync('make', ['-s', '-C', path.join(root, 'bench', 'loadgen'), `OUT_DIR=${buildDir}`], { stdio: ['ignore', 'inherit', 'inherit'] });
  if (r.error) throw new Error(`cannot run make: ${r.error.message}`);
  if (r.status !== 0) throw new Error('building bench/loadgen failed');
}

/** What blk-loadgen prints (the fields the runner uses; the JSON file keeps all of them). */
export interface LoadgenResult {
  iops: number;
  mb_s: number;
  ios: number;
  lat_us: { mean: number; p50: number; p90: number; p99: number; p999: number; max: number };
  loadgen_cpu_us_per_io: number;
  backend_cpu_us_per_io: number | null;
  kicks_per_io: number;
  wakeups_per_io: number;
  [key: string]: unknown;
}

/** A fully allocated image (tmpfs holes read as zeroes without touching memory, which flatters reads). */
export function createImage(file: string, size: number): void {
  const fd = fs.openSync(file, 'w');
  try {
    const chunk = Buffer.alloc(1 << 20);
    for (let i = 0; i < chunk.length; i += 8) chunk.writeUInt32LE((i * 2654435761) >>> 0, i);
    for (let off = 0; off < size; off += chunk.length) fs.writeSync(fd, chunk, 0, Math.min(chunk.length, size - off), off);
  } finally {
    fs.closeSync(fd);
  }
}

export interface Started {
  child: ChildProcess;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  logFile: string;
}

/**
 * Starts `cmd args` with its output in `logFile` and waits until `socket` exists (15 s at most).
 * `stdin` 'pipe' keeps a program that exits on end of input (testpmd) running.
 */
export async function startBackend(name: string, cmd: string, args: string[], socket: string, logFile: string, stdin: 'ignore' | 'pipe' = 'ignore'): Promise<Started> {
  fs.rmSync(socket, { force: true });
  const logFd = fs.openSync(logFile, 'w');
  const stdio: StdioOptions = [stdin, logFd, logFd];
  const child = spawn(cmd, args, { stdio });
  fs.closeSync(logFd);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once('exit', (code, signal) => resolve({ code, signal }));
    child.once('error', () => resolve({ code: -1, signal: null }));
  });
  let gone = false;
  void exited.then(() => (gone = true));
  const deadline = Date.now() + 15000;
  while (!fs.existsSync(socket)) {
    if (gone) throw new Error(`${name} exited before creating its socket; log ${logFile}:\n${tail(logFile)}`);
    if (Date.now() > deadline) {
      child.kill('SIGKILL');
      throw new Error(`${name} did not create ${socket} within 15 s; log ${logFile}:\n${tail(logFile)}`);
    }
    await sleep(20);
  }
  return { child, exited, logFile };
}

/** SIGTERM, then SIGKILL after 5 s; returns what went wrong, if anything. */
export async function stopBackend(s: Started, name: string): Promise<string | undefined> {
  if (s.child.exitCode !== null || s.child.signalCode !== null) {
    return `${name} had already exited (code ${s.child.exitCode}, signal ${s.child.signalCode})`;
  }
  s.child.kill('SIGTERM');
  const timer = sleep(5000).then(() => 'timeout' as const);
  const r = await Promise.race([s.exited, timer]);
  if (r === 'timeout') {
    s.child.kill('SIGKILL');
    await s.exited;
    return `${name} did not exit within 5 s of SIGTERM`;
  }
  return undefined;
}

export function tail(file: string, lines = 15): string {
  try {
    return fs.readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).map((l) => `    ${l}`).join('\n');
  } catch {
    return '    (no log)';
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Runs a program to its end, collecting its output; `onSpawn` gets its pid (to watch it meanwhile). */
export function runCapture(cmd: string, args: string[], onSpawn?: (pid: number) => void): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    if (child.pid !== undefined) onSpawn?.(child.pid);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', (e) => resolve({ code: -1, stdout, stderr: stderr + e.message }));
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** The element with the median `key` (the lower middle one for an even count). */
export function medianBy<T>(runs: T[], key: (run: T) => number): T | undefined {
  const sorted = [...runs].sort((a, b) => key(a) - key(b));
  return sorted[Math.floor((sorted.length - 1) / 2)];
}

/** The blk-loadgen run with the median IOPS (the lower middle one for an even count). */
export function medianIops<T extends LoadgenResult>(runs: T[]): T | undefined {
  return medianBy(runs, (r) => r.iops);
}

export function fmt(n: number | null | undefined, digits = 0): string {
  if (n === null || n === undefined || !Number.isFinite(n)) return 'n/a';
  return n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** A table: first column left-aligned, the others right-aligned. */
export function formatTable(header: string[], body: string[][]): string[] {
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join('  ');
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...body.map(line)];
}

/** Clock ticks per second of the CPU times in /proc (USER_HZ). */
export const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout?.trim()) || 100;

/**
 * utime + stime in seconds from a /proc stat file: `/proc/PID/stat` (the whole process, threads that
 * exited included) or `/proc/PID/task/TID/stat` (one thread); undefined when it is gone.
 */
export function statCpuSeconds(file: string): number | undefined {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    return undefined;
  }
  // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / CLK_TCK;
}

/** One thread's name (comm), CPU seconds and seconds spent runnable but waiting for a CPU, so far. */
export interface ThreadCpu {
  tid: number;
  name: string;
  seconds: number;
  /** schedstat's run_delay: time on a run queue, not running (another task had the CPU). */
  waitSeconds: number;
}

/** The CPU seconds of every live thread of `pid`. */
export function threadCpu(pid: number): ThreadCpu[] {
  let tids: string[];
  try {
    tids = fs.readdirSync(`/proc/${pid}/task`);
  } catch {
    return [];
  }
  return tids.flatMap((tid) => {
    const seconds = statCpuSeconds(`/proc/${pid}/task/${tid}/stat`);
    let name = '?';
    let waitSeconds = 0;
    try {
      name = fs.readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
      waitSeconds = Number(fs.readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[1]) / 1e9;
    } catch {
      // gone meanwhile
    }
    return seconds === undefined ? [] : [{ tid: Number(tid), name, seconds, waitSeconds }];
  });
}

/** The machine's CPU time so far (first line of /proc/stat), in ticks: all, and busy (not idle or iowait). */
export function machineTicks(): { total: number; busy: number } {
  const f = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1, 9).map(Number);
  const total = f.reduce((a, b) => a + b, 0);
  return { total, busy: total - f[3]! - f[4]! };
}

/** The lowest and highest of `values`, as "min–max" with `digits` decimals. */
export function range(values: number[], digits = 0): string {
  return values.length === 0 || values.some(Number.isNaN) ? 'n/a' : `${fmt(Math.min(...values), digits)}–${fmt(Math.max(...values), digits)}`;
}

/** The median of `values` (the lower middle one for an even count). */
export function median(values: number[]): number {
  return medianBy(values, (v) => v) ?? NaN;
}
