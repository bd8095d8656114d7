/**
 * The virtio-blk device (virtio 1.2 §5.2): feature bits, config space, and the datapath that turns
 * descriptor chains into I/O on a {@link BackingFile} through an {@link IoEngine} per queue.
 *
 * Datapath, per queue and independent of the other queues:
 * - kick: disable notifications, pop every chain, parse it (request.ts) into a preallocated
 *   {@link Slot}, stage its I/O with iovecs pointing straight into guest memory, submit the batch
 *   once, re-enable notifications and drain again if chains arrived meanwhile (virtio 1.2 §2.7.10);
 * - completions come back in batches: write the status byte in place, pushUsed, one flush per batch.
 *
 * Ownership: while a request's I/O is in flight its slot holds `chain.memory` (GuestMemory.hold), so a
 * memory-table change never unmaps pages the kernel is reading or writing. The chain itself belongs
 * to the queue's pool and is not touched after pushUsed.
 */
import { constants as osConstants } from 'node:os';

import type { Registry } from 'prom-client';

import type { DaemonDevice } from '../../lib/cli/run-daemon';
import type { ControlMethod } from '../../lib/control/protocol';
import { RingError } from '../../lib/errors';
import type { BackingFile } from '../../lib/io/backing-file';
import { inlineMode, IoEngine, IoEngineStats, MAX_RESUBMIT_LENGTH, RESUBMIT_SHORT, type InlineTransfer } from '../../lib/io/engine';
import type { ExecutorFactory } from '../../lib/io/executor';
import type { GuestMemory } from '../../lib/memory/guest-memory';
import type { Logger } from '../../lib/runtime/logger';
import type { DeviceContext } from '../../lib/vhost-user/device-backend';
import { ProtocolFeature } from '../../lib/vhost-user/messages';
import { bit } from '../../lib/virtio/constants';
import type { DescriptorChain } from '../../lib/virtqueue/descriptor-chain';
import { SlotPool } from '../../lib/virtqueue/slot-pool';
import { drainQueue } from '../../lib/virtqueue/drain';
import { IOV_MAX, fillIovecs } from '../../lib/virtqueue/iovecs';
import type { Virtqueue } from '../../lib/virtqueue/virtqueue';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, IORING_FSYNC_DATASYNC, IORING_OP } from '../../native/io-batch';
import { BlkQueueStats, createBlkMetrics, requestTypeIndex } from './metrics';
import { BlkOp, BlkRequest, maxIovecs, parseRequest, writeStatus, type RequestLimits } from './request';
import {
  CONFIG_OFFSET,
  REQUEST_HEADER_SIZE,
  SECTOR_SIZE,
  VIRTIO_BLK_F_BLK_SIZE,
  VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  VIRTIO_BLK_F_TOPOLOGY,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_ID_BYTES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  encodeConfigSpace,
  encodeSerial,
  type BlkConfigSpace,
} from './virtio-blk';

const { EOPNOTSUPP, EINVAL, EIO, ENOSPC } = osConstants.errno;

/** Largest discard / write-zeroes segment: 1 GiB, which one zero-buffer writev covers (lib/io/backing-file.ts). */
export const MAX_DISCARD_SECTORS = (1 << 30) / SECTOR_SIZE;
/** Segments per discard / write-zeroes request (Linux caps its own at 256). */
export const MAX_DISCARD_SEG = 32;
/** size_max: largest single data segment the driver should build. */
export const SIZE_MAX = 1 << 20;

/**
 * seg_max for a device accepting queues of up to `queueSize`. Linux builds a request as seg_max data
 * descriptors plus header and status. With indirect descriptors the table may be longer than the
 * ring, but a driver that did not negotiate them must fit the chain in the ring (virtio 1.2
 * §2.7.5.3.1), and the driver reads seg_max before it knows the ring size the front-end picked
 * (QEMU's vhost-user-blk defaults to queue-size=128): size it for the smaller of the two.
 */
