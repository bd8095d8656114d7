/**
 * Entry of a queue worker thread (see queue-workers.ts). Generic: it loads the device module the
 * daemon named, builds a device from the serializable config, and runs the queues the main thread
 * sends it through the same QueueDriver as the main thread, each with its own mapping of guest
 * memory. The main thread keeps the protocol, config space and err fds. The device's own metrics
 * live in a registry of this thread, which the main thread reads when it is scraped
 * (lib/metrics/thread-metrics.ts) and once more when the worker ends.
 */
import { parentPort, workerData } from 'node:worker_threads';

import { Registry } from 'prom-client';

import { native } from '../../native';
import type { VhostdError } from '../errors';
import { DirtyLog } from '../memory/dirty-log';
import type { GuestMemory } from '../memory/guest-memory';
import { mapGuestMemory } from '../memory/mapped-region';
import type { DeviceBackend, DeviceContext } from '../vhost-user/device-backend';
import { InflightPart } from '../vhost-user/inflight-region';
import { QueueDriver } from '../vhost-user/queue-driver';
import type { LogFields, LogLevel, Logger } from './logger';
import { CounterSlot, type DirtyLogMessage, type FromWorker, type RegionMessage, type ToWorker, type WorkerData } from './queue-worker-protocol';

const port = parentPort!;
const data = workerData as WorkerData;

function post(message: FromWorker): void {
  port.postMessage(message);
}

/** Logs go to the daemon's logger on the main thread. */
const logger: Logger = Object.fromEntries(
  (['debug', 'info', 'warn', 'error'] as LogLevel[]).map((level) => [level, (message: string, fields?: LogFields) => post({ type: 'log', level, message, fields })]),
) as unknown as Logger;

/** Map the regions of a message, taking their fds (closed on failure). */
function mapRegions(regions: readonly RegionMessage[]): GuestMemory {
  return mapGuestMemory(regions, regions.map((r) => r.fd));
}

function closeFd(fd: number): void {
  if (fd >= 0) native.close(fd);
}

/**
 * A queue this worker runs: the shared {@link QueueDriver}, plus what the worker owns for it (the dups
 * of the kick and call fds, its own mapping of guest memory) and the counters it shares.
 */
class WorkerQueue {
  readonly driver: QueueDriver;
  private memory: GuestMemory;
  private readonly counters: Float64Array;
  /** This worker's mapping of the dirty page log while a live migration logs. */
  private dirtyLog: DirtyLog | null = null;
  /** This worker's mapping of the queue's part of the inflight area. */
  private readonly inflight: InflightPart | null = null;

  constructor(message: Extract<ToWorker, { type: 'start' }>) {
    this.counters = new Float64Array(message.counters);
    try {
      this.memory = mapRegions(message.regions);
    } catch (err) {
      if (message.inflight !== null) native.close(message.inflight.fd);
      if (message.dirtyLog !== null) native.close(message.dirtyLog.fd);
      throw err;
    }
    try {
      this.inflight = message.inflight === null ? null : new InflightPart(message.inflight); // takes the fd
    } catch (err) {
      this.memory.close();
      if (message.dirtyLog !== null) native.close(message.dirtyLog.fd);
      throw err;
    }
    try {
      const { index, size, addresses, base, packed, eventIdx, indirect, enabled, kickFd, callFd, pollUs } = message;
      this.driver = new QueueDriver({
        index,
        size,
        addresses,
        base,
        packed,
        eventIdx,
        indirect,
        enabled,
        kickFd,
        callFd,
        pollUs,
        inflight: this.inflight?.view,
        memory: this.memory,
        device,
        onBroken: (text, code) => post({ type: 'broken', index, message: text, code }),
        afterProcess: () => this.syncCounters(),
      });
    } catch (err) {
      this.memory.close();
      this.inflight?.close();
      if (message.dirtyLog !== null) native.close(message.dirtyLog.fd);
      throw err;
    }
    try {
      this.setDirtyLog(message.dirtyLog); // takes the log fd, closed on failure
    } catch (err) {
      this.memory.close();
      this.inflight?.close();
      throw err;
    }
  }

