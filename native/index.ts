/**
 * The typed surface of the native helper (`native/src/*.cc`).
 *
 * The helper is a thin set of Linux syscalls: no vhost-user or virtio knowledge, no policy. Argument
 * checks that matter for safety happen in TypeScript before these are called; C++ only asserts.
 * Every failure is thrown as a {@link NativeError} carrying `code` (the errno name, e.g. `EBADF`),
 * `errno` (the positive number) and `syscall`.
 *
 * File descriptors are plain numbers owned by the caller: whoever receives one from a function here
 * must `close()` it.
 */
import path from 'node:path';

import type { IoBatch } from './io-batch';
import { MAP_VIEW_SLACK, MAP_VIEW_STRIDE } from './layout';

export { MAP_VIEW_SLACK, MAP_VIEW_STRIDE };
export {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  IORING_FSYNC_DATASYNC,
  IORING_OP,
  OFFSET_CURRENT,
  RWF_NOWAIT,
  type IoBatch,
} from './io-batch';

/** An error from a syscall made by the native helper. */
export class NativeError extends Error {
  constructor(
    message: string,
    readonly code: string,
    readonly errno: number,
    readonly syscall: string,
  ) {
    super(message);
    this.name = 'NativeError';
  }
}

/** Result of {@link Native.recvMsg}. `bytes === 0` means the peer closed; `-1` means EAGAIN. */
export interface RecvResult {
  bytes: number;
  /** Descriptors received with SCM_RIGHTS (MSG_CMSG_CLOEXEC); the caller owns them. */
  fds: number[];
}

/** One mmap'ed region, exposed as views of at most {@link MAP_VIEW_STRIDE} + slack bytes each. */
export interface Mapping {
  /** Handle for {@link Native.munmap}. */
  id: number;
  /** Host virtual address of byte 0 of the mapping (for io_uring iovecs). Exact: below 2^53. */
  address: number;
  /** Length of the mapping in bytes. */
  length: number;
  /**
   * `views[i]` starts at byte `i * MAP_VIEW_STRIDE` of the mapping and is
   * `min(MAP_VIEW_STRIDE + MAP_VIEW_SLACK, length - i * MAP_VIEW_STRIDE)` bytes long, so every object of
   * at most MAP_VIEW_SLACK bytes lies entirely inside the view of the stride it starts in. After
   * `munmap` the views are detached (length 0), never dangling.
   */
  views: Uint8Array[];
}

/** Readiness events for {@link Native.watch}. Values are libuv's UV_READABLE / UV_WRITABLE. */
export const POLL_READABLE = 1;
export const POLL_WRITABLE = 2;

/** memfd seals (linux/fcntl.h), as {@link Native.fileSeals} reports them. */
export const F_SEAL_SEAL = 0x1;
export const F_SEAL_SHRINK = 0x2;
export const F_SEAL_GROW = 0x4;

/** A libuv poll handle; the callback runs on the event loop once per readiness wakeup. */
export interface Watcher {
  /** Stop watching and release the handle. Idempotent. Does not close the fd. */
  stop(): void;
}

/** A native io_uring instance whose completions signal an eventfd. */
export interface IoUring {
  /** eventfd that becomes readable when completions are posted; watch it and call `reap`. */
  readonly eventFd: number;
  /**
   * The ring's own fd: readable while completions wait in the completion queue (level-triggered, no
   * counter to reset). Watching it instead of {@link eventFd} saves a read per wakeup. Do not close it.
   */
  readonly ringFd: number;
  /** Queue `count` requests of `batch` and submit them with one io_uring_enter. Returns how many were queued. */
  submit(batch: IoBatch, count: number): number;
  /**
   * Remember the nine arrays of `batch` (type-checked now) for {@link submitBound}. The ring keeps the
   * arrays, not `batch`: after assigning a new array to one of its properties, bind again.
   */
  bindBatch(batch: IoBatch): void;
  /** {@link submit} of the batch last given to {@link bindBatch}, without looking its properties up. */
  submitBound(count: number): number;
  /** Move up to `userData.length` completions into `userData`/`result` (result is -errno on failure). */
  reap(userData: Uint32Array, result: Int32Array): number;
  /** Tear down the ring and close its eventfd. In-flight requests complete in the kernel first. */
  close(): void;
}

/** TUNSETIFF / TUNSETQUEUE / TUNGETIFF flags (linux/if_tun.h). */
export const IFF_TAP = 0x0002;
export const IFF_NO_PI = 0x1000;
export const IFF_VNET_HDR = 0x4000;
export const IFF_MULTI_QUEUE = 0x0100;
export const IFF_ATTACH_QUEUE = 0x0200;
export const IFF_DETACH_QUEUE = 0x0400;

