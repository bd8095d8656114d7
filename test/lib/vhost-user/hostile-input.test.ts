/**
 * One row per validation rule (style-anchors rule 5 and 16): a front-end breaks the rule, and the
 * row checks what an operator would see. The server reports the drop with the rule's code, the
 * socket closes, every fd the message carried is released (the process's fd count returns to where
 * it was), and a fresh, correct front-end still moves data.
 *
 * The attacks never set NEED_REPLY, so the only correct answer is to hang up.
 */
import test from 'ava';

import type { ProtocolErrorCode } from '../../../lib/errors';
import { ProtocolFeature, Request } from '../../../lib/vhost-user/messages';
import { VHOST_F_LOG_ALL, VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_VERSION_1, bit } from '../../../lib/virtio/constants';
import { logBytesFor } from '../../../lib/memory/dirty-log';
import { native } from '../../../native';
import {
  DEFAULT_LAYOUT,
  Frontend,
  FrontendError,
  VRING_NOFD_MASK,
  encodeConfig,
  encodeMemTable,
  encodeMessage,
  encodeSingleRegion,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  type NegotiateOptions,
  type WireRegion,
} from '../../helpers/frontend';
import { TestDevice } from '../../helpers/test-device';
import { TestServer, assertServes, openFds, settleFds } from './harness';

/** Fds a row creates for its attack; our copies are closed after the row. */
class Scratch {
  private readonly fds: number[] = [];
  eventfd(): number {
    const fd = native.eventfd(0);
    this.fds.push(fd);
    return fd;
  }
  memfd(size = 0x10000): number {
    const fd = native.memfdCreate('vhostd-hostile', size);
    this.fds.push(fd);
    return fd;
  }
  close(): void {
    for (const fd of this.fds.splice(0)) native.close(fd);
  }
}

interface Row {
  name: string;
  code: ProtocolErrorCode;
  /** Negotiation before the attack (default: everything); false: none. */
  negotiate?: NegotiateOptions | false;
  /** Send SET_MEM_TABLE with the default layout before the attack (default: when negotiating). */
  memTable?: boolean;
  attack(fe: Frontend, scratch: Scratch): void | Promise<void>;
}

const ALL = (1n << 64n) - 1n;
const without = (...features: number[]): bigint => features.reduce((m, f) => m & ~bit(f), ALL);
const FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VHOST_USER_F_PROTOCOL_FEATURES);
const region = (gpa: U, size: U, userAddr: U, mmapOffset: U = 0): WireRegion => ({ gpa, size, userAddr, mmapOffset });
type U = number | bigint;

/** The start of a correct queue setup, then `addr` as the ring addresses. */
function queueWithAddr(fe: Frontend, s: Scratch, addr: { desc: U; used: U; avail: U }, num = 64): void {
  fe.send(Request.SET_VRING_NUM, encodeVringState(0, num));
  fe.send(Request.SET_VRING_BASE, encodeVringState(0, 0));
  fe.send(Request.SET_VRING_ADDR, encodeVringAddr({ index: 0, ...addr }));
  fe.send(Request.SET_VRING_KICK, encodeU64(0), { fds: [s.eventfd()] });
  fe.send(Request.SET_VRING_ENABLE, encodeVringState(0, 1));
}

const r0 = DEFAULT_LAYOUT[0]!;
const r0User = r0.userAddr!;

/** VhostUserLog: u64 mmap_size, u64 mmap_offset. */
function logBase(size: U, offset: U): Uint8Array {
  const out = new Uint8Array(16);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(size), true);
  view.setBigUint64(8, BigInt(offset), true);
  return out;
}
/** Bytes of log that cover DEFAULT_LAYOUT, as QEMU sizes it. */
const LOG_BYTES = logBytesFor(Math.max(...DEFAULT_LAYOUT.map((r) => r.gpa + r.size)));

