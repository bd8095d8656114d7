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
import { IoEngine, RESUBMIT_SHORT } from '../../lib/io/engine';
import type { ExecutorFactory } from '../../lib/io/executor';
import type { GuestMemory } from '../../lib/memory/guest-memory';
import type { Logger } from '../../lib/runtime/logger';
import type { DeviceContext } from '../../lib/vhost-user/device-backend';
import { bit } from '../../lib/virtio/constants';
import { ProtocolFeature } from '../../lib/vhost-user/messages';
import type { DescriptorChain } from '../../lib/virtqueue/descriptor-chain';
import { SlotPool } from '../../lib/virtqueue/slot-pool';
import { drainQueue } from '../../lib/virtqueue/drain';
import { HeldBuffers } from '../../lib/virtqueue/held-buffers';
import { IOV_MAX, fillIovecs } from '../../lib/virtqueue/iovecs';
import type { Virtqueue } from '../../lib/virtqueue/virtqueue';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, IORING_FSYNC_DATASYNC, IORING_OP } from '../../native/io-batch';
import { ScsiControlStats, ScsiQueueStats, TMFS, commandClass, createScsiMetrics } from './metrics';
import { Status } from './target/constants';
import { ScsiAction, ScsiResult, ScsiTarget, type ScsiCommand } from './target/target';
import { parseLun } from './cli';
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
   * The request queues run in worker threads, each with its own device instance: units cannot be
   * added or removed at run time then (the workers would not see the change).
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
}

const { E2BIG } = osConstants.errno;

/** Events kept for a driver that has no event buffer left (Linux gives 8 and returns each at once). */
export const MAX_QUEUED_EVENTS = 64;

/** What became of an event: in a buffer now, waiting for one, dropped (EVENTS_MISSED), or not negotiated. */
export type EventOutcome = 'sent' | 'queued' | 'dropped' | 'not negotiated';

/** userData of an op: slot index in the low 16 bits (queue size ≤ 32768). */
const SLOT_MASK = 0xffff;

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

  constructor(readonly index: number) {}
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
  readonly pool = new SlotPool((i) => new Slot(i));
  inFlight = 0;
  engine: IoEngine | null = null;
  readonly stats = new ScsiQueueStats();
}