export function segMax(queueSize: number): number {
  return Math.min(queueSize, DEFAULT_FRONTEND_QUEUE_SIZE, IOV_MAX) - 2;
}

/** QEMU vhost-user-blk-pci's default queue-size. */
export const DEFAULT_FRONTEND_QUEUE_SIZE = 128;

/** Device settings (from the command line, see cli.ts). */
export interface BlkDeviceOptions {
  readOnly: boolean;
  serial: string;
  numQueues: number;
  queueSize: number;
  /** 512 or 4096. */
  logicalBlockSize: number;
  discard: boolean;
  writeZeroes: boolean;
  /** Initial cache mode (CONFIG_WCE writeback field). */
  writeback: boolean;
}

export interface BlkDeviceDeps {
  image: BackingFile;
  /** Each queue's I/O engine runs on an executor from this factory. */
  createExecutor: ExecutorFactory;
  logger: Logger;
  /** The factory's executor kind, for metrics before the first queue starts (main.ts). */
  executorKind?: string;
  /**
   * Lets each queue's engine run reads and writes on the queue's own thread (native.transferBatch)
   * where the image allows it (IoEngine.addFileReadWrite); absent (--no-inline-io): every op goes to
   * the executor.
   */
  inlineTransfer?: InlineTransfer;
}

/** The counters of a queue that has no engine (yet, or any more). */
const NO_ENGINE_STATS = new IoEngineStats();

/** userData of an op: slot index in the low 16 bits (queue size ≤ 32768), sub-operation above. */
const SLOT_BITS = 16;
const SLOT_MASK = 0xffff;
/** Sub-operation flag: a zero-buffer write standing in for a refused fallocate. */
const ZERO_WRITE = 0x8000;

/** One request in flight: everything the completion needs, preallocated. */
class Slot {
  chain: DescriptorChain | null = null;
  memory: GuestMemory | null = null;
  readonly request = new BlkRequest(MAX_DISCARD_SEG);
  /** Ops not completed yet. */
  pending = 0;
  status = VIRTIO_BLK_S_OK;
  /** READ/WRITE: bytes moved (the engine resubmits short transfers for the rest). */
  done = 0;
  /** Bytes of zeroes written per range (write-zeroes fallback). */
  readonly rangeDone = new Float64Array(MAX_DISCARD_SEG);

  constructor(readonly index: number) {}
}

/** One queue's state. */
class QueueWorker {
  queue: Virtqueue | null = null;
  readonly pool = new SlotPool((i) => new Slot(i));
  /** Requests whose I/O is in flight. */
  inFlight = 0;
  engine: IoEngine | null = null;
  /** Counters the metrics read (metrics.ts). */
  readonly stats = new BlkQueueStats();

  constructor(readonly index: number) {}
}

export class BlkDevice implements DaemonDevice {
  readonly name = 'blk';
  readonly numQueues: number;
  readonly maxQueueSize: number;
  /** Its state is guest memory, the rings and what QEMU sends again at start: live migration works. */
  readonly migratable = true;
  /** Capacity in 512-byte sectors. */
  capacity = 0;
  writeback: boolean;
  readonly limits: RequestLimits;
  private readonly options: BlkDeviceOptions;
  private readonly image: BackingFile;
  private readonly logger: Logger;
  private readonly createExecutor: ExecutorFactory;
  private readonly workers: QueueWorker[];
  private readonly serial: Uint8Array;
  private context: DeviceContext | null = null;
  /** Cleared after the file system refused once, so later requests skip the attempt. */
  private punchHole = true;
  private zeroRange = true;
  private readonly loggedErrors = new Set<number>();
  /** Why the last malformed chain was refused (for the RingError message). */
  private badReason = '';
  /** "io_uring", "thread-pool", "null"... (metrics). */
  executorKind: string;
  private readonly inlineTransfer: InlineTransfer | null;

