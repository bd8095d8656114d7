/**
 * The virtio-scsi device (virtio 1.2 §5.6): the virtio edge of the SCSI target in target/. It turns
 * descriptor chains into commands for {@link ScsiTarget.execute} and back into virtio-scsi responses,
 * and performs the block I/O the target asks for through one {@link IoEngine} per request queue (not
 * per LUN), with iovecs straight into guest memory.
 *
 * Queues: 0 control (task management, asynchronous notification), 1 event (buffers held for hotplug
 * events, {@link HeldBuffers}), 2.. requests. Control and event stay on the main thread
 * (`queueGroup` null); request queues may run in worker threads (`--threads`), each worker with its
 * own device instance, image fds and engines.
 *
 * Ownership as in blk: while a command's I/O is in flight its slot holds `chain.memory`
 * (GuestMemory.hold), so a memory-table change never unmaps pages the kernel is reading or writing.
 */
import { constants as osConstants } from 'node:os';

import type { Registry } from 'prom-client';

import type { DaemonDevice } from '../../lib/cli/run-daemon';
import { ControlError, RpcErrorCode, type ControlMethod } from '../../lib/control/protocol';
import { ConfigError, RingError } from '../../lib/errors';
import { IoEngine, IoEngineStats, RESUBMIT_SHORT, type InlineTransfer } from '../../lib/io/engine';
import type { ExecutorFactory } from '../../lib/io/executor';
import type { GuestMemory } from '../../lib/memory/guest-memory';
import type { Logger } from '../../lib/runtime/logger';
import type { DeviceContext } from '../../lib/vhost-user/device-backend';
import { bit } from '../../lib/virtio/constants';
import { ProtocolFeature } from '../../lib/vhost-user/messages';
import type { DescriptorChain } from '../../lib/virtqueue/descriptor-chain';
import { SlotPool } from '../../lib/virtqueue/slot-pool';
import { drainQueue, type DrainHandler } from '../../lib/virtqueue/drain';
import { HeldBuffers } from '../../lib/virtqueue/held-buffers';
import { IOV_MAX, fillIovecs } from '../../lib/virtqueue/iovecs';
import type { Virtqueue } from '../../lib/virtqueue/virtqueue';
import { native, type Mapping } from '../../native/index';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, IORING_FSYNC_DATASYNC, IORING_OP } from '../../native/io-batch';
import { ScsiControlStats, ScsiQueueStats, TMFS, commandClass, createScsiMetrics } from './metrics';
import { Status } from './target/constants';
import { Bytchk, ScsiAction, ScsiResult, ScsiTarget, type ScsiCommand } from './target/target';
import { parseLun, type LunConfig } from './cli';
import { openUnit, type ImageUnit } from './units';
import {
  AN_REQUEST_SIZE,
  AN_RESPONSE_SIZE,
  CDB_SIZE,
  CMD_CDB,
  CMD_HEADER_SIZE,
  CMD_ID,
  CMD_LUN,
  CONTROL_QUEUE,
  EVENT_QUEUE,
  FIRST_REQUEST_QUEUE,
  NO_LUN,
  RESP_HEADER_SIZE,
  RESP_RESIDUAL,
  RESP_RESPONSE,
  RESP_SENSE,
  RESP_SENSE_LEN,
  RESP_STATUS,
  RESP_STATUS_QUALIFIER,
  TMF_ID,
  TMF_LUN,
  TMF_REQUEST_SIZE,
  VIRTIO_SCSI_F_CHANGE,
  VIRTIO_SCSI_F_HOTPLUG,
  VIRTIO_SCSI_S_BAD_TARGET,
  VIRTIO_SCSI_S_FUNCTION_COMPLETE,
  VIRTIO_SCSI_S_FUNCTION_REJECTED,
  VIRTIO_SCSI_S_FUNCTION_SUCCEEDED,
  VIRTIO_SCSI_S_INCORRECT_LUN,
  VIRTIO_SCSI_S_OK,
  VIRTIO_SCSI_S_OVERRUN,
  VIRTIO_SCSI_T_AN_QUERY,
  VIRTIO_SCSI_T_AN_SUBSCRIBE,
  VIRTIO_SCSI_T_TMF,
  VIRTIO_SCSI_T_TMF_ABORT_TASK,
  VIRTIO_SCSI_T_TMF_ABORT_TASK_SET,
  VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET,
  VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
  VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
  VIRTIO_SCSI_T_TMF_QUERY_TASK,
  VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
  EVENT_SIZE,
  VIRTIO_SCSI_EVT_RESET_REMOVED,
  VIRTIO_SCSI_EVT_RESET_RESCAN,
  VIRTIO_SCSI_T_EVENTS_MISSED,
  VIRTIO_SCSI_T_NO_EVENT,
  VIRTIO_SCSI_T_PARAM_CHANGE,
  VIRTIO_SCSI_T_TRANSPORT_RESET,
  decodeLun,
  encodeLun,
} from './virtio-scsi';

export interface ScsiDeviceOptions {
  /** Request queues (QEMU num_queues); the device has two more (control, event). */
  requestQueues: number;
  queueSize: number;
  /**
   * The request queues run in worker threads, each with its own device instance: the units, their
   * mode pages and task management reach them through device messages ({@link ScsiWorkerMessage}).
   */
  workerQueues?: boolean;
  /** O_DIRECT for units added at run time. */
  direct?: boolean;
}

export interface ScsiDeviceDeps {
  units: ImageUnit[];
  /** Each request queue's I/O engine runs on an executor from this factory. */
  createExecutor: ExecutorFactory;
  logger: Logger;
  /**
   * Lets each request queue's engine run READ/WRITE on the queue's own thread (native.transferBatch)
   * where the unit's image allows it (IoEngine.addFileReadWrite); absent (--no-inline-io): every op
   * goes to the executor.
   */
  inlineTransfer?: InlineTransfer;
}

const { E2BIG, EINVAL, ENOSPC, EOPNOTSUPP } = osConstants.errno;

/** VERIFY reads the medium in chunks of this size into a queue's compare buffer. */
export const VERIFY_CHUNK = 1 << 20;

/** What the op in flight of a multi-step command (WRITE SAME, VERIFY) is. */
const Step = {
  PUNCH_HOLE: 0,
  ZERO_RANGE: 1,
  /** WRITE SAME: a writev of the pattern (or of the zero buffer); VERIFY: a chunk read. */
  TRANSFER: 2,
  /** WRITE SAME with the write cache off after a fallocate: make it durable. */
  SYNC: 3,
} as const;

