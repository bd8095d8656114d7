/**
 * A device's I/O context (one per queue, shared by every file the queue serves): stage operations
 * with a 32-bit `userData`, {@link IoEngine.submit} once per batch, receive completions in batches.
 * On top of its {@link IoExecutor} the engine
 * - resubmits the rest of a short READV/WRITEV when the op asked for it ({@link RESUBMIT_SHORT}): on
 *   a file a short transfer is a signal or memory pressure, not the end, and the device sees one
 *   result for the whole op; on a TAP fd or a socket a short transfer is the answer, so it is the
 *   op's choice;
 * - counts the ops in flight and resolves {@link IoEngine.drained} once none are left, which is what
 *   a device's stopQueue waits for (guest pages must not be unmapped under the kernel's I/O);
 * - runs READV/WRITEV ops that asked for it ({@link INLINE}, {@link INLINE_NOWAIT}) on the calling
 *   thread at submit, one {@link InlineTransfer} call per batch, when it was given one: for a file in
 *   memory (tmpfs) the io_uring round trip (submit, a kernel worker, the completion wake-up) costs more
 *   than the copy itself; a read that may hit the page cache is tried with RWF_NOWAIT and whatever
 *   it did not move goes to the executor. Devices stage file reads and writes with
 *   {@link IoEngine.addFileReadWrite}, which applies the policy ({@link inlineFlags}) per op, so every
 *   device that serves files gets the same choice and the same counters ({@link IoEngineStats}).
 *
 * Every staged op gets a tag (an index into the engine's tables) as the executor's userData; the
 * caller's userData comes back with the result.
 */
import { constants as osConstants } from 'node:os';

import { IORING_OP, RWF_NOWAIT, type IoBatch } from '../../native/io-batch';
import type { CompletionSink, ExecutorFactory, IoExecutor } from './executor';
import { grow, OpBatch } from './op-batch';

const { EAGAIN, EIO, EOPNOTSUPP } = osConstants.errno;

/** Op flag: resubmit a short READV/WRITEV for the rest (files and block devices). */
export const RESUBMIT_SHORT = 1;

/**
 * Op flag (files only, implies {@link RESUBMIT_SHORT}): run the READV/WRITEV on the calling thread at
 * submit. Only for files that never wait for a device (tmpfs, ramfs, hugetlbfs: see
 * {@link inlineFlags}); the result is final (a short transfer is resubmitted through the executor).
 */
export const INLINE = 2;

/**
 * Op flag (files only, implies {@link RESUBMIT_SHORT}): try the READV on the calling thread with
 * RWF_NOWAIT at submit (a page-cache hit completes at once); a miss (EAGAIN), a file system without
 * RWF_NOWAIT (EOPNOTSUPP) or a partial hit hands the rest to the executor.
 */
export const INLINE_NOWAIT = 4;

/** Largest READV/WRITEV with {@link RESUBMIT_SHORT}: its total must fit the Int32 result. */
export const MAX_RESUBMIT_LENGTH = 0x7fffffff;

/**
 * Runs READV/WRITEV ops `0 .. count-1` of `batch` now, with each op's RWF flags in `arg`, and writes
 * bytes or -errno into `result` (native.transferBatch; tests give a fake).
 */
export type InlineTransfer = (batch: IoBatch, count: number, result: Int32Array) => void;

/** Where a backing file's data lives, which decides what may run inline (lib/io/backing-file.ts). */
export type FileStorage = 'memory' | 'page-cache' | 'direct' | 'none';

/**
 * The inline policy: the {@link INLINE} / {@link INLINE_NOWAIT} flag for a read or a write of a file
 * stored as `storage`. Memory file systems: everything inline. Through the page cache: reads try
 * RWF_NOWAIT (a buffered write may wait for writeback or block allocation, so it goes to the
 * executor). O_DIRECT always reaches the device, and the null backend has no file: never inline.
 */
