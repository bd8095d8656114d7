/**
 * The per-queue pool of {@link DescriptorChain}s: exactly `size` of them, built once, so popping and
 * completing requests allocates nothing, and a driver cannot make the device hold more than `size`
 * chains (virtio 1.2 §2.7: "Queue Size corresponds to the maximum number of buffers in the virtqueue").
 */
import { QueueUsageError } from '../errors';
import { DescriptorChain } from './descriptor-chain';

export class ChainPool {
  private readonly free: DescriptorChain[];
  private freeCount: number;
  /** Chains taken so far minus those untaken: the next chain's {@link DescriptorChain.popSerial}. */
  private serial = 0;

  constructor(readonly size: number) {
    this.free = [];
    for (let i = 0; i < size; i++) this.free.push(new DescriptorChain());
    this.freeCount = size;
  }

  /** Chains handed out and not yet returned. */
  get inFlight(): number {
    return this.size - this.freeCount;
  }

  /** The chain the next {@link take} returns (fill it first, take it once the walk succeeded), or null. */
  peek(): DescriptorChain | null {
    return this.freeCount === 0 ? null : this.free[this.freeCount - 1]!;
  }

  /** Hand out the chain {@link peek} returned, marked as owned by `owner`. */
  take(owner: object): DescriptorChain {
    const chain = this.free[--this.freeCount]!;
    chain.owner = owner;
    chain.popSerial = this.serial++;
    return chain;
  }

  /**
   * Take back the chain taken last as if it had never been taken (the ring moves back over it).
   * Throws QueueUsageError VIRTQ_UNPOP_NOT_LATEST for any other chain: the chains in flight have
   * distinct serials below `serial`, so only the one taken last carries `serial - 1`.
   */
  untake(chain: DescriptorChain, owner: object): void {
    this.checkHeld(chain, owner);
    if (chain.popSerial !== this.serial - 1) {
      throw new QueueUsageError('VIRTQ_UNPOP_NOT_LATEST', 'only the most recently popped chain still in flight can go back to the ring');
    }
    this.serial--;
    this.give(chain, owner);
  }

  /** Throw QueueUsageError VIRTQ_NOT_IN_FLIGHT (a device bug, not a driver one) unless `owner` holds `chain`. */
  checkHeld(chain: DescriptorChain, owner: object): void {
    if (chain.owner !== owner) {
      throw new QueueUsageError('VIRTQ_NOT_IN_FLIGHT', 'descriptor chain already completed, or popped from another queue');
    }
  }

  /** Take back a chain; throws as {@link checkHeld} if `owner` does not hold it. */
  give(chain: DescriptorChain, owner: object): void {
    this.checkHeld(chain, owner);
    chain.owner = null;
    this.free[this.freeCount++] = chain;
  }
}
