/**
 * A guest memory region mmap'ed from the fd the front-end sent (SET_MEM_TABLE / ADD_MEM_REG).
 */
import { native, type Mapping } from '../../native';
import { MemoryError } from '../errors';
import { GuestMemory, type GuestRegion } from './guest-memory';

const HUGE_PAGE_SIZE = 2 << 20;

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
  private readonly mapping: Mapping;
  private refs = 1;

  /** Maps `fd` and takes ownership of it (closed when the last reference goes, or here on failure). */
  constructor(spec: MemoryRegionSpec, fd: number) {
    this.guestPhysAddr = spec.guestPhysAddr;
    this.size = spec.size;
    this.userAddr = spec.userAddr;
    // mmap offsets must be page aligned (2 MiB covers hugetlbfs too); QEMU's mmap_offset need not be.
    const mapStart = spec.mmapOffset - (spec.mmapOffset % HUGE_PAGE_SIZE);
    this.mappingOffset = spec.mmapOffset - mapStart;
    this.mmapOffset = spec.mmapOffset;
    this.fd = fd;
    try {
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
