/**
 * What a device implements. A device never sees a vhost-user message: the protocol engine negotiates,
 * maps memory, builds queues and calls these hooks (shaped after rust-vmm's VhostUserBackend and
 * libvhost-user's VuDevIface). Every hook but `processQueue` is optional; a missing one does nothing.
 *
 * Order of calls, per connection, on the device instance that runs a queue (the main device for
 * queues on the main thread, a worker's own instance for queues in a worker thread):
 * ```
 * attach(context)
 *   memoryChanged(memory)          each SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG
 *   startQueue(i, queue)           the ring has memory, size, addresses and a kick fd
 *   queueEnabled(i, true)          right after startQueue if the ring is enabled, else when it is
 *   processQueue(i, queue)*        kicks (and chains a poll found), while enabled and not broken
 *   pollCompletions(i)*            while the queue driver polls after a batch (--poll-us)
 *   queueEnabled(i, false)         SET_VRING_ENABLE 0 (and true again on 1)
 *   stopQueue(i)                   GET_VRING_BASE, reset, disconnect; awaited before the base is read
 * reset()                          RESET_OWNER, RESET_DEVICE, disconnect: after every queue stopped
 * detach()                         disconnect (worker instances: when the worker thread ends)
 * ```
 * The main device gets `memoryChanged` once per table change, after running queues switched to the
 * new map and before the old one is closed; a worker instance gets it once per queue it runs, with
 * the map that queue uses now (a worker maps memory per queue). `queueEnabled` reports changes only:
 * a ring enabled twice is reported once; the implicit enable of a front-end that did not negotiate
 * VHOST_USER_F_PROTOCOL_FEATURES arrives as `queueEnabled(i, true)` after `startQueue`. `reset` and
 * `queueGroup` are asked of the main device only.
 */
import type { Registry } from 'prom-client';

import type { GuestMemory } from '../memory/guest-memory';
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
  /**
   * Queue `index` broke outside `processQueue`, in work the device started itself (net: its TAP fd
   * became readable or writable and a `pop` threw a RingError): the same as an error thrown from
   * `processQueue`. The ring is left alone until it stops and the front-end is told (err fd). The
   * engine's contexts always have it; a context a unit test builds by hand may leave it out.
   */
  queueBroken?(index: number, err: unknown): void;
  /**
   * Send `message` (structured-clonable) to the device instance of every queue worker thread running
   * now ({@link DeviceBackend.workerMessage} there) and resolve with their answers, one per thread
   * (undefined from a thread that ended meanwhile); [] when no queue runs in a worker. Rejects when a
   * worker device threw. For state a device changes at run time (units added, a cache mode) and for
   * waiting on work in flight in the workers.
   */
  messageWorkers?(message: unknown): Promise<unknown[]>;
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

  /**
   * Live migration: a second instance of the device can take over from this one with nothing but guest
   * memory, the ring bases and what the front-end sends again at start (features, MTU, config), so the
   * engine offers VHOST_F_LOG_ALL and VHOST_USER_PROTOCOL_F_LOG_SHMFD and logs every page the device
   * writes while a migration runs (lib/vhost-user/dirty-logging.ts). Devices with state of their own
   * that would be lost leave it unset: QEMU then blocks migration.
   */
  readonly migratable?: boolean;

  /** Config space bytes `offset .. offset+size` (GET_CONFIG). */
  getConfig?(offset: number, size: number): Uint8Array;
  /** Driver wrote config space (SET_CONFIG). Throw to refuse. */
  setConfig?(offset: number, data: Uint8Array): void;

  /**
   * Main device, with queues in worker threads: the message each new worker thread's device gets
   * ({@link workerMessage}) before any queue starts there: what changed at run time since the config
   * its factory builds from. Structured-clonable (a SharedArrayBuffer stays shared). Undefined: none.
   */
  workerState?(): unknown;
  /**
   * A worker thread's device instance: a message from the main device
   * ({@link DeviceContext.messageWorkers}, {@link workerState}); the result (structured-clonable) is
   * the answer. Messages arrive in order with the queue messages of the thread.
   */
  workerMessage?(message: unknown): unknown;

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
  /** The front-end went away. */
  detach?(): void;
  /**
   * The device was reset (RESET_OWNER, RESET_DEVICE, or the front-end went away): every queue has
   * stopped; forget per-driver state (net: MAC filters, offloads; balloon: the pages in the balloon).
   */
  reset?(): void;

  /**
   * Which queues run together in one thread when the daemon runs queues in worker threads: queues
   * with the same group number share a thread (net: rx and tx of a pair), `null` keeps the queue on
   * the main thread (scsi's control and event queues, every balloon queue). Groups are spread over
   * the threads (group g runs in thread g mod N). Without this hook each queue is its own group.
   */
  queueGroup?(index: number): number | null;

  /** Queue `index` is running (it has memory, addresses, a kick fd and is enabled). */
  startQueue?(index: number, queue: Virtqueue): void;
  /**
   * Queue `index` is stopping (GET_VRING_BASE, disable, disconnect). Resolve once no chain of this
   * queue is in flight any more: the engine then reads the ring base.
   */
  stopQueue?(index: number): Promise<void> | void;

  /** The ring's enabled state changed (SET_VRING_ENABLE; see the order of calls above). */
  queueEnabled?(index: number, enabled: boolean): void;
  /** The memory table changed; `memory` is what the queues use from now on (see above). */
  memoryChanged?(memory: GuestMemory): void;

  /** The driver kicked queue `index`: pop, process, complete, flush. A RingError thrown here (from
   * `pop`) marks the queue broken; the daemon keeps serving. */
  processQueue(index: number, queue: Virtqueue): void;

  /**
   * While the queue driver polls queue `index` (`--poll-us`): finish the queue's I/O that completed,
   * without blocking or waiting for its event (blk: reap io_uring completions). Returns how many
   * completions it handled.
   */
  pollCompletions?(index: number): number;

  /**
   * Register the device's own metrics (`vhostd_<device>_*`) in the process registry; called once by
   * `createDaemonMetrics`, after the shared queue and protocol metrics. The device keeps plain number
   * counters on its datapath and the metrics read them in `collect()` at scrape time: no prom-client
   * call per request. The `device` label is a default label of the registry; add only bounded labels.
   */
  registerMetrics?(registry: Registry): void;
}
