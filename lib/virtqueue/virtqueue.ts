/**
 * The device side of one virtqueue, independent of ring layout (split or packed), of vhost-user and
 * of the notification mechanism (a callback). Devices pop {@link DescriptorChain}s, complete them
 * (possibly later and out of order), and flush once per batch.
 *
 * Devices drain a queue per kick with `drainQueue` (drain.ts: disable notifications, pop, handle,
 * flush, enable, re-check; virtio 1.2 §2.7.10). Any ring rule the driver breaks throws a
 * {@link RingError} from `pop`; the owner then marks the queue broken and stops using it.
 */
import type { GuestMemory } from '../memory/guest-memory';
import type { DescriptorChain } from './descriptor-chain';
import type { EarlyPublishGate } from './notify';
import type { RingLogSpec } from './ring-log';

/** Where the three ring areas are, as front-end virtual addresses (vhost-user SET_VRING_ADDR). */
export interface RingAddresses {
  /** Split: descriptor table. Packed: descriptor ring. */
  descUserAddr: number;
  /** Split: available ring. Packed: driver event suppression area. */
  availUserAddr: number;
  /** Split: used ring. Packed: device event suppression area. */
  usedUserAddr: number;
}

/** Everything needed to construct a queue. */
export interface VirtqueueOptions {
  /** Queue size (validated by the caller: power of two for split, ≤ 32768). */
  size: number;
  addresses: RingAddresses;
  memory: GuestMemory;
  /** Negotiated VIRTIO_RING_F_EVENT_IDX. */
  eventIdx: boolean;
  /** Negotiated VIRTIO_RING_F_INDIRECT_DESC. */
  indirect: boolean;
  /**
   * Where to resume (vhost-user SET_VRING_BASE). Split: the next avail index (16 bits), read only with
   * an inflight area; without one the ring resumes at its used.idx (DPDK's virtio-user always sends 0).
   * Packed: bits 0-14 next avail index, bit 15 avail wrap counter, bits 16-30 next used index,
   * bit 31 used wrap counter (QEMU's layout); bits 16-31 all 0 (DPDK's virtio-user) mean the used
   * index and wrap counter are the avail ones.
   */
  base: number;
  /** Called from `flush` when the driver must be notified (the owner writes the call eventfd). */
  notify: () => void;
  /** Most chains popped per `pop` batch before the device should flush; defaults to the size. */
  burst?: number;
  /**
   * This queue's part of the shared inflight area (vhost-user INFLIGHT_SHMFD, inflight.ts), at least
   * `inflightQueueBytes(size)` bytes, 8-aligned, split or packed layout by the ring's. With it the
   * queue records what it pops and completes there, and at construction resumes what an earlier
   * process left in flight: those chains come out of `pop` first, oldest first (the ring position
   * then follows the area, as in libvhost-user and DPDK).
   * Construction throws RingError VIRTQ_BAD_INFLIGHT for an area that fails a check.
   */
  inflight?: Uint8Array;
}

/** Counters a queue keeps as plain numbers; metrics read them at scrape time. */
export interface QueueCounters {
  /** Chains popped. */
  requests: number;
  /** Bytes reported as written to the driver in used elements. */
  bytesWritten: number;
  /** Bytes the driver offered to the device (readable descriptors) in popped chains. */
  bytesRead: number;
  /** Times `notify` was invoked. */
  notifications: number;
  /** Times `flush` ran with at least one used element (batches). */
  batches: number;
}

export interface Virtqueue {
  readonly size: number;
  readonly counters: QueueCounters;
  /** Chains popped and not yet pushed back. */
  readonly inFlight: number;
  /**
   * Set when the queue started somewhere other than the base said, or could not check the base, and
   * why (a packed ring without an inflight area, packed-position.ts): for the owner to log.
   */
  readonly resumeNote?: string | null;

  /**
   * Pop the next available chain, or null when the ring is empty. The chain is owned by the queue's
   * pool: use it until `pushUsed`, then forget it. Throws RingError on a driver violation.
   */
  pop(): DescriptorChain | null;

  /** Complete `chain` with `written` bytes written into its device-writable part (not yet visible). */
  pushUsed(chain: DescriptorChain, written: number): void;

  /**
   * Publish every pushed element with one index update and call `notify` at most once, if the driver
   * asked for it (EVENT_IDX used_event, or the NO_INTERRUPT flag). Returns the number published.
   */
  flush(): number;

  /**
   * Whether the driver is waiting for the next used element: EVENT_IDX is negotiated and the driver's
   * event (split used_event, packed DESC off_wrap) is at the used position we published last, i.e. it
   * consumed everything we published and asked to be interrupted by the next one. A hint read without
   * a barrier (flush still decides every notification); false without EVENT_IDX, where the driver
   * does not say whether it sleeps.
   */
  driverWaiting(): boolean;

  /** Whether `drainQueue` may publish early, adapted to how fast the driver wakes (notify.ts). */
  readonly earlyPublish: EarlyPublishGate;

  /** Ask the driver not to kick (used.flags NO_NOTIFY, avail_event behind the driver, or packed DISABLE). */
  disableNotification(): void;

  /**
   * Whether the driver made a chain available since the last `pop` (true too when the ring is no longer
   * mapped: `pop` then throws). Reads one index or flag and changes nothing: for a device that polls.
   */
  hasAvailable(): boolean;

  /**
   * Ask the driver to kick again (with EVENT_IDX: avail_event = next avail index). Returns true when
   * new chains arrived meanwhile, so the caller must drain again (the race of virtio 1.2 §2.7.10).
   */
  enableNotification(): boolean;

  /** The value to return for GET_VRING_BASE (same layout as {@link VirtqueueOptions.base}). */
  base(): number;

  /**
   * Re-resolve ring addresses after a memory table change. Throws MemoryError if they vanished.
   * Chains already popped keep pointing into the old map until {@link rewalk}.
   */
  setMemory(memory: GuestMemory): void;

  /**
   * Walk `chain` (popped from this queue, not yet used) again against the current memory map, from
   * the ring descriptors recorded at pop, with every check applied again; its segments then point into
   * the current map. For chains kept across a memory table change (held buffers). Throws RingError
   * when the buffer no longer resolves, QueueUsageError VIRTQ_NOT_IN_FLIGHT for a chain this queue
   * did not hand out or already took back.
   */
  rewalk(chain: DescriptorChain): void;

  /**
   * Give `chain` back to the ring unused, as libvhost-user's vu_queue_unpop: the available position
   * moves back over it (packed: the wrap counter too), `inFlight` and the request counters go down,
   * and the next `pop` returns the same buffer (no kick comes for it). Only the most recently popped
   * chain that is still in flight can go back, so several go back newest first; anything else would
   * make the next pop return a buffer already used. Throws QueueUsageError VIRTQ_UNPOP_NOT_LATEST
   * (nothing changes) or VIRTQ_NOT_IN_FLIGHT.
   */
  unpop(chain: DescriptorChain): void;

  /**
   * The front-end took the base (GET_VRING_BASE) of the drained queue: with nothing in flight, its
   * inflight record is marked uninitialized, so the next start begins afresh from the front-end's
   * base in whichever ring layout the driver picks then (a driver reset may switch layouts).
   */
  clearInflight(): void;

  /**
   * Live migration: from now on mark every page the device writes (completed chains' writable
   * buffers, and ring writes when `spec.usedGuestAddr` is set) in `spec.log`; null stops logging.
   * See ring-log.ts.
   */
  setDirtyLog(spec: RingLogSpec | null): void;
}
