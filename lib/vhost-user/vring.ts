/**
 * One vring as the vhost-user protocol configures it: size, addresses, base, kick/call/err fds and
 * the enabled/started state, plus the {@link Virtqueue} built from them while the ring runs.
 *
 * vhost-user.rst, "Starting and stopping rings": a ring starts when it has a kick fd (and here also
 * memory, a size and addresses), stops on GET_VRING_BASE; it is processed only while enabled. Without
 * VHOST_USER_F_PROTOCOL_FEATURES a ring is enabled from the start, with it SET_VRING_ENABLE decides.
 *
 * Owns: kickFd, callFd, errFd (closed on replace, stop or release) and the running queue: a
 * {@link QueueDriver} on this thread, or a {@link RemoteQueue} when the device puts the queue in a
 * group (`queueGroup`) and the daemon runs queue workers (`env.workers`, `--threads`). Then the vring
 * validates the ring addresses here (same errors as on this thread), hands the worker dups of the
 * memory, kick and call fds, forwards kick/call/enable/memory changes, asks it to stop, and keeps
 * the err fd (the worker, which runs the same QueueDriver, reports ring errors back). See
 * lib/runtime/queue-workers.ts. With an inflight area (SET_INFLIGHT_FD) every ring, split or packed,
 * here or in a worker (which maps its own part of the area), tracks what it has in flight.
 */
import { native } from '../../native';
import type { DirtyLog } from '../memory/dirty-log';
import type { GuestMemory } from '../memory/guest-memory';
import { createVirtqueue } from '../virtqueue';
import type { RingLogSpec } from '../virtqueue/ring-log';
import type { QueueCounters, RingAddresses, Virtqueue } from '../virtqueue/virtqueue';
import type { DeviceBackend } from './device-backend';
import type { InflightArea } from './inflight-region';
import { QueueDriver, signalEventfd, type PollCounters } from './queue-driver';
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
  /** The inflight area (SET_INFLIGHT_FD): the queue tracks what it has in flight in its part. */
  inflight?: InflightArea;
  /** The queue's poll window limit, µs (QueueDriver `pollUs`). */
  pollUs?: number;
}

/**
 * A fresh packed ring: avail and used indexes 0 with both wrap counters 1 (virtio 1.2 §2.8.1), in the
 * GET/SET_VRING_BASE layout (bit 15 avail wrap, bit 31 used wrap).
 */
const PACKED_INITIAL_BASE = 0x8000_8000;

export class Vring {
  num = 0;
  addresses: RingAddresses | null = null;
  /** SET_VRING_ADDR log_guest_addr when VHOST_VRING_F_LOG is set (live migration), else null. */
  logGuestAddr: number | null = null;
  /** SET_VRING_BASE value, or null for a ring that was never given one (start from the beginning). */
  base: number | null = null;
  kickFd = -1;
  callFd = -1;
  errFd = -1;
  enabled = false;
  /** Set when the driver broke a ring rule; the ring is then ignored until reset. */
  broken = false;
  /** Kicks of queues that have stopped. */
  private kickCount = 0;
  private retiredPolls: PollCounters = { hits: 0, seconds: 0 };
  /** Times the ring was marked broken (metrics). */
  brokenCount = 0;
  /** Counters of queues that have stopped, so totals survive reconnects (metrics are monotonic). */
  private readonly retired: QueueCounters = { requests: 0, bytesRead: 0, bytesWritten: 0, notifications: 0, batches: 0 };
  private logger: Logger | null = null;
  /** The queue when it runs on this thread. */
  private driver: QueueDriver | null = null;
  /** The queue when it runs in a worker thread. */
  private remote: RemoteQueue | null = null;
  /** The connection's dirty page log while logging is on (live migration). */
  private dirtyLog: DirtyLog | null = null;

  constructor(readonly index: number) {}

  get started(): boolean {
    return this.driver !== null || this.remote !== null;
  }

  /** The queue while it runs on this thread. */
  get queue(): Virtqueue | null {
    return this.driver?.queue ?? null;
  }

