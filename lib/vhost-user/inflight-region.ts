/**
 * VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, the protocol side (QEMU docs/interop/vhost-user.rst,
 * "Inflight I/O tracking", GET_INFLIGHT_FD and SET_INFLIGHT_FD): the back-end creates the shared area
 * (GET), the front-end keeps it and hands it back to every back-end process that serves the device
 * (SET), so a restarted daemon finds what the one before it had in flight. The per-queue layout and
 * its use belong to the rings (lib/virtqueue/inflight.ts); this file sizes, creates, checks and maps
 * the area and cuts it into per-queue views.
 *
 * Inflight description payload (QEMU's VhostUserInflight, 24 bytes with the trailing padding):
 * ```
 * u64 mmap_size | u64 mmap_offset | u16 num_queues | u16 queue_size | 4 bytes padding
 * ```
 * The fd of a SET comes from the front-end: it must be a memfd sealed against shrinking (the one GET
 * created is), or a peer could truncate it under our mapping and kill the daemon with SIGBUS.
 */
import { F_SEAL_SHRINK, native, type Mapping } from '../../native';
import { MAP_VIEW_STRIDE } from '../../native/layout';
import { ProtocolError } from '../errors';
import { VIRTQUEUE_MAX_SIZE } from '../virtio/constants';
import { inflightQueueBytes } from '../virtqueue/inflight';

/** Bytes of the inflight description payload on the wire. */
export const INFLIGHT_PAYLOAD_SIZE = 24;
/** mmap offsets must be page aligned; memfd pages are 4 KiB. */
const PAGE_SIZE = 4096;

/** A decoded inflight description, still as the front-end sent it. */
export interface InflightDescription {
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}

export function decodeInflight(view: DataView): InflightDescription {
  return {
    mmapSize: view.getBigUint64(0, true),
    mmapOffset: view.getBigUint64(8, true),
    numQueues: view.getUint16(16, true),
    queueSize: view.getUint16(18, true),
  };
}

export function encodeInflight(description: InflightDescription): Uint8Array {
  const bytes = new Uint8Array(INFLIGHT_PAYLOAD_SIZE);
  const view = new DataView(bytes.buffer);
  view.setBigUint64(0, description.mmapSize, true);
  view.setBigUint64(8, description.mmapOffset, true);
  view.setUint16(16, description.numQueues, true);
  view.setUint16(18, description.queueSize, true);
  return bytes;
}

function bad(why: string): ProtocolError {
  return new ProtocolError('VHOST_USER_BAD_INFLIGHT', `inflight area ${why}`);
}

/**
 * num_queues and queue_size name queues and rings this device can have: at most `deviceQueues`
 * queues (the area is cut per queue index) and rings of 1..`maxQueueSize` (≤ 32768, virtio 1.2 §2.7).
 */
function checkShape(numQueues: number, queueSize: number, deviceQueues: number, maxQueueSize: number): void {
  if (numQueues === 0 || numQueues > deviceQueues) throw bad(`for ${numQueues} queues, the device has 1..${deviceQueues}`);
  const max = Math.min(maxQueueSize, VIRTQUEUE_MAX_SIZE);
  if (queueSize === 0 || queueSize > max) throw bad(`for rings of ${queueSize}, this device takes 1..${max}`);
}

/**
 * GET_INFLIGHT_FD: a new zeroed area for `numQueues` rings of `queueSize`, as a sealed memfd, with
 * room for either ring layout (inflight.ts). Returns the fd (the caller sends and closes it) and its
 * description.
 */
export function createInflightArea(request: InflightDescription, deviceQueues: number, maxQueueSize: number): { fd: number; description: InflightDescription } {
  const { numQueues, queueSize } = request;
  checkShape(numQueues, queueSize, deviceQueues, maxQueueSize);
  const size = numQueues * inflightQueueBytes(queueSize);
  const fd = native.memfdCreateSealed('vhostd-inflight', size);
  return { fd, description: { mmapSize: BigInt(size), mmapOffset: 0n, numQueues, queueSize } };
}

/**
 * One queue's part of an area as a queue worker maps it (lib/runtime/queue-workers.ts): the area's fd
 * (a dup in the message) and place in it, and the part's bytes from the mapping's start.
 */
export interface InflightPartMessage {
  fd: number;
  mmapOffset: number;
  size: number;
  start: number;
  length: number;
}

/** A queue worker's mapping of its part of the area. Takes `message.fd` (closed here on failure). */
export class InflightPart {
  readonly view: Uint8Array;
  private mapping: Mapping | null;

