/**
 * One running queue, wherever it runs: the {@link Virtqueue} over guest memory, the kick watch, the
 * call signalling, the enabled and broken states, the memory switch and the stop. The main thread
 * (`Vring`, for queues it runs itself) and queue worker threads (queue-worker-main.ts) both drive
 * their queues through this class, so both paths behave the same.
 *
 * Polling (`pollUs` > 0), as QEMU's IOThread adaptive polling (util/aio-posix.c, poll-max-ns): after a
 * batch that did work the driver keeps notifications off and watches the ring (and, through the
 * device's `pollCompletions`, its finished I/O) for up to a window of time, so a request the driver
 * adds meanwhile is served without a kick and a wakeup. The window adapts to the guest: it grows
 * (doubling, up to `pollUs`) when a kick came soon after polling gave up, which a longer window
 * would have caught, and halves when the guest was quiet for longer than `pollUs`; polling that
 * finds nothing ends with notifications enabled and costs nothing until the next kick. A poll also
 * ends while chains are in flight (I/O a kernel worker may be doing: on a 2-CPU machine a spin takes
 * the CPU that worker needs); their completion event wakes the queue. Node runs
 * every queue of a thread and the control socket on one event loop, so a poll spins for at most
 * {@link POLL_SLICE_US} at a time and yields (setImmediate) between rounds.
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
  /** Longest adaptive poll window in microseconds after a batch; 0 or absent: never poll. */
  pollUs?: number;
}

/** What polling did, for metrics. */
export interface PollCounters {
  /** Poll rounds that found work (chains or finished I/O) without a kick. */
  hits: number;
  /** Seconds spent in poll rounds. */
  seconds: number;
}

