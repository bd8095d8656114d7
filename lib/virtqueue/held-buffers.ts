/**
 * Buffers a device keeps for a long time before it completes them: virtio-scsi's event queue (a
 * buffer waits until an event happens) and virtio-balloon's stats queue (the driver's buffer waits
 * until the device wants statistics). Seconds or minutes pass, in which the front-end may replace the
 * memory table (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) or stop the ring (GET_VRING_BASE).
 *
 * - Memory: a held chain's segments are not used while it is held. {@link HeldBuffers.take} walks it
 *   again against the queue's current memory map (`Virtqueue.rewalk`, every ring check applied
 *   again), so nothing keeps an old mapping alive (no `GuestMemory.hold`) and the bytes written land in
 *   the guest through the mapping in force when they are written.
 * - Stop: {@link HeldBuffers.returnAll} gives the unused buffers back to the ring (`Virtqueue.unpop`,
 *   libvhost-user's vu_queue_rewind), so the base GET_VRING_BASE reports makes the next start pop them
 *   again and the driver loses none. A device calls it from `stopQueue`.
 *
 * Contract: on a queue whose buffers are held, the device holds every chain it pops, in pop order,
 * and completes them in the order {@link take} gives them (oldest first). The chains held are then
 * always the ones popped last, which is what a ring can give back: a buffer popped before one already
 * used cannot return without the used one coming back too.
 */
import type { DescriptorChain } from './descriptor-chain';
import type { Virtqueue } from './virtqueue';

export class HeldBuffers {
  /** Oldest first. */
  private readonly chains: DescriptorChain[] = [];

  /** Buffers of `queue` (one queue's run: a restarted ring has a new queue and a new HeldBuffers). */
  constructor(readonly queue: Virtqueue) {}

  /** Chains held. */
  get count(): number {
    return this.chains.length;
  }

  /** Keep `chain`, just popped from the queue, for later; do not touch its segments until {@link take}. */
  hold(chain: DescriptorChain): void {
    this.chains.push(chain);
  }

  /**
   * The oldest held chain, walked again against the queue's current memory, for the device to fill
   * and `pushUsed`; null when none is held. A RingError (its buffer no longer resolves in the new
   * memory table: a front-end that removed memory under a buffer in flight) propagates like one from
   * `pop`, and the chain is no longer held.
   */
  take(): DescriptorChain | null {
    const chain = this.chains.shift();
    if (chain === undefined) return null;
    this.queue.rewalk(chain);
    return chain;
  }

  /**
   * Give every held chain back to the ring, newest first, so `queue.base()` points at the oldest.
   * Throws QueueUsageError VIRTQ_UNPOP_NOT_LATEST when the device broke the contract above (a chain
   * popped after a held one was completed); the chains not given back stay held.
   */
  returnAll(): void {
    for (let chain = this.chains.at(-1); chain !== undefined; chain = this.chains.at(-1)) {
      this.queue.unpop(chain);
      this.chains.pop();
    }
  }
}
