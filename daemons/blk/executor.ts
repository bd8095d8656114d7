/**
 * How a queue's I/O reaches the image: the device stages operations into an {@link OpBatch} (parallel
 * typed arrays, the native IoBatch layout) and calls {@link BlkExecutor.submit} once per batch; the
 * executor reports completions to a sink in batches. Three executors share this interface:
 * io_uring (io-uring-executor.ts), preadv/pwritev on the libuv thread pool (thread-pool-executor.ts,
 * the fallback when io_uring is unavailable) and {@link NullExecutor} (no I/O at all, for overhead
 * benchmarks like QEMU's null-co driver).
 *
 * Each op carries a 32-bit `userData` that comes back with its result; results follow the io_uring
 * convention: bytes transferred, or -errno.
 */
import type { IoBatch } from '../../native/index';

/** io_uring opcodes (same values as native IORING_OP; repeated here so this file loads without the addon). */
export const OP_READV = 1;
export const OP_WRITEV = 2;
export const OP_FSYNC = 3;
export const OP_FALLOCATE = 17;

/** fsync flag: fdatasync semantics (IORING_FSYNC_DATASYNC). */
export const FSYNC_DATASYNC = 1;

// linux/falloc.h
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** Receives completions: `count` pairs of `userData[i]` and `result[i]` (bytes or -errno). */
export type CompletionSink = (userData: Uint32Array, result: Int32Array, count: number) => void;

/** Staged operations, reused batch after batch. Arrays grow (rarely) and never shrink. */
export class OpBatch implements IoBatch {
  opcode: Uint8Array;
  fd: Int32Array;
  offset: Float64Array;
  arg: Uint32Array;
  iovStart: Uint32Array;
  iovCount: Uint32Array;
  userData: Uint32Array;
  iovBase: Float64Array;
  iovLen: Float64Array;
  /** Operations staged. */
  count = 0;
  /** Iovec slots used by the staged operations. */
  iovUsed = 0;
  /** Bumped whenever an array is replaced by a bigger one (executors that bind the arrays rebind). */
  version = 0;

  constructor(ops: number, iovecs: number) {
    this.opcode = new Uint8Array(ops);
    this.fd = new Int32Array(ops);
    this.offset = new Float64Array(ops);
    this.arg = new Uint32Array(ops);
    this.iovStart = new Uint32Array(ops);
    this.iovCount = new Uint32Array(ops);
    this.userData = new Uint32Array(ops);
    this.iovBase = new Float64Array(iovecs);
    this.iovLen = new Float64Array(iovecs);
  }

  /** Make room for `n` more iovecs; the caller then writes them from index {@link iovUsed}. */
  reserveIovecs(n: number): void {
    const need = this.iovUsed + n;
    if (need <= this.iovBase.length) return;
    let size = this.iovBase.length * 2;
    while (size < need) size *= 2;
    this.iovBase = grow(this.iovBase, new Float64Array(size));
    this.iovLen = grow(this.iovLen, new Float64Array(size));
    this.version++;
  }

  /** Stage a READV/WRITEV over the `iovecs` iovecs just written at {@link iovUsed}. */
  addReadWrite(opcode: number, fd: number, offset: number, iovecs: number, userData: number): void {
    const i = this.next();
    this.opcode[i] = opcode;
    this.fd[i] = fd;
    this.offset[i] = offset;
    this.arg[i] = 0;
    this.iovStart[i] = this.iovUsed;
    this.iovCount[i] = iovecs;
    this.userData[i] = userData;
    this.iovUsed += iovecs;
  }

  addFsync(fd: number, flags: number, userData: number): void {
    const i = this.next();
    this.opcode[i] = OP_FSYNC;
    this.fd[i] = fd;
    this.offset[i] = 0;
    this.arg[i] = flags;
    this.iovStart[i] = 0;
    this.iovCount[i] = 0;
    this.userData[i] = userData;
  }

