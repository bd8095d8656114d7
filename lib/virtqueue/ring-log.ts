/**
 * What a queue marks in the dirty page log while a live migration runs (vhost-user.rst, "Migration"):
 * "All the modifications to memory pointed by vring "descriptor" should be marked" (the device-writable
 * buffers of every chain it completes), and "Modifications to "used" vring should be marked if
 * VHOST_VRING_F_LOG is part of ring's flags".
 *
 * A ring holds a {@link RingLog} only while logging is on, so the datapath pays one null check per
 * completion and per flush when it is off.
 */
import type { DirtyLog } from '../memory/dirty-log';
import type { GuestMemory } from '../memory/guest-memory';
import type { DescriptorChain } from './descriptor-chain';

/** Logging as the protocol configured it for one ring. */
export interface RingLogSpec {
  log: DirtyLog;
  /**
   * SET_VRING_ADDR log_guest_addr when VHOST_VRING_F_LOG is set, else null (ring writes not logged).
   * vhost-user.rst: "the write to first byte of the used ring is logged at this offset from log start".
   */
  usedGuestAddr: number | null;
}

export class RingLog {
  /**
   * @param ringGuestAddr guest address of the area whose writes {@link ring} marks (split: the used
   *   ring; packed: the descriptor ring), or null when ring writes are not logged
   * @param eventGuestAddr packed: the device event suppression area, or null
   */
  constructor(
    readonly log: DirtyLog,
    private readonly ringGuestAddr: number | null,
    private readonly eventGuestAddr: number | null = null,
  ) {}

  /**
   * The device completed `chain`: every device-writable segment may hold its bytes (a device may write
   * a status byte at the end of a buffer it reports as shorter), so all of them are marked.
   */
  chainWritten(chain: DescriptorChain): void {
    const memory = chain.memory;
    for (let i = chain.readableSegments; i < chain.segments; i++) {
      this.log.mark(memory.guestAddress(chain.viewId[i]!, chain.offset[i]!), chain.length[i]!);
    }
  }

  /** The device wrote `length` bytes at `offset` of its ring area (used ring / descriptor ring). */
  ring(offset: number, length: number): void {
    if (this.ringGuestAddr !== null) this.log.mark(this.ringGuestAddr + offset, length);
  }

  /** The device wrote its event suppression area (packed rings). */
  event(length: number): void {
    if (this.eventGuestAddr !== null) this.log.mark(this.eventGuestAddr, length);
  }
}

/**
 * The guest physical address of front-end address `userAddr`, or null when no region holds it. Packed
 * rings need it: QEMU's log_guest_addr names the device event area, not the descriptor ring the device
 * writes its used descriptors into.
 */
export function userToGuestAddress(memory: GuestMemory, userAddr: number): number | null {
  for (const region of memory.regions) {
    if (userAddr >= region.userAddr && userAddr - region.userAddr < region.size) return region.guestPhysAddr + (userAddr - region.userAddr);
  }
  return null;
}
