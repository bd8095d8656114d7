/**
 * The DRIVER side of split and packed virtqueues, as a guest virtio driver would run them: lay out the
 * ring areas, add descriptor chains (optionally through an indirect table), publish them, read used
 * elements back, and steer notification suppression. Raw writers let hostile-input tests put any bytes
 * where a well-behaved driver would not.
 *
 * Everything goes through {@link GuestPhysAccess} (guest physical addresses), so the same code drives
 * the fake memory of unit tests and the real memfd memory a test front-end maps. Nothing here knows
 * how that memory is provided. All fields are little-endian (virtio 1.2 §2.4).
 */
import {
  VRING_DESC_F_INDIRECT,
  VRING_DESC_F_NEXT,
  VRING_DESC_F_WRITE,
  VRING_PACKED_DESC_F_AVAIL,
  VRING_PACKED_DESC_F_USED,
} from '../../lib/virtio/constants';

/** Guest physical memory as the driver sees it. */
export interface GuestPhysAccess {
  /** A copy of `len` bytes at guest physical address `gpa`. */
  read(gpa: number, len: number): Uint8Array;
  /** Store `bytes` at guest physical address `gpa`. */
  write(gpa: number, bytes: Uint8Array): void;
  /** The bytes at `gpa` in place (memory shared with the device), when the access has them. */
  view?(gpa: number, len: number): Uint8Array;
}

/** One element of a buffer: device-readable unless `writable`. */
export interface DriverBuffer {
  addr: number;
  len: number;
  writable?: boolean;
}

/** A used element as the driver reads it back. */
export interface UsedElement {
  id: number;
  len: number;
  /** Packed rings: the used descriptor's flags. */
  flags?: number;
}

/** Options for adding a chain. */
export interface AddOptions {
  /** Put the buffers in an indirect table at this guest address (16 bytes per buffer). */
  indirect?: number;
}

/** A split descriptor exactly as written, for hostile tests (`addr` may be any 64-bit value). */
export interface RawSplitDescriptor {
  addr: number | bigint;
  len: number;
  flags: number;
  next?: number;
}

/** A packed descriptor exactly as written. */
export interface RawPackedDescriptor {
  addr: number | bigint;
  len: number;
  id: number;
  flags: number;
}

/** Where the parts of a split ring go, at or after `base`, with the spec's alignments. */
export interface SplitRingLayout {
  desc: number;
  avail: number;
  used: number;
  /** First byte after the used ring. */
  end: number;
}

/** Where the parts of a packed ring go. */
export interface PackedRingLayout {
  desc: number;
  driverEvent: number;
  deviceEvent: number;
  end: number;
}

/** virtio 1.2 §2.7: descriptor table 16-aligned, available ring 2, used ring 4 (event fields included). */
export function splitRingLayout(size: number, base: number): SplitRingLayout {
  const desc = alignUp(base, 16);
  const avail = desc + 16 * size;
  const used = alignUp(avail + 6 + 2 * size, 4);
  return { desc, avail, used, end: used + 6 + 8 * size };
}

/** virtio 1.2 §2.8.10.1: descriptor ring 16-aligned, event suppression structures 4-aligned. */
export function packedRingLayout(size: number, base: number): PackedRingLayout {
  const desc = alignUp(base, 16);
  const driverEvent = desc + 16 * size;
  const deviceEvent = driverEvent + 4;
  return { desc, driverEvent, deviceEvent, end: deviceEvent + 4 };
}

export function alignUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

/** 16 bytes of descriptor: le64 addr | le32 len | le16 a | le16 b (split: flags, next; packed: id, flags). */
export function encodeDescriptor(addr: number | bigint, len: number, a: number, b: number): Uint8Array {
  const bytes = new Uint8Array(16);
  const dv = new DataView(bytes.buffer);
  dv.setBigUint64(0, BigInt.asUintN(64, BigInt(addr)), true);
  dv.setUint32(8, len >>> 0, true);
  dv.setUint16(12, a & 0xffff, true);
  dv.setUint16(14, b & 0xffff, true);
  return bytes;
}

function le16(v: number): Uint8Array {
  return new Uint8Array([v & 0xff, (v >>> 8) & 0xff]);
}

function le32(v: number): Uint8Array {
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, v >>> 0, true);
  return bytes;
}

/**
 * Ring fields (indexes, flags, used elements) are loaded and stored as single aligned accesses
 * (Atomics), as a real driver does: the device runs in another process or thread, and a field copied
 * byte by byte can be seen half-updated (a used.idx read as 0x13f0 while the device moved it from
 * 0x12f0 to 0x1300). Memory without an in-place view (in-process fakes) is copied.
 */
