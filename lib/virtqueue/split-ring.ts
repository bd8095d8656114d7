/**
 * The device side of a split virtqueue (virtio 1.2 §2.7).
 *
 * Ring layout (little-endian), each part at a front-end virtual address from SET_VRING_ADDR:
 * ```
 * descriptor table (align 16): virtq_desc[size]                 16 * size bytes
 * available ring   (align 2):  le16 flags | le16 idx | le16 ring[size] | le16 used_event (EVENT_IDX)
 * used ring        (align 4):  le16 flags | le16 idx | {le32 id, le32 len}[size] | le16 avail_event (EVENT_IDX)
 * ```
 * The driver writes the descriptor table and the available ring, the device the used ring; both run
 * concurrently in different processes. Only `avail.idx` is cached, once per batch; every other field
 * the driver writes is read fresh where it is used. Used elements are written as they complete (any
 * order) and published with one `used.idx` store per {@link SplitRing.flush}.
 */
import { MemoryError, RingError } from '../errors';
import type { GuestMemory } from '../memory/guest-memory';
import { VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_USED_F_NO_NOTIFY } from '../virtio/constants';
import { fullFence } from './barrier';
import { ChainPool } from './chain-pool';
import { ChainWalker } from './chain-walker';
import type { DescriptorChain } from './descriptor-chain';
import { EarlyPublishGate, vringNeedEvent } from './notify';
import { SplitInflight } from './inflight';
import { ringArea, u16, u32 } from './ring-area';
import { ResubmitCursor } from './resubmit-cursor';
import { RingLog, type RingLogSpec } from './ring-log';
import type { QueueCounters, RingAddresses, Virtqueue, VirtqueueOptions } from './virtqueue';

/**
 * A split ring's device side. Construct through `createVirtqueue`; throws RingError VIRTQ_NO_RING when
 * a ring area is unmapped or misaligned. `pop` returns null after `burst` chains until `flush`.
 */
export class SplitRing implements Virtqueue {
  readonly size: number;
  readonly counters: QueueCounters = { requests: 0, bytesWritten: 0, bytesRead: 0, notifications: 0, batches: 0 };
  readonly earlyPublish = new EarlyPublishGate();

  private readonly mask: number;
  private readonly addresses: RingAddresses;
  private readonly eventIdx: boolean;
  private readonly notify: () => void;
  private readonly burst: number;
  private readonly pool: ChainPool;
  private readonly walker: ChainWalker;

  // Typed arrays over the ring areas, rebuilt by setMemory.
  private desc32!: Uint32Array;
  private desc16!: Uint16Array;
  private avail16!: Uint16Array;
  private used16!: Uint16Array;
  private used32!: Uint32Array;
  /** Index of used_event in avail16 and of avail_event in used16. */
  private readonly usedEventIndex: number;
  private readonly availEventIndex: number;

  /** Next available ring index to pop (free-running, 16 bits). */
  private lastAvail: number;
  /** avail.idx as read at the start of the current batch. */
  private availCache: number;
  /** Next used ring index to fill (free-running); `used.idx` in memory lags it until flush. */
  private usedShadow: number;
  /** The `used.idx` last published. */
  private usedPublished: number;
  /** Whether a notification decision has been made since start (EVENT_IDX needs a previous index). */
  private signalledValid = false;
  /** Chains popped since the last flush (the burst limit). */
  private batchPopped = 0;
  /** Set while a live migration logs dirty pages (ring-log.ts). */
  private log: RingLog | null = null;
  /** Inflight tracking (INFLIGHT_SHMFD), or null when the front-end gave no area. */
  private readonly inflight: SplitInflight | null = null;
  /** Heads an earlier process left in flight, popped before the available ring, oldest first. */
  private readonly resubmit = new ResubmitCursor();

