/**
 * One running queue, wherever it runs: the {@link Virtqueue} over guest memory, the kick watch, the
 * call signalling, the enabled and broken states, the memory switch and the stop. The main thread
 * (`Vring`, for queues it runs itself) and queue worker threads (queue-worker-main.ts) both drive
 * their queues through this class, so both paths behave the same.
 *
 * Owns: the kick watcher and the queue. Not the fds: the caller owns the kick and call fds (the
 * vring the front-end's, a worker its dups) and closes the old one after a `setKickFd`/`setCallFd`.
 * Not the memory either: the caller closes a map after `setMemory` switched away from it.
 */
import { native, POLL_READABLE, type NativeError, type Watcher } from '../../native';
import { VhostdError } from '../errors';
import type { GuestMemory } from '../memory/guest-memory';
import { createVirtqueue } from '../virtqueue';
import type { Virtqueue, VirtqueueOptions } from '../virtqueue/virtqueue';
import type { DeviceBackend } from './device-backend';

export interface QueueDriverOptions extends Omit<VirtqueueOptions, 'notify'> {
  index: number;
  /** Negotiated VIRTIO_F_RING_PACKED. */
  packed: boolean;
  /** The device instance that processes this queue. */
  device: DeviceBackend;
  kickFd: number;
  /** -1: no call fd (the driver polls). */
  callFd: number;
  enabled: boolean;
  /** The ring broke (a driver violation or a device bug): the owner tells the front-end (err fd). */
  onBroken(message: string, code: string | undefined): void;
  /** After each pass of the device over the ring (a worker publishes its counters). */
  afterProcess?(): void;
}

export class QueueDriver {
  readonly index: number;
  readonly queue: Virtqueue;
  kickFd: number;
  callFd: number;
  enabled: boolean;
  /** Set when the ring broke; the queue is then left alone until it is stopped. */
  broken = false;
  /** Kicks received. */
  kicks = 0;
  private watcher: Watcher | null = null;
  private readonly device: DeviceBackend;
  private readonly options: QueueDriverOptions;

  /** Builds the queue; throws RingError (VIRTQ_NO_RING, VIRTQ_BAD_BASE) when the ring is unusable. */
  constructor(options: QueueDriverOptions) {
    this.options = options;
    this.index = options.index;
    this.device = options.device;
    this.kickFd = options.kickFd;
    this.callFd = options.callFd;
    this.enabled = options.enabled;
    this.queue = createVirtqueue({ ...options, notify: () => signalEventfd(this.callFd) }, options.packed);
  }

  /** Hand the queue to the device and start watching kicks. */
  start(): void {
    this.device.startQueue?.(this.index, this.queue);
    if (this.enabled) this.device.queueEnabled?.(this.index, true);
    this.watch();
    // A kick may have been written before the watch began; processing an empty ring is harmless.
    this.process();
  }

  /** Watch a new kick fd (-1: none); the caller closes the old one afterwards. */
  setKickFd(fd: number): void {
    this.unwatch();
    this.kickFd = fd;
    this.watch();
  }

  /** Signal a new call fd (-1: none); the caller closes the old one afterwards. */
  setCallFd(fd: number): void {
    this.callFd = fd;
  }

  /** SET_VRING_ENABLE: tell the device about a change, and drain what waited while disabled. */
  setEnabled(enabled: boolean): void {
    if (enabled === this.enabled) return;
    this.enabled = enabled;
    this.device.queueEnabled?.(this.index, enabled);
    if (enabled) this.process();
  }

  /** The memory table changed: the ring areas are translated again in `memory`. */
  setMemory(memory: GuestMemory): void {
    if (this.broken) return;
    try {
      this.queue.setMemory(memory);
    } catch (err) {
      this.markBroken(err);
    }
  }

  /** Stop watching, wait until the device has nothing of this queue in flight, return the ring base. */
  async stop(): Promise<number> {
    this.unwatch();
    await this.device.stopQueue?.(this.index);
    return this.queue.base();
  }

  private watch(): void {
    if (this.kickFd >= 0) this.watcher = native.watch(this.kickFd, POLL_READABLE, () => this.onKick());
  }

  private unwatch(): void {
    this.watcher?.stop();
    this.watcher = null;
  }

  private onKick(): void {
    this.kicks++;
    native.eventfdRead(this.kickFd);
    this.process();
  }

  private process(): void {
    if (!this.enabled || this.broken) return;
    try {
      this.device.processQueue(this.index, this.queue);
    } catch (err) {
      this.markBroken(err);
    }
    this.options.afterProcess?.();
  }

  /** Stop using the ring; the other rings and the connection keep going. */
  markBroken(err: unknown): void {
    this.broken = true;
    if (err instanceof VhostdError) this.options.onBroken(err.message, err.code);
    else this.options.onBroken(`internal error: ${(err as Error)?.stack ?? String(err)}`, undefined);
  }
}

/**
 * Write 1 to an eventfd the front-end gave us (validated as an eventfd). EAGAIN means its counter is
 * saturated, so the front-end has a notification pending anyway: nothing is lost by dropping ours.
 */
export function signalEventfd(fd: number): void {
  if (fd < 0) return;
  try {
    native.eventfdWrite(fd, 1);
  } catch (err) {
    if ((err as NativeError).code !== 'EAGAIN') throw err;
  }
}
