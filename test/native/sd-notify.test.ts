import { spawn } from 'node:child_process';
import path from 'node:path';

import test from 'ava';

import { native } from '../../native';
import { nativeError, tempDir } from './helpers';

/** A python3 child bound to a datagram socket at `address`; resolves with the first datagram. */
async function receiver(address: string): Promise<{ message: Promise<string> }> {
  const script = `
import socket, sys
addr = sys.argv[1]
if addr.startswith('@'):
    addr = '\\0' + addr[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(addr)
print('ready', flush=True)
s.settimeout(10)
print(s.recv(4096).decode(), flush=True)
`;
  const child = spawn('python3', ['-c', script, address], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  let onLine: (() => void) | undefined;
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (chunk: string) => {
    out += chunk;
    onLine?.();
  });
  await new Promise<void>((resolve, reject) => {
    onLine = () => {
      if (out.includes('ready\n')) resolve();
    };
    child.on('exit', () => reject(new Error(`receiver exited: ${out}`)));
  });
  const message = new Promise<string>((resolve) => {
    child.on('exit', () => resolve(out.slice('ready\n'.length).replace(/\n$/, '')));
  });
  return { message };
}

test('sdNotify sends one datagram to a filesystem socket', async (t) => {
  const address = path.join(tempDir(), 'notify.sock');
  const r = await receiver(address);
  native.sdNotify(address, 'READY=1\nSTATUS=listening');
  t.is(await r.message, 'READY=1\nSTATUS=listening');
});

test('sdNotify reaches an abstract socket with a leading @', async (t) => {
  const address = `@vhostd-notify-${process.pid}-${Date.now()}`;
  const r = await receiver(address);
  native.sdNotify(address, 'WATCHDOG=1');
  t.is(await r.message, 'WATCHDOG=1');
});

test('sdNotify to nowhere throws from sendto', (t) => {
  const err = nativeError(() => native.sdNotify(path.join(tempDir(), 'none.sock'), 'READY=1'));
  t.is(err.code, 'ENOENT');
  t.is(err.syscall, 'sendto');
  t.is(nativeError(() => native.sdNotify('/' + 'x'.repeat(200), 'READY=1')).code, 'ENAMETOOLONG');
});