/** Events kept for a driver that has no event buffer left (Linux gives 8 and returns each at once). */
export const MAX_QUEUED_EVENTS = 64;

/** A unit as a worker thread's device opens it: its options and the buffer of its shared mode pages. */
export interface WorkerUnit {
  config: LunConfig;
  modes: SharedArrayBuffer;
}

/**
 * What the main device tells the devices of the queue worker threads (`--threads`): the units at
 * thread start and every change, and task management that must wait for (or look at) their I/O.
 */
export type ScsiWorkerMessage =
  | { type: 'units'; units: WorkerUnit[] }
  | { type: 'lun-add'; unit: WorkerUnit }
  | { type: 'lun-remove'; target: number; lun: number }
  | { type: 'lun-resize'; target: number; lun: number; bytes: number }
  /** Answer once no command is in flight on the thread's request queues. */
  | { type: 'drain' }
  /** Answer whether a command of `key` (with id `id`, when given) is in flight. */
  | { type: 'query-task'; key: number; id: [number, number] | null };

/** What became of an event: in a buffer now, waiting for one, dropped (EVENTS_MISSED), or not negotiated. */
export type EventOutcome = 'sent' | 'queued' | 'dropped' | 'not negotiated';

/** The counters of a request queue that has no engine (yet, or any more). */
const NO_ENGINE_STATS = new IoEngineStats();

/** userData of an op: slot index in the low 16 bits (queue size ≤ 32768). */
const SLOT_MASK = 0xffff;

/**
 * The virtio-scsi response header (virtio 1.2 §5.6.6.1) at `at` of `b`: sense_len, residual, status
 * qualifier 0, status, response, then the sense data (only with VIRTIO_SCSI_S_OK) and zeroes to the
 * end of the sense field.
 */
function encodeResponse(b: Uint8Array, at: number, result: ScsiResult, response: number, residual: number): void {
  const ok = response === VIRTIO_SCSI_S_OK;
  const senseLength = ok ? result.senseLength : 0;
  putLe32(b, at + RESP_SENSE_LEN, senseLength);
  putLe32(b, at + RESP_RESIDUAL, residual);
  b[at + RESP_STATUS_QUALIFIER] = 0;
  b[at + RESP_STATUS_QUALIFIER + 1] = 0;
  b[at + RESP_STATUS] = ok ? result.status : 0;
  b[at + RESP_RESPONSE] = response;
  for (let i = 0; i < senseLength; i++) b[at + RESP_SENSE + i] = result.sense[i]!;
  b.fill(0, at + RESP_SENSE + senseLength, at + RESP_HEADER_SIZE);
}

function putLe32(b: Uint8Array, at: number, v: number): void {
  b[at] = v & 0xff;
  b[at + 1] = (v >>> 8) & 0xff;
  b[at + 2] = (v >>> 16) & 0xff;
  b[at + 3] = (v >>> 24) & 0xff;
}

/** One command in flight: everything the completion needs, preallocated. */
class Slot {
  chain: DescriptorChain | null = null;
  memory: GuestMemory | null = null;
  target: ScsiTarget | null = null;
  readonly result = new ScsiResult();
  /** Ops not completed yet. */
  pending = 0;
  /** First -errno of the ops, or the bytes a READ/WRITE moved. */
  outcome = 0;
  /** The request's `target << 16 | lun` and id (QUERY TASK). */
  key = 0;
  idLo = 0;
  idHi = 0;
  /** Device-writable bytes after the response header, device-readable bytes after the request header. */
  dataIn = 0;
  dataOut = 0;
  /** WRITE SAME, VERIFY: bytes of the range done, the {@link Step} in flight and its length. */
  done = 0;
  step: number = Step.TRANSFER;
  stepLength = 0;

  constructor(readonly index: number) {}
}

/**
 * A request queue's buffer for VERIFY: medium chunks are read into it (a memfd mapping: io_uring needs
 * a host address, O_DIRECT page alignment) and compared with the data-out buffer. One VERIFY uses it
 * at a time; the others wait in order.
 */
class CompareBuffer {
  private fd = -1;
  private mapping: Mapping | null = null;
  /** Data-out bytes of the chunk, copied out of the chain to compare. */
  readonly dataOut = new Uint8Array(VERIFY_CHUNK);
  owner: Slot | null = null;
  readonly waiting: Slot[] = [];

  get address(): number {
    return this.map().address;
  }

  get view(): Uint8Array {
    return this.map().views[0]!;
  }

  private map(): Mapping {
    if (this.mapping === null) {
      this.fd = native.memfdCreate('vhostd-scsi-verify', VERIFY_CHUNK);
      this.mapping = native.mmap(this.fd, VERIFY_CHUNK, 0, true);
    }
    return this.mapping;
  }

  close(): void {
    if (this.mapping !== null) native.munmap(this.mapping.id);
    if (this.fd >= 0) native.close(this.fd);
    this.mapping = null;
    this.fd = -1;
  }
}

/** The data-out of the chain being parsed, for parameter lists (UNMAP). */
class ChainCommand implements ScsiCommand {
  readonly header = new Uint8Array(CMD_HEADER_SIZE);
  readonly cdb = this.header.subarray(CMD_CDB, CMD_CDB + CDB_SIZE);
  chain: DescriptorChain | null = null;

  readDataOut(dst: Uint8Array): number {
    return this.chain!.read(CMD_HEADER_SIZE, dst);
  }
}

/** One request queue's state. */
class RequestQueue {
  queue: Virtqueue | null = null;
  /** What drains the queue at a kick, made once (not an object and two closures per kick). */
  drain: DrainHandler | null = null;
  readonly pool = new SlotPool((i) => new Slot(i));
  inFlight = 0;
  engine: IoEngine | null = null;
  readonly stats = new ScsiQueueStats();
  readonly compare = new CompareBuffer();
}

