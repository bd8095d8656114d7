/**
 * Receive: TAP → guest. The kernel writes the virtio-net header and the frame straight into the
 * guest's buffers (readv into the chains' device-writable segments, native.readFrames); the daemon
 * only fills in num_buffers (virtio 1.2 §5.1.6.4, which TAP leaves untouched).
 *
 * - Without VIRTIO_NET_F_MRG_RXBUF every frame takes one chain, which must hold it whole (a frame
 *   that does not fit is lost in the kernel's readv and counted as a TAP error); frames are read in
 *   batches, one readv each.
 * - With MRG_RXBUF a frame spreads over as many chains as it needs: the device gathers chains until
 *   they hold the largest frame the TAP can deliver (65562 bytes with GSO), reads one frame over all
 *   of them, completes those the frame used and sets num_buffers to their count (§5.1.6.4.2). Chains
 *   that each hold the largest frame (Linux's 1536-byte buffers at MTU 1500 without GUEST_TSO) are
 *   read in batches, one frame each, as without MRG_RXBUF.
 * - Chains popped for a read that found nothing (EAGAIN), or not used by the frame, go back to the
 *   ring (Virtqueue.unpop) before the event loop runs anything else, so no chain is held across a
 *   memory table change or a stop and no frame already read is lost.
 * - When the ring has too few buffers the device stops watching the TAP (the kernel queues, then
 *   drops, as for any slow NIC) and asks the driver to kick when it adds some (§2.7.10).
 */
import { POLL_READABLE, native, type Mapping, type Watcher } from '../../native';
import type { DescriptorChain } from '../../lib/virtqueue/descriptor-chain';
import type { Virtqueue } from '../../lib/virtqueue/virtqueue';
import type { NetQueueStats } from './metrics';
import { MAX_IOV } from './tx';
import { HDR_GSO_TYPE, HDR_NUM_BUFFERS, VNET_HDR_SIZE } from './virtio-net';

/** Frames per readFrames call when each buffer holds a whole frame. */
export const RX_BATCH = 64;
const OVERFLOW_BYTES = 64;
/** Frames per TAP wakeup before yielding to the event loop (tx and other queues). */
const RX_BUDGET = 256;

export interface RxOptions {
  /** Header size in front of every frame (12, or 10 for a legacy driver). */
  headerSize: number;
  /** VIRTIO_NET_F_MRG_RXBUF negotiated. */
  mergeable: boolean;
  /** With mergeable buffers: header plus the largest frame the TAP may hand over. */
  maxFrame: number;
}

export class RxPath {
  /** Chains popped this wakeup, in pop order; those before `first` are completed. */
  private readonly chains: DescriptorChain[] = [];
  private first = 0;
  private readonly iovBase = new Float64Array(MAX_IOV);
  private readonly iovLen = new Float64Array(MAX_IOV);
  private readonly iovStart = new Uint32Array(RX_BATCH);
  private readonly iovCount = new Uint32Array(RX_BATCH);
  private readonly result = new Int32Array(RX_BATCH);
  private readonly numBuffers = new Uint8Array(2);
  /**
   * One byte past the buffers of every read: TAP reports a frame longer than the iovecs as the bytes it
   * wrote, so a frame that lands here did not fit (and is dropped rather than handed over cut short).
   */
  private readonly overflow: Mapping;
  private readable: Watcher | null = null;
  private running = false;

  constructor(
    private readonly queue: Virtqueue,
    private readonly fd: number,
    private readonly options: RxOptions,
    private readonly stats: NetQueueStats,
    /** A RingError in work started by the TAP (not by a kick): the device reports the queue broken. */
    private readonly onError: (err: unknown) => void,
  ) {
    const memfd = native.memfdCreate('vhostd-net-rx-overflow', OVERFLOW_BYTES);
    try {
      this.overflow = native.mmap(memfd, OVERFLOW_BYTES, 0, true);
    } finally {
      native.close(memfd);
    }
  }

  /** Start moving frames (the queue is enabled and its TAP queue attached). */
  start(): void {
    this.running = true;
    this.watch();
  }

  /** Stop reading the TAP (queue disabled or stopping); nothing is held. */
  stop(): void {
    this.running = false;
    this.unwatch();
  }

