import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import test from 'ava';

import { native, POLL_READABLE, POLL_WRITABLE } from '../../native';
import { until } from '../helpers/until';
import { run, tempDir } from './helpers';

const tick = (ms = 20): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));

test('eventfd: read returns and resets the counter, 0 when empty', (t) => {
  const fd = native.eventfd(3);
  native.eventfdWrite(fd, 4);
  t.is(native.eventfdRead(fd), 7);
  t.is(native.eventfdRead(fd), 0);
  native.close(fd);
  t.is(
    (() => {
      try {
        native.eventfdRead(fd);
        return 'no error';
      } catch (err) {
        return (err as { code: string }).code;
      }
    })(),
    'EBADF',
  );
});

test('watch fires on an eventfd write, once per wakeup, and stop() stops it', async (t) => {
  const fd = native.eventfd(0);
  const seen: number[] = [];
  const watcher = native.watch(fd, POLL_READABLE, (events) => {
    seen.push(events);
    native.eventfdRead(fd); // level-triggered: consume, or it fires again
  });
  await tick();
  t.deepEqual(seen, [], 'nothing before a write');

  native.eventfdWrite(fd, 1);
  await until(() => seen.length === 1, 'the first callback');
  t.deepEqual(seen, [POLL_READABLE]);

  native.eventfdWrite(fd, 1);
  await until(() => seen.length === 2, 'the second callback');
  await tick();
  t.is(seen.length, 2, 'one callback per wakeup');

  watcher.stop();
  watcher.stop(); // idempotent
  native.eventfdWrite(fd, 1);
  await tick();
  t.is(seen.length, 2, 'no callback after stop()');
  t.is(native.eventfdRead(fd), 1, 'the write after stop() was not consumed');
  native.close(fd);
});

test('stop() from inside the callback stops further callbacks', async (t) => {
  const fd = native.eventfd(1);
  let calls = 0;
  const watcher = native.watch(fd, POLL_READABLE, () => {
    calls++;
    watcher.stop(); // the counter stays non-zero: a live watch would fire again and again
  });
  await until(() => calls === 1, 'the callback');
  await tick(50);
  t.is(calls, 1);
  native.close(fd);
});

test('writable readiness is reported', async (t) => {
  const [a, b] = native.socketPair();
  const events = await new Promise<number>((resolve) => {
    const w = native.watch(a, POLL_WRITABLE, (ev) => {
      w.stop();
      resolve(ev);
    });
  });
  t.is(events, POLL_WRITABLE);
  native.close(a);
  native.close(b);
});

test('a poll error is delivered as the watched events plus UV_DISCONNECT (4)', async (t) => {
  // The write end of a FIFO whose reader went away polls as POLLERR.
  const fifo = path.join(tempDir(), 'fifo');
  execFileSync('mkfifo', [fifo]);
  const reader = fs.openSync(fifo, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
  const writer = fs.openSync(fifo, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  fs.closeSync(reader);
  const events = await new Promise<number>((resolve) => {
    const w = native.watch(writer, POLL_WRITABLE, (ev) => {
      w.stop();
      resolve(ev);
    });
  });
  t.is(events, POLL_WRITABLE | 4);
  fs.closeSync(writer);
});

test('watch of an fd that cannot be polled throws from uv_poll_init', (t) => {
  const file = path.join(tempDir(), 'regular');
  fs.writeFileSync(file, 'x');
  const fd = fs.openSync(file, 'r');
  const err = t.throws(() => native.watch(fd, POLL_READABLE, () => undefined)) as unknown as { code: string; syscall: string };
  t.is(err.code, 'EPERM');
  t.is(err.syscall, 'uv_poll_init');
  fs.closeSync(fd);
  t.throws(() => native.watch(0, POLL_READABLE, 'nope' as unknown as () => void), { instanceOf: TypeError });
});

test('an exception thrown by the callback surfaces as an uncaught exception', async (t) => {
  const index = path.resolve(__dirname, '..', '..', 'native', 'index.js');
  const script = `
    const { native, POLL_READABLE } = require(${JSON.stringify(index)});
    const fd = native.eventfd(1);
    let w;
    process.on('uncaughtException', (err) => {
      console.log('caught: ' + err.message);
      w.stop();
      native.close(fd);
    });
    w = native.watch(fd, POLL_READABLE, () => { throw new Error('boom'); });
  `;
  const out = await run(process.execPath, ['-e', script]);
  t.is(out.status, 0, out.stderr);
  t.is(out.stdout.trim(), 'caught: boom');

  // Without a handler the process dies with the error, as for any uncaught exception.
  const crash = await run(process.execPath, ['-e', script.replace(/process\.on[\s\S]*?\}\);/, '')]);
  t.not(crash.status, 0);
  t.regex(crash.stderr, /boom/);
});

test('a forgotten watcher does not keep its callback from running, and GC does not break it', async (t) => {
  const fd = native.eventfd(0);
  let calls = 0;
  let watcher: { stop(): void } | undefined = native.watch(fd, POLL_READABLE, () => {
    calls++;
    native.eventfdRead(fd);
  });
  const stop = watcher.stop.bind(watcher);
  watcher = undefined;
  (globalThis as { gc?: () => void }).gc?.();
  native.eventfdWrite(fd, 1);
  await until(() => calls === 1, 'the callback of the unreferenced watcher');
  t.is(calls, 1);
  stop();
  native.close(fd);
});
