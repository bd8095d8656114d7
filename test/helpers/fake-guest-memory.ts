/**
 * Guest memory for unit tests: {@link GuestRegion}s backed by ArrayBuffers instead of memfd mappings,
 * wrapped in a real {@link GuestMemory}.
 *
 * Each region's "mapping" (mappingOffset + size bytes) sits inside a larger ArrayBuffer with guard
 * bytes before and after it, filled with {@link GUARD_FILL}; the bytes of the mapping before the
 * region (mappingOffset > 0) are guard bytes too. Views follow native/layout.ts exactly: view `i`
 * starts at byte `i * MAP_VIEW_STRIDE` of the mapping and is `min(STRIDE + SLACK, length - i * STRIDE)`
 * long. The stride is the real one (GuestMemory uses the constant); a region larger than 1 GiB costs
 * only the pages a test touches, because large ArrayBuffers are allocated lazily zeroed.
 *
 * Host addresses are invented (distinct per region) so `DescriptorChain.address()` has something to
 * return; nothing dereferences them.
 */
import { GuestMemory, type GuestRegion } from '../../lib/memory/guest-memory';
import { MAP_VIEW_SLACK, MAP_VIEW_STRIDE } from '../../native/layout';
import type { GuestPhysAccess } from './driver-ring';

/** Value of every guard byte. */
export const GUARD_FILL = 0xa5;
/** Guard bytes before and after each mapping in its ArrayBuffer. */
export const GUARD_BYTES = 4096;
const FAKE_HOST_BASE = 0x7e00_0000_0000;
const FAKE_HOST_SPACING = 0x100_0000_0000;

export interface FakeRegionSpec {
  guestPhysAddr: number;
  size: number;
  /** Front-end virtual address of the region's first byte. */
  userAddr: number;
  /** Bytes of mapping before the region (QEMU's mmap_offset not being page aligned). Default 0. */
  mappingOffset?: number;
}

/**
 * The default map: three regions with user addresses unrelated to guest addresses.
 * - region 0: guest 0x0 .. 0x200000 (2 MiB)
 * - region 1: guest 0x200000 .. 0x300000, adjacent to region 0 (a buffer can span both), mappingOffset 0x3000
 * - gap: 0x300000 .. 0x1_0000_0000
 * - region 2: guest 0x1_0000_0000 .. +1 MiB (above 4 GiB: descriptors need both address halves)
 */
export const DEFAULT_REGIONS: readonly FakeRegionSpec[] = [
  { guestPhysAddr: 0x0, size: 0x20_0000, userAddr: 0x7f10_0000_0000 },
  { guestPhysAddr: 0x20_0000, size: 0x10_0000, userAddr: 0x7f20_0004_0000, mappingOffset: 0x3000 },
  { guestPhysAddr: 0x1_0000_0000, size: 0x10_0000, userAddr: 0x7f30_0000_0000 },
];

/** An ArrayBuffer-backed region with the native view layout. */
export class FakeRegion implements GuestRegion {
  readonly guestPhysAddr: number;
  readonly size: number;
  readonly userAddr: number;
  readonly mappingOffset: number;
  readonly hostAddress: number;
  /** No fd behind an ArrayBuffer: range pieces of a fake region carry only a host address. */
  readonly fd = null;
  readonly mmapOffset = 0;
  readonly pageSize = 4096;
  readonly views: Uint8Array[] = [];
  /** The whole ArrayBuffer: guard | mapping | guard. */
  readonly backing: Uint8Array;
  /** The mapping (mappingOffset bytes of guard, then the region). */
  readonly mapping: Uint8Array;
  refs = 1;

  constructor(spec: FakeRegionSpec, index: number) {
    this.guestPhysAddr = spec.guestPhysAddr;
    this.size = spec.size;
    this.userAddr = spec.userAddr;
    this.mappingOffset = spec.mappingOffset ?? 0;
    const length = this.mappingOffset + this.size;
    this.backing = new Uint8Array(GUARD_BYTES + length + GUARD_BYTES);
    this.mapping = this.backing.subarray(GUARD_BYTES, GUARD_BYTES + length);
    this.backing.fill(GUARD_FILL, 0, GUARD_BYTES + this.mappingOffset);
    this.backing.fill(GUARD_FILL, GUARD_BYTES + length);
    const mappingAddress = FAKE_HOST_BASE + index * FAKE_HOST_SPACING;
    this.hostAddress = mappingAddress + this.mappingOffset;
    for (let start = 0; start < length; start += MAP_VIEW_STRIDE) {
      this.views.push(this.mapping.subarray(start, Math.min(start + MAP_VIEW_STRIDE + MAP_VIEW_SLACK, length)));
    }
  }

  /** The region's bytes (without the mappingOffset prefix). */
  get bytes(): Uint8Array {
    return this.mapping.subarray(this.mappingOffset);
  }

  retain(): this {
    this.refs++;
    return this;
  }

  release(): void {
    this.refs--;
  }

