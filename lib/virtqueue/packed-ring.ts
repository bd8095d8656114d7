/**
 * The device side of a packed virtqueue (virtio 1.2 §2.8).
 *
 * Ring layout (little-endian), each part at a front-end virtual address from SET_VRING_ADDR:
 * ```
 * descriptor ring          (align 16): pvirtq_desc[size] = le64 addr | le32 len | le16 id | le16 flags
 * driver event suppression (align 4):  le16 off_wrap (offset:15, wrap:1) | le16 flags (2 bits)
 * device event suppression (align 4):  same layout
 * ```
 * The driver makes a descriptor available by setting its AVAIL bit to its wrap counter and USED to the
 * inverse; the device marks it used by setting both to the device's wrap counter (§2.8.1). Both sides
 * only poll the next descriptor in ring order. A used descriptor carries the buffer id of the chain and
 * the device skips as many slots as the chain occupied (§2.8.6), so completion order is free.
 *
 * Batching: {@link PackedRing.pushUsed} only notes each used descriptor; {@link PackedRing.flush} writes
 * them all, the first one's flags last, which makes the whole batch visible at once (the driver polls
 * that slot first; §2.8.9's multi-buffer rule). Writing at flush, not at pushUsed, leaves a daemon that
 * dies between the two (a receive batch spans its reads) a ring with nothing of the batch in it, which
 * a new process without an inflight area can read its position from (packed-position.ts).
 *
 * A chain of several descriptors gets one used descriptor and its other slots are skipped (§2.8.6); the
 * device also marks those slots used (flags only, written before the batch is published, while the
 * slots are still the device's; drivers skip them by their own count and never read them), so that the
 * used part of the ring reads as one run (packed-position.ts).
 */
import { MemoryError, RingError } from '../errors';
import type { GuestMemory } from '../memory/guest-memory';
import {
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
  VRING_PACKED_EVENT_FLAG_DESC,
  VRING_PACKED_EVENT_FLAG_DISABLE,
  VRING_PACKED_EVENT_FLAG_ENABLE,
  VIRTQUEUE_MAX_SIZE,
} from '../virtio/constants';
import { fullFence } from './barrier';
import { PackedInflight } from './inflight';
import { ChainPool } from './chain-pool';
import { ChainWalker } from './chain-walker';
import type { DescriptorChain } from './descriptor-chain';
import { EarlyPublishGate, packedNeedEvent } from './notify';
import { findPackedPosition } from './packed-position';
import { ResubmitCursor } from './resubmit-cursor';
import { ringArea, u16, u32 } from './ring-area';
import { RingLog, userToGuestAddress, type RingLogSpec } from './ring-log';
import type { QueueCounters, RingAddresses, Virtqueue, VirtqueueOptions } from './virtqueue';

const USED_BOTH = VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED;

/**
 * A packed ring's device side. Construct through `createVirtqueue`; throws RingError VIRTQ_NO_RING when
 * a ring area is unmapped or misaligned, VIRTQ_BAD_BASE when the base names a slot outside the ring.
 * `pop` returns null after `burst` chains until `flush`.
 */
export class PackedRing implements Virtqueue {
  readonly size: number;
  readonly counters: QueueCounters = { requests: 0, bytesWritten: 0, bytesRead: 0, notifications: 0, batches: 0 };
  readonly earlyPublish = new EarlyPublishGate();

  private readonly addresses: RingAddresses;
  private readonly eventIdx: boolean;
  private readonly notify: () => void;
  private readonly burst: number;
  private readonly pool: ChainPool;
  private readonly walker: ChainWalker;

  // Typed arrays over the ring areas, rebuilt by setMemory.
  private desc32!: Uint32Array;
  private desc16!: Uint16Array;
  /** Driver event suppression: [off_wrap, flags]; read by the device. */
  private driverEvent!: Uint16Array;
  /** Device event suppression: [off_wrap, flags]; written by the device. */
  private deviceEvent!: Uint16Array;