export class ScsiDevice implements DaemonDevice {
  readonly name = 'scsi';
  readonly numQueues: number;
  readonly maxQueueSize: number;
  /** Its state is guest memory, the rings and what QEMU sends again at start: live migration works. */
  readonly migratable = true;
  readonly requestQueues: number;
  readonly controlStats = new ScsiControlStats();
  private readonly targets = new Map<number, ScsiTarget>();
  private readonly units: ImageUnit[];
  private readonly queues: RequestQueue[];
  private readonly createExecutor: ExecutorFactory;
  private readonly inlineTransfer: InlineTransfer | null;
  private readonly logger: Logger;
  private readonly command = new ChainCommand();
  /** A response header for a driver that splits it over several buffers. */
  private readonly response = new Uint8Array(RESP_HEADER_SIZE);
  private readonly control = new Uint8Array(TMF_REQUEST_SIZE);
  private readonly controlView = new DataView(this.control.buffer);
  private events: HeldBuffers | null = null;
  /** Events waiting for an event buffer, oldest first: [event, target, lun, reason]. */
  private readonly queuedEvents: [number, number, number, number][] = [];
  /** An event was dropped: the next one sent carries VIRTIO_SCSI_T_EVENTS_MISSED (virtio 1.2 §5.6.6.3.1). */
  private eventsMissed = false;
  /** Events sent to the driver (metrics). */
  eventsSent = 0;
  private readonly event = new Uint8Array(EVENT_SIZE);
  private context: DeviceContext | null = null;
  private readonly options: ScsiDeviceOptions;
  /** Task management functions waiting for I/O to drain. */
  private readonly pendingControl = new Set<Promise<void>>();
  private badReason = '';
  private readonly loggedErrors = new Set<number>();

  constructor(options: ScsiDeviceOptions, deps: ScsiDeviceDeps) {
    this.options = options;
    this.requestQueues = options.requestQueues;
    this.numQueues = FIRST_REQUEST_QUEUE + options.requestQueues;
    this.maxQueueSize = options.queueSize;
    this.createExecutor = deps.createExecutor;
    this.inlineTransfer = deps.inlineTransfer ?? null;
    this.logger = deps.logger;
    this.units = deps.units;
    for (const unit of deps.units) this.addUnit(unit);
    this.queues = Array.from({ length: options.requestQueues }, () => new RequestQueue());
  }

  /** Serve `unit` at its address (RangeError when taken). */
  private addUnit(unit: ImageUnit): void {
    let target = this.targets.get(unit.target);
    if (target === undefined) this.targets.set(unit.target, (target = new ScsiTarget()));
    target.addUnit(unit.lun, unit);
  }

  /** RESET_DEVICE, RESET_OWNER, disconnect: the units' mode pages go back to their power-on values. */
  reset(): void {
    for (const unit of this.units) unit.resetModes();
    this.queuedEvents.length = 0;
    this.eventsMissed = false;
  }

  attach(context: DeviceContext): void {
    this.context = context;
  }

  detach(): void {
    this.context = null;
  }

  /** The units served. */
  logicalUnits(): readonly ImageUnit[] {
    return this.units;
  }

  get unitCount(): number {
    return this.units.length;
  }

  /**
   * HOTPLUG: the event queue carries TRANSPORT_RESET events. CHANGE: QEMU's vhost-user-scsi-pci offers
   * it to the guest whatever the backend says (param_change=on, and the bit is not among the features
   * it asks the backend about), so the guest acknowledges it and the backend must have offered it.
   */
  features(): bigint {
    return bit(VIRTIO_SCSI_F_HOTPLUG) | bit(VIRTIO_SCSI_F_CHANGE);
  }

  protocolFeatures(): bigint {
    // QEMU keeps the config space of vhost-user-scsi itself (no GET_CONFIG). INFLIGHT_SHMFD: a
    // restarted daemon resubmits the commands a killed one had taken (lib/virtqueue/inflight.ts).
    return bit(ProtocolFeature.INFLIGHT_SHMFD);
  }

  /** Control and event queues on the main thread; request queue i in group i. */
  queueGroup(index: number): number | null {
    return index < FIRST_REQUEST_QUEUE ? null : index - FIRST_REQUEST_QUEUE;
  }

  startQueue(index: number, queue: Virtqueue): void {
    if (index === EVENT_QUEUE) {
      this.events = new HeldBuffers(queue);
      return;
    }
    if (index === CONTROL_QUEUE) return;
    const rq = this.queues[index - FIRST_REQUEST_QUEUE]!;
    rq.queue = queue;
    rq.pool.ensure(queue.size);
    rq.engine ??= new IoEngine(this.createExecutor, this.maxQueueSize, (u, r, n) => this.onCompletions(rq, u, r, n), this.inlineTransfer);
    rq.drain ??= {
      handle: (chain) => {
        if (!this.startCommand(rq, rq.queue!, chain)) throw new RingError('VIRTQ_BAD_REQUEST', `queue ${index}: chain ${chain.head}: ${this.badReason}`);
        return true;
      },
      endBatch: () => rq.engine!.submit(),
    };
  }

  /**
   * While the queue driver polls a request queue (`--poll-us`): reap its finished I/O. Without this a
   * READ or WRITE still in flight when the poll begins ends the poll at once, and the next command
   * needs a kick.
   */
  pollCompletions(index: number): number {
    return index < FIRST_REQUEST_QUEUE ? 0 : (this.queues[index - FIRST_REQUEST_QUEUE]?.engine?.poll() ?? 0);
  }

  /** Resolves once nothing of the queue is in flight: I/O drained, TMFs answered, event buffers given back. */
  stopQueue(index: number): Promise<void> | void {
    if (index === CONTROL_QUEUE) {
      if (this.pendingControl.size === 0) return;
      return Promise.all(this.pendingControl).then(() => undefined);
    }
    if (index === EVENT_QUEUE) {
      this.events?.returnAll();
      this.events = null;
      return;
    }
    const rq = this.queues[index - FIRST_REQUEST_QUEUE]!;
    if (rq.engine === null || rq.engine.inFlight === 0) {
      rq.queue = null;
      return;
    }
    return rq.engine.drained().then(() => {
      rq.queue = null;
    });
  }

  processQueue(index: number, queue: Virtqueue): void {
    if (index === CONTROL_QUEUE) {
      drainQueue(queue, { handle: (chain) => this.handleControl(queue, chain) });
      return;
    }
    if (index === EVENT_QUEUE) {
      if (this.events?.queue !== queue) this.startQueue(index, queue);
      const events = this.events!;
      // virtio 1.2 §5.6.6.3: the driver fills the event queue in advance; a buffer waits for an event.
      drainQueue(queue, { handle: (chain) => (events.hold(chain), true) });
      this.flushEvents();
      return;
    }
    const rq = this.queues[index - FIRST_REQUEST_QUEUE]!;
    if (rq.queue !== queue) this.startQueue(index, queue);
    drainQueue(queue, rq.drain!);
  }

