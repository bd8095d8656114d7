/**
 * SCSI numbers the target emulates (SPC-4 / SBC-3, as in Linux include/scsi/scsi_proto.h): operation
 * codes, status codes, sense keys and the additional sense codes the target reports. Pure data.
 */

/** Operation codes (SPC-4 Annex D, SBC-3 §5). */
export const Op = {
  TEST_UNIT_READY: 0x00,
  REQUEST_SENSE: 0x03,
  READ_6: 0x08,
  WRITE_6: 0x0a,
  INQUIRY: 0x12,
  MODE_SELECT_6: 0x15,
  MODE_SENSE_6: 0x1a,
  START_STOP_UNIT: 0x1b,
  PREVENT_ALLOW_MEDIUM_REMOVAL: 0x1e,
  READ_CAPACITY_10: 0x25,
  READ_10: 0x28,
  WRITE_10: 0x2a,
  VERIFY_10: 0x2f,
  SYNCHRONIZE_CACHE_10: 0x35,
  WRITE_SAME_10: 0x41,
  UNMAP: 0x42,
  MODE_SELECT_10: 0x55,
  MODE_SENSE_10: 0x5a,
  READ_16: 0x88,
  WRITE_16: 0x8a,
  VERIFY_16: 0x8f,
  SYNCHRONIZE_CACHE_16: 0x91,
  WRITE_SAME_16: 0x93,
  SERVICE_ACTION_IN_16: 0x9e,
  REPORT_LUNS: 0xa0,
  MAINTENANCE_IN: 0xa3,
  READ_12: 0xa8,
  WRITE_12: 0xaa,
} as const;

/** SERVICE ACTION IN(16) service action: READ CAPACITY(16) (SBC-3 §5.16). */
export const SAI_READ_CAPACITY_16 = 0x10;

/** Status codes (SAM-5 §5.3). */
export const Status = {
  GOOD: 0x00,
  CHECK_CONDITION: 0x02,
  BUSY: 0x08,
} as const;

/** Sense keys (SPC-4 §4.5.6, table 48). */
export const SenseKey = {
  NO_SENSE: 0x0,
  NOT_READY: 0x2,
  MEDIUM_ERROR: 0x3,
  HARDWARE_ERROR: 0x4,
  ILLEGAL_REQUEST: 0x5,
  UNIT_ATTENTION: 0x6,
  DATA_PROTECT: 0x7,
  ABORTED_COMMAND: 0xb,
  MISCOMPARE: 0xe,
} as const;

/** Additional sense code and qualifier, as (ASC << 8) | ASCQ (SPC-4 §4.5.6, table 49). */
export const Asc = {
  NO_ADDITIONAL_SENSE: 0x0000,
  WRITE_ERROR: 0x0c00,
  MISCOMPARE_DURING_VERIFY: 0x1d00,
  UNRECOVERED_READ_ERROR: 0x1100,
  PARAMETER_LIST_LENGTH_ERROR: 0x1a00,
  INVALID_COMMAND_OPERATION_CODE: 0x2000,
  LBA_OUT_OF_RANGE: 0x2100,
  INVALID_FIELD_IN_CDB: 0x2400,
  LOGICAL_UNIT_NOT_SUPPORTED: 0x2500,
  INVALID_FIELD_IN_PARAMETER_LIST: 0x2600,
  WRITE_PROTECTED: 0x2700,
  SPACE_ALLOCATION_FAILED_WRITE_PROTECT: 0x2707,
  SAVING_PARAMETERS_NOT_SUPPORTED: 0x3900,
  INTERNAL_TARGET_FAILURE: 0x4400,
} as const;

/** Largest LUN of the flat / single-level addressing method (SAM-5 §4.7.7: 14 bits). */
export const MAX_LUN = 16383;