/** TUNSETOFFLOAD bits (linux/if_tun.h): what the TAP may hand us unsegmented or unchecksummed. */
export const TUN_F_CSUM = 0x01;
export const TUN_F_TSO4 = 0x02;
export const TUN_F_TSO6 = 0x04;
export const TUN_F_TSO_ECN = 0x08;
export const TUN_F_UFO = 0x10;
export const TUN_F_USO4 = 0x20;
export const TUN_F_USO6 = 0x40;

/** A TAP queue from {@link Native.tapOpen}. */
export interface TapQueue {
  /** Nonblocking, cloexec; owned by the caller. */
  fd: number;
  /** The interface name the kernel used (it fills in a `%d` or empty name). */
  name: string;
}

/** Result of {@link Native.tapGetIff}. */
export interface TapInterface {
  name: string;
  /**
   * IFF_* flags of the device (IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE, ...), plus
   * IFF_DETACH_QUEUE when this queue is detached. The kernel also sets 0x1000 (IFF_NOFILTER, the
   * value of IFF_NO_PI) when the queue has no socket filter, so that bit does not prove IFF_NO_PI.
   */
  flags: number;
}

/** madvise advice accepted by {@link Native.madvise} (asm-generic/mman-common.h). */
export const MADV_DONTNEED = 4;
export const MADV_REMOVE = 9;

/**
 * A batch of `count` frames on a TAP (or other offset-less) fd: frame `i` is the iovecs
 * `iovStart[i] .. iovStart[i] + iovCount[i] - 1` of `iovBase`/`iovLen`; `result[i]` gets its bytes or
 * -errno. Returns how many frames got a result.
 */
export type FrameTransfer = (
  fd: number,
  iovBase: Float64Array,
  iovLen: Float64Array,
  iovStart: Uint32Array,
  iovCount: Uint32Array,
  result: Int32Array,
  count: number,
) => number;

/**
 * An io_uring bound to one TAP queue fd (registered with the ring) that writes frame batches: one
 * io_uring_enter per batch instead of one writev per frame.
 */
export interface TapWriter {
  /**
   * One WRITEV per frame with RWF_NOWAIT, all completed before it returns. `result[i]` gets the
   * frame's bytes or -errno: -EAGAIN (the TAP was full) means the frame was not sent, while frames
   * after it may have been; -EOPNOTSUPP means the fd does not take non-blocking io_uring writes.
   * Returns `count`. A failing io_uring_enter closes the writer and throws.
   */
  writeFrames(iovBase: Float64Array, iovLen: Float64Array, iovStart: Uint32Array, iovCount: Uint32Array, result: Int32Array, count: number): number;
  /** Tear the ring down (idempotent); the fd stays open. */
  close(): void;
}

/** The raw native module. */
export interface Native {
  /** Bind + listen a SOCK_STREAM unix socket (nonblocking, cloexec). Unlinks a stale socket file first. */
  listenUnix(path: string, backlog: number): number;
  /** accept4 (nonblocking, cloexec). Returns -1 when no connection is pending. */
  accept(listenFd: number): number;
  /** Connect a SOCK_STREAM unix socket (blocking connect, then nonblocking). */
  connectUnix(path: string): number;
  /** socketpair(AF_UNIX, SOCK_STREAM), both ends nonblocking and cloexec. */
  socketPair(): [number, number];
  /** recvmsg into `buf[offset..offset+length)` with room for `maxFds` descriptors. */
  recvMsg(fd: number, buf: Uint8Array, offset: number, length: number, maxFds: number): RecvResult;
  /** sendmsg of `buf[offset..offset+length)` with `fds` attached. Returns bytes sent, -1 on EAGAIN. */
  sendMsg(fd: number, buf: Uint8Array, offset: number, length: number, fds: number[]): number;
  /** Whether `fd` is a listening unix stream socket (for LISTEN_FDS / --fd checks). */
  isListeningUnixSocket(fd: number): boolean;
  setNonBlocking(fd: number, on: boolean): void;
  close(fd: number): void;
  /** fcntl(fd, F_DUPFD_CLOEXEC): a new descriptor for the same file, owned by the caller. */
  dup(fd: number): number;

  /** mmap(fd, length, offset, PROT_READ | (writable ? PROT_WRITE : 0), MAP_SHARED). */
  mmap(fd: number, length: number, offset: number, writable: boolean): Mapping;
  /** Detach every view of the mapping, then munmap it. Idempotent. */
  munmap(id: number): void;

  /** eventfd(initval, EFD_NONBLOCK | EFD_CLOEXEC). */
  eventfd(initval: number): number;
  /** Read and reset the counter. Returns 0 when it was 0 (EAGAIN). */
  eventfdRead(fd: number): number;
  /** Add `value` to the counter. */
  eventfdWrite(fd: number, value: number): void;

  /** memfd_create(name, MFD_CLOEXEC) sized with ftruncate (test front-ends and benchmarks). */
  memfdCreate(name: string, size: number): number;
  /**
   * memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING) sized with ftruncate, then sealed with
   * F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL: its size never changes (vhost-user inflight areas).
   */
  memfdCreateSealed(name: string, size: number): number;
  /** fcntl(fd, F_GET_SEALS): the fd's seals ({@link F_SEAL_SHRINK}...); EINVAL if it cannot be sealed. */
  fileSeals(fd: number): number;

