/**
 * The io_uring batch contract shared by the native ring (native/src/io-uring.cc) and the I/O engine
 * (lib/io): opcodes, flags and the {@link IoBatch} layout, declared once. Kept apart from `index.ts`
 * so that code staging operations (and its tests with fake executors) does not load the addon.
 */

/** io_uring opcodes accepted by IoUring.submit (linux/io_uring.h; io-uring.cc static_asserts the values). */
export const IORING_OP = {
  READV: 1,
  WRITEV: 2,
  FSYNC: 3,
  FALLOCATE: 17,
} as const;

/** FSYNC flag: fdatasync semantics (linux/io_uring.h IORING_FSYNC_DATASYNC). */
export const IORING_FSYNC_DATASYNC = 1;

/**
 * READV/WRITEV flag in `arg` (linux/fs.h RWF_NOWAIT): fail with EAGAIN rather than wait (a page-cache
 * miss). The only RWF flag the native side accepts.
 */
export const RWF_NOWAIT = 8;

/** FALLOCATE modes (linux/falloc.h). */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/**
 * READV/WRITEV offset meaning "the file's current position" (sockets, TAP, pipes): the ring passes
 * it to the kernel as (u64)-1.
 */
export const OFFSET_CURRENT = -1;

/**
 * A batch of I/O requests, in parallel typed arrays (DPDK burst style), built once and reused.
 * Request `i` uses iovecs `iovStart[i] .. iovStart[i] + iovCount[i] - 1` of `iovBase`/`iovLen`.
 * READV/WRITEV: `offset` is a file offset or {@link OFFSET_CURRENT}.
 * FALLOCATE: `offset` is the file offset, `iovLen[iovStart[i]]` is the length and `arg` the mode.
 */
export interface IoBatch {
  opcode: Uint8Array;
  fd: Int32Array;
  offset: Float64Array;
  /** FSYNC flags, FALLOCATE mode, or READV/WRITEV RWF flags ({@link RWF_NOWAIT} or 0). */
  arg: Uint32Array;
  iovStart: Uint32Array;
  iovCount: Uint32Array;
  userData: Uint32Array;
  /** Host virtual addresses (from Mapping.address + offset) and lengths. */
  iovBase: Float64Array;
  iovLen: Float64Array;
}
