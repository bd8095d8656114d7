/**
 * The fallback executor when io_uring is unavailable (old kernel, seccomp, io_uring_disabled sysctl):
 * preadv/pwritev on the libuv thread pool (readv/writev at OFFSET_CURRENT), still zero copy (the
 * iovecs point into the caller's memory),
 * fdatasync through node:fs, fallocate synchronously (it only changes file metadata). Completions
 * that arrive in one event-loop turn go to the sink together, one flush per turn.
 *
 * The thread pool has UV_THREADPOOL_SIZE threads (4 by default), shared with the rest of Node, so
 * queue depth beyond that waits in libuv; io_uring is the fast path.
 */
import fs from 'node:fs';

import { IORING_FSYNC_DATASYNC, IORING_OP, native, NativeError } from '../../native/index';
import type { CompletionSink, IoExecutor } from './executor';
import { OpBatch } from './op-batch';

const EIO = 5;

export class ThreadPoolExecutor implements IoExecutor {
  readonly kind = 'thread-pool';
  readonly batch: OpBatch;
  private doneUserData: Uint32Array;
  private doneResult: Int32Array;
  private done = 0;
  private scheduled: NodeJS.Immediate | null = null;
  private closed = false;

  constructor(
    capacity: number,
    private readonly sink: CompletionSink,
  ) {
    this.batch = new OpBatch(capacity * 2, capacity * 4);
    this.doneUserData = new Uint32Array(capacity * 2);
    this.doneResult = new Int32Array(capacity * 2);
  }

  submit(): void {
    const b = this.batch;
    for (let i = 0; i < b.count; i++) {
      const userData = b.userData[i]!;
      const fd = b.fd[i]!;
      const complete = (result: number) => this.complete(userData, result);
      switch (b.opcode[i]) {
        case IORING_OP.READV:
        case IORING_OP.WRITEV: {
          const start = b.iovStart[i]!;
          const end = start + b.iovCount[i]!;
          // ioAsync copies the iovecs before returning, so the batch can be reused at once.
          native.ioAsync(b.opcode[i] === IORING_OP.WRITEV, fd, b.offset[i]!, b.iovBase.subarray(start, end), b.iovLen.subarray(start, end), complete);
          break;
        }
        case IORING_OP.FSYNC: {
          const callback = (err: NodeJS.ErrnoException | null) => complete(err === null ? 0 : -(Math.abs(err.errno ?? EIO)));
          if ((b.arg[i]! & IORING_FSYNC_DATASYNC) !== 0) fs.fdatasync(fd, callback);
          else fs.fsync(fd, callback);
          break;
        }
        case IORING_OP.FALLOCATE: {
          let result = 0;
          try {
            native.fallocate(fd, b.arg[i]!, b.offset[i]!, b.iovLen[b.iovStart[i]!]!);
          } catch (err) {
            result = err instanceof NativeError ? -err.errno : -EIO;
          }
          complete(result);
          break;
        }
        default:
          complete(-EIO);
      }
    }
    b.consume(b.count);
  }

  close(): void {
    this.closed = true;
    if (this.scheduled !== null) clearImmediate(this.scheduled);
  }

  private complete(userData: number, result: number): void {
    if (this.closed) return;
    if (this.done === this.doneUserData.length) {
      const bigger = new Uint32Array(this.done * 2);
      bigger.set(this.doneUserData);
      this.doneUserData = bigger;
      const biggerResult = new Int32Array(this.done * 2);
      biggerResult.set(this.doneResult);
      this.doneResult = biggerResult;
    }
    this.doneUserData[this.done] = userData;
    this.doneResult[this.done] = result;
    this.done++;
    if (this.scheduled === null) this.scheduled = setImmediate(() => this.deliver());
  }

  private deliver(): void {
    this.scheduled = null;
    const n = this.done;
    this.done = 0;
    // The sink may stage and submit more ops; their completions land after this batch.
    const userData = this.doneUserData.slice(0, n);
    const result = this.doneResult.slice(0, n);
    this.sink(userData, result, n);
  }
}
