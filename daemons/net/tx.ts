/**
 * Transmit: guest → TAP. Each chain of a tx queue is one virtio-net header plus one frame (virtio 1.2
 * §5.1.6.2), device-readable only. The header is copied out and checked (net-header.ts), and the
 * kernel gets that checked copy, not the guest's bytes, so the driver cannot change it between the
 * check and the kernel's read (a double fetch). The frame itself goes from guest memory to the TAP
 * with no copy, a batch of frames per native call (tap.ts openTapWriter: io_uring, or a writev each).
 *
 * A full TAP (EAGAIN) stops the queue with the unsent frames kept; the TAP fd's writability resumes
 * it. With io_uring a frame after an unsent one may already be out, so under that back-pressure
 * frames can leave out of order, as on a multi-queue NIC. Frames never outlive their memory map: a
 * memory table change or a queue stop first tries them once more, then completes what is left as
 * lost (counted as TAP errors), as a NIC reset would.
 */
import { constants as osConstants } from 'node:os';

import { POLL_WRITABLE, native, type Mapping, type Watcher } from '../../native';
import type { DescriptorChain } from '../../lib/virtqueue/descriptor-chain';
import { drainQueue } from '../../lib/virtqueue/drain';
import type { Virtqueue } from '../../lib/virtqueue/virtqueue';
import type { NetQueueStats } from './metrics';
import { checkTxHeader, type TxLimits } from './net-header';
import type { TapFrameWriter } from './tap';
import { HDR_GSO_TYPE, VNET_HDR_SIZE } from './virtio-net';

/** Frames per write to the TAP (one io_uring_enter, or one native call of a writev each). */
export const TX_BATCH = 64;
/** Linux's UIO_MAXIOV: iovecs of one writev, and the iovecs a batch holds. */
export const MAX_IOV = 1024;
/** Each frame's header copy gets this many bytes in the header area. */
const HEADER_SLOT = 16;

const { EAGAIN } = osConstants.errno;

export class TxPath {
  private readonly chains: (DescriptorChain | null)[] = new Array<DescriptorChain | null>(TX_BATCH).fill(null);
  private readonly iovBase = new Float64Array(MAX_IOV);
  private readonly iovLen = new Float64Array(MAX_IOV);
  private readonly iovStart = new Uint32Array(TX_BATCH);
  private readonly iovCount = new Uint32Array(TX_BATCH);
  private readonly result = new Int32Array(TX_BATCH);
  /** After an EAGAIN: the batch's unsent frames (indexes into the arrays above) and their iovecs, in order. */
  private readonly unsentFrame = new Uint32Array(TX_BATCH);
  private readonly unsentStart = new Uint32Array(TX_BATCH);
  private readonly unsentCount = new Uint32Array(TX_BATCH);
  /** Checked header copies, one slot per frame of the batch, at a host address writev can use. */
  private readonly headers: Mapping;
  /** `headerSize` bytes of each slot, made once (no view allocated per frame). */
  private readonly headerSlots: Uint8Array[];
  /** Frames staged in the batch; after an EAGAIN, how many of them are still unsent (else 0). */
  private staged = 0;
  private unsent = 0;
  private iovUsed = 0;
  /** The TAP said EAGAIN: wait for it to become writable. */
  private blocked = false;
  private writable: Watcher | null = null;

  constructor(
    private readonly queue: Virtqueue,
    private readonly fd: number,
    private readonly writer: TapFrameWriter,
    private readonly limits: TxLimits,
    private readonly stats: NetQueueStats,
    /** A RingError in work started by the TAP's writability (not by a kick): the device reports the queue broken. */
    private readonly onError: (err: unknown) => void,
  ) {
    const memfd = native.memfdCreate('vhostd-net-tx-headers', TX_BATCH * HEADER_SLOT);
    try {
      this.headers = native.mmap(memfd, TX_BATCH * HEADER_SLOT, 0, true);
    } finally {
      native.close(memfd);
    }
    const view = this.headers.views[0]!;
    this.headerSlots = Array.from({ length: TX_BATCH }, (_, i) => view.subarray(i * HEADER_SLOT, i * HEADER_SLOT + limits.headerSize));
  }

  /** The driver kicked: send what it queued (unless the TAP is full; writability resumes then). */
  kick(): void {
    if (!this.blocked) this.drain();
  }

  /**
   * Memory table change or stop: the staged frames point into the old map. Try them once more, then
   * complete the rest as lost, and publish.
   */
  settle(): void {
    if (this.staged > 0) this.write();
    for (let k = 0; k < this.unsent; k++) {
      this.stats.tapErrors++;
      this.complete(this.unsentFrame[k]!);
    }
    this.staged = this.unsent = this.iovUsed = 0;
    this.unblock();
    this.queue.flush();
  }

