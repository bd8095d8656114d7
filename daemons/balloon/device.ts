/**
 * virtio-balloon (virtio 1.2 §5.5, device id 5): the host asks the guest to give memory back by
 * setting a target (`num_pages`, in 4 KiB pages), the guest inflates the balloon toward it (PFNs on
 * inflateq) or deflates it (deflateq), reports `actual`, sends memory statistics (statsq) and,
 * with free page reporting, offers ranges it has free (reporting_vq).
 *
 * What makes a vhost-user balloon worth having: the daemon holds the guest memory fds, so a page the
 * guest gives up is really freed (release.ts: fallocate PUNCH_HOLE on the memfd or hugetlbfs file)
 * before the buffer is used (MUST_TELL_HOST).
 *
 * Queues as Linux's virtio_balloon numbers them (init_vqs, and virtio_pci's find_vqs gives an index
 * only to the queues the driver asks for): inflateq 0, deflateq 1, then statsq when STATS_VQ was
 * negotiated, then reporting_vq when REPORTING was (virtio 1.2 §5.5.2: "statsq only exists if
 * VIRTIO_BALLOON_F_STATS_VQ is set", "reporting_vq only exists if VIRTIO_BALLOON_F_REPORTING is set";
 * free_page_vq, which would come between them, is never offered). So the role of a ring depends on
 * the features and is decided when it starts.
 *
 * Everything runs on the main thread (queueGroup → null): the work is bookkeeping plus fallocate
 * calls that already run off the event loop.
 */
import type { Registry } from 'prom-client';

import type { DaemonDevice } from '../../lib/cli/run-daemon';
import { ControlError, RpcErrorCode, type ControlMethod } from '../../lib/control/protocol';
import type { ExecutorFactory } from '../../lib/io/executor';
import type { Logger } from '../../lib/runtime/logger';
import type { DeviceContext } from '../../lib/vhost-user/device-backend';
import { ProtocolFeature } from '../../lib/vhost-user/messages';
import { drainQueue } from '../../lib/virtqueue/drain';
import type { Virtqueue } from '../../lib/virtqueue/virtqueue';
import { bit } from '../../lib/virtio/constants';
import { planReport } from './free-page-reporting';
import { applyDeflate, BALLOON_PAGE_SIZE, BalloonPages, HugePageTracker, planInflate, readPfns } from './inflate-deflate';
import { BalloonStats, createBalloonMetrics, type BalloonMetrics } from './metrics';
import { PageReleaser, type ReleaseResult } from './release';
import { StatsQueue, type GuestStats } from './stats';

// virtio 1.2 §5.5.3: feature bits.
export const VIRTIO_BALLOON_F_MUST_TELL_HOST = 0;
export const VIRTIO_BALLOON_F_STATS_VQ = 1;
export const VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2;
export const VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3;
export const VIRTIO_BALLOON_F_PAGE_POISON = 4;
export const VIRTIO_BALLOON_F_REPORTING = 5;

/**
 * virtio 1.2 §5.5.4: `le32 num_pages; le32 actual;` (free_page_hint_cmd_id and poison_val follow only
 * with features this device does not offer).
 */
export const BALLOON_CONFIG_SIZE = 8;
const ACTUAL_OFFSET = 4;
/** num_pages is a le32: the largest balloon, in pages (16 TiB). */
export const MAX_TARGET_PAGES = 0xffffffff;

/** How long the `stats` control method waits for the driver's refilled buffer. */
const STATS_WAIT_MS = 5000;

export type QueueRole = 'inflate' | 'deflate' | 'stats' | 'reporting';

/** The queues the driver uses with `features` negotiated, in index order (see the file comment). */
export function queueRoles(features: bigint): QueueRole[] {
  const roles: QueueRole[] = ['inflate', 'deflate'];
  if ((features & bit(VIRTIO_BALLOON_F_STATS_VQ)) !== 0n) roles.push('stats');
  if ((features & bit(VIRTIO_BALLOON_F_REPORTING)) !== 0n) roles.push('reporting');
  return roles;
}

export interface BalloonDeviceOptions {
  /** The balloon size to ask for at start, in 4 KiB pages. */
  targetPages: number;
  /** Return the stats buffer this often for fresh numbers; 0: only when the control API asks. */
  statsIntervalMs: number;
  deflateOnOom: boolean;
  freePageReporting: boolean;
  queueSize: number;
  createExecutor: ExecutorFactory;
  logger: Logger;
}