  /** Next ring slot to pop and the driver wrap counter expected there (0 or 1). */
  private nextAvail: number;
  private availWrap: number;
  /** Next slot and wrap counter for a used descriptor (includes pushed, unpublished ones). */
  private usedShadow: number;
  private usedShadowWrap: number;
  /** Slot and wrap counter after the last published used descriptor. */
  private usedPublished: number;
  private usedPublishedWrap: number;
  /** Used descriptors pushed since the last flush: slot, buffer id, len, flags, ring descriptors. */
  private pending = 0;
  private readonly pendingSlot: Uint16Array;
  private readonly pendingId: Uint16Array;
  private readonly pendingLen: Uint32Array;
  private readonly pendingFlags: Uint16Array;
  private readonly pendingDescriptors: Uint16Array;
  private pendingRingSlots = 0;
  private signalledValid = false;
  private batchPopped = 0;
  /** The map the ring areas were resolved in (the dirty log translates their guest addresses). */
  private memory!: GuestMemory;
  /** Set while a live migration logs dirty pages (ring-log.ts), with the spec it was built from. */
  private log: RingLog | null = null;
  private logSpec: RingLogSpec | null = null;
  /** Inflight tracking (INFLIGHT_SHMFD), or null when the front-end gave no area. */
  private readonly inflight: PackedInflight | null = null;
  /** Head entries of the chains an earlier process left in flight, popped before the ring, oldest first. */
  private readonly resubmit = new ResubmitCursor();
  /** Set at construction when the ring's own position replaced the base, or could not be read (Virtqueue). */
  resumeNote: string | null = null;

  constructor(options: VirtqueueOptions) {
    const { size, base } = options;
    if (!Number.isInteger(size) || size < 1 || size > VIRTQUEUE_MAX_SIZE) {
      throw new RangeError(`packed queue size ${size} is not in 1..32768`);
    }
    this.size = size;
    this.addresses = options.addresses;
    this.eventIdx = options.eventIdx;
    this.notify = options.notify;
    this.burst = options.burst ?? size;
    this.pool = new ChainPool(size);
    // At most `size` chains are in flight, so at most `size` wait for a flush.
    this.pendingSlot = new Uint16Array(size);
    this.pendingId = new Uint16Array(size);
    this.pendingLen = new Uint32Array(size);
    this.pendingFlags = new Uint16Array(size);
    this.pendingDescriptors = new Uint16Array(size);
    // Base layout (QEMU's): bits 0-14 next avail, 15 avail wrap, 16-30 next used, 31 used wrap.
    this.nextAvail = base & 0x7fff;
    this.availWrap = (base >>> 15) & 1;
    // DPDK's and SPDK's virtio-user send only the avail half (a fresh ring is 0x8000), and DPDK's own
    // back-end ignores the used half: an empty used half means "used resumes where avail is". QEMU
    // sends back what GET_VRING_BASE reported, and a ring stopped with nothing in flight (base() after
    // stopQueue) has used == avail, so reading its "used 0, wrap 0" this way changes nothing.
    const usedHalf = base >>> 16;
    this.usedPublished = usedHalf === 0 ? this.nextAvail : usedHalf & 0x7fff;
    this.usedPublishedWrap = usedHalf === 0 ? this.availWrap : usedHalf >>> 15;
    if (this.nextAvail >= size || this.usedPublished >= size) {
      throw new RingError('VIRTQ_BAD_BASE', `packed ring base 0x${(base >>> 0).toString(16)} is outside a ring of ${size}`);
    }
    this.usedShadow = this.usedPublished;
    this.usedShadowWrap = this.usedPublishedWrap;
    try {
      this.mapRings(options.memory);
    } catch (err) {
      if (err instanceof MemoryError) throw new RingError('VIRTQ_NO_RING', err.message);
      throw err;
    }
    this.walker = new ChainWalker(size, true, options.indirect, options.memory);
    if (options.inflight === undefined) this.resumeFromRing(base);
    else {
      this.inflight = new PackedInflight(options.inflight, size);
      const desc16 = this.desc16;
      const recovery = this.inflight.recover(this.usedPublished, this.usedPublishedWrap, (slot) => desc16[slot * 8 + 7]!);
      if (recovery !== null) {
        // The area, not the base, says where the ring is: after a crash QEMU has no packed ring state to
        // give back (it keeps the base of the last start), and the slots of the chains in flight lie
        // between the used position and the next available one.
        this.usedPublished = this.usedShadow = recovery.usedIdx;
        this.usedPublishedWrap = this.usedShadowWrap = recovery.usedWrap;
        this.nextAvail = recovery.nextAvail;
        this.availWrap = recovery.availWrap;
        this.resubmit.start(recovery.resubmit);
        this.hideStaleUsed(recovery.slots);
      }
    }
  }

