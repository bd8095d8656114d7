/**
 * Seeded randomized test of the vhost-user engine: what an operator would notice after a hostile
 * front-end. Each iteration (one seed) connects, builds a valid session to a random depth
 * (negotiation, memory table from real memfds, queues, chains in flight), then sends a random
 * sequence of mutations: random request codes (unknown ones too), known codes with random payload
 * sizes and field values near region edges and the 2^53 / 2^64 boundaries, 0..8 real eventfds or
 * memfds on any request, out-of-order protocol (kick before memory, GET_VRING_BASE twice,
 * RESET_DEVICE and REM_MEM_REG of the ring's region with chains in flight, queue restarts), guest
 * ring corruption followed by a kick, and truncated messages followed by a hang-up.
 *
 * After each sequence: no uncaught exception, the disconnect carried a ProtocolError code (a clean
 * hang-up none, never 'INTERNAL'), no ring was broken by a non-coded (internal) error, the process
 * has exactly the fds it had before, and a fresh correct front-end still moves data. Across the run
 * the heap and RSS stay bounded and the per-request metrics stay bounded.
 *
 * A failure names its seed; replay one with `VHOSTD_FUZZ_SEED=<seed>` (and `VHOSTD_FUZZ_ITERATIONS`
 * to run longer). The smallest reproductions of the engine bugs the fuzzer found stay at the end
 * as regression tests.
 */
import { runInNewContext } from 'node:vm';
import v8 from 'node:v8';

import test from 'ava';

import type { ProtocolErrorCode } from '../../../lib/errors';
import { dispatchTable } from '../../../lib/vhost-user/handlers';
import { ProtocolFeature, Request, VHOST_USER_NEED_REPLY_MASK, VHOST_USER_REPLY_MASK, VHOST_USER_VERSION, requestName } from '../../../lib/vhost-user/messages';
import { VHOST_USER_F_PROTOCOL_FEATURES, VIRTIO_F_RING_PACKED, VIRTIO_RING_F_INDIRECT_DESC, bit } from '../../../lib/virtio/constants';
import { native } from '../../../native';
import {
  DEFAULT_LAYOUT,
  Frontend,
  FrontendError,
  PackedQueueDriver,
  encodeConfig,
  encodeMemTable,
  encodeMessage,
  encodeSingleRegion,
  encodeU64,
  encodeVringAddr,
  encodeVringState,
  type ChainSpec,
  type NegotiateOptions,
  type WireRegion,
} from '../../helpers/frontend';
import { NetTestDevice, TestDevice } from '../../helpers/test-device';
import {
  Rng,
  U64_EDGES,
  UNKNOWN_CODES,
  fuzzAddress,
  fuzzSize,
  fuzzU32,
  resize,
  vringFdPayload,
  type RegionNumbers,
} from './fuzz-generator';
import { TestServer, assertServes, expectedOutput, openFds, pattern, settleFds } from './harness';

const DEFAULT_ITERATIONS = 5000;
const ITERATIONS = Number(process.env.VHOSTD_FUZZ_ITERATIONS ?? DEFAULT_ITERATIONS);
const SEED_BASE = 0x5eed_0000;
const ONLY_SEED = process.env.VHOSTD_FUZZ_SEED === undefined ? undefined : Number(process.env.VHOSTD_FUZZ_SEED);
const MiB = 1 << 20;

/** Every ProtocolError code (the `satisfies` keeps this list in step with lib/errors.ts). */
const PROTOCOL_CODES = {
  VHOST_USER_BAD_HEADER: true,
  VHOST_USER_BAD_VERSION: true,
  VHOST_USER_UNKNOWN_REQUEST: true,
  VHOST_USER_BAD_SIZE: true,
  VHOST_USER_BAD_PAYLOAD: true,
  VHOST_USER_BAD_FDS: true,
  VHOST_USER_BAD_VRING_INDEX: true,
  VHOST_USER_BAD_VRING_NUM: true,
  VHOST_USER_BAD_VRING_ADDR: true,
  VHOST_USER_BAD_VRING_BASE: true,
  VHOST_USER_BAD_MEM_REGION: true,
  VHOST_USER_TOO_MANY_REGIONS: true,
  VHOST_USER_BAD_FEATURES: true,
  VHOST_USER_PROTOCOL_FEATURE_MISSING: true,
  VHOST_USER_BAD_CONFIG: true,
  VHOST_USER_BAD_STATE: true,
  VHOST_USER_BAD_LOG: true,
  VHOST_USER_BACKEND_CHANNEL: true,
  VHOST_USER_BAD_INFLIGHT: true,
} satisfies Record<ProtocolErrorCode, true>;
const isProtocolCode = (code: string): boolean => Object.hasOwn(PROTOCOL_CODES, code);

/** Codes the engine implements (the generator's notion of a valid request; the checks never use it). */
const KNOWN_CODES = [...dispatchTable.keys()];
const MAX_FDS_PER_MESSAGE = 9;

function collectGarbage(): void {
  const exposed = (globalThis as { gc?: () => void }).gc;
  if (exposed !== undefined) return exposed();
  v8.setFlagsFromString('--expose-gc');
  (runInNewContext('gc') as () => void)();
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms));
const hex = (bytes: Uint8Array, max = 48): string =>
  Buffer.from(bytes.subarray(0, max)).toString('hex') + (bytes.length > max ? `…(${bytes.length} bytes)` : '');

