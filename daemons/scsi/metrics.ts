/**
 * The scsi daemon's own Prometheus metrics (`vhostd_scsi_*`, listed in daemons/scsi/README.md). The
 * datapath only adds to the plain numbers of a {@link ScsiQueueStats} per request queue and of the
 * device's {@link ScsiControlStats}; the metrics read them at scrape time. Labels are bounded: the
 * request queue, the command class (13 values), the sense key (16), the TMF (9), the virtio response
 * (13); never a LUN (a daemon may serve thousands).
 */
import { Gauge, type Registry } from 'prom-client';

import type { IoEngineStats } from '../../lib/io/engine';
import { collectedCounter, queueCounter, queueCountsCounter, valueCounter } from '../../lib/metrics/collected';
import { ioEngineCounters } from '../../lib/metrics/io-engine';
import { Op } from './target/constants';

/** Values of the `command` label, indexed by {@link commandClass}. */
export const COMMAND_CLASSES = [
  'read',
  'write',
  'synchronize_cache',
  'unmap',
  'write_same',
  'verify',
  'inquiry',
  'read_capacity',
  'mode_sense',
  'report_luns',
  'request_sense',
  'test_unit_ready',
  'other',
] as const;

const CLASS_OF = new Uint8Array(256).fill(COMMAND_CLASSES.indexOf('other'));
for (const [ops, name] of [
  [[Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16], 'read'],
  [[Op.WRITE_6, Op.WRITE_10, Op.WRITE_12, Op.WRITE_16], 'write'],
  [[Op.SYNCHRONIZE_CACHE_10, Op.SYNCHRONIZE_CACHE_16], 'synchronize_cache'],
  [[Op.UNMAP], 'unmap'],
  [[Op.WRITE_SAME_10, Op.WRITE_SAME_16], 'write_same'],
  [[Op.VERIFY_10, Op.VERIFY_16], 'verify'],
  [[Op.INQUIRY], 'inquiry'],
  [[Op.READ_CAPACITY_10, Op.SERVICE_ACTION_IN_16], 'read_capacity'],
  [[Op.MODE_SENSE_6, Op.MODE_SENSE_10], 'mode_sense'],
  [[Op.REPORT_LUNS], 'report_luns'],
  [[Op.REQUEST_SENSE], 'request_sense'],
  [[Op.TEST_UNIT_READY], 'test_unit_ready'],
] as const) {
  for (const op of ops) CLASS_OF[op] = COMMAND_CLASSES.indexOf(name);
}

/** Index into {@link COMMAND_CLASSES} of operation code `op`. */
export function commandClass(op: number): number {
  return CLASS_OF[op & 0xff]!;
}

/** Sense key names (SPC-4 table 48), the `sense_key` label. */
export const SENSE_KEYS = [
  'no_sense', 'recovered_error', 'not_ready', 'medium_error', 'hardware_error', 'illegal_request', 'unit_attention', 'data_protect',
  'blank_check', 'vendor_specific', 'copy_aborted', 'aborted_command', 'reserved_c', 'volume_overflow', 'miscompare', 'completed',
] as const;

/** virtio response names (virtio 1.2 §5.6.6.1), the `response` label. */
export const RESPONSES = [
  'ok', 'overrun', 'aborted', 'bad_target', 'reset', 'busy', 'transport_failure', 'target_failure', 'nexus_failure', 'failure',
  'function_succeeded', 'function_rejected', 'incorrect_lun',
] as const;

/** Task management functions (VIRTIO_SCSI_T_TMF_* subtypes 0..7, then anything else). */
export const TMFS = [
  'abort_task', 'abort_task_set', 'clear_aca', 'clear_task_set', 'i_t_nexus_reset', 'logical_unit_reset', 'query_task', 'query_task_set', 'unknown',
] as const;

