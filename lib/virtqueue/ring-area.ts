/**
 * Locating the ring areas (descriptor table / ring, driver area, device area) in guest memory.
 *
 * Ring addresses are front-end virtual addresses (vhost-user.rst, SET_VRING_ADDR), resolved once per
 * memory map with {@link GuestMemory.userAddrView}; the views are then wrapped in typed arrays so the
 * datapath indexes fields directly. Typed arrays use the host's byte order and virtio rings are
 * little-endian (virtio 1.2 §2.4), so the module refuses to load on a big-endian host.
 */
import type { GuestMemory } from '../memory/guest-memory';
import { RingError } from '../errors';

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error('vhostd virtqueues need a little-endian host');
}

/**
 * A view of `bytes` bytes of ring area at front-end address `userAddr`, checked for `align`.
 *
 * virtio 1.2 §2.7.1 / §2.8.11: "The driver MUST ensure that the physical address of the first byte of
 * each virtqueue part is a multiple of the specified alignment value in the above table."
 * Throws RingError VIRTQ_NO_RING when misaligned, MemoryError when not mapped.
 */
export function ringArea(memory: GuestMemory, userAddr: number, bytes: number, align: number, what: string): Uint8Array {
  if (userAddr % align !== 0) {
    throw new RingError('VIRTQ_NO_RING', `${what} at 0x${userAddr.toString(16)} is not ${align}-byte aligned`);
  }
  const view = memory.userAddrView(userAddr, bytes);
  // The mapping itself must keep the alignment for typed arrays (region user addresses are page aligned
  // in practice; a front-end that sends odd ones gets a refusal, not a crash).
  if (view.byteOffset % align !== 0) {
    throw new RingError('VIRTQ_NO_RING', `${what} at 0x${userAddr.toString(16)} is not ${align}-byte aligned in its mapping`);
  }
  return view;
}

/** A Uint16Array over the whole of `view` (an even number of bytes, 2-aligned). */
export function u16(view: Uint8Array): Uint16Array {
  return new Uint16Array(view.buffer, view.byteOffset, view.byteLength >>> 1);
}

/** A Uint32Array over the leading whole words of `view` (4-aligned). */
export function u32(view: Uint8Array): Uint32Array {
  return new Uint32Array(view.buffer, view.byteOffset, view.byteLength >>> 2);
}
