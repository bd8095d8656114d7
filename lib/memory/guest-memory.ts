/**
 * Guest memory as the backend sees it: the regions the front-end sent with SET_MEM_TABLE or
 * ADD_MEM_REG, each mmap'ed once from its fd.
 *
 * Ownership: a {@link GuestRegion} owns its fd and its mapping and is reference counted, because an
 * ADD_MEM_REG builds a new {@link GuestMemory} that shares the regions of the old one. A GuestMemory
 * holds one reference on each of its regions; {@link GuestMemory.close} drops them, but not before
 * every {@link GuestMemory.hold} has been released, so I/O in flight (io_uring reading into guest
 * pages) never sees its pages unmapped. Views are detached by the native helper before munmap, so a
 * stale view reads as empty instead of faulting.
 *
 * Addresses are JS numbers. The protocol layer rejects any region that ends past 2^53
 * (see `validate.ts`), so every address and offset computed here is exact.
 */
import { MAP_VIEW_SLACK, MAP_VIEW_STRIDE } from '../../native/layout';
import { MemoryError } from '../errors';

/** A region of guest memory that is mapped into this process (see mapped-region.ts). */
export interface GuestRegion {
  readonly guestPhysAddr: number;
  readonly size: number;
  /** The front-end's virtual address of the region (vring addresses are given in this space). */
  readonly userAddr: number;
  /** Offset of the region's first byte inside its mapping. */
  readonly mappingOffset: number;
  /** Views of the mapping, laid out as described on the native `Mapping.views`. */
  readonly views: readonly Uint8Array[];
  /** Host virtual address of the region's first byte (not of the mapping). */
  readonly hostAddress: number;
  /**
   * The fd the region is mapped from, or null for a region not backed by one (the ArrayBuffer
   * regions of unit tests): then only `hostAddress` reaches its bytes.
   */
  readonly fd: number | null;
  /** Offset of the region's first byte in `fd` (VhostUserMemoryRegion mmap_offset); 0 without an fd. */
  readonly mmapOffset: number;
  /** Bytes per page of the memory behind the region: 4 KiB, or the huge page size on hugetlbfs. */
  readonly pageSize: number;
  retain(): this;
  release(): void;
}

/**
 * Where a guest address landed: `view[offset .. offset+length)` holds the bytes, `address` is the
 * host virtual address of `view[offset]`. `length` is clipped at the end of the view's stride or the
 * region, so callers loop to cover a range (as libvhost-user's vu_gpa_to_va does).
 */
export class Translation {
  view: Uint8Array = new Uint8Array(0);
  /** Index of `view` in {@link GuestMemory.views}. */
  viewId = 0;
  offset = 0;
  length = 0;
  address = 0;
}

/**
 * One piece of a guest physical range (see {@link GuestMemory.resolveRange}): bytes of one region,
 * or a hole in the guest's memory map (`region` null) that no region covers.
 */
export type RangePiece =
  | {
      readonly region: GuestRegion;
      readonly guestPhysAddr: number;
      readonly length: number;
      /** Offset of the piece in `region.fd` (in the region when it has no fd). */
      readonly fileOffset: number;
      /** Host virtual address of the piece's first byte. */
      readonly hostAddress: number;
    }
  | { readonly region: null; readonly guestPhysAddr: number; readonly length: number };

/** 2^53: no guest address reaches it (validate.ts refuses regions that end past it). */
const ADDRESS_LIMIT = 2 ** 53;

/** The guest's memory map: an immutable set of regions. */
export class GuestMemory {
  /** Every view of every region, so a segment can name its bytes with one small integer. */
  readonly views: Uint8Array[] = [];
  /** Host address of `views[i][0]`. */
  readonly viewAddress: number[] = [];
  /** Guest address of `views[i][0]` (below the region start for a first view when mappingOffset > 0). */
  private readonly viewGuestBase: number[] = [];
  /** First and past-the-end guest address that `views[i]` serves (its stride, clipped to the region). */
  private readonly viewGuestStart: number[] = [];
  private readonly viewGuestEnd: number[] = [];
  /** The regions in guest address order (the front-end may send them in any order). */
  private readonly byAddress: readonly GuestRegion[];
  private holds = 0;
  private closing = false;

  /** Takes one reference on each region (the caller keeps its own). */
  constructor(readonly regions: readonly GuestRegion[]) {
    this.byAddress = [...regions].sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
    for (const region of regions) {
      region.retain();
      region.views.forEach((view, i) => {
        // The region starts mappingOffset bytes into its mapping; views index the mapping.
        const mapStart = i * MAP_VIEW_STRIDE;
        const strideEnd = Math.min(mapStart + MAP_VIEW_STRIDE, region.mappingOffset + region.size);
        if (strideEnd <= region.mappingOffset) return;
        const start = Math.max(mapStart, region.mappingOffset);
        this.views.push(view);
        this.viewAddress.push(region.hostAddress - region.mappingOffset + mapStart);
        this.viewGuestBase.push(region.guestPhysAddr + (mapStart - region.mappingOffset));
        this.viewGuestStart.push(region.guestPhysAddr + (start - region.mappingOffset));
        this.viewGuestEnd.push(region.guestPhysAddr + (strideEnd - region.mappingOffset));
      });
    }
  }

