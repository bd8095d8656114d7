/**
 * Boots a real Linux guest under QEMU (TCG) for one test script and returns its console.
 *
 * The guest is the cached image of `guest-image.ts`: /init loads the virtio modules, prints
 * `VHOSTD-GUEST-READY`, runs the test script as root in busybox sh, prints
 * `VHOSTD-GUEST-EXIT status=<exit status of the script>` and powers off. Only the serial console links
 * host and guest, so everything a test wants to check is printed by the script, preferably with the
 * markers of `GUEST_LIBRARY` (`mark`, `section`), which `GuestResult` finds again.
 *
 * Every run is bounded by a timeout (QEMU gets SIGKILL and the promise rejects with the console tail) and
 * leaves nothing behind: the per-run temp directory goes when the run settles, and QEMU processes still
 * running when this process exits are killed.
 *
 * Set `VHOSTD_GUEST_CONSOLE=1` to copy every guest console line to stderr as it arrives, and
 * `VHOSTD_GUEST_KEEP=1` to keep each run's initramfs (its directory is printed) to boot it again by hand.
 */
import { spawn, spawnSync, type ChildProcess, type ChildProcessByStdio } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { availableParallelism, tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';

import { GUEST_LIBRARY_PATH, GUEST_SCRIPT_PATH, guestImage, repoRoot, writeTestInitrd, type GuestFile, type GuestImage } from './guest-image';

export const DEFAULT_MEMORY = '256M';
export const DEFAULT_TIMEOUT_MS = 120_000;

/** The kernel command line of every run; `RunGuestOptions.append` adds to it. */
export const BASE_KERNEL_ARGS = 'console=ttyS0 quiet panic=-1';

const READY_MARKER = /VHOSTD-GUEST-READY uptime=([\d.]+)/;
const EXIT_MARKER = /VHOSTD-GUEST-EXIT status=(\d+)/;

/**
 * Shell functions every test script can use (sourced before it):
 * - `mark KEY VALUE...` prints `VHOSTD-MARK KEY=VALUE...`; read back with `GuestResult.mark(KEY)`.
 * - `section NAME CMD...` runs CMD with stderr folded into stdout between `VHOSTD-BEGIN NAME` and
 *   `VHOSTD-END NAME status=N`, and returns CMD's status; read back with `GuestResult.section(NAME)`.
 * - `wait_for SECONDS CMD...` retries CMD every 0.1 s until it succeeds; fails after SECONDS.
 */
export const GUEST_LIBRARY = `# vhostd e2e guest library (test/helpers/qemu-guest.ts)
mark() { _k=$1; shift; echo "VHOSTD-MARK $_k=$*"; }
section() {
  _n=$1; shift
  echo "VHOSTD-BEGIN $_n"
  "$@" 2>&1
  _s=$?
  echo "VHOSTD-END $_n status=$_s"
  return $_s
}
wait_for() {
  _t=$(( $1 * 10 )); shift
  until "$@"; do
    [ "$_t" -gt 0 ] || { echo "wait_for: timed out: $*" >&2; return 1; }
    _t=$(( _t - 1 )); sleep 0.1
  done
}
`;

export interface RunGuestOptions {
  /** The test script: busybox sh, run as root in /root. Its exit status is the guest's `exitStatus`. */
  readonly script: string;
  /** Extra QEMU arguments, typically the vhost-user devices under test (`-chardev ... -device ...`). */
  readonly qemuArgs?: readonly string[];
  /** Guest RAM, also the size of the shared memfd backend vhost-user maps; default `256M`. */
  readonly memory?: string;
  /**
   * Back guest RAM with this file (created by QEMU; on a hugetlbfs mount for huge pages) instead of a
   * memfd: `memory-backend-file,mem-path=<file>,share=on`.
   */
  readonly memoryFile?: string;
  /** Kill QEMU and reject after this long; default 120 s. */
  readonly timeoutMs?: number;
  /** Called with each console line as it arrives (without the line end). Throwing ends the run. */
  readonly onConsoleLine?: (line: string) => void;
  /** More files for the guest's root filesystem (test data, helper scripts). */
  readonly files?: readonly GuestFile[];
  /** Appended to `BASE_KERNEL_ARGS`. */
  readonly append?: string;
  /** The image to boot; default `guestImage()`. */
  readonly image?: GuestImage;
  /** The QEMU binary; default {@link qemuBinary} (e.g. the `binary` of {@link qemu102}). */
  readonly qemu?: string;
}

/** A section printed by the guest library's `section NAME CMD...`. */
export interface GuestSection {
  readonly output: string;
  readonly status: number;
}

export interface GuestResult {
  /** Everything QEMU printed on the serial console, line ends normalized to `\n`. */
  readonly console: string;
  /** What QEMU printed on its own stderr (warnings about devices, for example). */
  readonly qemuStderr: string;
  /** The QEMU command line, as a shell command. */
  readonly command: string;
  /** Exit status of the test script, from the `VHOSTD-GUEST-EXIT` marker. */
  readonly exitStatus: number;
  /** Guest uptime in seconds when /init started the script (the `VHOSTD-GUEST-READY` marker). */
  readonly guestBootSeconds: number | undefined;
  /** Wall time from spawning QEMU to the ready marker, and to QEMU's exit. */
  readonly bootMs: number | undefined;
  readonly durationMs: number;
  /** Console lines, in order. */
  lines(): string[];
  /** The value of the last `mark KEY ...`, or undefined. */
  mark(key: string): string | undefined;
  /** The values of every `mark KEY ...`, in order. */
  marks(key: string): string[];
  /** The output and status of the last finished `section NAME ...`, or undefined. */
  section(name: string): GuestSection | undefined;
  /** The last `n` console lines, for assertion messages. */
  tail(n?: number): string;
}

/** Raised when a run ends without the exit marker: timeout, QEMU failure, guest panic. */
export class GuestRunError extends Error {
  constructor(
    message: string,
    readonly code: 'GUEST_TIMEOUT' | 'GUEST_NO_EXIT_MARKER' | 'GUEST_QEMU_SPAWN' | 'GUEST_CONSOLE_CALLBACK',
    readonly console: string,
    readonly qemuStderr: string,
    /** QEMU's pid, gone by the time the error is thrown; undefined when it never started. */
    readonly pid: number | undefined,
  ) {
    super(message);
    this.name = 'GuestRunError';
  }
}

/** The QEMU system emulator to run: `$VHOSTD_QEMU` or `qemu-system-x86_64` from PATH. */
export function qemuBinary(): string {
  return process.env['VHOSTD_QEMU'] || 'qemu-system-x86_64';
}

let qemu102Check: { binary: string } | { missing: string } | undefined;

/**
 * QEMU 10.2, for the tests that need a front-end only it has (`vhost-user-test-device-pci`: the
 * balloon): `$VHOSTD_QEMU_10_2`, else the wrapper `scripts/qemu-10.2.sh` prints, which builds it into
 * the cache the first time (about 10 minutes; scripts/test.sh and .ci/run do that before ava starts,
 * and set `VHOSTD_QEMU_10_2`, or `VHOSTD_QEMU_10_2_ERROR` with the reason the build failed).
 */
export function qemu102(): { binary: string } | { missing: string } {
  if (qemu102Check !== undefined) return qemu102Check;
  const failed = process.env['VHOSTD_QEMU_10_2_ERROR'];
  let binary = process.env['VHOSTD_QEMU_10_2'];
  if (failed) {
    qemu102Check = { missing: `QEMU 10.2 could not be built: ${failed}` };
    return qemu102Check;
  }
  if (!binary) {
    const script = join(repoRoot(), 'scripts', 'qemu-10.2.sh');
    const r = spawnSync('bash', [script], { encoding: 'utf8', timeout: 60 * 60_000, maxBuffer: 64 << 20 });
    if (r.error !== undefined || r.status !== 0) {
      const tail = (r.stderr ?? '').trim().split('\n').slice(-5).join(' | ');
      qemu102Check = { missing: `scripts/qemu-10.2.sh failed (${r.error?.message ?? `exit status ${String(r.status)}`}): ${tail}` };
      return qemu102Check;
    }
    binary = r.stdout.trim().split('\n').pop() ?? '';
  }
  const v = spawnSync(binary, ['--version'], { encoding: 'utf8', timeout: 30_000 });
  qemu102Check =
    v.status === 0 && /^QEMU emulator version 10\.2/.test(v.stdout)
      ? { binary }
      : { missing: `${binary} is not QEMU 10.2 (${v.error?.message ?? (v.stdout.split('\n')[0] || v.stderr.trim())})` };
  return qemu102Check;
}

/**
 * The chardev option that makes QEMU reconnect after a second: `reconnect-ms=1000` from QEMU 9.2 on
 * (where `reconnect` is deprecated), `reconnect=1` before (7.2 knows only that one).
 */
export function reconnectOption(): string {
  const version = /version (\d+)\.(\d+)/.exec(spawnSync(qemuBinary(), ['--version'], { encoding: 'utf8' }).stdout ?? '');
  const [major, minor] = [Number(version?.[1] ?? 0), Number(version?.[2] ?? 0)];
  return major > 9 || (major === 9 && minor >= 2) ? 'reconnect-ms=1000' : 'reconnect=1';
}

let qemuCheck: { version: string } | { missing: string } | undefined;

/** Why guest tests cannot run here (no usable QEMU), or undefined when they can. */
export function qemuMissingReason(): string | undefined {
  if (qemuCheck === undefined) {
    const r = spawnSync(qemuBinary(), ['--version'], { encoding: 'utf8', timeout: 30_000 });
    if (r.error !== undefined || r.status !== 0) {
      const why = r.error?.message ?? `exit status ${String(r.status)}: ${r.stderr.trim()}`;
      qemuCheck = { missing: `${qemuBinary()} is not usable (${why}); run scripts/install-deps.sh` };
    } else {
      qemuCheck = { version: (r.stdout.split('\n')[0] ?? '').trim() };
    }
  }
  return 'missing' in qemuCheck ? qemuCheck.missing : undefined;
}

// QEMU children and temp dirs of runs in flight, released if the process exits first (an ava timeout,
// a crash): nothing may outlive the test process. A process killed by a signal runs no exit hook, so
// QEMU also starts under `setpriv --pdeathsig KILL` (util-linux) where that exists: the kernel kills it
// when its parent dies, however that happens.
const PDEATHSIG = ['/usr/bin/setpriv', '/bin/setpriv'].find((path) => existsSync(path));
const live = new Set<ChildProcess>();
const liveDirs = new Set<string>();
let exitHookInstalled = false;
function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  process.on('exit', () => {
    for (const child of live) child.kill('SIGKILL');
    for (const dir of liveDirs) rmSync(dir, { recursive: true, force: true });
    for (const slot of heldSlots) rmSync(slot, { force: true });
  });
}