  constructor(options: VirtqueueOptions) {
    const { size } = options;
    if (!Number.isInteger(size) || size < 1 || size > 32768 || (size & (size - 1)) !== 0) {
      throw new RangeError(`split queue size ${size} is not a power of two in 1..32768`);
    }
    this.size = size;
    this.mask = size - 1;
    this.addresses = options.addresses;
    this.eventIdx = options.eventIdx;
    this.notify = options.notify;
    this.burst = options.burst ?? size;
    this.usedEventIndex = 2 + size;
    this.availEventIndex = 2 + 4 * size;
    this.pool = new ChainPool(size);
    try {
      this.mapRings(options.memory);
    } catch (err) {
      if (err instanceof MemoryError) throw new RingError('VIRTQ_NO_RING', err.message);
      throw err;
    }
    this.walker = new ChainWalker(size, false, options.indirect, options.memory);
    // The used index continues from what is in the ring (as Linux vhost and libvhost-user do).
    this.usedShadow = this.used16[1]!;
    this.usedPublished = this.usedShadow;
    // Every chain before the base was completed when the ring stopped (a stop waits for in-flight
    // chains), so QEMU's base is the used index. DPDK's virtio-user sends base 0 whatever the ring
    // holds, also when it reconnects to a restarted back-end in server mode: resume where the used
    // index is then, as DPDK's own back-end does. Only with an inflight area may they differ (the
    // chains in flight at a crash), and its recovery below places the avail side.
    this.lastAvail = options.inflight === undefined ? this.usedShadow : options.base & 0xffff;
    this.availCache = this.lastAvail;
    if (options.inflight !== undefined) {
      this.inflight = new SplitInflight(options.inflight, size);
      const recovery = this.inflight.recover(this.usedShadow);
      if (recovery !== null) {
        // libvhost-user's vu_check_queue_inflights: every chain popped before is either used (up to
        // used.idx) or still in flight, so the available ring resumes after both. The front-end's base
        // after a crash is used.idx (QEMU restores last_avail_idx from the used ring).
        this.resubmit.start(recovery.resubmit);
        this.lastAvail = (this.usedShadow + recovery.resubmit.length) & 0xffff;
        this.availCache = this.lastAvail;
      }
    }
  }

  get inFlight(): number {
    return this.pool.inFlight;
  }

  pop(): DescriptorChain | null {
    if (this.batchPopped >= this.burst) return null;
    if (this.resubmit.pending) return this.popResubmitted();
    if (this.availCache === this.lastAvail) {
      const avail16 = this.avail16;
      if (avail16.length === 0) throw new RingError('VIRTQ_NO_RING', 'available ring is no longer mapped');
      const idx = avail16[1]!;
      // virtio 1.2 §2.7: "Queue Size corresponds to the maximum number of buffers in the virtqueue",
      // and §2.7.6.1: "A driver MUST NOT decrement the available idx". So avail.idx can be ahead of
      // the device by at most the size; more would make us process stale entries forever.
      if (((idx - this.lastAvail) & 0xffff) > this.size) {
        throw new RingError('VIRTQ_AVAIL_IDX_JUMP', `avail idx ${idx} is more than ${this.size} ahead of ${this.lastAvail}`);
      }
      this.availCache = idx;
      if (idx === this.lastAvail) return null;
      // Read barrier between avail.idx and the ring entries: loads are ordered on x86-64 (barrier.ts).
    }
    const chain = this.pool.peek();
    // virtio 1.2 §2.7: "if Queue Size is 4 then at most 4 buffers can be queued at any given time."
    if (chain === null) {
      throw new RingError('VIRTQ_TOO_MANY_IN_FLIGHT', `driver offered more than ${this.size} buffers at once`);
    }
    const head = this.avail16[2 + (this.lastAvail & this.mask)]!;
    // virtio 1.2 §2.7.5: "The number of descriptors in the table is defined by the queue size".
    if (head >= this.size) {
      throw new RingError('VIRTQ_BAD_HEAD', `available ring entry ${head} is not below the queue size ${this.size}`);
    }
    this.walk(chain, head);
    this.pool.take(this);
    chain.head = head;
    this.inflight?.popped(head);
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    this.batchPopped++;
    this.counters.requests++;
    this.counters.bytesRead += chain.readableLength;
    return chain;
  }

