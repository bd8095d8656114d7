/**
 * The io_uring executor: one ring per I/O context (a device queue), one `submit` (one io_uring_enter)
 * per batch, iovecs that point straight into the caller's memory (guest pages: zero copy). libuv watches the ring fd itself, which is readable exactly while
 * completions wait in the completion queue (level-triggered, nothing to reset: no eventfd read per
 * wakeup); each wakeup reaps completions in chunks of the preallocated result arrays, one sink call
 * (and so one used-ring flush) per chunk.
 */
import { native, POLL_READABLE, type IoUring, type Watcher } from '../../native/index';
import type { Logger } from '../runtime/logger';
import type { CompletionSink, IoExecutor } from './executor';
import { OpBatch } from './op-batch';

const EIO = 5;

/** Ring entries for `capacity` ops in flight (a power of two; the kernel caps entries at 32768). */
export function ringEntries(capacity: number): number {
  let n = 1;
  while (n < capacity) n *= 2;
  return Math.min(n, 4096);
}

export class IoUringExecutor implements IoExecutor {
  readonly kind = 'io_uring';
  readonly batch: OpBatch;
  private readonly ring: IoUring;
  private readonly watcher: Watcher;
  private readonly userData: Uint32Array;
  private readonly result: Int32Array;
  private retry: NodeJS.Immediate | null = null;
  /** The {@link OpBatch.version} whose arrays the ring holds (bindBatch), -1 before the first. */
  private boundVersion = -1;

  /** Throws (NativeError) when io_uring cannot be set up: the caller falls back. */
  constructor(
    capacity: number,
    private readonly sink: CompletionSink,
    private readonly logger: Logger,
  ) {
    this.ring = native.createIoUring(ringEntries(capacity));
    this.batch = new OpBatch(capacity * 2, capacity * 4);
    this.userData = new Uint32Array(Math.max(64, capacity));
    this.result = new Int32Array(this.userData.length);
    this.watcher = native.watch(this.ring.ringFd, POLL_READABLE, () => this.reap());
  }

  submit(): void {
    const b = this.batch;
    if (b.count === 0) return;
    let queued: number;
    try {
      // One bindBatch per array change instead of nine property lookups per submit.
      if (b.version !== this.boundVersion) {
        this.ring.bindBatch(b);
        this.boundVersion = b.version;
      }
      queued = this.ring.submitBound(b.count);
    } catch (err) {
      // Only a bug (an op the native side refuses) or a dying kernel gets here: fail the batch
      // rather than leave requests hanging.
      this.logger.error(`io_uring submit failed: ${(err as Error).message}`);
      this.failStaged();
      return;
    }
    b.consume(queued);
    // The submission queue was full even after a flush: try again once completions free entries.
    if (b.count > 0 && this.retry === null) this.retry = setImmediate(() => ((this.retry = null), this.submit()));
  }

  close(): void {
    if (this.retry !== null) clearImmediate(this.retry);
    this.watcher.stop();
    this.ring.close();
  }

  poll(): number {
    return this.reap();
  }

  private reap(): number {
    // Completions posted after the last reap below keep the ring fd readable: the next loop
    // iteration wakes us again.
    let total = 0;
    for (;;) {
      const n = this.ring.reap(this.userData, this.result);
      if (n > 0) this.sink(this.userData, this.result, n);
      total += n;
      if (n < this.userData.length) return total;
    }
  }

  private failStaged(): void {
    const b = this.batch;
    while (b.count > 0) {
      const n = Math.min(b.count, this.userData.length);
      for (let i = 0; i < n; i++) {
        this.userData[i] = b.userData[i]!;
        this.result[i] = -EIO;
      }
      b.consume(n);
      this.sink(this.userData, this.result, n);
    }
  }
}