  /** Watch `fd` for `events` (POLL_READABLE | POLL_WRITABLE) with uv_poll. */
  watch(fd: number, events: number, callback: (events: number) => void): Watcher;

  /** Send `message` as one datagram to the AF_UNIX socket `path` ('@' prefix = abstract namespace). */
  sdNotify(path: string, message: string): void;

  /** io_uring_queue_init(entries) with an eventfd registered for completions. */
  createIoUring(entries: number): IoUring;

  /**
   * getrandom(2) into `view[offset .. offset + n)`, no copy; returns n, which is less than `length` only
   * for requests of 32 MiB and more (loop). Blocks only until the kernel's pool is first initialized.
   */
  getrandom(view: Uint8Array, offset: number, length: number): number;
  /** fallocate(fd, mode, offset, length). */
  fallocate(fd: number, mode: number, offset: number, length: number): void;
  /** Size in bytes of a regular file, memfd (fstat) or block device (BLKGETSIZE64). */
  deviceSize(fd: number): number;
  /** Logical block size of a block device (BLKSSZGET), or 0 for a regular file. */
  logicalBlockSize(fd: number): number;
  /**
   * preadv/pwritev fallback run on the libuv thread pool (readv/writev at offset -1, the current
   * position); the callback gets bytes or -errno.
   */
  ioAsync(
    write: boolean,
    fd: number,
    offset: number,
    iovBase: Float64Array,
    iovLen: Float64Array,
    callback: (result: number) => void,
  ): void;
  /**
   * preadv2/pwritev2 of READV/WRITEV requests `0 .. count-1` of `batch` on the calling thread, straight
   * into or out of the iovecs' memory, with each request's RWF flags from `arg`. `result[i]` gets bytes
   * (possibly short) or -errno (EAGAIN for an RWF_NOWAIT miss). Throws RangeError, before any transfer,
   * for another opcode, iovecs outside the arrays, unknown flags, or `count` beyond the arrays.
   */
  transferBatch(batch: IoBatch, count: number, result: Int32Array): void;
  /** fstatfs(fd).f_type: the file system's magic number (linux/magic.h). */
  fstatfs(fd: number): number;
  /** madvise(MADV_DONTNEED | MADV_REMOVE) on `[offset, offset + length)` of mapping `id`. */
  madvise(id: number, offset: number, length: number, advice: number): void;

  // TAP devices. A frame batch (DPDK burst style): frame `i` uses iovecs `iovStart[i] ..
  // iovStart[i] + iovCount[i] - 1` of `iovBase`/`iovLen` (host addresses, e.g. guest memory).

  /** open("/dev/net/tun") (nonblocking, cloexec) + TUNSETIFF(name, flags); an empty name lets the kernel pick. */
  tapOpen(name: string, flags: number): TapQueue;
  /** TUNSETQUEUE: IFF_ATTACH_QUEUE or IFF_DETACH_QUEUE for this queue of a multi-queue TAP. */
  tapSetQueue(fd: number, flags: number): void;
  /** TUNSETOFFLOAD with TUN_F_* bits; EINVAL means the kernel does not support one of them. */
  tapSetOffload(fd: number, offloads: number): void;
  /** TUNSETVNETHDRSZ: the virtio-net header size in front of every frame (10 or 12). */
  tapSetVnetHdrSize(fd: number, size: number): void;
  /** TUNGETIFF: the interface name and flags (also on a detached queue). */
  tapGetIff(fd: number): TapInterface;
  /**
   * One readv per frame (no offset). `result[i]` gets the frame's bytes or -errno. Stops at the first
   * EAGAIN; returns how many frames got a result (0: nothing to read).
   */
  readFrames: FrameTransfer;
  /** One writev per frame (no offset), as {@link readFrames}: stops at EAGAIN, -errno per failed frame. */
  writeFrames: FrameTransfer;
  /** An io_uring of `entries` SQEs writing frames to TAP queue `fd` (see {@link TapWriter}). */
  createTapWriter(fd: number, entries: number): TapWriter;
}

function load(): Native {
  // Built by `npm run build:native` into native/build/{Release,Debug}; this file runs from build/native/.
  const root = path.resolve(__dirname, '..', '..', 'native', 'build');
  const errors: string[] = [];
  for (const flavor of ['Debug', 'Release']) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const addon = require(path.join(root, flavor, 'vhostd_native.node')) as Native & {
        initialize(errorClass: typeof NativeError): void;
      };
      addon.initialize(NativeError);
      return addon;
    } catch (err) {
      errors.push(`${flavor}: ${(err as Error).message}`);
    }
  }
  throw new Error(`vhostd native helper not found; run "npm run build:native" (${errors.join('; ')})`);
}

/** The loaded native helper. */
export const native: Native = load();
