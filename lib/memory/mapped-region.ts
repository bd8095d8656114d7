/**
 * A guest memory region mmap'ed from the fd the front-end sent (SET_MEM_TABLE / ADD_MEM_REG).
 */
import fs from 'node:fs';

import { MADV_REMOVE, native, type Mapping } from '../../native';
import { MemoryError } from '../errors';
import { GuestMemory, type GuestRegion } from './guest-memory';

/** The smallest page size of the hosts vhostd runs on (x86-64; arm64 with 4 KiB pages). */
const BASE_PAGE_SIZE = 4096;

/** One region as described by VhostUserMemoryRegion, already validated. */
export interface MemoryRegionSpec {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
}

/** A mapped region of guest memory. */
export class MappedRegion implements GuestRegion {
  readonly guestPhysAddr: number;
  readonly size: number;
  readonly userAddr: number;
  readonly mappingOffset: number;
  /** Offset of the region in its fd (VhostUserMemoryRegion mmap_offset). */
  readonly mmapOffset: number;
  /** The memory fd, kept open: workers and the balloon device need it. */
  readonly fd: number;
  readonly pageSize: number;
  private readonly mapping: Mapping;
  private refs = 1;

  /** Maps `fd` and takes ownership of it (closed when the last reference goes, or here on failure). */
  constructor(spec: MemoryRegionSpec, fd: number) {
    this.guestPhysAddr = spec.guestPhysAddr;
    this.size = spec.size;
    this.userAddr = spec.userAddr;
    this.mmapOffset = spec.mmapOffset;
    this.fd = fd;
    try {
      this.pageSize = backingPageSize(fd);
      // mmap offsets must be aligned to the backing's page (a huge page on hugetlbfs); QEMU's
      // mmap_offset need not be.
      const mapStart = spec.mmapOffset - (spec.mmapOffset % this.pageSize);
      this.mappingOffset = spec.mmapOffset - mapStart;
      // Touching a page past the end of the file raises SIGBUS and kills the process, so a region
      // must lie inside its fd. (A front-end that shrinks the fd later can still do that; see
      // docs/security.md.)
      const fileSize = native.deviceSize(fd);
      if (spec.mmapOffset + spec.size > fileSize) {
        throw new MemoryError(
          'GUEST_ADDR_OVERFLOW',
          `region of ${spec.size} bytes at offset ${spec.mmapOffset} does not fit its ${fileSize}-byte fd`,
        );
      }
      this.mapping = native.mmap(fd, this.mappingOffset + spec.size, mapStart, true);
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  get views(): readonly Uint8Array[] {
    return this.mapping.views;
  }

  /** Host virtual address of the first byte of the region (not of the mapping). */
  get hostAddress(): number {
    return this.mapping.address + this.mappingOffset;
  }

  /**
   * Gives `[offset, offset + length)` of the region back to the host (the balloon's inflate): with
   * MADV_REMOVE (the default) the fd's pages are freed and read back as zeroes; MADV_DONTNEED only
   * drops this process's page table entries of a shared mapping. The range must be whole pages of
   * the region (huge pages on hugetlbfs: the kernel frees nothing smaller).
   */
  discard(offset: number, length: number, advice: number = MADV_REMOVE): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new MemoryError('GUEST_ADDR_OVERFLOW', `discard of ${length} bytes at ${offset}: not a byte range`);
    }
    if (offset + length > this.size) {
      throw new MemoryError(
        'GUEST_ADDR_OVERFLOW',
        `discard of ${length} bytes at ${offset} ends past the ${this.size}-byte region`,
      );
    }
    if ((this.mappingOffset + offset) % this.pageSize !== 0 || length % this.pageSize !== 0) {
      throw new MemoryError('GUEST_ADDR_OVERFLOW', `discard of ${length} bytes at ${offset}: not whole pages`);
    }
    native.madvise(this.mapping.id, this.mappingOffset + offset, length, advice);
  }

  retain(): this {
    this.refs++;
    return this;
  }

  release(): void {
    if (--this.refs === 0) {
      native.munmap(this.mapping.id);
      native.close(this.fd);
    }
  }
}

/**
 * The page size of the memory behind `fd`: fstat's st_blksize is the huge page size on hugetlbfs and
 * the page size on memfd and tmpfs. Anything else that is not a power of two of at least a page
 * (a file on a disk file system reports its block size) counts as one base page.
 */
function backingPageSize(fd: number): number {
  const { blksize } = fs.fstatSync(fd);
  return blksize >= BASE_PAGE_SIZE && Number.isInteger(Math.log2(blksize)) ? blksize : BASE_PAGE_SIZE;
}

/**
 * Map `specs[i]` from `fds[i]` into a {@link GuestMemory} that also keeps the regions of `kept`
 * (ADD_MEM_REG adds to the map it has). Takes every fd: on failure each one is closed, mapped or not,
 * and the regions mapped so far are released. The one mapping path of the main thread (SET_MEM_TABLE,
 * ADD_MEM_REG) and of queue workers.
 */
export function mapGuestMemory(specs: readonly MemoryRegionSpec[], fds: readonly number[], kept: readonly GuestRegion[] = []): GuestMemory {
  const mapped: MappedRegion[] = [];
  try {
    for (let i = 0; i < specs.length; i++) {
      try {
        mapped.push(new MappedRegion(specs[i]!, fds[i]!)); // takes the fd, closes it on failure
      } catch (err) {
        for (const fd of fds.slice(i + 1)) native.close(fd);
        throw err;
      }
    }
    return new GuestMemory([...kept, ...mapped]);
  } finally {
    for (const region of mapped) region.release(); // the GuestMemory holds its own references
  }
}
