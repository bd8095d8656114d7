/**
 * `npm run bench:rng`: entropy throughput through vhost-user-rng (a separate daemon process, driven
 * by the test front-end over a real socket with real rings) against its source, the kernel's
 * getrandom(2) called directly in this process (the same native call the daemon makes), measured in
 * the same run. Prints both rates and their ratio: what the daemon costs over its source.
 *
 *   node build/bench/rng.js [--seconds 3] [--buffer 4096] [--batch 64]
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { native } from '../native';
import { daemonEnv } from '../test/helpers/daemon';
import { Frontend } from '../test/helpers/frontend';

function option(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

const seconds = option('seconds', 3);
const bufferSize = option('buffer', 4096);
const batch = option('batch', 64);

async function throughDaemon(): Promise<number> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-bench-rng-'));
  const socketPath = path.join(dir, 'rng.sock');
  const daemon = spawn(process.execPath, [path.join(__dirname, '..', 'daemons', 'rng', 'main.js'), '--socket-path', socketPath, '--log-level', 'warn'], {
    env: daemonEnv(),
    stdio: ['ignore', 'inherit', 'inherit'],
  });
  try {
    for (let i = 0; i < 100 && !fs.existsSync(socketPath); i++) await new Promise((r) => setTimeout(r, 50));
    const frontend = Frontend.connect(socketPath);
    try {
      await frontend.negotiate();
      await frontend.setMemTable([{ gpa: 0, size: 64 << 20 }]);
      await frontend.setupQueue(0, 256);
      const chains = Array.from({ length: batch }, () => ({ writable: [{ length: bufferSize }] }));
      let bytes = 0;
      const start = performance.now();
      const end = start + seconds * 1000;
      while (performance.now() < end) {
        frontend.submit(0, chains);
        for (const completion of await frontend.collect(0, batch)) bytes += completion.len;
      }
      return bytes / ((performance.now() - start) / 1000);
    } finally {
      frontend.close();
    }
  } finally {
    daemon.kill('SIGTERM');
    await new Promise((resolve) => daemon.once('exit', resolve));
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function rawGetrandom(): number {
  const buffer = new Uint8Array(bufferSize);
  let bytes = 0;
  const start = performance.now();
  const end = start + seconds * 1000;
  while (performance.now() < end) {
    for (let i = 0; i < batch; i++) native.getrandom(buffer, 0, bufferSize);
    bytes += batch * bufferSize;
  }
  return bytes / ((performance.now() - start) / 1000);
}

async function main(): Promise<void> {
  const raw = rawGetrandom();
  const daemon = await throughDaemon();
  const mib = (rate: number) => `${(rate / 2 ** 20).toFixed(1)} MiB/s`;
  process.stdout.write(
    `rng throughput, ${bufferSize}-byte buffers, ${batch} per kick, ${seconds} s each\n` +
      `  raw getrandom (this process):  ${mib(raw)}\n` +
      `  through vhost-user-rng:        ${mib(daemon)}\n` +
      `  ratio daemon/raw:              ${(daemon / raw).toFixed(2)}\n`,
  );
}

main().catch((err: Error) => {
  process.stderr.write(`bench:rng failed: ${err.stack ?? err.message}\n`);
  process.exit(1);
});
