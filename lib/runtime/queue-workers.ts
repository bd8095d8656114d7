/**
 * Queues in worker threads (`--threads N`), main-thread side. One Node event loop is one core; with
 * a pool, the queues of one group (the device's `queueGroup`, by default one queue per group) run in
 * one worker thread, group `g` in thread `g % N`; queues of no group stay on the main thread. The
 * main thread keeps the protocol, the config
 * space and the features (answered by the main device instance); a worker gets, per queue, only what
 * a queue needs: the memory regions (their fds dup'ed, mapped by the worker itself), the ring
 * addresses, size, base, ring features, and dups of the kick and call eventfds. It runs the queue
 * with the same QueueDriver (lib/vhost-user/queue-driver.ts) as the main thread, for its own device instance (made by a
 * factory the daemon names: module path + export + a structured-clonable config).
 *
 * Messages (worker-protocol.ts) are one-way except stop, which is a request/response: the worker
 * waits for the device's stopQueue, answers with queue.base(), closes its dups and unmaps. Ring
 * errors come back as 'broken' (the main thread counts them and writes the err fd, which it keeps).
 * Queue counters come back through a SharedArrayBuffer per queue start ({@link COUNTER_SLOTS}
 * Float64 values): the worker writes them, metrics read them at scrape time, no message needed.
 * The worker devices' own metrics come back on a scrape ({@link QueueWorkerPool.metrics}: one
 * message round trip per worker) and, for the counters, once more when a worker ends, so they keep
 * counting across connections as the main device's do.
 *
 * Ownership: every fd sent in a message is a dup owned by the worker from then on (closed here if
 * the message cannot be sent). Workers live while a front-end is attached: {@link QueueWorkerPool.close}
 * (connection close) ends them, so a disconnect leaves no thread and no fd behind.
 */
import path from 'node:path';
import { Worker } from 'node:worker_threads';

import { native } from '../../native';
import type { GuestMemory } from '../memory/guest-memory';
import { MappedRegion } from '../memory/mapped-region';
import { lastingMetrics, mergeSnapshots, type MetricSnapshot } from '../metrics/thread-metrics';
import type { RingLogSpec } from '../virtqueue/ring-log';
import type { InflightPartMessage } from '../vhost-user/inflight-region';
import type { PollCounters } from '../vhost-user/queue-driver';
import type { QueueCounters, RingAddresses } from '../virtqueue/virtqueue';
import { silentLogger, type Logger } from './logger';
import {
  COUNTER_SLOTS,
  CounterSlot,
  type DirtyLogMessage,
  type FromWorker,
  type RegionMessage,
  type ToWorker,
  type WorkerData,
} from './queue-worker-protocol';


/** What a daemon gives to run its queues in threads. */
export interface QueueWorkerOptions {
  /** Worker threads; queue group g runs in thread g % threads. */
  threads: number;
  /** Absolute path of a module a worker can `require` (the compiled .js). */
  modulePath: string;
  /** Its export `(config, logger) => DeviceBackend | Promise<DeviceBackend>` (a device for the worker's queues). */
  exportName: string;
  /** Passed to the factory; must survive structured clone. */
  config: unknown;
}

/** A queue to start in a worker. */
export interface RemoteQueueSpec {
  index: number;
  /** The device's queue group: queues of one group share a thread. */
  group: number;
  size: number;
  addresses: RingAddresses;
  base: number;
  packed: boolean;
  eventIdx: boolean;
  indirect: boolean;
  /** Negotiated virtio features, for the worker device's DeviceContext. */
  features: bigint;
  enabled: boolean;
  /** QueueDriver `pollUs`. */
  pollUs: number;
  memory: GuestMemory;
  kickFd: number;
  callFd: number;
  /** Logging is on (live migration): the worker maps its own view of the log. */
  dirtyLog: RingLogSpec | null;
  /** The queue's part of the inflight area (its fd is dup'ed for the worker, which maps it). */
  inflight: InflightPartMessage | null;
  /** The worker found the ring broken (or died). */
  onBroken(message: string, code: string | undefined): void;
}

/** Main-thread handle of a queue running in a worker. */
export class RemoteQueue {
  /** Live counters of the queue (see CounterSlot), written by the worker through a shared buffer. */
  readonly counters: Float64Array;
  private readonly acks: (() => void)[] = [];
  /** Set by the pool when the worker answers a stop (or dies). */
  stopped: ((base: number | null) => void) | null = null;

