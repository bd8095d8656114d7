/**
 * The shipped systemd units: they verify cleanly, and the rng daemon really starts under socket
 * activation (systemd-socket-activate passes the listening socket as LISTEN_FDS) and serves entropy,
 * and with a second socket named "control" (LISTEN_FDNAMES) answers on it.
 */
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import test from 'ava';

import { ControlClient } from '../../lib/control/client';
import { daemonEnv } from '../helpers/daemon';
import { Frontend } from '../helpers/frontend';

const root = path.resolve(__dirname, '..', '..', '..');
const unitDir = path.join(root, 'systemd');
const rngMain = path.join(root, 'build', 'daemons', 'rng', 'main.js');

function have(command: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${command}`]).status === 0;
}

const units = fs.readdirSync(unitDir).filter((f) => f.endsWith('@.service'));

for (const unit of units) {
  const base = unit.replace('@.service', '');
  test(`${base}@.service, .socket and -control@.socket pass systemd-analyze verify`, (t) => {
    if (!have('systemd-analyze')) return t.fail('systemd-analyze missing: run scripts/install-deps.sh');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-units-'));
    try {
      // verify insists that ExecStart exists: point it at the built daemon, as an install would.
      const program = path.join(root, 'build', 'daemons', base.replace('vhost-user-', ''), 'main.js');
      const templates = [`${base}@.service`, `${base}@.socket`, `${base}-control@.socket`];
      for (const template of templates) {
        const text = fs.readFileSync(path.join(unitDir, template), 'utf8');
        fs.writeFileSync(path.join(dir, template), text.replace(/^ExecStart=\S+/m, `ExecStart=${process.execPath} ${program}`));
      }
      const instances = templates.map((name) => name.replace('@.', '@vm1.'));
      const result = spawnSync('systemd-analyze', ['verify', ...instances], { cwd: dir, encoding: 'utf8' });
      t.is(result.status, 0, result.stderr);
      t.is(result.stderr.trim(), '', 'no warnings');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
}

test('vhost-user-rng started by socket activation serves entropy on the passed socket', async (t) => {
  if (!have('systemd-socket-activate')) return t.fail('systemd-socket-activate missing: run scripts/install-deps.sh');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-activate-'));
  const socketPath = path.join(dir, 'rng.sock');
  const child = spawn('systemd-socket-activate', ['-l', socketPath, process.execPath, rngMain], { stdio: ['ignore', 'ignore', 'pipe'], env: daemonEnv() });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  try {
    for (let i = 0; i < 100 && !fs.existsSync(socketPath); i++) await new Promise((r) => setTimeout(r, 50));
    const frontend = Frontend.connect(socketPath);
    try {
      await frontend.negotiate();
      await frontend.setMemTable();
      await frontend.setupQueue(0, 64);
      const completion = await frontend.transfer(0, { writable: [{ length: 256 }] });
      t.is(completion.len, 256, 'the whole buffer is filled');
      t.true(new Set(completion.written).size > 16, 'the bytes are random, not constant');
    } finally {
      frontend.close();
    }
    t.regex(stderr, /serving rng on fd 3/);
  } finally {
    child.kill('SIGTERM');
    await new Promise((resolve) => child.once('exit', resolve));
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

test('vhost-user-rng under socket activation with a control socket: both sockets are served', async (t) => {
  if (!have('systemd-socket-activate')) return t.fail('systemd-socket-activate missing: run scripts/install-deps.sh');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-activate-'));
  const socketPath = path.join(dir, 'rng.sock');
  const controlPath = path.join(dir, 'rng-control.sock');
  // The names the socket units give (FileDescriptorName=), in the order the service lists them.
  const child = spawn('systemd-socket-activate', ['-l', socketPath, '-l', controlPath, '--fdname=vhost-user:control', process.execPath, rngMain], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: daemonEnv(),
  });
  let stderr = '';
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  try {
    for (let i = 0; i < 100 && !fs.existsSync(controlPath); i++) await new Promise((r) => setTimeout(r, 50));
    // The first connection (to the control socket) starts the daemon.
    const control = await ControlClient.connect(controlPath);
    const frontend = Frontend.connect(socketPath);
    try {
      const before = (await control.call('status')) as { device: string; frontend: { connected: boolean } };
      t.is(before.device, 'rng');
      await frontend.negotiate();
      await frontend.setMemTable();
      await frontend.setupQueue(0, 64);
      t.is((await frontend.transfer(0, { writable: [{ length: 32 }] })).len, 32);
      const after = (await control.call('status')) as { frontend: { connected: boolean }; queues: { requests: number }[] };
      t.true(after.frontend.connected);
      t.is(after.queues[0]?.requests, 1);
    } finally {
      frontend.close();
      control.close();
    }
    t.regex(stderr, /control socket on fd 4/);
    t.regex(stderr, /serving rng on fd 3/);
  } finally {
    child.kill('SIGTERM');
    await new Promise((resolve) => child.once('exit', resolve));
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
