/**
 * vhost-user wire format (QEMU docs/interop/vhost-user.rst): request codes, flags, feature bits and
 * the payload layouts the backend decodes. All integers are little-endian (the protocol is host
 * endian and we only run on x86-64/arm64 little-endian hosts).
 *
 * Header (12 bytes):
 * ```
 * u32 request | u32 flags (bits 0-1 version = 1, bit 2 REPLY, bit 3 NEED_REPLY) | u32 size
 * ```
 * followed by `size` payload bytes. File descriptors travel as SCM_RIGHTS with the header.
 */

export const HEADER_SIZE = 12;
export const VHOST_USER_VERSION = 0x1;
export const VHOST_USER_VERSION_MASK = 0x3;
export const VHOST_USER_REPLY_MASK = 0x1 << 2;
export const VHOST_USER_NEED_REPLY_MASK = 0x1 << 3;
/** Largest payload we accept; the largest valid one (SET_CONFIG with 256 config bytes) is far below. */
export const MAX_PAYLOAD_SIZE = 4096;
/** Most fds one message may carry (vhost-user.rst: VHOST_MEMORY_BASELINE_NREGIONS). */
export const MAX_FDS = 8;

/** Front-end → backend requests. */
export const Request = {
  GET_FEATURES: 1,
  SET_FEATURES: 2,
  SET_OWNER: 3,
  RESET_OWNER: 4,
  SET_MEM_TABLE: 5,
  SET_LOG_BASE: 6,
  SET_LOG_FD: 7,
  SET_VRING_NUM: 8,
  SET_VRING_ADDR: 9,
  SET_VRING_BASE: 10,
  GET_VRING_BASE: 11,
  SET_VRING_KICK: 12,
  SET_VRING_CALL: 13,
  SET_VRING_ERR: 14,
  GET_PROTOCOL_FEATURES: 15,
  SET_PROTOCOL_FEATURES: 16,
  GET_QUEUE_NUM: 17,
  SET_VRING_ENABLE: 18,
  SEND_RARP: 19,
  NET_SET_MTU: 20,
  SET_BACKEND_REQ_FD: 21,
  IOTLB_MSG: 22,
  SET_VRING_ENDIAN: 23,
  GET_CONFIG: 24,
  SET_CONFIG: 25,
  CREATE_CRYPTO_SESSION: 26,
  CLOSE_CRYPTO_SESSION: 27,
  POSTCOPY_ADVISE: 28,
  POSTCOPY_LISTEN: 29,
  POSTCOPY_END: 30,
  GET_INFLIGHT_FD: 31,
  SET_INFLIGHT_FD: 32,
  GPU_SET_SOCKET: 33,
  RESET_DEVICE: 34,
  VRING_KICK: 35,
  GET_MAX_MEM_SLOTS: 36,
  ADD_MEM_REG: 37,
  REM_MEM_REG: 38,
  SET_STATUS: 39,
  GET_STATUS: 40,
} as const;
export type RequestCode = (typeof Request)[keyof typeof Request];

/** Backend → front-end requests (on the SET_BACKEND_REQ_FD channel). */
export const BackendRequest = {
  IOTLB_MSG: 1,
  CONFIG_CHANGE_MSG: 2,
  VRING_HOST_NOTIFIER_MSG: 3,
} as const;

/** Protocol feature bit numbers (GET/SET_PROTOCOL_FEATURES). */
export const ProtocolFeature = {
  MQ: 0,
  LOG_SHMFD: 1,
  RARP: 2,
  REPLY_ACK: 3,
  NET_MTU: 4,
  BACKEND_REQ: 5,
  CROSS_ENDIAN: 6,
  CRYPTO_SESSION: 7,
  PAGEFAULT: 8,
  CONFIG: 9,
  BACKEND_SEND_FD: 10,
  HOST_NOTIFIER: 11,
  INFLIGHT_SHMFD: 12,
  RESET_DEVICE: 13,
  INBAND_NOTIFICATIONS: 14,
  CONFIGURE_MEM_SLOTS: 15,
  STATUS: 16,
  XEN_MMAP: 17,
  SHARED_OBJECT: 18,
  DEVICE_STATE: 19,
} as const;

/** SET_VRING_KICK/CALL/ERR payload: bits 0-7 queue index, bit 8 "no fd attached" (polling mode). */
export const VRING_IDX_MASK = 0xff;
export const VRING_NOFD_MASK = 0x1 << 8;

/** SET_VRING_ADDR flags: bit 0 VHOST_VRING_F_LOG. */
export const VHOST_VRING_F_LOG = 0x1;

/** VhostUserLog (SET_LOG_BASE): u64 mmap_size, u64 mmap_offset. */
export const LOG_PAYLOAD_SIZE = 16;

/** Size of one VhostUserMemoryRegion: u64 guest_addr, u64 size, u64 user_addr, u64 mmap_offset. */
export const MEMORY_REGION_SIZE = 32;
/** SET_MEM_TABLE carries at most this many regions (VHOST_MEMORY_BASELINE_NREGIONS). */
export const MEMORY_BASELINE_NREGIONS = 8;
/** VhostUserConfig header: u32 offset, u32 size, u32 flags. */
export const CONFIG_HEADER_SIZE = 12;
/** vhost-user.rst: "config space ... up to 256 bytes" (VHOST_USER_MAX_CONFIG_SIZE). */
export const MAX_CONFIG_SIZE = 256;

/** NET_SET_MTU bounds: virtio 1.2 §5.1.4.1, "The device MUST set mtu to between 68 and 65535 inclusive." */
export const NET_MTU_MIN = 68;
export const NET_MTU_MAX = 65535;

/** The request name for logs and metrics, e.g. "SET_MEM_TABLE" (or "REQUEST_99" for unknown codes). */
export function requestName(code: number): string {
  return REQUEST_NAMES.get(code) ?? `REQUEST_${code}`;
}
const REQUEST_NAMES = new Map<number, string>(Object.entries(Request).map(([name, code]) => [code, name]));

/** A u64 payload (replies to GET_FEATURES, REPLY_ACK...). */
export function u64(value: bigint): Uint8Array {
  const bytes = new Uint8Array(8);
  new DataView(bytes.buffer).setBigUint64(0, value, true);
  return bytes;
}