/** What the run exercised, logged at the end (so a generator change that stops reaching a path shows). */
const stats = {
  outcomes: new Map<string, number>(),
  codes: new Map<string, number>(),
  ringErrors: new Map<string, number>(),
  messages: 0,
};
const bump = (m: Map<string, number>, k: string): void => void m.set(k, (m.get(k) ?? 0) + 1);
const show = (m: Map<string, number>): string =>
  [...m].sort((a, b) => b[1] - a[1]).map(([k, n]) => `${k.replace(/^VHOST_USER_/, '')} ${n}`).join(', ');

/** Uncaught errors anywhere in the process while a seed runs (the server runs in-process). */
const uncaught: Error[] = [];
const onUncaught = (err: unknown): void => {
  uncaught.push(err instanceof Error ? err : new Error(String(err)));
};

// ---------------------------------------------------------------------------------------------
// One session.
// ---------------------------------------------------------------------------------------------

type FdKind = 'eventfd' | 'memfd' | 'socket';
const FD_KINDS: readonly FdKind[] = ['eventfd', 'memfd', 'socket'];

class Session {
  readonly trace: string[] = [];
  /** Our copies of fds we created for messages; closed when the session ends. */
  readonly scratch: number[] = [];
  /** What each fd we made is (fds not in here are the front-end's memfds). */
  readonly kinds = new Map<number, FdKind>();
  /** Queues the front-end set up and can drive (ring memory it owns). */
  readonly queues: number[] = [];
  sentGetFeatures = false;
  protocolChanged = false;
  configNegotiated = false;
  /** The backend closed the socket (a send failed). */
  dead = false;
  /** Scales how often a message is malformed in shape (size, fds, flags, index): low values reach deeper states. */
  readonly hostility: number;

  constructor(
    readonly rng: Rng,
    readonly fe: Frontend,
  ) {
    this.hostility = rng.pick([0.05, 0.3, 1]);
  }

  note(line: string): void {
    if (this.trace.length < 200) this.trace.push(line);
  }

  fd(kind: FdKind): number {
    let fd: number;
    if (kind === 'eventfd') fd = native.eventfd(0);
    else if (kind === 'memfd') fd = native.memfdCreate('vhostd-fuzz', this.rng.pick([0, 0x1000, 0x10000, 0x21000, 0x200000]));
    else {
      const [a, b] = native.socketPair();
      this.scratch.push(a);
      fd = b;
    }
    this.scratch.push(fd);
    this.kinds.set(fd, kind);
    return fd;
  }

  randomFds(max = MAX_FDS_PER_MESSAGE): number[] {
    const r = this.rng.int(20);
    const count = r < 13 ? 0 : r < 17 ? 1 : this.rng.range(2, max);
    return Array.from({ length: count }, () => this.fd(this.rng.pick(FD_KINDS)));
  }

  /** Send one message. Returns false once the backend hung up. */
  send(code: number, payload: Uint8Array, fds: number[] = [], flags?: number): boolean {
    if (this.dead) return false;
    if (fds.length > MAX_FDS_PER_MESSAGE) fds = fds.slice(0, MAX_FDS_PER_MESSAGE);
    if (code === Request.GET_FEATURES) this.sentGetFeatures = true;
    if (code === Request.SET_PROTOCOL_FEATURES) this.protocolChanged = true;
    const f = flags ?? VHOST_USER_VERSION | (this.rng.chance(0.3) ? VHOST_USER_NEED_REPLY_MASK : 0);
    this.note(`${requestName(code)} flags=${f.toString(16)} fds=${fds.length} payload=${hex(payload)}`);
    stats.messages++;
    try {
      this.fe.send(code, payload, { fds, flags: f });
      return true;
    } catch (err) {
      if (err instanceof FrontendError && (err.code === 'FRONTEND_PEER_CLOSED' || err.code === 'FRONTEND_SEND_FAILED')) {
        this.note(`(send failed: ${err.code})`);
        this.dead = true;
        return false;
      }
      throw err;
    }
  }

  /**
   * A round trip that proves every earlier message was handled and every reply read: GET_CONFIG
   * whose flags word (echoed in the reply) is a nonce, or GET_FEATURES when no fuzzed GET_FEATURES
   * could be mistaken for it.
   */
  async sync(timeoutMs = 4000): Promise<'alive' | 'closed' | 'timeout'> {
    if (this.dead) return 'closed';
    const nonce = this.rng.u32();
    const useConfig = (this.configNegotiated && !this.protocolChanged) || this.sentGetFeatures;
    const code = useConfig ? Request.GET_CONFIG : Request.GET_FEATURES;
    this.note(`sync with ${requestName(code)}`);
    try {
      this.fe.send(code, useConfig ? encodeConfig(0, 4, nonce, new Uint8Array(4)) : new Uint8Array(0));
    } catch {
      this.dead = true;
      return 'closed';
    }
    const deadline = Date.now() + timeoutMs;
    try {
      for (;;) {
        const msg = await this.fe.nextMessage(Math.max(1, deadline - Date.now()));
        if (msg.request !== code || (msg.flags & VHOST_USER_REPLY_MASK) === 0) continue;
        if (!useConfig || (msg.payload.length === 16 && new DataView(msg.payload.buffer, msg.payload.byteOffset).getUint32(8, true) === nonce)) {
          return 'alive';
        }
      }
    } catch (err) {
      if (err instanceof FrontendError && err.code === 'FRONTEND_TIMEOUT') return 'timeout';
      this.dead = true;
      return 'closed';
    }
  }

  close(): void {
    this.fe.close();
    for (const fd of this.scratch.splice(0)) native.close(fd);
  }
}

// ---------------------------------------------------------------------------------------------
// Generators.
// ---------------------------------------------------------------------------------------------

function regionsOf(s: Session): RegionNumbers[] {
  return s.fe.memory.regions.map((r) => ({ gpa: r.gpa, size: r.size, userAddr: r.userAddr, mmapOffset: r.mmapOffset }));
}

