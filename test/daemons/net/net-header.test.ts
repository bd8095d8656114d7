/**
 * The transmit header checks as a table: each hostile header is refused with its reason, and the
 * headers real Linux guests send pass.
 */
import test from 'ava';

import { checkTxHeader, txLimits, type TxDropReason } from '../../../daemons/net/net-header';
import {
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_HOST_UFO,
  VIRTIO_NET_F_HOST_USO,
  VIRTIO_NET_HDR_F_DATA_VALID,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_F_RSC_INFO,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP,
  VIRTIO_NET_HDR_GSO_UDP_L4,
} from '../../../daemons/net/virtio-net';
import { VIRTIO_F_VERSION_1, bit } from '../../../lib/virtio/constants';

interface Header {
  flags?: number;
  gsoType?: number;
  hdrLen?: number;
  gsoSize?: number;
  csumStart?: number;
  csumOffset?: number;
}

/** struct virtio_net_hdr_v1, little-endian (virtio 1.2 §5.1.6). */
function header(h: Header): Uint8Array {
  const bytes = new Uint8Array(12);
  const view = new DataView(bytes.buffer);
  view.setUint8(0, h.flags ?? 0);
  view.setUint8(1, h.gsoType ?? 0);
  view.setUint16(2, h.hdrLen ?? 0, true);
  view.setUint16(4, h.gsoSize ?? 0, true);
  view.setUint16(6, h.csumStart ?? 0, true);
  view.setUint16(8, h.csumOffset ?? 0, true);
  return bytes;
}

const OFFLOADS = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6) | bit(VIRTIO_NET_F_HOST_ECN);
const full = txLimits(OFFLOADS, 12, 1500);
const plain = txLimits(bit(VIRTIO_F_VERSION_1), 12, 1500);
const NEEDS_CSUM = VIRTIO_NET_HDR_F_NEEDS_CSUM;
// A TCP/IPv4 frame as Linux sends it: checksum at 14 + 20 + 16.
const tcpCsum = { flags: NEEDS_CSUM, csumStart: 34, csumOffset: 16 };
const udp = txLimits(OFFLOADS | bit(VIRTIO_NET_F_HOST_UFO) | bit(VIRTIO_NET_F_HOST_USO), 12, 1500);
// A UDP/IPv4 frame: checksum at 14 + 20 + 6; USO cuts the payload after the 42 header bytes.
const uso = { flags: NEEDS_CSUM, csumStart: 34, csumOffset: 6, gsoType: VIRTIO_NET_HDR_GSO_UDP_L4, hdrLen: 42, gsoSize: 1400 };

