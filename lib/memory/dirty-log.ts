/**
 * The dirty page log of a live migration (vhost-user.rst, "Migration"): a bitmap shared with the
 * front-end, one bit per 4 KiB guest-physical page, which the back-end sets for every page it writes
 * while VHOST_F_LOG_ALL is negotiated. The front-end (QEMU) reads and clears it concurrently and sends
 * the marked pages again.
 *
 * vhost-user.rst: "page = addr / VHOST_LOG_PAGE; log[page / 8] |= 1 << page % 8 ... Use atomic
 * operations, as the log may be concurrently manipulated." The bitmap is a shared mapping of the fd of
 * SET_LOG_BASE; `Atomics.or` on a Uint8Array over it is a locked OR on the byte, so bits set by other
 * threads (queue workers map the same fd) and cleared by the front-end are never lost.
 *
 * Owns: the fd (kept open: queue workers map their own dups of it) and the mapping. Views are detached
 * before munmap, so a log closed under a stale user marks nothing instead of faulting.
 */
import { native, type Mapping } from '../../native';
import { MAP_VIEW_STRIDE } from '../../native/layout';
import { MemoryError } from '../errors';

/** vhost-user.rst: "#define VHOST_LOG_PAGE 0x1000". */
export const LOG_PAGE_SIZE = 0x1000;
/**
 * The largest log we map: one view of the native mapping. 1 GiB of bits covers 32 TiB of guest
 * physical addresses.
 */
export const MAX_LOG_SIZE = MAP_VIEW_STRIDE;

/** The log area of SET_LOG_BASE (VhostUserLog: u64 mmap_size, u64 mmap_offset), already checked. */
export interface DirtyLogArea {
  /** Bytes of bitmap. */
  size: number;
  /** Offset of the bitmap in the fd. */
  offset: number;
}

/** Bytes of bitmap that cover guest physical addresses `0 .. end` (exclusive). */
export function logBytesFor(end: number): number {
  return Math.ceil(Math.ceil(end / LOG_PAGE_SIZE) / 8);
}

export class DirtyLog implements DirtyLogArea {
  readonly size: number;
  readonly offset: number;
  readonly fd: number;
  private readonly mapping: Mapping;
  private readonly bits: Uint8Array;
  private closed = false;

  /**
   * Maps `area` of `fd` and takes ownership of the fd (closed here on failure). Throws MemoryError
   * GUEST_ADDR_OVERFLOW when the area does not lie inside the fd: touching a page past its end would
   * raise SIGBUS and kill the process.
   */
  constructor(area: DirtyLogArea, fd: number) {
    this.size = area.size;
    this.offset = area.offset;
    this.fd = fd;
    try {
      const fileSize = native.deviceSize(fd);
      if (area.size > fileSize || area.offset > fileSize - area.size) {
        throw new MemoryError('GUEST_ADDR_OVERFLOW', `dirty log of ${area.size} bytes at offset ${area.offset} does not fit its ${fileSize}-byte fd`);
      }
      // mmap offsets are page aligned; the log's need not be.
      const inPage = area.offset % LOG_PAGE_SIZE;
      this.mapping = native.mmap(fd, inPage + area.size, area.offset - inPage, true);
      this.bits = this.mapping.views[0]!.subarray(inPage, inPage + area.size);
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  /** Guest physical addresses the log covers: `0 .. coveredEnd` (exclusive). */
  get coveredEnd(): number {
    return this.size * 8 * LOG_PAGE_SIZE;
  }

  /**
   * Mark every page of `[gpa, gpa + length)` dirty. Pages past the end of the log are not marked (the
   * front-end sized the log for its memory map; checked at SET_LOG_BASE).
   */
  mark(gpa: number, length: number): void {
    if (length <= 0) return;
    const bits = this.bits;
    const pages = bits.length * 8; // 0 once the log is unmapped
    const last = Math.min(Math.floor((gpa + length - 1) / LOG_PAGE_SIZE), pages - 1);
    for (let page = Math.floor(gpa / LOG_PAGE_SIZE); page <= last; page++) {
      Atomics.or(bits, Math.floor(page / 8), 1 << page % 8);
    }
  }

  /** Unmap the log and close its fd. Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    native.munmap(this.mapping.id);
    native.close(this.fd);
  }
}
