/**
 * Inflate and deflate buffers (virtio 1.2 §5.5.6.1): an array of 32-bit little-endian page frame
 * numbers, each naming one 4 KiB page of guest-physical memory ("the driver ... places the page frame
 * numbers in a buffer ... each is the address divided by 4096", whatever the guest's own page size).
 *
 * Everything here is pure bookkeeping, checked against the guest's memory map: which pages are in the
 * balloon ({@link BalloonPages}), which huge pages of hugetlbfs-backed memory are wholly in it
 * ({@link HugePageTracker}), and which host ranges an inflate may release ({@link planInflate}).
 * Bad PFNs are skipped and counted, never released: a page outside guest memory or in a gap between
 * regions, a page already in the balloon (inflate) or not in it (deflate), the bytes of a buffer whose
 * length is not a multiple of 4, and PFNs past {@link MAX_PFNS_PER_BUFFER}.
 */
import type { GuestMemory, GuestRegion } from '../../lib/memory/guest-memory';
import type { DescriptorChain } from '../../lib/virtqueue/descriptor-chain';

/** virtio 1.2 §5.5.6: PFNs address 4096-byte pages ("VIRTIO_BALLOON_PFN_SHIFT 12"). */
export const BALLOON_PAGE_SIZE = 4096;

/**
 * PFNs read from one buffer at most. Linux sends up to 256 (VIRTIO_BALLOON_ARRAY_PFNS_MAX); a buffer
 * may be far longer (a descriptor length is 32 bits), so the device bounds what it reads and counts
 * the rest as bad rather than allocating for it.
 */
export const MAX_PFNS_PER_BUFFER = 65536;

/** Why a PFN (or the tail of a buffer) was skipped: the label values of vhostd_balloon_bad_pfns_total. */
export type BadPfnReason = 'outside' | 'repeated' | 'not-inflated' | 'misaligned' | 'excess';
export const BAD_PFN_REASONS: readonly BadPfnReason[] = ['outside', 'repeated', 'not-inflated', 'misaligned', 'excess'];

/** Counts of skipped PFNs by reason (`misaligned` counts bytes of a length not a multiple of 4). */
export type BadPfnCounts = Record<BadPfnReason, number>;

export function noBadPfns(): BadPfnCounts {
  return { outside: 0, repeated: 0, 'not-inflated': 0, misaligned: 0, excess: 0 };
}

/**
 * The PFNs of an inflate or deflate buffer (its device-readable bytes). A length that is not a
 * multiple of 4 leaves a partial PFN, skipped as `misaligned` (its byte count); PFNs past
 * {@link MAX_PFNS_PER_BUFFER} are skipped as `excess`. Device-writable bytes are ignored: the driver
 * offers none (virtio 1.2 §5.5.6.1 "an array of page addresses ... in a driver-to-device buffer").
 */
export function readPfns(chain: DescriptorChain, bad: BadPfnCounts): Uint32Array {
  const length = chain.readableLength;
  const whole = Math.floor(length / 4);
  bad.misaligned += length % 4;
  const count = Math.min(whole, MAX_PFNS_PER_BUFFER);
  bad.excess += whole - count;
  const bytes = new Uint8Array(count * 4);
  chain.read(0, bytes);
  const view = new DataView(bytes.buffer);
  const pfns = new Uint32Array(count);
  for (let i = 0; i < count; i++) pfns[i] = view.getUint32(4 * i, true);
  return pfns;
}

/** PFNs per chunk of the {@link BalloonPages} bitmap: 4096 pages, 16 MiB of guest memory, 512 bytes. */
const CHUNK_SHIFT = 12;
const CHUNK_MASK = (1 << CHUNK_SHIFT) - 1;

/**
 * The set of 4 KiB pages in the balloon, as a sparse bitmap (chunks allocated where the guest
 * inflated): repeats and deflates of pages never inflated are found here.
 */
export class BalloonPages {
  private readonly chunks = new Map<number, Uint32Array>();
  private pages = 0;

  /** Pages in the balloon. */
  get count(): number {
    return this.pages;
  }