  /** Stop for good (the ring stopped). */
  close(): void {
    this.stop();
    native.munmap(this.overflow.id);
  }

  /** The driver kicked: it added buffers after the ring ran dry. */
  kick(): void {
    if (this.running && this.readable === null) this.watch();
  }

  private watch(): void {
    if (this.readable !== null) return;
    this.queue.disableNotification(); // while the TAP is watched, buffers are looked for on each wakeup
    this.readable = native.watch(this.fd, POLL_READABLE, () => this.receive());
  }

  private unwatch(): void {
    this.readable?.stop();
    this.readable = null;
  }

  /** The TAP has frames: move up to RX_BUDGET of them, publish once. */
  private receive(): void {
    try {
      if (this.options.mergeable) this.receiveMergeable();
      else this.receiveWhole();
    } catch (err) {
      // The frames delivered before it still go to the guest (drain.ts's ring-error policy).
      this.stop();
      this.onError(err);
    } finally {
      this.giveBack();
      this.queue.flush();
    }
  }

  /**
   * Pop chains until `want` bytes of buffer are at hand, `maxChains` chains are, or the ring is empty;
   * returns the capacity.
   */
  private gather(want: number, capacity: number, maxChains: number): number {
    while (capacity < want && this.chains.length - this.first < maxChains) {
      const chain = this.queue.pop();
      if (chain === null) break;
      if (chain.writableLength < this.options.headerSize) {
        // A buffer that cannot even hold the header is the driver's mistake: hand it back empty.
        this.queue.pushUsed(chain, 0);
        continue;
      }
      this.chains.push(chain);
      capacity += chain.writableLength;
    }
    return capacity;
  }

  /**
   * The ring has too few buffers for the next read. Ask for a kick first (virtio 1.2 §2.7.10: buffers
   * added meanwhile are seen now; true: look again); otherwise stop watching the TAP until the kick.
   */
  private starve(): boolean {
    if (this.queue.enableNotification()) return true;
    this.stats.ringEmpty++;
    this.unwatch();
    return false;
  }

  private receiveWhole(): void {
    for (let frames = 0; frames < RX_BUDGET; ) {
      this.gather(Infinity, 0, RX_BATCH);
      const count = this.chains.length - this.first;
      if (count === 0) {
        if (this.starve()) continue;
        return;
      }
      const done = this.readEach(count);
      frames += done;
      if (done < count) return;
    }
  }

  /**
   * Read up to `count` frames, one into each held chain from `first` (one readv each, one native call
   * for the batch); returns how many were read. The chains not read into (EAGAIN) stay held.
   */
  private readEach(count: number): number {
    let iov = 0;
    for (let f = 0; f < count; f++) {
      const start = iov;
      iov = this.addOverflow(this.addWritable(this.chains[this.first + f]!, iov, MAX_IOV - 2 * (count - f)));
      this.iovStart[f] = start;
      this.iovCount[f] = iov - start;
    }
    const done = native.readFrames(this.fd, this.iovBase, this.iovLen, this.iovStart, this.iovCount, this.result, count);
    for (let f = 0; f < done; f++) this.deliver(this.first + f, this.first + f + 1, this.result[f]!);
    this.first += done;
    return done;
  }

