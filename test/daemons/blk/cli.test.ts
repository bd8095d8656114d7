import test from 'ava';

import { toConfig, type BlkConfig } from '../../../daemons/blk/cli';
import { ConfigError } from '../../../lib/errors';

/** Arguments as yargs hands them over (defaults filled in). */
function args(over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    'read-only': false,
    serial: '',
    'num-queues': 1,
    'queue-size': 256,
    direct: false,
    discard: false,
    'write-zeroes': false,
    null: false,
    'null-size': '1G',
    ...over,
  };
}

const valid: [string, Record<string, unknown>, Partial<BlkConfig>][] = [
  ['defaults', { file: 'disk.img' }, { file: 'disk.img', readOnly: false, numQueues: 1, queueSize: 256, writeback: true, discard: false, logicalBlockSize: undefined }],
  ['read-only with a serial', { file: 'a.img', 'read-only': true, serial: 'SERIAL-0123456789ABC' }, { readOnly: true, serial: 'SERIAL-0123456789ABC' }],
  ['four queues of 1024', { file: 'a.img', 'num-queues': 4, 'queue-size': 1024 }, { numQueues: 4, queueSize: 1024 }],
  ['4096-byte blocks, O_DIRECT, discard, write zeroes', { file: '/dev/vg/lv', 'logical-block-size': 4096, direct: true, discard: true, 'write-zeroes': true }, { logicalBlockSize: 4096, direct: true, discard: true, writeZeroes: true }],
  ['writethrough', { file: 'a.img', writethrough: true }, { writeback: false }],
  ['--no-writeback', { file: 'a.img', writeback: false }, { writeback: false }],
  ['null backend', { null: true, 'null-size': '64M' }, { file: undefined, nullSize: 64 << 20 }],
];

for (const [name, given, expected] of valid) {
  test(`toConfig: ${name}`, (t) => {
    const config = toConfig(args(given));
    for (const [key, value] of Object.entries(expected)) t.deepEqual(config[key as keyof BlkConfig], value, key);
  });
}

const invalid: [string, Record<string, unknown>, ConfigError['code']][] = [
  ['no --file', {}, 'CONFIG_MISSING'],
  ['empty --file', { file: '' }, 'CONFIG_MISSING'],
  ['--null and --file', { null: true, file: 'a.img' }, 'CONFIG_CONFLICT'],
  ['--writeback and --writethrough', { file: 'a.img', writeback: true, writethrough: true }, 'CONFIG_CONFLICT'],
  ['--read-only and --discard', { file: 'a.img', 'read-only': true, discard: true }, 'CONFIG_CONFLICT'],
  ['--read-only and --write-zeroes', { file: 'a.img', 'read-only': true, 'write-zeroes': true }, 'CONFIG_CONFLICT'],
  ['--num-queues 0', { file: 'a.img', 'num-queues': 0 }, 'CONFIG_INVALID'],
  ['--num-queues 1.5', { file: 'a.img', 'num-queues': 1.5 }, 'CONFIG_INVALID'],
  ['--num-queues 65', { file: 'a.img', 'num-queues': 65 }, 'CONFIG_INVALID'],
  ['--queue-size 100', { file: 'a.img', 'queue-size': 100 }, 'CONFIG_INVALID'],
  ['--queue-size 65536', { file: 'a.img', 'queue-size': 65536 }, 'CONFIG_INVALID'],
  ['--queue-size NaN', { file: 'a.img', 'queue-size': NaN }, 'CONFIG_INVALID'],
  ['--logical-block-size 1024', { file: 'a.img', 'logical-block-size': 1024 }, 'CONFIG_INVALID'],
  ['--serial of 21 characters', { file: 'a.img', serial: 'x'.repeat(21) }, 'CONFIG_INVALID'],
  ['--serial with a non-ASCII character', { file: 'a.img', serial: 'dïsk' }, 'CONFIG_INVALID'],
  ['--null-size 12Q', { null: true, 'null-size': '12Q' }, 'CONFIG_INVALID'],
  ['--null-size 100', { null: true, 'null-size': '100' }, 'CONFIG_INVALID'],
];

for (const [name, given, code] of invalid) {
  test(`toConfig refuses ${name}`, (t) => {
    const err = t.throws(() => toConfig(args(given)), { instanceOf: ConfigError });
    t.is(err?.code, code);
    t.notRegex(err!.message, /\n/, 'one line');
  });
}