function vringIndex(s: Session): number {
  const { rng } = s;
  return rng.chance(1 - 0.2 * s.hostility) ? rng.int(2) : rng.pick([2, 3, 255, 256, 0xffff_ffff, rng.u32()]);
}

/** A memory region on the wire and the fd that goes with it. */
function fuzzRegion(s: Session): { region: WireRegion; fd: number } {
  const { rng, fe } = s;
  const known = regionsOf(s);
  if (known.length > 0 && rng.chance(0.3)) {
    const i = rng.int(known.length);
    const r = known[i]!;
    return { region: { gpa: BigInt(r.gpa), size: BigInt(r.size), userAddr: BigInt(r.userAddr), mmapOffset: BigInt(r.mmapOffset) }, fd: fe.memory.regions[i]!.fd };
  }
  const fdSize = rng.pick([0x1000, 0x10000, 0x21000, 0x200000]);
  const fd = native.memfdCreate('vhostd-fuzz-region', fdSize);
  s.scratch.push(fd);
  const size = fuzzSize(rng, fdSize);
  const fresh = BigInt(0x4000_0000 + rng.int(64) * 0x10_0000);
  return {
    region: {
      gpa: rng.chance(0.5) ? fresh : fuzzAddress(rng, known, 'gpa'),
      size,
      userAddr: rng.chance(0.5) ? 0x7d00_0000_0000n + fresh : fuzzAddress(rng, known, 'user'),
      mmapOffset: rng.chance(0.6) ? BigInt(rng.pick([0, 0x1000, 0x1001, fdSize - 0x1000, fdSize])) : rng.pick(U64_EDGES),
    },
    fd,
  };
}

/** A known request with fuzzed fields and (mostly) the fds it expects. */
function structuredMessage(s: Session): { code: number; payload: Uint8Array; fds: number[] } {
  const { rng, fe } = s;
  const code = rng.pick(KNOWN_CODES);
  const regions = regionsOf(s);
  let payload: Uint8Array = new Uint8Array(0);
  let fds: number[] = [];
  switch (code) {
    case Request.SET_FEATURES:
    case Request.SET_PROTOCOL_FEATURES: {
      const offered = code === Request.SET_FEATURES ? (fe.negotiated?.offeredFeatures ?? 0n) : (fe.negotiated?.offeredProtocolFeatures ?? 0n);
      const choice = rng.int(4);
      const value =
        choice === 0
          ? offered & rng.u64()
          : choice === 1
            ? offered
            : choice === 2
              ? (offered & rng.u64()) | (1n << BigInt(rng.int(64)))
              : rng.pick(U64_EDGES);
      payload = encodeU64(code === Request.SET_FEATURES && rng.chance(0.7) ? value | bit(VHOST_USER_F_PROTOCOL_FEATURES) : value);
      break;
    }
    case Request.SET_MEM_TABLE: {
      const n = rng.pick([0, 1, 1, 2, 3, 8, 9]);
      const made = Array.from({ length: Math.min(n, 9) }, () => fuzzRegion(s));
      const nregions = rng.chance(0.85) ? made.length : fuzzU32(rng, [0, 1, 8, 9]);
      payload = encodeMemTable(
        made.map((m) => m.region),
        nregions,
      );
      fds = made.map((m) => m.fd);
      break;
    }
    case Request.ADD_MEM_REG:
    case Request.REM_MEM_REG: {
      const { region, fd } = fuzzRegion(s);
      payload = encodeSingleRegion(region, rng.chance(0.9) ? 0n : rng.u64());
      fds = code === Request.ADD_MEM_REG || rng.chance(0.3) ? [fd] : [];
      break;
    }
    case Request.SET_VRING_NUM:
      payload = encodeVringState(vringIndex(s), fuzzU32(rng, [1, 2, 16, 64, 256, 32768, 32769, 100]));
      break;
    case Request.SET_VRING_BASE:
      payload = encodeVringState(vringIndex(s), fuzzU32(rng, [0, 1, 15, 16, 0xffff, 0x10000, 0x8000_8000, 0x7fff_7fff]));
      break;
    case Request.GET_VRING_BASE:
      payload = encodeVringState(vringIndex(s), rng.chance(0.8) ? 0 : rng.u32());
      break;
    case Request.SET_VRING_ENABLE:
      payload = encodeVringState(vringIndex(s), rng.pick([0, 1, 1, 2, 0xffff_ffff]));
      break;
    case Request.SET_VRING_ADDR: {
      const q = s.queues.length > 0 ? fe.queues.get(rng.pick(s.queues)) : undefined;
      const valid = (gpa: number): bigint => BigInt(fe.memory.toUser(gpa));
      const addr = (which: 'desc' | 'used' | 'avail'): bigint =>
        q !== undefined && rng.chance(0.5) ? valid(q.driver.areas[which]) + BigInt(rng.chance(0.8) ? 0 : rng.pick([-16, -1, 1, 2, 4096])) : fuzzAddress(rng, regions, 'user');
      payload = encodeVringAddr({
        index: vringIndex(s),
        flags: rng.chance(0.8) ? 0 : fuzzU32(rng, [1]),
        desc: addr('desc'),
        used: addr('used'),
        avail: addr('avail'),
        log: rng.chance(0.8) ? 0n : rng.u64(),
      });
      break;
    }
    case Request.SET_VRING_KICK:
    case Request.SET_VRING_CALL:
    case Request.SET_VRING_ERR:
      payload = vringFdPayload(rng, vringIndex(s));
      fds = rng.chance(0.8) ? [s.fd(rng.chance(0.9) ? 'eventfd' : 'memfd')] : [];
      break;
    case Request.SET_BACKEND_REQ_FD:
      fds = [s.fd(rng.chance(0.7) ? 'socket' : 'eventfd')];
      break;
    case Request.GET_CONFIG:
    case Request.SET_CONFIG: {
      const offset = fuzzU32(rng, [0, 4, 8, 12, 15, 16, 255, 256]);
      const size = fuzzU32(rng, [1, 4, 8, 16, 256, 257]);
      const bodyLength = size <= 1024 && rng.chance(0.8) ? size : rng.int(300);
      payload = encodeConfig(offset, size, rng.u32(), rng.bytes(bodyLength));
      break;
    }
    case Request.SET_STATUS:
      payload = encodeU64(rng.chance(0.7) ? BigInt(rng.int(256)) : rng.pick(U64_EDGES));
      break;
    case Request.NET_SET_MTU:
      // Around virtio-net's 68..65535 and the net test device's own 9000 limit.
      payload = encodeU64(rng.chance(0.7) ? BigInt(rng.pick([0, 67, 68, 1500, 9000, 9001, 65535, 65536])) : rng.pick(U64_EDGES));
      break;
    case Request.SEND_RARP:
      payload = rng.bytes(8);
      break;
    case Request.SET_LOG_BASE: {
      // VhostUserLog {mmap_size, mmap_offset}: around the sizes that cover the session's memory, the
      // 1 GiB limit, the fd's size and the 2^53 / 2^64 wrap (DPDK CVE-2020-10722).
      const size = rng.chance(0.7) ? BigInt(rng.pick([0, 1, 8, 0x1000, 0x2000, 0x10000, 1 << 30, (1 << 30) + 1])) : rng.pick(U64_EDGES);
      const offset = rng.chance(0.7) ? BigInt(rng.pick([0, 1, 0x1000, 0x10000])) : rng.pick(U64_EDGES);
      payload = new Uint8Array(16);
      const view = new DataView(payload.buffer);
      view.setBigUint64(0, size, true);
      view.setBigUint64(8, offset, true);
      fds = rng.chance(0.9) ? [s.fd(rng.chance(0.9) ? 'memfd' : 'eventfd')] : [];
      break;
    }
    case Request.SET_LOG_FD:
      fds = rng.chance(0.9) ? [s.fd(rng.chance(0.8) ? 'eventfd' : 'memfd')] : [];
      break;
    default:
      // GET_FEATURES, GET_PROTOCOL_FEATURES, SET_OWNER, RESET_OWNER, RESET_DEVICE, GET_QUEUE_NUM,
      // GET_MAX_MEM_SLOTS, GET_STATUS: no payload.
      break;
  }
  if (rng.chance(0.1 * s.hostility)) payload = resize(rng, payload);
  if (rng.chance(0.1 * s.hostility)) fds = s.randomFds();
  return { code, payload, fds };
}