  get inFlight(): number {
    return this.pool.inFlight;
  }

  /**
   * Without an inflight area the position comes from the descriptor ring when it reads unambiguously
   * (packed-position.ts): after a back-end went away QEMU's base is the one of the last start, and the
   * ring is what the driver and the old device last agreed on. A base from a clean stop names the same
   * position (nothing is in flight then), so this changes nothing there. Otherwise the base stands.
   */
  private resumeFromRing(base: number): void {
    const found = findPackedPosition(this.desc16, this.size);
    const given = `avail ${this.nextAvail} wrap ${this.availWrap}, used ${this.usedPublished} wrap ${this.usedPublishedWrap}`;
    if (typeof found === 'string') {
      this.resumeNote = `packed ring position not read from the descriptor ring (${found}): resuming at the front-end's base 0x${(base >>> 0).toString(16)} (${given})`;
      return;
    }
    const { index, wrap } = found;
    if (index === this.nextAvail && wrap === this.availWrap && index === this.usedPublished && wrap === this.usedPublishedWrap) return;
    this.resumeNote = `packed ring resumes at slot ${index} wrap ${wrap} as its descriptor ring shows, not at the front-end's base 0x${(base >>> 0).toString(16)} (${given})`;
    this.nextAvail = this.usedPublished = this.usedShadow = index;
    this.availWrap = this.usedPublishedWrap = this.usedShadowWrap = wrap;
  }

  pop(): DescriptorChain | null {
    if (this.batchPopped >= this.burst) return null;
    if (this.resubmit.pending) return this.popResubmitted();
    const desc16 = this.desc16;
    if (desc16.length === 0) throw new RingError('VIRTQ_NO_RING', 'descriptor ring is no longer mapped');
    if (!this.isAvailable(desc16[this.nextAvail * 8 + 7]!)) return null;
    // Read barrier between the first descriptor's flags and the rest of the list: loads are ordered on
    // x86-64 (barrier.ts). §2.8.6: "The driver always makes the first descriptor in the list available
    // after the rest of the list has been written out into the ring."
    const chain = this.pool.peek();
    // virtio 1.2 §2.8.10.1: "Queue Size corresponds to the maximum number of descriptors in the
    // virtqueue"; a driver offering more than that re-used slots the device still owns.
    if (chain === null) {
      throw new RingError('VIRTQ_TOO_MANY_IN_FLIGHT', `driver offered more than ${this.size} buffers at once`);
    }
    const walker = this.walker;
    const desc32 = this.desc32;
    walker.begin(chain);
    let slot = this.nextAvail;
    let wrap = this.availWrap;
    let id = 0;
    // Bounded: the walker throws VIRTQ_CHAIN_LOOP after `size` descriptors.
    for (;;) {
      const w = slot * 4;
      const h = slot * 8;
      // Each field read once; "Buffer ID is included in the last descriptor in the list" (§2.8.6).
      const flags = desc16[h + 7]!;
      id = desc16[h + 6]!;
      walker.descriptor(chain, desc32[w]!, desc32[w + 1]!, desc32[w + 2]!, flags);
      if (++slot === this.size) {
        slot = 0;
        wrap ^= 1;
      }
      if ((flags & VRING_DESC_F_NEXT) === 0) break;
    }
    if (this.inflight !== null) chain.inflightEntry = this.inflight.popped(chain.ringDescriptors, chain.ringDescriptorWords, id);
    this.pool.take(this);
    chain.head = id;
    this.nextAvail = slot;
    this.availWrap = wrap;
    this.batchPopped++;
    this.counters.requests++;
    this.counters.bytesRead += chain.readableLength;
    return chain;
  }

