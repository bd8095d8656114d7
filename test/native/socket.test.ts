import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import test from 'ava';

import { native, NativeError } from '../../native';
import { fdCount, nativeError, tempDir } from './helpers';

const enc = new TextEncoder();
const dec = new TextDecoder();

function send(fd: number, text: string, fds: number[] = []): number {
  const bytes = enc.encode(text);
  return native.sendMsg(fd, bytes, 0, bytes.length, fds);
}

// fd-counting tests are serial: ava runs them before the concurrent ones of this file.

test.serial('descriptors really pass over a socketpair: an eventfd written by the receiver is read by the sender', (t) => {
  const [a, b] = native.socketPair();
  const efd = native.eventfd(0);
  t.is(send(a, 'hello', [efd]), 5);

  const buf = new Uint8Array(64);
  const got = native.recvMsg(b, buf, 0, buf.length, 4);
  t.is(got.bytes, 5);
  t.is(dec.decode(buf.subarray(0, 5)), 'hello');
  t.is(got.fds.length, 1);
  const received = got.fds[0]!;
  t.not(received, efd, 'a new descriptor number for the same eventfd');

  native.eventfdWrite(received, 7);
  t.is(native.eventfdRead(efd), 7, 'the counter written through the passed fd is seen through the original');
  for (const fd of [a, b, efd, received]) native.close(fd);
});

test.serial('several descriptors arrive in order, and data lands at the requested offset', (t) => {
  const [a, b] = native.socketPair();
  const efds = [native.eventfd(1), native.eventfd(2), native.eventfd(3)];
  const payload = enc.encode('xxABCxx');
  t.is(native.sendMsg(a, payload, 2, 3, efds), 3);

  const buf = new Uint8Array(16).fill(0xee);
  const got = native.recvMsg(b, buf, 5, 8, 3);
  t.is(got.bytes, 3);
  t.deepEqual([...buf.subarray(4, 9)], [0xee, 65, 66, 67, 0xee]);
  t.is(got.fds.length, 3);
  t.deepEqual(
    got.fds.map((fd) => native.eventfdRead(fd)),
    [1, 2, 3],
  );
  for (const fd of [a, b, ...efds, ...got.fds]) native.close(fd);
});

test.serial('more descriptors than maxFds throws EMSGSIZE and leaks none', (t) => {
  const [a, b] = native.socketPair();
  const efds = [native.eventfd(0), native.eventfd(0), native.eventfd(0)];
  const before = fdCount();
  t.is(send(a, 'msg', efds), 3);
  const buf = new Uint8Array(16);
  const err = nativeError(() => native.recvMsg(b, buf, 0, buf.length, 1));
  t.true(err instanceof NativeError);
  t.is(err.code, 'EMSGSIZE');
  t.is(err.syscall, 'recvmsg');
  t.is(fdCount(), before, 'the one descriptor that did arrive was closed');

  // With no room at all, the same.
  t.is(send(a, 'msg', efds), 3);
  t.is(nativeError(() => native.recvMsg(b, buf, 0, buf.length, 0)).code, 'EMSGSIZE');
  t.is(fdCount(), before);
  for (const fd of [a, b, ...efds]) native.close(fd);
});

test.serial('listen, connect and accept a unix socket; a stale socket file is replaced', (t) => {
  const dir = tempDir();
  const sock = path.join(dir, 'vhost.sock');
  const first = native.listenUnix(sock, 4);
  native.close(first); // leaves the socket file behind
  const listener = native.listenUnix(sock, 4);
  t.true(native.isListeningUnixSocket(listener));
  t.is(native.accept(listener), -1, 'nothing pending');

  const client = native.connectUnix(sock);
  t.false(native.isListeningUnixSocket(client));
  const server = native.accept(listener);
  t.true(server >= 0);
  t.is(send(client, 'ping'), 4);
  const buf = new Uint8Array(8);
  const got = native.recvMsg(server, buf, 0, buf.length, 0);
  t.is(got.bytes, 4);
  t.deepEqual(got.fds, []);

  t.is(native.recvMsg(server, buf, 0, buf.length, 0).bytes, -1, 'EAGAIN is -1');
  native.close(client);
  t.is(native.recvMsg(server, buf, 0, buf.length, 0).bytes, 0, 'EOF is 0');
  for (const fd of [server, listener]) native.close(fd);
});

test('connecting to nothing throws ENOENT / ECONNREFUSED from connect', (t) => {
  const dir = tempDir();
  const err = nativeError(() => native.connectUnix(path.join(dir, 'missing.sock')));
  t.is(err.code, 'ENOENT');
  t.is(err.syscall, 'connect');
  const sock = path.join(dir, 'dead.sock');
  native.close(native.listenUnix(sock, 1));
  t.is(nativeError(() => native.connectUnix(sock)).code, 'ECONNREFUSED');
});

test('listenUnix does not unlink something that is not a socket', (t) => {
  const dir = tempDir();
  const file = path.join(dir, 'not-a-socket');
  fs.writeFileSync(file, 'keep me');
  const err = nativeError(() => native.listenUnix(file, 1));
  t.is(err.code, 'EADDRINUSE');
  t.is(fs.readFileSync(file, 'utf8'), 'keep me');
});