  /** Parse and start one command. Returns false for a malformed chain (nothing is completed for it). */
  private startCommand(rq: RequestQueue, queue: Virtqueue, chain: DescriptorChain): boolean {
    // virtio 1.2 §5.6.6.1: the request header (with a cdb_size CDB) is device-readable, the response
    // header (with sense_size sense bytes) device-writable; without both there is nothing to answer.
    if (chain.readableLength < CMD_HEADER_SIZE) {
      this.badReason = `request header shorter than ${CMD_HEADER_SIZE} bytes`;
      return false;
    }
    if (chain.writableLength < RESP_HEADER_SIZE) {
      this.badReason = `response buffer shorter than ${RESP_HEADER_SIZE} bytes`;
      return false;
    }
    const slot = rq.pool.peek();
    if (slot === undefined) throw new RingError('VIRTQ_TOO_MANY_IN_FLIGHT', 'more requests in flight than slots');
    const command = this.command;
    chain.read(0, command.header);
    const h = command.header;
    const key = decodeLun(h, CMD_LUN);
    slot.dataIn = chain.writableLength - RESP_HEADER_SIZE;
    slot.dataOut = chain.readableLength - CMD_HEADER_SIZE;
    const target = key === NO_LUN ? undefined : this.targets.get(key >>> 16);
    if (target === undefined) {
      // No such target (or a LUN format virtio-scsi does not use): the driver skips the target.
      this.respond(rq, queue, chain, slot.result, VIRTIO_SCSI_S_BAD_TARGET, 0, 0);
      return true;
    }
    command.chain = chain;
    const result = slot.result;
    target.execute(key & 0xffff, command, result);
    command.chain = null;
    rq.stats.commands[commandClass(h[CMD_CDB]!)]!++;
    switch (result.action) {
      case ScsiAction.COMPLETE: {
        const n = Math.min(result.dataLength, slot.dataIn);
        if (n > 0) chain.write(RESP_HEADER_SIZE, result.data.subarray(0, n));
        this.respond(rq, queue, chain, result, VIRTIO_SCSI_S_OK, this.residual(slot, n), n);
        return true;
      }
      default:
        // virtio 1.2 §5.6.6.1.1: buffers smaller than the transfer are VIRTIO_SCSI_S_OVERRUN, nothing moves.
        if ((result.action === ScsiAction.READ ? result.length > slot.dataIn : result.dataOutLength > slot.dataOut)) {
          this.respond(rq, queue, chain, result, VIRTIO_SCSI_S_OVERRUN, 0, 0);
          return true;
        }
    }
    // Asynchronous from here: take the slot and hold the guest memory.
    rq.pool.take();
    rq.inFlight++;
    slot.chain = chain;
    slot.memory = chain.memory;
    slot.memory.hold();
    slot.target = target;
    slot.key = key;
    slot.idLo = h[CMD_ID]! | (h[CMD_ID + 1]! << 8) | (h[CMD_ID + 2]! << 16) | (h[CMD_ID + 3]! << 24);
    slot.idHi = h[CMD_ID + 4]! | (h[CMD_ID + 5]! << 8) | (h[CMD_ID + 6]! << 16) | (h[CMD_ID + 7]! << 24);
    slot.outcome = 0;
    slot.pending = 0;
    const engine = rq.engine!;
    const image = (result.unit as ImageUnit).image;
    switch (result.action) {
      case ScsiAction.READ:
      case ScsiAction.WRITE: {
        const read = result.action === ScsiAction.READ;
        const first = read ? chain.readableSegments : 0;
        const end = read ? chain.segments : chain.readableSegments;
        engine.reserveIovecs(Math.min(end - first, IOV_MAX));
        const n = fillIovecs(chain, first, end, read ? RESP_HEADER_SIZE : CMD_HEADER_SIZE, result.length, engine.iovBase, engine.iovLen, engine.iovUsed, IOV_MAX);
        if (n < 0) {
          // More segments than one readv/writev takes (QEMU's seg_max keeps Linux far below): fail the command.
          slot.outcome = -E2BIG;
          this.finish(rq, slot);
          break;
        }
        slot.pending = 1;
        const fd = read || !result.fua ? image.fd : image.syncFd;
        engine.addFileReadWrite(read ? IORING_OP.READV : IORING_OP.WRITEV, fd, image.storage, result.offset, n, slot.index);
        break;
      }
      case ScsiAction.FLUSH:
        slot.pending = 1;
        engine.addFsync(image.fd, IORING_FSYNC_DATASYNC, slot.index);
        break;
      case ScsiAction.UNMAP:
        slot.pending = result.rangeCount;
        for (let r = 0; r < result.rangeCount; r++) {
          engine.addFallocate(image.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, result.rangeOffset[r]!, result.rangeLength[r]!, slot.index);
        }
        break;
      case ScsiAction.WRITE_SAME:
        slot.done = 0;
        slot.pending = 1;
        this.stageWriteSame(rq, slot);
        break;
      case ScsiAction.VERIFY: {
        slot.done = 0;
        slot.pending = 1;
        const compare = rq.compare;
        if (compare.owner === null) this.startVerify(rq, slot);
        else compare.waiting.push(slot);
        break;
      }
    }
    return true;
  }

  /**
   * Stage the next op of a WRITE SAME: a hole (UNMAP bit) or a zero range when the file system takes
   * it, else a writev of up to IOV_MAX iovecs that all point at one buffer: the guest's own data-out
   * block (zero copy) or the image's zero buffer.
   */
  private stageWriteSame(rq: RequestQueue, slot: Slot): void {
    const result = slot.result;
    const unit = result.unit as ImageUnit;
    const engine = rq.engine!;
    if (result.zeroes && slot.done === 0 && ((result.unmap && unit.punchHole) || unit.zeroRange)) {
      slot.step = result.unmap && unit.punchHole ? Step.PUNCH_HOLE : Step.ZERO_RANGE;
      const mode = slot.step === Step.PUNCH_HOLE ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE;
      engine.addFallocate(unit.image.fd, mode | FALLOC_FL_KEEP_SIZE, result.offset, result.length, slot.index);
      return;
    }
    slot.step = Step.TRANSFER;
    let left = result.length - slot.done;
    engine.reserveIovecs(IOV_MAX);
    const iovBase = engine.iovBase;
    const iovLen = engine.iovLen;
    const at = engine.iovUsed;
    let n = 0;
    if (result.zeroes) {
      const zeroes = unit.image.zeroes();
      for (; left > 0 && n < IOV_MAX; n++) {
        iovBase[at + n] = zeroes.address;
        iovLen[at + n] = Math.min(left, zeroes.length);
        left -= iovLen[at + n]!;
      }
    } else {
      // The block, as often as its iovecs fit (it may span several guest segments).
      const chain = slot.chain!;
      while (left > 0) {
        const k = fillIovecs(chain, 0, chain.readableSegments, CMD_HEADER_SIZE, unit.blockSize, iovBase, iovLen, at + n, IOV_MAX - n);
        if (k < 0) break;
        n += k;
        left -= unit.blockSize;
      }
      if (n === 0) {
        // One block spans more than IOV_MAX segments: no writev can carry it.
        slot.outcome = -E2BIG;
        return this.finish(rq, slot);
      }
    }
    slot.stepLength = result.length - slot.done - left;
    engine.addReadWrite(IORING_OP.WRITEV, result.fua ? unit.image.syncFd : unit.image.fd, result.offset + slot.done, n, slot.index, RESUBMIT_SHORT);
  }

