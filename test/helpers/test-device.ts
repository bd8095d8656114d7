/**
 * A tiny device for protocol tests. Each chain's readable bytes come back reversed in its writable
 * part (queue 0) or xor'ed with 0xff (queue 1), and the chain completes with the number of bytes
 * written, so a test can tell both queues apart and check every byte that crossed guest memory.
 *
 * Config space is 16 known bytes (0xa0 + i); bytes 8..15 are writable, 0..7 are read-only and
 * SET_CONFIG on them throws. The device counts what the engine asked of it and records the order
 * of its lifecycle hooks in `calls` (a worker's instance also logs each as `{ call }`, which reaches
 * the main thread's logger).
 */
import { RequestRefused } from '../../lib/errors';
import type { GuestMemory } from '../../lib/memory/guest-memory';
import type { Logger } from '../../lib/runtime/logger';
import type { DeviceBackend, DeviceContext } from '../../lib/vhost-user/device-backend';
import { ProtocolFeature } from '../../lib/vhost-user/messages';
import {
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
  bit,
} from '../../lib/virtio/constants';
import type { DescriptorChain } from '../../lib/virtqueue/descriptor-chain';
import { drainQueue } from '../../lib/virtqueue/drain';
import type { Virtqueue } from '../../lib/virtqueue/virtqueue';

export const TEST_CONFIG_SIZE = 16;
export const TEST_CONFIG_WRITABLE_FROM = 8;

export function initialTestConfig(): Uint8Array {
  return Uint8Array.from({ length: TEST_CONFIG_SIZE }, (_, i) => 0xa0 + i);
}

/** What the device does to a chain's readable bytes on queue `index` (tests compute the expectation with it). */
export function transform(index: number, input: Uint8Array): Uint8Array {
  return index === 0 ? input.slice().reverse() : input.map((b) => b ^ 0xff);
}

export interface TestDeviceOptions {
  numQueues?: number;
  maxQueueSize?: number;
  /** Complete chains from a later event-loop turn, in reverse pop order (out-of-order completion). */
  deferred?: boolean;
  /** Offer live migration (VHOST_F_LOG_ALL, LOG_SHMFD): the engine logs what the device writes. */
  migratable?: boolean;
  /** `queueGroup(i)` answers `queueGroups[i]` (null: main thread); without it the engine's default. */
  queueGroups?: (number | null)[];
  /** Offer VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD (crash-safe restart tests). */
  inflight?: boolean;
  /**
   * The chains popped at these positions (0-based, per queue) are kept and never completed, and a
   * stop leaves them behind: what a daemon killed with requests in flight leaves.
   */
  holdPops?: number[];
  /**
   * Called as the device takes each chain, with the queue index and its pop count (0-based), before
   * it is handled: a main-thread test looks at what the front-end sees in the middle of a batch.
   */
  onPop?: (index: number, popped: number) => void;
}

export class TestDevice implements DeviceBackend {
  readonly name = 'test';
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly migratable: boolean;
  readonly config = initialTestConfig();
  readonly starts: number[];
  readonly stops: number[];
  /** Chains completed per queue. */
  readonly completed: number[];
  /** Errors thrown out of processQueue (RingError...), per queue. */
  readonly errors: Error[][];
  attaches = 0;
  detaches = 0;
  context: DeviceContext | null = null;
  /** Lifecycle hooks in the order they came: "attach", "memory 2" (regions), "start 0", "enabled 0 true", "stop 0", "reset", "detach". */
  readonly calls: string[] = [];
  private readonly deferred: boolean;
  private readonly inflight: boolean;
  private readonly holdPops: ReadonlySet<number>;
  private readonly onPop: ((index: number, popped: number) => void) | undefined;
  /** Chains popped per queue, and those held (see holdPops). */
  private readonly popped: number[];
  readonly held: DescriptorChain[][];
  private readonly pending: Array<Array<{ queue: Virtqueue; chain: DescriptorChain; written: number }>>;
  private readonly drained: Array<Array<() => void>>;

  constructor(
    opts: TestDeviceOptions = {},
    private readonly logger?: Logger,
  ) {
    this.numQueues = opts.numQueues ?? 2;
    if (opts.queueGroups !== undefined) {
      const groups = opts.queueGroups;
      this.queueGroup = (index) => groups[index] ?? null;
    }
    this.maxQueueSize = opts.maxQueueSize ?? 32768;
    this.migratable = opts.migratable ?? false;
    this.deferred = opts.deferred ?? false;
    this.inflight = opts.inflight ?? false;
    this.holdPops = new Set(opts.holdPops);
    this.onPop = opts.onPop;
    this.popped = new Array<number>(this.numQueues).fill(0);
    this.held = Array.from({ length: this.numQueues }, () => []);
    this.starts = new Array<number>(this.numQueues).fill(0);
    this.stops = new Array<number>(this.numQueues).fill(0);
    this.completed = new Array<number>(this.numQueues).fill(0);
    this.errors = Array.from({ length: this.numQueues }, () => []);
    this.pending = Array.from({ length: this.numQueues }, () => []);
    this.drained = Array.from({ length: this.numQueues }, () => []);
  }