  has(pfn: number): boolean {
    const chunk = this.chunks.get(pfn >>> CHUNK_SHIFT);
    const bit = pfn & CHUNK_MASK;
    return chunk !== undefined && (chunk[bit >>> 5]! & (1 << (bit & 31))) !== 0;
  }

  /** Add `pfn`; false when it was already in. */
  add(pfn: number): boolean {
    const key = pfn >>> CHUNK_SHIFT;
    let chunk = this.chunks.get(key);
    if (chunk === undefined) {
      chunk = new Uint32Array(1 << (CHUNK_SHIFT - 5));
      this.chunks.set(key, chunk);
    }
    const bit = pfn & CHUNK_MASK;
    const mask = 1 << (bit & 31);
    if ((chunk[bit >>> 5]! & mask) !== 0) return false;
    chunk[bit >>> 5]! |= mask;
    this.pages++;
    return true;
  }

  /** Remove `pfn`; false when it was not in. */
  delete(pfn: number): boolean {
    if (!this.has(pfn)) return false;
    const bit = pfn & CHUNK_MASK;
    this.chunks.get(pfn >>> CHUNK_SHIFT)![bit >>> 5]! &= ~(1 << (bit & 31));
    this.pages--;
    return true;
  }

  clear(): void {
    this.chunks.clear();
    this.pages = 0;
  }
}

/**
 * Partly inflated huge pages. hugetlbfs frees only whole huge pages (fallocate PUNCH_HOLE and
 * MADV_REMOVE work in huge page units), while the guest inflates 4 KiB pages: a huge page is released
 * once every one of its 4 KiB pages is in the balloon. Keyed by the guest address of the huge page's
 * first byte (huge pages are aligned in the memory fd, so that address follows from the region's
 * mmap offset); `null` stands for a huge page that does not lie wholly in one region, which is never
 * released. Also counts the balloon's pages that the host still holds because of that.
 */
export class HugePageTracker {
  private readonly inBalloon = new Map<number, number>();
  private whole = 0;
  private unreleased = 0;

  /** Huge pages with some, but not all, of their 4 KiB pages in the balloon. */
  get partial(): number {
    return this.inBalloon.size - this.whole;
  }

  /** 4 KiB pages in the balloon on huge pages not released: partly inflated or never releasable ones. */
  get unreleasedPages(): number {
    return this.unreleased;
  }

  /** One more 4 KiB page of the huge page at `hugeGpa` is in the balloon; true when it is now whole. */
  add(hugeGpa: number | null, pagesPerHugePage: number): boolean {
    const count = hugeGpa === null ? 0 : (this.inBalloon.get(hugeGpa) ?? 0) + 1;
    if (hugeGpa !== null) this.inBalloon.set(hugeGpa, count);
    if (count < pagesPerHugePage) {
      this.unreleased++;
      return false;
    }
    this.whole++;
    this.unreleased -= pagesPerHugePage - 1;
    return true;
  }

  /** One 4 KiB page of the huge page at `hugeGpa` left the balloon. */
  delete(hugeGpa: number | null, pagesPerHugePage: number): void {
    if (hugeGpa === null) {
      this.unreleased = Math.max(0, this.unreleased - 1);
      return;
    }
    const count = this.inBalloon.get(hugeGpa);
    if (count === undefined) return; // not tracked: the memory map changed since the inflate
    if (count === pagesPerHugePage) {
      this.whole--;
      this.unreleased += pagesPerHugePage - 1;
    } else {
      this.unreleased--;
    }
    if (count > 1) this.inBalloon.set(hugeGpa, count - 1);
    else this.inBalloon.delete(hugeGpa);
  }

  clear(): void {
    this.inBalloon.clear();
    this.whole = 0;
    this.unreleased = 0;
  }
}

/** Host memory to give back: `length` bytes at `offset` in `region` (whole pages of the region's backing). */
export interface ReleaseRange {
  readonly region: GuestRegion;
  readonly offset: number;
  readonly length: number;
}

/** A run of consecutive PFNs. */
export interface PfnRun {
  readonly first: number;
  readonly pages: number;
}