  /** An empty memory map (before the first SET_MEM_TABLE). */
  static empty(): GuestMemory {
    return new GuestMemory([]);
  }

  /** Total bytes of guest memory mapped. */
  get totalSize(): number {
    return this.regions.reduce((sum, r) => sum + r.size, 0);
  }

  /**
   * Resolve the guest physical range starting at `gpa` into `out`, clipped as described on
   * {@link Translation}. Returns false when `gpa` is not inside any region.
   */
  translate(gpa: number, len: number, out: Translation): boolean {
    const starts = this.viewGuestStart;
    const ends = this.viewGuestEnd;
    for (let i = 0; i < starts.length; i++) {
      const start = starts[i]!;
      if (gpa >= start && gpa < ends[i]!) {
        out.viewId = i;
        out.view = this.views[i]!;
        out.offset = gpa - this.viewGuestBase[i]!;
        out.length = Math.min(len, ends[i]! - gpa);
        out.address = this.viewAddress[i]! + out.offset;
        return true;
      }
    }
    return false;
  }

  /**
   * The guest physical range `[gpa, gpa+length)` as pieces in address order that cover it exactly:
   * per region the bytes it holds (with their fd offset and host address, for fallocate PUNCH_HOLE or
   * madvise), and every stretch no region covers as a hole, so a caller can count what it could not
   * reach instead of it being skipped silently. Nothing is rounded to pages: `region.pageSize` tells
   * the caller what it may punch. Throws MemoryError GUEST_ADDR_OVERFLOW when `gpa` or `length` is not
   * a non-negative integer or the range ends past 2^53 (no guest address can be there).
   */
  resolveRange(gpa: number, length: number): RangePiece[] {
    if (!Number.isSafeInteger(gpa) || !Number.isSafeInteger(length) || gpa < 0 || length < 0 || length > ADDRESS_LIMIT - gpa) {
      throw new MemoryError('GUEST_ADDR_OVERFLOW', `guest range 0x${gpa.toString(16)}+${length} is not inside the guest address space`);
    }
    const end = gpa + length; // exact: at most 2^53
    const pieces: RangePiece[] = [];
    let at = gpa;
    for (const region of this.byAddress) {
      if (at === end) break;
      const regionEnd = region.guestPhysAddr + region.size;
      if (regionEnd <= at) continue;
      if (region.guestPhysAddr >= end) break;
      if (region.guestPhysAddr > at) {
        pieces.push({ region: null, guestPhysAddr: at, length: region.guestPhysAddr - at });
        at = region.guestPhysAddr;
      }
      const into = at - region.guestPhysAddr;
      const pieceEnd = Math.min(regionEnd, end);
      pieces.push({ region, guestPhysAddr: at, length: pieceEnd - at, fileOffset: region.mmapOffset + into, hostAddress: region.hostAddress + into });
      at = pieceEnd;
    }
    if (at < end) pieces.push({ region: null, guestPhysAddr: at, length: end - at });
    return pieces;
  }

  /**
   * The guest physical address of byte `offset` of `views[viewId]`: a chain segment's guest address,
   * for a device that needs the range's backing (balloon free page reporting gets guest ranges as
   * device-writable buffers and releases them with {@link resolveRange}).
   */
  guestAddress(viewId: number, offset: number): number {
    return this.viewGuestBase[viewId]! + offset;
  }

  /**
   * A contiguous view of `len` bytes at front-end virtual address `userAddr` (vring addresses are
   * front-end addresses, vhost-user.rst SET_VRING_ADDR). `len` must be at most MAP_VIEW_SLACK.
   */
  userAddrView(userAddr: number, len: number): Uint8Array {
    for (const region of this.regions) {
      if (userAddr >= region.userAddr && userAddr - region.userAddr + len <= region.size) {
        const mapOffset = region.mappingOffset + (userAddr - region.userAddr);
        const index = Math.floor(mapOffset / MAP_VIEW_STRIDE);
        const view = region.views[index]!;
        const start = mapOffset - index * MAP_VIEW_STRIDE;
        if (len > MAP_VIEW_SLACK || start + len > view.length) break;
        return view.subarray(start, start + len);
      }
    }
    throw new MemoryError('GUEST_ADDR_UNMAPPED', `front-end address 0x${userAddr.toString(16)}+${len} is not in guest memory`);
  }

  /** Keep the mappings alive across asynchronous I/O into them; pair with {@link release}. */
  hold(): void {
    this.holds++;
  }

  release(): void {
    if (--this.holds === 0 && this.closing) this.unref();
  }

  /** Drop this map's references once nothing holds it. Idempotent. */
  close(): void {
    if (this.closing) return;
    this.closing = true;
    if (this.holds === 0) this.unref();
  }

  private unref(): void {
    for (const region of this.regions) region.release();
  }
}