test('abstract-namespace sockets work for listen and connect', (t) => {
  const name = `@vhostd-test-${process.pid}-${Date.now()}`;
  const listener = native.listenUnix(name, 1);
  const client = native.connectUnix(name);
  const server = native.accept(listener);
  t.true(server >= 0);
  for (const fd of [client, server, listener]) native.close(fd);
});

test('isListeningUnixSocket is false for non-sockets and datagram sockets, throws on a bad fd', (t) => {
  const efd = native.eventfd(0);
  t.false(native.isListeningUnixSocket(efd));
  native.close(efd);
  const [a, b] = native.socketPair();
  t.false(native.isListeningUnixSocket(a));
  native.close(a);
  native.close(b);
  t.is(nativeError(() => native.isListeningUnixSocket(100000)).code, 'EBADF');
});

test('the peer closing makes sendMsg throw EPIPE (no SIGPIPE) and recvMsg of a reset socket throws', (t) => {
  const [a, b] = native.socketPair();
  native.close(b);
  const err = nativeError(() => send(a, 'x'));
  t.is(err.code, 'EPIPE');
  t.is(err.syscall, 'sendmsg');
  native.close(a);

  // Unread data at close makes the peer see ECONNRESET.
  const [c, d] = native.socketPair();
  send(c, 'unread');
  send(d, 'reply');
  native.close(d);
  const buf = new Uint8Array(16);
  // The data already queued ('reply') may come first; the reset is reported after it.
  const reset = nativeError(() => {
    for (let i = 0; i < 3; i++) native.recvMsg(c, buf, 0, buf.length, 0);
  });
  t.is(reset.code, 'ECONNRESET');
  t.is(reset.syscall, 'recvmsg');
  native.close(c);
});

test('a full socket buffer makes sendMsg return -1', (t) => {
  const [a, b] = native.socketPair();
  const chunk = new Uint8Array(65536);
  let sent = 0;
  let r = 0;
  while ((r = native.sendMsg(a, chunk, 0, chunk.length, [])) > 0) sent += r;
  t.is(r, -1);
  t.true(sent > 0);
  native.close(a);
  native.close(b);
});

test('setNonBlocking toggles O_NONBLOCK', (t) => {
  const [a, b] = native.socketPair();
  native.setNonBlocking(a, false);
  const flags = (): number => {
    const info = fs.readFileSync(`/proc/self/fdinfo/${a}`, 'utf8');
    return parseInt(/flags:\s*(\d+)/.exec(info)![1]!, 8);
  };
  t.is(flags() & 0o4000, 0);
  native.setNonBlocking(a, true);
  t.is(flags() & 0o4000, 0o4000);
  native.close(a);
  native.close(b);
});

test('errors carry code, errno and syscall', (t) => {
  const err = nativeError(() => native.close(100000));
  t.true(err instanceof NativeError);
  t.is(err.name, 'NativeError');
  t.is(err.code, 'EBADF');
  t.is(err.errno, 9);
  t.is(err.syscall, 'close');
  t.is(err.message, 'close: Bad file descriptor (EBADF)');
  t.is(nativeError(() => native.deviceSize(100000)).syscall, 'fstat');
});

test('wrong argument types throw TypeError, out-of-range buffers RangeError', (t) => {
  t.throws(() => native.close('3' as unknown as number), { instanceOf: TypeError });
  t.throws(() => native.setNonBlocking(0, 1 as unknown as boolean), { instanceOf: TypeError });
  t.throws(() => native.listenUnix(7 as unknown as string, 1), { instanceOf: TypeError });
  t.throws(() => native.close(1.5), { instanceOf: RangeError });
  const [a, b] = native.socketPair();
  const buf = new Uint8Array(8);
  t.throws(() => native.recvMsg(a, buf, 4, 5, 0), { instanceOf: RangeError });
  t.throws(() => native.sendMsg(a, buf, 9, 0, []), { instanceOf: RangeError });
  t.throws(() => native.sendMsg(a, new Uint16Array(4) as unknown as Uint8Array, 0, 1, []), { instanceOf: TypeError });
  t.throws(() => native.sendMsg(a, buf, 0, 1, ['x' as unknown as number]), { instanceOf: TypeError });
  native.close(a);
  native.close(b);
});

test('deviceSize reports the size of a memfd', (t) => {
  const fd = native.memfdCreate('size', 12345);
  t.is(native.deviceSize(fd), 12345);
  native.close(fd);
});

test('descriptors are close-on-exec', (t) => {
  const [a, b] = native.socketPair();
  const efd = native.eventfd(0);
  const mfd = native.memfdCreate('cloexec', 0);
  const out = spawnSync('ls', ['/proc/self/fd'], { encoding: 'utf8' }).stdout.split('\n');
  for (const fd of [a, b, efd, mfd]) t.false(out.includes(String(fd)), `fd ${fd} leaked into a child`);
  for (const fd of [a, b, efd, mfd]) native.close(fd);
});