export class BalloonDevice implements DaemonDevice {
  readonly name = 'balloon';
  /** inflateq, deflateq, statsq, reporting_vq: the most a driver uses. */
  readonly numQueues = 4;
  readonly maxQueueSize: number;
  readonly stats = new BalloonStats();
  /** The 4 KiB pages in the balloon, and the huge pages partly in it (hugetlbfs backing). */
  readonly pages = new BalloonPages();
  private readonly huge = new HugePageTracker();
  private readonly options: BalloonDeviceOptions;
  private readonly logger: Logger;
  private context: DeviceContext | null = null;
  private readonly roles: (QueueRole | null)[] = [null, null, null, null];
  private target: number;
  private actual = 0;
  /** Releasers of the running inflate and reporting queues, by queue index. */
  private readonly releasers = new Map<number, PageReleaser>();
  private statsQueue: StatsQueue | null = null;
  private statsTimer: NodeJS.Timeout | null = null;
  private statsWaiters: (() => void)[] = [];
  private guest: GuestStats = { values: {}, unknownTags: 0 };
  private guestStatsAt: Date | null = null;
  private notifying = false;
  private notifyAgain = false;
  private metrics: BalloonMetrics | null = null;

  constructor(options: BalloonDeviceOptions) {
    this.options = options;
    this.logger = options.logger;
    this.maxQueueSize = options.queueSize;
    this.target = options.targetPages;
  }

  /** The balloon size asked of the guest (num_pages), in pages. */
  get targetPages(): number {
    return this.target;
  }

  /** The balloon size the guest reports (actual), in pages. */
  get actualPages(): number {
    return this.actual;
  }

  /** The guest's latest statistics by name (stats.ts STAT_TAGS). */
  get guestStats(): Readonly<Record<string, number>> {
    return this.guest.values;
  }

  get balloonPages(): number {
    return this.pages.count;
  }

  /** Huge pages partly in the balloon (hugetlbfs backing): held until their last 4 KiB page comes. */
  get partialHugePages(): number {
    return this.huge.partial;
  }

  /** Pages in the balloon not released to the host, as their huge page is not wholly in the balloon. */
  get unreleasedPages(): number {
    return this.huge.unreleasedPages;
  }

  features(): bigint {
    let f = bit(VIRTIO_BALLOON_F_MUST_TELL_HOST) | bit(VIRTIO_BALLOON_F_STATS_VQ);
    if (this.options.deflateOnOom) f |= bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
    if (this.options.freePageReporting) f |= bit(VIRTIO_BALLOON_F_REPORTING);
    return f;
  }

  protocolFeatures(): bigint {
    return bit(ProtocolFeature.CONFIG);
  }

  getConfig(offset: number, size: number): Uint8Array {
    const bytes = new Uint8Array(BALLOON_CONFIG_SIZE);
    const view = new DataView(bytes.buffer);
    view.setUint32(0, this.target, true);
    view.setUint32(ACTUAL_OFFSET, this.actual, true);
    const out = new Uint8Array(size);
    if (offset < bytes.length) out.set(bytes.subarray(offset, Math.min(offset + size, bytes.length)));
    return out;
  }

  /**
   * The driver writes `actual` (virtio 1.2 §5.5.6: "the driver ... updates actual"). num_pages is the
   * device's: a write covering it (QEMU forwards all 8 bytes with its own, possibly stale, copy of
   * num_pages) changes nothing there; only a whole `actual` is taken.
   */
  setConfig(offset: number, data: Uint8Array): void {
    const at = ACTUAL_OFFSET - offset;
    if (at < 0 || at + 4 > data.length) {
      throw new RangeError(`config bytes ${offset}..${offset + data.length - 1} do not hold all of actual (bytes 4..7)`);
    }
    const actual = new DataView(data.buffer, data.byteOffset, data.byteLength).getUint32(at, true);
    if (actual !== this.actual) this.logger.debug(`guest balloon: ${actual} pages (target ${this.target})`);
    this.actual = actual;
  }

  queueGroup(): null {
    return null;
  }

  attach(context: DeviceContext): void {
    this.context = context;
  }

  detach(): void {
    this.context = null;
  }

