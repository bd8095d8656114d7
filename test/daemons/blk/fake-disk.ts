/**
 * Test doubles for the blk device that need no native addon: a disk held in a Uint8Array and an
 * executor that performs the staged ops on it. Iovec addresses are the invented host addresses of
 * {@link FakeGuestMemory} regions (plus one for the zero buffer), resolved back to their bytes, so the
 * device's real iovec building is what moves the data.
 */
import { constants as osConstants } from 'node:os';

import type { BackingFile } from '../../../lib/io/backing-file';
import type { FileStorage } from '../../../lib/io/engine';
import type { CompletionSink, IoExecutor } from '../../../lib/io/executor';
import { OpBatch } from '../../../lib/io/op-batch';
import { FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, IORING_OP } from '../../../native/io-batch';
import type { FakeGuestMemory } from '../../helpers/fake-guest-memory';

const { EOPNOTSUPP, EIO } = osConstants.errno;

/** Host address of the fake zero buffer (below every fake region). */
export const ZERO_ADDRESS = 0x1000_0000;
export const ZERO_LENGTH = 64 * 1024;

export class FakeImage implements BackingFile {
  readonly path = 'fake.img';
  readonly fd = 3;
  readonly syncFd = 4;
  readonly nativeBlockSize = 0;
  storage: FileStorage = 'none';
  disk: Uint8Array;
  closed = false;
  zeroesUsed = 0;

  constructor(size: number) {
    this.disk = new Uint8Array(size);
  }

  size(): number {
    return this.disk.length;
  }

  resize(size: number): void {
    const bigger = new Uint8Array(size);
    bigger.set(this.disk.subarray(0, Math.min(size, this.disk.length)));
    this.disk = bigger;
  }

  zeroes(): { address: number; length: number } {
    this.zeroesUsed++;
    return { address: ZERO_ADDRESS, length: ZERO_LENGTH };
  }

  close(): void {
    this.closed = true;
  }
}

export interface FakeExecutorOptions {
  /** fallocate modes (bits) answered with EOPNOTSUPP. */
  refuseModes?: number;
  /** Cap every read/write at this many bytes (short transfers). */
  shortTransfer?: number;
  /** Fail every op with this -errno. */
  failWith?: number;
}

/** One op as the executor saw it (for assertions). */
export interface SeenOp {
  opcode: number;
  fd: number;
  offset: number;
  arg: number;
  iovecs: number;
  length: number;
}

/** Performs ops on a {@link FakeImage}; completes them on a later event-loop turn, in one batch. */
export class FakeDiskExecutor implements IoExecutor {
  readonly kind = 'fake';
  readonly batch = new OpBatch(4, 4);
  readonly seen: SeenOp[] = [];
  submits = 0;
  private pending: { userData: number; result: number }[] = [];
  private scheduled = false;

  constructor(
    private readonly image: FakeImage,
    private readonly guest: FakeGuestMemory,
    private readonly sink: CompletionSink,
    readonly options: FakeExecutorOptions = {},
  ) {}

  submit(): void {
    const b = this.batch;
    if (b.count === 0) return;
    this.submits++;
    for (let i = 0; i < b.count; i++) {
      this.pending.push({ userData: b.userData[i]!, result: this.perform(b, i) });
    }
    b.consume(b.count);
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(() => this.deliver());
    }
  }

  close(): void {}

  /** Resolves once every submitted op was delivered. */
  async settle(): Promise<void> {
    while (this.pending.length > 0 || this.scheduled) await new Promise((r) => setImmediate(r));
  }

  private deliver(): void {
    this.scheduled = false;
    const done = this.pending;
    this.pending = [];
    const userData = Uint32Array.from(done.map((d) => d.userData));
    const result = Int32Array.from(done.map((d) => d.result));
    this.sink(userData, result, done.length);
  }

  private resolve(address: number, length: number): Uint8Array {
    if (address >= ZERO_ADDRESS && address + length <= ZERO_ADDRESS + ZERO_LENGTH) return new Uint8Array(length);
    for (const r of this.guest.regions) {
      const start = r.hostAddress - r.mappingOffset;
      if (address >= r.hostAddress && address + length <= r.hostAddress + r.size) {
        const at = address - start;
        return r.mapping.subarray(at, at + length);
      }
    }
    throw new RangeError(`iovec 0x${address.toString(16)}+${length} is outside guest memory`);
  }

  private perform(b: OpBatch, i: number): number {
    const op = b.opcode[i]!;
    const start = b.iovStart[i]!;
    const count = b.iovCount[i]!;
    const offset = b.offset[i]!;
    this.seen.push({ opcode: op, fd: b.fd[i]!, offset, arg: b.arg[i]!, iovecs: count, length: op === IORING_OP.FALLOCATE ? b.iovLen[start]! : b.opLength(i) });
    if (this.options.failWith !== undefined) return this.options.failWith;
    const disk = this.image.disk;
    switch (op) {
      case IORING_OP.READV:
      case IORING_OP.WRITEV: {
        let pos = offset;
        let budget = this.options.shortTransfer ?? Infinity;
        for (let k = start; k < start + count && budget > 0; k++) {
          const len = Math.min(b.iovLen[k]!, budget);
          const mem = this.resolve(b.iovBase[k]!, len);
          if (op === IORING_OP.READV) mem.set(disk.subarray(pos, pos + len));
          else disk.set(mem, pos);
          pos += len;
          budget -= len;
        }
        return pos - offset;
      }
      case IORING_OP.FSYNC:
        return 0;
      case IORING_OP.FALLOCATE: {
        const mode = b.arg[i]!;
        if ((mode & (this.options.refuseModes ?? 0)) !== 0) return -EOPNOTSUPP;
        if ((mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) === 0) return -EIO;
        disk.fill(0, offset, offset + b.iovLen[start]!);
        return 0;
      }
      default:
        return -EIO;
    }
  }
}