  /** Pop the next chain an earlier process left in flight (already marked in the inflight area). */
  private popResubmitted(): DescriptorChain {
    const head = this.resubmit.next();
    const chain = this.pool.peek()!; // at most `size` entries are in flight
    this.walk(chain, head);
    this.pool.take(this);
    chain.head = head;
    this.batchPopped++;
    this.counters.requests++;
    this.counters.bytesRead += chain.readableLength;
    return chain;
  }

  pushUsed(chain: DescriptorChain, written: number): void {
    this.pool.give(chain, this);
    // virtio 1.2 §2.7.8: len is "the total of bytes written into the buffer"; never report more than
    // the device-writable part holds (a device bug must not make the driver read past its buffers).
    const len = written > chain.writableLength ? chain.writableLength : written;
    const slot = this.usedShadow & this.mask;
    this.used32[1 + 2 * slot] = chain.head;
    this.used32[2 + 2 * slot] = len;
    this.inflight?.used(chain.head);
    this.usedShadow = (this.usedShadow + 1) & 0xffff;
    this.counters.bytesWritten += len;
    if (this.log !== null) {
      this.log.chainWritten(chain);
      this.log.ring(4 + 8 * slot, 8);
    }
  }

  flush(): number {
    this.batchPopped = 0;
    const count = (this.usedShadow - this.usedPublished) & 0xffff;
    if (count === 0) return 0;
    const old = this.usedPublished;
    // virtio 1.2 §2.7.8.2: "The device MUST set len prior to updating the used idx." The element
    // stores above precede this store in program order, and x86-64 does not reorder stores.
    this.used16[1] = this.usedShadow;
    this.inflight?.published(this.usedShadow);
    this.usedPublished = this.usedShadow;
    // Marked after the store: a page the front-end sends between a mark and a later write would stay stale.
    if (this.log !== null) this.log.ring(2, 2);
    this.counters.batches++;
    // The driver may update used_event / avail.flags after reading the old used.idx: the new idx must be
    // visible before we read them, a store→load order that needs a full barrier (Linux vhost_notify's
    // smp_mb, libvhost-user's vring_notify).
    fullFence();
    if (this.needsNotification(old, this.usedShadow)) {
      this.counters.notifications++;
      this.notify();
    }
    return count;
  }

  driverWaiting(): boolean {
    return this.eventIdx && this.avail16[this.usedEventIndex] === this.usedPublished;
  }

  disableNotification(): void {
    // virtio 1.2 §2.7.10: with EVENT_IDX "The device MUST set flags to 0"; suppression then comes from
    // avail_event. The driver kicks when its index passes avail_event (§2.7.10.1, vring_need_event):
    // one behind the next entry we expect is passed only after a full 2^16 wrap, which a driver
    // cannot reach with at most `size` entries ahead of us, so no kick comes until enableNotification.
    if (this.eventIdx) {
      this.used16[this.availEventIndex] = (this.lastAvail - 1) & 0xffff;
      if (this.log !== null) this.log.ring(2 * this.availEventIndex, 2);
    } else {
      this.used16[0] = VRING_USED_F_NO_NOTIFY;
      if (this.log !== null) this.log.ring(0, 2);
    }
  }

  hasAvailable(): boolean {
    const avail16 = this.avail16;
    return avail16.length === 0 || avail16[1] !== this.lastAvail;
  }

  enableNotification(): boolean {
    if (this.eventIdx) {
      // virtio 1.2 §2.7.10: the driver notifies once it writes the entry at index avail_event.
      this.used16[this.availEventIndex] = this.lastAvail;
      if (this.log !== null) this.log.ring(2 * this.availEventIndex, 2);
    } else {
      this.used16[0] = 0;
      if (this.log !== null) this.log.ring(0, 2);
    }
    // The driver may have published entries before seeing the store above and so not have kicked:
    // make the store visible before re-reading avail.idx (a store→load order: full barrier).
    fullFence();
    return this.avail16[1] !== this.lastAvail;
  }

