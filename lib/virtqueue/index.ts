/**
 * The virtqueue layer: split and packed rings behind one {@link Virtqueue} interface. It knows guest
 * memory and the virtio ring rules, and nothing of vhost-user or of devices.
 */
import { PackedRing } from './packed-ring';
import { SplitRing } from './split-ring';
import type { Virtqueue, VirtqueueOptions } from './virtqueue';

export { DescriptorChain } from './descriptor-chain';
export { drainQueue, type DrainHandler, type DrainResult } from './drain';
export { HeldBuffers } from './held-buffers';
export { PackedRing } from './packed-ring';
export { SplitRing } from './split-ring';
export { vringNeedEvent } from './notify';
export type { QueueCounters, RingAddresses, Virtqueue, VirtqueueOptions } from './virtqueue';

/**
 * Build the device side of a queue in the layout the driver negotiated (VIRTIO_F_RING_PACKED).
 * Throws RingError VIRTQ_NO_RING when a ring area is unmapped or misaligned.
 */
export function createVirtqueue(options: VirtqueueOptions, packed: boolean): Virtqueue {
  return packed ? new PackedRing(options) : new SplitRing(options);
}