  constructor(options: BlkDeviceOptions, deps: BlkDeviceDeps) {
    this.options = options;
    this.image = deps.image;
    this.logger = deps.logger;
    this.createExecutor = deps.createExecutor;
    this.executorKind = deps.executorKind ?? '';
    this.inlineTransfer = deps.inlineTransfer ?? null;
    this.numQueues = options.numQueues;
    this.maxQueueSize = options.queueSize;
    this.writeback = options.writeback;
    this.serial = encodeSerial(options.serial);
    this.workers = Array.from({ length: options.numQueues }, (_, i) => new QueueWorker(i));
    this.limits = {
      capacityBytes: 0,
      logicalBlockSize: options.logicalBlockSize,
      readOnly: options.readOnly,
      discard: options.discard,
      writeZeroes: options.writeZeroes,
      maxDiscardSectors: MAX_DISCARD_SECTORS,
      maxDiscardSeg: MAX_DISCARD_SEG,
      maxWriteZeroesSectors: MAX_DISCARD_SECTORS,
      maxWriteZeroesSeg: MAX_DISCARD_SEG,
    };
    this.setCapacity(this.image.size());
  }

  /** Capacity in sectors for an image of `bytes`: whole logical blocks only. */
  private setCapacity(bytes: number): void {
    const lbs = this.options.logicalBlockSize;
    const usable = Math.floor(bytes / lbs) * lbs;
    this.capacity = usable / SECTOR_SIZE;
    this.limits.capacityBytes = usable;
  }

  features(): bigint {
    const o = this.options;
    let f =
      bit(VIRTIO_BLK_F_SIZE_MAX) |
      bit(VIRTIO_BLK_F_SEG_MAX) |
      bit(VIRTIO_BLK_F_BLK_SIZE) |
      bit(VIRTIO_BLK_F_TOPOLOGY) |
      // virtio 1.2 §5.2.5: "Devices SHOULD always offer VIRTIO_BLK_F_FLUSH, and MUST offer it if they
      // offer VIRTIO_BLK_F_CONFIG_WCE."
      bit(VIRTIO_BLK_F_FLUSH) |
      bit(VIRTIO_BLK_F_CONFIG_WCE);
    if (o.numQueues > 1) f |= bit(VIRTIO_BLK_F_MQ);
    if (o.discard) f |= bit(VIRTIO_BLK_F_DISCARD);
    if (o.writeZeroes) f |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
    if (o.readOnly) f |= bit(VIRTIO_BLK_F_RO);
    return f;
  }

  protocolFeatures(): bigint {
    // INFLIGHT_SHMFD: a restarted daemon resubmits the requests a killed one had taken (lib/virtqueue/inflight.ts).
    return bit(ProtocolFeature.CONFIG) | bit(ProtocolFeature.INFLIGHT_SHMFD);
  }

  /** The config space values now. */
  configSpace(): BlkConfigSpace {
    const o = this.options;
    const alignment = o.logicalBlockSize / SECTOR_SIZE;
    return {
      capacity: this.capacity,
      sizeMax: SIZE_MAX,
      segMax: segMax(o.queueSize),
      blkSize: o.logicalBlockSize,
      physicalBlockExp: 0,
      alignmentOffset: 0,
      minIoSize: 1,
      optIoSize: 0,
      writeback: this.effectiveWriteback(),
      numQueues: o.numQueues,
      maxDiscardSectors: o.discard ? MAX_DISCARD_SECTORS : 0,
      maxDiscardSeg: o.discard ? MAX_DISCARD_SEG : 0,
      discardSectorAlignment: o.discard ? alignment : 0,
      maxWriteZeroesSectors: o.writeZeroes ? MAX_DISCARD_SECTORS : 0,
      maxWriteZeroesSeg: o.writeZeroes ? MAX_DISCARD_SEG : 0,
      writeZeroesMayUnmap: o.writeZeroes && this.punchHole,
    };
  }

  getConfig(offset: number, size: number): Uint8Array {
    const bytes = encodeConfigSpace(this.configSpace());
    const out = new Uint8Array(size);
    if (offset < bytes.length) out.set(bytes.subarray(offset, Math.min(offset + size, bytes.length)));
    return out;
  }