  /** One WRITE SAME op completed: fall back, go on, or finish. */
  private writeSameStepDone(rq: RequestQueue, slot: Slot, res: number): void {
    const result = slot.result;
    const unit = result.unit as ImageUnit;
    switch (slot.step) {
      case Step.PUNCH_HOLE:
      case Step.ZERO_RANGE:
        if (res === -EOPNOTSUPP || res === -EINVAL) {
          // The file system refuses this fallocate mode: remember it for the unit, write instead.
          this.logger.info(`${unit.image.path}: the file system refuses fallocate ${slot.step === Step.PUNCH_HOLE ? 'punch hole' : 'zero range'}; WRITE SAME writes from now on`);
          if (slot.step === Step.PUNCH_HOLE) unit.punchHole = false;
          else unit.zeroRange = false;
          return this.stageWriteSame(rq, slot);
        }
        if (res < 0) return this.failStep(rq, slot, res);
        if (result.fua) {
          slot.step = Step.SYNC;
          rq.engine!.addFsync(unit.image.fd, IORING_FSYNC_DATASYNC, slot.index);
          return;
        }
        break;
      case Step.SYNC:
        if (res < 0) return this.failStep(rq, slot, res);
        break;
      case Step.TRANSFER:
        if (res < 0) return this.failStep(rq, slot, res);
        if (res < slot.stepLength) return this.failStep(rq, slot, -ENOSPC); // the engine resubmitted short writes: the end of the device
        slot.done += res;
        if (slot.done < result.length) return this.stageWriteSame(rq, slot);
        break;
    }
    slot.outcome = result.length;
    this.finish(rq, slot);
  }

  private failStep(rq: RequestQueue, slot: Slot, res: number): void {
    slot.outcome = res;
    if (res < 0) this.logError(slot, res);
    this.finish(rq, slot);
  }

  /** Give the queue's compare buffer to VERIFY `slot` and read its first chunk. */
  private startVerify(rq: RequestQueue, slot: Slot): void {
    rq.compare.owner = slot;
    this.stageVerifyChunk(rq, slot);
  }

  private stageVerifyChunk(rq: RequestQueue, slot: Slot): void {
    const result = slot.result;
    const engine = rq.engine!;
    slot.step = Step.TRANSFER;
    slot.stepLength = Math.min(VERIFY_CHUNK, result.length - slot.done);
    engine.reserveIovecs(1);
    engine.iovBase[engine.iovUsed] = rq.compare.address;
    engine.iovLen[engine.iovUsed] = slot.stepLength;
    engine.addReadWrite(IORING_OP.READV, (result.unit as ImageUnit).image.fd, result.offset + slot.done, 1, slot.index, RESUBMIT_SHORT);
  }

  /**
   * A VERIFY chunk was read (`res` bytes or -errno): compare it with the data-out buffer (the same
   * bytes of it, or its one block against each block), then read the next chunk or finish.
   */
  private verifyChunkDone(rq: RequestQueue, slot: Slot, res: number): void {
    const result = slot.result;
    const length = slot.stepLength;
    if (res < 0) return this.failStep(rq, slot, res);
    if (res < length) return this.failStep(rq, slot, slot.done + res); // the end of the device: short of the range
    if (result.compare !== Bytchk.NONE) {
      const chain = slot.chain!;
      const medium = rq.compare.view;
      const expected = rq.compare.dataOut;
      const block = result.unit!.blockSize;
      if (result.compare === Bytchk.ALL) chain.read(CMD_HEADER_SIZE + slot.done, expected.subarray(0, length));
      else chain.read(CMD_HEADER_SIZE, expected.subarray(0, block));
      const step = result.compare === Bytchk.ALL ? length : block;
      for (let at = 0; at < length; at += step) {
        const a = medium.subarray(at, at + step);
        const b = expected.subarray(result.compare === Bytchk.ALL ? at : 0, (result.compare === Bytchk.ALL ? at : 0) + step);
        if (Buffer.compare(a, b) === 0) continue;
        let i = 0;
        while (a[i] === b[i]) i++;
        result.miscompare = slot.done + at + i;
        slot.outcome = result.length;
        return this.finish(rq, slot);
      }
    }
    slot.done += length;
    if (slot.done < result.length) return this.stageVerifyChunk(rq, slot);
    slot.outcome = result.length;
    this.finish(rq, slot);
  }

  /** virtio 1.2 §5.6.6.1: residual = data_length - transferred bytes, for the buffer the command used. */
  private residual(slot: Slot, transferred: number): number {
    if (slot.dataIn > 0) return slot.dataIn - transferred;
    const result = slot.result;
    if (result.status !== Status.GOOD) return slot.dataOut;
    return result.dataOutLength > 0 ? slot.dataOut - result.dataOutLength : 0;
  }

  /** Write the response header (status, sense, residual) and complete the chain with `dataIn` bytes of data-in. */
  private respond(rq: RequestQueue, queue: Virtqueue | null, chain: DescriptorChain, result: ScsiResult, response: number, residual: number, dataIn: number): void {
    // The driver puts the header in one buffer (Linux does): write it there in place, no staging copy.
    const first = chain.readableSegments;
    if (chain.length[first]! >= RESP_HEADER_SIZE) {
      encodeResponse(chain.memory.views[chain.viewId[first]!]!, chain.offset[first]!, result, response, residual);
    } else {
      encodeResponse(this.response, 0, result, response, residual);
      chain.write(0, this.response);
    }
    const stats = rq.stats;
    stats.responses[response]!++;
    if (response === VIRTIO_SCSI_S_OK && result.status === Status.CHECK_CONDITION) stats.checkConditions[result.info.key]!++;
    queue?.pushUsed(chain, RESP_HEADER_SIZE + dataIn);
  }

