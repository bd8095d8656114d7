/**
 * Free page reporting (virtio 1.2 §5.5.6.5, VIRTIO_BALLOON_F_REPORTING): the driver offers ranges of
 * memory it has free (Linux: blocks of pageblock order, 2 or 4 MiB) as device-writable buffers on
 * reporting_vq; the device may release them and uses the buffer once it is done ("the device ...
 * MAY discard the contents of the pages and MUST use the buffer"). The device writes nothing into the
 * buffers; their guest addresses are the message.
 *
 * Unlike inflate, the pages stay the guest's: it reuses them without telling the device, and they
 * fault back in as zeroes. Only whole pages of the backing are released (whole huge pages on
 * hugetlbfs), so a range is rounded inward in its memory fd. The ring code already refused a
 * buffer outside guest memory (a RingError breaks the queue), so every segment lies in a region.
 */
import type { GuestMemory } from '../../lib/memory/guest-memory';
import type { DescriptorChain } from '../../lib/virtqueue/descriptor-chain';
import type { ReleaseRange } from './inflate-deflate';

/**
 * The host ranges behind the device-writable segments of `chain` (readable segments, which the
 * driver does not send, are ignored). A segment split across view strides or adjacent regions comes
 * as several segments; each is resolved on its own.
 */
export function planReport(chain: DescriptorChain, memory: GuestMemory): ReleaseRange[] {
  const ranges: ReleaseRange[] = [];
  for (let i = chain.readableSegments; i < chain.segments; i++) {
    const gpa = memory.guestAddress(chain.viewId[i]!, chain.offset[i]!);
    for (const piece of memory.resolveRange(gpa, chain.length[i]!)) {
      if (piece.region === null) continue; // not reached: the segment was translated from a region
      // Round inward to whole backing pages, aligned in the fd (mmap offsets need not be).
      const page = piece.region.pageSize;
      const fileStart = piece.fileOffset;
      const fileEnd = fileStart + piece.length;
      const start = Math.ceil(fileStart / page) * page;
      const end = Math.floor(fileEnd / page) * page;
      if (end <= start) continue;
      ranges.push({ region: piece.region, offset: start - piece.region.mmapOffset, length: end - start });
    }
  }
  return ranges;
}