  /** Pop the next chain an earlier process left in flight, from the descriptors the area kept. */
  private popResubmitted(): DescriptorChain {
    const entry = this.resubmit.next();
    const chain = this.pool.peek()!; // at most `size` chains are in flight
    const walker = this.walker;
    walker.begin(chain);
    const id = this.inflight!.walkSaved(entry, (addrLo, addrHi, len, flags) => walker.descriptor(chain, addrLo, addrHi, len, flags));
    this.pool.take(this);
    chain.head = id;
    chain.inflightEntry = entry;
    this.batchPopped++;
    this.counters.requests++;
    this.counters.bytesRead += chain.readableLength;
    return chain;
  }

  pushUsed(chain: DescriptorChain, written: number): void {
    // The pending used descriptors cover slots the device popped and has not given back: never more than
    // the ring, unless the driver made slots available again before they were used. Then the batch so
    // far goes out first (what the driver gets from such a ring is its own doing), and the pending
    // arrays stay within the ring's size.
    if (this.pendingRingSlots + chain.ringDescriptors > this.size) this.flush();
    this.pool.give(chain, this);
    this.inflight?.used(chain.inflightEntry);
    const len = written > chain.writableLength ? chain.writableLength : written;
    const slot = this.usedShadow;
    // §2.8.1: "To mark a descriptor as used, the device sets the VIRTQ_DESC_F_USED bit in Flags to match
    // the internal Device Ring Wrap Counter. It also sets the VIRTQ_DESC_F_AVAIL bit to match the same
    // value." §2.8.3: in a used descriptor WRITE says whether any data was written.
    let flags = this.usedShadowWrap === 1 ? USED_BOTH : 0;
    if (len > 0) flags |= VRING_DESC_F_WRITE;
    const k = this.pending++;
    this.pendingSlot[k] = slot;
    this.pendingId[k] = chain.head;
    this.pendingLen[k] = len;
    this.pendingFlags[k] = flags;
    this.pendingDescriptors[k] = chain.ringDescriptors;
    this.pendingRingSlots += chain.ringDescriptors;
    // §2.8.6: "The device only writes out a single used descriptor for the whole list. It then skips
    // forward according to the number of descriptors in the list."
    let next = slot + chain.ringDescriptors;
    if (next >= this.size) {
      next -= this.size;
      this.usedShadowWrap ^= 1;
    }
    this.usedShadow = next;
    this.counters.bytesWritten += len;
    this.log?.chainWritten(chain);
  }

  /** Write the `k`th pending used descriptor, all but the flags of its first slot; returns its slot. */
  private writeUsed(k: number): number {
    const { desc16, desc32 } = this;
    const slot = this.pendingSlot[k]!;
    desc16[slot * 8 + 6] = this.pendingId[k]!;
    desc32[slot * 4 + 2] = this.pendingLen[k]!;
    // The chain's other slots: used under the wrap counter of their own lap (the chain may cross the end).
    let wrapFlags = this.pendingFlags[k]! & USED_BOTH;
    let at = slot;
    for (let n = this.pendingDescriptors[k]!; n > 1; n--) {
      if (++at === this.size) {
        at = 0;
        wrapFlags ^= USED_BOTH;
      }
      desc16[at * 8 + 7] = wrapFlags;
      this.log?.ring(16 * at, 16);
    }
    return slot;
  }