  /** A batch of completions from the engine: finish commands, then one flush. */
  private onCompletions(rq: RequestQueue, userData: Uint32Array, result: Int32Array, count: number): void {
    for (let i = 0; i < count; i++) {
      const slot = rq.pool.slots[userData[i]! & SLOT_MASK]!;
      if (slot.chain === null) continue; // cannot happen: a completion for an idle slot
      const res = result[i]!;
      const action = slot.result.action;
      if (action === ScsiAction.WRITE_SAME) {
        this.writeSameStepDone(rq, slot, res);
        continue;
      }
      if (action === ScsiAction.VERIFY) {
        this.verifyChunkDone(rq, slot, res);
        continue;
      }
      if (res < 0) {
        if (slot.outcome >= 0) slot.outcome = res;
        this.logError(slot, res);
      } else if (slot.outcome >= 0) {
        slot.outcome = res;
      }
      if (--slot.pending === 0) this.finish(rq, slot);
    }
    rq.queue?.flush();
  }

  private logError(slot: Slot, res: number): void {
    const errno = -res;
    if (this.loggedErrors.has(errno)) return;
    this.loggedErrors.add(errno);
    const unit = slot.result.unit as ImageUnit;
    this.logger.warn(`I/O error on ${unit.image.path}: errno ${errno}; the guest gets CHECK CONDITION (logged once per errno)`, {
      lun: `${unit.target}:${unit.lun}`,
      action: slot.result.action,
    });
  }

  /** Complete `slot`: status and sense from the I/O outcome, response, release memory and slot. */
  private finish(rq: RequestQueue, slot: Slot): void {
    const chain = slot.chain!;
    const result = slot.result;
    slot.target!.completeIo(result, slot.outcome);
    const good = result.status === Status.GOOD;
    let dataIn = 0;
    if (good && result.action === ScsiAction.READ) {
      dataIn = result.length;
      rq.stats.readBytes += result.length;
    } else if (good && result.action === ScsiAction.WRITE) {
      rq.stats.writtenBytes += result.length;
    }
    this.respond(rq, rq.queue, chain, result, VIRTIO_SCSI_S_OK, this.residual(slot, dataIn), dataIn);
    slot.chain = null;
    slot.target = null;
    slot.memory!.release();
    slot.memory = null;
    rq.pool.put(slot);
    rq.inFlight--;
    const compare = rq.compare;
    if (compare.owner === slot) {
      compare.owner = null;
      const next = compare.waiting.shift();
      if (next !== undefined) this.startVerify(rq, next);
    }
  }

  /** One control queue request (virtio 1.2 §5.6.6.2). Returns true (drainQueue goes on). */
  private handleControl(queue: Virtqueue, chain: DescriptorChain): boolean {
    const c = this.control;
    const v = this.controlView;
    if (chain.readableLength < 4) throw new RingError('VIRTQ_BAD_REQUEST', `control queue: chain ${chain.head}: no request type`);
    c.fill(0);
    chain.read(0, c);
    const type = v.getUint32(0, true);
    if (type === VIRTIO_SCSI_T_AN_QUERY || type === VIRTIO_SCSI_T_AN_SUBSCRIBE) {
      if (chain.readableLength < AN_REQUEST_SIZE || chain.writableLength < AN_RESPONSE_SIZE) {
        throw new RingError('VIRTQ_BAD_REQUEST', `control queue: chain ${chain.head}: asynchronous notification request too short`);
      }
      // No asynchronous notification is supported: event_actual 0 (virtio 1.2 §5.6.6.2.2).
      this.controlStats.asyncNotifications++;
      chain.write(0, Uint8Array.of(0, 0, 0, 0, VIRTIO_SCSI_S_OK));
      queue.pushUsed(chain, AN_RESPONSE_SIZE);
      return true;
    }
    if (type !== VIRTIO_SCSI_T_TMF || chain.readableLength < TMF_REQUEST_SIZE || chain.writableLength < 1) {
      throw new RingError('VIRTQ_BAD_REQUEST', `control queue: chain ${chain.head}: ${type === VIRTIO_SCSI_T_TMF ? 'task management request too short' : `unknown request type ${type}`}`);
    }
    const subtype = v.getUint32(4, true);
    this.controlStats.tmfs[Math.min(subtype, TMFS.length - 1)]!++;
    const key = decodeLun(c, TMF_LUN);
    const target = key === NO_LUN ? undefined : this.targets.get(key >>> 16);
    const unitExists = target?.unit(key & 0xffff) !== undefined;
    let response: number;
    let drain = false;
    /** QUERY TASK (SET) with the request queues in workers: they know. */
    let query: Promise<boolean> | null = null;
    switch (subtype) {
      case VIRTIO_SCSI_T_TMF_ABORT_TASK:
      case VIRTIO_SCSI_T_TMF_ABORT_TASK_SET:
      case VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET:
      case VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET:
        response = target === undefined ? VIRTIO_SCSI_S_BAD_TARGET : !unitExists ? VIRTIO_SCSI_S_INCORRECT_LUN : VIRTIO_SCSI_S_FUNCTION_COMPLETE;
        drain = response === VIRTIO_SCSI_S_FUNCTION_COMPLETE;
        break;
      case VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET:
        response = target === undefined ? VIRTIO_SCSI_S_BAD_TARGET : VIRTIO_SCSI_S_FUNCTION_COMPLETE;
        drain = response === VIRTIO_SCSI_S_FUNCTION_COMPLETE;
        break;
      case VIRTIO_SCSI_T_TMF_QUERY_TASK:
      case VIRTIO_SCSI_T_TMF_QUERY_TASK_SET: {
        if (target === undefined) response = VIRTIO_SCSI_S_BAD_TARGET;
        else if (!unitExists) response = VIRTIO_SCSI_S_INCORRECT_LUN;
        else {
          const id: [number, number] | null = subtype === VIRTIO_SCSI_T_TMF_QUERY_TASK ? [v.getUint32(TMF_ID, true) | 0, v.getUint32(TMF_ID + 4, true) | 0] : null;
          // SAM-5 §7.9/7.10: FUNCTION SUCCEEDED when the task (a task of the set) is still there.
          response = this.taskInFlight(key, id) ? VIRTIO_SCSI_S_FUNCTION_SUCCEEDED : VIRTIO_SCSI_S_FUNCTION_COMPLETE;
          if (this.options.workerQueues === true) {
            query = this.messageWorkers({ type: 'query-task', key, id }).then((answers) => answers.some((found) => found === true));
          }
        }
        break;
      }
      default:
        // CLEAR ACA (no ACA support) and anything unknown.
        response = VIRTIO_SCSI_S_FUNCTION_REJECTED;
    }
    const workers = this.options.workerQueues === true;
    if (query === null && (!drain || (!workers && this.requestsInFlight() === 0))) {
      chain.write(0, Uint8Array.of(response));
      queue.pushUsed(chain, 1);
      return true;
    }
    // Commands cannot be cancelled once their I/O is in the kernel: the function completes when they
    // did (each with its own response), on every request queue, those in worker threads too, so the
    // driver never sees a completion after FUNCTION COMPLETE.
    const answer: Promise<number> =
      query !== null
        ? query.then((found) => (found ? VIRTIO_SCSI_S_FUNCTION_SUCCEEDED : response))
        : Promise.all([this.drained(), workers ? this.messageWorkers({ type: 'drain' }) : null]).then(() => response);
    const memory = chain.memory;
    memory.hold();
    const done = answer
      .catch((err: Error) => {
        this.logger.warn(`task management: the queue workers did not answer: ${err.message}`);
        return VIRTIO_SCSI_S_FUNCTION_REJECTED;
      })
      .then((r) => {
        chain.write(0, Uint8Array.of(r));
        queue.pushUsed(chain, 1);
        queue.flush();
        memory.release();
        this.pendingControl.delete(done);
      });
    this.pendingControl.add(done);
    return true;
  }

