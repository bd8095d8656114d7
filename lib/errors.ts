/**
 * Errors with stable string codes. Tests and callers match on `code`, never on message text.
 *
 * - {@link ProtocolError}: the vhost-user front-end sent something invalid; the connection is dropped.
 * - {@link RingError}: the guest driver broke a virtqueue rule; that queue is marked broken.
 * - {@link MemoryError}: a guest or front-end address does not resolve inside mapped guest memory.
 * - {@link QueueUsageError}: a device used a virtqueue against its contract (a device bug, not the driver's).
 * - {@link ConfigError}: the operator's command line or environment is wrong; printed without a stack.
 */

export type ProtocolErrorCode =
  | 'VHOST_USER_BAD_HEADER'
  | 'VHOST_USER_BAD_VERSION'
  | 'VHOST_USER_UNKNOWN_REQUEST'
  | 'VHOST_USER_BAD_SIZE'
  | 'VHOST_USER_BAD_PAYLOAD'
  | 'VHOST_USER_BAD_FDS'
  | 'VHOST_USER_BAD_VRING_INDEX'
  | 'VHOST_USER_BAD_VRING_NUM'
  | 'VHOST_USER_BAD_VRING_ADDR'
  | 'VHOST_USER_BAD_VRING_BASE'
  | 'VHOST_USER_BAD_MEM_REGION'
  | 'VHOST_USER_TOO_MANY_REGIONS'
  | 'VHOST_USER_BAD_FEATURES'
  | 'VHOST_USER_PROTOCOL_FEATURE_MISSING'
  | 'VHOST_USER_BAD_CONFIG'
  | 'VHOST_USER_BAD_STATE'
  | 'VHOST_USER_BAD_LOG'
  | 'VHOST_USER_BACKEND_CHANNEL'
  | 'VHOST_USER_BAD_INFLIGHT';

export type RingErrorCode =
  | 'VIRTQ_AVAIL_IDX_JUMP'
  | 'VIRTQ_BAD_HEAD'
  | 'VIRTQ_CHAIN_LOOP'
  | 'VIRTQ_CHAIN_TOO_LONG'
  | 'VIRTQ_NESTED_INDIRECT'
  | 'VIRTQ_BAD_INDIRECT_LEN'
  | 'VIRTQ_READABLE_AFTER_WRITABLE'
  | 'VIRTQ_ZERO_LENGTH'
  | 'VIRTQ_BAD_DESCRIPTOR'
  | 'VIRTQ_NO_RING'
  | 'VIRTQ_BAD_BASE'
  | 'VIRTQ_TOO_MANY_IN_FLIGHT'
  | 'VIRTQ_BAD_REQUEST'
  | 'VIRTQ_BAD_INFLIGHT';

export type MemoryErrorCode = 'GUEST_ADDR_UNMAPPED' | 'GUEST_ADDR_OVERFLOW';

export type QueueUsageErrorCode = 'VIRTQ_NOT_IN_FLIGHT' | 'VIRTQ_UNPOP_NOT_LATEST';

export type ConfigErrorCode = 'CONFIG_INVALID' | 'CONFIG_MISSING' | 'CONFIG_CONFLICT' | 'CONFIG_UNAVAILABLE';

/** Base class: an error with a stable `code`. */
export class VhostdError<C extends string = string> extends Error {
  constructor(
    readonly code: C,
    message: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
}

export class ProtocolError extends VhostdError<ProtocolErrorCode> {}
export class RingError extends VhostdError<RingErrorCode> {}
export class MemoryError extends VhostdError<MemoryErrorCode> {}
export class QueueUsageError extends VhostdError<QueueUsageErrorCode> {}
/** An operator error: printed as one line without a stack, exit status 1. */
export class ConfigError extends VhostdError<ConfigErrorCode> {}

/**
 * A vhost-user request that is well formed but cannot be carried out (a driver's config write the
 * device refuses): answered with a NACK when the front-end asked for a reply; the connection stays.
 */
export class RequestRefused extends Error {}
