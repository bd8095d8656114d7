/**
 * virtio-scsi as the spec defines it (virtio 1.2 §5.6, Linux include/uapi/linux/virtio_scsi.h): queue
 * numbers, feature bits, request and response layouts, response codes, task management and event
 * values, and the LUN field. Pure data; the device (device.ts) uses it at its edge only.
 */

// virtio 1.2 §5.6.2: queue 0 control, 1 event, 2.. requests.
export const CONTROL_QUEUE = 0;
export const EVENT_QUEUE = 1;
export const FIRST_REQUEST_QUEUE = 2;

// virtio 1.2 §5.6.3: feature bits.
export const VIRTIO_SCSI_F_INOUT = 0;
export const VIRTIO_SCSI_F_HOTPLUG = 1;
export const VIRTIO_SCSI_F_CHANGE = 2;
export const VIRTIO_SCSI_F_T10_PI = 3;

/** QEMU's config space (vhost-user-scsi keeps it): cdb_size and sense_size, which a driver cannot change. */
export const CDB_SIZE = 32;
export const SENSE_SIZE = 96;

/**
 * struct virtio_scsi_req_cmd, device-readable part (virtio 1.2 §5.6.6.1):
 * u8 lun[8] | le64 id | u8 task_attr | u8 prio | u8 crn | u8 cdb[cdb_size] | dataout
 */
export const CMD_LUN = 0;
export const CMD_ID = 8;
export const CMD_CDB = 19;
export const CMD_HEADER_SIZE = CMD_CDB + CDB_SIZE;

/**
 * struct virtio_scsi_resp_cmd, device-writable part:
 * le32 sense_len | le32 residual | le16 status_qualifier | u8 status | u8 response | u8 sense[sense_size] | datain
 */
export const RESP_SENSE_LEN = 0;
export const RESP_RESIDUAL = 4;
export const RESP_STATUS_QUALIFIER = 8;
export const RESP_STATUS = 10;
export const RESP_RESPONSE = 11;
export const RESP_SENSE = 12;
export const RESP_HEADER_SIZE = RESP_SENSE + SENSE_SIZE;

// virtio 1.2 §5.6.6.1: response values (command and task management).
export const VIRTIO_SCSI_S_OK = 0;
export const VIRTIO_SCSI_S_FUNCTION_COMPLETE = 0;
export const VIRTIO_SCSI_S_OVERRUN = 1;
export const VIRTIO_SCSI_S_ABORTED = 2;
export const VIRTIO_SCSI_S_BAD_TARGET = 3;
export const VIRTIO_SCSI_S_RESET = 4;
export const VIRTIO_SCSI_S_BUSY = 5;
export const VIRTIO_SCSI_S_TRANSPORT_FAILURE = 6;
export const VIRTIO_SCSI_S_TARGET_FAILURE = 7;
export const VIRTIO_SCSI_S_NEXUS_FAILURE = 8;
export const VIRTIO_SCSI_S_FAILURE = 9;
export const VIRTIO_SCSI_S_FUNCTION_SUCCEEDED = 10;
export const VIRTIO_SCSI_S_FUNCTION_REJECTED = 11;
export const VIRTIO_SCSI_S_INCORRECT_LUN = 12;

// virtio 1.2 §5.6.6.2: control queue request types.
export const VIRTIO_SCSI_T_TMF = 0;
export const VIRTIO_SCSI_T_AN_QUERY = 1;
export const VIRTIO_SCSI_T_AN_SUBSCRIBE = 2;

// Task management subtypes.
export const VIRTIO_SCSI_T_TMF_ABORT_TASK = 0;
export const VIRTIO_SCSI_T_TMF_ABORT_TASK_SET = 1;
export const VIRTIO_SCSI_T_TMF_CLEAR_ACA = 2;
export const VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET = 3;
export const VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET = 4;
export const VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET = 5;
export const VIRTIO_SCSI_T_TMF_QUERY_TASK = 6;
export const VIRTIO_SCSI_T_TMF_QUERY_TASK_SET = 7;

/** struct virtio_scsi_ctrl_tmf: le32 type | le32 subtype | u8 lun[8] | le64 id; then u8 response. */
export const TMF_REQUEST_SIZE = 24;
export const TMF_LUN = 8;
export const TMF_ID = 16;
/** struct virtio_scsi_ctrl_an: le32 type | u8 lun[8] | le32 event_requested; then le32 event_actual | u8 response. */
export const AN_REQUEST_SIZE = 16;
export const AN_RESPONSE_SIZE = 5;

/** A LUN field virtio-scsi cannot address: the request gets VIRTIO_SCSI_S_BAD_TARGET. */
export const NO_LUN = -1;

/**
 * The LUN field (virtio 1.2 §5.6.6.1): byte 0 is 1, byte 1 the target, bytes 2-3 the LUN in
 * single-level peripheral (00h, LUN below 256) or flat space (40h | LUN >> 8) addressing, bytes 4-7
 * zero. Returns `target << 16 | lun`, or {@link NO_LUN}.
 */
export function decodeLun(b: Uint8Array, at: number): number {
  if (b[at] !== 1) return NO_LUN;
  const method = b[at + 2]! & 0xc0;
  if (method !== 0x00 && method !== 0x40) return NO_LUN;
  if (method === 0x00 && b[at + 2] !== 0) return NO_LUN;
  if ((b[at + 4]! | b[at + 5]! | b[at + 6]! | b[at + 7]!) !== 0) return NO_LUN;
  return (b[at + 1]! << 16) | ((b[at + 2]! & 0x3f) << 8) | b[at + 3]!;
}

/**
 * The LUN field for `target` and `lun`, as QEMU writes it in events: peripheral addressing below 256,
 * flat space above. Linux reads an event's LUN as bytes 2-3 without the addressing bits, so flat
 * addressing for LUN 5 would make it scan LUN 0x4005.
 */
export function encodeLun(target: number, lun: number): Uint8Array {
  return Uint8Array.of(1, target, lun < 256 ? 0 : 0x40 | (lun >> 8), lun & 0xff, 0, 0, 0, 0);
}

// virtio 1.2 §5.6.6.3: events.
export const VIRTIO_SCSI_T_NO_EVENT = 0;
export const VIRTIO_SCSI_T_TRANSPORT_RESET = 1;
export const VIRTIO_SCSI_T_PARAM_CHANGE = 3;
export const VIRTIO_SCSI_T_EVENTS_MISSED = 0x80000000;
/** TRANSPORT_RESET reasons. */
export const VIRTIO_SCSI_EVT_RESET_RESCAN = 1;
export const VIRTIO_SCSI_EVT_RESET_REMOVED = 2;
/** struct virtio_scsi_event: le32 event | u8 lun[8] | le32 reason. */
export const EVENT_SIZE = 16;