  /** Only `writeback` is writable (virtio 1.2 §5.2.4: the driver MAY switch the cache mode with CONFIG_WCE). */
  setConfig(offset: number, data: Uint8Array): void {
    const at = CONFIG_OFFSET.writeback - offset;
    if (at < 0 || at >= data.length) {
      throw new RangeError(`config bytes ${offset}..${offset + data.length - 1} are read-only; only writeback (byte 32) is writable`);
    }
    const writeback = data[at] !== 0;
    if (writeback !== this.writeback) this.logger.info(`cache mode: ${writeback ? 'writeback' : 'writethrough'}`);
    this.writeback = writeback;
  }

  /**
   * Writeback only when the driver can flush: virtio 1.2 §5.2.5 "If VIRTIO_BLK_F_CONFIG_WCE is
   * negotiated but VIRTIO_BLK_F_FLUSH is not, the device MUST initialize writeback to 0", and §5.2.6.2
   * makes writes stable at completion when FLUSH was offered but not negotiated. Before negotiation
   * (QEMU reads the config space at realize time and caches it) the configured mode is reported.
   */
  private effectiveWriteback(): boolean {
    const features = this.context?.features ?? 0n;
    if (features !== 0n && (features & bit(VIRTIO_BLK_F_FLUSH)) === 0n) return false;
    return this.writeback;
  }

  attach(context: DeviceContext): void {
    this.context = context;
  }

  detach(): void {
    this.context = null;
  }

  startQueue(index: number, queue: Virtqueue): void {
    const w = this.workers[index]!;
    w.queue = queue;
    w.pool.ensure(queue.size);
    if (w.engine === null) {
      w.engine = new IoEngine(this.createExecutor, this.options.queueSize, (u, r, n) => this.onCompletions(w, u, r, n), this.inlineTransfer);
      this.executorKind = w.engine.kind;
    }
  }

  /** Resolves once the queue's I/O drained: the front-end may unmap guest memory after. */
  stopQueue(index: number): Promise<void> | void {
    const w = this.workers[index]!;
    if (w.engine === null || w.engine.inFlight === 0) {
      w.queue = null;
      return;
    }
    return w.engine.drained().then(() => {
      w.queue = null;
    });
  }

  processQueue(index: number, queue: Virtqueue): void {
    const w = this.workers[index]!;
    if (w.queue !== queue) this.startQueue(index, queue);
    const engine = w.engine!;
    // A malformed chain breaks the queue; the requests before it still run (drainQueue's policy).
    drainQueue(queue, {
      handle: (chain) => {
        if (!this.startRequest(w, queue, chain)) throw new RingError('VIRTQ_BAD_REQUEST', `queue ${index}: chain ${chain.head}: ${this.badReason}`);
        return true;
      },
      endBatch: () => engine.submit(),
    });
  }

  pollCompletions(index: number): number {
    return this.workers[index]?.engine?.poll() ?? 0;
  }

