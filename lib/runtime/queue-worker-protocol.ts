/**
 * Messages between the main thread (queue-workers.ts) and a queue worker (queue-worker-main.ts).
 * Every fd in a message to the worker is a dup the worker owns from then on.
 */
import type { MetricSnapshot } from '../metrics/thread-metrics';
import type { LogFields, LogLevel } from './logger';
import type { InflightPartMessage } from '../vhost-user/inflight-region';
import type { RingAddresses } from '../virtqueue/virtqueue';

/** `workerData` of a queue worker. */
export interface WorkerData {
  modulePath: string;
  exportName: string;
  config: unknown;
  id: number;
}

/** One memory region (VhostUserMemoryRegion numbers, validated by the main thread) with its fd. */
export interface RegionMessage {
  fd: number;
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
}

/**
 * The dirty page log of a live migration (SET_LOG_BASE) as a worker maps it for one queue, with the
 * ring's VHOST_VRING_F_LOG address (see lib/virtqueue/ring-log.ts).
 */
export interface DirtyLogMessage {
  fd: number;
  size: number;
  offset: number;
  usedGuestAddr: number | null;
}

/** Float64 slots of a queue's shared counters. */
export const CounterSlot = {
  requests: 0,
  bytesRead: 1,
  bytesWritten: 2,
  notifications: 3,
  batches: 4,
  kicks: 5,
  pollHits: 6,
  pollSeconds: 7,
} as const;
export const COUNTER_SLOTS = 8;

export type ToWorker =
  | {
      type: 'start';
      index: number;
      size: number;
      addresses: RingAddresses;
      base: number;
      packed: boolean;
      eventIdx: boolean;
      indirect: boolean;
      /** Negotiated features, decimal. */
      features: string;
      enabled: boolean;
      pollUs: number;
      regions: RegionMessage[];
      kickFd: number;
      callFd: number;
      counters: SharedArrayBuffer;
      /** Logging is on (live migration): mark what the queue writes here. */
      dirtyLog: DirtyLogMessage | null;
      /** The queue's part of the inflight area (INFLIGHT_SHMFD), with a dup of the area's fd. */
      inflight: InflightPartMessage | null;
    }
  | { type: 'kick'; index: number; fd: number }
  | { type: 'call'; index: number; fd: number }
  | { type: 'enable'; index: number; enabled: boolean }
  | { type: 'memory'; index: number; regions: RegionMessage[] }
  /** Logging started, stopped or moved to a new log (live migration). */
  | { type: 'dirty-log'; index: number; dirtyLog: DirtyLogMessage | null }
  | { type: 'stop'; index: number; baseTaken: boolean }
  | { type: 'config'; offset: number; data: Uint8Array }
  /** RESET_OWNER / RESET_DEVICE, after every queue of the worker stopped. */
  | { type: 'reset' }
  /** A scrape: answered at once with 'metrics', outside the queue messages' order. */
  | { type: 'metrics' }
  /** For the device's workerMessage; `id` comes back with the answer (0: no answer wanted). */
  | { type: 'device'; id: number; message: unknown }
  | { type: 'exit' };

export type FromWorker =
  | { type: 'stopped'; index: number; base: number | null }
  /** A 'kick', 'call', 'enable' or 'memory' message of this queue was applied. */
  | { type: 'done'; index: number }
  | { type: 'broken'; index: number; message: string; code?: string }
  | { type: 'log'; level: LogLevel; message: string; fields?: LogFields }
  /** The worker device's metrics now (its registerMetrics registry), for a 'metrics' request. */
  | { type: 'metrics'; metrics: MetricSnapshot }
  /** Its metrics once every queue stopped, the last message before the worker ends. */
  | { type: 'ended'; metrics: MetricSnapshot }
  /** The answer of the device's workerMessage, or the error it threw. */
  | { type: 'device'; id: number; answer?: unknown; error?: string };