const cases: [string, Header, number, typeof full, TxDropReason | null][] = [
  ['a plain 60-byte frame', {}, 60, plain, null],
  ['a full 1514-byte frame', {}, 1514, plain, null],
  ['a VLAN-tagged 1518-byte frame', {}, 1518, plain, null],
  ['a frame with a partial TCP checksum', tcpCsum, 1514, full, null],
  ['a 64 KiB TSO frame', { ...tcpCsum, gsoType: VIRTIO_NET_HDR_GSO_TCPV4, hdrLen: 66, gsoSize: 1448 }, 65000, full, null],
  ['a TSO6 frame with ECN', { flags: NEEDS_CSUM, csumStart: 54, csumOffset: 16, gsoType: VIRTIO_NET_HDR_GSO_TCPV6 | VIRTIO_NET_HDR_GSO_ECN, hdrLen: 86, gsoSize: 1428 }, 30000, full, null],
  ['a 60 KiB USO frame', uso, 61482, udp, null],
  ['a UFO frame (8 KiB datagram)', { flags: NEEDS_CSUM, csumStart: 34, csumOffset: 6, gsoType: VIRTIO_NET_HDR_GSO_UDP, hdrLen: 42, gsoSize: 1480 }, 8042, udp, null],
  ['USO without NEEDS_CSUM', { ...uso, flags: 0, csumStart: 0, csumOffset: 0 }, 61482, udp, 'bad_header'],
  ['USO with the checksum not at the UDP check field', { ...uso, csumOffset: 16 }, 61482, udp, 'bad_header'],
  ['USO with gso_size 0', { ...uso, gsoSize: 0 }, 61482, udp, 'bad_header'],
  ['USO with gso_size past the frame', { ...uso, gsoSize: 61483 }, 61482, udp, 'bad_header'],
  ['USO with hdr_len past the frame', { ...uso, hdrLen: 61483 }, 61482, udp, 'bad_header'],
  ['USO with the ECN bit', { ...uso, gsoType: VIRTIO_NET_HDR_GSO_UDP_L4 | VIRTIO_NET_HDR_GSO_ECN }, 61482, udp, 'bad_header'],
  ['a USO frame over 64 KiB', uso, 65554, udp, 'too_long'],
  ['13 bytes: shorter than an Ethernet header', {}, 13, plain, 'too_short'],
  ['1519 bytes without GSO at MTU 1500', {}, 1519, plain, 'too_long'],
  ['a GSO frame over 64 KiB', { ...tcpCsum, gsoType: VIRTIO_NET_HDR_GSO_TCPV4, hdrLen: 66, gsoSize: 1448 }, 65554, full, 'too_long'],
  ['NEEDS_CSUM without VIRTIO_NET_F_CSUM', tcpCsum, 1514, plain, 'bad_header'],
  ['DATA_VALID from the driver', { flags: VIRTIO_NET_HDR_F_DATA_VALID }, 100, full, 'bad_header'],
  ['RSC_INFO from the driver', { flags: VIRTIO_NET_HDR_F_RSC_INFO }, 100, full, 'bad_header'],
  ['an unknown flag', { flags: 0x80 }, 100, full, 'bad_header'],
  ['csum_start past the frame', { flags: NEEDS_CSUM, csumStart: 200, csumOffset: 0 }, 100, full, 'bad_header'],
  ['csum_offset past the frame', { flags: NEEDS_CSUM, csumStart: 34, csumOffset: 65000 }, 100, full, 'bad_header'],
  ['the checksum field straddling the end', { flags: NEEDS_CSUM, csumStart: 90, csumOffset: 9 }, 100, full, 'bad_header'],
  ['hdr_len past the frame', { hdrLen: 101 }, 100, full, 'bad_header'],
  ['an unknown gso_type', { ...tcpCsum, gsoType: 2, hdrLen: 54, gsoSize: 1448 }, 3000, full, 'bad_header'],
  ['gso_type 0x7f', { ...tcpCsum, gsoType: 0x7f, gsoSize: 1448 }, 3000, full, 'bad_header'],
  ['TSO without HOST_TSO4 negotiated', { ...tcpCsum, gsoType: VIRTIO_NET_HDR_GSO_TCPV4, hdrLen: 54, gsoSize: 1448 }, 3000, plain, 'bad_header'],
  ['UFO that was not offered', { ...tcpCsum, gsoType: VIRTIO_NET_HDR_GSO_UDP, gsoSize: 1448 }, 3000, full, 'bad_header'],
  ['USO that was not offered', { ...tcpCsum, gsoType: VIRTIO_NET_HDR_GSO_UDP_L4, gsoSize: 1448 }, 3000, full, 'bad_header'],
  ['the ECN bit without GSO', { gsoType: VIRTIO_NET_HDR_GSO_ECN }, 100, full, 'bad_header'],
  ['the ECN bit without HOST_ECN', { ...tcpCsum, gsoType: VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, gsoSize: 1448 }, 3000, txLimits(OFFLOADS & ~bit(VIRTIO_NET_F_HOST_ECN), 12, 1500), 'bad_header'],
  ['gso_size 0', { ...tcpCsum, gsoType: VIRTIO_NET_HDR_GSO_TCPV4, hdrLen: 54 }, 3000, full, 'bad_header'],
  ['gso_size past the frame', { ...tcpCsum, gsoType: VIRTIO_NET_HDR_GSO_TCPV4, hdrLen: 54, gsoSize: 3001 }, 3000, full, 'bad_header'],
];

for (const [title, h, frameLength, limits, expected] of cases) {
  test(`tx header: ${title} → ${expected ?? 'sent'}`, (t) => {
    t.is(checkTxHeader(header(h), frameLength, limits), expected);
  });
}

test('the frame limit follows --mtu: 9000 + 18 passes, one more byte does not', (t) => {
  const jumbo = txLimits(bit(VIRTIO_F_VERSION_1), 12, 9000);
  t.is(checkTxHeader(header({}), 9018, jumbo), null);
  t.is(checkTxHeader(header({}), 9019, jumbo), 'too_long');
});