  /** Parse and start one chain. Returns false for a malformed chain (nothing is completed for it). */
  private startRequest(w: QueueWorker, queue: Virtqueue, chain: DescriptorChain): boolean {
    // The queue never hands out more chains than its size, and there is a slot per entry.
    const slot = w.pool.peek();
    if (slot === undefined) throw new RingError('VIRTQ_TOO_MANY_IN_FLIGHT', `queue ${w.index}: more requests in flight than slots`);
    const req = slot.request;
    if (!parseRequest(chain, this.limits, req)) {
      this.badReason = req.reason;
      return false;
    }
    w.stats.requests[requestTypeIndex(req.type)]!++;
    switch (req.op) {
      case BlkOp.COMPLETE:
        if (req.reason !== '') this.logger.debug(`request type ${req.type}: ${req.reason}`, { queue: w.index, status: req.status });
        if (req.status === VIRTIO_BLK_S_IOERR) w.stats.ioErrors++;
        writeStatus(chain, req.status);
        queue.pushUsed(chain, 1);
        return true;
      case BlkOp.GET_ID: {
        const n = Math.min(VIRTIO_BLK_ID_BYTES, chain.writableLength - 1);
        chain.write(0, n === VIRTIO_BLK_ID_BYTES ? this.serial : this.serial.subarray(0, n));
        writeStatus(chain, VIRTIO_BLK_S_OK);
        queue.pushUsed(chain, n + 1);
        return true;
      }
    }
    // Asynchronous from here: take the slot and hold the guest memory.
    w.pool.take();
    w.inFlight++;
    slot.chain = chain;
    slot.memory = chain.memory;
    slot.memory.hold();
    slot.status = VIRTIO_BLK_S_OK;
    slot.done = 0;
    slot.pending = 0;
    const engine = w.engine!;
    const userData = slot.index;
    switch (req.op) {
      case BlkOp.READ:
      case BlkOp.WRITE:
        slot.pending = 1;
        if (!this.stageReadWrite(w, slot)) {
          slot.pending = 0;
          slot.status = VIRTIO_BLK_S_IOERR;
          this.finish(w, slot);
        }
        break;
      case BlkOp.FLUSH:
        slot.pending = 1;
        engine.addFsync(this.image.fd, IORING_FSYNC_DATASYNC, userData);
        break;
      case BlkOp.DISCARD:
        if (!this.punchHole) {
          // Discard is a hint (virtio 1.2 §5.2.6.2 "the device MAY deallocate"): nothing to do.
          this.finish(w, slot);
          break;
        }
        slot.pending = req.ranges;
        for (let r = 0; r < req.ranges; r++) {
          engine.addFallocate(this.image.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, req.rangeOffset[r]!, req.rangeLength[r]!, userData | (r << SLOT_BITS));
        }
        break;
      case BlkOp.WRITE_ZEROES:
        slot.pending = req.ranges;
        for (let r = 0; r < req.ranges; r++) this.stageWriteZeroes(w, slot, r);
        break;
    }
    return true;
  }

  /** Stage the READ/WRITE of `slot`. Returns false if it needs too many iovecs or bytes for one op. */
  private stageReadWrite(w: QueueWorker, slot: Slot): boolean {
    const chain = slot.chain!;
    const req = slot.request;
    // Far beyond size_max × seg_max (the driver's limits), and one op's result must fit an Int32.
    if (req.length > MAX_RESUBMIT_LENGTH) return false;
    const engine = w.engine!;
    const read = req.op === BlkOp.READ;
    const first = read ? chain.readableSegments : 0;
    const end = read ? chain.segments : chain.readableSegments;
    const skip = read ? 0 : REQUEST_HEADER_SIZE;
    engine.reserveIovecs(maxIovecs(chain, req.op));
    const n = fillIovecs(chain, first, end, skip, req.length, engine.iovBase, engine.iovLen, engine.iovUsed, IOV_MAX);
    if (n < 0) return false;
    const fd = read || this.effectiveWriteback() ? this.image.fd : this.image.syncFd;
    engine.addFileReadWrite(read ? IORING_OP.READV : IORING_OP.WRITEV, fd, this.image.storage, req.offset, n, slot.index);
    return true;
  }

  /** Stage range `r` of a WRITE_ZEROES: fallocate when the file system allows it, else zero writes. */
  private stageWriteZeroes(w: QueueWorker, slot: Slot, r: number): void {
    const req = slot.request;
    const engine = w.engine!;
    const userData = slot.index | (r << SLOT_BITS);
    slot.rangeDone[r] = 0;
    if (req.rangeUnmap[r] !== 0 && this.punchHole) {
      engine.addFallocate(this.image.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, req.rangeOffset[r]!, req.rangeLength[r]!, userData);
    } else if (this.zeroRange) {
      engine.addFallocate(this.image.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, req.rangeOffset[r]!, req.rangeLength[r]!, userData);
    } else {
      this.stageZeroWrite(w, slot, r);
    }
  }

