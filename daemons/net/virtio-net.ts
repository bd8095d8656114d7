/**
 * virtio-net (virtio 1.2 §5.1, device id 1): feature bits and the per-packet header, with the spec's
 * spelling (Linux include/uapi/linux/virtio_net.h).
 */

// virtio 1.2 §5.1.3: feature bits.
export const VIRTIO_NET_F_CSUM = 0;
export const VIRTIO_NET_F_GUEST_CSUM = 1;
export const VIRTIO_NET_F_MTU = 3;
export const VIRTIO_NET_F_MAC = 5;
export const VIRTIO_NET_F_GUEST_TSO4 = 7;
export const VIRTIO_NET_F_GUEST_TSO6 = 8;
export const VIRTIO_NET_F_GUEST_ECN = 9;
export const VIRTIO_NET_F_GUEST_UFO = 10;
export const VIRTIO_NET_F_HOST_TSO4 = 11;
export const VIRTIO_NET_F_HOST_TSO6 = 12;
export const VIRTIO_NET_F_HOST_ECN = 13;
export const VIRTIO_NET_F_HOST_UFO = 14;
export const VIRTIO_NET_F_MRG_RXBUF = 15;
export const VIRTIO_NET_F_STATUS = 16;
export const VIRTIO_NET_F_CTRL_VQ = 17;
export const VIRTIO_NET_F_GUEST_ANNOUNCE = 21;
export const VIRTIO_NET_F_MQ = 22;
export const VIRTIO_NET_F_GUEST_USO4 = 54;
export const VIRTIO_NET_F_GUEST_USO6 = 55;
export const VIRTIO_NET_F_HOST_USO = 56;

// virtio 1.2 §5.1.6: struct virtio_net_hdr flags and gso_type values.
export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
export const VIRTIO_NET_HDR_F_DATA_VALID = 2;
export const VIRTIO_NET_HDR_F_RSC_INFO = 4;
export const VIRTIO_NET_HDR_GSO_NONE = 0;
export const VIRTIO_NET_HDR_GSO_TCPV4 = 1;
export const VIRTIO_NET_HDR_GSO_UDP = 3;
export const VIRTIO_NET_HDR_GSO_TCPV6 = 4;
export const VIRTIO_NET_HDR_GSO_UDP_L4 = 5;
export const VIRTIO_NET_HDR_GSO_ECN = 0x80;

/**
 * Header sizes (virtio 1.2 §5.1.6): with VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF every packet
 * starts with the 12-byte header that ends in `num_buffers`; a legacy driver without either uses 10.
 */
export const VNET_HDR_SIZE = 12;
export const VNET_HDR_LEGACY_SIZE = 10;
/** Byte offsets of the header fields (all little-endian with VERSION_1). */
export const HDR_FLAGS = 0;
export const HDR_GSO_TYPE = 1;
export const HDR_HDR_LEN = 2;
export const HDR_GSO_SIZE = 4;
export const HDR_CSUM_START = 6;
export const HDR_CSUM_OFFSET = 8;
export const HDR_NUM_BUFFERS = 10;

/** Ethernet: destination, source, EtherType; an 802.1Q tag adds 4 bytes. */
export const ETH_HLEN = 14;
export const VLAN_HLEN = 4;
/** The largest IP packet (and so the largest GSO super-frame payload), Linux's GSO_MAX_SIZE for TAP. */
export const MAX_GSO_PAYLOAD = 65535;
