/**
 * Virtio constants with the spec's spelling (virtio 1.2, and Linux include/uapi/linux/virtio_*.h).
 * Feature bits are bit numbers; use {@link bit} to build masks.
 */

/** A 64-bit feature mask with bit `n` set. */
export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

// virtio 1.2 §6: reserved feature bits.
export const VIRTIO_F_NOTIFY_ON_EMPTY = 24;
export const VIRTIO_F_ANY_LAYOUT = 27;
/** vhost: the back-end logs the pages it writes while this is negotiated (vhost-user.rst, "Migration"). */
export const VHOST_F_LOG_ALL = 26;
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
export const VIRTIO_RING_F_EVENT_IDX = 29;
/** vhost-user.rst: "VHOST_USER_F_PROTOCOL_FEATURES" shares bit 30 with the legacy BAD_FEATURE bit. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;
export const VIRTIO_F_VERSION_1 = 32;
export const VIRTIO_F_ACCESS_PLATFORM = 33;
export const VIRTIO_F_RING_PACKED = 34;
export const VIRTIO_F_IN_ORDER = 35;
export const VIRTIO_F_ORDER_PLATFORM = 36;
export const VIRTIO_F_SR_IOV = 37;
export const VIRTIO_F_NOTIFICATION_DATA = 38;
export const VIRTIO_F_RING_RESET = 40;

// virtio 1.2 §2.1: device status bits.
export const VIRTIO_CONFIG_S_ACKNOWLEDGE = 1;
export const VIRTIO_CONFIG_S_DRIVER = 2;
export const VIRTIO_CONFIG_S_DRIVER_OK = 4;
export const VIRTIO_CONFIG_S_FEATURES_OK = 8;
export const VIRTIO_CONFIG_S_NEEDS_RESET = 0x40;
export const VIRTIO_CONFIG_S_FAILED = 0x80;

// virtio 1.2 §2.7.5: split ring descriptor flags.
export const VRING_DESC_F_NEXT = 1;
export const VRING_DESC_F_WRITE = 2;
export const VRING_DESC_F_INDIRECT = 4;
// virtio 1.2 §2.8: packed ring descriptor flags.
export const VRING_PACKED_DESC_F_AVAIL = 1 << 7;
export const VRING_PACKED_DESC_F_USED = 1 << 15;
// virtio 1.2 §2.7.7 / §2.7.10: notification suppression.
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
export const VRING_USED_F_NO_NOTIFY = 1;
// virtio 1.2 §2.8.10: packed ring event suppression flags.
export const VRING_PACKED_EVENT_FLAG_ENABLE = 0;
export const VRING_PACKED_EVENT_FLAG_DISABLE = 1;
export const VRING_PACKED_EVENT_FLAG_DESC = 2;

/** virtio 1.2 §2.7: "The maximum Queue Size value is 32768". */
export const VIRTQUEUE_MAX_SIZE = 32768;

/** virtio 1.2 §5: device IDs. */
export const VIRTIO_ID_NET = 1;
export const VIRTIO_ID_BLOCK = 2;
export const VIRTIO_ID_RNG = 4;
export const VIRTIO_ID_BALLOON = 5;
export const VIRTIO_ID_SCSI = 8;
