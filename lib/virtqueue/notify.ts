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

/** Longest back-off of early publishing, in drain passes (a probe every 64 batches costs nothing). */
const EARLY_PUBLISH_MAX_SKIP = 64;

/**
 * Whether a queue's drain may publish early (drain.ts), adapted to how fast the driver wakes. An
 * early call pays when the driver's wakeup takes longer than the rest of the batch: it starts that
 * wakeup sooner and still finds the whole batch. When the driver instead takes the early completion
 * and waits again before the batch is done (an idle CPU that wakes at once), the early call only
 * added a wakeup on both sides: then early publishing stops for a number of passes that doubles up
 * to {@link EARLY_PUBLISH_MAX_SKIP} while that repeats, and shrinks by half each time it paid.
 */
export class EarlyPublishGate {
  /** Passes to skip after the last probe that found a fast driver. */
  private skip = 0;
  /** Passes still to skip. */
  private wait = 0;

  /** At the start of a drain pass: may it publish early? */
  open(): boolean {
    if (this.wait === 0) return true;
    this.wait--;
    return false;
  }

  /** The driver took an early completion and waited again within the same pass. */
  fast(): void {
    this.skip = Math.min(EARLY_PUBLISH_MAX_SKIP, this.skip === 0 ? 1 : this.skip * 2);
    this.wait = this.skip;
  }

  /**
   * An early call was still unanswered at the end of its pass: the driver is slow to wake. The back-off
   * halves rather than ends: on a busy machine a fast driver misses a pass now and then, and a reset
   * would probe every pass again until it had doubled back up.
   */
  slow(): void {
    this.skip >>>= 1;
    this.wait = this.skip;
  }
}