const rows: Row[] = [
  // --- header ------------------------------------------------------------------------------
  { name: 'unknown request code 99', code: 'VHOST_USER_UNKNOWN_REQUEST', attack: (fe) => fe.send(99) },
  { name: 'request code 0', code: 'VHOST_USER_UNKNOWN_REQUEST', negotiate: false, attack: (fe) => fe.send(0) },
  { name: 'version bits 0', code: 'VHOST_USER_BAD_VERSION', negotiate: false, attack: (fe) => fe.send(Request.GET_FEATURES, undefined, { flags: 0 }) },
  { name: 'version bits 2', code: 'VHOST_USER_BAD_VERSION', negotiate: false, attack: (fe) => fe.send(Request.GET_FEATURES, undefined, { flags: 2 }) },
  { name: 'version bits 3', code: 'VHOST_USER_BAD_VERSION', attack: (fe) => fe.send(Request.SET_OWNER, undefined, { flags: 3 }) },
  {
    name: 'header size beyond the largest payload',
    code: 'VHOST_USER_BAD_SIZE',
    negotiate: false,
    attack: (fe) => fe.sendRaw(encodeMessage(Request.SET_FEATURES, 1, new Uint8Array(8), 0x100000)),
  },
  // --- payload size ------------------------------------------------------------------------
  { name: 'SET_FEATURES with a 4-byte payload', code: 'VHOST_USER_BAD_SIZE', negotiate: false, attack: (fe) => fe.send(Request.SET_FEATURES, new Uint8Array(4)) },
  { name: 'GET_FEATURES with a payload', code: 'VHOST_USER_BAD_SIZE', negotiate: false, attack: (fe) => fe.send(Request.GET_FEATURES, encodeU64(0)) },
  {
    name: 'SET_VRING_ADDR of 32 bytes',
    code: 'VHOST_USER_BAD_SIZE',
    attack: (fe) => fe.send(Request.SET_VRING_ADDR, encodeVringAddr({ index: 0, desc: r0User, used: r0User + 0x1000, avail: r0User + 0x2000 }).subarray(0, 32)),
  },
  { name: 'SET_VRING_NUM of 12 bytes', code: 'VHOST_USER_BAD_SIZE', attack: (fe) => fe.send(Request.SET_VRING_NUM, new Uint8Array(12)) },
  {
    name: 'SET_MEM_TABLE payload shorter than nregions says',
    code: 'VHOST_USER_BAD_SIZE',
    memTable: false,
    attack: (fe, s) => fe.send(Request.SET_MEM_TABLE, encodeMemTable([region(0, 0x10000, 0x7f0000000000), region(0x100000, 0x10000, 0x7f1000000000)], 3), { fds: [s.memfd(), s.memfd()] }),
  },
  {
    name: 'GET_CONFIG whose size field disagrees with the payload',
    code: 'VHOST_USER_BAD_SIZE',
    attack: (fe) => fe.send(Request.GET_CONFIG, encodeConfig(0, 8, 0, new Uint8Array(4))),
  },
  { name: 'NET_SET_MTU with a 4-byte payload', code: 'VHOST_USER_BAD_SIZE', attack: (fe) => fe.send(Request.NET_SET_MTU, new Uint8Array(4)) },
  { name: 'SEND_RARP with the 6-byte MAC alone', code: 'VHOST_USER_BAD_SIZE', attack: (fe) => fe.send(Request.SEND_RARP, new Uint8Array(6)) },
  // --- fds ---------------------------------------------------------------------------------
  { name: 'SET_FEATURES carrying an fd', code: 'VHOST_USER_BAD_FDS', negotiate: false, attack: (fe, s) => fe.send(Request.SET_FEATURES, encodeU64(FEATURES), { fds: [s.eventfd()] }) },
  { name: 'SET_VRING_NUM carrying an fd', code: 'VHOST_USER_BAD_FDS', attack: (fe, s) => fe.send(Request.SET_VRING_NUM, encodeVringState(0, 64), { fds: [s.eventfd()] }) },
  { name: 'GET_CONFIG carrying two fds', code: 'VHOST_USER_BAD_FDS', attack: (fe, s) => fe.send(Request.GET_CONFIG, encodeConfig(0, 4, 0), { fds: [s.eventfd(), s.memfd()] }) },
  { name: 'SET_VRING_KICK without fd and without the no-fd bit', code: 'VHOST_USER_BAD_FDS', attack: (fe) => fe.send(Request.SET_VRING_KICK, encodeU64(0)) },
  { name: 'SET_VRING_CALL with the no-fd bit and an fd', code: 'VHOST_USER_BAD_FDS', attack: (fe, s) => fe.send(Request.SET_VRING_CALL, encodeU64(VRING_NOFD_MASK), { fds: [s.eventfd()] }) },
  { name: 'SET_VRING_KICK with two fds', code: 'VHOST_USER_BAD_FDS', attack: (fe, s) => fe.send(Request.SET_VRING_KICK, encodeU64(1), { fds: [s.eventfd(), s.eventfd()] }) },
  {
    name: 'SET_MEM_TABLE with fewer fds than regions',
    code: 'VHOST_USER_BAD_FDS',
    memTable: false,
    attack: (fe, s) => fe.send(Request.SET_MEM_TABLE, encodeMemTable([region(0, 0x10000, 0x7f0000000000), region(0x100000, 0x10000, 0x7f1000000000)]), { fds: [s.memfd()] }),
  },
  {
    name: 'SET_MEM_TABLE with more fds than regions',
    code: 'VHOST_USER_BAD_FDS',
    memTable: false,
    attack: (fe, s) => fe.send(Request.SET_MEM_TABLE, encodeMemTable([region(0, 0x10000, 0x7f0000000000)]), { fds: [s.memfd(), s.memfd()] }),
  },
  { name: 'ADD_MEM_REG without an fd', code: 'VHOST_USER_BAD_FDS', attack: (fe) => fe.send(Request.ADD_MEM_REG, encodeSingleRegion(region(0x4000_0000, 0x10000, 0x7f5000000000))) },
  { name: 'SET_BACKEND_REQ_FD without an fd', code: 'VHOST_USER_BAD_FDS', attack: (fe) => fe.send(Request.SET_BACKEND_REQ_FD) },
  { name: 'NET_SET_MTU carrying an fd', code: 'VHOST_USER_BAD_FDS', attack: (fe, s) => fe.send(Request.NET_SET_MTU, encodeU64(1500), { fds: [s.eventfd()] }) },
  // --- vring index -------------------------------------------------------------------------
  { name: 'SET_VRING_NUM for queue 2 of 2', code: 'VHOST_USER_BAD_VRING_INDEX', attack: (fe) => fe.send(Request.SET_VRING_NUM, encodeVringState(2, 64)) },
  {
    name: 'SET_VRING_ADDR for queue 255',
    code: 'VHOST_USER_BAD_VRING_INDEX',
    attack: (fe) => fe.send(Request.SET_VRING_ADDR, encodeVringAddr({ index: 255, desc: r0User, used: r0User + 0x1000, avail: r0User + 0x2000 })),
  },
  { name: 'SET_VRING_KICK for queue 2', code: 'VHOST_USER_BAD_VRING_INDEX', attack: (fe, s) => fe.send(Request.SET_VRING_KICK, encodeU64(2), { fds: [s.eventfd()] }) },
  { name: 'GET_VRING_BASE for queue 7', code: 'VHOST_USER_BAD_VRING_INDEX', attack: (fe) => fe.send(Request.GET_VRING_BASE, encodeVringState(7, 0)) },
  { name: 'SET_VRING_ENABLE for queue 2', code: 'VHOST_USER_BAD_VRING_INDEX', attack: (fe) => fe.send(Request.SET_VRING_ENABLE, encodeVringState(2, 1)) },
  // --- ring size and base ------------------------------------------------------------------
  { name: 'ring size 0', code: 'VHOST_USER_BAD_VRING_NUM', attack: (fe) => fe.send(Request.SET_VRING_NUM, encodeVringState(0, 0)) },
  { name: 'split ring size 100 (not a power of two)', code: 'VHOST_USER_BAD_VRING_NUM', attack: (fe) => fe.send(Request.SET_VRING_NUM, encodeVringState(1, 100)) },
  { name: 'ring size 65536', code: 'VHOST_USER_BAD_VRING_NUM', attack: (fe) => fe.send(Request.SET_VRING_NUM, encodeVringState(0, 65536)) },
  { name: 'packed ring size 32769', code: 'VHOST_USER_BAD_VRING_NUM', negotiate: { packed: true }, attack: (fe) => fe.send(Request.SET_VRING_NUM, encodeVringState(0, 32769)) },
  { name: 'split ring base 0x10000', code: 'VHOST_USER_BAD_VRING_BASE', attack: (fe) => fe.send(Request.SET_VRING_BASE, encodeVringState(0, 0x10000)) },
  // --- ring addresses ----------------------------------------------------------------------
  {
    name: 'ring addresses outside guest memory',
    code: 'VHOST_USER_BAD_VRING_ADDR',
    attack: (fe, s) => queueWithAddr(fe, s, { desc: 0x1234_0000_0000, used: 0x1234_0001_0000, avail: 0x1234_0002_0000 }),
  },
  {
    name: 'descriptor table running past the end of its region',
    code: 'VHOST_USER_BAD_VRING_ADDR',
    attack: (fe, s) => queueWithAddr(fe, s, { desc: r0User + r0.size - 16 * 32, used: r0User, avail: r0User + 0x1000 }, 64),
  },
  {
    name: 'available ring in the gap after a region',
    code: 'VHOST_USER_BAD_VRING_ADDR',
    attack: (fe, s) => queueWithAddr(fe, s, { desc: r0User, used: r0User + 0x1000, avail: r0User + r0.size + 0x1000 }),
  },
  {
    name: 'ring address at 2^60',
    code: 'VHOST_USER_BAD_VRING_ADDR',
    attack: (fe, s) => queueWithAddr(fe, s, { desc: 1n << 60n, used: r0User + 0x1000, avail: r0User + 0x2000 }),
  },
  {
    name: 'guest physical address given as ring address (gpa != user address)',
    code: 'VHOST_USER_BAD_VRING_ADDR',
    attack: (fe, s) => queueWithAddr(fe, s, { desc: 0x1000, used: 0x2000, avail: 0x3000 }),
  },
  // --- memory regions ----------------------------------------------------------------------
  ...(
    [
      ['memory region of size 0', [region(0, 0, 0x7f0000000000)]],
      ['guest address + size overflows 64 bits', [region((1n << 64n) - 0x1000n, 0x2000, 0x7f0000000000)]],
      ['user address + size overflows 64 bits', [region(0, 0x2000, (1n << 64n) - 0x1000n)]],
      ['mmap offset + size overflows 64 bits', [region(0, 0x2000, 0x7f0000000000, (1n << 64n) - 0x1000n)]],
      ['region ending past 2^53', [region((1n << 53n) - 0x1000n, 0x2000, 0x7f0000000000)]],
      ['overlapping guest physical ranges', [region(0, 0x10000, 0x7f0000000000), region(0x8000, 0x10000, 0x7f1000000000)]],
      ['overlapping front-end address ranges', [region(0, 0x10000, 0x7f0000000000), region(0x100000, 0x10000, 0x7f0000008000)]],
    ] as const
  ).map(
    ([name, regions]): Row => ({
      name,
      code: 'VHOST_USER_BAD_MEM_REGION',
      memTable: false,
      attack: (fe, s) => fe.send(Request.SET_MEM_TABLE, encodeMemTable(regions), { fds: regions.map(() => s.memfd(0x10000)) }),
    }),
  ),
  {
    // A region that extends past the end of its fd maps fine, but the first guest access beyond the
    // file's end raises SIGBUS and kills the daemon: the size must be checked against fstat.
    name: 'region larger than its memfd',
    code: 'VHOST_USER_BAD_MEM_REGION',
    memTable: false,
    attack: (fe, s) => fe.send(Request.SET_MEM_TABLE, encodeMemTable([region(0, 0x100000, 0x7f0000000000)]), { fds: [s.memfd(0x10000)] }),
  },
  {
    name: 'SET_MEM_TABLE with 9 regions',
    code: 'VHOST_USER_TOO_MANY_REGIONS',
    memTable: false,
    attack: (fe, s) => {
      const regions = Array.from({ length: 9 }, (_, i) => region(i * 0x100000, 0x10000, 0x7f0000000000 + i * 0x100000));
      fe.send(Request.SET_MEM_TABLE, encodeMemTable(regions), { fds: regions.slice(0, 8).map(() => s.memfd()) });
    },
  },
  {
    name: 'ADD_MEM_REG past the slots GET_MAX_MEM_SLOTS announced',
    code: 'VHOST_USER_TOO_MANY_REGIONS',
    attack: async (fe) => {
      const slots = await fe.getMaxMemSlots();
      const have = fe.memory.regions.length;
      for (let i = have; i < slots; i++) {
        const fd = native.memfdCreate('vhostd-slot', 0x1000);
        try {
          await fe.request(Request.ADD_MEM_REG, encodeSingleRegion(region(0x10_0000_0000 + i * 0x10000, 0x1000, 0x7e00_0000_0000 + i * 0x10000)), [fd]);
        } finally {
          native.close(fd);
        }
      }
      const fd = native.memfdCreate('vhostd-slot', 0x1000);
      try {
        fe.send(Request.ADD_MEM_REG, encodeSingleRegion(region(0x20_0000_0000, 0x1000, 0x7d00_0000_0000)), { fds: [fd] });
      } finally {
        native.close(fd);
      }
    },
  },
  {
    name: 'REM_MEM_REG of a region that is not mapped',
    code: 'VHOST_USER_BAD_MEM_REGION',
    attack: (fe) => fe.send(Request.REM_MEM_REG, encodeSingleRegion(region(0x4000_0000, 0x10000, 0x7f5000000000))),
  },
  // --- config space ------------------------------------------------------------------------
  { name: 'GET_CONFIG of 300 bytes', code: 'VHOST_USER_BAD_CONFIG', attack: (fe) => fe.send(Request.GET_CONFIG, encodeConfig(0, 300, 0)) },
  { name: 'GET_CONFIG of 16 bytes at offset 250', code: 'VHOST_USER_BAD_CONFIG', attack: (fe) => fe.send(Request.GET_CONFIG, encodeConfig(250, 16, 0)) },
  { name: 'GET_CONFIG at offset 2^32-4 (wraps)', code: 'VHOST_USER_BAD_CONFIG', attack: (fe) => fe.send(Request.GET_CONFIG, encodeConfig(0xfffffffc, 8, 0)) },
  { name: 'SET_CONFIG of 257 bytes', code: 'VHOST_USER_BAD_CONFIG', attack: (fe) => fe.send(Request.SET_CONFIG, encodeConfig(0, 257, 0)) },
  // --- protocol feature gates --------------------------------------------------------------
  {
    name: 'GET_CONFIG without CONFIG negotiated',
    code: 'VHOST_USER_PROTOCOL_FEATURE_MISSING',
    negotiate: { protocolFeatures: without(ProtocolFeature.CONFIG) },
    attack: (fe) => fe.send(Request.GET_CONFIG, encodeConfig(0, 4, 0)),
  },
  {
    name: 'ADD_MEM_REG without CONFIGURE_MEM_SLOTS negotiated',
    code: 'VHOST_USER_PROTOCOL_FEATURE_MISSING',
    negotiate: { protocolFeatures: without(ProtocolFeature.CONFIGURE_MEM_SLOTS) },
    attack: (fe, s) => fe.send(Request.ADD_MEM_REG, encodeSingleRegion(region(0x4000_0000, 0x10000, 0x7f5000000000)), { fds: [s.memfd()] }),
  },
  {
    name: 'REM_MEM_REG without CONFIGURE_MEM_SLOTS negotiated',
    code: 'VHOST_USER_PROTOCOL_FEATURE_MISSING',
    negotiate: { protocolFeatures: without(ProtocolFeature.CONFIGURE_MEM_SLOTS) },
    attack: (fe) => fe.send(Request.REM_MEM_REG, encodeSingleRegion(fe.memory.regions[0]!)),
  },
  {
    name: 'GET_MAX_MEM_SLOTS without CONFIGURE_MEM_SLOTS negotiated',
    code: 'VHOST_USER_PROTOCOL_FEATURE_MISSING',
    negotiate: { protocolFeatures: without(ProtocolFeature.CONFIGURE_MEM_SLOTS) },
    attack: (fe) => fe.send(Request.GET_MAX_MEM_SLOTS),
  },
  {
    name: 'SET_BACKEND_REQ_FD without BACKEND_REQ negotiated',
    code: 'VHOST_USER_PROTOCOL_FEATURE_MISSING',
    negotiate: { protocolFeatures: without(ProtocolFeature.BACKEND_REQ) },
    attack: (fe, s) => {
      const [a, b] = native.socketPair();
      native.close(a);
      try {
        fe.send(Request.SET_BACKEND_REQ_FD, undefined, { fds: [b] });
      } finally {
        native.close(b);
      }
      void s;
    },
  },
  {
    // TestDevice has no setMtu/sendRarp hook, so NET_MTU and RARP are never offered.
    name: 'NET_SET_MTU without NET_MTU negotiated',
    code: 'VHOST_USER_PROTOCOL_FEATURE_MISSING',
    attack: (fe) => fe.send(Request.NET_SET_MTU, encodeU64(1500)),
  },
  {
    name: 'SEND_RARP without RARP negotiated',
    code: 'VHOST_USER_PROTOCOL_FEATURE_MISSING',
    attack: (fe) => fe.send(Request.SEND_RARP, encodeU64(0x5634120054520n)),
  },
  {
    // TestDevice does not opt in to INFLIGHT_SHMFD (blk and scsi do); the area checks themselves are
    // rows of inflight-region.test.ts and virtqueue/inflight.test.ts.
    name: 'GET_INFLIGHT_FD without INFLIGHT_SHMFD negotiated',
    code: 'VHOST_USER_PROTOCOL_FEATURE_MISSING',
    attack: (fe) => fe.send(Request.GET_INFLIGHT_FD, new Uint8Array(24)),
  },
  {
    name: 'SET_INFLIGHT_FD without INFLIGHT_SHMFD negotiated',
    code: 'VHOST_USER_PROTOCOL_FEATURE_MISSING',
    attack: (fe, s) => fe.send(Request.SET_INFLIGHT_FD, new Uint8Array(24), { fds: [s.memfd()] }),
  },
  { name: 'GET_INFLIGHT_FD with a 20-byte (packed) description', code: 'VHOST_USER_BAD_SIZE', attack: (fe) => fe.send(Request.GET_INFLIGHT_FD, new Uint8Array(20)) },
  { name: 'SET_INFLIGHT_FD without its fd', code: 'VHOST_USER_BAD_FDS', attack: (fe) => fe.send(Request.SET_INFLIGHT_FD, new Uint8Array(24)) },
  {
    name: 'SET_INFLIGHT_FD with two fds',
    code: 'VHOST_USER_BAD_FDS',
    attack: (fe, s) => fe.send(Request.SET_INFLIGHT_FD, new Uint8Array(24), { fds: [s.memfd(), s.memfd()] }),
  },
  // --- features ----------------------------------------------------------------------------
  { name: 'SET_FEATURES acknowledging bit 63 (not offered)', code: 'VHOST_USER_BAD_FEATURES', negotiate: false, attack: (fe) => fe.send(Request.SET_FEATURES, encodeU64(FEATURES | (1n << 63n))) },
  {
    name: 'SET_PROTOCOL_FEATURES acknowledging INBAND_NOTIFICATIONS (not offered)',
    code: 'VHOST_USER_BAD_FEATURES',
    negotiate: false,
    attack: (fe) => fe.send(Request.SET_PROTOCOL_FEATURES, encodeU64(bit(ProtocolFeature.INBAND_NOTIFICATIONS))),
  },
  // --- dirty page log (live migration) --------------------------------------------------------
  {
    name: 'SET_LOG_BASE without LOG_SHMFD negotiated',
    code: 'VHOST_USER_PROTOCOL_FEATURE_MISSING',
    negotiate: { protocolFeatures: without(ProtocolFeature.LOG_SHMFD) },
    attack: (fe, s) => fe.send(Request.SET_LOG_BASE, logBase(LOG_BYTES, 0), { fds: [s.memfd(LOG_BYTES)] }),
  },
  { name: 'SET_LOG_BASE without an fd', code: 'VHOST_USER_BAD_FDS', attack: (fe) => fe.send(Request.SET_LOG_BASE, logBase(LOG_BYTES, 0)) },
  { name: 'SET_LOG_BASE of 8 bytes', code: 'VHOST_USER_BAD_SIZE', attack: (fe, s) => fe.send(Request.SET_LOG_BASE, encodeU64(LOG_BYTES), { fds: [s.memfd(LOG_BYTES)] }) },
  { name: 'SET_LOG_BASE of size 0', code: 'VHOST_USER_BAD_LOG', attack: (fe, s) => fe.send(Request.SET_LOG_BASE, logBase(0, 0), { fds: [s.memfd(LOG_BYTES)] }) },
  { name: 'SET_LOG_BASE larger than 1 GiB', code: 'VHOST_USER_BAD_LOG', attack: (fe, s) => fe.send(Request.SET_LOG_BASE, logBase((1 << 30) + 1, 0), { fds: [s.memfd(LOG_BYTES)] }) },
  {
    name: 'SET_LOG_BASE whose offset + size wraps past 2^64 (CVE-2020-10722)',
    code: 'VHOST_USER_BAD_LOG',
    attack: (fe, s) => fe.send(Request.SET_LOG_BASE, logBase(LOG_BYTES, (1n << 64n) - 0x1000n), { fds: [s.memfd(LOG_BYTES)] }),
  },
  {
    name: 'SET_LOG_BASE too small for guest memory',
    code: 'VHOST_USER_BAD_LOG',
    attack: (fe, s) => fe.send(Request.SET_LOG_BASE, logBase(LOG_BYTES - 1, 0), { fds: [s.memfd(LOG_BYTES)] }),
  },
  {
    name: 'SET_LOG_BASE larger than its fd',
    code: 'VHOST_USER_BAD_LOG',
    attack: (fe, s) => fe.send(Request.SET_LOG_BASE, logBase(LOG_BYTES, 0), { fds: [s.memfd(LOG_BYTES - 0x1000)] }),
  },
  {
    name: 'SET_LOG_BASE with an offset that puts the log past its fd',
    code: 'VHOST_USER_BAD_LOG',
    attack: (fe, s) => fe.send(Request.SET_LOG_BASE, logBase(LOG_BYTES, 0x1000), { fds: [s.memfd(LOG_BYTES)] }),
  },
  { name: 'SET_LOG_BASE with an eventfd', code: 'VHOST_USER_BAD_LOG', attack: (fe, s) => fe.send(Request.SET_LOG_BASE, logBase(LOG_BYTES, 0), { fds: [s.eventfd()] }) },
  { name: 'SET_LOG_FD with a memfd', code: 'VHOST_USER_BAD_FDS', attack: (fe, s) => fe.send(Request.SET_LOG_FD, undefined, { fds: [s.memfd()] }) },
  {
    name: 'SET_VRING_ADDR with an unknown flag',
    code: 'VHOST_USER_BAD_PAYLOAD',
    attack: (fe) => fe.send(Request.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 2, desc: r0User, used: r0User + 0x1000, avail: r0User + 0x2000 })),
  },
  {
    name: 'SET_VRING_ADDR with a log address at 2^53',
    code: 'VHOST_USER_BAD_VRING_ADDR',
    attack: (fe) => fe.send(Request.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 1, desc: r0User, used: r0User + 0x1000, avail: r0User + 0x2000, log: 1n << 53n })),
  },
  {
    name: 'a used ring logged past the end of the log',
    code: 'VHOST_USER_BAD_LOG',
    attack: async (fe, s) => {
      const q = await fe.setupQueue(0, 16);
      await fe.call(Request.SET_LOG_BASE, logBase(LOG_BYTES, 0), { fds: [s.memfd(LOG_BYTES)] });
      await fe.request(Request.SET_FEATURES, encodeU64(FEATURES | bit(VHOST_F_LOG_ALL)));
      const { desc, used, avail } = q.driver.areas;
      const m = fe.memory;
      fe.send(Request.SET_VRING_ADDR, encodeVringAddr({ index: 0, flags: 1, desc: m.toUser(desc), used: m.toUser(used), avail: m.toUser(avail), log: LOG_BYTES * 8 * 0x1000 - 16 }));
    },
  },
  // --- state -------------------------------------------------------------------------------
  {
    name: 'SET_VRING_ADDR moving a running queue',
    code: 'VHOST_USER_BAD_STATE',
    attack: async (fe) => {
      const q = await fe.setupQueue(0, 16);
      const { desc, used, avail } = q.driver.areas;
      const m = fe.memory;
      fe.send(Request.SET_VRING_ADDR, encodeVringAddr({ index: 0, desc: m.toUser(desc), used: m.toUser(used) + 0x100, avail: m.toUser(avail) }));
    },
  },
  {
    name: 'SET_VRING_NUM on a running queue',
    code: 'VHOST_USER_BAD_STATE',
    attack: async (fe) => {
      await fe.setupQueue(0, 16);
      fe.send(Request.SET_VRING_NUM, encodeVringState(0, 32));
    },
  },
];