  constructor(private readonly message: InflightPartMessage) {
    try {
      this.mapping = native.mmap(message.fd, message.size, message.mmapOffset, true);
    } catch (err) {
      native.close(message.fd);
      throw bad(`cannot be mapped: ${(err as Error).message}`);
    }
    this.view = partOf(this.mapping, message.start, message.length);
  }

  close(): void {
    if (this.mapping === null) return;
    native.munmap(this.mapping.id);
    this.mapping = null;
    native.close(this.message.fd);
  }
}

/** A mapped inflight area (SET_INFLIGHT_FD). Owns the fd and the mapping until {@link close}. */
export class InflightArea {
  private constructor(
    readonly fd: number,
    readonly offset: number,
    readonly size: number,
    readonly numQueues: number,
    readonly queueSize: number,
    private mapping: Mapping | null,
  ) {}

  /**
   * Check SET_INFLIGHT_FD's description and fd and map the area. Takes no ownership when it throws
   * ProtocolError VHOST_USER_BAD_INFLIGHT; on success the area owns `fd`.
   */
  static map(fd: number, description: InflightDescription, deviceQueues: number, maxQueueSize: number): InflightArea {
    const { numQueues, queueSize, mmapSize, mmapOffset } = description;
    checkShape(numQueues, queueSize, deviceQueues, maxQueueSize);
    const expected = numQueues * inflightQueueBytes(queueSize);
    // The area must be exactly what GET_INFLIGHT_FD made for this shape; anything else is a made-up one.
    if (mmapSize !== BigInt(expected)) throw bad(`of ${mmapSize} bytes, ${numQueues} rings of ${queueSize} need ${expected}`);
    if (mmapOffset % BigInt(PAGE_SIZE) !== 0n || mmapOffset + mmapSize > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw bad(`offset 0x${mmapOffset.toString(16)} is not page aligned or too large`);
    }
    const offset = Number(mmapOffset);
    let seals: number;
    try {
      seals = native.fileSeals(fd);
    } catch {
      throw bad('fd is not a memfd');
    }
    if ((seals & F_SEAL_SHRINK) === 0) throw bad('memfd is not sealed against shrinking');
    const fileSize = native.deviceSize(fd);
    if (offset + expected > fileSize) throw bad(`ends at ${offset + expected}, past the end of its ${fileSize}-byte memfd`);
    let mapping: Mapping;
    try {
      mapping = native.mmap(fd, expected, offset, true);
    } catch (err) {
      throw bad(`cannot be mapped: ${(err as Error).message}`);
    }
    return new InflightArea(fd, offset, expected, numQueues, queueSize, mapping);
  }

  /** Bytes of each queue's part. */
  get queueStride(): number {
    return inflightQueueBytes(this.queueSize);
  }

  /**
   * Queue `index`'s part, or undefined for a queue the area does not cover (the ring then runs
   * without tracking) or a ring larger than the area's (refused: ProtocolError VHOST_USER_BAD_INFLIGHT).
   */
  queueView(index: number, ringSize: number): Uint8Array | undefined {
    const mapping = this.mapping;
    if (mapping === null || !this.covers(index, ringSize)) return undefined;
    return partOf(mapping, index * this.queueStride, this.queueStride);
  }

  /** Queue `index`'s part for a queue worker (its fd not yet dup'ed), as {@link queueView} decides. */
  queuePart(index: number, ringSize: number): InflightPartMessage | undefined {
    if (this.mapping === null || !this.covers(index, ringSize)) return undefined;
    return { fd: this.fd, mmapOffset: this.offset, size: this.size, start: index * this.queueStride, length: this.queueStride };
  }

  private covers(index: number, ringSize: number): boolean {
    if (index >= this.numQueues) return false;
    if (ringSize > this.queueSize) throw bad(`tracks rings of ${this.queueSize}, queue ${index} has ${ringSize}`);
    return true;
  }

  /** Unmap and close the fd (a new SET_INFLIGHT_FD, or the front-end went away). */
  close(): void {
    if (this.mapping === null) return;
    native.munmap(this.mapping.id);
    this.mapping = null;
    native.close(this.fd);
  }
}

/** `length` bytes from `start` of a mapped area (areas are far below one view stride). */
function partOf(mapping: Mapping, start: number, length: number): Uint8Array {
  if (mapping.length > MAP_VIEW_STRIDE) throw bad(`of ${mapping.length} bytes is larger than one view`);
  return mapping.views[0]!.subarray(start, start + length);
}
