import test from 'ava';

import { toConfig } from '../../../daemons/rng/cli';
import { ConfigError } from '../../../lib/errors';

test('defaults: getrandom, no rate limit, queue size 1024', (t) => {
  t.deepEqual(toConfig({}), { source: undefined, rateLimit: undefined, queueSize: 1024 });
});

test('--max-bytes with --period-ms gives a rate limit', (t) => {
  t.deepEqual(toConfig({ 'max-bytes': 4096, 'period-ms': 500, source: '/dev/hwrng' }), {
    source: '/dev/hwrng',
    rateLimit: { maxBytes: 4096, periodMs: 500 },
    queueSize: 1024,
  });
});

const invalid: [string, Record<string, unknown>][] = [
  ['zero max-bytes', { 'max-bytes': 0 }],
  ['fractional max-bytes', { 'max-bytes': 1.5 }],
  ['negative period', { 'max-bytes': 10, 'period-ms': -1 }],
  ['queue size not a power of two', { 'queue-size': 100 }],
  ['queue size too large', { 'queue-size': 65536 }],
  ['empty source', { source: '' }],
];
for (const [name, args] of invalid) {
  test(`rejects ${name} with a ConfigError`, (t) => {
    const err = t.throws(() => toConfig(args), { instanceOf: ConfigError });
    t.is(err?.code, 'CONFIG_INVALID');
  });
}