export class ScsiDevice implements DaemonDevice {
  readonly name = 'scsi';
  readonly numQueues: number;
  readonly maxQueueSize: number;
  readonly requestQueues: number;
  readonly controlStats = new ScsiControlStats();
  private readonly targets = new Map<number, ScsiTarget>();
  private readonly units: ImageUnit[];
  private readonly queues: RequestQueue[];
  private readonly createExecutor: ExecutorFactory;
  private readonly logger: Logger;
  private readonly command = new ChainCommand();
  private readonly response = new Uint8Array(RESP_HEADER_SIZE);
  private readonly responseView = new DataView(this.response.buffer);
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
    rq.engine ??= new IoEngine(this.createExecutor, this.maxQueueSize, (u, r, n) => this.onCompletions(rq, u, r, n));
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
    const engine = rq.engine!;
    drainQueue(queue, {
      handle: (chain) => {
        if (!this.startCommand(rq, queue, chain)) throw new RingError('VIRTQ_BAD_REQUEST', `queue ${index}: chain ${chain.head}: ${this.badReason}`);
        return true;
      },
      endBatch: () => engine.submit(),
    });
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
      case ScsiAction.READ:
      case ScsiAction.WRITE:
        // virtio 1.2 §5.6.6.1.1: buffers smaller than the transfer are VIRTIO_SCSI_S_OVERRUN, nothing moves.
        if (result.length > (result.action === ScsiAction.READ ? slot.dataIn : slot.dataOut)) {
          this.respond(rq, queue, chain, result, VIRTIO_SCSI_S_OVERRUN, 0, 0);
          return true;
        }
        break;
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
        engine.addReadWrite(read ? IORING_OP.READV : IORING_OP.WRITEV, fd, result.offset, n, slot.index, RESUBMIT_SHORT);
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
    }
    return true;
  }

  /** virtio 1.2 §5.6.6.1: residual = data_length - transferred bytes, for the buffer the command used. */
  private residual(slot: Slot, transferred: number): number {
    if (slot.dataIn > 0) return slot.dataIn - transferred;
    const result = slot.result;
    if (result.status !== Status.GOOD) return slot.dataOut;
    return result.action === ScsiAction.WRITE ? slot.dataOut - result.length : 0;
  }

  /** Write the response header (status, sense, residual) and complete the chain with `dataIn` bytes of data-in. */
  private respond(rq: RequestQueue, queue: Virtqueue | null, chain: DescriptorChain, result: ScsiResult, response: number, residual: number, dataIn: number): void {
    const r = this.response;
    const v = this.responseView;
    r.fill(0);
    const ok = response === VIRTIO_SCSI_S_OK;
    const senseLength = ok ? result.senseLength : 0;
    v.setUint32(RESP_SENSE_LEN, senseLength, true);
    v.setUint32(RESP_RESIDUAL, residual, true);
    r[RESP_STATUS] = ok ? result.status : 0;
    r[RESP_RESPONSE] = response;
    if (senseLength > 0) r.set(result.sense.subarray(0, senseLength), RESP_SENSE);
    chain.write(0, r);
    const stats = rq.stats;
    stats.responses[response]!++;
    if (ok && result.status === Status.CHECK_CONDITION) stats.checkConditions[result.info.key]!++;
    queue?.pushUsed(chain, RESP_HEADER_SIZE + dataIn);
  }

  /** A batch of completions from the engine: finish commands, then one flush. */
  private onCompletions(rq: RequestQueue, userData: Uint32Array, result: Int32Array, count: number): void {
    for (let i = 0; i < count; i++) {
      const slot = rq.pool.slots[userData[i]! & SLOT_MASK]!;
      if (slot.chain === null) continue; // cannot happen: a completion for an idle slot
      const res = result[i]!;
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
        }
        break;
      }
      default:
        // CLEAR ACA (no ACA support) and anything unknown.
        response = VIRTIO_SCSI_S_FUNCTION_REJECTED;
    }
    if (!drain || this.requestsInFlight() === 0) {
      chain.write(0, Uint8Array.of(response));
      queue.pushUsed(chain, 1);
      return true;
    }
    // Commands cannot be cancelled once their I/O is in the kernel: the function completes when they
    // did (each with its own response), so the driver never sees a completion after FUNCTION COMPLETE.
    const memory = chain.memory;
    memory.hold();
    const done = Promise.all(this.queues.map((rq) => rq.engine?.drained())).then(() => {
      chain.write(0, Uint8Array.of(response));
      queue.pushUsed(chain, 1);
      queue.flush();
      memory.release();
      this.pendingControl.delete(done);
    });
    this.pendingControl.add(done);
    return true;
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

  private refuseWithWorkers(): void {
    if (this.options.workerQueues === true) {
      throw new ControlError(RpcErrorCode.INVALID_PARAMS, 'units cannot change while the request queues run in worker threads (--threads)');
    }
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
        call: (params) => {
          this.refuseWithWorkers();
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
          this.logger.info(`LUN ${unit.target}:${unit.lun} added: ${unit.image.path}, ${unit.blocks} blocks of ${unit.blockSize} bytes`);
          const event = this.hotplugEvent(unit, VIRTIO_SCSI_EVT_RESET_RESCAN);
          return { lun: `${unit.target}:${unit.lun}`, blocks: unit.blocks, blockSize: unit.blockSize, event };
        },
      },
      'lun-remove': {
        description: 'Remove a logical unit (its I/O in flight completes first) and tell the guest',
        params: address,
        call: async (params) => {
          this.refuseWithWorkers();
          const unit = this.unitAt(params.lun as string);
          const target = this.targets.get(unit.target)!;
          target.removeUnit(unit.lun);
          if (target.size === 0) this.targets.delete(unit.target);
          this.units.splice(this.units.indexOf(unit), 1);
          const event = this.hotplugEvent(unit, VIRTIO_SCSI_EVT_RESET_REMOVED);
          // Commands already started on the unit still use its image.
          await Promise.all(this.queues.map((rq) => rq.engine?.drained()));
          unit.image.close();
          this.logger.info(`LUN ${unit.target}:${unit.lun} removed`);
          return { lun: `${unit.target}:${unit.lun}`, event };
        },
      },
      'lun-resize': {
        description: 'Re-read the size of a unit\'s image (after growing it) and tell the guest when it changed',
        params: address,
        call: (params) => {
          this.refuseWithWorkers();
          const unit = this.unitAt(params.lun as string);
          const previousBlocks = unit.blocks;
          unit.setCapacity(unit.image.size());
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
    }
    for (const unit of this.units) unit.image.close();
  }
}