  private receiveMergeable(): void {
    const want = this.options.maxFrame;
    for (let frames = 0; frames < RX_BUDGET; ) {
      // Buffers that each hold the largest frame (Linux's mergeable buffers for a 1500 MTU do) take
      // a batch of frames, one buffer each, as without MRG_RXBUF.
      this.gather(Infinity, 0, RX_BATCH);
      let whole = 0;
      while (this.first + whole < this.chains.length && this.chains[this.first + whole]!.writableLength >= want) whole++;
      if (whole > 0) {
        const done = this.readEach(whole);
        frames += done;
        if (done < whole) return;
        continue;
      }
      // A frame spreads over the next chains: gather until they hold the largest frame.
      let capacity = 0;
      for (let i = this.first; i < this.chains.length; i++) capacity += this.chains[i]!.writableLength;
      capacity = this.gather(want, capacity, MAX_IOV);
      if (capacity < want) {
        // Retry only for an empty ring: buffers too small for a frame even at MAX_IOV wait for a kick.
        const held = this.chains.length - this.first;
        if (held < MAX_IOV && this.starve()) continue;
        if (held === MAX_IOV) {
          this.stats.ringEmpty++;
          this.unwatch();
        }
        return;
      }
      let iov = 0;
      for (let i = this.first; i < this.chains.length; i++) iov = this.addWritable(this.chains[i]!, iov, MAX_IOV - 1);
      iov = this.addOverflow(iov);
      this.iovStart[0] = 0;
      this.iovCount[0] = iov;
      if (native.readFrames(this.fd, this.iovBase, this.iovLen, this.iovStart, this.iovCount, this.result, 1) === 0) return;
      frames++;
      const bytes = this.result[0]!;
      if (bytes < 0 || bytes > capacity) {
        // The frame is lost (readv failed, or it was longer than the largest frame expected and
        // reached the overflow iovec); the buffers stay for the next one.
        this.stats.tapErrors++;
        continue;
      }
      // The chains the frame filled, in order: the last one partly.
      let used = 0;
      const first = this.first;
      for (let left = bytes; left > 0 && first + used < this.chains.length; used++) left -= this.chains[first + used]!.writableLength;
      this.deliver(first, first + used, bytes);
      this.first += used;
    }
  }

  /** Append `chain`'s writable segments to the iovecs from `iov`, at most up to `limit`; returns the new end. */
  private addWritable(chain: DescriptorChain, iov: number, limit: number): number {
    for (let i = chain.readableSegments; i < chain.segments && iov < limit; i++) {
      this.iovBase[iov] = chain.address(i);
      this.iovLen[iov++] = chain.length[i]!;
    }
    return iov;
  }

  /** Append the overflow iovec (once per frame, after its buffers); returns the new end. */
  private addOverflow(iov: number): number {
    this.iovBase[iov] = this.overflow.address;
    this.iovLen[iov] = OVERFLOW_BYTES;
    return iov + 1;
  }

  /** Complete chains `first .. end-1` holding one frame of `bytes` (header included), or lost on error. */
  private deliver(first: number, end: number, bytes: number): void {
    let capacity = 0;
    for (let i = first; i < end; i++) capacity += this.chains[i]!.writableLength;
    if (bytes < 0 || bytes > capacity) {
      // readv failed, or the frame was longer than the buffers (TAP then reports the whole length
      // but wrote only what fit): the guest gets the buffers back empty and drops them.
      this.stats.tapErrors++;
      for (let i = first; i < end; i++) this.queue.pushUsed(this.chains[i]!, 0);
      return;
    }
    const head = this.chains[first]!;
    const hdrSize = this.options.headerSize;
    if (hdrSize === VNET_HDR_SIZE) {
      // §5.1.6.4: num_buffers is the number of buffers the frame took (1 without MRG_RXBUF).
      this.numBuffers[0] = (end - first) & 0xff;
      this.numBuffers[1] = (end - first) >> 8;
      head.write(HDR_NUM_BUFFERS, this.numBuffers);
    }
    this.stats.gso(writableByte(head, HDR_GSO_TYPE));
    this.stats.frames++;
    this.stats.bytes += bytes - hdrSize;
    let left = bytes;
    for (let i = first; i < end; i++) {
      const chain = this.chains[i]!;
      const written = Math.min(left, chain.writableLength);
      this.queue.pushUsed(chain, written);
      left -= written;
    }
  }

  /** Chains not read into go back to the ring, newest first (Virtqueue.unpop's rule). */
  private giveBack(): void {
    while (this.chains.length > this.first) this.queue.unpop(this.chains.pop()!);
    this.chains.length = 0;
    this.first = 0;
  }
}

/** Byte `at` of `chain`'s device-writable part (what the kernel wrote there). */
function writableByte(chain: DescriptorChain, at: number): number {
  for (let i = chain.readableSegments; i < chain.segments; i++) {
    const length = chain.length[i]!;
    if (at < length) return chain.memory.views[chain.viewId[i]!]![chain.offset[i]! + at]!;
    at -= length;
  }
  return 0;
}