  /** Resolves once no command is in flight on this instance's request queues. */
  private drained(): Promise<unknown> {
    return Promise.all(this.queues.map((rq) => rq.engine?.drained()));
  }

  /** {@link ScsiWorkerMessage} to the devices of the running queue worker threads; their answers. */
  private messageWorkers(message: ScsiWorkerMessage): Promise<unknown[]> {
    return this.context?.messageWorkers?.(message) ?? Promise.resolve([]);
  }

  /** Main device: the units a new queue worker thread's device must serve, with their shared mode pages. */
  workerState(): ScsiWorkerMessage | undefined {
    if (this.options.workerQueues !== true) return undefined;
    return { type: 'units', units: this.units.map((u) => this.workerUnit(u)) };
  }

  private workerUnit(unit: ImageUnit): WorkerUnit {
    // Units come from --lun, --luns or lun-add, all through openUnit, which records the config.
    return { config: unit.config!, modes: unit.modesBuffer };
  }

  /** A queue worker thread's device: a {@link ScsiWorkerMessage} from the main device. */
  async workerMessage(message: unknown): Promise<unknown> {
    const m = message as ScsiWorkerMessage;
    switch (m.type) {
      case 'units': {
        const wanted = new Set(m.units.map((u) => (u.config.target << 16) | u.config.lun));
        for (const unit of [...this.units]) {
          if (!wanted.has((unit.target << 16) | unit.lun)) await this.removeUnit(unit);
        }
        for (const u of m.units) this.adoptUnit(u);
        return true;
      }
      case 'lun-add':
        this.adoptUnit(m.unit);
        return true;
      case 'lun-remove': {
        const unit = this.targets.get(m.target)?.unit(m.lun) as ImageUnit | undefined;
        if (unit !== undefined) await this.removeUnit(unit);
        return true;
      }
      case 'lun-resize': {
        (this.targets.get(m.target)?.unit(m.lun) as ImageUnit | undefined)?.setCapacity(m.bytes);
        return true;
      }
      case 'drain':
        await this.drained();
        return true;
      case 'query-task':
        return this.taskInFlight(m.key, m.id);
      default:
        throw new TypeError(`unknown scsi worker message ${String((m as { type?: unknown }).type)}`);
    }
  }

  /** Serve the unit the main device describes (open it unless it is here), sharing its mode pages. */
  private adoptUnit(u: WorkerUnit): void {
    let unit = this.targets.get(u.config.target)?.unit(u.config.lun) as ImageUnit | undefined;
    if (unit === undefined) {
      unit = openUnit(u.config, this.options.direct === true);
      this.addUnit(unit);
      this.units.push(unit);
    }
    unit.shareModes(u.modes);
  }

  /** Stop serving `unit`; its image closes once the commands already started on it completed. */
  private async removeUnit(unit: ImageUnit): Promise<void> {
    const target = this.targets.get(unit.target)!;
    target.removeUnit(unit.lun);
    if (target.size === 0) this.targets.delete(unit.target);
    this.units.splice(this.units.indexOf(unit), 1);
    await this.drained();
    unit.image.close();
  }

  /** Commands in flight on this instance's request queues. */
  private requestsInFlight(): number {
    let n = 0;
    for (const rq of this.queues) n += rq.inFlight;
    return n;
  }

  /** Is a command of `key` (with `id`, when given) in flight on this instance's request queues? */
  private taskInFlight(key: number, id: [number, number] | null): boolean {
    for (const rq of this.queues) {
      if (rq.inFlight === 0) continue;
      for (const slot of rq.pool.slots) {
        if (slot.chain !== null && slot.key === key && (id === null || (slot.idLo === id[0] && slot.idHi === id[1]))) return true;
      }
    }
    return false;
  }

  /**
   * Tell the driver of an event (virtio 1.2 §5.6.6.3): in the oldest held event buffer, or, when the
   * driver has none left, once it gives one (up to {@link MAX_QUEUED_EVENTS} wait; more are dropped and
   * the next event sent carries VIRTIO_SCSI_T_EVENTS_MISSED, on which Linux rescans the whole bus).
   */
  private sendEvent(event: number, target: number, lun: number, reason: number): EventOutcome {
    if (this.queuedEvents.length === 0 && this.deliverEvent(event, target, lun, reason)) return 'sent';
    if (this.queuedEvents.length < MAX_QUEUED_EVENTS) {
      this.queuedEvents.push([event, target, lun, reason]);
      return 'queued';
    }
    this.eventsMissed = true;
    return 'dropped';
  }

  /** Event buffers arrived: send the events that waited, then say so if some were dropped. */
  private flushEvents(): void {
    const queued = this.queuedEvents;
    while (queued.length > 0 && this.deliverEvent(...queued[0]!)) queued.shift();
    if (queued.length === 0 && this.eventsMissed) this.deliverEvent(VIRTIO_SCSI_T_NO_EVENT, 0, 0, 0);
  }

  /** Put an event in the oldest held event buffer; false when none is held. */
  private deliverEvent(event: number, target: number, lun: number, reason: number): boolean {
    const events = this.events;
    for (let chain = events?.take() ?? null; chain !== null; chain = events!.take()) {
      if (chain.writableLength < EVENT_SIZE) {
        // Too small to carry an event: give it back empty.
        events!.queue.pushUsed(chain, 0);
        continue;
      }
      const e = this.event;
      const v = new DataView(e.buffer);
      v.setUint32(0, (event | (this.eventsMissed ? VIRTIO_SCSI_T_EVENTS_MISSED : 0)) >>> 0, true);
      e.set(event === VIRTIO_SCSI_T_NO_EVENT ? new Uint8Array(8) : encodeLun(target, lun), 4);
      v.setUint32(12, reason, true);
      chain.write(0, e);
      events!.queue.pushUsed(chain, EVENT_SIZE);
      events!.queue.flush();
      this.eventsMissed = false;
      this.eventsSent++;
      return true;
    }
    return false;
  }

