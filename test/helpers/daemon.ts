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

/** Start `build/daemons/<device>/main.js --socket-path <tmp>/<device>.sock ...args`. */
export async function startDaemon(device: string, args: readonly string[] = [], timeoutMs = 10_000): Promise<RunningDaemon> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vhostd-${device}-`));
  const socketPath = path.join(dir, `${device}.sock`);
  const main = path.join(repoRoot(), 'build', 'daemons', device, 'main.js');
  const child = spawn(process.execPath, [main, '--socket-path', socketPath, ...args], { stdio: ['ignore', 'inherit', 'pipe'], env: daemonEnv() });
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
      fs.rmSync(dir, { recursive: true, force: true });
    }
    return exited;
  };
  const deadline = Date.now() + timeoutMs;
  while (!fs.existsSync(socketPath)) {
    if (child.exitCode !== null || Date.now() > deadline) {
      await stop();
      throw new Error(`${device} daemon did not start listening (exit ${child.exitCode}): ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return { socketPath, process: child, stderr: () => stderr, stop };
}
