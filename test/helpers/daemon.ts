/**
 * Start a vhostd daemon as its own process (as systemd or an operator would) for a test, wait until
 * it listens, and stop it with SIGTERM afterwards, asserting nothing about how it ended: tests that
 * care read `exitCode` and `stderr`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { repoRoot } from './guest-image';

export interface RunningDaemon {
  readonly socketPath: string;
  readonly process: ChildProcess;
  /** Everything the daemon wrote to stderr so far. */
  stderr(): string;
  /** SIGTERM, wait for exit (SIGKILL after `graceMs`); returns the exit code (null if killed). */
  stop(graceMs?: number): Promise<number | null>;
}

/**
 * The environment for a daemon under test: ours minus VHOSTD_* variables, which the daemons read as
 * options (and refuse when unknown) while the test harness uses some for itself (VHOSTD_CACHE...).
 */
export function daemonEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('VHOSTD_')));
}

export interface StartDaemonOptions {
  /**
   * Listen on this path instead of `<fresh temp dir>/<device>.sock`, e.g. the path of a daemon that
   * was just stopped, so that a front-end with `reconnect` finds the new one. The caller owns its
   * directory: `stop()` then removes nothing but what the daemon itself does.
   */
  readonly socketPath?: string;
  /**
   * Hand the daemon this listening socket as fd 3 (`--fd 3`), as systemd socket activation does,
   * instead of `--socket-path`; `socketPath` must then name the socket's path. The caller keeps (and
   * closes) its own copy, so the socket outlives the daemon as a socket unit's does.
   */
  readonly listenFd?: number;
  /**
   * Connect out to a front-end listening on `socketPath` (`--connect`, e.g. DPDK virtio-user with
   * `server=1`) instead of listening; `socketPath` must be given.
   */
  readonly connect?: boolean;
  /** Run the daemon under this command, e.g. `['ip', 'netns', 'exec', NS]` (which execs it, same pid). */
  readonly prefix?: readonly string[];
}

/**
 * Start `build/daemons/<device>/main.js --socket-path <tmp>/<device>.sock ...args` (or the path of
 * `options.socketPath`).
 */
export async function startDaemon(
  device: string,
  args: readonly string[] = [],
  timeoutMs = 10_000,
  options: StartDaemonOptions = {},
): Promise<RunningDaemon> {
  const dir = options.socketPath === undefined ? fs.mkdtempSync(path.join(os.tmpdir(), `vhostd-${device}-`)) : undefined;
  const socketPath = options.socketPath ?? path.join(dir!, `${device}.sock`);
  // A socket file left at a reused path (a daemon that was SIGKILLed) is not the new daemon's: wait
  // for a new file there.
  const identity = (): string | undefined => {
    const st = fs.statSync(socketPath, { throwIfNoEntry: false, bigint: true });
    return st === undefined ? undefined : `${st.ino}:${st.ctimeNs}`;
  };
  const stale = identity();
  const main = path.join(repoRoot(), 'build', 'daemons', device, 'main.js');
  const { listenFd, connect = false } = options;
  if ((listenFd !== undefined || connect) && options.socketPath === undefined) throw new Error('startDaemon: listenFd and connect need socketPath');
  const [command, ...prefixArgs] = [...(options.prefix ?? []), process.execPath];
  const child =
    listenFd === undefined
      ? spawn(command!, [...prefixArgs, main, connect ? '--connect' : '--socket-path', socketPath, ...args], { stdio: ['ignore', 'inherit', 'pipe'], env: daemonEnv() })
      : spawn(command!, [...prefixArgs, main, '--fd', '3', ...args], { stdio: ['ignore', 'inherit', 'pipe', listenFd], env: daemonEnv() });
  let stderr = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let done = false;
  const stop = async (graceMs = 5000): Promise<number | null> => {
    if (!done) {
      done = true;
      child.kill('SIGTERM');
      const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
      await exited;
      clearTimeout(timer);
      if (dir !== undefined) fs.rmSync(dir, { recursive: true, force: true });
    }
    return exited;
  };
  const deadline = Date.now() + timeoutMs;
  const listening = (): boolean => {
    // An inherited socket listens already: wait for the daemon to say that it serves on it.
    if (listenFd !== undefined) return / serving .* on fd 3/.test(stderr);
    // A daemon that connects out makes no socket: it says when it serves.
    if (connect) return / serving .* on connect /.test(stderr);
    const now = identity();
    return now !== undefined && now !== stale;
  };
  while (!listening()) {
    if (child.exitCode !== null || Date.now() > deadline) {
      await stop();
      throw new Error(`${device} daemon did not start listening (exit ${child.exitCode}): ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return { socketPath, process: child, stderr: () => stderr, stop };
}