/** Longest synchronous spin of one poll round before the event loop gets a turn (µs). */
export const POLL_SLICE_US = 50;
/** The window a poll starts from when it grows from nothing (QEMU's 4 µs). */
const POLL_INITIAL_US = 4;

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
  /** Poll rounds that found work (chains or finished I/O) without a kick. */
  pollHits = 0;
  /** Seconds spent spinning in poll rounds. */
  pollSeconds = 0;
  private watcher: Watcher | null = null;
  private readonly device: DeviceBackend;
  private readonly options: QueueDriverOptions;
  /** Largest poll window (ms, performance.now units); 0: polling is off. */
  private readonly pollMaxMs: number;
  /** The adaptive window (ms). */
  private pollWindowMs: number;
  /** A poll is under way: notifications are off and a round is scheduled. */
  private polling = false;
  private pollRound: NodeJS.Immediate | null = null;
  /** Time spun since the poll last found work (ms). */
  private pollSpentMs = 0;
  /** When the queue last went to sleep waiting for a kick (ms), or -1. */
  private sleptAt = -1;

  /** Builds the queue; throws RingError (VIRTQ_NO_RING, VIRTQ_BAD_BASE) when the ring is unusable. */
  constructor(options: QueueDriverOptions) {
    this.options = options;
    this.index = options.index;
    this.device = options.device;
    this.kickFd = options.kickFd;
    this.callFd = options.callFd;
    this.enabled = options.enabled;
    this.pollMaxMs = Math.max(0, options.pollUs ?? 0) / 1000;
    this.pollWindowMs = this.pollMaxMs;
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

  /**
   * Stop watching, wait until the device has nothing of this queue in flight, return the ring base.
   * `baseTaken`: the front-end asked for the base (GET_VRING_BASE) and restarts the ring from it, so
   * the inflight record is not needed any more (Virtqueue.clearInflight). Otherwise (disconnect,
   * daemon exit) the record stays: it is where the next daemon finds a packed ring's position.
   */
  async stop(baseTaken = false): Promise<number> {
    this.unwatch();
    this.endPoll(false);
    await this.device.stopQueue?.(this.index);
    if (baseTaken) this.queue.clearInflight();
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
    if (this.sleptAt >= 0) this.adaptWindow(performance.now() - this.sleptAt);
    this.process();
  }

  /** One pass of the device over the ring; a pass that took chains goes on polling. */
  private process(): void {
    if (!this.enabled || this.broken) return;
    const before = this.queue.counters.requests;
    this.runDevice();
    if (this.polling || this.broken || this.queue.counters.requests === before) return;
    if (this.pollMaxMs === 0 || this.pollWindowMs === 0) {
      this.sleptAt = performance.now();
      return;
    }
    this.sleptAt = -1;
    this.polling = true;
    this.pollSpentMs = 0;
    this.queue.disableNotification();
    this.schedulePoll();
  }

  private runDevice(): void {
    try {
      this.device.processQueue(this.index, this.queue);
    } catch (err) {
      this.markBroken(err);
    }
    // The drain ended with notifications on; while polling they stay off (the poll sees new chains).
    if (this.polling && !this.broken) this.queue.disableNotification();
    this.options.afterProcess?.();
  }

  private schedulePoll(): void {
    this.pollRound = setImmediate(() => this.poll());
  }

  /**
   * One poll round: spin until the ring has chains or the device finished I/O, for at most the rest of
   * the window and one slice. Work found: serve it and poll on from a full window. Window used up:
   * notifications on again, and sleep.
   */
  private poll(): void {
    this.pollRound = null;
    if (!this.enabled || this.broken) {
      this.endPoll(false);
      return;
    }
    const start = performance.now();
    const deadline = start + Math.min(this.pollWindowMs - this.pollSpentMs, POLL_SLICE_US / 1000);
    let found = false;
    let now = start;
    do {
      if (this.queue.hasAvailable()) {
        const before = this.queue.counters.requests;
        this.runDevice();
        found = this.queue.counters.requests !== before;
        if (this.broken) break;
      }
      if (this.device.pollCompletions !== undefined && this.device.pollCompletions(this.index) > 0) found = true;
      now = performance.now();
      // Chains in flight wait on I/O that a kernel worker may be doing (io_uring punts what cannot
      // complete at once): spinning would take the CPU it needs. Their completion event wakes us.
    } while (!found && now < deadline && this.queue.inFlight === 0);
    this.pollSeconds += (now - start) / 1000;
    if (this.broken) {
      this.endPoll(false);
    } else if (found) {
      this.pollHits++;
      this.pollSpentMs = 0;
      this.schedulePoll();
    } else if ((this.pollSpentMs += now - start) < this.pollWindowMs && this.queue.inFlight === 0) {
      this.schedulePoll();
    } else {
      this.endPoll(true);
    }
  }

  /**
   * Stop polling. `sleep`: turn notifications back on and wait for a kick; chains that came before the
   * driver saw that are served now (virtio 1.2 §2.7.10: re-check after enabling).
   */
  private endPoll(sleep: boolean): void {
    if (this.pollRound !== null) clearImmediate(this.pollRound);
    this.pollRound = null;
    if (!this.polling) return;
    this.polling = false;
    if (!sleep) return;
    this.sleptAt = performance.now();
    if (this.queue.enableNotification()) this.process();
  }

  /**
   * QEMU's adaptive rule (aio-posix.c adjust_polling_time): the queue slept `sleptMs` before a kick. A
   * kick within the largest window would have been caught by a longer poll: grow. A longer quiet
   * spell: halve, down to not polling at all.
   */
  private adaptWindow(sleptMs: number): void {
    this.sleptAt = -1;
    if (this.pollMaxMs === 0) return;
    if (sleptMs <= this.pollWindowMs) return;
    if (sleptMs <= this.pollMaxMs) {
      this.pollWindowMs = Math.min(this.pollMaxMs, this.pollWindowMs === 0 ? POLL_INITIAL_US / 1000 : this.pollWindowMs * 2);
    } else {
      this.pollWindowMs = this.pollWindowMs / 2 < POLL_INITIAL_US / 1000 ? 0 : this.pollWindowMs / 2;
    }
  }

  /** Stop using the ring; the other rings and the connection keep going. */
  markBroken(err: unknown): void {
    this.broken = true;
    this.endPoll(false);
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
