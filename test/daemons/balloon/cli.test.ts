import test from 'ava';

import { toConfig } from '../../../daemons/balloon/cli';
import { ConfigError } from '../../../lib/errors';

test('defaults: empty balloon, stats every 10 s, no deflate-on-oom, no reporting, queue size 256', (t) => {
  t.deepEqual(toConfig({}), { targetPages: 0, statsIntervalMs: 10_000, deflateOnOom: false, freePageReporting: false, queueSize: 256 });
});

test('--target takes a size and rounds it down to 4 KiB pages; the flags switch features on', (t) => {
  t.deepEqual(toConfig({ target: '512M', 'stats-interval': 0.5, 'deflate-on-oom': true, 'free-page-reporting': true, 'queue-size': 64 }), {
    targetPages: 131072,
    statsIntervalMs: 500,
    deflateOnOom: true,
    freePageReporting: true,
    queueSize: 64,
  });
  t.is(toConfig({ target: '10000' }).targetPages, 2);
  t.is(toConfig({ target: '16380G' }).targetPages, (16380 * 2 ** 30) / 4096);
});

const invalid: [string, Record<string, unknown>][] = [
  ['a target that is not a size', { target: '1Q' }],
  ['a negative target', { target: '-1' }],
  ['a target past 2^32 - 1 pages', { target: '16T' }],
  ['a negative stats interval', { 'stats-interval': -1 }],
  ['a stats interval over a day', { 'stats-interval': 86401 }],
  ['a stats interval that is not a number', { 'stats-interval': Number.NaN }],
  ['a queue size not a power of two', { 'queue-size': 100 }],
];
for (const [name, args] of invalid) {
  test(`rejects ${name} with a ConfigError`, (t) => {
    const err = t.throws(() => toConfig(args), { instanceOf: ConfigError });
    t.is(err?.code, 'CONFIG_INVALID');
    t.notRegex(err!.message, /\n/, 'one line');
  });
}
