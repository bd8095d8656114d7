/**
 * The host side of the device: a persistent multi-queue TAP with virtio-net headers. The daemon
 * attaches to an existing TAP (made by the operator with `ip tuntap add ... multi_queue vnet_hdr`, so
 * it needs no capability) or, with --create-tap and CAP_NET_ADMIN, makes one.
 *
 * Each device instance (the main one, or a queue worker's) opens its own TAP queue per queue pair it
 * runs: a TAP queue is an fd, and the kernel steers received packets over the attached ones. A queue
 * opens attached; it is detached (TUNSETQUEUE IFF_DETACH_QUEUE) while its pair is disabled so the
 * kernel stops steering packets to a queue nobody reads.
 */
import fs from 'node:fs';
import { constants as osConstants } from 'node:os';

import { ConfigError } from '../../lib/errors';
import {
  IFF_ATTACH_QUEUE,
  IFF_DETACH_QUEUE,
  IFF_MULTI_QUEUE,
  IFF_NO_PI,
  IFF_TAP,
  IFF_VNET_HDR,
  NativeError,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  TUN_F_TSO_ECN,
  TUN_F_UFO,
  TUN_F_USO4,
  TUN_F_USO6,
  native,
  type TapWriter,
} from '../../native';
import {
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_GUEST_UFO,
  VIRTIO_NET_F_GUEST_USO4,
  VIRTIO_NET_F_GUEST_USO6,
} from './virtio-net';

export const TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;

const { EOPNOTSUPP } = osConstants.errno;

/** What the host's TAP driver can hand over beyond checksum and TSO (probed once with TUNSETOFFLOAD). */
export interface TapOffloadSupport {
  /** TUN_F_UFO: Linux takes the flag (and UFO frames written to the TAP, which it fragments) but never hands UFO frames over since 4.14. */
  ufo: boolean;
  /** TUN_F_USO4 / TUN_F_USO6, alone or as a pair: Linux 6.2 and later. */
  uso4: boolean;
  uso6: boolean;
}

/** The operator's command to make the TAP this daemon expects. */
export function tapCreateHint(name: string): string {
  return `ip tuntap add dev ${name} mode tap multi_queue vnet_hdr user $(id -un)`;
}

/**
 * Open one queue of TAP `name`, turning the kernel's errors into what the operator must do. TUNSETIFF
 * makes a missing TAP when the caller has CAP_NET_ADMIN: only with `create` (--create-tap) may it.
 */
export function openTapQueue(name: string, create = false): number {
  if (!create && !tapExists(name)) {
    throw new ConfigError('CONFIG_UNAVAILABLE', `--tap ${name}: no such interface; as root run: ${tapCreateHint(name)} (or give --create-tap with CAP_NET_ADMIN)`);
  }
  let fd: number;
  try {
    fd = native.tapOpen(name, TAP_FLAGS).fd;
  } catch (err) {
    if (!(err instanceof NativeError)) throw err;
    const hint = tapCreateHint(name);
    switch (err.code) {
      case 'ENOENT':
        throw new ConfigError('CONFIG_UNAVAILABLE', `--tap ${name}: /dev/net/tun is missing (modprobe tun)`);
      case 'EPERM':
      case 'EACCES':
        throw new ConfigError(
          'CONFIG_UNAVAILABLE',
          `--tap ${name}: permission denied: the TAP does not exist or belongs to another user; as root run: ${hint}` +
            ' (or give the daemon CAP_NET_ADMIN and --create-tap)',
        );
      case 'EINVAL':
      case 'EBUSY':
        throw new ConfigError(
          'CONFIG_UNAVAILABLE',
          `--tap ${name}: the TAP exists without multi_queue and vnet_hdr (or is a TUN device); recreate it: ip link del ${name}; ${hint}`,
        );
      default:
        throw new ConfigError('CONFIG_UNAVAILABLE', `--tap ${name}: ${err.message}`);
    }
  }
  const flags = native.tapGetIff(fd).flags;
  if ((flags & (IFF_TAP | IFF_VNET_HDR | IFF_MULTI_QUEUE)) !== (IFF_TAP | IFF_VNET_HDR | IFF_MULTI_QUEUE)) {
    native.close(fd);
    throw new ConfigError('CONFIG_UNAVAILABLE', `--tap ${name}: the device lacks multi_queue or vnet_hdr; recreate it: ip link del ${name}; ${tapCreateHint(name)}`);
  }
  return fd;
}

/** Whether TAP (or TUN) `name` exists in this network namespace (sysfs). */
export function tapExists(name: string): boolean {
  return fs.existsSync(`/sys/class/net/${name}/tun_flags`);
}

/**
 * Probe which optional offloads the kernel's TAP accepts, on queue `fd`; leaves offloads off. Each
 * flag is tried alone, and USO4 with USO6: Linux (seen on 6.18, tun.c since 6.2) takes those two only together.
 */
export function probeOffloads(fd: number): TapOffloadSupport {
  const accepts = (offloads: number) => {
    try {
      native.tapSetOffload(fd, TUN_F_CSUM | offloads);
      return true;
    } catch (err) {
      if (err instanceof NativeError && err.code === 'EINVAL') return false;
      throw err;
    }
  };
  native.tapSetOffload(fd, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN);
  const usoPair = accepts(TUN_F_USO4 | TUN_F_USO6);
  const support = { ufo: accepts(TUN_F_UFO), uso4: accepts(TUN_F_USO4) || usoPair, uso6: accepts(TUN_F_USO6) || usoPair };
  native.tapSetOffload(fd, 0);
  return support;
}