  constructor(
    readonly index: number,
    private readonly slot: WorkerSlot,
    readonly onBroken: (message: string, code: string | undefined) => void,
  ) {
    this.counters = new Float64Array(new SharedArrayBuffer(COUNTER_SLOTS * Float64Array.BYTES_PER_ELEMENT));
  }

  /** The queue's counters now (the worker updates them as it runs). */
  queueCounters(): QueueCounters {
    const c = this.counters;
    return {
      requests: c[CounterSlot.requests]!,
      bytesRead: c[CounterSlot.bytesRead]!,
      bytesWritten: c[CounterSlot.bytesWritten]!,
      notifications: c[CounterSlot.notifications]!,
      batches: c[CounterSlot.batches]!,
    };
  }

  /** Kicks the worker received. */
  kicks(): number {
    return this.counters[CounterSlot.kicks]!;
  }

  /** Poll rounds that found work, and seconds spent polling, in the worker. */
  polls(): PollCounters {
    return { hits: this.counters[CounterSlot.pollHits]!, seconds: this.counters[CounterSlot.pollSeconds]! };
  }

  /*
   * Changes to a running queue resolve once the worker applied them: the front-end gets its reply
   * (REPLY_ACK) only then, so its next kick cannot overtake the change (the kick eventfd and the
   * message port are separate event sources in the worker).
   */

  /** A new kick fd (SET_VRING_KICK on a running ring); the worker gets a dup. */
  setKickFd(fd: number): Promise<void> {
    return this.request({ type: 'kick', index: this.index, fd: fd < 0 ? -1 : native.dup(fd) });
  }

  /** A new call fd (SET_VRING_CALL on a running ring), or -1. */
  setCallFd(fd: number): Promise<void> {
    return this.request({ type: 'call', index: this.index, fd: fd < 0 ? -1 : native.dup(fd) });
  }

  setEnabled(enabled: boolean): Promise<void> {
    return this.request({ type: 'enable', index: this.index, enabled });
  }

  /** The memory table changed: the worker maps the new regions and calls queue.setMemory. */
  setMemory(memory: GuestMemory): Promise<void> {
    return this.request({ type: 'memory', index: this.index, regions: regionMessages(memory) });
  }

  /** Live migration logging changed: the worker maps the new log (a dup of its fd) or stops logging. */
  setDirtyLog(spec: RingLogSpec | null): Promise<void> {
    return this.request({ type: 'dirty-log', index: this.index, dirtyLog: dirtyLogMessage(spec) });
  }

  private request(message: ToWorker): Promise<void> {
    return new Promise((resolve) => {
      this.acks.push(resolve);
      if (!this.slot.sendWithFds(message)) this.onDone();
    });
  }

  /** @internal */
  onDone(): void {
    this.acks.shift()?.();
  }

  /** Stop the queue (QueueDriver.stop): resolves with its base once the device drained it (null if the worker died). */
  stop(baseTaken = false): Promise<number | null> {
    return new Promise((resolve) => {
      this.stopped = resolve;
      if (!this.slot.send({ type: 'stop', index: this.index, baseTaken })) this.finish(null);
    });
  }

  /** @internal */
  finish(base: number | null): void {
    const resolve = this.stopped;
    this.stopped = null;
    this.slot.queues.delete(this.index);
    for (const done of this.acks.splice(0)) done();
    resolve?.(base);
  }
}

/** One worker thread and the queues it runs. */
class WorkerSlot {
  worker: Worker | null = null;
  readonly queues = new Map<number, RemoteQueue>();
  private exited: Promise<void> | null = null;
  /** Counters and histograms of this slot's ended workers, merged. */
  private ended: MetricSnapshot = [];
  /** Scrapes waiting for the worker's answer, in order. */
  private readonly scrapes: ((snapshots: MetricSnapshot[]) => void)[] = [];
  /** Device messages waiting for their answer, by id. */
  private readonly answers = new Map<number, { resolve(answer: unknown): void; reject(err: Error): void }>();
  private nextId = 1;

  constructor(
    private readonly id: number,
    private readonly options: QueueWorkerOptions,
    private readonly logger: Logger,
    private readonly initialState: () => unknown,
  ) {}

  /** Send the worker's device a message; resolves with its answer (undefined if the thread ends first). */
  deviceMessage(message: unknown): Promise<unknown> {
    return new Promise((resolve, reject) => {
      const id = this.nextId++;
      this.answers.set(id, { resolve, reject });
      if (!this.send({ type: 'device', id, message })) {
        this.answers.delete(id);
        resolve(undefined);
      }
    });
  }

