/**
 * The per-queue pool of {@link DescriptorChain}s: exactly `size` of them, built once, so popping and
 * completing requests allocates nothing, and a driver cannot make the device hold more than `size`
 * chains (virtio 1.2 §2.7: "Queue Size corresponds to the maximum number of buffers in the virtqueue").
 */
import { DescriptorChain } from './descriptor-chain';

export class ChainPool {
  private readonly free: DescriptorChain[];
  private freeCount: number;

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
    return chain;
  }

  /** Take back a chain; throws (a device bug, not a driver one) if `owner` does not hold it. */
  give(chain: DescriptorChain, owner: object): void {
    if (chain.owner !== owner) throw new Error('descriptor chain completed twice or on the wrong queue');
    chain.owner = null;
    this.free[this.freeCount++] = chain;
  }
}
