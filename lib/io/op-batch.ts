/**
 * Staged operations in the native {@link IoBatch} layout (parallel typed arrays), reused batch after
 * batch. An executor (executor.ts) reads it on submit; devices stage through an IoEngine (engine.ts),
 * which tags every op and keeps what a resubmission needs.
 */
import { IORING_OP, type IoBatch } from '../../native/io-batch';

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

  /** Stage a READV/WRITEV over the `iovecs` iovecs just written at {@link iovUsed}; `rwFlags`: RWF_NOWAIT or 0. */
  addReadWrite(opcode: number, fd: number, offset: number, iovecs: number, userData: number, rwFlags = 0): void {
    const i = this.next();
    this.opcode[i] = opcode;
    this.fd[i] = fd;
    this.offset[i] = offset;
    this.arg[i] = rwFlags;
    this.iovStart[i] = this.iovUsed;
    this.iovCount[i] = iovecs;
    this.userData[i] = userData;
    this.iovUsed += iovecs;
  }

  addFsync(fd: number, flags: number, userData: number): void {
    const i = this.next();
    this.opcode[i] = IORING_OP.FSYNC;
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
    this.opcode[i] = IORING_OP.FALLOCATE;
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

/** `bigger` with the contents of `old` at its start (typed arrays growing by replacement). */
export function grow<T extends { set(src: ArrayLike<number>): void }>(old: ArrayLike<number>, bigger: T): T {
  bigger.set(old);
  return bigger;
}
