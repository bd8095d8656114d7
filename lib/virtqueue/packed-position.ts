/**
 * Where a packed ring's device side stands, read from the descriptor ring alone: for a ring that starts
 * without an inflight area after its back-end went away. QEMU learns a packed ring's position only from
 * GET_VRING_BASE, which a back-end that is gone cannot answer, and cannot read it from guest memory
 * (hw/virtio/virtio.c, virtio_queue_packed_restore_last_avail_idx restores nothing), so it sends the
 * new back-end the base of the last start (0x8000 for a ring that started fresh). vhost-user-net gets
 * no inflight area (INFLIGHT_SHMFD is a blk/scsi thing), so that stale base would be all it has.
 *
 * What the ring shows (virtio 1.2 §2.8.1, §2.8.6): the driver makes a descriptor available with AVAIL
 * set to its wrap counter and USED to the inverse; the device marks one used with both set to its own
 * wrap counter W; both go through the slots in order. The device writes one used descriptor per chain
 * and skips its other slots (§2.8.6); PackedRing marks those used too (Linux virtio-net has one slot
 * per chain anyway: one per mergeable rx buffer, indirect descriptors for multi-part tx frames). So
 * every slot was last written either by the device as used or by the driver as available, and, with U
 * the device's used position, read in ring order from U:
 *
 * ```
 * U ... D-1   available (popped or not): AVAIL = the wrap of its lap, USED the inverse
 * D ... U-1   used: AVAIL = USED = the wrap of the lap the device used it in
 * ```
 *
 * (D: the driver's next slot; D = U when nothing is available, D = U + size when everything is.) So the
 * USED bit is W on slots 0 .. U-1 (used this lap, or used and made available again for the next lap)
 * and not W on U .. size-1 (available this lap, or used last lap): one boundary, at U. No boundary
 * means U = 0 with W the inverse of what every slot shows. The AVAIL bits are checked too: from U on,
 * first available shapes (AVAIL != USED), then used ones (AVAIL == USED), nothing else.
 *
 * Refused (the caller keeps the front-end's base) when the ring does not read that way:
 * - a used chain of several descriptors whose other slots kept the driver's flags (a device that only
 *   skips them, as the spec asks at least): a second USED boundary after each such chain. Right before
 *   U such slots read exactly as buffers the driver made available (the buffer id does not tell them
 *   apart: Linux gives a new buffer the id just freed), which is why PackedRing marks them;
 * - a batch the old process was writing when it died (flush writes every used descriptor of a batch
 *   but the first one's flags, then those: a window of a few stores): used descriptors after an
 *   available one;
 * - anything else the guest wrote there.
 *
 * Chains the old process popped but never completed lie at U and after: the device pops them again
 * (a frame sent twice, or a receive buffer filled again), which is what a restart without an inflight
 * area can do, and the ring stays in step with the driver.
 */
import { VRING_PACKED_DESC_F_AVAIL, VRING_PACKED_DESC_F_USED } from '../virtio/constants';

/** The device's used position and wrap counter; the next available chain is there too. */
export interface PackedPosition {
  readonly index: number;
  readonly wrap: number;
}

/**
 * The device's position read from the flags of the descriptor ring (`desc16`: the ring as le16 words,
 * flags at word 8 * slot + 7), or why it cannot be read there. Any values are safe: the result is a
 * slot of the ring and a wrap counter, or a refusal.
 *
 * The driver may make buffers available while this reads (it does not wait for the back-end): that
 * turns the used slot at D into an available one with the same USED bit (the wrap of the lap before
 * it), so the boundary holds still, and the second pass reads from the end of the used run backwards,
 * the direction the available run grows in, so it sees a run that only got longer, never a gap.
 */
export function findPackedPosition(desc16: Uint16Array, size: number): PackedPosition | string {
  if (desc16.length < size * 8) return 'the descriptor ring is not mapped';
  const usedBit = (flags: number): number => ((flags & VRING_PACKED_DESC_F_USED) === 0 ? 0 : 1);
  const availBit = (flags: number): number => ((flags & VRING_PACKED_DESC_F_AVAIL) === 0 ? 0 : 1);
  // The USED bit: slot 0's value up to the boundary, the other value from it on.
  const first = usedBit(desc16[7]!);
  let index = 1;
  while (index < size && usedBit(desc16[index * 8 + 7]!) === first) index++;
  for (let slot = index + 1; slot < size; slot++) {
    if (usedBit(desc16[slot * 8 + 7]!) === first) {
      return `the used flags change more than once (at slots ${index} and ${slot}): chains of several descriptors, or a batch never published`;
    }
  }
  if (index === size) index = 0;
  const wrap = index === 0 ? first ^ 1 : first;
  // Backwards from the slot before the used position: used descriptors, then available ones.
  let availableSeen = false;
  for (let k = size - 1; k >= 0; k--) {
    const slot = (index + k) % size;
    const flags = desc16[slot * 8 + 7]!;
    if (usedBit(flags) !== (slot < index ? wrap : wrap ^ 1)) return `the used flag of slot ${slot} changed while it was read`;
    const available = availBit(flags) !== usedBit(flags);
    if (available) availableSeen = true;
    else if (availableSeen) return `slot ${slot} is used between the used position ${index} and available slots after it`;
  }
  return { index, wrap };
}
