/**
 * vhost-user-rng command line: the device options and a pure `toConfig` (unit-tested without
 * spawning a process). Connection, metrics and logging options are shared: lib/cli/common-options.ts.
 */
import type { Options } from 'yargs';

import { ConfigError } from '../../lib/errors';
import type { RateLimit } from './rate-limiter';

export const rngOptions = {
  source: {
    type: 'string',
    describe: 'Read entropy from this file or device (e.g. /dev/hwrng) instead of getrandom(2)',
    group: 'Device:',
  },
  'max-bytes': {
    type: 'number',
    describe: 'Rate limit: at most this many bytes per --period-ms (like QEMU virtio-rng max-bytes)',
    group: 'Device:',
  },
  'period-ms': {
    type: 'number',
    default: 1000,
    describe: 'Rate limit period in milliseconds',
    group: 'Device:',
  },
  'queue-size': {
    type: 'number',
    default: 1024,
    describe: 'Largest virtqueue size accepted from the front-end',
    group: 'Device:',
  },
} satisfies Record<string, Options>;

export interface RngConfig {
  /** Entropy file or device; undefined means getrandom. */
  source?: string;
  rateLimit?: RateLimit;
  queueSize: number;
}

export function toConfig(args: Record<string, unknown>): RngConfig {
  const maxBytes = args['max-bytes'] as number | undefined;
  const periodMs = (args['period-ms'] as number | undefined) ?? 1000;
  const queueSize = (args['queue-size'] as number | undefined) ?? 1024;
  if (maxBytes !== undefined && (!Number.isInteger(maxBytes) || maxBytes <= 0)) {
    throw new ConfigError('CONFIG_INVALID', `--max-bytes ${maxBytes}: expected a positive whole number of bytes`);
  }
  if (!Number.isInteger(periodMs) || periodMs <= 0) {
    throw new ConfigError('CONFIG_INVALID', `--period-ms ${periodMs}: expected a positive whole number of milliseconds`);
  }
  if (!Number.isInteger(queueSize) || queueSize < 1 || queueSize > 32768 || (queueSize & (queueSize - 1)) !== 0) {
    throw new ConfigError('CONFIG_INVALID', `--queue-size ${queueSize}: expected a power of two from 1 to 32768`);
  }
  const source = args.source as string | undefined;
  if (source === '') throw new ConfigError('CONFIG_INVALID', '--source: expected a path');
  return {
    source,
    rateLimit: maxBytes === undefined ? undefined : { maxBytes, periodMs },
    queueSize,
  };
}