  /** Map the new log (taking its fd), switch the queue to it, unmap the old one; null stops logging. */
  setDirtyLog(message: DirtyLogMessage | null): void {
    const log = message === null ? null : new DirtyLog(message, message.fd);
    this.driver.queue.setDirtyLog(log === null ? null : { log, usedGuestAddr: message!.usedGuestAddr });
    this.dirtyLog?.close();
    this.dirtyLog = log;
  }

  setKickFd(fd: number): void {
    const old = this.driver.kickFd;
    this.driver.setKickFd(fd);
    closeFd(old);
  }

  setCallFd(fd: number): void {
    const old = this.driver.callFd;
    this.driver.setCallFd(fd);
    closeFd(old);
  }

  /** Map the new table, switch the queue to it, tell the device, unmap the old one. */
  setMemory(regions: RegionMessage[]): void {
    const memory = mapRegions(regions);
    const old = this.memory;
    this.memory = memory;
    this.driver.setMemory(memory);
    device.memoryChanged?.(memory);
    old.close();
  }

  syncCounters(): void {
    const c = this.driver.queue.counters;
    const out = this.counters;
    out[CounterSlot.requests] = c.requests;
    out[CounterSlot.bytesRead] = c.bytesRead;
    out[CounterSlot.bytesWritten] = c.bytesWritten;
    out[CounterSlot.notifications] = c.notifications;
    out[CounterSlot.batches] = c.batches;
    out[CounterSlot.kicks] = this.driver.kicks;
    out[CounterSlot.pollHits] = this.driver.pollHits;
    out[CounterSlot.pollSeconds] = this.driver.pollSeconds;
  }

  /** Wait for the device, report the base, release fds and memory. */
  async stop(baseTaken = false): Promise<number> {
    const base = await this.driver.stop(baseTaken);
    this.syncCounters();
    this.setKickFd(-1);
    this.setCallFd(-1);
    this.memory.close();
    this.inflight?.close();
    this.dirtyLog?.close();
    this.dirtyLog = null;
    return base;
  }
}

let device!: DeviceBackend;
/** The worker device's own metrics (DeviceBackend.registerMetrics), read by the main thread's scrapes. */
const metrics = new Registry();
/** Set once the final metrics are being taken: later scrapes are answered by the main thread from those. */
let ending = false;
const queues = new Map<number, WorkerQueue>();
let features = 0n;
const context: DeviceContext = {
  get features() {
    return features;
  },
  // The backend channel belongs to the main thread, whose device instance owns the config space.
  notifyConfigChange: () => Promise.resolve(false),
  queueBroken: (index, err) => queues.get(index)?.driver.markBroken(err),
};
let attached = false;
/** Completions arrive outside processQueue; refresh the shared counters a few times a second. */
let counterTimer: NodeJS.Timeout | null = null;

function startQueue(message: Extract<ToWorker, { type: 'start' }>): void {
  let q: WorkerQueue;
  try {
    q = new WorkerQueue(message);
  } catch (err) {
    native.close(message.kickFd);
    if (message.callFd >= 0) native.close(message.callFd);
    post({ type: 'broken', index: message.index, message: `cannot start: ${(err as Error).message}`, code: (err as VhostdError).code });
    return;
  }
  queues.set(message.index, q);
  features = BigInt(message.features);
  // A worker lives for one front-end connection: its device is attached once, with its first queue.
  if (!attached) device.attach?.(context);
  attached = true;
  q.driver.start();
  counterTimer ??= setInterval(() => {
    for (const queue of queues.values()) queue.syncCounters();
  }, 250);
}

/** A change to a running queue: kick fd, call fd, enabled state, memory table. */
function apply(message: Extract<ToWorker, { type: 'kick' | 'call' | 'enable' | 'memory' | 'dirty-log' }>): void {
  const q = queues.get(message.index);
  switch (message.type) {
    case 'kick':
      if (q === undefined) native.close(message.fd);
      else q.setKickFd(message.fd);
      return;
    case 'call':
      if (q === undefined) {
        if (message.fd >= 0) native.close(message.fd);
      } else q.setCallFd(message.fd);
      return;
    case 'enable':
      q?.driver.setEnabled(message.enabled);
      return;
    case 'memory':
      if (q === undefined) {
        for (const r of message.regions) native.close(r.fd);
        return;
      }
      try {
        q.setMemory(message.regions);
      } catch (err) {
        // Not mapped here: the queue must not go on with the old map, which the main thread closes.
        q.driver.markBroken(err);
      }
      return;
    case 'dirty-log':
      if (q === undefined) {
        if (message.dirtyLog !== null) native.close(message.dirtyLog.fd);
        return;
      }
      try {
        q.setDirtyLog(message.dirtyLog);
      } catch (err) {
        // Pages this queue writes could no longer be logged: a migration would copy stale memory.
        q.driver.markBroken(err);
      }
      return;
  }
}