  /** The driver starts over (a reset or a new front-end): nothing is in the balloon. The target stays. */
  reset(): void {
    this.pages.clear();
    this.huge.clear();
    this.actual = 0;
  }

  startQueue(index: number, queue: Virtqueue): void {
    const role = queueRoles(this.context?.features ?? 0n)[index] ?? null;
    this.roles[index] = role;
    if (role === null) {
      this.logger.warn(`queue ${index} started, but the negotiated features give the driver no queue ${index}; it is ignored`);
      return;
    }
    if (role === 'inflate' || role === 'reporting') {
      const releaser = new PageReleaser(this.options.createExecutor, queue.size, this.logger);
      this.releasers.set(index, releaser);
    } else if (role === 'stats') {
      this.statsQueue = new StatsQueue(queue, (stats) => this.onGuestStats(stats));
      if (this.options.statsIntervalMs > 0) {
        this.statsTimer = setInterval(() => this.statsQueue?.request(), this.options.statsIntervalMs);
        this.statsTimer.unref();
      }
    }
  }

  async stopQueue(index: number): Promise<void> {
    const role = this.roles[index];
    this.roles[index] = null;
    const releaser = this.releasers.get(index);
    if (releaser !== undefined) {
      this.releasers.delete(index);
      await releaser.drained(); // their buffers are used now: none stays in flight
      releaser.close();
    }
    if (role === 'stats') {
      if (this.statsTimer !== null) clearInterval(this.statsTimer);
      this.statsTimer = null;
      this.statsQueue?.stop();
      this.statsQueue = null;
    }
  }

  processQueue(index: number, queue: Virtqueue): void {
    switch (this.roles[index]) {
      case 'inflate':
        return this.drainInflate(queue, this.releasers.get(index)!);
      case 'deflate':
        return this.drainDeflate(queue);
      case 'stats':
        return this.statsQueue!.process();
      case 'reporting':
        return this.drainReporting(queue, this.releasers.get(index)!);
      default:
        return undefined;
    }
  }

  /** Inflate: pages into the balloon, released on the host, then the buffer is used. */
  private drainInflate(queue: Virtqueue, releaser: PageReleaser): void {
    drainQueue(queue, {
      handle: (chain) => {
        const memory = chain.memory;
        const pfns = readPfns(chain, this.stats.badPfns);
        const { accepted, ranges } = planInflate(pfns, memory, this.pages, this.huge, this.stats.badPfns);
        this.stats.inflatedPages += accepted;
        memory.hold(); // the regions' fds stay open until the release finished
        releaser.release(ranges, (result) => {
          this.countRelease(result, 'inflate');
          queue.pushUsed(chain, 0);
          queue.flush();
          memory.release();
        });
        return true;
      },
      endBatch: () => releaser.submit(),
    });
  }

  /** Deflate: pages out of the balloon; nothing to do on the host (they fault back in as zeroes). */
  private drainDeflate(queue: Virtqueue): void {
    drainQueue(queue, {
      handle: (chain) => {
        const pfns = readPfns(chain, this.stats.badPfns);
        this.stats.deflatedPages += applyDeflate(pfns, chain.memory, this.pages, this.huge, this.stats.badPfns);
        queue.pushUsed(chain, 0);
        return true;
      },
    });
  }

  /** Free page reporting: release the reported ranges, then use the buffer. */
  private drainReporting(queue: Virtqueue, releaser: PageReleaser): void {
    drainQueue(queue, {
      handle: (chain) => {
        const memory = chain.memory;
        this.stats.reportedBytes += chain.writableLength;
        memory.hold();
        releaser.release(planReport(chain, memory), (result) => {
          this.countRelease(result, 'reporting');
          queue.pushUsed(chain, 0);
          queue.flush();
          memory.release();
        });
        return true;
      },
      endBatch: () => releaser.submit(),
    });
  }

  private countRelease(result: ReleaseResult, source: 'inflate' | 'reporting'): void {
    if (source === 'inflate') this.stats.releasedInflateBytes += result.released;
    else this.stats.releasedReportingBytes += result.released;
    this.stats.releaseErrors += result.failed;
  }

