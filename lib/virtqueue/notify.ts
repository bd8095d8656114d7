/**
 * Notification suppression arithmetic shared by both ring layouts (virtio 1.2 §2.7.7, §2.7.10 and
 * §2.8.10). Indexes are 16-bit free-running counters: every subtraction is taken modulo 2^16.
 */

/**
 * `vring_need_event` from the virtio spec's virtio_ring.h: true when `eventIdx` lies in the window of
 * indexes written since the last decision, i.e. `old <= eventIdx < newIdx` in 16-bit modular order.
 *
 * virtio 1.2 §2.7.7.2: "If the idx field in the used ring (which determined where that descriptor index
 * was placed) was equal to used_event, the device MUST send a notification."
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/**
 * The packed-ring variant (virtio 1.2 §2.8.10): the driver's event is a ring offset plus the wrap
 * counter it expects; `oldIdx`/`newIdx` are the device's used positions (0 .. size-1) before and after
 * the batch, `newWrap` the device's used wrap counter after it. Positions are unwrapped onto one number
 * line (the previous lap is negative) so the split-ring window test applies.
 */
export function packedNeedEvent(
  eventOffWrap: number,
  size: number,
  oldIdx: number,
  newIdx: number,
  newWrap: number,
): boolean {
  let event = eventOffWrap & 0x7fff;
  // A batch publishes at least one descriptor and at most `size`, so new <= old means it wrapped.
  const old = newIdx <= oldIdx ? oldIdx - size : oldIdx;
  // The event refers to the previous lap when its wrap counter is not the current one.
  if (eventOffWrap >>> 15 !== newWrap) event -= size;
  return vringNeedEvent(event, newIdx, old);
}
