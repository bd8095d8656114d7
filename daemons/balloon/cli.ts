/**
 * vhost-user-balloon command line: the device options and a pure `toConfig` (unit-tested without
 * spawning a process). Connection, metrics and logging options are shared: lib/cli/common-options.ts.
 */
import type { Options } from 'yargs';

import { parseSize } from '../../lib/cli/size';
import { ConfigError } from '../../lib/errors';
import { MAX_TARGET_PAGES } from './device';
import { BALLOON_PAGE_SIZE } from './inflate-deflate';

export const balloonOptions = {
  target: {
    type: 'string',
    default: '0',
    describe: 'Balloon size to ask of the guest at start: memory it gives back (e.g. 512M); change it with vhostctl set-target',
    group: 'Device:',
  },
  'stats-interval': {
    type: 'number',
    default: 10,
    describe: 'Ask the guest for fresh memory statistics every this many seconds (0: only on vhostctl call stats)',
    group: 'Device:',
  },
  'deflate-on-oom': {
    type: 'boolean',
    default: false,
    describe: 'Let the guest deflate the balloon when it runs out of memory (VIRTIO_BALLOON_F_DEFLATE_ON_OOM)',
    group: 'Device:',
  },
  'free-page-reporting': {
    type: 'boolean',
    default: false,
    describe: 'Release the memory the guest reports free (VIRTIO_BALLOON_F_REPORTING): memory comes back without a target',
    group: 'Device:',
  },
  'queue-size': {
    type: 'number',
    default: 256,
    describe: 'Largest virtqueue size accepted from the front-end',
    group: 'Device:',
  },
} satisfies Record<string, Options>;

export interface BalloonConfig {
  /** Balloon size asked for at start, in 4 KiB pages. */
  targetPages: number;
  /** 0: only on demand. */
  statsIntervalMs: number;
  deflateOnOom: boolean;
  freePageReporting: boolean;
  queueSize: number;
}

/** Largest --stats-interval: a day (setInterval takes at most 2^31-1 ms). */
const MAX_STATS_INTERVAL_S = 86400;

export function toConfig(args: Record<string, unknown>): BalloonConfig {
  const targetBytes = parseSize('--target', String(args.target ?? '0'));
  const targetPages = Math.floor(targetBytes / BALLOON_PAGE_SIZE);
  if (targetPages > MAX_TARGET_PAGES) {
    throw new ConfigError('CONFIG_INVALID', `--target ${String(args.target)}: the balloon holds at most ${MAX_TARGET_PAGES} pages of 4 KiB`);
  }
  const statsInterval = (args['stats-interval'] as number | undefined) ?? 10;
  if (typeof statsInterval !== 'number' || !Number.isFinite(statsInterval) || statsInterval < 0 || statsInterval > MAX_STATS_INTERVAL_S) {
    throw new ConfigError('CONFIG_INVALID', `--stats-interval ${String(statsInterval)}: expected seconds from 0 to ${MAX_STATS_INTERVAL_S}`);
  }
  const queueSize = (args['queue-size'] as number | undefined) ?? 256;
  if (!Number.isInteger(queueSize) || queueSize < 1 || queueSize > 32768 || (queueSize & (queueSize - 1)) !== 0) {
    throw new ConfigError('CONFIG_INVALID', `--queue-size ${queueSize}: expected a power of two from 1 to 32768`);
  }
  return {
    targetPages,
    statsIntervalMs: Math.round(statsInterval * 1000),
    deflateOnOom: args['deflate-on-oom'] === true,
    freePageReporting: args['free-page-reporting'] === true,
    queueSize,
  };
}