  flush(): number {
    this.batchPopped = 0;
    const count = this.pending;
    if (count === 0) return 0;
    const old = this.usedPublished;
    const desc16 = this.desc16;
    for (let k = 1; k < count; k++) {
      const slot = this.writeUsed(k);
      desc16[slot * 8 + 7] = this.pendingFlags[k]!;
      // Marked after the store: a page the front-end sends between a mark and a later write would stay stale.
      this.log?.ring(16 * slot, 16);
    }
    const head = this.writeUsed(0);
    // Every other used descriptor of the batch is complete; x86-64 keeps stores in order, so the driver
    // cannot see this flag before them (the device's mirror of §2.8.21.1.1, "The driver MUST perform a
    // suitable memory barrier before the flags update").
    this.inflight?.publishing(this.usedShadow, this.usedShadowWrap);
    desc16[head * 8 + 7] = this.pendingFlags[0]!;
    this.inflight?.published();
    this.log?.ring(16 * head, 16);
    this.pending = 0;
    this.pendingRingSlots = 0;
    this.usedPublished = this.usedShadow;
    this.usedPublishedWrap = this.usedShadowWrap;
    this.counters.batches++;
    // The used flags must be visible before we read the driver's event suppression (store→load).
    fullFence();
    if (this.needsNotification(old)) {
      this.counters.notifications++;
      this.notify();
    }
    return count;
  }

  driverWaiting(): boolean {
    const event = this.driverEvent;
    return (
      this.eventIdx &&
      (event[1]! & 3) === VRING_PACKED_EVENT_FLAG_DESC &&
      event[0] === (this.usedPublished | (this.usedPublishedWrap << 15))
    );
  }

  disableNotification(): void {
    this.deviceEvent[1] = VRING_PACKED_EVENT_FLAG_DISABLE;
    if (this.log !== null) this.log.event(4);
  }

  hasAvailable(): boolean {
    const desc16 = this.desc16;
    return desc16.length === 0 || this.isAvailable(desc16[this.nextAvail * 8 + 7]!);
  }

  enableNotification(): boolean {
    if (this.eventIdx) {
      // virtio 1.2 §2.8.10: RING_EVENT_FLAGS_DESC "Enable events for a specific descriptor (as specified
      // by Descriptor Ring Change Event Offset/Wrap Counter)": the next one we expect. The offset goes
      // out before the flags (store order is kept on x86-64).
      this.deviceEvent[0] = this.nextAvail | (this.availWrap << 15);
      this.deviceEvent[1] = VRING_PACKED_EVENT_FLAG_DESC;
    } else {
      this.deviceEvent[1] = VRING_PACKED_EVENT_FLAG_ENABLE;
    }
    if (this.log !== null) this.log.event(4);
    // Re-check after a full barrier: a descriptor made available before the driver saw the store above
    // came without a notification.
    fullFence();
    return this.isAvailable(this.desc16[this.nextAvail * 8 + 7]!);
  }

  base(): number {
    return (this.nextAvail | (this.availWrap << 15) | (this.usedPublished << 16) | (this.usedPublishedWrap << 31)) >>> 0;
  }

  setMemory(memory: GuestMemory): void {
    this.mapRings(memory);
    this.walker.setMemory(memory);
    this.setDirtyLog(this.logSpec);
  }