// At most one guest per CPU runs at a time, across all test processes of this user: a TCG vCPU keeps a
// core busy, and oversubscribed guests boot several times slower and skew every timing a test measures.
// A slot is a file created with O_EXCL holding the owner's pid; a slot whose owner died is taken over.
// Two processes taking over the same dead slot at once can briefly run one guest too many; the limit is
// for speed, not correctness. Waiting for a slot does not count against a run's timeout.
const SLOT_DIR = join(tmpdir(), `vhostd-guest-slots-uid${process.getuid?.() ?? 0}`);
const heldSlots = new Set<string>();

async function acquireSlot(): Promise<string> {
  await mkdir(SLOT_DIR, { recursive: true });
  const slots = Math.max(1, availableParallelism());
  for (;;) {
    for (let i = 0; i < slots; i++) {
      const slot = join(SLOT_DIR, `slot-${i}`);
      try {
        await writeFile(slot, String(process.pid), { flag: 'wx' });
        heldSlots.add(slot);
        return slot;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      }
      // An empty file is a slot being taken right now, not a dead one.
      const owner = Number(await readFile(slot, 'utf8').catch(() => ''));
      if (owner > 0 && !processExists(owner)) await rm(slot, { force: true });
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

async function releaseSlot(slot: string): Promise<void> {
  heldSlots.delete(slot);
  await rm(slot, { force: true });
}

// Temp dirs are named after the pid that made them; those of dead processes (killed before their exit
// hook could run) are removed by the next run.
const TEMP_PREFIX = 'vhostd-guest-';
let sweptStaleDirs = false;
async function sweepStaleDirs(): Promise<void> {
  if (sweptStaleDirs) return;
  sweptStaleDirs = true;
  for (const name of await readdir(tmpdir()).catch(() => [])) {
    const pid = new RegExp(`^${TEMP_PREFIX}(\\d+)-`).exec(name)?.[1];
    if (pid !== undefined && !processExists(Number(pid))) {
      await rm(join(tmpdir(), name), { recursive: true, force: true });
    }
  }
}

function processExists(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The QEMU command line of a run, without the binary. */
export function qemuArgs(image: GuestImage, initrd: string, opts: Pick<RunGuestOptions, 'memory' | 'memoryFile' | 'append' | 'qemuArgs'>): string[] {
  const memory = opts.memory ?? DEFAULT_MEMORY;
  const append = opts.append ? `${BASE_KERNEL_ARGS} ${opts.append}` : BASE_KERNEL_ARGS;
  // vhost-user back-ends map guest RAM, so it must be a shareable fd.
  const backend =
    opts.memoryFile === undefined
      ? `memory-backend-memfd,id=mem,size=${memory},share=on`
      : `memory-backend-file,id=mem,size=${memory},mem-path=${opts.memoryFile},share=on`;
  return [
    '-accel', 'tcg',
    '-machine', 'q35,memory-backend=mem',
    '-object', backend,
    '-m', memory,
    '-nographic',
    '-no-reboot',
    '-kernel', image.kernel,
    '-initrd', initrd,
    '-append', append,
    '-nic', 'none',
    ...(opts.qemuArgs ?? []),
  ];
}

/**
 * Boots the guest, runs `opts.script` in it and resolves when the guest has powered off after printing
 * the exit marker, whatever the script's status (check `exitStatus`). Rejects with a `GuestRunError`
 * holding the console on timeout, when QEMU cannot start or exits early, or when the guest dies (panic)
 * before the marker.
 */
export async function runGuest(opts: RunGuestOptions): Promise<GuestResult> {
  const image = opts.image ?? (await guestImage());
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  await sweepStaleDirs();
  const dir = await mkdtemp(join(tmpdir(), `${TEMP_PREFIX}${process.pid}-`));
  installExitHook();
  liveDirs.add(dir);
  let keep = false;
  try {
    const initrd = join(dir, 'initrd.img');
    await writeTestInitrd(image, initrd, [
      { path: GUEST_LIBRARY_PATH, data: GUEST_LIBRARY },
      { path: GUEST_SCRIPT_PATH, data: `. ${GUEST_LIBRARY_PATH}\n${opts.script}\n`, mode: 0o755 },
      ...(opts.files ?? []),
    ]);
    keep = envFlag('VHOSTD_GUEST_KEEP');
    const slot = await acquireSlot();
    try {
      return await runQemu(opts.qemu ?? qemuBinary(), qemuArgs(image, initrd, opts), timeoutMs, opts.onConsoleLine);
    } finally {
      await releaseSlot(slot);
    }
  } finally {
    liveDirs.delete(dir);
    if (keep) {
      process.stderr.write(`runGuest: kept ${dir} (VHOSTD_GUEST_KEEP)\n`);
    } else {
      await rm(dir, { recursive: true, force: true });
    }
  }
}

function runQemu(qemu: string, args: string[], timeoutMs: number, onLine: ((line: string) => void) | undefined): Promise<GuestResult> {
  const echo = envFlag('VHOSTD_GUEST_CONSOLE');
  const command = [qemu, ...args].map(shellQuote).join(' ');
  const start = Date.now();
  return new Promise((resolve, reject) => {
    const lines: string[] = [];
    let partial = '';
    let stderr = '';
    let readyAt: number | undefined;
    let failure: GuestRunError | undefined;
    const text = (): string => [...lines, ...(partial ? [partial] : [])].join('\n');
    const tailOf = (n: number): string => text().split('\n').slice(-n).join('\n');
    const fail = (code: GuestRunError['code'], message: string): void => {
      if (failure !== undefined) return;
      failure = new GuestRunError(
        `${message}\n--- command ---\n${command}\n--- QEMU stderr ---\n${stderr.trim()}\n--- last console lines ---\n${tailOf(40)}`,
        code,
        text(),
        stderr,
        child.pid,
      );
      child.kill('SIGKILL');
    };

    const child = spawnQemu(qemu, args);
    const timer = setTimeout(() => fail('GUEST_TIMEOUT', `guest did not finish within ${timeoutMs} ms`), timeoutMs);

    const takeLine = (raw: string): void => {
      const line = raw.replace(/\r/g, '');
      lines.push(line);
      if (readyAt === undefined && READY_MARKER.test(line)) readyAt = Date.now();
      if (echo) process.stderr.write(`[guest] ${line}\n`);
      if (onLine !== undefined && failure === undefined) {
        try {
          onLine(line);
        } catch (err) {
          fail('GUEST_CONSOLE_CALLBACK', `onConsoleLine threw: ${(err as Error).stack ?? String(err)}`);
        }
      }
    };
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk: string) => {
      const parts = (partial + chunk).split('\n');
      partial = parts.pop() ?? '';
      for (const part of parts) takeLine(part);
    });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (chunk: string) => {
      stderr += chunk;
    });
    child.on('error', (err) => {
      fail('GUEST_QEMU_SPAWN', `cannot run ${qemu}: ${err.message}`);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      live.delete(child);
      if (partial !== '') {
        takeLine(partial);
        partial = '';
      }
      if (failure !== undefined) {
        reject(failure);
        return;
      }
      const consoleText = lines.join('\n');
      const exit = findLast(lines, EXIT_MARKER);
      if (exit === undefined) {
        fail('GUEST_NO_EXIT_MARKER', `QEMU exited (${signal ?? `code ${String(code)}`}) before the guest printed its exit marker`);
        reject(failure);
        return;
      }
      const ready = findLast(lines, READY_MARKER);
      resolve(makeResult({
        console: consoleText,
        qemuStderr: stderr,
        command,
        exitStatus: Number(exit[1]),
        guestBootSeconds: ready === undefined ? undefined : Number(ready[1]),
        bootMs: readyAt === undefined ? undefined : readyAt - start,
        durationMs: Date.now() - start,
      }));
    });
  });
}

/** QEMU with piped stdout and stderr, killed with this process (see `live` and PDEATHSIG). */
function spawnQemu(qemu: string, args: readonly string[]): ChildProcessByStdio<null, Readable, Readable> {
  const [command, ...rest] = diesWithParent([qemu, ...args]);
  const child = spawn(command!, rest, { stdio: ['ignore', 'pipe', 'pipe'] });
  live.add(child);
  return child;
}

/** `argv` under `setpriv --pdeathsig KILL` where that exists: the kernel kills it when this process dies. */
export function diesWithParent(argv: readonly string[]): string[] {
  return PDEATHSIG === undefined ? [...argv] : [PDEATHSIG, '--pdeathsig', 'KILL', '--', ...argv];
}

/** The values of every `VHOSTD-MARK KEY=...` in `lines`, in order (anywhere in a line: a kernel message may land mid-line). */
function marksIn(lines: readonly string[], key: string): string[] {
  const prefix = `VHOSTD-MARK ${key}=`;
  const values: string[] = [];
  for (const line of lines) {
    const at = line.indexOf(prefix);
    if (at >= 0) values.push(line.slice(at + prefix.length));
  }
  return values;
}

function findLast(lines: readonly string[], re: RegExp): RegExpExecArray | undefined {
  for (let i = lines.length - 1; i >= 0; i--) {
    const m = re.exec(lines[i]!);
    if (m !== null) return m;
  }
  return undefined;
}

type ResultData = Pick<GuestResult, 'console' | 'qemuStderr' | 'command' | 'exitStatus' | 'guestBootSeconds' | 'bootMs' | 'durationMs'>;

function makeResult(data: ResultData): GuestResult {
  const lines = data.console.split('\n');
  const marks = (key: string): string[] => marksIn(lines, key);
  return {
    ...data,
    lines: () => [...lines],
    marks,
    mark: (key) => marks(key).pop(),
    section: (name) => {
      const begin = `VHOSTD-BEGIN ${name}`;
      const end = new RegExp(`VHOSTD-END ${escapeRegExp(name)} status=(\\d+)`);
      for (let last = lines.length - 1; last >= 0; last--) {
        const m = end.exec(lines[last]!);
        if (m === null) continue;
        for (let first = last - 1; first >= 0; first--) {
          if (lines[first]!.endsWith(begin)) {
            return { output: lines.slice(first + 1, last).join('\n'), status: Number(m[1]) };
          }
        }
        return undefined;
      }
      return undefined;
    },
    tail: (n = 40) => lines.slice(-n).join('\n'),
  };
}

function envFlag(name: string): boolean {
  const value = process.env[name];
  return value === '1' || value === 'true';
}

function shellQuote(arg: string): string {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replace(/'/g, `'\\''`)}'`;
}

function escapeRegExp(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
}

/**
 * A long-running QEMU a test drives itself (over QMP, say) rather than waiting for its end as
 * {@link runGuest} does: its console lines as they come, its stderr, and `kill`. Like runGuest's QEMU it
 * dies with this process. The guest's `mark` lines are read with {@link QemuProcess.waitMark}.
 */
export class QemuProcess {
  readonly child: ChildProcessByStdio<null, Readable, Readable>;
  /** Console lines so far, line ends normalized. */
  readonly lines: string[] = [];
  private partial = '';
  private stderrText = '';
  private wakers: (() => void)[] = [];
  private readonly echo: string | undefined;

  /** `args` without the binary (e.g. from {@link qemuArgs}); `name` prefixes echoed console lines. */
  constructor(args: readonly string[], name = 'guest', qemu = qemuBinary()) {
    installExitHook();
    this.echo = envFlag('VHOSTD_GUEST_CONSOLE') ? name : undefined;
    this.child = spawnQemu(qemu, args);
    this.child.stdout.setEncoding('utf8');
    this.child.stdout.on('data', (text: string) => {
      const parts = (this.partial + text).split('\n');
      this.partial = parts.pop() ?? '';
      for (const raw of parts) {
        const line = raw.replace(/\r/g, '');
        this.lines.push(line);
        if (this.echo !== undefined) process.stderr.write(`[${this.echo}] ${line}\n`);
      }
      this.wake();
    });
    this.child.stderr.setEncoding('utf8');
    this.child.stderr.on('data', (text: string) => (this.stderrText += text));
    this.child.on('error', (err) => (this.stderrText += `cannot run ${qemu}: ${err.message}\n`));
    this.child.once('close', () => {
      live.delete(this.child);
      this.wake();
    });
  }

  get stderr(): string {
    return this.stderrText;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** The values of every `mark KEY ...` printed so far, in order. */
  marks(key: string): string[] {
    return marksIn(this.lines, key);
  }

  /**
   * The value of the first `mark KEY ...` that `accept` takes (any by default), waiting for it; throws
   * when QEMU ends or `timeoutMs` passes first.
   */
  async waitMark(key: string, timeoutMs: number, accept: (value: string) => boolean = () => true): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const value = this.marks(key).find(accept);
      if (value !== undefined) return value;
      if (!this.running || Date.now() > deadline) {
        throw new Error(`no mark ${key} (QEMU ${this.running ? 'still running' : 'ended'}): ${this.stderrText.trim()}\n${this.tail(30)}`);
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 500);
        this.wakers.push(() => {
          clearTimeout(timer);
          resolve();
        });
      });
    }
  }

  /** The last `n` console lines, for assertion messages. */
  tail(n = 40): string {
    return this.lines.slice(-n).join('\n');
  }

  /** SIGKILL (if still running) and wait for the process to go. */
  async kill(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const closed = new Promise((resolve) => this.child.once('close', resolve));
    this.child.kill('SIGKILL');
    await closed;
  }

  private wake(): void {
    for (const wake of this.wakers.splice(0)) wake();
  }
}
