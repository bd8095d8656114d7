/**
 * virtio-rng (virtio 1.2 §5.4, device id 4): one request queue; the driver offers device-writable
 * buffers and the device fills them with entropy, reporting the bytes written as used.len.
 *
 * A synchronous source (getrandom) fills a whole batch of chains per kick and flushes once. An
 * asynchronous source (a file or /dev/hwrng) fills one chain at a time; the loop resumes when the
 * read completes. With a rate limit, chains stay in the ring (not popped) until the next period: a
 * request may get fewer bytes than it asked for, never none and never lost.
 */
import type { Registry } from 'prom-client';

import type { Logger } from '../../lib/runtime/logger';
import type { DeviceBackend } from '../../lib/vhost-user/device-backend';
import type { DescriptorChain } from '../../lib/virtqueue/descriptor-chain';
import { drainQueue } from '../../lib/virtqueue/drain';
import type { Virtqueue } from '../../lib/virtqueue/virtqueue';
import type { EntropySource } from './entropy-source';
import { RngStats, createRngMetrics } from './metrics';
import { RateLimiter, type RateLimit } from './rate-limiter';

/** virtio 1.2 §5.4.2: "0 requestq". */
export const REQUEST_QUEUE = 0;
/** After a source error, wait this long before trying the request again. */
const RETRY_MS = 1000;

export interface RngDeviceOptions {
  source: EntropySource;
  rateLimit?: RateLimit;
  queueSize: number;
  logger: Logger;
}

export class RngDevice implements DeviceBackend {
  readonly name = 'rng';
  readonly numQueues = 1;
  readonly maxQueueSize: number;
  private readonly source: EntropySource;
  private readonly limiter: RateLimiter;
  private readonly logger: Logger;
  private queue: Virtqueue | null = null;
  /** A chain whose asynchronous fill is in flight (at most one). */
  private filling: DescriptorChain | null = null;
  private fillDone: (() => void) | null = null;
  private timer: NodeJS.Timeout | null = null;
  /** Pending retry of a failed read: the timer and the step it runs. */
  private retryTimer: NodeJS.Timeout | null = null;
  private retryStep: (() => void) | null = null;
  private lastError = '';
  /** Set when the rate-limit timer woke the queue: chains popped until the ring is found empty waited for it. */
  private delayed = false;
  /** Counters the metrics read (metrics.ts). */
  readonly stats = new RngStats();

  constructor(options: RngDeviceOptions) {
    this.source = options.source;
    this.limiter = new RateLimiter(options.rateLimit);
    this.maxQueueSize = options.queueSize;
    this.logger = options.logger;
  }

  features(): bigint {
    return 0n; // virtio-rng has no device-specific feature bits
  }

  protocolFeatures(): bigint {
    return 0n;
  }

  registerMetrics(registry: Registry): void {
    createRngMetrics(registry, this.stats);
  }

  startQueue(_index: number, queue: Virtqueue): void {
    this.queue = queue;
  }

  async stopQueue(): Promise<void> {
    this.clearTimer();
    this.delayed = false;
    if (this.filling !== null) {
      const stopped = new Promise<void>((resolve) => (this.fillDone = resolve));
      const retry = this.retryStep;
      if (retry !== null) {
        // Waiting to retry a failed read: run the step now; it sees the stop and completes the chain.
        clearTimeout(this.retryTimer!);
        this.retryTimer = null;
        this.retryStep = null;
        retry();
      }
      await stopped;
    }
    this.queue = null;
  }

  processQueue(_index: number, queue: Virtqueue): void {
    this.queue = queue;
    if (this.filling === null && this.timer === null) this.drain(queue);
  }

  close(): void {
    this.clearTimer();
    this.source.close();
  }

  /**
   * Fill chains until the ring is empty (then a later timer wake no longer counts as a delay), the
   * rate limit's quota is spent (wake at the next period), or an asynchronous source must fill one
   * chain at a time (start it once the chains before it are published; it drains again when done).
   */
  private drain(queue: Virtqueue): void {
    let asyncChain = null as DescriptorChain | null;
    const result = drainQueue(queue, {
      ready: () => this.limiter.available() > 0,
      handle: (chain) => {
        if (!this.source.synchronous) {
          asyncChain = chain;
          return false;
        }
        const written = this.fillSync(chain, this.grant(chain));
        this.stats.deliveredBytes += written;
        queue.pushUsed(chain, written);
        return true;
      },
    });
    if (asyncChain !== null) this.fillAsync(queue, asyncChain);
    else if (result === 'paused') this.wakeAfter(this.limiter.msUntilRefill());
    else this.delayed = false;
  }

  /** Take quota for `chain`; counts the request as rate limited if it waited or gets less than it asked. */
  private grant(chain: DescriptorChain): number {
    const wanted = chain.writableLength;
    const granted = this.limiter.take(wanted);
    if (this.delayed || granted < wanted) this.stats.rateLimited++;
    return granted;
  }

  /** Fill the first `budget` writable bytes of `chain` from the synchronous source. */
  private fillSync(chain: DescriptorChain, budget: number): number {
    let written = 0;
    for (let i = chain.readableSegments; i < chain.segments && written < budget; i++) {
      const length = Math.min(chain.length[i]!, budget - written);
      this.source.fillSync(chain.memory.views[chain.viewId[i]!]!, chain.offset[i]!, length);
      written += length;
    }
    return written;
  }

  /**
   * Fill `chain` segment by segment from an asynchronous source, complete it, then resume draining.
   * If the source fails before any byte arrived, the same chain is tried again after RETRY_MS.
   */
  private fillAsync(queue: Virtqueue, chain: DescriptorChain): void {
    this.filling = chain;
    chain.memory.hold(); // reads land in guest pages: keep them mapped until the chain completes
    const budget = this.grant(chain);
    let written = 0;
    let segment = chain.readableSegments;
    let segmentDone = 0;
    const complete = () => {
      this.filling = null;
      this.stats.deliveredBytes += written;
      queue.pushUsed(chain, written);
      queue.flush();
      chain.memory.release();
      const stopping = this.fillDone;
      this.fillDone = null;
      if (stopping !== null) stopping();
      else this.drain(queue);
    };
    const next = (): void => {
      if (written >= budget || segment >= chain.segments || this.fillDone !== null) return complete();
      const view = chain.memory.views[chain.viewId[segment]!]!;
      const want = Math.min(chain.length[segment]! - segmentDone, budget - written);
      this.source.fill(view, chain.offset[segment]! + segmentDone, want, (err, bytes) => {
        if (err !== null || bytes === 0) return failed(err !== null ? err.message : 'source returned no data (end of file)');
        this.lastError = '';
        written += bytes;
        segmentDone += bytes;
        if (segmentDone === chain.length[segment]) {
          segment++;
          segmentDone = 0;
        }
        next();
      });
    };
    const failed = (why: string): void => {
      this.stats.sourceErrors++;
      if (why !== this.lastError) this.logger.error(`entropy source ${this.source.name}: ${why}; retrying in ${RETRY_MS} ms`);
      this.lastError = why;
      if (written > 0 || this.fillDone !== null) return complete();
      this.retryStep = next;
      this.retryTimer = setTimeout(() => {
        this.retryTimer = null;
        this.retryStep = null;
        next();
      }, RETRY_MS);
    };
    next();
  }

  private wakeAfter(ms: number): void {
    if (this.timer !== null) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.delayed = true;
      if (this.queue !== null) this.drain(this.queue);
    }, ms);
  }

  private clearTimer(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
  }
}
