/**
 * Who may connect: the vhost-user socket and the control socket are 0600 (owner only) whatever the
 * umask, and 0660 with the group of --socket-group, so a front-end running as another user (libvirt's
 * qemu) can connect. Checked on real daemons, as an operator starts them.
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import test, { type ExecutionContext } from 'ava';

import { daemonEnv, startDaemon } from '../../helpers/daemon';
import { repoRoot } from '../../helpers/guest-image';

/** `daemon` exists on Debian and its derivatives (gid 1), which the tests run on. */
const GROUP = 'daemon';
const groupId = Number(spawnSync('getent', ['group', GROUP], { encoding: 'utf8' }).stdout.split(':')[2]);

async function sockets(t: ExecutionContext, args: string[]): Promise<{ vhostUser: fs.Stats; control: fs.Stats }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-perm-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const control = path.join(dir, 'control.sock');
  const daemon = await startDaemon('rng', ['--control', control, ...args]);
  t.teardown(() => daemon.stop());
  for (let i = 0; i < 100 && !fs.existsSync(control); i++) await new Promise((r) => setTimeout(r, 20));
  return { vhostUser: fs.statSync(daemon.socketPath), control: fs.statSync(control) };
}

test('both sockets are 0600 by default, even under umask 000', async (t) => {
  // The daemon inherits the umask; 000 would make a bound socket 0777 (anyone could connect).
  const umask = process.umask(0);
  let created;
  try {
    created = await sockets(t, []);
  } finally {
    process.umask(umask);
  }
  const { vhostUser, control } = created;
  for (const [name, st] of Object.entries({ vhostUser, control })) {
    t.true(st.isSocket(), name);
    t.is(st.mode & 0o777, 0o600, name);
    t.is(st.uid, process.getuid!(), name);
  }
});

test('--socket-group makes both sockets 0660 with that group', async (t) => {
  t.true(Number.isInteger(groupId), `group ${GROUP} exists here`);
  for (const group of [GROUP, String(groupId)]) {
    const { vhostUser, control } = await sockets(t, ['--socket-group', group]);
    for (const [name, st] of Object.entries({ vhostUser, control })) {
      t.is(st.mode & 0o777, 0o660, `${name} with --socket-group ${group}`);
      t.is(st.gid, groupId, `${name} with --socket-group ${group}`);
    }
  }
});

test('an unknown group, a control socket that cannot be created, or --socket-group without a socket to create: exit 1 with a message', (t) => {
  const main = path.join(repoRoot(), 'build', 'daemons', 'rng', 'main.js');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-perm-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const unknown = spawnSync(process.execPath, [main, '--socket-path', path.join(dir, 'rng.sock'), '--socket-group', 'no-such-group-vhostd'], {
    encoding: 'utf8',
    env: daemonEnv(),
  });
  t.is(unknown.status, 1);
  t.regex(unknown.stderr, /--socket-group no-such-group-vhostd: no such group/);
  t.false(fs.existsSync(path.join(dir, 'rng.sock')), 'no socket is left behind');

  const noDir = spawnSync(process.execPath, [main, '--socket-path', path.join(dir, 'rng.sock'), '--control', path.join(dir, 'missing', 'control.sock')], {
    encoding: 'utf8',
    env: daemonEnv(),
  });
  t.is(noDir.status, 1, noDir.stderr);
  t.regex(noDir.stderr, /cannot listen on .*control\.sock/);
  t.false(fs.existsSync(path.join(dir, 'rng.sock')), 'the vhost-user socket is removed again');

  const nothing = spawnSync(process.execPath, [main, '--connect', path.join(dir, 'qemu.sock'), '--socket-group', GROUP], { encoding: 'utf8', env: daemonEnv() });
  t.is(nothing.status, 1);
  t.regex(nothing.stderr, /--socket-group applies to the sockets the daemon creates/);
});