/** Any code (unknown ones too), any payload, any fds. */
function randomMessage(s: Session): { code: number; payload: Uint8Array; fds: number[] } {
  const { rng } = s;
  const r = rng.int(10);
  const code =
    r < 5 ? rng.pick(KNOWN_CODES) : r < 9 ? rng.pick(UNKNOWN_CODES) : rng.u32();
  return { code, payload: resize(rng, new Uint8Array(0)), fds: s.randomFds() };
}

/** Message flags: version 1 ± NEED_REPLY, sometimes anything. */
function fuzzFlags(s: Session): number {
  const { rng } = s;
  if (rng.chance(0.05 * s.hostility)) return rng.pick([0, 2, 3, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, rng.u32()]);
  return VHOST_USER_VERSION | (rng.chance(0.3) ? VHOST_USER_NEED_REPLY_MASK : 0);
}

/** Overwrite part of a ring in the guest memory the front-end shares, then kick. */
function corruptRing(s: Session): void {
  const { rng, fe } = s;
  const index = rng.pick(s.queues);
  const q = fe.queues.get(index);
  if (q === undefined) return;
  const { desc, avail, used } = q.driver.areas;
  const size = q.driver.size;
  const packed = q.driver instanceof PackedQueueDriver;
  const put = (gpa: number, bytes: Uint8Array): void => {
    try {
      fe.memory.view(gpa, bytes.length).set(bytes);
      s.note(`guest writes ${hex(bytes)} at 0x${gpa.toString(16)} (queue ${index}${packed ? ', packed' : ''})`);
    } catch {
      // Outside what the front-end maps: nothing to write.
    }
  };
  const le = (value: number | bigint, width: 2 | 4 | 8): Uint8Array => {
    const out = new Uint8Array(width);
    const dv = new DataView(out.buffer);
    if (width === 2) dv.setUint16(0, Number(value) & 0xffff, true);
    else if (width === 4) dv.setUint32(0, Number(value) >>> 0, true);
    else dv.setBigUint64(0, BigInt.asUintN(64, BigInt(value)), true);
    return out;
  };
  const entry = desc + 16 * rng.int(size);
  switch (rng.int(8)) {
    case 0: // descriptor address: near region edges or a boundary
      put(entry, le(fuzzAddress(rng, regionsOf(s), 'gpa'), 8));
      break;
    case 1: // descriptor length
      put(entry + 8, le(fuzzU32(rng, [0, 1, 16, 4096, 0x10_0000]), 4));
      break;
    case 2: // flags (NEXT 1, WRITE 2, INDIRECT 4; packed AVAIL/USED bits 7/15)
      put(entry + 12 + (packed ? 2 : 0), le(rng.pick([0, 1, 2, 3, 4, 5, 6, 7, 0x80, 0x8000, 0x8080, rng.u32()]), 2));
      break;
    case 3: // next (split) / buffer id (packed)
      put(entry + 14 - (packed ? 2 : 0), le(rng.pick([0, 1, size - 1, size, size + 1, 0xffff, rng.u32()]), 2));
      break;
    case 4: // avail.idx (split) / driver event suppression (packed)
      put(avail + 2 * (packed ? 0 : 1), le(rng.pick([0, 1, size, size + 1, 0x8000, 0xffff, rng.u32()]), packed ? 4 : 2));
      break;
    case 5: // an available ring entry (split): head index
      if (!packed) put(avail + 4 + 2 * rng.int(size), le(rng.pick([0, size - 1, size, size + 1, 0xffff, rng.u32()]), 2));
      else put(avail, rng.bytes(4));
      break;
    case 6: // used ring / device area (device-owned; a driver scribbling there must not matter)
      put(used + rng.int(8), rng.bytes(rng.range(1, 8)));
      break;
    default: // raw junk over the descriptor table
      put(desc + rng.int(16 * size), rng.bytes(rng.range(1, 32)).subarray(0, Math.max(1, 16 * size - 1)));
  }
  if (rng.chance(0.85)) {
    s.note(`kick ${index}`);
    fe.kick(index);
  }
}

