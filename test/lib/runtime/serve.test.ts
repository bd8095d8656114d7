/**
 * The three ways a daemon meets its front-end: listening on a path, an inherited listening fd
 * (systemd socket activation), and connecting out to a front-end that listens (QEMU
 * `-chardev socket,server=on`), reconnecting after every disconnect.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import test from 'ava';

import { ConfigError } from '../../../lib/errors';
import { serve } from '../../../lib/runtime/serve';
import { native, POLL_READABLE } from '../../../native';
import { Frontend } from '../../helpers/frontend';
import { TestDevice } from '../../helpers/test-device';
import { pattern } from '../vhost-user/harness';

function tempSocket(t: import('ava').ExecutionContext): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-serve-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return path.join(dir, 'frontend.sock');
}

/** Accept the next connection on a listening fd (the front-end side of --connect). */
function acceptNext(listenFd: number, timeoutMs = 5000): Promise<number> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      watcher.stop();
      reject(new Error('the daemon did not connect'));
    }, timeoutMs);
    const watcher = native.watch(listenFd, POLL_READABLE, () => {
      const fd = native.accept(listenFd);
      if (fd < 0) return;
      clearTimeout(timer);
      watcher.stop();
      resolve(fd);
    });
  });
}

/** A short session proving the connection works: negotiate, memory, one chain through queue 0. */
async function exchange(t: import('ava').ExecutionContext, fe: Frontend): Promise<void> {
  await fe.negotiate();
  await fe.setMemTable();
  await fe.setupQueue(0, 16);
  const done = await fe.transfer(0, { readable: [{ data: pattern(32, 3) }], writable: [{ length: 32 }] });
  t.is(done.len, 32);
}

test('--connect: the daemon dials a listening front-end and dials again after it leaves', async (t) => {
  const socketPath = tempSocket(t);
  const listenFd = native.listenUnix(socketPath, 4);
  t.teardown(() => native.close(listenFd));
  const server = await serve(new TestDevice(), { connect: socketPath, reconnectDelayMs: 50 });
  t.teardown(() => server.close());

  const first = new Frontend(await acceptNext(listenFd));
  await exchange(t, first);
  first.close();

  const second = new Frontend(await acceptNext(listenFd));
  t.teardown(() => second.close());
  await exchange(t, second);
});

test('--connect keeps retrying while nothing listens yet', async (t) => {
  const socketPath = tempSocket(t);
  const server = await serve(new TestDevice(), { connect: socketPath, reconnectDelayMs: 50 });
  t.teardown(() => server.close());
  await new Promise((r) => setTimeout(r, 200)); // several failed attempts
  const listenFd = native.listenUnix(socketPath, 4);
  t.teardown(() => native.close(listenFd));
  const fe = new Frontend(await acceptNext(listenFd));
  t.teardown(() => fe.close());
  await exchange(t, fe);
});

test('--fd: an inherited listening socket is served; anything else is a ConfigError', async (t) => {
  const socketPath = tempSocket(t);
  const listenFd = native.listenUnix(socketPath, 4);
  const server = await serve(new TestDevice(), { fd: listenFd });
  t.teardown(() => server.close()); // closes listenFd
  const fe = Frontend.connect(socketPath);
  t.teardown(() => fe.close());
  await exchange(t, fe);

  const eventFd = native.eventfd(0);
  t.teardown(() => native.close(eventFd));
  const err = await t.throwsAsync(serve(new TestDevice(), { fd: eventFd }), { instanceOf: ConfigError });
  t.is(err?.code, 'CONFIG_INVALID');
});

test('exactly one of socket path, fd and connect', async (t) => {
  const err = await t.throwsAsync(serve(new TestDevice(), { socketPath: '/tmp/a.sock', connect: '/tmp/b.sock' }), { instanceOf: ConfigError });
  t.is(err?.code, 'CONFIG_CONFLICT');
});
