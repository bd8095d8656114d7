/**
 * Entry of a queue worker thread (see queue-workers.ts). Generic: it loads the device module the
 * daemon named, builds a device from the serializable config, and runs the queues the main thread
 * sends it, each with its own mapping of guest memory, kick watch and call signalling. The main
 * thread keeps the protocol, config space and err fds.
 */
import { parentPort, workerData } from 'node:worker_threads';

import { native, POLL_READABLE, type Watcher } from '../../native';
import { VhostdError } from '../errors';
import { GuestMemory } from '../memory/guest-memory';
import { MappedRegion } from '../memory/mapped-region';
import type { DeviceBackend, DeviceContext } from '../vhost-user/device-backend';
import { signalEventfd } from '../vhost-user/vring';
import { createVirtqueue } from '../virtqueue';
import type { Virtqueue } from '../virtqueue/virtqueue';
import type { LogFields, LogLevel, Logger } from './logger';
import { CounterSlot, type FromWorker, type RegionMessage, type ToWorker, type WorkerData } from './queue-worker-protocol';

const port = parentPort!;
const data = workerData as WorkerData;

function post(message: FromWorker): void {
  port.postMessage(message);
}

/** Logs go to the daemon's logger on the main thread. */
const logger: Logger = Object.fromEntries(
  (['debug', 'info', 'warn', 'error'] as LogLevel[]).map((level) => [level, (message: string, fields?: LogFields) => post({ type: 'log', level, message, fields })]),
) as unknown as Logger;

/** Map the regions (taking their fds) into a GuestMemory; on failure every fd is closed. */
function mapMemory(regions: readonly RegionMessage[]): GuestMemory {
  const mapped: MappedRegion[] = [];
  try {
    for (let i = 0; i < regions.length; i++) {
      const r = regions[i]!;
      try {
        mapped.push(new MappedRegion(r, r.fd)); // takes the fd, closes it on failure
      } catch (err) {
        for (const rest of regions.slice(i + 1)) native.close(rest.fd);
        throw err;
      }
    }
    return new GuestMemory(mapped);
  } finally {
    for (const region of mapped) region.release(); // the GuestMemory holds its own references
  }
}

/** A queue this worker runs. */
class WorkerQueue {
  queue: Virtqueue;
  memory: GuestMemory;
  kickFd: number;
  callFd: number;
  enabled: boolean;
  broken = false;
  kicks = 0;
  private watcher: Watcher | null = null;
  readonly counters: Float64Array;

  constructor(
    readonly index: number,
    message: Extract<ToWorker, { type: 'start' }>,
  ) {
    this.kickFd = message.kickFd;
    this.callFd = message.callFd;
    this.enabled = message.enabled;
    this.counters = new Float64Array(message.counters);
    this.memory = mapMemory(message.regions);
    try {
      this.queue = createVirtqueue(
        {
          size: message.size,
          addresses: message.addresses,
          memory: this.memory,
          eventIdx: message.eventIdx,
          indirect: message.indirect,
          base: message.base,
          notify: () => signalEventfd(this.callFd),
        },
        message.packed,
      );
    } catch (err) {
      this.memory.close();
      throw err;
    }
  }

  watch(): void {
    this.watcher?.stop();
    this.watcher = this.kickFd >= 0 ? native.watch(this.kickFd, POLL_READABLE, () => this.onKick()) : null;
  }

  setKickFd(fd: number): void {
    this.watcher?.stop();
    this.watcher = null;
    if (this.kickFd >= 0) native.close(this.kickFd);
    this.kickFd = fd;
    this.watch();
  }

  setCallFd(fd: number): void {
    if (this.callFd >= 0) native.close(this.callFd);
    this.callFd = fd;
  }

  private onKick(): void {
    this.kicks++;
    native.eventfdRead(this.kickFd);
    this.process();
  }

  process(): void {
    if (!this.enabled || this.broken) return;
    try {
      device.processQueue(this.index, this.queue);
    } catch (err) {
      this.markBroken(err);
    }
    this.syncCounters();
  }