/** Valid chains on a ring (which may itself be fuzzed by now). */
function traffic(s: Session): void {
  const { rng, fe } = s;
  const index = rng.pick(s.queues);
  const chains: ChainSpec[] = Array.from({ length: rng.range(1, 3) }, () => {
    const readable = Array.from({ length: rng.int(3) }, () => ({ data: rng.bytes(rng.range(1, 300)), region: rng.range(1, 2) }));
    const writable = Array.from({ length: rng.range(readable.length === 0 ? 1 : 0, 2) }, () => ({ length: rng.range(1, 300), region: rng.range(1, 2) }));
    return { readable, writable, indirect: rng.chance(0.2) && (rng.chance(0.1) || ((fe.negotiated?.features ?? 0n) & bit(VIRTIO_RING_F_INDIRECT_DESC)) !== 0n) };
  });
  try {
    fe.submit(index, chains);
    s.note(`submit ${chains.length} chain(s) on queue ${index}`);
  } catch (err) {
    s.note(`submit on queue ${index} failed on our side: ${(err as Error).message}`);
  }
}

/** QEMU's restart after GET_VRING_BASE: the same rings and eventfds, a (maybe fuzzed) base. */
function restartQueue(s: Session): void {
  const { rng, fe } = s;
  const index = rng.pick(s.queues);
  const q = fe.queues.get(index);
  if (q === undefined) return;
  const areas = q.driver.areas;
  s.send(Request.SET_VRING_NUM, encodeVringState(index, q.driver.size));
  s.send(Request.SET_VRING_BASE, encodeVringState(index, rng.chance(0.6) ? q.driver.initialBase : fuzzU32(rng, [0, 1, 0xffff, 0x8000_8000])));
  s.send(
    Request.SET_VRING_ADDR,
    encodeVringAddr({ index, desc: fe.memory.toUser(areas.desc), used: fe.memory.toUser(areas.used), avail: fe.memory.toUser(areas.avail) }),
  );
  s.send(Request.SET_VRING_KICK, encodeU64(index), [q.kickFd]);
  s.send(Request.SET_VRING_CALL, encodeU64(index), [q.callFd]);
  s.send(Request.SET_VRING_ENABLE, encodeVringState(index, 1));
}

/** Build the valid part of a session, `depth` steps deep (0: just connected .. 4: chains in flight). */
async function prefix(s: Session, depth: number): Promise<void> {
  const { rng, fe } = s;
  if (depth === 0) return;
  const all = (1n << 64n) - 1n;
  const opts: NegotiateOptions = {
    packed: rng.chance(0.3),
    eventIdx: rng.chance(0.5),
    indirect: rng.chance(0.5),
    legacy: rng.chance(0.08),
    protocolFeatures: rng.chance(0.8) ? all : rng.u64() | bit(ProtocolFeature.REPLY_ACK),
  };
  s.note(`negotiate ${JSON.stringify(opts, (_k, v: unknown) => (typeof v === 'bigint' ? `0x${v.toString(16)}` : v))}`);
  const negotiated = await fe.negotiate(opts);
  s.configNegotiated = (negotiated.protocolFeatures & bit(ProtocolFeature.CONFIG)) !== 0n;
  if (depth === 1) return;
  s.note('SET_MEM_TABLE (default layout)');
  await fe.setMemTable(DEFAULT_LAYOUT);
  if (depth === 2) return;
  const packed = (negotiated.features & bit(VIRTIO_F_RING_PACKED)) !== 0n;
  for (const index of rng.chance(0.5) ? [0, 1] : [0]) {
    const size = packed && rng.chance(0.2) ? rng.range(2, 200) : 2 ** rng.range(1, 8);
    s.note(`setupQueue ${index} size ${size}`);
    await fe.setupQueue(index, size, { ringRegion: index === 0 ? 0 : 2 });
    s.queues.push(index);
  }
  if (depth === 3) return;
  // Chains move, and some stay in flight.
  for (let i = 0; i < rng.range(1, 3); i++) {
    const index = rng.pick(s.queues);
    const data = pattern(rng.range(1, 200), rng.u32());
    const done = await fe.transfer(index, { readable: [{ data, region: 1 }], writable: [{ length: 256, region: 2 }] });
    if (done.len !== data.length) throw new Error(`prefix transfer came back with ${done.len} bytes, sent ${data.length}`);
  }
  for (let i = 0; i < rng.int(4); i++) traffic(s);
}