let ts: TestServer;

test.before(async () => {
  ts = await TestServer.start(new TestDevice({ migratable: true }));
});

test.after.always(async () => {
  await ts?.close();
});

for (const row of rows) {
  test.serial(`${row.name} → ${row.code}`, async (t) => {
    await ts.idle();
    const baseline = openFds();
    const scratch = new Scratch();
    const fe = ts.connect();
    try {
      if (row.negotiate !== false) {
        await fe.negotiate(row.negotiate ?? {});
        if (row.memTable ?? true) await fe.setMemTable(DEFAULT_LAYOUT);
      }
      try {
        await row.attack(fe, scratch);
      } catch (err) {
        // The backend may hang up before the whole attack is sent; that is the expected outcome.
        if (!(err instanceof FrontendError && err.code === 'FRONTEND_PEER_CLOSED')) throw err;
      }
      const ev = await ts.nextDisconnect();
      t.is(ev.code, row.code, `disconnect reported ${JSON.stringify(ev)}`);
      t.true(await fe.waitClosed(), 'the backend closed the socket');
      t.true(ts.logged(row.code).length > 0, 'the code is logged');
    } finally {
      fe.close();
      scratch.close();
    }
    t.is(await settleFds(baseline), baseline, 'no fd is left open after the drop');
    await assertServes(t, ts);
  });
}

