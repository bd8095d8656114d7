import test from 'ava';

import { toConfig } from '../../../daemons/net/cli';
import { netQueueWorkers } from '../../../daemons/net/main';
import { ConfigError } from '../../../lib/errors';

test('defaults: one queue pair on the main thread, MTU 1500, queue size 1024', (t) => {
  t.deepEqual(toConfig({ tap: 'vm1tap0' }), { tap: 'vm1tap0', createTap: false, queuePairs: 1, threads: 0, mtu: 1500, queueSize: 1024, txUring: true });
  t.is(netQueueWorkers(toConfig({ tap: 'vm1tap0' })), undefined);
});

test('--queues 4 --threads 8: at most one thread per queue pair', (t) => {
  const config = toConfig({ tap: 'vm1tap0', queues: 4, threads: 8, mtu: 9000, 'create-tap': true });
  t.like(config, { queuePairs: 4, threads: 8, mtu: 9000, createTap: true });
  t.like(netQueueWorkers(config), { threads: 4, exportName: 'createNetDeviceForWorker' });
});

test('no --tap: the error says how to make one', (t) => {
  const err = t.throws(() => toConfig({}), { instanceOf: ConfigError });
  t.is(err?.code, 'CONFIG_MISSING');
  t.regex(err?.message ?? '', /ip tuntap add dev NAME mode tap multi_queue vnet_hdr/);
});

const invalid: [string, Record<string, unknown>][] = [
  ['a name over 15 characters', { tap: 'a-very-long-tap-name' }],
  ['a name with a slash', { tap: '../eth0' }],
  ['zero queue pairs', { tap: 't', queues: 0 }],
  ['257 queue pairs', { tap: 't', queues: 257 }],
  ['negative threads', { tap: 't', threads: -1 }],
  ['an MTU under 68', { tap: 't', mtu: 67 }],
  ['an MTU over 65535', { tap: 't', mtu: 65536 }],
  ['a queue size not a power of two', { tap: 't', 'queue-size': 100 }],
];
for (const [name, args] of invalid) {
  test(`rejects ${name} with a ConfigError`, (t) => {
    const err = t.throws(() => toConfig(args), { instanceOf: ConfigError });
    t.is(err?.code, 'CONFIG_INVALID');
  });
}