type Ending = 'sync' | 'hangup';

/** The mutation phase. Returns how the session should end. */
async function mutate(s: Session): Promise<Ending> {
  const { rng } = s;
  const steps = rng.range(1, 24);
  for (let step = 0; step < steps && !s.dead; step++) {
    const haveQueues = s.queues.length > 0;
    const r = rng.int(100);
    if (r < 38) {
      const m = structuredMessage(s);
      s.send(m.code, m.payload, m.fds, fuzzFlags(s));
    } else if (r < 44 && rng.chance(s.hostility)) {
      const m = randomMessage(s);
      s.send(m.code, m.payload, m.fds, fuzzFlags(s));
    } else if (r < 58 && haveQueues) {
      corruptRing(s);
    } else if (r < 70 && haveQueues) {
      traffic(s);
    } else if (r < 74) {
      const index = rng.pick([0, 1]);
      s.send(Request.GET_VRING_BASE, encodeVringState(index, 0));
      if (rng.chance(0.5)) s.send(Request.GET_VRING_BASE, encodeVringState(index, 0));
    } else if (r < 77) {
      s.send(rng.chance(0.8) ? Request.RESET_DEVICE : Request.RESET_OWNER, new Uint8Array(0));
    } else if (r < 80 && s.fe.memory.regions.length > 0) {
      // REM_MEM_REG of the region that holds the rings (region 0), maybe with its fd attached.
      const r0 = s.fe.memory.regions[rng.chance(0.7) ? 0 : rng.int(s.fe.memory.regions.length)]!;
      const wire = { gpa: BigInt(r0.gpa), size: BigInt(r0.size), userAddr: BigInt(r0.userAddr), mmapOffset: BigInt(r0.mmapOffset) };
      s.send(Request.REM_MEM_REG, encodeSingleRegion(wire), rng.chance(0.3) ? [r0.fd] : []);
    } else if (r < 84 && haveQueues) {
      restartQueue(s);
    } else if (r < 87) {
      // Out of order: a kick fd for a ring that has no memory / size / addresses yet (or has them).
      s.send(Request.SET_VRING_KICK, encodeU64(rng.pick([0, 1])), [s.fd('eventfd')]);
    } else if (r < 89) {
      s.send(Request.SET_MEM_TABLE, encodeMemTable([], 0)); // an empty table under running rings
    } else if (r < 97) {
      await (rng.chance(0.5) ? new Promise<void>((resolve) => setImmediate(resolve)) : sleep(rng.int(3)));
    } else if (r < 99) {
      return truncateAndHangUp(s);
    } else {
      return sizeLieAndHangUp(s);
    }
  }
  return 'sync';
}

/** Part of a message (header or payload cut anywhere), maybe with fds, then the front-end goes away. */
async function truncateAndHangUp(s: Session): Promise<Ending> {
  const { rng } = s;
  const m = rng.chance(0.7) ? structuredMessage(s) : randomMessage(s);
  const bytes = encodeMessage(m.code, fuzzFlags(s), m.payload);
  const cut = rng.range(1, Math.max(1, bytes.length - 1));
  s.note(`truncated ${requestName(m.code)}: ${cut} of ${bytes.length} bytes, ${m.fds.length} fds, then hang up`);
  try {
    s.fe.sendRaw(bytes.subarray(0, cut), m.fds.slice(0, MAX_FDS_PER_MESSAGE));
  } catch {
    // Already gone.
  }
  return 'hangup';
}

/** A header whose size field promises more payload than ever comes, then the front-end goes away. */
async function sizeLieAndHangUp(s: Session): Promise<Ending> {
  const { rng } = s;
  const m = structuredMessage(s);
  const size = m.payload.length + rng.pick([1, 7, 8, 100, 4096 - m.payload.length, 4097, 0xffff_ffff - m.payload.length]);
  s.note(`${requestName(m.code)} with size field ${size} but ${m.payload.length} payload bytes, then hang up`);
  try {
    s.fe.sendRaw(encodeMessage(m.code, VHOST_USER_VERSION, m.payload, size), m.fds.slice(0, MAX_FDS_PER_MESSAGE));
  } catch {
    // Already gone.
  }
  return 'hangup';
}

// ---------------------------------------------------------------------------------------------
// Checks.
// ---------------------------------------------------------------------------------------------

/** assertServes, as a problem string for the seed's report instead of bare assertions. */
async function servesProblem(ts: TestServer, rng: Rng): Promise<string | null> {
  const fe = ts.connect();
  try {
    await fe.negotiate({ packed: rng.chance(0.3), eventIdx: rng.chance(0.5) });
    await fe.setMemTable(DEFAULT_LAYOUT);
    await fe.setupQueue(0, 16);
    const data = pattern(100, 7);
    const done = await fe.transfer(0, { readable: [{ data, region: 1 }], writable: [{ length: 128, region: 2 }] }, 3000);
    if (done.len !== 100 || Buffer.compare(done.written, expectedOutput(0, [data], 128)) !== 0) {
      return `a fresh front-end got ${done.len} bytes ${hex(done.written, 16)} back`;
    }
  } catch (err) {
    return `a fresh front-end could not move data: ${(err as Error).message}`;
  } finally {
    fe.close();
  }
  try {
    const ev = await ts.nextDisconnect(3000);
    if (ev.code !== undefined) return `the fresh front-end's clean hang-up was reported as ${ev.code}`;
  } catch {
    return 'the fresh front-end hung up and the server never noticed';
  }
  return null;
}

