/**
 * A descriptor chain the device popped, as a list of guest memory segments.
 *
 * The chain's buffers are already translated: segment `i` is `memory.views[viewId[i]]` from
 * `offset[i]` for `length[i]` bytes, at host address `memory.viewAddress[viewId[i]] + offset[i]`.
 * A descriptor that spans two regions (or two view strides) becomes two segments. Device-readable
 * segments come first (`0 .. readableSegments-1`), then device-writable ones (virtio 1.2 §2.7.4.2:
 * the driver MUST place writable descriptors after readable ones; the walker enforces it).
 *
 * The chain also keeps a copy of the ring descriptors it was popped from (the split descriptor table
 * entries or packed ring slots, not the entries of an indirect table), so that a held chain can be walked again against a new memory table and given back to the
 * ring (`Virtqueue.rewalk` / `Virtqueue.unpop`; see held-buffers.ts).
 *
 * Chains are pooled by their queue and reused: the typed arrays grow when a longer chain arrives and
 * never shrink, so the steady state allocates nothing.
 */
import type { GuestMemory } from '../memory/guest-memory';

const INITIAL_SEGMENTS = 8;
/** Copies up to this many bytes go byte by byte: cheaper than a subarray view (an allocation) and a set call. */
const SMALL_COPY = 128;

export class DescriptorChain {
  /** The id to return in the used element (split: head index; packed: buffer id). */
  head = 0;
  /**
   * Descriptors the chain occupied in the descriptor table (split) or ring (packed: the used index
   * advances by this); their fields are in {@link ringDescriptorWords}.
   */
  ringDescriptors = 0;
  /** Four words per ring descriptor as read at pop: address low, address high, length, flags. */
  ringDescriptorWords = new Uint32Array(4 * INITIAL_SEGMENTS);
  /** Packed rings with an inflight area: the area entry that records the chain (inflight.ts). */
  inflightEntry = 0;
  /** Pops of its queue before this one (pool bookkeeping: which chain was popped last). */
  popSerial = 0;
  /** The queue that handed this chain out and has not had it back (pool bookkeeping). */
  owner: object | null = null;
  /** The memory map the segments point into. */
  memory!: GuestMemory;
  segments = 0;
  readableSegments = 0;
  /** Total device-readable bytes. */
  readableLength = 0;
  /** Total device-writable bytes. */
  writableLength = 0;
  viewId = new Uint32Array(INITIAL_SEGMENTS);
  offset = new Float64Array(INITIAL_SEGMENTS);
  length = new Uint32Array(INITIAL_SEGMENTS);

  /** Record one ring descriptor of the chain (the walker calls this, once per ring descriptor). */
  recordRingDescriptor(addrLo: number, addrHi: number, len: number, flags: number): void {
    let words = this.ringDescriptorWords;
    const at = 4 * this.ringDescriptors++;
    if (at === words.length) {
      words = new Uint32Array(2 * words.length);
      words.set(this.ringDescriptorWords);
      this.ringDescriptorWords = words;
    }
    words[at] = addrLo;
    words[at + 1] = addrHi;
    words[at + 2] = len;
    words[at + 3] = flags;
  }

  /** Reset before a new walk. */
  clear(memory: GuestMemory): void {
    this.memory = memory;
    this.segments = 0;
    this.readableSegments = 0;
    this.readableLength = 0;
    this.writableLength = 0;
    this.ringDescriptors = 0;
  }

  /** Append a segment (the walker calls this; readable ones first). */
  addSegment(viewId: number, offset: number, length: number, writable: boolean): void {
    if (this.segments === this.viewId.length) this.grow();
    const i = this.segments++;
    this.viewId[i] = viewId;
    this.offset[i] = offset;
    this.length[i] = length;
    if (writable) {
      this.writableLength += length;
    } else {
      this.readableSegments++;
      this.readableLength += length;
    }
  }

  /** Host virtual address of segment `i` (for io_uring iovecs). */
  address(i: number): number {
    return this.memory.viewAddress[this.viewId[i]!]! + this.offset[i]!;
  }

  /** The bytes of segment `i` as a view (allocates a view object: not for per-byte loops). */
  segment(i: number): Uint8Array {
    const off = this.offset[i]!;
    return this.memory.views[this.viewId[i]!]!.subarray(off, off + this.length[i]!);
  }

  /**
   * Copy device-readable bytes starting `from` bytes into the readable part into `dst`.
   * Returns the number of bytes copied (less than dst.length when the readable part is shorter).
   */
  read(from: number, dst: Uint8Array): number {
    return this.copy(0, this.readableSegments, from, dst, false);
  }

  /**
   * Copy `src` into the device-writable part starting `at` bytes into it.
   * Returns the number of bytes copied (less than src.length when the writable part is shorter).
   */
  write(at: number, src: Uint8Array): number {
    return this.copy(this.readableSegments, this.segments, at, src, true);
  }

  private copy(first: number, end: number, skip: number, bytes: Uint8Array, toGuest: boolean): number {
    let done = 0;
    for (let i = first; i < end && done < bytes.length; i++) {
      const len = this.length[i]!;
      if (skip >= len) {
        skip -= len;
        continue;
      }
      const view = this.memory.views[this.viewId[i]!]!;
      const start = this.offset[i]! + skip;
      const n = Math.min(len - skip, bytes.length - done);
      if (n <= SMALL_COPY) {
        // Request headers and responses (a few dozen bytes, once per request): a loop, no view object.
        if (toGuest) for (let k = 0; k < n; k++) view[start + k] = bytes[done + k]!;
        else for (let k = 0; k < n; k++) bytes[done + k] = view[start + k]!;
      } else if (toGuest) view.set(bytes.subarray(done, done + n), start);
      else bytes.set(view.subarray(start, start + n), done);
      done += n;
      skip = 0;
    }
    return done;
  }

  private grow(): void {
    const n = this.viewId.length * 2;
    const viewId = new Uint32Array(n);
    const offset = new Float64Array(n);
    const length = new Uint32Array(n);
    viewId.set(this.viewId);
    offset.set(this.offset);
    length.set(this.length);
    this.viewId = viewId;
    this.offset = offset;
    this.length = length;
  }
}