class Access {
  constructor(readonly mem: GuestPhysAccess) {}
  /** The aligned word at `gpa` in place, or null (no view, misaligned or split: hostile layouts). */
  private word(gpa: number, bytes: 2 | 4): Uint16Array | Uint32Array | null {
    let v: Uint8Array | undefined;
    try {
      v = this.mem.view?.(gpa, bytes);
    } catch {
      return null; // straddles two regions (a hostile layout): copy it
    }
    if (v === undefined || v.byteOffset % bytes !== 0) return null;
    return bytes === 2 ? new Uint16Array(v.buffer, v.byteOffset, 1) : new Uint32Array(v.buffer, v.byteOffset, 1);
  }
  u16(gpa: number): number {
    const w = this.word(gpa, 2);
    if (w !== null) return Atomics.load(w, 0);
    const b = this.mem.read(gpa, 2);
    return b[0]! | (b[1]! << 8);
  }
  u32(gpa: number): number {
    const w = this.word(gpa, 4);
    if (w !== null) return Atomics.load(w, 0);
    return new DataView(this.mem.read(gpa, 4).buffer).getUint32(0, true);
  }
  set16(gpa: number, v: number): void {
    const w = this.word(gpa, 2);
    if (w !== null) Atomics.store(w, 0, v & 0xffff);
    else this.mem.write(gpa, le16(v));
  }
  set32(gpa: number, v: number): void {
    const w = this.word(gpa, 4);
    if (w !== null) Atomics.store(w, 0, v >>> 0);
    else this.mem.write(gpa, le32(v));
  }
  zero(gpa: number, len: number): void {
    this.mem.write(gpa, new Uint8Array(len));
  }
}

export interface SplitDriverOptions {
  size: number;
  /** Guest addresses of the three parts (see {@link splitRingLayout}). */
  desc: number;
  avail: number;
  used: number;
  /** Free-running index to start from (avail.idx and used.idx); default 0. */
  startIdx?: number;
  /** Zero the ring areas first (default true). */
  init?: boolean;
}

/** The driver side of a split ring (virtio 1.2 §2.7.13, §2.7.14). */
export class SplitDriverRing {
  readonly size: number;
  readonly layout: SplitRingLayout;
  /** Next avail ring index to fill (free-running, 16 bits). */
  availIdx: number;
  /** Next used ring index to read. */
  lastUsed: number;
  private readonly io: Access;
  /** Free descriptor indexes; the lowest is handed out first. */
  private readonly free: number[] = [];
  /** Descriptor indexes of each chain in flight, by head. */
  private readonly chains = new Map<number, number[]>();

  constructor(mem: GuestPhysAccess, options: SplitDriverOptions) {
    this.io = new Access(mem);
    this.size = options.size;
    const n = options.size;
    this.layout = { desc: options.desc, avail: options.avail, used: options.used, end: options.used + 6 + 8 * n };
    for (let i = n - 1; i >= 0; i--) this.free.push(i);
    this.availIdx = (options.startIdx ?? 0) & 0xffff;
    this.lastUsed = this.availIdx;
    if (options.init ?? true) {
      this.io.zero(options.desc, 16 * n);
      this.io.zero(options.avail, 6 + 2 * n);
      this.io.zero(options.used, 6 + 8 * n);
      this.io.set16(options.avail + 2, this.availIdx);
      this.io.set16(options.used + 2, this.availIdx);
    }
  }

  /** Descriptors not in any chain. */
  get freeDescriptors(): number {
    return this.free.length;
  }