  /** Kicks received (metrics), across connections. */
  get kicks(): number {
    return this.kickCount + (this.driver?.kicks ?? this.remote?.kicks() ?? 0);
  }

  /** Poll rounds that found work and seconds spent polling (metrics), across connections. */
  get polls(): PollCounters {
    const live = this.remote?.polls() ?? (this.driver !== null ? { hits: this.driver.pollHits, seconds: this.driver.pollSeconds } : undefined);
    if (live === undefined) return { ...this.retiredPolls };
    return { hits: this.retiredPolls.hits + live.hits, seconds: this.retiredPolls.seconds + live.seconds };
  }

  /** Counters of the running queue, wherever it runs. */
  private liveCounters(): QueueCounters | undefined {
    return this.remote?.queueCounters() ?? this.driver?.queue.counters;
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
    this.kickCount = this.kicks;
    this.retiredPolls = this.polls;
    this.driver = null;
    this.remote = null;
  }

  /**
   * Replace the call or err fd, closing what was there. A running ring's new call fd is signalled
   * once the queue uses it: chains it completed meanwhile were signalled on the old fd, which the
   * front-end may no longer watch (QEMU swaps its masked notifier for the irqfd right after the rings
   * start, and after a reconnect a request the guest sent while the back-end was away completes in
   * between: the guest would wait for it forever). libvhost-user does the same ("in case of I/O hang
   * after reconnecting"); an extra interrupt costs the driver one look at the used ring.
   */
  setFd(slot: 'callFd' | 'errFd', fd: number): Promise<void> | undefined {
    const old = this[slot];
    this[slot] = fd;
    if (slot === 'callFd') this.driver?.setCallFd(fd);
    if (old >= 0) native.close(old);
    if (slot !== 'callFd') return undefined;
    if (this.driver !== null) signalEventfd(fd);
    return this.remote?.setCallFd(fd).then(() => {
      if (this.callFd === fd) signalEventfd(fd);
    });
  }

  /** Replace the kick fd; a running ring moves its watch to the new fd before the old one closes. */
  setKickFd(fd: number): Promise<void> | undefined {
    const old = this.kickFd;
    this.kickFd = fd;
    this.driver?.setKickFd(fd);
    if (old >= 0) native.close(old);
    return this.remote !== null && fd >= 0 ? this.remote.setKickFd(fd) : undefined;
  }

  /**
   * Start processing if everything is in place: on this thread, or in the worker thread of the
   * queue's group. Throws (ring addresses unmapped) for the caller to report.
   */
  startIfReady(env: VringEnvironment): void {
    if (this.started || this.kickFd < 0 || this.addresses === null || this.num === 0 || env.memory.regions.length === 0) {
      return;
    }
    this.logger = env.logger;
    this.broken = false;
    const options = {
      index: this.index,
      size: this.num,
      addresses: this.addresses,
      memory: env.memory,
      packed: env.packed,
      eventIdx: env.eventIdx,
      indirect: env.indirect,
      base: this.base ?? (env.packed ? PACKED_INITIAL_BASE : 0),
      kickFd: this.kickFd,
      callFd: this.callFd,
      enabled: this.enabled,
      pollUs: env.pollUs ?? 0,
      onBroken: (message: string, code: string | undefined) => this.reportBroken(message, code),
    };
    const group = env.device.queueGroup !== undefined ? env.device.queueGroup(this.index) : this.index;
    if (env.workers !== undefined && group !== null) {
      // Checked here first (a throwaway queue only reads; the inflight area is left to the worker, which
      // maps its own part and reports a bad one as a broken ring), so a bad ring fails as on this thread.
      const check = createVirtqueue({ ...options, notify: () => undefined }, env.packed); // throws VIRTQ_NO_RING / VIRTQ_BAD_BASE
      // Without an inflight area the worker's queue reads the same ring to the same start.
      if (env.inflight === undefined) this.logResume(check);
      const inflight = env.inflight?.queuePart(this.index, this.num) ?? null;
      this.remote = env.workers.start({ ...options, group, features: env.features ?? 0n, dirtyLog: this.ringLogSpec(), inflight });
      return;
    }
    this.driver = new QueueDriver({ ...options, device: env.device, inflight: env.inflight?.queueView(this.index, this.num) });
    this.driver.queue.setDirtyLog(this.ringLogSpec());
    this.logResume(this.driver.queue);
    this.driver.start();
  }