async function handle(message: ToWorker): Promise<void> {
  switch (message.type) {
    case 'start':
      startQueue(message);
      return;
    case 'kick':
    case 'call':
    case 'enable':
    case 'memory':
    case 'dirty-log':
      // Acknowledged, so the main thread replies to the front-end only once the change applies.
      try {
        apply(message);
      } finally {
        post({ type: 'done', index: message.index });
      }
      return;
    case 'stop': {
      const q = queues.get(message.index);
      let base: number | null = null;
      if (q !== undefined) {
        queues.delete(message.index);
        base = await q.stop(message.baseTaken);
      }
      if (queues.size === 0 && counterTimer !== null) {
        clearInterval(counterTimer);
        counterTimer = null;
      }
      post({ type: 'stopped', index: message.index, base });
      return;
    }
    case 'config':
      try {
        device.setConfig?.(message.offset, message.data);
      } catch (err) {
        logger.warn(`config write refused by the worker device: ${(err as Error).message}`);
      }
      return;
    case 'reset':
      device.reset?.();
      return;
    case 'device': {
      let answer: unknown;
      try {
        answer = await device.workerMessage?.(message.message);
      } catch (err) {
        if (message.id !== 0) post({ type: 'device', id: message.id, error: (err as Error).message });
        else logger.warn(`device message refused by the worker device: ${(err as Error).message}`);
        return;
      }
      if (message.id !== 0) post({ type: 'device', id: message.id, answer });
      return;
    }
    case 'exit':
      await exit();
      return;
  }
}

/** A scrape on the main thread. Not once the final numbers are taken: the main thread has them then. */
function answerMetrics(): void {
  metrics.getMetricsAsJSON().then(
    (snapshot) => {
      if (!ending) post({ type: 'metrics', metrics: snapshot });
    },
    (err: Error) => {
      // The scrape still gets an answer (without this thread's samples) rather than waiting forever.
      logger.warn(`worker metrics: ${err.message}`);
      if (!ending) post({ type: 'metrics', metrics: [] });
    },
  );
}

async function exit(): Promise<void> {
  for (const [index, q] of [...queues]) {
    queues.delete(index);
    await q.stop();
  }
  if (counterTimer !== null) clearInterval(counterTimer);
  counterTimer = null;
  // The disconnect resets the main device; the worker device gets the same order: reset, then detach.
  device.reset?.();
  ending = true;
  try {
    post({ type: 'ended', metrics: await metrics.getMetricsAsJSON() });
  } catch (err) {
    logger.warn(`worker metrics: ${(err as Error).message}`);
  }
  device.detach?.();
  await (device as DeviceBackend & { close?(): Promise<void> | void }).close?.();
  port.close();
}

async function main(): Promise<void> {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const mod = require(data.modulePath) as Record<string, unknown>;
  const factory = mod[data.exportName];
  if (typeof factory !== 'function') throw new TypeError(`${data.modulePath} has no function ${data.exportName}`);
  device = await (factory as (config: unknown, logger: Logger) => DeviceBackend | Promise<DeviceBackend>)(data.config, logger);
  device.registerMetrics?.(metrics);
  // Messages are handled one at a time, in order (a stop waits for in-flight I/O before the next).
  let chain = Promise.resolve();
  port.on('message', (message: ToWorker) => {
    // A scrape is answered at once, never queued behind a stop that waits for I/O.
    if (message.type === 'metrics') {
      answerMetrics();
      return;
    }
    chain = chain.then(() => handle(message)).catch((err: Error) => logger.error(`queue worker: ${err.stack ?? err.message}`));
  });
}

// Queue messages that arrive while the device module loads are buffered by the port until the
// listener is attached, which happens in the same tick as the factory resolves.
main().catch((err: Error) => {
  logger.error(`queue worker ${data.id} cannot start: ${err.stack ?? err.message}`);
  port.close();
});
