/**
 * Ethernet frames for the TAP and net tests, built by hand from the RFCs (ARP: RFC 826, IPv4:
 * RFC 791, ICMP echo: RFC 792) so that the tests do not depend on the code under test.
 */

export type Mac = readonly number[];
export type Ipv4 = readonly number[];
/** 4 bytes (IPv4) or 16 (IPv6). */
export type IpAddress = readonly number[];

export const BROADCAST: Mac = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff];

export function ethernet(dst: Mac, src: Mac, etherType: number, payload: readonly number[]): Uint8Array {
  return Uint8Array.from([...dst, ...src, etherType >> 8, etherType & 0xff, ...payload]);
}

/** An ARP request from (`mac`, `ip`) for `target`. */
export function arpRequest(mac: Mac, ip: Ipv4, target: Ipv4): Uint8Array {
  const arp = [0, 1, 8, 0, 6, 4, 0, 1, ...mac, ...ip, 0, 0, 0, 0, 0, 0, ...target];
  return ethernet(BROADCAST, mac, 0x0806, arp);
}

/** RFC 1071 checksum of `bytes`. */
export function checksum(bytes: readonly number[]): number {
  let sum = 0;
  for (let i = 0; i < bytes.length; i += 2) sum += (bytes[i]! << 8) | (bytes[i + 1] ?? 0);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

/** An ICMP echo request with `id`, sequence 1 and `data`, from (`srcMac`, `srcIp`) to (`dstMac`, `dstIp`). */
export function echoRequest(srcMac: Mac, srcIp: Ipv4, dstMac: Mac, dstIp: Ipv4, id: number, data: readonly number[]): Uint8Array {
  const icmp = [8, 0, 0, 0, id >> 8, id & 0xff, 0, 1, ...data];
  const icmpSum = checksum(icmp);
  icmp[2] = icmpSum >> 8;
  icmp[3] = icmpSum & 0xff;
  const length = 20 + icmp.length;
  const ip = [0x45, 0, length >> 8, length & 0xff, 0, 0, 0x40, 0, 64, 1, 0, 0, ...srcIp, ...dstIp];
  const ipSum = checksum(ip);
  ip[10] = ipSum >> 8;
  ip[11] = ipSum & 0xff;
  return ethernet(dstMac, srcMac, 0x0800, [...ip, ...icmp]);
}

/** Whether `frame` is an ARP reply. */
export function isArpReply(frame: Uint8Array): boolean {
  return frame[12] === 0x08 && frame[13] === 0x06 && frame[21] === 2;
}

/** Whether `frame` is an ICMP echo reply (IPv4 without options). */
export function isEchoReply(frame: Uint8Array): boolean {
  return frame[12] === 0x08 && frame[13] === 0x00 && frame[23] === 1 && frame[34] === 0;
}

/**
 * A UDP datagram (RFC 768) from (`srcMac`, `srcIp`, port `srcPort`) to (`dstMac`, `dstIp`,
 * `dstPort`), over IPv4 (RFC 791) or, with 16-byte addresses, IPv6 (RFC 8200; pseudo-header of RFC
 * 8200 §8.1). `partialChecksum`: the checksum field holds only the pseudo-header sum, as a driver
 * leaves it for the device to finish (virtio-net NEEDS_CSUM, csum_start 34 or 54, csum_offset 6);
 * otherwise it is complete.
 */
export function udpFrame(
  src: { mac: Mac; ip: IpAddress; port: number },
  dst: { mac: Mac; ip: IpAddress; port: number },
  payload: Uint8Array,
  partialChecksum = false,
): Uint8Array {
  const udpLength = 8 + payload.length;
  const v6 = src.ip.length === 16;
  let ip: number[];
  let pseudo: number[];
  if (v6) {
    ip = [0x60, 0, 0, 0, udpLength >> 8, udpLength & 0xff, 17, 64, ...src.ip, ...dst.ip];
    pseudo = [...src.ip, ...dst.ip, 0, 0, udpLength >> 8, udpLength & 0xff, 0, 0, 0, 17];
  } else {
    const ipLength = 20 + udpLength;
    ip = [0x45, 0, ipLength >> 8, ipLength & 0xff, 0, 0, 0x40, 0, 64, 17, 0, 0, ...src.ip, ...dst.ip];
    const ipSum = checksum(ip);
    ip[10] = ipSum >> 8;
    ip[11] = ipSum & 0xff;
    pseudo = [...src.ip, ...dst.ip, 0, 17, udpLength >> 8, udpLength & 0xff];
  }
  const udp = [src.port >> 8, src.port & 0xff, dst.port >> 8, dst.port & 0xff, udpLength >> 8, udpLength & 0xff, 0, 0];
  // RFC 768: a computed 0 is sent as 0xffff (0 means "no checksum").
  const udpSum = partialChecksum ? ~checksum(pseudo) & 0xffff : checksum([...pseudo, ...udp, ...payload]) || 0xffff;
  udp[6] = udpSum >> 8;
  udp[7] = udpSum & 0xff;
  const frame = ethernet(dst.mac, src.mac, v6 ? 0x86dd : 0x0800, [...ip, ...udp]);
  const out = new Uint8Array(frame.length + payload.length);
  out.set(frame);
  out.set(payload, frame.length);
  return out;
}

/** Whether `frame` is an IPv4 UDP datagram (without IP options) to port `port`. */
export function isUdpTo(frame: Uint8Array, port: number): boolean {
  return frame[12] === 0x08 && frame[13] === 0x00 && frame[14] === 0x45 && frame[23] === 17 && ((frame[36]! << 8) | frame[37]!) === port;
}