  /**
   * Put `buffers` in free descriptors (or in an indirect table at `options.indirect`, using one
   * descriptor) and their head in the next available ring entry. Not visible until {@link publish}.
   * Returns the head index.
   */
  addChain(buffers: readonly DriverBuffer[], options: AddOptions = {}): number {
    if (buffers.length === 0) throw new RangeError('a chain needs at least one buffer');
    const indexes: number[] = [];
    if (options.indirect !== undefined) {
      buffers.forEach((b, i) => {
        const next = i + 1 < buffers.length;
        const flags = (b.writable === true ? VRING_DESC_F_WRITE : 0) | (next ? VRING_DESC_F_NEXT : 0);
        this.io.mem.write(options.indirect! + 16 * i, encodeDescriptor(b.addr, b.len, flags, next ? i + 1 : 0));
      });
      const d = this.take();
      indexes.push(d);
      this.writeDescriptor(d, { addr: options.indirect, len: 16 * buffers.length, flags: VRING_DESC_F_INDIRECT });
    } else {
      if (buffers.length > this.free.length) throw new RangeError('not enough free descriptors');
      for (let i = 0; i < buffers.length; i++) indexes.push(this.take());
      buffers.forEach((b, i) => {
        const next = i + 1 < buffers.length;
        const flags = (b.writable === true ? VRING_DESC_F_WRITE : 0) | (next ? VRING_DESC_F_NEXT : 0);
        this.writeDescriptor(indexes[i]!, { addr: b.addr, len: b.len, flags, next: next ? indexes[i + 1]! : 0 });
      });
    }
    const head = indexes[0]!;
    this.chains.set(head, indexes);
    this.writeAvailRing(this.availIdx, head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    return head;
  }

  /** Make every added chain visible: avail.idx = the number added so far (§2.7.13.3). */
  publish(): void {
    this.writeAvailIdx(this.availIdx);
  }

  /** Read the used elements published since the last call, freeing their descriptors. */
  takeUsed(): UsedElement[] {
    const out: UsedElement[] = [];
    const idx = this.usedIdx();
    while (this.lastUsed !== idx && out.length < this.size) {
      const at = this.layout.used + 4 + 8 * (this.lastUsed % this.size);
      const id = this.io.u32(at);
      out.push({ id, len: this.io.u32(at + 4) });
      const indexes = this.chains.get(id);
      if (indexes !== undefined) {
        this.chains.delete(id);
        for (const i of indexes.reverse()) this.free.push(i);
        this.free.sort((a, b) => b - a);
      }
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }

  // Raw access (hostile tests, and fields a driver writes).

  writeDescriptor(index: number, d: RawSplitDescriptor): void {
    this.io.mem.write(this.layout.desc + 16 * index, encodeDescriptor(d.addr, d.len, d.flags, d.next ?? 0));
  }

  /** Write `head` into the available ring entry for free-running index `position`. */
  writeAvailRing(position: number, head: number): void {
    this.io.set16(this.layout.avail + 4 + 2 * (position % this.size), head);
  }

  writeAvailIdx(idx: number): void {
    this.io.set16(this.layout.avail + 2, idx & 0xffff);
  }

  /** avail.flags (VRING_AVAIL_F_NO_INTERRUPT). */
  setAvailFlags(flags: number): void {
    this.io.set16(this.layout.avail, flags);
  }

  /** used_event (EVENT_IDX): notify me once used.idx passes this index. */
  setUsedEvent(idx: number): void {
    this.io.set16(this.layout.avail + 4 + 2 * this.size, idx & 0xffff);
  }

  usedIdx(): number {
    return this.io.u16(this.layout.used + 2);
  }

  /** used.flags (VRING_USED_F_NO_NOTIFY). */
  usedFlags(): number {
    return this.io.u16(this.layout.used);
  }

  /** avail_event (EVENT_IDX), written by the device. */
  availEvent(): number {
    return this.io.u16(this.layout.used + 4 + 8 * this.size);
  }

  private take(): number {
    const d = this.free.pop();
    if (d === undefined) throw new RangeError('no free descriptor');
    return d;
  }
}

export interface PackedDriverOptions {
  size: number;
  desc: number;
  driverEvent: number;
  deviceEvent: number;
  /** Zero the ring areas first (default true). */
  init?: boolean;
  /** Starting position and wrap counters (defaults 0 and 1, a fresh ring: §2.8.1). */
  nextAvail?: number;
  availWrap?: number;
  nextUsed?: number;
  usedWrap?: number;
}

/** The driver side of a packed ring (virtio 1.2 §2.8.21, §2.8.22). */
export class PackedDriverRing {
  readonly size: number;
  readonly layout: PackedRingLayout;
  nextAvail: number;
  availWrap: number;
  nextUsed: number;
  usedWrap: number;
  private readonly io: Access;
  private readonly freeIds: number[] = [];
  /** Ring descriptors used by each buffer id in flight (to skip them when it comes back). */
  private readonly idDescriptors = new Map<number, number>();
  /** First descriptors whose flags wait for {@link publish}. */
  private pendingHeads: { slot: number; flags: number }[] = [];
  private descriptorsInFlight = 0;

  constructor(mem: GuestPhysAccess, options: PackedDriverOptions) {
    this.io = new Access(mem);
    this.size = options.size;
    this.layout = {
      desc: options.desc,
      driverEvent: options.driverEvent,
      deviceEvent: options.deviceEvent,
      end: options.deviceEvent + 4,
    };
    this.nextAvail = options.nextAvail ?? 0;
    this.availWrap = options.availWrap ?? 1;
    this.nextUsed = options.nextUsed ?? this.nextAvail;
    this.usedWrap = options.usedWrap ?? this.availWrap;
    for (let i = options.size - 1; i >= 0; i--) this.freeIds.push(i);
    if (options.init ?? true) {
      // "The descriptor ring is zero-initialized" (§2.8.13).
      this.io.zero(options.desc, 16 * options.size);
      this.io.zero(options.driverEvent, 4);
      this.io.zero(options.deviceEvent, 4);
    }
  }

  /** AVAIL/USED bits marking a descriptor available under wrap counter `wrap` (§2.8.1). */
  static availBits(wrap: number): number {
    return wrap === 1 ? VRING_PACKED_DESC_F_AVAIL : VRING_PACKED_DESC_F_USED;
  }

  /** Ring slots not occupied by buffers in flight. */
  get freeSlots(): number {
    return this.size - this.descriptorsInFlight;
  }

  /**
   * Write `buffers` into the next ring slots (or one slot pointing at an indirect table), every flag
   * except the first descriptor's, which {@link publish} writes. Returns the buffer id.
   */
  addChain(buffers: readonly DriverBuffer[], options: AddOptions & { id?: number } = {}): number {
    if (buffers.length === 0) throw new RangeError('a chain needs at least one buffer');
    const indirect = options.indirect;
    const n = indirect !== undefined ? 1 : buffers.length;
    if (n > this.freeSlots) throw new RangeError('not enough free ring slots');
    const id = options.id ?? this.freeIds.pop();
    if (id === undefined) throw new RangeError('no free buffer id');
    if (indirect !== undefined) {
      buffers.forEach((b, i) => {
        this.io.mem.write(indirect + 16 * i, encodeDescriptor(b.addr, b.len, 0, b.writable === true ? VRING_DESC_F_WRITE : 0));
      });
    }
    let first = true;
    for (let k = 0; k < n; k++) {
      const slot = this.nextAvail;
      let flags = PackedDriverRing.availBits(this.availWrap);
      let addr: number;
      let len: number;
      if (indirect !== undefined) {
        flags |= VRING_DESC_F_INDIRECT;
        addr = indirect;
        len = 16 * buffers.length;
      } else {
        const b = buffers[k]!;
        if (b.writable === true) flags |= VRING_DESC_F_WRITE;
        if (k + 1 < n) flags |= VRING_DESC_F_NEXT;
        addr = b.addr;
        len = b.len;
      }
      // Everything but the flags first; the first descriptor's flags wait for publish().
      this.io.mem.write(this.layout.desc + 16 * slot, encodeDescriptor(addr, len, id, 0).subarray(0, 14));
      if (first) {
        this.pendingHeads.push({ slot, flags });
        first = false;
      } else {
        this.io.set16(this.layout.desc + 16 * slot + 14, flags);
      }
      if (++this.nextAvail === this.size) {
        this.nextAvail = 0;
        this.availWrap ^= 1;
      }
    }
    this.idDescriptors.set(id, n);
    this.descriptorsInFlight += n;
    return id;
  }

  /** Make the added chains available, in order, by writing their first descriptors' flags. */
  publish(): void {
    for (const h of this.pendingHeads) this.io.set16(this.layout.desc + 16 * h.slot + 14, h.flags);
    this.pendingHeads = [];
  }

  /** Read the used descriptors written since the last call (§2.8.22), skipping each buffer's slots. */
  takeUsed(): UsedElement[] {
    const out: UsedElement[] = [];
    while (out.length < this.size) {
      const at = this.layout.desc + 16 * this.nextUsed;
      const flags = this.io.u16(at + 14);
      const avail = (flags >>> 7) & 1;
      const used = (flags >>> 15) & 1;
      if (avail !== this.usedWrap || used !== this.usedWrap) break;
      const id = this.io.u16(at + 12);
      out.push({ id, len: this.io.u32(at + 8), flags });
      const n = this.idDescriptors.get(id) ?? 1;
      if (this.idDescriptors.delete(id)) {
        this.freeIds.push(id);
        this.descriptorsInFlight -= n;
      }
      this.nextUsed += n;
      if (this.nextUsed >= this.size) {
        this.nextUsed -= this.size;
        this.usedWrap ^= 1;
      }
    }
    return out;
  }

  // Raw access.

  /** Write a whole descriptor into ring slot `slot`, flags included. */
  writeDescriptor(slot: number, d: RawPackedDescriptor): void {
    this.io.mem.write(this.layout.desc + 16 * slot, encodeDescriptor(d.addr, d.len, d.id, d.flags));
  }

  /** Driver event suppression: flags (RING_EVENT_FLAGS_*) and, for DESC, the offset and wrap counter. */
  setDriverEvent(flags: number, offset = 0, wrap = 0): void {
    this.io.set16(this.layout.driverEvent, (offset & 0x7fff) | ((wrap & 1) << 15));
    this.io.set16(this.layout.driverEvent + 2, flags);
  }

  /** Device event suppression as the device last wrote it. */
  deviceEvent(): { offset: number; wrap: number; flags: number } {
    const offWrap = this.io.u16(this.layout.deviceEvent);
    return { offset: offWrap & 0x7fff, wrap: offWrap >>> 15, flags: this.io.u16(this.layout.deviceEvent + 2) };
  }

  /** Flags of ring slot `slot`. */
  descriptorFlags(slot: number): number {
    return this.io.u16(this.layout.desc + 16 * slot + 14);
  }
}