  private spawn(): Worker {
    const data: WorkerData = { modulePath: this.options.modulePath, exportName: this.options.exportName, config: this.options.config, id: this.id };
    const worker = new Worker(path.join(__dirname, 'queue-worker-main.js'), { workerData: data });
    // The listening socket keeps the daemon alive; a worker alone must not.
    worker.unref();
    worker.on('message', (message: FromWorker) => this.onMessage(message));
    worker.on('error', (err) => this.logger.error(`queue worker ${this.id} failed: ${err.stack ?? err.message}`));
    this.exited = new Promise((resolve) =>
      worker.once('exit', () => {
        if (this.worker === worker) this.worker = null;
        for (const answer of this.answers.values()) answer.resolve(undefined);
        this.answers.clear();
        // Queues of a dead worker: their stop resolves with no base; running ones are broken.
        for (const queue of [...this.queues.values()]) {
          if (queue.stopped === null) queue.onBroken(`queue worker ${this.id} exited`, 'QUEUE_WORKER_EXIT');
          queue.finish(null);
        }
        this.queues.clear();
        // Its 'ended' message came before 'exit': waiting scrapes get its final numbers from `ended`.
        for (const answer of this.scrapes.splice(0)) answer([this.ended]);
        resolve();
      }),
    );
    this.worker = worker;
    // Before any queue: the device state changed since the config (ports deliver in order).
    const state = this.initialState();
    if (state !== undefined) worker.postMessage({ type: 'device', id: 0, message: state } satisfies ToWorker);
    return worker;
  }

  start(spec: RemoteQueueSpec): RemoteQueue {
    const queue = new RemoteQueue(spec.index, this, spec.onBroken);
    const worker = this.worker ?? this.spawn();
    this.queues.set(spec.index, queue);
    const sent = this.sendWithFds({
      type: 'start',
      index: spec.index,
      size: spec.size,
      addresses: spec.addresses,
      base: spec.base,
      packed: spec.packed,
      eventIdx: spec.eventIdx,
      indirect: spec.indirect,
      features: spec.features.toString(),
      enabled: spec.enabled,
      pollUs: spec.pollUs,
      regions: regionMessages(spec.memory),
      kickFd: native.dup(spec.kickFd),
      callFd: spec.callFd < 0 ? -1 : native.dup(spec.callFd),
      counters: queue.counters.buffer as SharedArrayBuffer,
      dirtyLog: dirtyLogMessage(spec.dirtyLog),
      inflight: spec.inflight === null ? null : { ...spec.inflight, fd: native.dup(spec.inflight.fd) },
    });
    if (!sent || this.worker !== worker) throw new Error(`queue worker ${this.id} is gone`);
    return queue;
  }

  send(message: ToWorker): boolean {
    if (this.worker === null) return false;
    this.worker.postMessage(message);
    return true;
  }

  /** Send a message whose fds the worker takes over; they are closed here if it cannot be sent. */
  sendWithFds(message: ToWorker): boolean {
    try {
      if (this.send(message)) return true;
    } catch (err) {
      closeFds(message);
      throw err;
    }
    closeFds(message);
    return false;
  }

  private onMessage(message: FromWorker): void {
    switch (message.type) {
      case 'stopped':
        this.queues.get(message.index)?.finish(message.base);
        break;
      case 'done':
        this.queues.get(message.index)?.onDone();
        break;
      case 'broken':
        this.queues.get(message.index)?.onBroken(message.message, message.code);
        break;
      case 'log':
        this.logger[message.level](message.message, { ...message.fields, worker: this.id });
        break;
      case 'metrics':
        this.scrapes.shift()?.([this.ended, message.metrics]);
        break;
      case 'ended':
        this.ended = mergeSnapshots([this.ended, lastingMetrics(message.metrics)]);
        break;
      case 'device': {
        const answer = this.answers.get(message.id);
        this.answers.delete(message.id);
        if (message.error !== undefined) answer?.reject(new Error(`queue worker ${this.id}: ${message.error}`));
        else answer?.resolve(message.answer);
        break;
      }
    }
  }

  /** The device metrics of this thread: its ended workers' counters and the running worker's samples. */
  metrics(): Promise<MetricSnapshot[]> {
    return new Promise((resolve) => {
      if (this.send({ type: 'metrics' })) this.scrapes.push(resolve);
      else resolve([this.ended]);
    });
  }