  /** TRANSPORT_RESET with `reason` for `unit`, if the driver negotiated HOTPLUG. */
  private hotplugEvent(unit: ImageUnit, reason: number): EventOutcome {
    if (!this.negotiated(VIRTIO_SCSI_F_HOTPLUG)) return 'not negotiated';
    return this.sendEvent(VIRTIO_SCSI_T_TRANSPORT_RESET, unit.target, unit.lun, reason);
  }

  /** Is `feature` negotiated with the driver now? */
  private negotiated(feature: number): boolean {
    return ((this.context?.features ?? 0n) & bit(feature)) !== 0n;
  }

  private unitAt(address: string): ImageUnit {
    const m = /^(?:(\d+):)?(\d+)$/.exec(address);
    const target = this.targets.get(Number(m?.[1] ?? 0));
    const unit = m === null ? undefined : (target?.unit(Number(m[2])) as ImageUnit | undefined);
    if (unit === undefined) throw new ControlError(RpcErrorCode.INVALID_PARAMS, `no logical unit at ${address}`);
    return unit;
  }

  /**
   * Control socket: hotplug (`lun-add`, `lun-remove`) and `lun-resize`. The guest learns of each through
   * the event queue: TRANSPORT_RESET with RESCAN or REMOVED (HOTPLUG), PARAM_CHANGE with CAPACITY DATA
   * HAS CHANGED (CHANGE).
   */
  controlMethods(): Record<string, ControlMethod> {
    const address = { lun: { type: 'string', required: true, description: 'The unit, [TARGET:]LUN' } } as const;
    return {
      'lun-add': {
        description: 'Add a logical unit ([TARGET:]LUN=IMAGE[,ro][,serial=S][,block-size=N][,discard], as --lun) and tell the guest',
        params: { spec: { type: 'string', required: true, description: 'As --lun: [TARGET:]LUN=IMAGE[,ro][,serial=S][,block-size=512|4096][,discard]' } },
        call: async (params) => {
          let unit: ImageUnit;
          try {
            const config = parseLun(params.spec as string);
            if (this.targets.get(config.target)?.unit(config.lun) !== undefined) throw new ConfigError('CONFIG_CONFLICT', `LUN ${config.target}:${config.lun} is in use`);
            unit = openUnit(config, this.options.direct === true);
          } catch (err) {
            if (err instanceof ConfigError) throw new ControlError(RpcErrorCode.INVALID_PARAMS, err.message);
            throw err;
          }
          this.addUnit(unit);
          this.units.push(unit);
          try {
            // The request queues in worker threads open it too before the guest hears of it.
            await this.messageWorkers({ type: 'lun-add', unit: this.workerUnit(unit) });
          } catch (err) {
            await this.messageWorkers({ type: 'lun-remove', target: unit.target, lun: unit.lun }).catch(() => undefined);
            await this.removeUnit(unit);
            throw new ControlError(RpcErrorCode.INTERNAL_ERROR, `LUN ${unit.target}:${unit.lun}: ${(err as Error).message}`);
          }
          this.logger.info(`LUN ${unit.target}:${unit.lun} added: ${unit.image.path}, ${unit.blocks} blocks of ${unit.blockSize} bytes`);
          const event = this.hotplugEvent(unit, VIRTIO_SCSI_EVT_RESET_RESCAN);
          return { lun: `${unit.target}:${unit.lun}`, blocks: unit.blocks, blockSize: unit.blockSize, event };
        },
      },
      'lun-remove': {
        description: 'Remove a logical unit (its I/O in flight completes first) and tell the guest',
        params: address,
        call: async (params) => {
          const unit = this.unitAt(params.lun as string);
          const removed = this.removeUnit(unit);
          const event = this.hotplugEvent(unit, VIRTIO_SCSI_EVT_RESET_REMOVED);
          // Commands already started on the unit still use its image, here and in the workers.
          await Promise.all([removed, this.messageWorkers({ type: 'lun-remove', target: unit.target, lun: unit.lun })]);
          this.logger.info(`LUN ${unit.target}:${unit.lun} removed`);
          return { lun: `${unit.target}:${unit.lun}`, event };
        },
      },
      'lun-resize': {
        description: 'Re-read the size of a unit\'s image (after growing it) and tell the guest when it changed',
        params: address,
        call: async (params) => {
          const unit = this.unitAt(params.lun as string);
          const previousBlocks = unit.blocks;
          const bytes = unit.image.size();
          unit.setCapacity(bytes);
          await this.messageWorkers({ type: 'lun-resize', target: unit.target, lun: unit.lun, bytes });
          // SPC-4 ASC/ASCQ 2Ah/09h CAPACITY DATA HAS CHANGED, as the event's reason (ASC, then ASCQ << 8).
          let event: EventOutcome | 'none' = 'none';
          if (unit.blocks !== previousBlocks) {
            event = this.negotiated(VIRTIO_SCSI_F_CHANGE) ? this.sendEvent(VIRTIO_SCSI_T_PARAM_CHANGE, unit.target, unit.lun, 0x2a | (0x09 << 8)) : 'not negotiated';
          }
          return { lun: `${unit.target}:${unit.lun}`, previousBlocks, blocks: unit.blocks, event };
        },
      },
    };
  }

  /** Event buffers held (metrics). */
  heldEventBuffers(): number {
    return this.events?.count ?? 0;
  }

  /** Counters of request queue `index` (metrics.ts). */
  queueStats(index: number): ScsiQueueStats {
    return this.queues[index]!.stats;
  }

  /** How request queue `index`'s I/O ops ran: inline, inline tries that fell back, executor (metrics.ts). */
  engineStats(index: number): IoEngineStats {
    return this.queues[index]?.engine?.stats ?? NO_ENGINE_STATS;
  }

  /** Commands in flight on request queue `index` (tests). */
  inFlight(index: number): number {
    return this.queues[index]?.inFlight ?? 0;
  }

  /** The `vhostd_scsi_*` metrics (daemons/scsi/README.md "Metrics"). */
  registerMetrics(registry: Registry): void {
    createScsiMetrics(registry, this);
  }

  /** Release the engines and the images (after every queue stopped). */
  close(): void {
    for (const rq of this.queues) {
      rq.engine?.close();
      rq.engine = null;
      rq.compare.close();
    }
    for (const unit of this.units) unit.image.close();
  }
}
