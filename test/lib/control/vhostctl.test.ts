/**
 * vhostctl against real daemons (spawned as an operator would): what it prints, with and without
 * --json, and exit status 1 with a clear message for every failure.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import test, { type ExecutionContext } from 'ava';

import { RpcErrorCode } from '../../../lib/control/protocol';
import { native } from '../../../native';
import { startDaemon, type RunningDaemon } from '../../helpers/daemon';
import { Frontend } from '../../helpers/frontend';
import { vhostctl } from '../../helpers/vhostctl';

function tempDir(t: ExecutionContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-vhostctl-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

async function daemonWithControl(t: ExecutionContext, device: string, args: string[] = []): Promise<{ daemon: RunningDaemon; control: string }> {
  const control = path.join(tempDir(t), 'control.sock');
  const daemon = await startDaemon(device, ['--control', control, ...args]);
  t.teardown(() => daemon.stop());
  for (let i = 0; i < 100 && !fs.existsSync(control); i++) await new Promise((r) => setTimeout(r, 20));
  return { daemon, control };
}

test('status: the device, its front-end, negotiated features and queues, as text and as JSON', async (t) => {
  const { daemon, control } = await daemonWithControl(t, 'rng');
  const idle = await vhostctl('--control', control, 'status');
  t.is(idle.status, 0, idle.stderr);
  t.regex(idle.stdout, new RegExp(`^rng \\(pid ${daemon.process.pid}\\): front-end not connected\\n  queue 0: stopped`));

  const frontend = Frontend.connect(daemon.socketPath);
  t.teardown(() => frontend.close());
  const negotiated = await frontend.negotiate();
  await frontend.setMemTable();
  await frontend.setupQueue(0, 64);
  await frontend.transfer(0, { writable: [{ length: 64 }] });

  const text = await vhostctl('--control', control, 'status');
  t.is(text.status, 0, text.stderr);
  t.regex(text.stdout, /front-end connected/);
  t.regex(text.stdout, /queue 0: running, size 64, 1 kicks, 1 requests/);

  const json = await vhostctl('--control', control, '--json', 'status');
  t.is(json.status, 0, json.stderr);
  const status = JSON.parse(json.stdout) as { device: string; frontend: { connected: boolean; features: string; protocolFeatures: string }; queues: unknown[] };
  t.is(status.device, 'rng');
  t.deepEqual(status.frontend, {
    connected: true,
    features: `0x${negotiated.features.toString(16)}`,
    protocolFeatures: `0x${negotiated.protocolFeatures.toString(16)}`,
  });
  t.deepEqual(status.queues, [{ index: 0, size: 64, enabled: true, started: true, broken: false, kicks: 1, requests: 1 }]);
});

test('resize: blk re-reads a grown image and says so; unchanged says that', async (t) => {
  const image = path.join(tempDir(t), 'disk.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 1 << 20);
  const { control } = await daemonWithControl(t, 'blk', ['--file', image]);

  const same = await vhostctl('--control', control, 'resize');
  t.is(same.status, 0, same.stderr);
  t.is(same.stdout, 'blk: size unchanged, 2048 sectors (1048576 bytes)\n');

  fs.truncateSync(image, 4 << 20);
  const grown = await vhostctl('--control', control, 'resize');
  t.is(grown.status, 0, grown.stderr);
  t.is(grown.stdout, 'blk: resized from 2048 to 8192 sectors (4194304 bytes)\n');

  const json = await vhostctl('--control', control, '--json', '--device', 'blk', 'resize');
  t.deepEqual(JSON.parse(json.stdout), { device: 'blk', previousSectors: 8192, sectors: 8192, bytes: 4 << 20 });
});

test('set-target: the balloon takes a size, tells an attached guest, and status shows the balloon state', async (t) => {
  const { control, daemon } = await daemonWithControl(t, 'balloon', ['--target', '1M']);
  const before = await vhostctl('--control', control, 'status');
  t.is(before.status, 0, before.stderr);
  t.regex(before.stdout, /\n {2}targetPages: 256\n/);

  const idle = await vhostctl('--control', control, 'set-target', '512M');
  t.is(idle.status, 0, idle.stderr);
  t.is(
    idle.stdout,
    'balloon: target 536870912 bytes (131072 pages, was 256); the guest reports 0 pages\n  (no front-end was told: the guest reads the target when it next looks)\n',
  );

  const frontend = Frontend.connect(daemon.socketPath);
  t.teardown(() => frontend.close());
  await frontend.negotiate();
  await frontend.setBackendChannel();
  const told = await vhostctl('--control', control, '--json', 'set-target', '1G');
  t.is(told.status, 0, told.stderr);
  const result = JSON.parse(told.stdout) as { previousPages: number; targetPages: number; notified: boolean };
  t.like(result, { previousPages: 131072, targetPages: 262144, notified: true });
  await frontend.waitBackendMessage();

  const json = JSON.parse((await vhostctl('--control', control, '--json', 'status')).stdout) as { state: Record<string, unknown> };
  t.like(json.state, { targetPages: 262144, targetBytes: 1 << 30, actualPages: 0, balloonPages: 0, guestStatsAt: null });

  const bad = await vhostctl('--control', control, 'set-target', 'lots');
  t.is(bad.status, 1);
  t.regex(bad.stderr, /^vhostctl: set-target lots: expected a size/);
});

test('call: any method with JSON params; log-level changes what the daemon logs', async (t) => {
  const { daemon, control } = await daemonWithControl(t, 'rng');
  const set = await vhostctl('--control', control, '--json', 'call', 'log-level', '{"level":"debug"}');
  t.is(set.status, 0, set.stderr);
  t.deepEqual(JSON.parse(set.stdout), { device: 'rng', level: 'debug', previous: 'info' });
  // A debug line the daemon only writes at level debug: a front-end's messages.
  const frontend = Frontend.connect(daemon.socketPath);
  await frontend.negotiate();
  frontend.close();
  for (let i = 0; i < 100 && !/^debug: /m.test(daemon.stderr()); i++) await new Promise((r) => setTimeout(r, 20));
  t.regex(daemon.stderr(), /^debug: /m, 'debug lines appear without a restart');

  const metrics = await vhostctl('--control', control, '--json', 'call', 'metrics');
  t.is(metrics.status, 0, metrics.stderr);
  const { metrics: list } = JSON.parse(metrics.stdout) as { metrics: { name: string }[] };
  t.true(list.some((m) => m.name === 'vhostd_queue_requests_total'), 'the engine metrics are there');

  const methods = await vhostctl('--control', control, 'call', 'methods');
  t.is(methods.status, 0, methods.stderr);
  t.deepEqual(Object.keys(JSON.parse(methods.stdout) as object).sort(), ['log-level', 'methods', 'metrics', 'status']);
});

test('a JSON-RPC error is exit 1 with the message, and the error object with --json', async (t) => {
  const { control } = await daemonWithControl(t, 'rng');
  const unknown = await vhostctl('--control', control, 'resize');
  t.is(unknown.status, 1);
  t.regex(unknown.stderr, /^vhostctl: resize: no method "resize".*JSON-RPC error -32601/);

  const json = await vhostctl('--control', control, '--json', 'call', 'log-level', '{"level":"loud"}');
  t.is(json.status, 1);
  t.is((JSON.parse(json.stdout) as { error: { code: number } }).error.code, RpcErrorCode.INVALID_PARAMS);

  const other = await vhostctl('--control', control, '--device', 'blk', 'status');
  t.is(other.status, 1);
  t.regex(other.stderr, /no device "blk" here/);
});

test('no socket, nothing listening, bad params, no command: exit 1 with a clear message', async (t) => {
  const dir = tempDir(t);
  const missing = await vhostctl('--control', path.join(dir, 'none.sock'), 'status');
  t.is(missing.status, 1);
  t.regex(missing.stderr, /no control socket there/);

  // A socket file left by a daemon that is gone.
  const stale = path.join(dir, 'stale.sock');
  native.close(native.listenUnix(stale, 1));
  const dead = await vhostctl('--control', stale, 'status');
  t.is(dead.status, 1);
  t.regex(dead.stderr, /the daemon is not running/);
  const deadJson = await vhostctl('--control', stale, '--json', 'status');
  t.is((JSON.parse(deadJson.stdout) as { error: { code: string } }).error.code, 'CONTROL_NOT_RUNNING');

  const badParams = await vhostctl('--control', stale, 'call', 'log-level', '[1]');
  t.is(badParams.status, 1);
  t.regex(badParams.stderr, /expected a JSON object/);

  const noCommand = await vhostctl('--control', stale);
  t.is(noCommand.status, 1);
  t.regex(noCommand.stderr, /give a command/);
});
