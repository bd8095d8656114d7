/**
 * Run the built vhostctl (build/lib/cli/vhostctl.js) as an operator would, to its end.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';

import { repoRoot } from './guest-image';
import { Scrape, type MetricJson } from './scrape';

export interface VhostctlRun {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Asynchronous, so that a daemon or guest in this process's event loop keeps running meanwhile. */
export function vhostctl(...args: string[]): Promise<VhostctlRun> {
  const main = path.join(repoRoot(), 'build', 'lib', 'cli', 'vhostctl.js');
  const child = spawn(process.execPath, [main, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  return new Promise((resolve) => child.once('close', (status) => resolve({ status, stdout, stderr })));
}

/** The daemon's metrics through `vhostctl call metrics` on its control socket; throws when vhostctl fails. */
export async function controlMetrics(control: string): Promise<Scrape> {
  const run = await vhostctl('--control', control, '--json', 'call', 'metrics');
  if (run.status !== 0) throw new Error(`vhostctl call metrics exited with ${run.status}: ${run.stderr}`);
  return Scrape.fromJson((JSON.parse(run.stdout) as { metrics: MetricJson[] }).metrics);
}