  /** Write zeroes over the rest of range `r` from the shared zero buffer (many iovecs, one buffer). */
  private stageZeroWrite(w: QueueWorker, slot: Slot, r: number): void {
    const req = slot.request;
    const engine = w.engine!;
    const zeroes = this.image.zeroes();
    let left = req.rangeLength[r]! - slot.rangeDone[r]!;
    engine.reserveIovecs(Math.min(IOV_MAX, Math.ceil(left / zeroes.length)));
    const iovBase = engine.iovBase;
    const iovLen = engine.iovLen;
    const at = engine.iovUsed;
    let n = 0;
    for (; left > 0 && n < IOV_MAX; n++) {
      const len = Math.min(left, zeroes.length);
      iovBase[at + n] = zeroes.address;
      iovLen[at + n] = len;
      left -= len;
    }
    const fd = this.effectiveWriteback() ? this.image.fd : this.image.syncFd;
    engine.addReadWrite(IORING_OP.WRITEV, fd, req.rangeOffset[r]! + slot.rangeDone[r]!, n, slot.index | ((r | ZERO_WRITE) << SLOT_BITS), RESUBMIT_SHORT);
  }

  /** A batch of completions from the engine: finish requests, then one flush (the engine submits what they staged). */
  private onCompletions(w: QueueWorker, userData: Uint32Array, result: Int32Array, count: number): void {
    for (let i = 0; i < count; i++) {
      const ud = userData[i]!;
      const slot = w.pool.slots[ud & SLOT_MASK]!;
      if (slot.chain === null) continue; // cannot happen: a completion for an idle slot
      if (this.opCompleted(w, slot, ud >>> SLOT_BITS, result[i]!)) {
        if (--slot.pending === 0) this.finish(w, slot);
      }
    }
    w.queue?.flush();
  }

  /** Account one op's result. Returns false when the op was restaged (zero writes, fallback). */
  private opCompleted(w: QueueWorker, slot: Slot, sub: number, res: number): boolean {
    const req = slot.request;
    switch (req.op) {
      case BlkOp.READ:
      case BlkOp.WRITE:
        // The engine resubmitted short transfers: fewer bytes than asked means the end of the file.
        if (res < 0) return this.fail(slot, res);
        slot.done = res;
        if (slot.done < req.length) return this.fail(slot, req.op === BlkOp.READ ? -EIO : -ENOSPC);
        return true;
      case BlkOp.FLUSH:
        return res < 0 ? this.fail(slot, res) : true;
      case BlkOp.DISCARD:
        if (res === -EOPNOTSUPP) {
          this.noteUnsupported('punch hole');
          this.punchHole = false;
          return true;
        }
        return res < 0 ? this.fail(slot, res) : true;
      case BlkOp.WRITE_ZEROES: {
        const r = sub & ~ZERO_WRITE;
        if ((sub & ZERO_WRITE) !== 0) {
          if (res < 0) return this.fail(slot, res);
          if (res === 0) return this.fail(slot, -ENOSPC);
          slot.rangeDone[r] = slot.rangeDone[r]! + res;
          if (slot.rangeDone[r]! < req.rangeLength[r]!) {
            this.stageZeroWrite(w, slot, r);
            return false;
          }
          return true;
        }
        if (res === -EOPNOTSUPP || res === -EINVAL) {
          // The file system refused this fallocate mode: remember, and zero the range another way.
          if (req.rangeUnmap[r] !== 0 && this.punchHole) {
            this.noteUnsupported('punch hole');
            this.punchHole = false;
          } else {
            this.noteUnsupported('zero range');
            this.zeroRange = false;
          }
          this.stageWriteZeroes(w, slot, r);
          return false;
        }
        return res < 0 ? this.fail(slot, res) : true;
      }
    }
    return true;
  }

