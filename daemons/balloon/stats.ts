/**
 * The stats queue (virtio 1.2 §5.5.6.3, "Memory Statistics"): the driver puts one buffer of
 * statistics in the queue at start. The device keeps it (lib/virtqueue/held-buffers.ts) and, to get
 * fresh numbers, gives it back as used; the driver then refills it and adds it again ("the device
 * ... uses the buffer ... The driver ... MUST make the updated buffer available"). So each buffer
 * popped carries the numbers of the moment it was queued, and the device returns it every
 * `--stats-interval` seconds or when the control API asks.
 *
 * A buffer is a sequence of 10-byte entries: le16 tag, le64 value (struct virtio_balloon_stat).
 */
import { HeldBuffers } from '../../lib/virtqueue/held-buffers';
import type { DescriptorChain } from '../../lib/virtqueue/descriptor-chain';
import { drainQueue } from '../../lib/virtqueue/drain';
import type { Virtqueue } from '../../lib/virtqueue/virtqueue';

/** One entry: le16 tag, le64 value (packed). */
const STAT_ENTRY_SIZE = 10;
/** Entries read from one buffer at most: Linux sends 10 to 16; a longer buffer's rest is ignored. */
const MAX_STAT_ENTRIES = 64;

/**
 * Tags by number (virtio 1.2 §5.5.6.3 defines 0..9; Linux include/uapi/linux/virtio_balloon.h adds
 * 10..15), as the metric name suffix and status key, with the unit the spec gives.
 */
export const STAT_TAGS: readonly { name: string; help: string }[] = [
  { name: 'swap_in_bytes', help: 'Memory swapped in (VIRTIO_BALLOON_S_SWAP_IN)' },
  { name: 'swap_out_bytes', help: 'Memory swapped out (VIRTIO_BALLOON_S_SWAP_OUT)' },
  { name: 'major_faults', help: 'Major page faults (VIRTIO_BALLOON_S_MAJFLT)' },
  { name: 'minor_faults', help: 'Minor page faults (VIRTIO_BALLOON_S_MINFLT)' },
  { name: 'free_bytes', help: 'Memory not used at all (VIRTIO_BALLOON_S_MEMFREE)' },
  { name: 'total_bytes', help: 'Memory the guest can use (VIRTIO_BALLOON_S_MEMTOT)' },
  { name: 'available_bytes', help: 'Memory available for new applications without swapping (VIRTIO_BALLOON_S_AVAIL)' },
  { name: 'caches_bytes', help: 'Disk caches the guest can reclaim (VIRTIO_BALLOON_S_CACHES)' },
  { name: 'hugetlb_allocations', help: 'Successful hugetlb page allocations (VIRTIO_BALLOON_S_HTLB_PGALLOC)' },
  { name: 'hugetlb_failures', help: 'Failed hugetlb page allocations (VIRTIO_BALLOON_S_HTLB_PGFAIL)' },
  { name: 'oom_kills', help: 'Processes the OOM killer killed (VIRTIO_BALLOON_S_OOM_KILL)' },
  { name: 'alloc_stalls', help: 'Allocation stalls (VIRTIO_BALLOON_S_ALLOC_STALL)' },
  { name: 'async_scans', help: 'Pages scanned by kswapd (VIRTIO_BALLOON_S_ASYNC_SCAN)' },
  { name: 'direct_scans', help: 'Pages scanned by direct reclaim (VIRTIO_BALLOON_S_DIRECT_SCAN)' },
  { name: 'async_reclaims', help: 'Pages reclaimed by kswapd (VIRTIO_BALLOON_S_ASYNC_RECLAIM)' },
  { name: 'direct_reclaims', help: 'Pages reclaimed by direct reclaim (VIRTIO_BALLOON_S_DIRECT_RECLAIM)' },
];

/** The guest's latest numbers by tag name (only the tags it sent), and unknown tags seen. */
export interface GuestStats {
  values: Record<string, number>;
  unknownTags: number;
}

/**
 * Parse a stats buffer's device-readable bytes. Values are u64; past 2^53 they lose precision as
 * numbers, which gauges tolerate. A trailing partial entry is ignored.
 */
export function parseStats(bytes: Uint8Array): GuestStats {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const stats: GuestStats = { values: {}, unknownTags: 0 };
  const entries = Math.min(Math.floor(bytes.length / STAT_ENTRY_SIZE), MAX_STAT_ENTRIES);
  for (let i = 0; i < entries; i++) {
    const tag = view.getUint16(i * STAT_ENTRY_SIZE, true);
    const value = Number(view.getBigUint64(i * STAT_ENTRY_SIZE + 2, true));
    const known = STAT_TAGS[tag];
    if (known === undefined) stats.unknownTags++;
    else stats.values[known.name] = value;
  }
  return stats;
}

function readStats(chain: DescriptorChain): GuestStats {
  const bytes = new Uint8Array(Math.min(chain.readableLength, MAX_STAT_ENTRIES * STAT_ENTRY_SIZE));
  chain.read(0, bytes);
  return parseStats(bytes);
}

/** One run of the stats queue: holds the driver's buffer and hands it back on request. */
export class StatsQueue {
  private readonly held: HeldBuffers;

  /** `onStats` gets the numbers of every buffer the driver adds. */
  constructor(
    private readonly queue: Virtqueue,
    private readonly onStats: (stats: GuestStats) => void,
  ) {
    this.held = new HeldBuffers(queue);
  }

  /** Buffers held (0 or 1 with Linux). */
  get holding(): number {
    return this.held.count;
  }

  /** The driver added a buffer: read its numbers and keep it. */
  process(): void {
    drainQueue(this.queue, {
      handle: (chain) => {
        this.onStats(readStats(chain));
        this.held.hold(chain);
        return true;
      },
    });
  }

  /**
   * Ask for fresh numbers: give the oldest held buffer back (used length 0: the device writes
   * nothing) and notify the driver. False when no buffer is held (the driver has not refilled it yet).
   */
  request(): boolean {
    const chain = this.held.take();
    if (chain === null) return false;
    this.queue.pushUsed(chain, 0);
    this.queue.flush();
    return true;
  }

  /** The queue stops: give the held buffers back to the ring, so GET_VRING_BASE hands them over. */
  stop(): void {
    this.held.returnAll();
  }
}
