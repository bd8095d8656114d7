/**
 * The descriptor chain walk shared by the split and packed layouts: every rule a driver can break
 * while describing a buffer is checked here, once, with the spec clause beside it. The ring classes
 * only find the descriptors (split: table index and `next`; packed: consecutive ring slots) and feed
 * them to {@link ChainWalker.descriptor}; indirect tables are read here.
 *
 * Security model: the guest driver writes descriptor tables, rings and indirect tables concurrently
 * with us and may be hostile. Every field is read exactly once into a local before it is checked and
 * used (no double fetch), every address is bounded before it becomes a number, and every loop is
 * bounded by the queue size. A violation throws {@link RingError}; nothing is written to guest memory
 * during a walk.
 *
 * Descriptor layouts (little-endian, 16 bytes):
 * ```
 * split  virtq_desc:  le64 addr | le32 len | le16 flags | le16 next
 * packed pvirtq_desc: le64 addr | le32 len | le16 id    | le16 flags
 * ```
 */
import { RingError } from '../errors';
import { Translation, type GuestMemory } from '../memory/guest-memory';
import { VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../virtio/constants';
import type { DescriptorChain } from './descriptor-chain';

/** Size of one descriptor, split or packed (virtio 1.2 §2.7.5, §2.8.13). */
export const DESCRIPTOR_BYTES = 16;

/**
 * A 64-bit guest address whose high word is at least this is at or above 2^53, where no region can be
 * (the protocol layer rejects regions ending past 2^53), so it is unmapped by definition and is
 * rejected before the two halves are combined into an inexact number.
 */
const ADDRESS_HIGH_LIMIT = 0x20_0000;
const TWO_POW_32 = 0x1_0000_0000;
/** Longest indirect table walked: the largest queue size (bounds the work one descriptor can cause). */
const MAX_INDIRECT_DESCRIPTORS = 32768;

export class ChainWalker {
  private memory: GuestMemory;
  /** One DataView per `memory.views[i]`, for reading indirect tables at any offset without allocating. */
  private dataViews: DataView[] = [];
  private readonly translation = new Translation();
  /** Assembles an indirect descriptor that straddles two views or regions. */
  private readonly scratch = new Uint8Array(DESCRIPTOR_BYTES);
  private readonly scratchView = new DataView(this.scratch.buffer);

  // State of the walk in progress.
  private hops = 0;
  private totalLength = 0;
  private sawWritable = false;

  // The indirect descriptor last read by readIndirect (fields, so that reading one allocates nothing).
  private entryAddrLo = 0;
  private entryAddrHi = 0;
  private entryLen = 0;
  private entryFlags = 0;
  private entryNext = 0;

  /**
   * @param size the queue size: the longest chain (and indirect table walk) allowed
   * @param packed descriptor layout of indirect tables and the packed-only chaining rules
   * @param indirect whether VIRTIO_RING_F_INDIRECT_DESC was negotiated
   */
  constructor(
    private readonly size: number,
    private readonly packed: boolean,
    private readonly indirect: boolean,
    memory: GuestMemory,
  ) {
    this.memory = memory;
    this.setMemory(memory);
  }

  /** Use a new memory map for subsequent walks. */
  setMemory(memory: GuestMemory): void {
    this.memory = memory;
    this.dataViews = memory.views.map((v) => new DataView(v.buffer, v.byteOffset, v.byteLength));
  }

  /** Start walking a new chain into `chain`. */
  begin(chain: DescriptorChain): void {
    chain.clear(this.memory);
    this.hops = 0;
    this.totalLength = 0;
    this.sawWritable = false;
  }

  /**
   * Walk `chain` again from the ring descriptors recorded when it was popped, against the current
   * memory map: every check runs again and indirect tables are read again (the driver leaves them
   * alone until the buffer is used). Its segments then point into the current map. The ring itself is
   * not re-read because a packed ring's slots are overwritten by the used descriptors of chains
   * completed after this one (§2.8.6: the device writes used descriptors in completion order).
   */
  rewalk(chain: DescriptorChain): void {
    const count = chain.ringDescriptors;
    const words = chain.ringDescriptorWords;
    this.begin(chain);
    // descriptor() records each descriptor again, at the index it is read from.
    for (let i = 0; i < 4 * count; i += 4) this.descriptor(chain, words[i]!, words[i + 1]!, words[i + 2]!, words[i + 3]!);
  }

  /**
   * One descriptor found in the ring (split descriptor table or packed descriptor ring), its fields
   * already read once. Appends its segments to `chain`, or walks the indirect table it points to.
   */
  descriptor(chain: DescriptorChain, addrLo: number, addrHi: number, len: number, flags: number): void {
    chain.recordRingDescriptor(addrLo, addrHi, len, flags);
    // virtio 1.2 §2.7.5.3.1 / §2.8.17: "A driver MUST NOT create a descriptor chain longer than the
    // Queue Size of the device." Following `next` in a loop ends here too.
    if (++this.hops > this.size) {
      throw new RingError('VIRTQ_CHAIN_LOOP', `descriptor chain longer than the queue size ${this.size}`);
    }
    if ((flags & VRING_DESC_F_INDIRECT) === 0) {
      this.buffer(chain, addrLo, addrHi, len, (flags & VRING_DESC_F_WRITE) !== 0);
      return;
    }
    // virtio 1.2 §2.7.5.3.1 / §2.8.19: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag unless
    // the VIRTIO_F_INDIRECT_DESC feature was negotiated."
    if (!this.indirect) {
      throw new RingError('VIRTQ_BAD_DESCRIPTOR', 'indirect descriptor but VIRTIO_RING_F_INDIRECT_DESC was not negotiated');
    }
    // virtio 1.2 §2.7.5.3.1: "A driver MUST NOT set both VIRTQ_DESC_F_INDIRECT and VIRTQ_DESC_F_NEXT
    // in flags."
    if ((flags & VRING_DESC_F_NEXT) !== 0) {
      throw new RingError('VIRTQ_NESTED_INDIRECT', 'descriptor has both INDIRECT and NEXT');
    }
    // virtio 1.2 §2.8.19: "A driver MUST NOT write direct descriptors with DESC_F_INDIRECT set in a
    // scatter-gather list linked by VIRTQ_DESC_F_NEXT." (Split rings allow it: §2.7.5.3.2, "The device
    // MUST handle the case of zero or more normal chained descriptors followed by a single descriptor
    // with flags&VIRTQ_DESC_F_INDIRECT.")
    if (this.packed && this.hops > 1) {
      throw new RingError('VIRTQ_NESTED_INDIRECT', 'packed ring: indirect descriptor inside a NEXT-linked list');
    }
    // virtio 1.2 §2.7.5.3: the table is "struct virtq_desc desc[len / 16]"; a length that is not a
    // whole number of descriptors, or no descriptor at all, is not a table (libvhost-user rejects
    // `len % sizeof(VRingDesc) != 0` the same way).
    if (len === 0 || len % DESCRIPTOR_BYTES !== 0) {
      throw new RingError('VIRTQ_BAD_INDIRECT_LEN', `indirect table length ${len} is not a positive multiple of 16`);
    }
    // §2.7.5.3.2: "The device MUST ignore the write-only flag (flags&VIRTQ_DESC_F_WRITE) in the
    // descriptor that refers to an indirect table." It is never looked at.
    this.walkIndirect(chain, addrLo, addrHi, len);
  }

  /** A direct descriptor: check it and append its guest memory as one or more segments. */
  private buffer(chain: DescriptorChain, addrLo: number, addrHi: number, len: number, writable: boolean): void {
    // A zero-length element describes no memory. The spec has no clause for it; like libvhost-user
    // ("zero sized buffers are not allowed") we refuse it rather than hand devices empty segments.
    if (len === 0) {
      throw new RingError('VIRTQ_ZERO_LENGTH', 'zero-length descriptor');
    }
    // virtio 1.2 §2.7.4.2 / §2.8.17: "The driver MUST place any device-writable descriptor elements
    // after any device-readable descriptor elements."
    if (writable) {
      this.sawWritable = true;
    } else if (this.sawWritable) {
      throw new RingError('VIRTQ_READABLE_AFTER_WRITABLE', 'device-readable descriptor after a device-writable one');
    }
    // virtio 1.2 §2.7.5.2: "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total;
    // this implies that loops in the descriptor chain are forbidden!"
    this.totalLength += len;
    if (this.totalLength >= TWO_POW_32) {
      throw new RingError('VIRTQ_CHAIN_TOO_LONG', 'descriptor chain of 2^32 bytes or more');
    }
    // virtio 1.2 §2.7.5: "addr is a physical address" -- of guest memory. At or above 2^53 it cannot
    // be mapped (and would not be exact as a number).
    if (addrHi >= ADDRESS_HIGH_LIMIT) {
      throw new RingError('VIRTQ_BAD_DESCRIPTOR', `descriptor address 0x${addrHi.toString(16)}${hex8(addrLo)} is not in guest memory`);
    }
    let gpa = addrHi * TWO_POW_32 + addrLo;
    let left = len;
    const t = this.translation;
    // One descriptor may span regions or view strides: translate clips, so loop (vu_gpa_to_va).
    while (left > 0) {
      if (!this.memory.translate(gpa, left, t)) {
        throw new RingError('VIRTQ_BAD_DESCRIPTOR', `descriptor buffer 0x${gpa.toString(16)}+${left} is not in guest memory`);
      }
      chain.addSegment(t.viewId, t.offset, t.length, writable);
      gpa += t.length;
      left -= t.length;
    }
  }

  /** Walk the indirect table at (addrHi:addrLo, len): split follows `next` from entry 0, packed is sequential. */
  private walkIndirect(chain: DescriptorChain, addrLo: number, addrHi: number, len: number): void {
    if (addrHi >= ADDRESS_HIGH_LIMIT) {
      throw new RingError('VIRTQ_BAD_DESCRIPTOR', `indirect table address 0x${addrHi.toString(16)}${hex8(addrLo)} is not in guest memory`);
    }
    const table = addrHi * TWO_POW_32 + addrLo;
    const entries = len / DESCRIPTOR_BYTES;
    const t = this.translation;
    if (!this.memory.translate(table, len, t)) {
      throw new RingError('VIRTQ_BAD_DESCRIPTOR', `indirect table 0x${table.toString(16)}+${len} is not in guest memory`);
    }
    // The part of the table that is contiguous in one view; entries beyond it take the slow path.
    const view = this.dataViews[t.viewId]!;
    const base = t.offset;
    const contiguous = t.length;
    // The indirect table is a chain of its own, bounded by its own length. The spec says a chain must
    // not be longer than the queue size (§2.7.5.3.1), but Linux builds indirect tables past it
    // (virtio_ring.c allows total_sg > num with indirect) and libvhost-user and rust-vmm accept them,
    // so the bound here is a fixed maximum instead.
    this.hops = 0;

    if (this.packed) {
      // virtio 1.2 §2.8.7: "The first descriptor is located at the start of the indirect descriptor
      // table, additional indirect descriptors come immediately afterwards."
      if (entries > MAX_INDIRECT_DESCRIPTORS) {
        throw new RingError('VIRTQ_CHAIN_TOO_LONG', `indirect table of ${entries} descriptors (at most ${MAX_INDIRECT_DESCRIPTORS})`);
      }
      for (let i = 0; i < entries; i++) {
        this.hops++;
        this.readIndirect(view, base, contiguous, table, i);
        this.indirectEntry(chain);
      }
      return;
    }

    // virtio 1.2 §2.7.5.3: "The first indirect descriptor is located at start of the indirect
    // descriptor table (index 0), additional indirect descriptors are chained by next."
    let i = 0;
    for (;;) {
      // A table of `entries` descriptors holds no chain longer than that; one more hop is a loop.
      if (++this.hops > Math.min(entries, MAX_INDIRECT_DESCRIPTORS)) {
        throw new RingError('VIRTQ_CHAIN_LOOP', `indirect chain longer than its table of ${entries} descriptors`);
      }
      this.readIndirect(view, base, contiguous, table, i);
      this.indirectEntry(chain);
      if ((this.entryFlags & VRING_DESC_F_NEXT) === 0) return;
      i = this.entryNext;
      // §2.7.5.3: the table holds `len / 16` descriptors; `next` must name one of them.
      if (i >= entries) {
        throw new RingError('VIRTQ_BAD_DESCRIPTOR', `indirect descriptor next ${i} is outside the table of ${entries}`);
      }
    }
  }

  /** Check and append the indirect descriptor last read. */
  private indirectEntry(chain: DescriptorChain): void {
    // virtio 1.2 §2.7.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect
    // descriptor (ie. only one table per descriptor)." §2.8.19: "The driver MUST NOT set any flags
    // except DESC_F_WRITE within an indirect descriptor."
    if ((this.entryFlags & VRING_DESC_F_INDIRECT) !== 0) {
      throw new RingError('VIRTQ_NESTED_INDIRECT', 'indirect descriptor inside an indirect table');
    }
    this.buffer(chain, this.entryAddrLo, this.entryAddrHi, this.entryLen, (this.entryFlags & VRING_DESC_F_WRITE) !== 0);
  }

  /** Read indirect descriptor `index` of the table at guest address `table` into the entry fields. */
  private readIndirect(view: DataView, base: number, contiguous: number, table: number, index: number): void {
    const at = index * DESCRIPTOR_BYTES;
    let dv = view;
    let off = base + at;
    if (at + DESCRIPTOR_BYTES > contiguous) {
      this.gatherIndirect(table + at);
      dv = this.scratchView;
      off = 0;
    }
    this.entryAddrLo = dv.getUint32(off, true);
    this.entryAddrHi = dv.getUint32(off + 4, true);
    this.entryLen = dv.getUint32(off + 8, true);
    if (this.packed) {
      // pvirtq_desc: le16 id (reserved in indirect tables, ignored: §2.8.7) | le16 flags.
      this.entryFlags = dv.getUint16(off + 14, true);
      this.entryNext = 0;
    } else {
      this.entryFlags = dv.getUint16(off + 12, true);
      this.entryNext = dv.getUint16(off + 14, true);
    }
  }

  /** Copy the 16 bytes at `gpa` (crossing a view or region boundary) into the scratch descriptor. */
  private gatherIndirect(gpa: number): void {
    const t = this.translation;
    let done = 0;
    while (done < DESCRIPTOR_BYTES) {
      if (!this.memory.translate(gpa + done, DESCRIPTOR_BYTES - done, t)) {
        throw new RingError('VIRTQ_BAD_DESCRIPTOR', `indirect descriptor at 0x${gpa.toString(16)} is not in guest memory`);
      }
      const src = t.view;
      for (let k = 0; k < t.length; k++) this.scratch[done + k] = src[t.offset + k]!;
      done += t.length;
    }
  }
}

function hex8(n: number): string {
  return n.toString(16).padStart(8, '0');
}