/** One request queue's counters: plain numbers, cumulative for the life of the device. */
export class ScsiQueueStats {
  /** Commands by {@link commandClass}. */
  readonly commands = new Float64Array(COMMAND_CLASSES.length);
  /** CHECK CONDITIONs by sense key. */
  readonly checkConditions = new Float64Array(SENSE_KEYS.length);
  /** Requests by virtio response code. */
  readonly responses = new Float64Array(RESPONSES.length);
  readBytes = 0;
  writtenBytes = 0;
}

/** The control queue's counters. */
export class ScsiControlStats {
  readonly tmfs = new Float64Array(TMFS.length);
  asyncNotifications = 0;
}

/** What the metrics read from the device at scrape time. */
export interface ScsiMetricsSource {
  /** Request queues (the queue label counts them from 0). */
  readonly requestQueues: number;
  queueStats(requestQueue: number): ScsiQueueStats;
  /** How request queue `requestQueue`'s I/O ops ran (lib/io/engine.ts). */
  engineStats(requestQueue: number): IoEngineStats;
  readonly controlStats: ScsiControlStats;
  /** Logical units served. */
  readonly unitCount: number;
  /** Event buffers the driver gave and the device holds. */
  heldEventBuffers(): number;
  /** Events sent on the event queue (hotplug, capacity changes, missed events). */
  readonly eventsSent: number;
}

/** Register the `vhostd_scsi_*` metrics of `device` in `registry`. */
export function createScsiMetrics(registry: Registry, device: ScsiMetricsSource) {
  const count = () => device.requestQueues;
  const perQueue = (name: string, help: string, read: (s: ScsiQueueStats) => number) =>
    queueCounter(registry, name, help, count, (q) => read(device.queueStats(q)));
  const byQueueAnd = <L extends string>(name: string, help: string, label: L, values: readonly string[], read: (s: ScsiQueueStats) => Float64Array) =>
    queueCountsCounter(registry, name, help, label, values, count, (q) => read(device.queueStats(q)), true);
  return {
    commands: byQueueAnd('vhostd_scsi_commands_total', 'SCSI commands received, by command class (other: anything else, supported or not)', 'command', COMMAND_CLASSES, (s) => s.commands),
    checkConditions: byQueueAnd('vhostd_scsi_check_conditions_total', 'Commands completed with CHECK CONDITION, by sense key', 'sense_key', SENSE_KEYS, (s) => s.checkConditions),
    responses: byQueueAnd('vhostd_scsi_responses_total', 'Requests completed, by virtio-scsi response (overrun: buffers smaller than the transfer; bad_target: no such target or LUN format)', 'response', RESPONSES, (s) => s.responses),
    readBytes: perQueue('vhostd_scsi_read_bytes_total', 'Bytes read from the images by READ commands', (s) => s.readBytes),
    writtenBytes: perQueue('vhostd_scsi_written_bytes_total', 'Bytes written to the images by WRITE commands', (s) => s.writtenBytes),
    ...ioEngineCounters(registry, 'vhostd_scsi', count, (q) => device.engineStats(q)),
    tmfs: collectedCounter(registry, 'vhostd_scsi_task_management_total', 'Task management functions on the control queue, by function', ['function'], function* () {
      const tmfs = device.controlStats.tmfs;
      for (let i = 0; i < TMFS.length; i++) yield [{ function: TMFS[i]! }, tmfs[i]!];
    }),
    events: valueCounter(registry, 'vhostd_scsi_events_total', 'Events sent to the driver on the event queue (units added or removed, capacity changed, events missed)', () => device.eventsSent),
    units: new Gauge({
      name: 'vhostd_scsi_logical_units',
      help: 'Logical units served',
      // One value for the device: the main instance's, not a sum over worker instances.
      aggregator: 'first',
      registers: [registry],
      collect() {
        this.set(device.unitCount);
      },
    }),
    eventBuffers: new Gauge({
      name: 'vhostd_scsi_event_buffers_held',
      help: 'Event queue buffers the driver gave and the device holds for hotplug events',
      // One value for the device: the main instance's, not a sum over worker instances.
      aggregator: 'first',
      registers: [registry],
      collect() {
        this.set(device.heldEventBuffers());
      },
    }),
  };
}