/** Log entries that mean the engine hit an error it did not anticipate. */
function internalErrors(ts: TestServer, device: TestDevice): string[] {
  const out: string[] = [];
  for (const e of ts.logs) {
    const code = e.fields?.code;
    if (typeof code === 'string' && e.fields?.queue !== undefined) bump(stats.ringErrors, code);
    if (e.fields?.code === 'INTERNAL' || /internal error/i.test(e.message)) out.push(`log: ${e.message.split('\n')[0]}`);
  }
  device.errors.forEach((errors, queue) => {
    for (const err of errors) {
      if (typeof (err as { code?: unknown }).code !== 'string') out.push(`queue ${queue}: processQueue threw a non-coded ${err.name}: ${err.message}`);
    }
    errors.length = 0;
  });
  ts.logs.length = 0;
  return out;
}

async function runSeed(ts: TestServer, device: TestDevice, seed: number): Promise<string[]> {
  const problems: string[] = [];
  await ts.idle();
  ts.logs.length = 0;
  const baseline = openFds();
  const rng = new Rng(seed);
  const s = new Session(rng.fork(), ts.connect());
  let ending: Ending = 'sync';
  let state: 'alive' | 'closed' | 'timeout' | 'hangup' = 'hangup';
  try {
    await prefix(s, s.rng.pick([0, 1, 2, 3, 3, 4, 4, 4]));
    ending = await mutate(s);
    state = ending === 'hangup' ? 'hangup' : await s.sync();
  } catch (err) {
    if (err instanceof FrontendError && err.code === 'FRONTEND_PEER_CLOSED') state = 'closed';
    else problems.push(`front-end step failed: ${(err as Error).stack ?? String(err)}`);
  }
  bump(stats.outcomes, state);
  if (state === 'timeout') problems.push('hang: the backend neither answered the sync request nor hung up within 4 s');
  s.close();
  try {
    const ev = await ts.nextDisconnect(4000);
    bump(stats.codes, ev.code ?? '(clean)');
    if (ev.code === undefined) {
      if (state === 'closed') problems.push('the backend hung up on us without reporting a code');
    } else if (!isProtocolCode(ev.code)) {
      problems.push(`disconnect code ${ev.code} (request ${ev.request}) is not a ProtocolError code`);
    } else if (state === 'alive') {
      problems.push(`a clean hang-up after a answered sync was reported as ${ev.code}`);
    }
  } catch {
    problems.push('no disconnect event within 4 s of the front-end closing');
  }
  if (ts.disconnects.length > 0) problems.push(`extra disconnect events: ${JSON.stringify(ts.disconnects)}`);
  const fds = await settleFds(baseline, 2000);
  if (fds !== baseline) problems.push(`open fds ${fds}, baseline ${baseline}`);
  problems.push(...internalErrors(ts, device));
  if (uncaught.length > 0) problems.push(...uncaught.splice(0).map((e) => `uncaught exception: ${e.stack ?? e.message}`));
  const notServing = await servesProblem(ts, rng);
  if (notServing !== null) problems.push(notServing);
  problems.push(...internalErrors(ts, device));
  if (problems.length > 0) problems.push(`steps:\n    ${s.trace.join('\n    ')}`);
  return problems;
}

// ---------------------------------------------------------------------------------------------
// The test.
// ---------------------------------------------------------------------------------------------

