/**
 * Giving guest pages back to the host: fallocate(PUNCH_HOLE | KEEP_SIZE) on the memory fd the
 * front-end shared (memfd, tmpfs, hugetlbfs), through an IoEngine so the kernel's work happens off the
 * event loop (io_uring, else the thread pool executor). The fd's blocks are freed and the pages read
 * back as zeroes in every mapping, QEMU's and the guest's included. Where the fd refuses fallocate
 * (EOPNOTSUPP: a file system without hole punching), the region's mapping is discarded with
 * madvise(MADV_REMOVE), which frees the same backing (MappedRegion.discard).
 *
 * A request is a list of ranges and a callback run once every range was released or failed: the
 * device completes the buffer only then (virtio 1.2 §5.5.6.1, VIRTIO_BALLOON_F_MUST_TELL_HOST: the
 * driver does not touch the pages before the device acknowledged them).
 */
import { IoEngine } from '../../lib/io/engine';
import type { ExecutorFactory } from '../../lib/io/executor';
import { MappedRegion } from '../../lib/memory/mapped-region';
import type { Logger } from '../../lib/runtime/logger';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE } from '../../native/io-batch';
import type { ReleaseRange } from './inflate-deflate';

const EOPNOTSUPP = 95;

/** What a request achieved: bytes released and ranges that failed. */
export interface ReleaseResult {
  released: number;
  failed: number;
}

interface Request {
  pending: number;
  result: ReleaseResult;
  done: (result: ReleaseResult) => void;
}

export class PageReleaser {
  private readonly engine: IoEngine;
  /** Per op slot (the engine's userData): its range and request. */
  private readonly ranges: (ReleaseRange | null)[] = [];
  private readonly requests: (Request | null)[] = [];
  private readonly freeSlots: number[] = [];
  private lastError = '';

  constructor(
    createExecutor: ExecutorFactory,
    capacity: number,
    private readonly logger: Logger,
  ) {
    this.engine = new IoEngine(createExecutor, capacity, (u, r, n) => this.onCompletions(u, r, n));
  }

  /** Executor kind (io_uring or threadpool), for the log. */
  get kind(): string {
    return this.engine.kind;
  }

  /**
   * Stage the release of `ranges`; `done` runs once all of them finished (at once, synchronously, for
   * none). Call {@link submit} after staging a batch.
   */
  release(ranges: readonly ReleaseRange[], done: (result: ReleaseResult) => void): void {
    const request: Request = { pending: 0, result: { released: 0, failed: 0 }, done };
    for (const range of ranges) {
      if (range.region.fd === null) {
        this.discard(range, request.result);
        continue;
      }
      const slot = this.freeSlots.pop() ?? this.ranges.length;
      this.ranges[slot] = range;
      this.requests[slot] = request;
      request.pending++;
      this.engine.addFallocate(
        range.region.fd,
        FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
        range.region.mmapOffset + range.offset,
        range.length,
        slot,
      );
    }
    if (request.pending === 0) done(request.result);
  }

  /** Hand the staged releases to the kernel. */
  submit(): void {
    this.engine.submit();
  }

  /** Resolves once no release is in flight (their callbacks have run). */
  drained(): Promise<void> {
    return this.engine.drained();
  }

  /** Release the engine; only once {@link drained} resolved. */
  close(): void {
    this.engine.close();
  }

  private onCompletions(userData: Uint32Array, results: Int32Array, count: number): void {
    for (let i = 0; i < count; i++) {
      const slot = userData[i]!;
      const range = this.ranges[slot]!;
      const request = this.requests[slot]!;
      this.ranges[slot] = null;
      this.requests[slot] = null;
      this.freeSlots.push(slot);
      const result = results[i]!;
      if (result === 0) request.result.released += range.length;
      else if (result === -EOPNOTSUPP) this.discard(range, request.result);
      else this.failed(range, `fallocate(PUNCH_HOLE) errno ${-result}`, request.result);
      if (--request.pending === 0) request.done(request.result);
    }
  }

  /** madvise(MADV_REMOVE) on the region's mapping: for fds without fallocate hole punching. */
  private discard(range: ReleaseRange, result: ReleaseResult): void {
    if (!(range.region instanceof MappedRegion)) {
      this.failed(range, 'the region has neither a memory fd nor a mapping to discard', result);
      return;
    }
    try {
      range.region.discard(range.offset, range.length);
      result.released += range.length;
    } catch (err) {
      this.failed(range, `madvise(MADV_REMOVE): ${(err as Error).message}`, result);
    }
  }

  /** Count a failed range; log each distinct reason once in a row (a guest can make many). */
  private failed(range: ReleaseRange, why: string, result: ReleaseResult): void {
    result.failed++;
    if (why === this.lastError) return;
    this.lastError = why;
    this.logger.warn(`cannot release ${range.length} bytes at guest address 0x${(range.region.guestPhysAddr + range.offset).toString(16)}: ${why}`);
  }
}
