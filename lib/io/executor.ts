/**
 * How staged operations reach the kernel: an executor owns an {@link OpBatch}, hands every staged op
 * over in {@link IoExecutor.submit} (once per batch) and reports completions to a sink in batches.
 * Three executors share this interface: io_uring (io-uring-executor.ts), preadv/pwritev on the libuv
 * thread pool (thread-pool-executor.ts, the fallback when io_uring is unavailable) and
 * {@link NullExecutor} (no I/O at all, for overhead benchmarks like QEMU's null-co driver).
 *
 * Each op carries a 32-bit `userData` that comes back with its result; results follow the io_uring
 * convention: bytes transferred, or -errno. Devices use executors through an IoEngine (engine.ts).
 */
import { IORING_OP } from '../../native/io-batch';
import { OpBatch } from './op-batch';

/**
 * Receives completions: `count` pairs of `userData[i]` and `result[i]` (bytes or -errno). The arrays
 * belong to the sink until it returns (it may rewrite them in place); the executor reuses them after.
 */
export type CompletionSink = (userData: Uint32Array, result: Int32Array, count: number) => void;

/** One I/O context (one io_uring): a device creates one per queue, never one per file. */
export interface IoExecutor {
  /** "io_uring", "thread-pool" or "null" (logs, metrics). */
  readonly kind: string;
  /** Where operations are staged before {@link submit}. */
  readonly batch: OpBatch;
  /** Hand every staged op to the kernel (one system call for io_uring) and clear the batch. */
  submit(): void;
  /**
   * Deliver the completions that are ready, without blocking or a system call (io_uring: its
   * completion queue is shared memory); returns how many. Absent where completions only come as
   * events (the thread pool) or inside `submit` (null).
   */
  poll?(): number;
  /** Release the ring or handles. Call only once nothing is in flight. */
  close(): void;
}

/** Creates an executor sized for about `capacity` operations in flight, reporting to `sink`. */
export type ExecutorFactory = (capacity: number, sink: CompletionSink) => IoExecutor;

/**
 * Completes every op at once without touching any file (reads leave memory as it was), so a
 * benchmark measures the daemon's own overhead, like QEMU's null-co driver. Completions are reported
 * from inside `submit`, one sink call per batch.
 */
export class NullExecutor implements IoExecutor {
  readonly kind = 'null';
  readonly batch: OpBatch;
  private readonly userData: Uint32Array;
  private readonly result: Int32Array;

  constructor(
    capacity: number,
    private readonly sink: CompletionSink,
  ) {
    this.batch = new OpBatch(capacity * 2, capacity * 4);
    this.userData = new Uint32Array(capacity * 2);
    this.result = new Int32Array(capacity * 2);
  }

  submit(): void {
    const b = this.batch;
    while (b.count > 0) {
      // Completions of one submit go out in chunks of the result arrays' size.
      const n = Math.min(b.count, this.userData.length);
      for (let i = 0; i < n; i++) {
        const op = b.opcode[i];
        this.userData[i] = b.userData[i]!;
        this.result[i] = op === IORING_OP.READV || op === IORING_OP.WRITEV ? b.opLength(i) : 0;
      }
      b.consume(n);
      this.sink(this.userData, this.result, n);
    }
  }

  close(): void {}
}
