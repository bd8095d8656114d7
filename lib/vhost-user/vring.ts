/**
 * One vring as the vhost-user protocol configures it: size, addresses, base, kick/call/err fds and
 * the enabled/started state, plus the {@link Virtqueue} built from them while the ring runs.
 *
 * vhost-user.rst, "Starting and stopping rings": a ring starts when it has a kick fd (and here also
 * memory, a size and addresses), stops on GET_VRING_BASE; it is processed only while enabled. Without
 * VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled from the start, with it SET_VRING_ENABLE decides.
 *
 * Owns: kickFd, callFd, errFd (closed on replace, stop or release), the kick watcher and the queue.
 */
import { native, POLL_READABLE, type NativeError, type Watcher } from '../../native';
import { VhostdError } from '../errors';
import type { GuestMemory } from '../memory/guest-memory';
import { createVirtqueue } from '../virtqueue';
import type { QueueCounters, RingAddresses, Virtqueue } from '../virtqueue/virtqueue';
import type { DeviceBackend } from './device-backend';
import type { Logger } from '../runtime/logger';

/** What a vring needs from its connection when it starts. */
export interface VringEnvironment {
  device: DeviceBackend;
  logger: Logger;
  memory: GuestMemory;
  packed: boolean;
  eventIdx: boolean;
  indirect: boolean;
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
  /** Kicks received (metrics). */
  kicks = 0;
  /** Times the ring was marked broken (metrics). */
  brokenCount = 0;
  /** Counters of queues that have stopped, so totals survive reconnects (metrics are monotonic). */
  private readonly retired: QueueCounters = { requests: 0, bytesRead: 0, bytesWritten: 0, notifications: 0, batches: 0 };
  private watcher: Watcher | null = null;
  private env: VringEnvironment | null = null;

  constructor(readonly index: number) {}

  get started(): boolean {
    return this.queue !== null;
  }

  /** Counters over every queue this vring has run, across connections. */
  totals(): QueueCounters {
    const live = this.queue?.counters;
    if (live === undefined) return { ...this.retired };
    const sum = { ...this.retired };
    for (const key of Object.keys(sum) as (keyof QueueCounters)[]) sum[key] += live[key];
    return sum;
  }

  /** Drop the queue, keeping its counters in the totals. */
  private retireQueue(): void {
    const live = this.queue?.counters;
    if (live !== undefined) {
      for (const key of Object.keys(this.retired) as (keyof QueueCounters)[]) this.retired[key] += live[key];
    }
    this.queue = null;
    this.env = null;
  }

  /** Replace the call or err fd, closing what was there. */
  setFd(slot: 'callFd' | 'errFd', fd: number): void {
    const old = this[slot];
    if (old >= 0) native.close(old);
    this[slot] = fd;
  }

  /** Replace the kick fd; a running ring moves its watcher to the new fd before the old one closes. */
  setKickFd(fd: number): void {
    this.watcher?.stop();
    this.watcher = null;
    if (this.kickFd >= 0) native.close(this.kickFd);
    this.kickFd = fd;
    if (this.started && fd >= 0) this.watchKick();
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
    const queue = createVirtqueue(
      {
        size: this.num,
        addresses: this.addresses,
        memory: env.memory,
        eventIdx: env.eventIdx,
        indirect: env.indirect,
        base: this.base ?? (env.packed ? PACKED_INITIAL_BASE : 0),
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

  /** Stop the ring (GET_VRING_BASE, reset, disconnect): wait for the device, then report the base. */
  async stop(): Promise<number | null> {
    this.setKickFd(-1);
    const queue = this.queue;
    if (queue !== null && this.env !== null) {
      await this.env.device.stopQueue?.(this.index);
      this.base = queue.base();
    }
    this.retireQueue();
    return this.base;
  }

  /** The memory table changed under a running ring. */
  setMemory(memory: GuestMemory): void {
    if (this.env !== null) this.env.memory = memory;
    if (this.queue === null || this.broken) return;
    try {
      this.queue.setMemory(memory);
    } catch (err) {
      this.markBroken(err);
    }
  }

  setEnabled(enabled: boolean): void {
    this.enabled = enabled;
    if (enabled) this.process();
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
    this.kicks++;
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

  private signalCall(): void {
    signal(this.callFd);
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
    signal(this.errFd);
  }
}

/**
 * Write 1 to an eventfd the front-end gave us (validated as an eventfd). EAGAIN means its counter is
 * saturated, so the front-end has a notification pending anyway: nothing is lost by dropping ours.
 */
function signal(fd: number): void {
  if (fd < 0) return;
  try {
    native.eventfdWrite(fd, 1);
  } catch (err) {
    if ((err as NativeError).code !== 'EAGAIN') throw err;
  }
}