  base(): number {
    return this.lastAvail;
  }

  setMemory(memory: GuestMemory): void {
    this.mapRings(memory);
    this.walker.setMemory(memory);
  }

  rewalk(chain: DescriptorChain): void {
    this.pool.checkHeld(chain, this);
    this.walker.rewalk(chain);
  }

  unpop(chain: DescriptorChain): void {
    this.pool.untake(chain, this);
    this.counters.requests--;
    this.counters.bytesRead -= chain.readableLength;
    // A resubmitted chain goes back to the inflight area, still in flight; any other to the ring.
    if (this.resubmit.unpop(chain.popSerial)) return;
    this.inflight?.unpopped(chain.head);
    // Its available ring entry still names its head: the driver cannot have reused that entry, which
    // it writes again only `size` entries later, while this buffer still holds a descriptor.
    this.lastAvail = (this.lastAvail - 1) & 0xffff;
  }

  clearInflight(): void {
    if (this.pool.inFlight === 0 && this.usedShadow === this.usedPublished && !this.resubmit.pending) this.inflight?.clear();
  }

  setDirtyLog(spec: RingLogSpec | null): void {
    this.log = spec === null ? null : new RingLog(spec.log, spec.usedGuestAddr);
  }

  /** Walk the chain starting at descriptor `head` into `chain`. */
  private walk(chain: DescriptorChain, head: number): void {
    const walker = this.walker;
    const desc32 = this.desc32;
    const desc16 = this.desc16;
    walker.begin(chain);
    let i = head;
    // Bounded: the walker throws VIRTQ_CHAIN_LOOP after `size` descriptors.
    for (;;) {
      const w = i * 4;
      const h = i * 8;
      // Each field read once (the driver may be rewriting the table as we read it).
      const flags = desc16[h + 6]!;
      const next = desc16[h + 7]!;
      walker.descriptor(chain, desc32[w]!, desc32[w + 1]!, desc32[w + 2]!, flags);
      if ((flags & VRING_DESC_F_NEXT) === 0) return;
      // virtio 1.2 §2.7.5: "The number of descriptors in the table is defined by the queue size".
      if (next >= this.size) {
        throw new RingError('VIRTQ_BAD_DESCRIPTOR', `descriptor next ${next} is not below the queue size ${this.size}`);
      }
      i = next;
    }
  }

  /** The used-buffer notification decision after publishing `newIdx` (previous index `oldIdx`). */
  private needsNotification(oldIdx: number, newIdx: number): boolean {
    if (!this.eventIdx) {
      // virtio 1.2 §2.7.7.2: "If flags is 1, the device SHOULD NOT send a notification. If flags is 0,
      // the device MUST send a notification."
      return (this.avail16[0]! & VRING_AVAIL_F_NO_INTERRUPT) === 0;
    }
    if (!this.signalledValid) {
      this.signalledValid = true;
      return true;
    }
    // §2.7.7.2: notify when the used idx passed used_event in this batch.
    return vringNeedEvent(this.avail16[this.usedEventIndex]!, newIdx, oldIdx);
  }

  /** Resolve the three areas in `memory` and rebuild the typed arrays (all or nothing). */
  private mapRings(memory: GuestMemory): void {
    const n = this.size;
    const a = this.addresses;
    const tail = this.eventIdx ? 2 : 0;
    // virtio 1.2 §2.7, alignment and size table: descriptor table 16 / 16*n, available ring 2 / 6+2n,
    // used ring 4 / 6+8n (the trailing event field only exists with EVENT_IDX).
    const desc = ringArea(memory, a.descUserAddr, 16 * n, 16, 'descriptor table');
    const avail = ringArea(memory, a.availUserAddr, 4 + 2 * n + tail, 2, 'available ring');
    const used = ringArea(memory, a.usedUserAddr, 4 + 8 * n + tail, 4, 'used ring');
    this.desc32 = u32(desc);
    this.desc16 = u16(desc);
    this.avail16 = u16(avail);
    this.used16 = u16(used);
    this.used32 = u32(used);
  }
}