  /** Ask the worker to exit (it releases its device); terminate it if it does not within `ms`. */
  async close(ms: number): Promise<void> {
    const worker = this.worker;
    if (worker === null) return;
    worker.postMessage({ type: 'exit' } satisfies ToWorker);
    const timer = setTimeout(() => void worker.terminate(), ms);
    await this.exited;
    clearTimeout(timer);
  }
}

/** Every fd a message hands over. */
function closeFds(message: ToWorker): void {
  const fds: number[] = [];
  if (message.type === 'start') fds.push(message.kickFd, message.callFd);
  if (message.type === 'kick' || message.type === 'call') fds.push(message.fd);
  if (message.type === 'start' || message.type === 'memory') fds.push(...message.regions.map((r) => r.fd));
  if ((message.type === 'start' || message.type === 'dirty-log') && message.dirtyLog !== null) fds.push(message.dirtyLog.fd);
  if (message.type === 'start' && message.inflight !== null) fds.push(message.inflight.fd);
  for (const fd of fds) if (fd >= 0) native.close(fd);
}

/** A ring's log as a worker maps it, with a dup of the log fd. */
function dirtyLogMessage(spec: RingLogSpec | null): DirtyLogMessage | null {
  if (spec === null) return null;
  const { log, usedGuestAddr } = spec;
  return { fd: native.dup(log.fd), size: log.size, offset: log.offset, usedGuestAddr };
}

/** The regions of `memory` as a worker maps them, each with a dup of its fd. */
function regionMessages(memory: GuestMemory): RegionMessage[] {
  const out: RegionMessage[] = [];
  try {
    for (const region of memory.regions) {
      if (!(region instanceof MappedRegion)) throw new TypeError('queue workers need regions mapped from fds');
      out.push({ fd: native.dup(region.fd), guestPhysAddr: region.guestPhysAddr, size: region.size, userAddr: region.userAddr, mmapOffset: region.mmapOffset });
    }
  } catch (err) {
    for (const r of out) native.close(r.fd);
    throw err;
  }
  return out;
}

/** The worker threads of one server; threads start on first use and end with {@link close}. */
export class QueueWorkerPool {
  private readonly slots: WorkerSlot[];

  /** `initialState`: the first device message of each new thread (DeviceBackend.workerState). */
  constructor(
    readonly options: QueueWorkerOptions,
    logger: Logger = silentLogger,
    initialState: () => unknown = () => undefined,
  ) {
    if (!Number.isInteger(options.threads) || options.threads < 1) throw new RangeError(`threads must be a positive integer, got ${options.threads}`);
    this.slots = Array.from({ length: options.threads }, (_, i) => new WorkerSlot(i, options, logger, initialState));
  }

  /** Which thread runs the queues of `group`. */
  threadOf(group: number): number {
    if (!Number.isSafeInteger(group) || group < 0) throw new RangeError(`queue group must be a non-negative integer, got ${group}`);
    return group % this.slots.length;
  }

  /** Start queue `spec.index` in its group's worker. Throws if an fd cannot be dup'ed or the worker is gone. */
  start(spec: RemoteQueueSpec): RemoteQueue {
    return this.slots[this.threadOf(spec.group)]!.start(spec);
  }

  /** The driver wrote the config space (SET_CONFIG accepted by the main device): tell every worker device. */
  setConfig(offset: number, data: Uint8Array): void {
    for (const slot of this.slots) slot.send({ type: 'config', offset, data: data.slice() });
  }

  /** RESET_OWNER / RESET_DEVICE (after every queue stopped): every worker device resets too. */
  reset(): void {
    for (const slot of this.slots) slot.send({ type: 'reset' });
  }

  /** The worker devices' metrics for a scrape, to merge with the main device's (lib/metrics/thread-metrics.ts). */
  async metrics(): Promise<MetricSnapshot[]> {
    return (await Promise.all(this.slots.map((slot) => slot.metrics()))).flat();
  }

  /** Send every running thread's device `message` (DeviceContext.messageWorkers): their answers, in thread order. */
  deviceMessage(message: unknown): Promise<unknown[]> {
    return Promise.all(this.slots.filter((s) => s.worker !== null).map((s) => s.deviceMessage(message)));
  }

  /** Threads running now. */
  get running(): number {
    return this.slots.filter((s) => s.worker !== null).length;
  }

  /** End every thread (after their queues stopped). */
  async close(timeoutMs = 5000): Promise<void> {
    await Promise.all(this.slots.map((s) => s.close(timeoutMs)));
  }
}