  setMemory(regions: RegionMessage[]): void {
    const memory = mapMemory(regions);
    const old = this.memory;
    this.memory = memory;
    if (!this.broken) {
      try {
        this.queue.setMemory(memory);
      } catch (err) {
        this.markBroken(err);
      }
    }
    old.close();
  }

  markBroken(err: unknown): void {
    this.broken = true;
    const code = err instanceof VhostdError ? err.code : undefined;
    const message = err instanceof VhostdError ? err.message : `internal error: ${(err as Error)?.stack ?? String(err)}`;
    post({ type: 'broken', index: this.index, message, code });
  }

  syncCounters(): void {
    const c = this.queue.counters;
    const out = this.counters;
    out[CounterSlot.requests] = c.requests;
    out[CounterSlot.bytesRead] = c.bytesRead;
    out[CounterSlot.bytesWritten] = c.bytesWritten;
    out[CounterSlot.notifications] = c.notifications;
    out[CounterSlot.batches] = c.batches;
    out[CounterSlot.kicks] = this.kicks;
  }

  /** Stop watching, wait for the device, report the base, release fds and memory. */
  async stop(): Promise<number> {
    this.watcher?.stop();
    this.watcher = null;
    await device.stopQueue?.(this.index);
    const base = this.queue.base();
    this.syncCounters();
    this.setKickFd(-1);
    this.setCallFd(-1);
    this.memory.close();
    return base;
  }
}

let device!: DeviceBackend;
const queues = new Map<number, WorkerQueue>();
let features = 0n;
const context: DeviceContext = {
  get features() {
    return features;
  },
  // The backend channel belongs to the main thread, whose device instance owns the config space.
  notifyConfigChange: () => Promise.resolve(false),
};
/** Completions arrive outside processQueue; refresh the shared counters a few times a second. */
let counterTimer: NodeJS.Timeout | null = null;

function startQueue(message: Extract<ToWorker, { type: 'start' }>): void {
  let q: WorkerQueue;
  try {
    q = new WorkerQueue(message.index, message);
  } catch (err) {
    native.close(message.kickFd);
    if (message.callFd >= 0) native.close(message.callFd);
    post({ type: 'broken', index: message.index, message: `cannot start: ${(err as Error).message}`, code: (err as VhostdError).code });
    return;
  }
  queues.set(message.index, q);
  features = BigInt(message.features);
  device.attach?.(context);
  device.startQueue?.(message.index, q.queue);
  q.watch();
  // A kick may have come before the watch; processing an empty ring is harmless.
  q.process();
  counterTimer ??= setInterval(() => {
    for (const queue of queues.values()) queue.syncCounters();
  }, 250);
}

/** A change to a running queue: kick fd, call fd, enabled state, memory table. */
function apply(message: Extract<ToWorker, { type: 'kick' | 'call' | 'enable' | 'memory' }>): void {
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
      if (q === undefined) return;
      q.enabled = message.enabled;
      if (message.enabled) q.process();
      return;
    case 'memory':
      if (q === undefined) {
        for (const r of message.regions) native.close(r.fd);
        return;
      }
      try {
        q.setMemory(message.regions);
      } catch (err) {
        q.markBroken(err);
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
        base = await q.stop();
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
    case 'exit':
      await exit();
      return;
  }
}

async function exit(): Promise<void> {
  for (const [index, q] of [...queues]) {
    queues.delete(index);
    await q.stop();
  }
  if (counterTimer !== null) clearInterval(counterTimer);
  counterTimer = null;
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
  // Messages are handled one at a time, in order (a stop waits for in-flight I/O before the next).
  let chain = Promise.resolve();
  port.on('message', (message: ToWorker) => {
    chain = chain.then(() => handle(message)).catch((err: Error) => logger.error(`queue worker: ${err.stack ?? err.message}`));
  });
}

// Queue messages that arrive while the device module loads are buffered by the port until the
// listener is attached, which happens in the same tick as the factory resolves.
main().catch((err: Error) => {
  logger.error(`queue worker ${data.id} cannot start: ${err.stack ?? err.message}`);
  port.close();
});