  /** FALLOCATE: the length travels in `iovLen[iovStart]` (native IoBatch contract). */
  addFallocate(fd: number, mode: number, offset: number, length: number, userData: number): void {
    this.reserveIovecs(1);
    const i = this.next();
    this.opcode[i] = OP_FALLOCATE;
    this.fd[i] = fd;
    this.offset[i] = offset;
    this.arg[i] = mode;
    this.iovStart[i] = this.iovUsed;
    this.iovCount[i] = 1;
    this.iovBase[this.iovUsed] = 0;
    this.iovLen[this.iovUsed] = length;
    this.userData[i] = userData;
    this.iovUsed++;
  }

  /** Bytes a READV/WRITEV op `i` asks for. */
  opLength(i: number): number {
    let total = 0;
    const start = this.iovStart[i]!;
    const end = start + this.iovCount[i]!;
    for (let k = start; k < end; k++) total += this.iovLen[k]!;
    return total;
  }

  /** Forget the first `n` staged ops (they were submitted), moving the rest and their iovecs to the front. */
  consume(n: number): void {
    if (n >= this.count) {
      this.count = 0;
      this.iovUsed = 0;
      return;
    }
    let iov = 0;
    for (let i = n, j = 0; i < this.count; i++, j++) {
      this.opcode[j] = this.opcode[i]!;
      this.fd[j] = this.fd[i]!;
      this.offset[j] = this.offset[i]!;
      this.arg[j] = this.arg[i]!;
      this.userData[j] = this.userData[i]!;
      const start = this.iovStart[i]!;
      const count = this.iovCount[i]!;
      this.iovBase.copyWithin(iov, start, start + count);
      this.iovLen.copyWithin(iov, start, start + count);
      this.iovStart[j] = iov;
      this.iovCount[j] = count;
      iov += count;
    }
    this.count -= n;
    this.iovUsed = iov;
  }

  private next(): number {
    if (this.count === this.opcode.length) {
      const n = this.opcode.length * 2;
      this.opcode = grow(this.opcode, new Uint8Array(n));
      this.fd = grow(this.fd, new Int32Array(n));
      this.offset = grow(this.offset, new Float64Array(n));
      this.arg = grow(this.arg, new Uint32Array(n));
      this.iovStart = grow(this.iovStart, new Uint32Array(n));
      this.iovCount = grow(this.iovCount, new Uint32Array(n));
      this.userData = grow(this.userData, new Uint32Array(n));
      this.version++;
    }
    return this.count++;
  }
}

function grow<T extends { set(src: ArrayLike<number>): void }>(old: ArrayLike<number>, bigger: T): T {
  bigger.set(old);
  return bigger;
}

/** One queue's I/O engine. */
export interface BlkExecutor {
  /** "io_uring", "thread-pool" or "null" (logs, metrics). */
  readonly kind: string;
  /** Where the device stages operations before {@link submit}. */
  readonly batch: OpBatch;
  /** Hand every staged op to the kernel (one system call for io_uring) and clear the batch. */
  submit(): void;
  /** Release the ring or handles. Call only once nothing is in flight. */
  close(): void;
}

/** Creates the executor of queue `index`, sized for `queueSize` requests in flight. */
export type ExecutorFactory = (index: number, queueSize: number, sink: CompletionSink) => BlkExecutor;

/**
 * Completes every op at once without touching any file (reads leave guest memory as it was), so a
 * benchmark measures the daemon's own overhead, like QEMU's null-co driver. Completions are reported
 * from inside `submit`, one sink call per batch.
 */
export class NullExecutor implements BlkExecutor {
  readonly kind = 'null';
  readonly batch: OpBatch;
  private readonly userData: Uint32Array;
  private readonly result: Int32Array;

  constructor(
    queueSize: number,
    private readonly sink: CompletionSink,
  ) {
    this.batch = new OpBatch(queueSize * 2, queueSize * 4);
    this.userData = new Uint32Array(queueSize * 2);
    this.result = new Int32Array(queueSize * 2);
  }

  submit(): void {
    const b = this.batch;
    while (b.count > 0) {
      // Completions of one submit go out in chunks of the result arrays' size.
      const n = Math.min(b.count, this.userData.length);
      for (let i = 0; i < n; i++) {
        const op = b.opcode[i];
        this.userData[i] = b.userData[i]!;
        this.result[i] = op === OP_READV || op === OP_WRITEV ? b.opLength(i) : 0;
      }
      b.consume(n);
      this.sink(this.userData, this.result, n);
    }
  }

  close(): void {}
}
