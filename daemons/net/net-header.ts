/**
 * The transmit-side checks of the guest's virtio-net header, done before the kernel sees a frame
 * (the class of DPDK CVE-2024-11614: a header whose offsets point outside the packet). A frame that
 * fails is dropped and counted; it never reaches the TAP and never breaks the queue.
 *
 * virtio 1.2 §5.1.6.2 (driver requirements on transmitted packets):
 * - "The driver MUST set num_buffers to zero" (not checked: ignored by devices) and flags to zero
 *   unless VIRTIO_NET_F_CSUM was negotiated; "The driver MUST NOT set the VIRTIO_NET_HDR_F_DATA_VALID
 *   and VIRTIO_NET_HDR_F_RSC_INFO bits in flags."
 * - "If VIRTIO_NET_HDR_F_NEEDS_CSUM is set, csum_start and csum_offset ... the checksum is placed at
 *   csum_start + csum_offset": both must fall inside the frame.
 * - gso_type must be one the device offered and the driver accepted (HOST_TSO4/6, HOST_UFO,
 *   HOST_USO; the ECN bit only with HOST_ECN), with gso_size > 0 and hdr_len inside the frame.
 * - USO (gso_type UDP_L4) as Linux takes it from a TAP (virtio_net_hdr_to_skb): NEEDS_CSUM set and
 *   csum_offset 6, the UDP checksum field; else the kernel refuses the write.
 */
import {
  ETH_HLEN,
  HDR_CSUM_OFFSET,
  HDR_CSUM_START,
  HDR_FLAGS,
  HDR_GSO_SIZE,
  HDR_GSO_TYPE,
  HDR_HDR_LEN,
  MAX_GSO_PAYLOAD,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_HOST_UFO,
  VIRTIO_NET_F_HOST_USO,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_NONE,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP,
  VIRTIO_NET_HDR_GSO_UDP_L4,
  VLAN_HLEN,
} from './virtio-net';

/**
 * Why a transmitted frame was dropped (the `reason` label of vhostd_net_tx_dropped_total);
 * too_many_segments: more descriptors than one writev takes (Linux UIO_MAXIOV), checked in tx.ts.
 */
export const TX_DROP_REASONS = ['bad_header', 'too_short', 'too_long', 'too_many_segments'] as const;
export type TxDropReason = (typeof TX_DROP_REASONS)[number];

/** What the negotiated features allow on transmit, decided once per connection. */
export interface TxLimits {
  /** Header size in front of every frame (12, or 10 for a legacy driver). */
  headerSize: number;
  /** Largest frame without GSO: MTU + Ethernet header + one VLAN tag. */
  maxFrame: number;
  /** VIRTIO_NET_F_CSUM: the driver may leave checksums to us (flags NEEDS_CSUM). */
  csum: boolean;
  /** Bit `t` set: gso_type `t` (without the ECN bit) was negotiated. */
  gsoTypes: number;
  /** VIRTIO_NET_F_HOST_ECN: the ECN bit may accompany a TCP gso_type. */
  ecn: boolean;
}

/** The limits for `mtu` and the negotiated `features`. */
export function txLimits(features: bigint, headerSize: number, mtu: number): TxLimits {
  const has = (bitNumber: number) => (features & (1n << BigInt(bitNumber))) !== 0n;
  let gsoTypes = 0;
  if (has(VIRTIO_NET_F_HOST_TSO4)) gsoTypes |= 1 << VIRTIO_NET_HDR_GSO_TCPV4;
  if (has(VIRTIO_NET_F_HOST_TSO6)) gsoTypes |= 1 << VIRTIO_NET_HDR_GSO_TCPV6;
  if (has(VIRTIO_NET_F_HOST_UFO)) gsoTypes |= 1 << VIRTIO_NET_HDR_GSO_UDP;
  if (has(VIRTIO_NET_F_HOST_USO)) gsoTypes |= 1 << VIRTIO_NET_HDR_GSO_UDP_L4;
  return { headerSize, maxFrame: mtu + ETH_HLEN + VLAN_HLEN, csum: has(VIRTIO_NET_F_CSUM), gsoTypes, ecn: has(VIRTIO_NET_F_HOST_ECN) };
}

/** offsetof(struct udphdr, check): where a USO frame's partial checksum goes. */
const UDP_CHECK_OFFSET = 6;

/** The largest GSO super-frame: a 64 KiB IP packet behind an Ethernet header and a VLAN tag. */
const MAX_GSO_FRAME = MAX_GSO_PAYLOAD + ETH_HLEN + VLAN_HLEN;

/**
 * Check the header `hdr` (the first `limits.headerSize` bytes the driver placed) of a frame of
 * `frameLength` bytes after the header. Returns null when the frame may go to the TAP.
 */
export function checkTxHeader(hdr: Uint8Array, frameLength: number, limits: TxLimits): TxDropReason | null {
  if (frameLength < ETH_HLEN) return 'too_short';
  const flags = hdr[HDR_FLAGS]!;
  const gsoType = hdr[HDR_GSO_TYPE]!;
  const u16 = (at: number) => hdr[at]! | (hdr[at + 1]! << 8);
  if (flags !== 0) {
    if (flags !== VIRTIO_NET_HDR_F_NEEDS_CSUM || !limits.csum) return 'bad_header';
    // The 2-byte checksum field at csum_start + csum_offset lies inside the frame.
    if (u16(HDR_CSUM_START) + u16(HDR_CSUM_OFFSET) + 2 > frameLength) return 'bad_header';
  }
  if (u16(HDR_HDR_LEN) > frameLength) return 'bad_header';
  const type = gsoType & ~VIRTIO_NET_HDR_GSO_ECN;
  if (type === VIRTIO_NET_HDR_GSO_NONE) {
    if (gsoType !== type) return 'bad_header'; // ECN without GSO
    return frameLength > limits.maxFrame ? 'too_long' : null;
  }
  if (type > 7 || (limits.gsoTypes & (1 << type)) === 0) return 'bad_header';
  if (gsoType !== type && (!limits.ecn || (type !== VIRTIO_NET_HDR_GSO_TCPV4 && type !== VIRTIO_NET_HDR_GSO_TCPV6))) return 'bad_header';
  const gsoSize = u16(HDR_GSO_SIZE);
  if (gsoSize === 0 || gsoSize > frameLength) return 'bad_header';
  if (type === VIRTIO_NET_HDR_GSO_UDP_L4 && (flags !== VIRTIO_NET_HDR_F_NEEDS_CSUM || u16(HDR_CSUM_OFFSET) !== UDP_CHECK_OFFSET)) return 'bad_header';
  return frameLength > MAX_GSO_FRAME ? 'too_long' : null;
}