  features(): bigint {
    return bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_PACKED) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC);
  }

  protocolFeatures(): bigint {
    return bit(ProtocolFeature.CONFIG) | (this.inflight ? bit(ProtocolFeature.INFLIGHT_SHMFD) : 0n);
  }

  getConfig(offset: number, size: number): Uint8Array {
    const out = new Uint8Array(size);
    if (offset < this.config.length) out.set(this.config.subarray(offset, Math.min(offset + size, this.config.length)));
    return out;
  }

  setConfig(offset: number, data: Uint8Array): void {
    if (offset < TEST_CONFIG_WRITABLE_FROM || offset + data.length > TEST_CONFIG_SIZE) {
      throw new RangeError(`config bytes ${offset}..${offset + data.length} are read-only`);
    }
    this.config.set(data, offset);
  }

  queueGroup?: (index: number) => number | null;

  private record(call: string): void {
    this.calls.push(call);
    this.logger?.info(`device call ${call}`, { call });
  }

  attach(context: DeviceContext): void {
    this.attaches++;
    this.context = context;
    this.record('attach');
  }

  detach(): void {
    this.detaches++;
    this.context = null;
    this.record('detach');
  }

  reset(): void {
    this.record('reset');
  }

  /** Main device: what {@link workerState} hands each new worker thread's device. */
  stateForWorkers: unknown = undefined;

  workerState(): unknown {
    return this.stateForWorkers;
  }

  /** A worker's device: records "message <JSON>", answers with the message and its completed counts; 'refuse' throws. */
  workerMessage(message: unknown): unknown {
    this.record(`message ${JSON.stringify(message)}`);
    if (message === 'refuse') throw new Error('refused by the test device');
    return { message, completed: [...this.completed] };
  }

  memoryChanged(memory: GuestMemory): void {
    this.record(`memory ${memory.regions.length}`);
  }

  queueEnabled(index: number, enabled: boolean): void {
    this.record(`enabled ${index} ${enabled}`);
  }

  startQueue(index: number): void {
    this.starts[index]!++;
    this.record(`start ${index}`);
  }

  stopQueue(index: number): Promise<void> | void {
    this.stops[index]!++;
    this.record(`stop ${index}`);
    if (this.pending[index]!.length === 0) return;
    return new Promise((resolve) => this.drained[index]!.push(resolve));
  }

  processQueue(index: number, queue: Virtqueue): void {
    try {
      drainQueue(queue, {
        handle: (chain) => {
          this.onPop?.(index, this.popped[index]!);
          if (this.holdPops.has(this.popped[index]!++)) {
            this.held[index]!.push(chain);
            return true;
          }
          const input = new Uint8Array(chain.readableLength);
          chain.read(0, input);
          const output = transform(index, input);
          const written = chain.write(0, output.subarray(0, Math.min(output.length, chain.writableLength)));
          if (this.deferred) {
            if (this.pending[index]!.length === 0) setImmediate(() => this.completeDeferred(index));
            this.pending[index]!.push({ queue, chain, written });
          } else {
            queue.pushUsed(chain, written);
            this.completed[index]!++;
          }
          return true;
        },
      });
    } catch (err) {
      this.errors[index]!.push(err as Error);
      throw err;
    }
  }

  private completeDeferred(index: number): void {
    const batch = this.pending[index]!.splice(0).reverse();
    for (const { queue, chain, written } of batch) {
      queue.pushUsed(chain, written);
      this.completed[index]!++;
    }
    batch[0]?.queue.flush();
    for (const resolve of this.drained[index]!.splice(0)) resolve();
  }
}

/**
 * Factory for queue worker threads (lib/runtime/queue-workers.ts): the worker requires this module
 * and builds its own TestDevice from plain options.
 */
export function createTestDeviceForWorker(options: TestDeviceOptions, logger: Logger): TestDevice {
  return new TestDevice(options, logger);
}

/** A TestDevice with the virtio-net hooks (NET_SET_MTU, SEND_RARP); it refuses MTUs above 9000. */
export class NetTestDevice extends TestDevice {
  static readonly MAX_MTU = 9000;
  readonly mtus: number[] = [];
  readonly rarps: Uint8Array[] = [];

  setMtu(mtu: number): void {
    if (mtu > NetTestDevice.MAX_MTU) throw new RequestRefused(`MTU ${mtu} exceeds ${NetTestDevice.MAX_MTU}`);
    this.mtus.push(mtu);
  }

  sendRarp(mac: Uint8Array): void {
    this.rarps.push(mac);
  }
}
