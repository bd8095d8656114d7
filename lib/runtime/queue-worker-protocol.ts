/**
 * Messages between the main thread (queue-workers.ts) and a queue worker (queue-worker-main.ts).
 * Every fd in a message to the worker is a dup the worker owns from then on.
 */
import type { LogFields, LogLevel } from './logger';
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
    }
  | { type: 'kick'; index: number; fd: number }
  | { type: 'call'; index: number; fd: number }
  | { type: 'enable'; index: number; enabled: boolean }
  | { type: 'memory'; index: number; regions: RegionMessage[] }
  | { type: 'stop'; index: number }
  | { type: 'config'; offset: number; data: Uint8Array }
  | { type: 'exit' };

export type FromWorker =
  | { type: 'stopped'; index: number; base: number | null }
  /** A 'kick', 'call', 'enable' or 'memory' message of this queue was applied. */
  | { type: 'done'; index: number }
  | { type: 'broken'; index: number; message: string; code?: string }
  | { type: 'log'; level: LogLevel; message: string; fields?: LogFields };
