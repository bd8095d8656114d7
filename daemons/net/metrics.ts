/**
 * The net daemon's own Prometheus metrics (`vhostd_net_*`, listed in daemons/net/README.md). The
 * datapath only adds to the plain numbers of {@link NetQueueStats}; the metrics read them at scrape
 * time. Labels are bounded: `queue` (a virtqueue index, below twice the pair count) and `reason`
 * (the fixed list of TX_DROP_REASONS).
 */
import type { Registry } from 'prom-client';

import { queueCounter, queueCountsCounter } from '../../lib/metrics/collected';
import { TX_DROP_REASONS, type TxDropReason } from './net-header';
import { VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_HDR_GSO_UDP_L4 } from './virtio-net';

/** The `type` label of vhostd_net_gso_frames_total: TSO over IPv4 and IPv6, UFO, USO. */
export const GSO_TYPES = ['tcpv4', 'tcpv6', 'udp', 'udp_l4'] as const;
/** gso_type (its low 3 bits: the ECN bit 0x80 aside, tx checked it and rx has it from the kernel) → index in GSO_TYPES; -1 for none. */
const GSO_TYPE_INDEX = new Int8Array(8).fill(-1);
GSO_TYPE_INDEX[VIRTIO_NET_HDR_GSO_TCPV4] = 0;
GSO_TYPE_INDEX[VIRTIO_NET_HDR_GSO_TCPV6] = 1;
GSO_TYPE_INDEX[VIRTIO_NET_HDR_GSO_UDP] = 2;
GSO_TYPE_INDEX[VIRTIO_NET_HDR_GSO_UDP_L4] = 3;

/** Counters of one virtqueue (rx or tx): plain numbers, cumulative for the life of the device. */
export class NetQueueStats {
  /** Frames moved (rx: TAP → guest; tx: guest → TAP). */
  frames = 0;
  /** Their bytes, without the virtio-net header. */
  bytes = 0;
  /** Frames carrying a GSO type (TSO/UFO/USO super-frames), by GSO_TYPES index. */
  readonly gsoFrames = new Float64Array(GSO_TYPES.length);
  /** tx frames dropped before the TAP, by TX_DROP_REASONS index. */
  readonly dropped = new Float64Array(TX_DROP_REASONS.length);
  /** readv/writev on the TAP failed (the frame is lost). */
  tapErrors = 0;
  /** rx: times reading stopped because the guest had no (or not enough) receive buffers. */
  ringEmpty = 0;

  drop(reason: TxDropReason): void {
    this.dropped[TX_DROP_REASONS.indexOf(reason)]!++;
  }

  /** Count a frame moved with the header's `gsoType` byte (tx: checked already; rx: from the kernel). */
  gso(gsoType: number): void {
    const index = GSO_TYPE_INDEX[gsoType & 7]!;
    if (index >= 0) this.gsoFrames[index]!++;
  }
}

/** What the metrics read from the device. */
export interface NetMetricsSource {
  /** Virtqueues (rx and tx of every pair). */
  readonly numQueues: number;
  queueStats(index: number): NetQueueStats;
}

/** Register the `vhostd_net_*` metrics of `device` in `registry`. */
export function createNetMetrics(registry: Registry, device: NetMetricsSource) {
  const count = () => device.numQueues;
  const perQueue = (name: string, help: string, read: (s: NetQueueStats) => number) =>
    queueCounter(registry, name, help, count, (q) => read(device.queueStats(q)));
  return {
    frames: perQueue('vhostd_net_frames_total', 'Frames moved: on an rx queue (even index) from the TAP to the guest, on a tx queue (odd) from the guest to the TAP', (s) => s.frames),
    bytes: perQueue('vhostd_net_bytes_total', 'Bytes of those frames, without the virtio-net header', (s) => s.bytes),
    gsoFrames: queueCountsCounter(
      registry,
      'vhostd_net_gso_frames_total',
      'Frames larger than the MTU handed over unsegmented, by gso_type: tcpv4, tcpv6 (TSO), udp (UFO), udp_l4 (USO)',
      'type',
      GSO_TYPES,
      count,
      (q) => device.queueStats(q).gsoFrames,
    ),
    tapErrors: perQueue('vhostd_net_tap_errors_total', 'Frames lost because readv/writev on the TAP failed', (s) => s.tapErrors),
    ringEmpty: perQueue(
      'vhostd_net_rx_ring_empty_total',
      'Times the daemon stopped reading the TAP because the guest had no receive buffers (the kernel queues, then drops: see the TAP\'s TX dropped)',
      (s) => s.ringEmpty,
    ),
    dropped: queueCountsCounter(
      registry,
      'vhostd_net_tx_dropped_total',
      'Frames from the guest dropped before the TAP: bad_header (flags, gso_type or offsets outside the frame), too_short (under 14 bytes), too_long (over MTU + 18 without GSO), too_many_segments (over 1023 descriptors)',
      'reason',
      TX_DROP_REASONS,
      count,
      (q) => (q % 2 === 1 ? device.queueStats(q).dropped : null),
    ),
  };
}

export type NetMetrics = ReturnType<typeof createNetMetrics>;