test.serial('a violation with NEED_REPLY under REPLY_ACK is NACKed, then the backend hangs up', async (t) => {
  await ts.idle();
  const fe = ts.connect();
  try {
    await fe.negotiate();
    t.true(fe.replyAck);
    fe.send(Request.SET_VRING_NUM, encodeVringState(0, 3), { needReply: true });
    const reply = await fe.reply(Request.SET_VRING_NUM);
    t.is(reply.payload.length, 8);
    t.not(new DataView(reply.payload.buffer).getBigUint64(0, true), 0n, 'the ack is non-zero');
    const ev = await ts.nextDisconnect();
    t.is(ev.code, 'VHOST_USER_BAD_VRING_NUM');
    t.is(ev.request, 'SET_VRING_NUM');
    t.true(await fe.waitClosed());
  } finally {
    fe.close();
  }
  await assertServes(t, ts);
});

test.serial('a front-end that hangs up mid-message is a clean disconnect', async (t) => {
  await ts.idle();
  const fe = ts.connect();
  await fe.negotiate();
  fe.sendRaw(encodeMessage(Request.SET_VRING_NUM, 1, encodeVringState(0, 64)).subarray(0, 15));
  fe.close();
  const ev = await ts.nextDisconnect();
  t.is(ev.code, undefined);
  await assertServes(t, ts);
});