export function inlineFlags(storage: FileStorage, write: boolean): number {
  if (storage === 'memory') return INLINE;
  if (storage === 'page-cache' && !write) return INLINE_NOWAIT;
  return 0;
}

/**
 * What runs inline for a file stored as `storage` on an engine given an {@link InlineTransfer}
 * (`enabled`), as logs and tests name it: 'memory' (reads and writes), 'nowait-reads' (reads tried
 * with RWF_NOWAIT) or 'off'.
 */
export function inlineMode(storage: FileStorage, enabled: boolean): 'memory' | 'nowait-reads' | 'off' {
  if (!enabled) return 'off';
  const policy = inlineFlags(storage, false);
  return policy === INLINE ? 'memory' : policy === INLINE_NOWAIT ? 'nowait-reads' : 'off';
}

/** How an engine's ops went (metrics): plain counters for the life of the engine. */
export class IoEngineStats {
  /** READV/WRITEV ops completed on the calling thread. */
  inline = 0;
  /** RWF_NOWAIT tries that handed the op (or its rest) to the executor. */
  inlineFallbacks = 0;
  /** Ops (and resubmitted rests) handed to the executor. */
  executor = 0;
}

export class IoEngine {
  readonly kind: string;
  private readonly executor: IoExecutor;
  private readonly batch: OpBatch;
  // Per tag: what a completion and a resubmission need.
  private userData: Uint32Array;
  private opcode: Uint8Array;
  private fd: Int32Array;
  private offset: Float64Array;
  private flags: Uint8Array;
  /** Bytes asked for (RESUBMIT_SHORT ops). */
  private length: Float64Array;
  /** Bytes moved by earlier attempts (RESUBMIT_SHORT ops). */
  private done: Float64Array;
  /** The op's iovecs (RESUBMIT_SHORT ops), kept per tag and reused: the batch's are gone after submit. */
  private iovBases: Float64Array[] = [];
  private iovLens: Float64Array[] = [];
  private iovCount: Uint32Array;
  private freeTags: Uint32Array;
  private freeTop = 0;
  private waiters: (() => void)[] = [];
  /** Ops to run on this thread at the next submit (null: no {@link InlineTransfer}, inline flags are ignored). */
  private readonly inline: OpBatch | null;
  private inlineResult = new Int32Array(0);
  /** Completed inline ops handed to {@link complete} (it rewrites them in place). */
  private inlineTags = new Uint32Array(0);
  private inlineDone = new Int32Array(0);
  private inlineRunning = false;
  readonly stats = new IoEngineStats();

  /**
   * `capacity`: ops expected in flight at once (the tables grow past it); `sink` receives the
   * callers' userData and results (whole-op byte counts for RESUBMIT_SHORT ops, or -errno);
   * `transfer`: how {@link INLINE} / {@link INLINE_NOWAIT} ops run (native.transferBatch), or null to
   * send every op to the executor.
   */
  constructor(
    createExecutor: ExecutorFactory,
    capacity: number,
    private readonly sink: CompletionSink,
    private readonly transfer: InlineTransfer | null = null,
  ) {
    this.executor = createExecutor(capacity, (tags, result, count) => this.complete(tags, result, count));
    this.kind = this.executor.kind;
    this.batch = this.executor.batch;
    const n = Math.max(capacity * 2, 16);
    this.userData = new Uint32Array(n);
    this.opcode = new Uint8Array(n);
    this.fd = new Int32Array(n);
    this.offset = new Float64Array(n);
    this.flags = new Uint8Array(n);
    this.length = new Float64Array(n);
    this.done = new Float64Array(n);
    this.iovCount = new Uint32Array(n);
    this.freeTags = new Uint32Array(n);
    for (let t = n - 1; t >= 0; t--) this.freeTags[this.freeTop++] = t;
    this.inline = transfer === null ? null : new OpBatch(capacity, capacity * 2);
  }