  private onGuestStats(stats: GuestStats): void {
    this.guest = stats;
    this.guestStatsAt = new Date();
    this.metrics?.addGuestStats(Object.keys(stats.values));
    this.stats.statsUpdates++;
    const waiters = this.statsWaiters;
    this.statsWaiters = [];
    for (const wake of waiters) wake();
  }

  /**
   * Set the balloon size to ask for and tell the driver (virtio 1.2 §5.5.6: "the device ... changes
   * num_pages ... and sends a configuration change notification"). Resolves whether the notification
   * reached the front-end. A change made while one is on its way is sent again after it, so the
   * driver always ends up reading the latest target.
   */
  async setTarget(pages: number): Promise<boolean> {
    if (!Number.isSafeInteger(pages) || pages < 0 || pages > MAX_TARGET_PAGES) {
      throw new RangeError(`target ${pages} pages: expected 0..${MAX_TARGET_PAGES}`);
    }
    if (pages !== this.target) this.logger.info(`target: ${this.target} -> ${pages} pages (${(pages * BALLOON_PAGE_SIZE) / 2 ** 20} MiB)`);
    this.target = pages;
    if (this.context === null) return false;
    if (this.notifying) {
      this.notifyAgain = true;
      return true;
    }
    this.notifying = true;
    try {
      let delivered: boolean;
      do {
        this.notifyAgain = false;
        delivered = (await this.context?.notifyConfigChange()) ?? false;
      } while (this.notifyAgain);
      return delivered;
    } finally {
      this.notifying = false;
    }
  }

  /**
   * Give the stats buffer back and wait (bounded) for the driver's refill. Resolves whether fresh
   * numbers arrived; false when no stats buffer is held (no stats queue, or the driver has not
   * refilled the last one yet) or the driver did not answer in time.
   */
  async refreshStats(timeoutMs = STATS_WAIT_MS): Promise<boolean> {
    if (this.statsQueue === null || this.statsQueue.holding === 0) return false;
    const fresh = new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), timeoutMs);
      this.statsWaiters.push(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
    this.statsQueue.request();
    return fresh;
  }

  /** The balloon's state for `vhostctl status` and the `stats` method. */
  status(): Record<string, unknown> {
    return {
      targetPages: this.target,
      targetBytes: this.target * BALLOON_PAGE_SIZE,
      actualPages: this.actual,
      actualBytes: this.actual * BALLOON_PAGE_SIZE,
      balloonPages: this.pages.count,
      partialHugePages: this.huge.partial,
      unreleasedPages: this.huge.unreleasedPages,
      releasedBytes: { inflate: this.stats.releasedInflateBytes, reporting: this.stats.releasedReportingBytes },
      badPfns: { ...this.stats.badPfns },
      releaseErrors: this.stats.releaseErrors,
      guestStats: { ...this.guest.values },
      guestStatsAt: this.guestStatsAt?.toISOString() ?? null,
    };
  }

  controlMethods(): Record<string, ControlMethod> {
    return {
      'set-target': {
        description: 'Set the balloon size (memory to take from the guest) in bytes or 4 KiB pages, and tell the guest',
        params: {
          bytes: { type: 'integer', min: 0, max: MAX_TARGET_PAGES * BALLOON_PAGE_SIZE, description: 'Balloon size in bytes (rounded down to 4 KiB pages)' },
          pages: { type: 'integer', min: 0, max: MAX_TARGET_PAGES, description: 'Balloon size in 4 KiB pages' },
        },
        call: async (params) => {
          const bytes = params.bytes as number | undefined;
          const pages = params.pages as number | undefined;
          if ((bytes === undefined) === (pages === undefined)) {
            throw new ControlError(RpcErrorCode.INVALID_PARAMS, 'give exactly one of "bytes" and "pages"');
          }
          const previousPages = this.target;
          const notified = await this.setTarget(pages ?? Math.floor(bytes! / BALLOON_PAGE_SIZE));
          return { device: this.name, previousPages, notified, ...this.status() };
        },
      },
      stats: {
        description: 'Ask the guest for fresh memory statistics (waits up to 5 s) and return them with the balloon state',
        call: async () => {
          const fresh = await this.refreshStats();
          return { device: this.name, fresh, ...this.status() };
        },
      },
    };
  }

  registerMetrics(registry: Registry): void {
    this.metrics = createBalloonMetrics(registry, this.stats, this);
    this.metrics.addGuestStats(Object.keys(this.guest.values));
  }
}