  setDirtyLog(spec: RingLogSpec | null): void {
    this.logSpec = spec;
    if (spec === null) {
      this.log = null;
      return;
    }
    // The device writes used descriptors into the descriptor ring and its event suppression area; with
    // VHOST_VRING_F_LOG both are logged at their guest addresses (QEMU's log_guest_addr is the device
    // area's, which does not locate the descriptor ring).
    const logged = spec.usedGuestAddr !== null;
    const a = this.addresses;
    this.log = new RingLog(
      spec.log,
      logged ? userToGuestAddress(this.memory, a.descUserAddr) : null,
      logged ? userToGuestAddress(this.memory, a.usedUserAddr) : null,
    );
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
    this.inflight?.unpopped(chain.inflightEntry);
    // The chain's slots still hold the driver's descriptors: used descriptors are written from the used
    // position on and, per chain completed, cover as many slots as it took, so they stay behind the
    // slots of every chain still in flight, and the latest popped chain's slots are the last of them.
    let slot = this.nextAvail - chain.ringDescriptors;
    if (slot < 0) {
      slot += this.size;
      this.availWrap ^= 1;
    }
    this.nextAvail = slot;
  }

  /**
   * After a crash the slots of the chains in flight may hold used descriptors of a batch that was
   * never published (flush writes all but the first one's flags before it, and the process may die
   * in between; an older version wrote them in pushUsed already). The resubmitted chains
   * complete in another order, so their used descriptors land elsewhere, and the driver, reading on
   * past them, would take a stale one for a completion. Those slots are the device's until it uses
   * them, and it has their descriptors in the area: each gets the driver's "available" flag bits back.
   */
  private hideStaleUsed(slots: number): void {
    let slot = this.usedPublished;
    let wrap = this.usedPublishedWrap;
    for (let k = 0; k < slots; k++) {
      this.desc16[slot * 8 + 7] = wrap === 1 ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
      if (++slot === this.size) {
        slot = 0;
        wrap ^= 1;
      }
    }
  }

  clearInflight(): void {
    if (this.pool.inFlight === 0 && this.pending === 0 && !this.resubmit.pending) this.inflight?.clear();
  }

  /**
   * §2.8.1: "VIRTQ_DESC_F_AVAIL and VIRTQ_DESC_F_USED bits are different for an available descriptor",
   * with AVAIL matching the driver's wrap counter, which is the one we expect at nextAvail.
   */
  private isAvailable(flags: number): boolean {
    const avail = (flags >>> 7) & 1;
    const used = (flags >>> 15) & 1;
    return avail === this.availWrap && used !== this.availWrap;
  }

  /** The used-buffer notification decision after publishing the batch that started at `oldIdx`. */
  private needsNotification(oldIdx: number): boolean {
    // virtio 1.2 §2.8.10: the Driver Event Suppression structure "controls the used buffer
    // notifications sent by the device to the driver".
    const flags = this.driverEvent[1]! & 3;
    if (flags === VRING_PACKED_EVENT_FLAG_DISABLE) return false;
    // RING_EVENT_FLAGS_DESC is "Only valid if VIRTIO_F_RING_EVENT_IDX has been negotiated"; otherwise,
    // and for ENABLE or the reserved value, notify.
    if (flags !== VRING_PACKED_EVENT_FLAG_DESC || !this.eventIdx) return true;
    if (!this.signalledValid) {
      this.signalledValid = true;
      return true;
    }
    return packedNeedEvent(this.driverEvent[0]!, this.size, oldIdx, this.usedPublished, this.usedPublishedWrap);
  }

  /** Resolve the three areas in `memory` and rebuild the typed arrays (all or nothing). */
  private mapRings(memory: GuestMemory): void {
    const a = this.addresses;
    // virtio 1.2 §2.8.10.1: descriptor ring 16 / 16*size, event suppression structures 4 / 4.
    const desc = ringArea(memory, a.descUserAddr, 16 * this.size, 16, 'descriptor ring');
    const driver = ringArea(memory, a.availUserAddr, 4, 4, 'driver event suppression');
    const device = ringArea(memory, a.usedUserAddr, 4, 4, 'device event suppression');
    this.memory = memory;
    this.desc32 = u32(desc);
    this.desc16 = u16(desc);
    this.driverEvent = u16(driver);
    this.deviceEvent = u16(device);
  }
}
