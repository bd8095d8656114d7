/**
 * The blk daemon's own Prometheus metrics (`vhostd_blk_*`, listed in daemons/blk/README.md). The
 * datapath only adds to the plain numbers of a {@link BlkQueueStats} per queue; the metrics read them
 * in `collect()` at scrape time. Labels: `queue` (the queue index) and `type` (7 values), besides the
 * registry's default `device` label.
 */
import { Gauge, type Registry } from 'prom-client';

import type { IoEngineStats } from '../../lib/io/engine';
import { queueCounter, queueCountsCounter } from '../../lib/metrics/collected';
import { ioEngineCounters } from '../../lib/metrics/io-engine';

import {
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from './virtio-blk';

/** Values of the `type` label, indexed by {@link requestTypeIndex}. */
export const REQUEST_TYPES = ['read', 'write', 'flush', 'discard', 'write_zeroes', 'get_id', 'unsupported'] as const;

/** Index into {@link REQUEST_TYPES} of a request type as the driver wrote it (virtio 1.2 §5.2.6). */
export function requestTypeIndex(type: number): number {
  switch (type) {
    case VIRTIO_BLK_T_IN:
      return 0;
    case VIRTIO_BLK_T_OUT:
      return 1;
    case VIRTIO_BLK_T_FLUSH:
      return 2;
    case VIRTIO_BLK_T_DISCARD:
      return 3;
    case VIRTIO_BLK_T_WRITE_ZEROES:
      return 4;
    case VIRTIO_BLK_T_GET_ID:
      return 5;
    default:
      return 6;
  }
}

/** One queue's counters: plain numbers, cumulative for the life of the device. */
export class BlkQueueStats {
  /** Requests completed or started, by {@link requestTypeIndex}. */
  readonly requests = new Float64Array(REQUEST_TYPES.length);
  /** Bytes read from the image by READ requests. */
  readBytes = 0;
  /** Bytes written to the image by WRITE requests. */
  writtenBytes = 0;
  /** Requests completed with VIRTIO_BLK_S_IOERR. */
  ioErrors = 0;
}

/** What the metrics read from the device at scrape time. */
export interface BlkMetricsSource {
  readonly numQueues: number;
  queueStats(index: number): BlkQueueStats;
  /** How queue `index`'s I/O ops ran (lib/io/engine.ts). */
  engineStats(index: number): IoEngineStats;
  /** Requests of queue `index` whose I/O is in flight. */
  inFlight(index: number): number;
  /** Capacity the guest sees, in bytes (whole logical blocks of the image). */
  readonly limits: { readonly capacityBytes: number };
  /** The active executor: "io_uring", "thread-pool", "null" (lib/io/executor.ts). */
  readonly executorKind: string;
}

/** Register the `vhostd_blk_*` metrics of `device` in `registry`. */
export function createBlkMetrics(registry: Registry, device: BlkMetricsSource) {
  const count = () => device.numQueues;
  const perQueue = (name: string, help: string, read: (s: BlkQueueStats) => number) =>
    queueCounter(registry, name, help, count, (q) => read(device.queueStats(q)));
  return {
    requests: queueCountsCounter(
      registry,
      'vhostd_blk_requests_total',
      'virtio-blk requests received, by request type (unsupported: any type the device does not implement)',
      'type',
      REQUEST_TYPES,
      count,
      (q) => device.queueStats(q).requests,
    ),
    readBytes: perQueue('vhostd_blk_read_bytes_total', 'Bytes read from the image by read requests', (s) => s.readBytes),
    writtenBytes: perQueue('vhostd_blk_written_bytes_total', 'Bytes written to the image by write requests', (s) => s.writtenBytes),
    ioErrors: perQueue('vhostd_blk_io_errors_total', 'Requests completed with VIRTIO_BLK_S_IOERR (failed host I/O, or refused: out of range, misaligned, write to a read-only disk)', (s) => s.ioErrors),
    ...ioEngineCounters(registry, 'vhostd_blk', count, (q) => device.engineStats(q)),
    inFlight: new Gauge({
      name: 'vhostd_blk_requests_in_flight',
      help: 'Requests whose I/O on the image has not completed yet',
      labelNames: ['queue'],
      registers: [registry],
      collect() {
        for (let q = 0; q < device.numQueues; q++) this.set({ queue: String(q) }, device.inFlight(q));
      },
    }),
    capacity: new Gauge({
      name: 'vhostd_blk_capacity_bytes',
      help: 'Disk size the guest sees, in bytes (re-read on SIGHUP)',
      // One value for the device: the main instance's, not a sum over worker instances.
      aggregator: 'first',
      registers: [registry],
      collect() {
        this.set(device.limits.capacityBytes);
      },
    }),
    ioUring: new Gauge({
      name: 'vhostd_blk_io_uring',
      help: '1 when I/O goes through io_uring, 0 for the preadv/pwritev thread-pool fallback (or --null)',
      // One value for the device: the main instance's, not a sum over worker instances.
      aggregator: 'first',
      registers: [registry],
      collect() {
        this.set(device.executorKind === 'io_uring' ? 1 : 0);
      },
    }),
  };
}

export type BlkMetrics = ReturnType<typeof createBlkMetrics>;