/**
 * TUNSETOFFLOAD bits for the negotiated features: the TAP may hand us partially checksummed or
 * unsegmented frames only of the kinds the guest said it can take (GUEST_*), since they go to the
 * guest as they are. Linux requires TUN_F_CSUM for any segmentation offload.
 */
function tapOffloads(features: bigint): number {
  const has = (bitNumber: number) => (features & (1n << BigInt(bitNumber))) !== 0n;
  if (!has(VIRTIO_NET_F_GUEST_CSUM)) return 0;
  let offloads = TUN_F_CSUM;
  if (has(VIRTIO_NET_F_GUEST_TSO4)) offloads |= TUN_F_TSO4;
  if (has(VIRTIO_NET_F_GUEST_TSO6)) offloads |= TUN_F_TSO6;
  if (has(VIRTIO_NET_F_GUEST_ECN) && (offloads & (TUN_F_TSO4 | TUN_F_TSO6)) !== 0) offloads |= TUN_F_TSO_ECN;
  if (has(VIRTIO_NET_F_GUEST_UFO)) offloads |= TUN_F_UFO;
  if (has(VIRTIO_NET_F_GUEST_USO4)) offloads |= TUN_F_USO4;
  if (has(VIRTIO_NET_F_GUEST_USO6)) offloads |= TUN_F_USO6;
  return offloads;
}

/**
 * Set TAP queue `fd`'s offloads (shared by every queue of the TAP) for the negotiated features. A
 * guest that accepted only one of GUEST_USO4/6 gets no USO frame when the kernel takes the two only
 * together (the EINVAL), rather than a failed queue start.
 */
export function setTapOffloads(fd: number, features: bigint): void {
  const offloads = tapOffloads(features);
  const uso = offloads & (TUN_F_USO4 | TUN_F_USO6);
  try {
    native.tapSetOffload(fd, offloads);
  } catch (err) {
    if (!(err instanceof NativeError && err.code === 'EINVAL' && uso !== 0 && uso !== (TUN_F_USO4 | TUN_F_USO6))) throw err;
    native.tapSetOffload(fd, offloads & ~uso);
  }
}

/** Attach (true) or detach the TAP queue `fd`; a queue already in that state is left alone. */
export function setTapQueueAttached(fd: number, attached: boolean): void {
  const detached = (native.tapGetIff(fd).flags & IFF_DETACH_QUEUE) !== 0;
  if (detached === !attached) return;
  native.tapSetQueue(fd, attached ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE);
}

/**
 * How transmitted frames reach a TAP queue: `write(iovBase, iovLen, iovStart, iovCount, result, count)`
 * (a frame batch as in native.writeFrames) returns how many frames, from the first, were tried;
 * `result[i]` is the bytes or -errno of a tried frame, and -EAGAIN means it was not sent (the TAP was
 * full). Frames not tried were not sent either.
 */
export interface TapFrameWriter {
  /** 'io_uring': one io_uring_enter per batch; 'writev': one writev per frame. */
  readonly method: 'io_uring' | 'writev';
  write(iovBase: Float64Array, iovLen: Float64Array, iovStart: Uint32Array, iovCount: Uint32Array, result: Int32Array, count: number): number;
  close(): void;
}

/** The writer chosen for a TAP queue, and why io_uring was not taken (null when it was, or not asked for). */
export interface TapWriterChoice {
  writer: TapFrameWriter;
  uringUnavailable: string | null;
}

/**
 * A writer for TAP queue `fd`: io_uring when `preferUring` and the kernel lets it write the TAP
 * without blocking (tun has FMODE_NOWAIT, so the writes complete inline in io_uring_enter: on this
 * project's 2-vCPU VM a 64-byte frame costs about 750 ns that way against 1,100 ns with a writev
 * each, the syscall entry being most of the difference). Without io_uring (old kernel, seccomp,
 * the io_uring_disabled sysctl) or FMODE_NOWAIT on the TAP, one writev per frame.
 */
export function openTapWriter(fd: number, batchFrames: number, preferUring: boolean): TapWriterChoice {
  const writev: TapFrameWriter = {
    method: 'writev',
    write: (iovBase, iovLen, iovStart, iovCount, result, count) => native.writeFrames(fd, iovBase, iovLen, iovStart, iovCount, result, count),
    close: () => {},
  };
  if (!preferUring) return { writer: writev, uringUnavailable: null };
  let ring: TapWriter;
  try {
    ring = native.createTapWriter(fd, batchFrames);
  } catch (err) {
    if (!(err instanceof NativeError)) throw err;
    return { writer: writev, uringUnavailable: err.message };
  }
  // An empty frame: the TAP refuses it (EINVAL, or EBADFD on a detached queue) and counts nothing,
  // unless RWF_NOWAIT is refused first, which io_uring checks before the driver sees the write.
  const result = new Int32Array(1);
  ring.writeFrames(new Float64Array(0), new Float64Array(0), new Uint32Array(1), new Uint32Array(1), result, 1);
  if (result[0] === -EOPNOTSUPP) {
    ring.close();
    return { writer: writev, uringUnavailable: 'the TAP does not take non-blocking io_uring writes (a kernel without FMODE_NOWAIT for tun)' };
  }
  return {
    writer: {
      method: 'io_uring',
      write: (iovBase, iovLen, iovStart, iovCount, result, count) => ring.writeFrames(iovBase, iovLen, iovStart, iovCount, result, count),
      close: () => ring.close(),
    },
    uringUnavailable: null,
  };
}
