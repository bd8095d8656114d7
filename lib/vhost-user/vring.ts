/**
 * One vring as the vhost-user protocol configures it: size, addresses, base, kick/call/err fds and
 * the enabled/started state, plus the {@link Virtqueue} built from them while the ring runs.
 *
 * vhost-user.rst, "Starting and stopping rings": a ring starts when it has a kick fd (and here also
 * memory, a size and addresses), stops on GET_VRING_BASE; it is processed only while enabled. Without
 * VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled from the start, with it SET_VRING_ENABLE decides.
 *
 * Owns: kickFd, callFd, errFd (closed on replace, stop or release), the kick watcher and the queue.
 *
 * With queue workers (`env.workers`, `--threads`), the queue runs in a worker thread instead: the
 * vring validates the ring addresses here (same errors as in-process), hands the worker dups of the
 * memory, kick and call fds, forwards kick/call/enable/memory changes, asks it to stop, and keeps
 * the err fd (the worker reports ring errors back). See lib/runtime/queue-workers.ts.
 */
import { native, POLL_READABLE, type NativeError, type Watcher } from '../../native';
import { VhostdError } from '../errors';
import type { GuestMemory } from '../memory/guest-memory';
import { createVirtqueue } from '../virtqueue';
import type { QueueCounters, RingAddresses, Virtqueue } from '../virtqueue/virtqueue';
import type { DeviceBackend } from './device-backend';
import type { Logger } from '../runtime/logger';
import type { QueueWorkerPool, RemoteQueue } from '../runtime/queue-workers';

/** What a vring needs from its connection when it starts. */
export interface VringEnvironment {
  device: DeviceBackend;
  logger: Logger;
  memory: GuestMemory;
  packed: boolean;
  eventIdx: boolean;
  indirect: boolean;
  /** Run the queue in a worker thread of this pool instead of on this event loop. */
  workers?: QueueWorkerPool;
  /** Negotiated virtio features (for the worker's device instance). */
  features?: bigint;
}

/**
 * A fresh packed ring: avail and used indexes 0 with both wrap counters 1 (virtio 1.2 §2.8.1), in the
 * GET/SET_VRING_BASE layout (bit 15 avail wrap, bit 31 used wrap).
 */
const PACKED_INITIAL_BASE = 0x8000_8000;

export class Vring {
  num = 0;
  addresses: RingAddresses | null = null;
  /** SET_VRING_BASE value, or null for a ring that was never given one (start from the beginning). */
  base: number | null = null;
  kickFd = -1;
  callFd = -1;
  errFd = -1;
  enabled = false;
  /** Set when the driver broke a ring rule; the ring is then ignored until reset. */
  broken = false;
  queue: Virtqueue | null = null;
  /** Kicks received on this thread plus those of retired worker queues. */
  private kickCount = 0;
  /** Times the ring was marked broken (metrics). */
  brokenCount = 0;
  /** Counters of queues that have stopped, so totals survive reconnects (metrics are monotonic). */
  private readonly retired: QueueCounters = { requests: 0, bytesRead: 0, bytesWritten: 0, notifications: 0, batches: 0 };
  private watcher: Watcher | null = null;
  private env: VringEnvironment | null = null;
  /** The queue when it runs in a worker thread. */
  private remote: RemoteQueue | null = null;

  constructor(readonly index: number) {}

  get started(): boolean {
    return this.queue !== null || this.remote !== null;
  }

  /** Kicks received (metrics), across connections. */
  get kicks(): number {
    return this.kickCount + (this.remote?.kicks() ?? 0);
  }

  /** Counters of the running queue, wherever it runs. */
  private liveCounters(): QueueCounters | undefined {
    if (this.remote !== null) return this.remote.queueCounters();
    return this.queue?.counters;
  }

  /** Counters over every queue this vring has run, across connections. */
  totals(): QueueCounters {
    const live = this.liveCounters();
    if (live === undefined) return { ...this.retired };
    const sum = { ...this.retired };
    for (const key of Object.keys(sum) as (keyof QueueCounters)[]) sum[key] += live[key];
    return sum;
  }

  /** Drop the queue, keeping its counters in the totals. */
  private retireQueue(): void {
    const live = this.liveCounters();
    if (live !== undefined) {
      for (const key of Object.keys(this.retired) as (keyof QueueCounters)[]) this.retired[key] += live[key];
    }
    if (this.remote !== null) this.kickCount += this.remote.kicks();
    this.queue = null;
    this.remote = null;
    this.env = null;
  }

  /** Replace the call or err fd, closing what was there. */
  setFd(slot: 'callFd' | 'errFd', fd: number): Promise<void> | undefined {
    const old = this[slot];
    if (old >= 0) native.close(old);
    this[slot] = fd;
    return slot === 'callFd' ? this.remote?.setCallFd(fd) : undefined;
  }

  /** Replace the kick fd; a running ring moves its watcher to the new fd before the old one closes. */
  setKickFd(fd: number): Promise<void> | undefined {
    this.watcher?.stop();
    this.watcher = null;
    if (this.kickFd >= 0) native.close(this.kickFd);
    this.kickFd = fd;
    if (this.remote !== null) return fd >= 0 ? this.remote.setKickFd(fd) : undefined;
    if (this.started && fd >= 0) this.watchKick();
    return undefined;
  }

