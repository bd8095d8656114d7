/**
 * The one loop that empties a queue after a kick (virtio 1.2 §2.7.10, rust-vmm vhu_rng.rs):
 * ```
 * do {
 *   disableNotification → (ready? → pop → handle)* → endBatch → flush
 * } while (enableNotification())        // chains that came meanwhile: drain again
 * ```
 * Early publish: when the driver is waiting for the next used element (`driverWaiting`, EVENT_IDX
 * only) and more chains wait in the ring, the batch is ended right after the chain just handled
 * (`endBatch`, `flush`), so what completed so far is published and the driver is woken while the
 * rest of the batch is still being processed: it refills the ring in parallel instead of sleeping
 * until the whole batch is done.
 * While it is awake (its used_event behind what we published) the batch is flushed once, as always,
 * and flush's EVENT_IDX test still decides every notification. A flush that published nothing (the
 * handler's I/O is asynchronous) stops early ends for the rest of the pass, so asynchronous I/O is
 * not submitted chain by chain. A driver that answers the early call within the pass (it is waiting
 * again before the batch is done) wakes fast, and gets no more early calls for a while
 * (`EarlyPublishGate`, notify.ts): there an early call only adds a wakeup on both sides.
 *
 * Ring-error policy: a RingError from `pop`, or thrown by `handle` for a malformed chain, still lets
 * the chains before it finish (`endBatch`, then `flush` publishes what they completed), then
 * propagates, so the queue's owner marks the queue broken.
 *
 * Pausing: `ready` returning false leaves the next chain in the ring (a rate limit), `handle`
 * returning false stops after that chain (an asynchronous fill in flight). Either way notifications
 * stay disabled and the device calls `drainQueue` again when it can go on.
 */
import type { DescriptorChain } from './descriptor-chain';
import type { Virtqueue } from './virtqueue';

export interface DrainHandler {
  /** Asked before each pop: false pauses with the next chain left in the ring. */
  ready?(): boolean;
  /**
   * Take one chain: complete it (`pushUsed`) now or later. Return false to pause after it. Throw a
   * RingError for a malformed chain (nothing is completed for it).
   */
  handle(chain: DescriptorChain): boolean;
  /** End of a batch, before the flush (blk submits the I/O it staged). Runs on errors too. */
  endBatch?(): void;
}

/**
 * How a drain ended: 'idle', the ring was empty with notifications enabled; 'paused', the handler
 * paused and notifications are still disabled.
 */
export type DrainResult = 'idle' | 'paused';

/** Drain `queue` through `handler` (see the file comment). Throws what `pop` or `handle` threw. */
export function drainQueue(queue: Virtqueue, handler: DrainHandler): DrainResult {
  let paused = false;
  do {
    queue.disableNotification();
    let earlyPublish = queue.earlyPublish.open();
    let calledEarly = false;
    try {
      for (;;) {
        if (handler.ready !== undefined && !handler.ready()) {
          paused = true;
          break;
        }
        const chain = queue.pop();
        if (chain === null) break;
        if (!handler.handle(chain)) {
          paused = true;
          break;
        }
        // Only with more of the batch in the ring to overlap with (a single chain ends the batch anyway).
        if (earlyPublish && queue.driverWaiting() && queue.hasAvailable()) {
          if (calledEarly) {
            // It took the early completion and waits again before this batch is done: it wakes fast,
            // and calling it for every few completions would only add wakeups. Batch as usual.
            queue.earlyPublish.fast();
            earlyPublish = false;
          } else {
            // The counters, not flush's count: a device that completes in endBatch may flush there.
            const { batches, notifications } = queue.counters;
            handler.endBatch?.();
            queue.flush();
            earlyPublish = queue.counters.batches !== batches;
            calledEarly = queue.counters.notifications !== notifications;
          }
        }
      }
      if (earlyPublish && calledEarly) queue.earlyPublish.slow();
    } finally {
      handler.endBatch?.();
      queue.flush();
    }
  } while (!paused && queue.enableNotification());
  return paused ? 'paused' : 'idle';
}