  private logResume(queue: Virtqueue): void {
    if (queue.resumeNote) this.logger?.info(`queue ${this.index}: ${queue.resumeNote}`, { queue: this.index });
  }

  /**
   * Stop the ring (GET_VRING_BASE, reset, disconnect): wait for the device, then report the base.
   * `baseTaken` for GET_VRING_BASE (see QueueDriver.stop).
   */
  async stop(baseTaken = false): Promise<number | null> {
    this.setKickFd(-1);
    const running = this.driver ?? this.remote;
    if (running !== null) {
      const base = await running.stop(baseTaken);
      if (base !== null) this.base = base;
    }
    this.retireQueue();
    return this.base;
  }

  /** The memory table changed under a running ring (a worker's queue: resolves once it remapped). */
  setMemory(memory: GuestMemory): Promise<void> | undefined {
    this.driver?.setMemory(memory);
    if (this.remote === null || this.broken) return undefined;
    try {
      return this.remote.setMemory(memory);
    } catch (err) {
      // The fds could not be dup'ed for the worker: its queue keeps the old map, which goes now.
      this.reportBroken(`cannot remap: ${(err as Error).message}`, (err as { code?: string }).code);
      return undefined;
    }
  }

  /**
   * Live migration: log into `log` (null: logging is off) with this ring's VHOST_VRING_F_LOG address;
   * a queue in a worker resolves once it mapped the log. The caller closes a replaced log afterwards.
   */
  setDirtyLog(log: DirtyLog | null): Promise<void> | undefined {
    this.dirtyLog = log;
    this.driver?.queue.setDirtyLog(this.ringLogSpec());
    if (this.remote === null || this.broken) return undefined;
    try {
      return this.remote.setDirtyLog(this.ringLogSpec());
    } catch (err) {
      // The log fd could not be dup'ed for the worker: its writes would go unlogged.
      this.reportBroken(`cannot log dirty pages: ${(err as Error).message}`, (err as { code?: string }).code);
      return undefined;
    }
  }

  private ringLogSpec(): RingLogSpec | null {
    return this.dirtyLog === null ? null : { log: this.dirtyLog, usedGuestAddr: this.logGuestAddr };
  }

  /** SET_VRING_ENABLE (a worker's queue: resolves once it applied the change). */
  setEnabled(enabled: boolean): Promise<void> | undefined {
    this.enabled = enabled;
    this.driver?.setEnabled(enabled);
    return this.remote?.setEnabled(enabled);
  }

  /** The device's own work on this ring (on this thread) hit `err`: as a throw from processQueue. */
  markBroken(err: unknown): void {
    this.driver?.markBroken(err);
  }

  /** Close every fd and forget the configuration (disconnect or RESET_OWNER / RESET_DEVICE). */
  release(): void {
    this.setKickFd(-1);
    this.retireQueue();
    this.setFd('callFd', -1);
    this.setFd('errFd', -1);
    this.num = 0;
    this.addresses = null;
    this.logGuestAddr = null;
    this.dirtyLog = null;
    this.base = null;
    this.enabled = false;
    this.broken = false;
  }

  /**
   * The queue (here or in its worker) broke: a driver violation or a device bug. Stop using the ring,
   * tell the front-end through the err fd, keep serving the other rings and the connection.
   */
  private reportBroken(message: string, code: string | undefined): void {
    if (this.broken) return;
    this.broken = true;
    this.logger?.error(`queue ${this.index} broken: ${message}`, { code, queue: this.index });
    this.brokenCount++;
    signalEventfd(this.errFd);
  }
}
