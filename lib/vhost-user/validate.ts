/**
 * Every number the front-end sends passes one of these predicates before it is used. Each throws a
 * {@link ProtocolError} with a stable code; the connection then drops the front-end.
 *
 * Addresses arrive as u64. JavaScript numbers are exact only below 2^53, so the predicates also
 * refuse anything that ends at or past 2^53: no real guest physical address or x86-64/arm64 user
 * address is that large, and from then on addresses can be plain numbers.
 */
import fs from 'node:fs';

import { ProtocolError } from '../errors';
import { VIRTQUEUE_MAX_SIZE } from '../virtio/constants';

/** 2^53: the first integer a JS number cannot represent exactly next to its neighbour. */
const EXACT_LIMIT = 1n << 53n;

/** A region as decoded from VhostUserMemoryRegion, still as u64. */
export interface RawMemoryRegion {
  guestPhysAddr: bigint;
  size: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
}

/** A validated region with exact numbers. */
export interface MemoryRegionNumbers {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  mmapOffset: number;
}

/**
 * vhost-user.rst, memory regions: a region is usable only if its size is non-zero and none of
 * `guest_addr + size`, `user_addr + size`, `mmap_offset + size` wraps (or, here, passes 2^53).
 */
export function checkMemoryRegion(r: RawMemoryRegion): MemoryRegionNumbers {
  const fail = (why: string) => new ProtocolError('VHOST_USER_BAD_MEM_REGION', `memory region ${why}`);
  if (r.size === 0n) throw fail('has size 0');
  for (const [name, start] of [
    ['guest_addr', r.guestPhysAddr],
    ['user_addr', r.userAddr],
    ['mmap_offset', r.mmapOffset],
  ] as const) {
    if (start + r.size > EXACT_LIMIT) {
      throw fail(`${name} 0x${start.toString(16)} + size 0x${r.size.toString(16)} overflows`);
    }
  }
  return {
    guestPhysAddr: Number(r.guestPhysAddr),
    size: Number(r.size),
    userAddr: Number(r.userAddr),
    mmapOffset: Number(r.mmapOffset),
  };
}

/** Regions must not overlap, neither in guest physical nor in front-end address space. */
export function checkNoOverlap(regions: readonly Pick<MemoryRegionNumbers, 'guestPhysAddr' | 'userAddr' | 'size'>[]): void {
  for (let i = 0; i < regions.length; i++) {
    for (let j = i + 1; j < regions.length; j++) {
      const a = regions[i]!;
      const b = regions[j]!;
      const gpaOverlap = a.guestPhysAddr < b.guestPhysAddr + b.size && b.guestPhysAddr < a.guestPhysAddr + a.size;
      const userOverlap = a.userAddr < b.userAddr + b.size && b.userAddr < a.userAddr + a.size;
      if (gpaOverlap || userOverlap) {
        throw new ProtocolError(
          'VHOST_USER_BAD_MEM_REGION',
          `memory regions ${i} and ${j} overlap in ${gpaOverlap ? 'guest physical' : 'front-end'} address space`,
        );
      }
    }
  }
}

/** The region count must fit the slots we announced (GET_MAX_MEM_SLOTS, or 8 for SET_MEM_TABLE). */
export function checkRegionCount(count: number, slots: number): void {
  if (count > slots) {
    throw new ProtocolError('VHOST_USER_TOO_MANY_REGIONS', `${count} memory regions, at most ${slots} supported`);
  }
}

/** Queue index from a vring message must name one of the device's queues. */
export function checkVringIndex(index: number, numQueues: number): void {
  if (index >= numQueues) {
    throw new ProtocolError('VHOST_USER_BAD_VRING_INDEX', `vring index ${index} out of range (device has ${numQueues} queues)`);
  }
}

/**
 * virtio 1.2 §2.7: "Queue Size value is always a power of 2. The maximum Queue Size value is 32768"
 * (split rings); §2.8: packed rings need not be a power of 2 but have the same maximum.
 */
export function checkVringNum(num: number, packed: boolean, deviceMax: number): void {
  const fail = (why: string) => new ProtocolError('VHOST_USER_BAD_VRING_NUM', `vring size ${num} ${why}`);
  if (num === 0) throw fail('is 0');
  if (num > VIRTQUEUE_MAX_SIZE) throw fail(`exceeds ${VIRTQUEUE_MAX_SIZE}`);
  if (num > deviceMax) throw fail(`exceeds this device's maximum ${deviceMax}`);
  if (!packed && (num & (num - 1)) !== 0) throw fail('is not a power of 2 (split ring)');
}

/** SET_VRING_BASE: a split ring's base is a 16-bit index. */
export function checkVringBase(base: number, packed: boolean): void {
  if (!packed && base > 0xffff) {
    throw new ProtocolError('VHOST_USER_BAD_VRING_BASE', `split ring base ${base} does not fit 16 bits`);
  }
}

/** A ring address (front-end virtual) must be exact as a number; mapping is checked at ring start. */
export function checkRingAddress(name: string, addr: bigint): number {
  if (addr >= EXACT_LIMIT) {
    throw new ProtocolError('VHOST_USER_BAD_VRING_ADDR', `${name} address 0x${addr.toString(16)} is not in guest memory`);
  }
  return Number(addr);
}

/**
 * SET_LOG_BASE (vhost-user.rst, "Migration"): "The size of the log is supplied as part of VhostUserMsg
 * which should be large enough to cover all known guest addresses. Log starts at the supplied offset in
 * the supplied file descriptor." The area must be non-empty, mappable (at most `maxSize`: one view),
 * end below 2^53 (no wrap: DPDK's CVE-2020-10722 was an unchecked offset + size), and cover every byte
 * of guest memory up to `memoryEnd`. Whether the fd holds it is checked when it is mapped.
 */
export function checkLogArea(size: bigint, offset: bigint, maxSize: number, bytesNeeded: number): { size: number; offset: number } {
  const fail = (why: string) => new ProtocolError('VHOST_USER_BAD_LOG', `dirty log of ${size} bytes at offset ${offset} ${why}`);
  if (size === 0n) throw fail('is empty');
  if (size > BigInt(maxSize)) throw fail(`exceeds ${maxSize} bytes`);
  if (offset + size > EXACT_LIMIT) throw fail('overflows');
  if (size < BigInt(bytesNeeded)) throw fail(`does not cover guest memory (${bytesNeeded} bytes needed)`);
  return { size: Number(size), offset: Number(offset) };
}

/** Features the front-end acknowledges must be a subset of what we offered. */
export function checkFeatureSubset(kind: string, acked: bigint, offered: bigint): void {
  const extra = acked & ~offered;
  if (extra !== 0n) {
    throw new ProtocolError('VHOST_USER_BAD_FEATURES', `${kind} 0x${extra.toString(16)} acknowledged but not offered`);
  }
}

/**
 * Kick, call and err fds must be eventfds and the backend channel a socket (vhost-user.rst): any
 * other kind would make the datapath's eventfd reads and writes fail later, inside event-loop
 * callbacks. The kernel names the fd's kind in /proc/self/fd.
 */
export function checkFdKind(fd: number, kind: 'eventfd' | 'socket', what: string): void {
  let target: string;
  try {
    target = fs.readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    target = 'an unknown kind of fd';
  }
  const ok = kind === 'eventfd' ? target === 'anon_inode:[eventfd]' : target.startsWith('socket:');
  if (!ok) throw new ProtocolError('VHOST_USER_BAD_FDS', `${what} must be an ${kind}, got ${target}`);
}