test.serial(`fuzz: ${ONLY_SEED !== undefined ? `seed ${ONLY_SEED}` : `${ITERATIONS} seeded sessions`} against plain and deferred devices`, async (t) => {
  process.on('uncaughtException', onUncaught);
  process.on('unhandledRejection', onUncaught);
  t.teardown(() => {
    process.off('uncaughtException', onUncaught);
    process.off('unhandledRejection', onUncaught);
  });
  // The deferred device also has the net hooks, so NET_SET_MTU and SEND_RARP reach a device on half the seeds.
  const netDevice = new NetTestDevice({ deferred: true });
  const devices = [new TestDevice({ migratable: true }), netDevice];
  const servers = await Promise.all(devices.map((d) => TestServer.start(d)));
  t.teardown(() => Promise.all(servers.map((ts) => ts.close())));

  const seeds = ONLY_SEED !== undefined ? [ONLY_SEED] : Array.from({ length: ITERATIONS }, (_, i) => SEED_BASE + i);
  const warmup = Math.floor(seeds.length / 5);
  let heapBefore = 0;
  let rssBefore = 0;
  const started = Date.now();
  let failed = false;
  for (const [i, seed] of seeds.entries()) {
    if (i === warmup) {
      collectGarbage();
      heapBefore = process.memoryUsage().heapUsed;
      rssBefore = process.memoryUsage().rss;
    }
    const k = seed % 2;
    const problems = await runSeed(servers[k]!, devices[k]!, seed);
    if (problems.length > 0) {
      t.fail(`seed ${seed} (${k === 0 ? 'plain' : 'deferred net'} device; replay: VHOSTD_FUZZ_SEED=${seed}):\n  ${problems.join('\n  ')}`);
      failed = true;
      break;
    }
  }
  t.log(`${seeds.length} sessions in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  t.log(`${stats.messages} fuzzed messages; sessions ended: ${show(stats.outcomes)}`);
  t.log(`disconnects: ${show(stats.codes)}`);
  t.log(`queues broken by the guest: ${show(stats.ringErrors)}`);
  if (failed) return;

  if (seeds.length >= DEFAULT_ITERATIONS) {
    t.true(netDevice.mtus.length > 0 && netDevice.rarps.length > 0, 'NET_SET_MTU and SEND_RARP reached the net device');
  }
  for (const ts of servers) {
    const names = ts.server.counters.requests.size;
    t.true(names <= 64, `counters.requests has ${names} distinct request names (metrics labels must stay bounded)`);
  }
  if (seeds.length >= 50) {
    collectGarbage();
    const heapGrowth = process.memoryUsage().heapUsed - heapBefore;
    const rssGrowth = process.memoryUsage().rss - rssBefore;
    t.log(`after warm-up: heap ${(heapGrowth / MiB).toFixed(1)} MiB, RSS ${(rssGrowth / MiB).toFixed(1)} MiB`);
    t.true(heapGrowth < 16 * MiB, `heap grew by ${(heapGrowth / MiB).toFixed(1)} MiB over ${seeds.length - warmup} sessions`);
    t.true(rssGrowth < 64 * MiB, `RSS grew by ${(rssGrowth / MiB).toFixed(1)} MiB over ${seeds.length - warmup} sessions`);
  }
  await assertServes(t, servers[0]!);
  await assertServes(t, servers[1]!);
});

// ---------------------------------------------------------------------------------------------
// Regression tests: the smallest reproductions of the engine bugs the fuzzer found.
// ---------------------------------------------------------------------------------------------

async function bugServer(t: import('ava').ExecutionContext): Promise<TestServer> {
  const ts = await TestServer.start(new TestDevice());
  t.teardown(() => ts.close());
  return ts;
}

test.serial('SET_OWNER carrying 9 eventfds is VHOST_USER_BAD_FDS and leaks no fd', async (t) => {
  const ts = await bugServer(t);
  const baseline = openFds();
  const fe = ts.connect();
  await fe.negotiate();
  const fds = Array.from({ length: 9 }, () => native.eventfd(0));
  fe.send(Request.SET_OWNER, new Uint8Array(0), { fds });
  for (const fd of fds) native.close(fd);
  const ev = await ts.nextDisconnect();
  fe.close();
  t.is(ev.code, 'VHOST_USER_BAD_FDS');
  t.is(await settleFds(baseline), baseline);
});

test.serial('GET_FEATURES then an immediate hang-up is a clean disconnect', async (t) => {
  const ts = await bugServer(t);
  const fe = ts.connect();
  await fe.negotiate();
  fe.send(Request.GET_FEATURES);
  fe.close();
  t.is((await ts.nextDisconnect()).code, undefined);
});

test.serial('a new kick fd for a running ring leaves no stale watcher behind', async (t) => {
  const ts = await bugServer(t);
  const fe = ts.connect();
  t.teardown(() => fe.close());
  await fe.negotiate();
  await fe.setMemTable(DEFAULT_LAYOUT);
  await fe.setupQueue(0, 16);
  const newKick = native.eventfd(0);
  const ring1Kick = native.eventfd(0);
  t.teardown(() => [newKick, ring1Kick].forEach((fd) => native.close(fd)));
  // Found by the fuzzer: the backend closed ring 0's old kick fd but kept polling its number, so
  // ring 1's kick fd, received under that number, failed uv_poll_init with EEXIST.
  await fe.request(Request.SET_VRING_KICK, encodeU64(0), [newKick]);
  await fe.request(Request.SET_VRING_NUM, encodeVringState(1, 16));
  const u = (gpa: number): number => fe.memory.toUser(gpa);
  await fe.request(Request.SET_VRING_ADDR, encodeVringAddr({ index: 1, desc: u(0x1000), avail: u(0x3000), used: u(0x4000) }));
  await t.notThrowsAsync(fe.request(Request.SET_VRING_KICK, encodeU64(1), [ring1Kick]));
  t.deepEqual(ts.disconnects, []);
});

test.serial('kick and call fds that are not eventfds are refused (VHOST_USER_BAD_FDS) and leak nothing', async (t) => {
  // Found by the fuzzer: a socket as call fd made completions throw EPIPE inside event-loop
  // callbacks, and a socket as kick fd threw EINVAL out of the kick watcher.
  const ts = await bugServer(t);
  for (const request of [Request.SET_VRING_CALL, Request.SET_VRING_KICK, Request.SET_VRING_ERR]) {
    const baseline = openFds();
    const fe = ts.connect();
    await fe.negotiate();
    await fe.setMemTable(DEFAULT_LAYOUT);
    const [a, b] = native.socketPair();
    fe.send(request, encodeU64(0), { fds: [b] });
    native.close(a);
    native.close(b);
    const ev = await ts.nextDisconnect();
    fe.close();
    t.is(ev.code, 'VHOST_USER_BAD_FDS', requestName(request));
    t.is(await settleFds(baseline), baseline);
  }
  await assertServes(t, ts);
});

test.serial('distinct unknown request codes do not grow counters.requests', async (t) => {
  const ts = await bugServer(t);
  for (let i = 0; i < 100; i++) {
    const fe = ts.connect();
    fe.send(1000 + i);
    await ts.nextDisconnect();
    fe.close();
  }
  const names = ts.server.counters.requests.size;
  t.true(names <= 64, `${names} distinct request names (each one a metrics label)`);
});

test.serial('SET_BACKEND_REQ_FD with a memfd is a protocol error and leaks no fd', async (t) => {
  const ts = await bugServer(t);
  const baseline = openFds();
  const fe = ts.connect();
  await fe.negotiate();
  const memfd = native.memfdCreate('vhostd-fuzz-bug', 0x1000);
  fe.send(Request.SET_BACKEND_REQ_FD, new Uint8Array(0), { fds: [memfd] });
  native.close(memfd);
  const ev = await ts.nextDisconnect();
  fe.close();
  t.true(ev.code !== undefined && isProtocolCode(ev.code), `disconnect code ${ev.code}`);
  t.is(await settleFds(baseline), baseline, 'the memfd is closed');
});