  /** Ops staged or submitted whose completion has not been delivered yet. */
  get inFlight(): number {
    return this.userData.length - this.freeTop;
  }

  /** Resolves once nothing is in flight (at once when nothing is). */
  drained(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  /** Iovec slots: call {@link reserveIovecs}, write entries from {@link iovUsed}, then stage the op. */
  get iovBase(): Float64Array {
    return this.batch.iovBase;
  }

  get iovLen(): Float64Array {
    return this.batch.iovLen;
  }

  get iovUsed(): number {
    return this.batch.iovUsed;
  }

  /** Make room for `n` more iovecs (the arrays may be replaced: read {@link iovBase} after). */
  reserveIovecs(n: number): void {
    this.batch.reserveIovecs(n);
  }

  /**
   * Stage a READV/WRITEV over the `iovecs` iovecs just written at {@link iovUsed}. `offset` is a
   * file offset or OFFSET_CURRENT (-1: the fd's position, for TAP fds and sockets). `flags`:
   * {@link RESUBMIT_SHORT}, {@link INLINE} or {@link INLINE_NOWAIT} (both imply RESUBMIT_SHORT), or 0.
   * Throws RangeError for a RESUBMIT_SHORT op longer than {@link MAX_RESUBMIT_LENGTH} (check lengths
   * from a guest first).
   */
  addReadWrite(opcode: typeof IORING_OP.READV | typeof IORING_OP.WRITEV, fd: number, offset: number, iovecs: number, userData: number, flags = 0): void {
    const inline = this.inline !== null && (flags & (INLINE | INLINE_NOWAIT)) !== 0;
    const resubmit = (flags & (RESUBMIT_SHORT | INLINE | INLINE_NOWAIT)) !== 0;
    const length = resubmit ? this.stagedLength(iovecs) : 0;
    if (length > MAX_RESUBMIT_LENGTH) throw new RangeError(`a resubmitted read/write moves at most ${MAX_RESUBMIT_LENGTH} bytes, not ${length}`);
    const tag = this.takeTag(opcode, fd, offset, userData, resubmit ? RESUBMIT_SHORT : 0);
    if (resubmit) this.keepIovecs(tag, iovecs, length);
    if (!inline) {
      this.stats.executor++;
      this.batch.addReadWrite(opcode, fd, offset, iovecs, tag);
      return;
    }
    // The iovecs were written into the executor's batch; they move to the inline batch (the executor's
    // slots are reused by the next op, as its iovUsed did not advance).
    const b = this.batch;
    const inl = this.inline!;
    inl.reserveIovecs(iovecs);
    for (let k = 0; k < iovecs; k++) {
      inl.iovBase[inl.iovUsed + k] = b.iovBase[b.iovUsed + k]!;
      inl.iovLen[inl.iovUsed + k] = b.iovLen[b.iovUsed + k]!;
    }
    inl.addReadWrite(opcode, fd, offset, iovecs, tag, (flags & INLINE) !== 0 ? 0 : RWF_NOWAIT);
  }

  /**
   * Stage a READV/WRITEV of a backing file (lib/io/backing-file.ts) over the `iovecs` iovecs just
   * written at {@link iovUsed}: the sink gets one result for the whole op ({@link RESUBMIT_SHORT}), and
   * the engine decides from where the file's data lives (`storage`) whether the op runs inline
   * ({@link inlineFlags}, when the engine has an {@link InlineTransfer}) or goes to the executor.
   * Throws RangeError for an op longer than {@link MAX_RESUBMIT_LENGTH}.
   */
  addFileReadWrite(opcode: typeof IORING_OP.READV | typeof IORING_OP.WRITEV, fd: number, storage: FileStorage, offset: number, iovecs: number, userData: number): void {
    const policy = this.inline === null ? 0 : inlineFlags(storage, opcode === IORING_OP.WRITEV);
    this.addReadWrite(opcode, fd, offset, iovecs, userData, RESUBMIT_SHORT | policy);
  }

  /** Stage an fsync; `flags` IORING_FSYNC_DATASYNC for fdatasync. */
  addFsync(fd: number, flags: number, userData: number): void {
    this.stats.executor++;
    this.batch.addFsync(fd, flags, this.takeTag(IORING_OP.FSYNC, fd, 0, userData, 0));
  }

  /** Stage fallocate(fd, mode, offset, length) (FALLOC_FL_* modes). */
  addFallocate(fd: number, mode: number, offset: number, length: number, userData: number): void {
    this.stats.executor++;
    this.batch.addFallocate(fd, mode, offset, length, this.takeTag(IORING_OP.FALLOCATE, fd, offset, userData, 0));
  }

  /**
   * Run the staged inline ops (their completions reach the sink before this returns), then hand every
   * other staged op to the kernel (one system call for io_uring).
   */
  submit(): void {
    // A sink called from runInline stages into the batch the running loop empties next.
    if (this.inline !== null && this.inline.count > 0 && !this.inlineRunning) this.runInline();
    this.executor.submit();
  }

  /**
   * Deliver completions that are ready without waiting for their event (a polling queue driver);
   * returns how many ops the executor completed (0 for executors that cannot be polled).
   */
  poll(): number {
    return this.executor.poll?.() ?? 0;
  }

  /** Release the executor. Call only once {@link drained} resolved. */
  close(): void {
    this.executor.close();
  }

  /**
   * One transfer call per pass over the staged inline ops; completed ones go to {@link complete} (which
   * resubmits short transfers through the executor), RWF_NOWAIT misses and partial hits go to the
   * executor for the rest. Repeats while the sink staged more inline ops.
   */
  private runInline(): void {
    const inl = this.inline!;
    this.inlineRunning = true;
    try {
      while (inl.count > 0) {
        const count = inl.count;
        if (this.inlineResult.length < count) {
          this.inlineResult = new Int32Array(inl.opcode.length);
          this.inlineTags = new Uint32Array(inl.opcode.length);
          this.inlineDone = new Int32Array(inl.opcode.length);
        }
        const result = this.inlineResult;
        try {
          this.transfer!(inl, count, result);
        } catch {
          // Only a bug gets here (the native side refused a request): fail the batch, leave nothing hanging.
          result.fill(-EIO, 0, count);
        }
        let out = 0;
        for (let i = 0; i < count; i++) {
          const tag = inl.userData[i]!;
          const res = result[i]!;
          if (inl.arg[i] === RWF_NOWAIT && (res === -EAGAIN || res === -EOPNOTSUPP || (res >= 0 && this.done[tag]! + res < this.length[tag]!))) {
            // A zero-byte read may be the end of the file or a miss: the executor tells.
            const done = this.done[tag]! + Math.max(res, 0);
            this.done[tag] = done;
            this.stats.inlineFallbacks++;
            this.stats.executor++;
            this.restage(tag, done);
            continue;
          }
          this.stats.inline++;
          this.inlineTags[out] = tag;
          this.inlineDone[out] = res;
          out++;
        }
        inl.consume(count);
        if (out > 0) this.complete(this.inlineTags, this.inlineDone, out);
      }
    } finally {
      this.inlineRunning = false;
    }
  }

  private takeTag(opcode: number, fd: number, offset: number, userData: number, flags: number): number {
    if (this.freeTop === 0) this.growTables();
    const tag = this.freeTags[--this.freeTop]!;
    this.userData[tag] = userData;
    this.opcode[tag] = opcode;
    this.fd[tag] = fd;
    this.offset[tag] = offset;
    this.flags[tag] = flags;
    this.done[tag] = 0;
    return tag;
  }

  /** Bytes of the `count` iovecs written at {@link iovUsed}. */
  private stagedLength(count: number): number {
    const b = this.batch;
    let total = 0;
    for (let k = b.iovUsed; k < b.iovUsed + count; k++) total += b.iovLen[k]!;
    return total;
  }

  /** Copy the `count` iovecs at {@link iovUsed} (the batch reuses them once submitted). */
  private keepIovecs(tag: number, count: number, length: number): void {
    let base = this.iovBases[tag];
    let len = this.iovLens[tag];
    if (base === undefined || len === undefined || base.length < count) {
      base = this.iovBases[tag] = new Float64Array(Math.max(count, 4));
      len = this.iovLens[tag] = new Float64Array(base.length);
    }
    const b = this.batch;
    for (let k = 0; k < count; k++) {
      base[k] = b.iovBase[b.iovUsed + k]!;
      len[k] = b.iovLen[b.iovUsed + k]!;
    }
    this.iovCount[tag] = count;
    this.length[tag] = length;
  }

  /** Double the tag tables. */
  private growTables(): void {
    const old = this.userData.length;
    const n = old * 2;
    this.userData = grow(this.userData, new Uint32Array(n));
    this.opcode = grow(this.opcode, new Uint8Array(n));
    this.fd = grow(this.fd, new Int32Array(n));
    this.offset = grow(this.offset, new Float64Array(n));
    this.flags = grow(this.flags, new Uint8Array(n));
    this.length = grow(this.length, new Float64Array(n));
    this.done = grow(this.done, new Float64Array(n));
    this.iovCount = grow(this.iovCount, new Uint32Array(n));
    // Only called with every tag taken: the free list holds the new ones.
    this.freeTags = new Uint32Array(n);
    for (let t = n - 1; t >= old; t--) this.freeTags[this.freeTop++] = t;
  }

  /**
   * The executor's completions: resubmit short transfers, rewrite the rest in place into the callers'
   * userData and whole-op results, deliver them, submit what the sink (or a resubmission) staged,
   * and wake {@link drained} waiters when nothing is left in flight.
   */
  private complete(tags: Uint32Array, result: Int32Array, count: number): void {
    let out = 0;
    for (let i = 0; i < count; i++) {
      const tag = tags[i]!;
      const res = result[i]!;
      if ((this.flags[tag]! & RESUBMIT_SHORT) !== 0 && res > 0) {
        const done = this.done[tag]! + res;
        if (done < this.length[tag]!) {
          this.done[tag] = done;
          this.stats.executor++;
          this.restage(tag, done);
          continue;
        }
      }
      tags[out] = this.userData[tag]!;
      // An error after partial progress is still an error: the caller cannot use half an op.
      result[out] = res < 0 ? res : this.done[tag]! + res;
      out++;
      this.freeTags[this.freeTop++] = tag;
    }
    if (out > 0) this.sink(tags, result, out);
    this.submit();
    if (this.freeTop === this.userData.length && this.waiters.length > 0) {
      const waiters = this.waiters;
      this.waiters = [];
      for (const resolve of waiters) resolve();
    }
  }

  /** Stage the rest of READV/WRITEV `tag` after its first `done` bytes, under the same tag. */
  private restage(tag: number, done: number): void {
    const base = this.iovBases[tag]!;
    const len = this.iovLens[tag]!;
    const count = this.iovCount[tag]!;
    let k = 0;
    let skip = done;
    while (skip >= len[k]!) skip -= len[k++]!; // done < length: stops inside the iovecs
    const b = this.batch;
    b.reserveIovecs(count - k);
    const at = b.iovUsed;
    for (let j = k; j < count; j++) {
      const cut = j === k ? skip : 0;
      b.iovBase[at + j - k] = base[j]! + cut;
      b.iovLen[at + j - k] = len[j]! - cut;
    }
    const offset = this.offset[tag]!;
    b.addReadWrite(this.opcode[tag]!, this.fd[tag]!, offset < 0 ? offset : offset + done, count - k, tag);
  }
}