  private watchKick(): void {
    this.watcher = native.watch(this.kickFd, POLL_READABLE, () => this.onKick());
  }

  /** Start processing if everything is in place. Throws (ring addresses unmapped) for the caller to report. */
  startIfReady(env: VringEnvironment): void {
    if (this.started || this.kickFd < 0 || this.addresses === null || this.num === 0 || env.memory.regions.length === 0) {
      return;
    }
    this.env = env;
    this.broken = false;
    const base = this.base ?? (env.packed ? PACKED_INITIAL_BASE : 0);
    if (env.workers !== undefined) {
      this.startRemote(env, env.workers, base);
      return;
    }
    const queue = createVirtqueue(
      {
        size: this.num,
        addresses: this.addresses,
        memory: env.memory,
        eventIdx: env.eventIdx,
        indirect: env.indirect,
        base,
        notify: () => this.signalCall(),
      },
      env.packed,
    );
    this.queue = queue;
    env.device.startQueue?.(this.index, queue);
    this.watchKick();
    // A kick may have been written before we started watching; processing an empty ring is harmless.
    this.process();
  }

  /** Start the queue in a worker; ring addresses are checked here first, so errors are the same. */
  private startRemote(env: VringEnvironment, workers: QueueWorkerPool, base: number): void {
    const options = { size: this.num, addresses: this.addresses!, memory: env.memory, eventIdx: env.eventIdx, indirect: env.indirect, base };
    try {
      createVirtqueue({ ...options, notify: () => undefined }, env.packed); // throws VIRTQ_NO_RING / VIRTQ_BAD_BASE
      this.remote = workers.start(
        { ...options, index: this.index, packed: env.packed, features: env.features ?? 0n, enabled: this.enabled, kickFd: this.kickFd, callFd: this.callFd },
        (message, code) => this.reportBroken(message, code),
      );
    } catch (err) {
      this.env = null;
      throw err;
    }
  }

  /** Stop the ring (GET_VRING_BASE, reset, disconnect): wait for the device, then report the base. */
  async stop(): Promise<number | null> {
    this.setKickFd(-1);
    if (this.remote !== null) {
      const base = await this.remote.stop();
      if (base !== null) this.base = base;
      this.retireQueue();
      return this.base;
    }
    const queue = this.queue;
    if (queue !== null && this.env !== null) {
      await this.env.device.stopQueue?.(this.index);
      this.base = queue.base();
    }
    this.retireQueue();
    return this.base;
  }

  /** The memory table changed under a running ring (a worker's queue: resolves once it remapped). */
  setMemory(memory: GuestMemory): Promise<void> | undefined {
    if (this.env !== null) this.env.memory = memory;
    if (this.remote !== null && !this.broken) {
      try {
        return this.remote.setMemory(memory);
      } catch (err) {
        this.markBroken(err);
      }
      return undefined;
    }
    if (this.queue === null || this.broken) return undefined;
    try {
      this.queue.setMemory(memory);
    } catch (err) {
      this.markBroken(err);
    }
    return undefined;
  }

  /** SET_VRING_ENABLE (a worker's queue: resolves once it applied the change). */
  setEnabled(enabled: boolean): Promise<void> | undefined {
    this.enabled = enabled;
    if (this.remote !== null) return this.remote.setEnabled(enabled);
    if (enabled) this.process();
    return undefined;
  }

  /** Close every fd and forget the configuration (disconnect or RESET_OWNER / RESET_DEVICE). */
  release(): void {
    this.setKickFd(-1);
    this.retireQueue();
    this.setFd('callFd', -1);
    this.setFd('errFd', -1);
    this.num = 0;
    this.addresses = null;
    this.base = null;
    this.enabled = false;
    this.broken = false;
  }

  private onKick(): void {
    this.kickCount++;
    native.eventfdRead(this.kickFd);
    this.process();
  }

  private process(): void {
    const queue = this.queue;
    const env = this.env;
    if (queue === null || env === null || !this.enabled || this.broken) return;
    try {
      env.device.processQueue(this.index, queue);
    } catch (err) {
      this.markBroken(err);
    }
  }

  /** The worker running this queue found it broken. */
  private reportBroken(message: string, code: string | undefined): void {
    if (this.remote === null || this.broken) return;
    this.broken = true;
    this.env?.logger.error(`queue ${this.index} broken: ${message}`, { code, queue: this.index });
    this.brokenCount++;
    signalEventfd(this.errFd);
  }

  private signalCall(): void {
    signalEventfd(this.callFd);
  }

  /**
   * A driver violation (or a device bug): stop using the ring, tell the front-end through the err fd,
   * keep serving the other rings and the connection.
   */
  private markBroken(err: unknown): void {
    this.broken = true;
    if (err instanceof VhostdError) {
      this.env?.logger.error(`queue ${this.index} broken: ${err.message}`, { code: err.code, queue: this.index });
    } else {
      this.env?.logger.error(`queue ${this.index} broken by an internal error: ${(err as Error)?.stack ?? String(err)}`, {
        queue: this.index,
      });
    }
    this.brokenCount++;
    signalEventfd(this.errFd);
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