  close(): void {
    this.settle();
    this.writer.close();
    native.munmap(this.headers.id);
  }

  private drain(): void {
    drainQueue(this.queue, {
      ready: () => !this.blocked,
      handle: (chain) => {
        this.stage(chain);
        return !this.blocked;
      },
      endBatch: () => {
        if (this.staged > 0 && !this.blocked) this.write();
      },
    });
  }

  /** Check one chain; a good frame joins the batch (written when the batch is full), a bad one is dropped. */
  private stage(chain: DescriptorChain): void {
    if (1 + chain.readableSegments > MAX_IOV) {
      this.stats.drop('too_many_segments');
      this.queue.pushUsed(chain, 0);
      return;
    }
    if (this.iovUsed + 1 + chain.readableSegments > MAX_IOV) {
      this.write();
      if (this.blocked) {
        // The batch is still full of unsent frames: this one waits in the ring.
        this.queue.unpop(chain);
        return;
      }
    }
    const hdrSize = this.limits.headerSize;
    const header = this.headerSlots[this.staged]!;
    const frameLength = chain.readableLength - hdrSize;
    if (chain.read(0, header) < hdrSize) {
      this.stats.drop('too_short');
      this.queue.pushUsed(chain, 0);
      return;
    }
    const reason = checkTxHeader(header, frameLength, this.limits);
    if (reason !== null) {
      this.stats.drop(reason);
      this.queue.pushUsed(chain, 0);
      return;
    }
    // virtio 1.2 §5.1.6.2: num_buffers is the driver's zero; the kernel gets exactly what we checked.
    if (hdrSize === VNET_HDR_SIZE) header[10] = header[11] = 0;
    const frame = this.staged++;
    this.chains[frame] = chain;
    this.iovStart[frame] = this.iovUsed;
    this.iovBase[this.iovUsed] = this.headers.address + frame * HEADER_SLOT;
    this.iovLen[this.iovUsed++] = hdrSize;
    let skip = hdrSize;
    for (let i = 0; i < chain.readableSegments; i++) {
      const length = chain.length[i]!;
      if (skip >= length) {
        skip -= length;
        continue;
      }
      this.iovBase[this.iovUsed] = chain.address(i) + skip;
      this.iovLen[this.iovUsed++] = length - skip;
      skip = 0;
    }
    this.iovCount[frame] = this.iovUsed - this.iovStart[frame]!;
    if (this.staged === TX_BATCH) this.write();
  }

  /**
   * Write the batch (or, after an EAGAIN, its unsent frames); another EAGAIN blocks the queue until the
   * TAP is writable, keeping the frames still unsent.
   */
  private write(): void {
    const retry = this.unsent > 0;
    const count = retry ? this.unsent : this.staged;
    const tried = retry
      ? this.writer.write(this.iovBase, this.iovLen, this.unsentStart, this.unsentCount, this.result, count)
      : this.writer.write(this.iovBase, this.iovLen, this.iovStart, this.iovCount, this.result, count);
    let unsent = 0;
    for (let k = 0; k < count; k++) {
      const frame = retry ? this.unsentFrame[k]! : k;
      const bytes = k < tried ? this.result[k]! : -EAGAIN;
      if (bytes === -EAGAIN) {
        // unsent <= k: this overwrites only entries already read.
        this.unsentFrame[unsent] = frame;
        this.unsentStart[unsent] = this.iovStart[frame]!;
        this.unsentCount[unsent++] = this.iovCount[frame]!;
        continue;
      }
      if (bytes < 0) this.stats.tapErrors++;
      else {
        this.stats.frames++;
        this.stats.bytes += bytes - this.limits.headerSize;
        this.stats.gso(this.headerSlots[frame]![HDR_GSO_TYPE]!);
      }
      this.complete(frame);
    }
    this.unsent = unsent;
    if (unsent > 0) {
      this.block();
      return;
    }
    this.staged = this.iovUsed = 0;
  }

  private complete(frame: number): void {
    this.queue.pushUsed(this.chains[frame]!, 0);
    this.chains[frame] = null;
  }

  private block(): void {
    if (this.blocked) return;
    this.blocked = true;
    this.writable = native.watch(this.fd, POLL_WRITABLE, () => this.onWritable());
  }

  private unblock(): void {
    this.blocked = false;
    this.writable?.stop();
    this.writable = null;
  }

  private onWritable(): void {
    this.write();
    this.queue.flush();
    if (this.staged === 0) {
      this.unblock();
      try {
        this.drain();
      } catch (err) {
        this.settle();
        this.onError(err);
      }
    }
  }
}
