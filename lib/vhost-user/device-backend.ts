/**
 * What a device implements. A device never sees a vhost-user message: the protocol engine negotiates,
 * maps memory, builds queues and calls these hooks (shaped after rust-vmm's VhostUserBackend and
 * libvhost-user's VuDevIface).
 */
import type { Registry } from 'prom-client';

import type { Virtqueue } from '../virtqueue/virtqueue';

/** Services the engine offers a device while a front-end is attached. */
export interface DeviceContext {
  /**
   * Tell the driver the config space changed (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the backend
   * channel). Resolves false when the front-end gave no backend channel.
   */
  notifyConfigChange(): Promise<boolean>;
  /** Negotiated virtio features (valid once the front-end sent SET_FEATURES). */
  readonly features: bigint;
}

export interface DeviceBackend {
  /** Short device name for logs and metrics labels ("rng", "blk"). */
  readonly name: string;
  /** Number of queues the device supports (GET_QUEUE_NUM with MQ). */
  readonly numQueues: number;
  /** Largest queue size the device accepts. */
  readonly maxQueueSize: number;

  /** Virtio feature bits offered (device bits plus VERSION_1, ring features...). */
  features(): bigint;
  /** vhost-user protocol features the device needs beyond the engine's own (e.g. CONFIG). */
  protocolFeatures(): bigint;

  /** Config space bytes `offset .. offset+size` (GET_CONFIG). */
  getConfig?(offset: number, size: number): Uint8Array;
  /** Driver wrote config space (SET_CONFIG). Throw to refuse. */
  setConfig?(offset: number, data: Uint8Array): void;

  /**
   * NET_SET_MTU: the host MTU the front-end exposes to the guest (virtio-net `mtu`), already checked
   * to be in 68..65535. Implementing it offers VHOST_USER_PROTOCOL_F_NET_MTU. Throw RequestRefused
   * (lib/errors.ts) to refuse the value: the front-end gets a NACK and the connection stays.
   */
  setMtu?(mtu: number): void;
  /**
   * SEND_RARP: after a migration, announce the guest's `mac` (6 bytes) with a RARP broadcast, for
   * guests without VIRTIO_NET_F_GUEST_ANNOUNCE. Implementing it offers VHOST_USER_PROTOCOL_F_RARP.
   */
  sendRarp?(mac: Uint8Array): void;

  /** A front-end attached; `context` stays valid until `detach`. */
  attach?(context: DeviceContext): void;
  /** The front-end went away or reset the device. */
  detach?(): void;

  /** Queue `index` is running (it has memory, addresses, a kick fd and is enabled). */
  startQueue?(index: number, queue: Virtqueue): void;
  /**
   * Queue `index` is stopping (GET_VRING_BASE, disable, disconnect). Resolve once no chain of this
   * queue is in flight any more: the engine then reads the ring base.
   */
  stopQueue?(index: number): Promise<void> | void;

  /** The driver kicked queue `index`: pop, process, complete, flush. A RingError thrown here (from
   * `pop`) marks the queue broken; the daemon keeps serving. */
  processQueue(index: number, queue: Virtqueue): void;

  /**
   * Register the device's own metrics (`vhostd_<device>_*`) in the process registry; called once by
   * `createDaemonMetrics`, after the shared queue and protocol metrics. The device keeps plain number
   * counters on its datapath and the metrics read them in `collect()` at scrape time: no prom-client
   * call per request. The `device` label is a default label of the registry; add only bounded labels.
   */
  registerMetrics?(registry: Registry): void;
}