  /** Whether every guard byte still holds {@link GUARD_FILL}. */
  guardsIntact(): boolean {
    const b = this.backing;
    const regionStart = GUARD_BYTES + this.mappingOffset;
    const regionEnd = regionStart + this.size;
    for (let i = 0; i < regionStart; i++) if (b[i] !== GUARD_FILL) return false;
    for (let i = regionEnd; i < b.length; i++) if (b[i] !== GUARD_FILL) return false;
    return true;
  }
}

/**
 * A fake guest: its regions, the GuestMemory over them, and driver-side access by guest address
 * (reads and writes may span adjacent regions).
 */
export class FakeGuestMemory implements GuestPhysAccess {
  readonly regions: FakeRegion[];
  readonly memory: GuestMemory;

  /** `firstHostSlot`: where the invented host addresses start (distinct for a remapped copy). */
  constructor(
    readonly specs: readonly FakeRegionSpec[] = DEFAULT_REGIONS,
    private readonly firstHostSlot = 0,
  ) {
    this.regions = specs.map((spec, i) => new FakeRegion(spec, firstHostSlot + i));
    this.memory = new GuestMemory(this.regions);
  }

  /**
   * The same guest bytes mapped again: new backing buffers holding a copy of every region, at other
   * host addresses, with `specs` (default: the same; may change mappingOffset or userAddr, not guest
   * addresses or sizes). What a SET_MEM_TABLE that maps the same memfds anew gives the backend.
   */
  remapped(specs: readonly FakeRegionSpec[] = this.specs): FakeGuestMemory {
    const copy = new FakeGuestMemory(specs, this.firstHostSlot + this.regions.length);
    copy.regions.forEach((r, i) => r.bytes.set(this.regions[i]!.bytes));
    return copy;
  }

  read(gpa: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    this.each(gpa, len, (bytes, at) => out.set(bytes, at));
    return out;
  }

  write(gpa: number, bytes: Uint8Array): void {
    this.each(gpa, bytes.length, (dst, at) => dst.set(bytes.subarray(at, at + dst.length)));
  }

  /** Fill `len` bytes at `gpa` with `value`. */
  fill(gpa: number, len: number, value: number): void {
    this.each(gpa, len, (dst) => dst.fill(value));
  }

  /** The front-end virtual address of guest address `gpa` (ring addresses are given this way). */
  userAddr(gpa: number): number {
    const region = this.regionOf(gpa);
    return region.userAddr + (gpa - region.guestPhysAddr);
  }

  /** The region holding `gpa`; throws if none. */
  regionOf(gpa: number): FakeRegion {
    const region = this.regions.find((r) => gpa >= r.guestPhysAddr && gpa < r.guestPhysAddr + r.size);
    if (region === undefined) throw new RangeError(`guest address 0x${gpa.toString(16)} is not in the fake memory`);
    return region;
  }

  /** Copies of every region's whole backing store (guards included), for {@link changedSince}. */
  snapshot(): Uint8Array[] {
    return this.regions.map((r) => r.backing.slice());
  }

  /** Guest addresses (or guard offsets, as `region:offset`) whose bytes differ from `snapshot`. */
  changedSince(snapshot: readonly Uint8Array[]): string[] {
    const changed: string[] = [];
    this.regions.forEach((r, i) => {
      const before = snapshot[i]!;
      const regionStart = GUARD_BYTES + r.mappingOffset;
      for (let k = 0; k < before.length; k++) {
        if (before[k] === r.backing[k]) continue;
        const inRegion = k >= regionStart && k < regionStart + r.size;
        changed.push(inRegion ? `0x${(r.guestPhysAddr + k - regionStart).toString(16)}` : `guard ${i}:${k}`);
        if (changed.length > 16) return;
      }
    });
    return changed;
  }

  /** Whether every region's guard bytes are untouched. */
  guardsIntact(): boolean {
    return this.regions.every((r) => r.guardsIntact());
  }

  /**
   * Whether [hostAddress, hostAddress+len) lies inside one region's bytes, and the view bytes of a
   * segment are the region's own (used to check the walker never escapes guest memory).
   */
  containsSegment(view: Uint8Array, offset: number, length: number, hostAddress: number): boolean {
    const region = this.regions.find((r) => r.views.some((v) => v.buffer === view.buffer && v.byteOffset === view.byteOffset));
    if (region === undefined) return false;
    const mappingStart = view.byteOffset - GUARD_BYTES + offset;
    if (mappingStart < region.mappingOffset || mappingStart + length > region.mappingOffset + region.size) return false;
    if (offset + length > view.length) return false;
    const hostStart = region.hostAddress - region.mappingOffset + mappingStart;
    return hostStart === hostAddress;
  }

  private each(gpa: number, len: number, fn: (bytes: Uint8Array, at: number) => void): void {
    let done = 0;
    while (done < len) {
      const region = this.regionOf(gpa + done);
      const off = gpa + done - region.guestPhysAddr;
      const n = Math.min(len - done, region.size - off);
      fn(region.bytes.subarray(off, off + n), done);
      done += n;
    }
  }
}
