/**
 * The chains an earlier process left in flight (inflight.ts recovery), which a ring pops before the
 * driver's new ones, oldest first. Split rings keep their heads, packed rings their inflight-area
 * entries; the cursor only walks the numbers and steps back over one a device hands back.
 */

const NOTHING_TO_RESUBMIT = new Uint16Array(0);

export class ResubmitCursor {
  private entries: Uint16Array = NOTHING_TO_RESUBMIT;
  private at = 0;

  /** Resubmit `entries` (oldest first) before anything else; set once, by the ring's constructor. */
  start(entries: Uint16Array): void {
    this.entries = entries;
    this.at = 0;
  }

  /** Whether chains are left to resubmit. */
  get pending(): boolean {
    return this.at < this.entries.length;
  }

  /** The next entry to resubmit; only while {@link pending}. */
  next(): number {
    return this.entries[this.at++]!;
  }

  /**
   * Step back over a chain the device hands back (unpop) if it was a resubmitted one, and say whether
   * it was: a queue's first pops are the resubmitted chains and pop serials count from 0, so the
   * serial tells. Such a chain goes back to the inflight area, still in flight, not to the ring.
   */
  unpop(popSerial: number): boolean {
    if (popSerial >= this.entries.length) return false;
    this.at--;
    return true;
  }
}