  private fail(slot: Slot, res: number): true {
    slot.status = VIRTIO_BLK_S_IOERR;
    const errno = -res;
    if (!this.loggedErrors.has(errno)) {
      this.loggedErrors.add(errno);
      this.logger.warn(`I/O error on ${this.image.path}: errno ${errno}; the guest gets VIRTIO_BLK_S_IOERR (logged once per errno)`, {
        op: slot.request.op,
        offset: slot.request.offset,
      });
    }
    return true;
  }

  private noteUnsupported(what: string): void {
    this.logger.info(`${this.image.path}: the file system refuses fallocate ${what}; using the fallback from now on`);
  }

  /** Complete `slot`: status byte, used element, release memory and slot. */
  private finish(w: QueueWorker, slot: Slot): void {
    const chain = slot.chain!;
    const queue = w.queue;
    writeStatus(chain, slot.status);
    const stats = w.stats;
    if (slot.request.op === BlkOp.READ) stats.readBytes += slot.done;
    else if (slot.request.op === BlkOp.WRITE) stats.writtenBytes += slot.done;
    if (slot.status !== VIRTIO_BLK_S_OK) stats.ioErrors++;
    const written = slot.request.op === BlkOp.READ && slot.status === VIRTIO_BLK_S_OK ? slot.request.length + 1 : 1;
    queue?.pushUsed(chain, written);
    slot.chain = null;
    slot.memory!.release();
    slot.memory = null;
    w.pool.put(slot);
    w.inFlight--;
  }

  /**
   * SIGHUP: re-read the image size. When it changed, the guest learns the new capacity through
   * CONFIG_CHANGE_MSG (virtio 1.2 §5.2.6.2: "The device MAY change the content of the capacity field
   * during operation of the device. When this happens, the device SHOULD trigger a configuration
   * change notification.").
   */
  async reload(): Promise<void> {
    const before = this.capacity;
    this.setCapacity(this.image.size());
    if (this.capacity === before) {
      this.logger.info(`reload: ${this.image.path} unchanged (${before} sectors)`);
      return;
    }
    this.logger.info(`reload: ${this.image.path} capacity ${before} -> ${this.capacity} sectors`);
    if (this.context !== null && !(await this.context.notifyConfigChange())) {
      this.logger.warn('the front-end gave no backend channel: the guest sees the new size only after it re-reads the config space');
    }
  }

  /** Control socket: `resize` does what SIGHUP does and answers the capacity before and after, in sectors. */
  controlMethods(): Record<string, ControlMethod> {
    return {
      resize: {
        description: 'Re-read the image size (after growing it) and tell the guest when it changed',
        call: async () => {
          const previousSectors = this.capacity;
          await this.reload();
          return { device: this.name, previousSectors, sectors: this.capacity, bytes: this.capacity * SECTOR_SIZE };
        },
      },
    };
  }

  /** Release the engines and the image (after every queue stopped). */
  close(): void {
    for (const w of this.workers) {
      w.engine?.close();
      w.engine = null;
    }
    this.image.close();
  }

  /** Requests in flight on queue `index` (tests, metrics). */
  inFlight(index: number): number {
    return this.workers[index]?.inFlight ?? 0;
  }

  /** How queue `index`'s ops ran: inline, inline tries that fell back, executor (metrics.ts). */
  engineStats(index: number): IoEngineStats {
    return this.workers[index]?.engine?.stats ?? NO_ENGINE_STATS;
  }

  /** Whether reads and writes may run inline (logs, tests): "memory", "nowait-reads" or "off". */
  get inlineMode(): string {
    return inlineMode(this.image.storage, this.inlineTransfer !== null);
  }

  /** Counters of queue `index` (metrics.ts). */
  queueStats(index: number): BlkQueueStats {
    return this.workers[index]!.stats;
  }

  /** The `vhostd_blk_*` metrics (daemons/blk/README.md "Metrics"). */
  registerMetrics(registry: Registry): void {
    createBlkMetrics(registry, this);
  }
}