/** Consecutive PFNs (in the order given: Linux sends them in allocation order) as runs. */
export function coalescePfns(pfns: ArrayLike<number>): PfnRun[] {
  const runs: PfnRun[] = [];
  let first = -1;
  let pages = 0;
  for (let i = 0; i < pfns.length; i++) {
    const pfn = pfns[i]!;
    if (pages > 0 && pfn === first + pages) {
      pages++;
      continue;
    }
    if (pages > 0) runs.push({ first, pages });
    first = pfn;
    pages = 1;
  }
  if (pages > 0) runs.push({ first, pages });
  return runs;
}

/** The region holding the whole 4 KiB page at `gpa`, or null (outside memory, in a gap, or straddling). */
function pageRegion(memory: GuestMemory, gpa: number): GuestRegion | null {
  const pieces = memory.resolveRange(gpa, BALLOON_PAGE_SIZE);
  return pieces.length === 1 ? pieces[0]!.region : null;
}

/**
 * The huge page of `region` that holds guest address `gpa`: its first guest address, or null when the
 * huge page does not lie wholly inside the region (it can never be released through this region).
 */
function hugePageAt(region: GuestRegion, gpa: number): number | null {
  const fileOffset = region.mmapOffset + (gpa - region.guestPhysAddr);
  const hugeGpa = gpa - (fileOffset % region.pageSize);
  return hugeGpa >= region.guestPhysAddr && hugeGpa + region.pageSize <= region.guestPhysAddr + region.size ? hugeGpa : null;
}

/**
 * Inflate: add the buffer's PFNs to the balloon and return what to release. Pages of 4 KiB-backed
 * memory are released in runs of consecutive PFNs (a run crossing from one region into an adjacent
 * one becomes one range per region); on hugetlbfs-backed memory a huge page is released when its last
 * 4 KiB page arrives.
 */
export function planInflate(
  pfns: Uint32Array,
  memory: GuestMemory,
  pages: BalloonPages,
  huge: HugePageTracker,
  bad: BadPfnCounts,
): { accepted: number; ranges: ReleaseRange[] } {
  let accepted = 0;
  const small: number[] = [];
  const hugeRanges: ReleaseRange[] = [];
  for (const pfn of pfns) {
    const gpa = pfn * BALLOON_PAGE_SIZE; // exact: below 2^44
    const region = pageRegion(memory, gpa);
    if (region === null) {
      bad.outside++;
      continue;
    }
    if (!pages.add(pfn)) {
      bad.repeated++;
      continue;
    }
    accepted++;
    if (region.pageSize <= BALLOON_PAGE_SIZE) {
      small.push(pfn);
      continue;
    }
    const hugeGpa = hugePageAt(region, gpa);
    if (huge.add(hugeGpa, region.pageSize / BALLOON_PAGE_SIZE)) {
      hugeRanges.push({ region, offset: hugeGpa! - region.guestPhysAddr, length: region.pageSize });
    }
  }
  const ranges: ReleaseRange[] = [];
  for (const run of coalescePfns(small)) {
    for (const piece of memory.resolveRange(run.first * BALLOON_PAGE_SIZE, run.pages * BALLOON_PAGE_SIZE)) {
      // Every page was checked to lie in a region; a run crossing into an adjacent region splits.
      if (piece.region !== null) ranges.push({ region: piece.region, offset: piece.guestPhysAddr - piece.region.guestPhysAddr, length: piece.length });
    }
  }
  return { accepted, ranges: ranges.concat(hugeRanges) };
}

/**
 * Deflate: take the buffer's PFNs out of the balloon. Nothing is written into the pages (a released
 * page faults back in as zeroes); a PFN not in the balloon is skipped as `not-inflated`. Returns the
 * pages taken out.
 */
export function applyDeflate(pfns: Uint32Array, memory: GuestMemory, pages: BalloonPages, huge: HugePageTracker, bad: BadPfnCounts): number {
  let taken = 0;
  for (const pfn of pfns) {
    if (!pages.delete(pfn)) {
      bad['not-inflated']++;
      continue;
    }
    taken++;
    const gpa = pfn * BALLOON_PAGE_SIZE;
    const region = pageRegion(memory, gpa);
    if (region !== null && region.pageSize > BALLOON_PAGE_SIZE) huge.delete(hugePageAt(region, gpa), region.pageSize / BALLOON_PAGE_SIZE);
  }
  return taken;
}
