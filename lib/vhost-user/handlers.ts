/**
 * The dispatch table: every supported request once, with what it may carry, and its handler
 * (DPDK's VHOST_MESSAGE_HANDLER list, as data).
 *
 * Generic checks run before any handler, from the entry's metadata: exact payload size, fd count,
 * vring index, required protocol feature. Handlers then decode their payload, validate values with
 * `validate.ts`, and return the reply payload (or nothing). They never write to the socket; fds they
 * keep are taken out of `message.fds` (set to -1) and the connection closes the rest.
 *
 * Security model: see connection.ts. No field of a message is trusted before a predicate checked it.
 */
import { ProtocolError, RequestRefused } from '../errors';
import { GuestMemory, type GuestRegion } from '../memory/guest-memory';
import { mapGuestMemory } from '../memory/mapped-region';
import {
  bit,
  VHOST_F_LOG_ALL,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from '../virtio/constants';
import type { VhostUserConnection } from './connection';
import { applyDirtyLog, applyRingLog, setLogBase, setLogFd } from './dirty-logging';
import { createInflightArea, decodeInflight, encodeInflight, INFLIGHT_PAYLOAD_SIZE, InflightArea } from './inflight-region';
import {
  CONFIG_HEADER_SIZE,
  LOG_PAYLOAD_SIZE,
  MAX_CONFIG_SIZE,
  MEMORY_BASELINE_NREGIONS,
  MEMORY_REGION_SIZE,
  NET_MTU_MAX,
  NET_MTU_MIN,
  ProtocolFeature,
  Request,
  requestName,
  u64,
  VHOST_VRING_F_LOG,
  VRING_IDX_MASK,
  VRING_NOFD_MASK,
} from './messages';
import {
  checkFdKind,
  checkFeatureSubset,
  checkMemoryRegion,
  checkNoOverlap,
  checkRegionCount,
  checkRingAddress,
  checkVringBase,
  checkVringIndex,
  checkVringNum,
  type MemoryRegionNumbers,
  type RawMemoryRegion,
} from './validate';
import type { RingAddresses } from '../virtqueue/virtqueue';
import type { Vring } from './vring';

/** A received message. `fds` entries are set to -1 by a handler that keeps them. */
export interface Message {
  request: number;
  flags: number;
  payload: Uint8Array;
  view: DataView;
  fds: number[];
}

/** A reply that carries fds (GET_INFLIGHT_FD); the connection closes them once sent. */
export interface FdReply {
  payload: Uint8Array;
  fds: number[];
}

type Reply = Uint8Array | FdReply | undefined;

/** One row of the table. */
interface RequestEntry {
  /** Run the generic checks; throws ProtocolError. */
  check(connection: VhostUserConnection, message: Message): void;
  handle(connection: VhostUserConnection, message: Message): Reply | Promise<Reply>;
}

interface EntrySpec {
  /** Exact payload size, or a minimum for variable-size payloads (then the handler checks the rest). */
  size: number | { atLeast: number };
  /** 'none': fds forbidden; 'one': exactly one; 'handler': the handler checks (depends on payload). */
  fds: 'none' | 'one' | 'handler';
  /** Where the vring index is: u32 at offset 0, or the low byte of a u64 (kick/call/err). */
  vring?: 'state' | 'u64';
  /** Protocol feature that must have been negotiated. */
  requires?: number;
  handle(connection: VhostUserConnection, message: Message): Reply | Promise<Reply>;
}

/** Memory slots announced with GET_MAX_MEM_SLOTS (libvhost-user uses the same x86 KVM-derived 509). */
export const MAX_MEM_SLOTS = 509;

/** Ring features every device gets from the engine; devices add their own bits. */
export const ENGINE_FEATURES =
  bit(VIRTIO_F_VERSION_1) |
  bit(VIRTIO_RING_F_INDIRECT_DESC) |
  bit(VIRTIO_RING_F_EVENT_IDX) |
  bit(VIRTIO_F_RING_PACKED) |
  bit(VHOST_USER_F_PROTOCOL_FEATURES);

/** Protocol features the engine implements for every device. */
export const ENGINE_PROTOCOL_FEATURES = [
  ProtocolFeature.MQ,
  ProtocolFeature.REPLY_ACK,
  ProtocolFeature.BACKEND_REQ,
  ProtocolFeature.CONFIGURE_MEM_SLOTS,
  ProtocolFeature.RESET_DEVICE,
  ProtocolFeature.STATUS,
].reduce((mask, b) => mask | bit(b), 0n);

function offeredFeatures(c: VhostUserConnection): bigint {
  const logAll = c.device.migratable === true ? bit(VHOST_F_LOG_ALL) : 0n;
  return c.device.features() | ENGINE_FEATURES | logAll;
}

function offeredProtocolFeatures(c: VhostUserConnection): bigint {
  const config = c.device.getConfig !== undefined ? bit(ProtocolFeature.CONFIG) : 0n;
  const mtu = c.device.setMtu !== undefined ? bit(ProtocolFeature.NET_MTU) : 0n;
  const rarp = c.device.sendRarp !== undefined ? bit(ProtocolFeature.RARP) : 0n;
  const log = c.device.migratable === true ? bit(ProtocolFeature.LOG_SHMFD) : 0n;
  return ENGINE_PROTOCOL_FEATURES | config | mtu | rarp | log | c.device.protocolFeatures();
}

function negotiated(c: VhostUserConnection, feature: number): boolean {
  return (c.ackedFeatures & bit(feature)) !== 0n;
}

function vringAt(c: VhostUserConnection, index: number): Vring {
  return c.vrings[index]!; // index checked by the entry's `vring` metadata
}

/** The vring a configuration request names; its size, addresses and base change only while stopped. */
function stoppedVringAt(c: VhostUserConnection, m: Message): Vring {
  const vring = vringAt(c, m.view.getUint32(0, true));
  if (vring.started) {
    throw new ProtocolError('VHOST_USER_BAD_STATE', `${requestName(m.request)} on running queue ${vring.index}`);
  }
  return vring;
}

function sameRingAddresses(a: RingAddresses, b: RingAddresses): boolean {
  return a.descUserAddr === b.descUserAddr && a.usedUserAddr === b.usedUserAddr && a.availUserAddr === b.availUserAddr;
}

/** Vring state payload: u32 index, u32 num. */
function vringState(index: number, num: number): Uint8Array {
  const bytes = new Uint8Array(8);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, index, true);
  view.setUint32(4, num, true);
  return bytes;
}

/** Start a ring once it has everything; a ring that cannot start is a front-end error. */
function startVring(c: VhostUserConnection, vring: Vring): void {
  try {
    vring.startIfReady({
      device: c.device,
      logger: c.logger,
      memory: c.memory,
      packed: negotiated(c, VIRTIO_F_RING_PACKED),
      eventIdx: negotiated(c, VIRTIO_RING_F_EVENT_IDX),
      indirect: negotiated(c, VIRTIO_RING_F_INDIRECT_DESC),
      workers: c.queueWorkers ?? undefined,
      pollUs: c.pollUs,
      features: c.ackedFeatures,
      inflight: c.inflight ?? undefined,
    });
  } catch (err) {
    const inflight = (err as { code?: string }).code === 'VIRTQ_BAD_INFLIGHT' || (err as { code?: string }).code === 'VHOST_USER_BAD_INFLIGHT';
    throw new ProtocolError(inflight ? 'VHOST_USER_BAD_INFLIGHT' : 'VHOST_USER_BAD_VRING_ADDR', `cannot start queue ${vring.index}: ${(err as Error).message}`);
  }
}

/** VhostUserMemoryRegion at `offset`: u64 guest_addr, u64 size, u64 user_addr, u64 mmap_offset. */
function decodeRegion(view: DataView, offset: number): RawMemoryRegion {
  return {
    guestPhysAddr: view.getBigUint64(offset, true),
    size: view.getBigUint64(offset + 8, true),
    userAddr: view.getBigUint64(offset + 16, true),
    mmapOffset: view.getBigUint64(offset + 24, true),
  };
}

/**
 * Map validated regions, one per fd of the message, into a memory map beside `kept`. The fds are
 * taken (set to -1) even if mapping fails; then every one is closed.
 */
function mapMessageRegions(specs: readonly MemoryRegionNumbers[], message: Message, kept: readonly GuestRegion[] = []): GuestMemory {
  const fds = message.fds.slice(0, specs.length);
  message.fds.fill(-1, 0, specs.length);
  try {
    return mapGuestMemory(specs, fds, kept);
  } catch (err) {
    throw new ProtocolError('VHOST_USER_BAD_MEM_REGION', `cannot map memory region: ${(err as Error).message}`);
  }
}

/**
 * Install a new memory map: running rings re-resolve their addresses (rings in worker threads have
 * remapped when this resolves), the device hears of it (`memoryChanged`), the old map is released.
 */
async function replaceMemory(c: VhostUserConnection, memory: GuestMemory): Promise<void> {
  const old = c.memory;
  c.memory = memory;
  const remapping: Promise<void>[] = [];
  for (const vring of c.vrings) {
    const done = vring.setMemory(memory);
    if (done !== undefined) remapping.push(done);
  }
  if (remapping.length > 0) await Promise.all(remapping);
  c.device.memoryChanged?.(memory);
  old.close();
  c.logger.info(`guest memory: ${memory.regions.length} region(s), ${Math.round(memory.totalSize / 2 ** 20)} MiB`);
}

/**
 * SET_VRING_KICK/CALL/ERR: u64 with the index in bits 0-7 and "no fd" in bit 8 (vhost-user.rst).
 * The fd, when there is one, must be an eventfd.
 */
function takeVringFd(message: Message): { index: number; fd: number } {
  const value = message.view.getBigUint64(0, true);
  if ((value & ~BigInt(VRING_IDX_MASK | VRING_NOFD_MASK)) !== 0n) {
    throw new ProtocolError('VHOST_USER_BAD_PAYLOAD', `vring fd payload 0x${value.toString(16)} has unknown bits set`);
  }
  const noFd = (value & BigInt(VRING_NOFD_MASK)) !== 0n;
  const expected = noFd ? 0 : 1;
  if (message.fds.length !== expected) {
    throw new ProtocolError('VHOST_USER_BAD_FDS', `expected ${expected} fd(s), got ${message.fds.length}`);
  }
  const index = Number(value & BigInt(VRING_IDX_MASK));
  if (noFd) return { index, fd: -1 };
  const fd = message.fds[0]!;
  checkFdKind(fd, 'eventfd', `${requestName(message.request)} fd of queue ${index}`);
  message.fds[0] = -1;
  return { index, fd };
}

const entries: Record<number, EntrySpec> = {
  [Request.GET_FEATURES]: { size: 0, fds: 'none', handle: (c) => u64(offeredFeatures(c)) },

  [Request.SET_FEATURES]: {
    size: 8,
    fds: 'none',
    handle(c, m) {
      const features = m.view.getBigUint64(0, true);
      checkFeatureSubset('features', features, offeredFeatures(c));
      c.ackedFeatures = features;
      const switching: Promise<unknown>[] = [];
      // vhost-user.rst: without VHOST_USER_F_PROTOCOL_FEATURES, rings start enabled.
      if ((features & bit(VHOST_USER_F_PROTOCOL_FEATURES)) === 0n) {
        for (const vring of c.vrings) {
          const done = vring.setEnabled(true);
          if (done !== undefined) switching.push(done);
        }
      }
      // vhost-user.rst, "Migration": VHOST_F_LOG_ALL starts and stops logging.
      if (c.dirtyLog !== null) switching.push(applyDirtyLog(c));
      return switching.length > 0 ? Promise.all(switching).then(() => undefined) : undefined;
    },
  },

  [Request.GET_PROTOCOL_FEATURES]: { size: 0, fds: 'none', handle: (c) => u64(offeredProtocolFeatures(c)) },

  [Request.SET_PROTOCOL_FEATURES]: {
    size: 8,
    fds: 'none',
    handle(c, m) {
      const features = m.view.getBigUint64(0, true);
      checkFeatureSubset('protocol features', features, offeredProtocolFeatures(c));
      c.ackedProtocolFeatures = features;
      return undefined;
    },
  },

  // Ownership is implicit: one front-end per connection, one connection at a time.
  [Request.SET_OWNER]: { size: 0, fds: 'none', handle: () => undefined },

  [Request.RESET_OWNER]: { size: 0, fds: 'none', handle: (c) => resetDevice(c) },

  [Request.RESET_DEVICE]: { size: 0, fds: 'none', requires: ProtocolFeature.RESET_DEVICE, handle: (c) => resetDevice(c) },

  [Request.SET_MEM_TABLE]: {
    // u32 nregions, u32 padding, VhostUserMemoryRegion regions[nregions]
    size: { atLeast: 8 },
    fds: 'handler',
    async handle(c, m) {
      const count = m.view.getUint32(0, true);
      checkRegionCount(count, MEMORY_BASELINE_NREGIONS);
      if (m.payload.length !== 8 + count * MEMORY_REGION_SIZE) {
        throw new ProtocolError('VHOST_USER_BAD_SIZE', `SET_MEM_TABLE with ${count} regions must be ${8 + count * MEMORY_REGION_SIZE} bytes, got ${m.payload.length}`);
      }
      if (m.fds.length !== count) {
        throw new ProtocolError('VHOST_USER_BAD_FDS', `SET_MEM_TABLE with ${count} regions carries ${m.fds.length} fds`);
      }
      const specs: MemoryRegionNumbers[] = [];
      for (let i = 0; i < count; i++) specs.push(checkMemoryRegion(decodeRegion(m.view, 8 + i * MEMORY_REGION_SIZE)));
      checkNoOverlap(specs);
      await replaceMemory(c, mapMessageRegions(specs, m));
      for (const vring of c.vrings) startVring(c, vring);
      return undefined;
    },
  },

  [Request.SET_LOG_BASE]: {
    size: LOG_PAYLOAD_SIZE,
    fds: 'one',
    requires: ProtocolFeature.LOG_SHMFD,
    handle: (c, m) => setLogBase(c, m),
  },

  [Request.SET_LOG_FD]: { size: 0, fds: 'one', requires: ProtocolFeature.LOG_SHMFD, handle: (_c, m) => setLogFd(m) },

  [Request.GET_MAX_MEM_SLOTS]: {
    size: 0,
    fds: 'none',
    requires: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    handle: () => u64(BigInt(MAX_MEM_SLOTS)),
  },

  [Request.ADD_MEM_REG]: {
    // u64 padding, VhostUserMemoryRegion
    size: 8 + MEMORY_REGION_SIZE,
    fds: 'one',
    requires: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    async handle(c, m) {
      const spec = checkMemoryRegion(decodeRegion(m.view, 8));
      checkRegionCount(c.memory.regions.length + 1, MAX_MEM_SLOTS);
      checkNoOverlap([...c.memory.regions, spec]);
      await replaceMemory(c, mapMessageRegions([spec], m, c.memory.regions));
      for (const vring of c.vrings) startVring(c, vring);
      return undefined;
    },
  },

  [Request.REM_MEM_REG]: {
    // vhost-user.rst: same payload as ADD_MEM_REG; QEMU may attach the region's fd, which we close.
    size: 8 + MEMORY_REGION_SIZE,
    fds: 'handler',
    requires: ProtocolFeature.CONFIGURE_MEM_SLOTS,
    async handle(c, m) {
      if (m.fds.length > 1) throw new ProtocolError('VHOST_USER_BAD_FDS', `REM_MEM_REG carries ${m.fds.length} fds`);
      const spec = checkMemoryRegion(decodeRegion(m.view, 8));
      const keep = c.memory.regions.filter(
        (r) => !(r.guestPhysAddr === spec.guestPhysAddr && r.size === spec.size && r.userAddr === spec.userAddr),
      );
      if (keep.length === c.memory.regions.length) {
        throw new ProtocolError('VHOST_USER_BAD_MEM_REGION', `REM_MEM_REG: no region at guest address 0x${spec.guestPhysAddr.toString(16)}`);
      }
      await replaceMemory(c, new GuestMemory(keep));
      return undefined;
    },
  },

  [Request.SET_VRING_NUM]: {
    size: 8,
    fds: 'none',
    vring: 'state',
    handle(c, m) {
      const vring = stoppedVringAt(c, m);
      const num = m.view.getUint32(4, true);
      checkVringNum(num, negotiated(c, VIRTIO_F_RING_PACKED), c.device.maxQueueSize);
      vring.num = num;
      return undefined;
    },
  },

  [Request.SET_VRING_ADDR]: {
    // u32 index, u32 flags, u64 desc, u64 used, u64 avail, u64 log
    size: 40,
    fds: 'none',
    vring: 'state',
    handle(c, m) {
      const flags = m.view.getUint32(4, true);
      if ((flags & ~VHOST_VRING_F_LOG) !== 0) {
        throw new ProtocolError('VHOST_USER_BAD_PAYLOAD', `SET_VRING_ADDR flags 0x${flags.toString(16)} have unknown bits set`);
      }
      const addresses = {
        descUserAddr: checkRingAddress('descriptor', m.view.getBigUint64(8, true)),
        usedUserAddr: checkRingAddress('used', m.view.getBigUint64(16, true)),
        availUserAddr: checkRingAddress('available', m.view.getBigUint64(24, true)),
      };
      const logGuestAddr = (flags & VHOST_VRING_F_LOG) !== 0 ? checkRingAddress('log', m.view.getBigUint64(32, true)) : null;
      const vring = vringAt(c, m.view.getUint32(0, true));
      const current = vring.addresses;
      if (vring.started && current !== null && sameRingAddresses(current, addresses)) {
        // vhost-user.rst, "Migration": the front-end starts and stops logging of a running ring's used
        // ring with VHOST_VRING_F_LOG in SET_VRING_ADDR; its addresses stay as they are.
        vring.logGuestAddr = logGuestAddr;
        return applyRingLog(c, vring)?.then(() => undefined);
      }
      stoppedVringAt(c, m).addresses = addresses;
      vring.logGuestAddr = logGuestAddr;
      applyRingLog(c, vring); // a stopped ring: nothing to wait for
      startVring(c, vring);
      return undefined;
    },
  },

  [Request.SET_VRING_BASE]: {
    size: 8,
    fds: 'none',
    vring: 'state',
    handle(c, m) {
      const vring = stoppedVringAt(c, m);
      const base = m.view.getUint32(4, true);
      checkVringBase(base, negotiated(c, VIRTIO_F_RING_PACKED));
      vring.base = base;
      return undefined;
    },
  },

  [Request.GET_VRING_BASE]: {
    size: 8,
    fds: 'none',
    vring: 'state',
    async handle(c, m) {
      const vring = vringAt(c, m.view.getUint32(0, true));
      // vhost-user.rst: "stop a ring upon receiving VHOST_USER_GET_VRING_BASE".
      const base = await vring.stop(true);
      vring.setFd('callFd', -1);
      return vringState(vring.index, base ?? 0);
    },
  },

  [Request.SET_VRING_KICK]: {
    size: 8,
    fds: 'handler',
    vring: 'u64',
    handle(c, m) {
      const { index, fd } = takeVringFd(m);
      const vring = vringAt(c, index);
      if (fd < 0) throw new ProtocolError('VHOST_USER_BAD_FDS', 'polling mode (no kick fd) is not supported');
      const switched = vring.setKickFd(fd); // a running queue in a worker: resolves once it switched
      if (switched !== undefined) return switched.then(() => undefined);
      startVring(c, vring);
      return undefined;
    },
  },

  [Request.SET_VRING_CALL]: {
    size: 8,
    fds: 'handler',
    vring: 'u64',
    handle(c, m) {
      const { index, fd } = takeVringFd(m);
      return vringAt(c, index).setFd('callFd', fd)?.then(() => undefined);
    },
  },

  [Request.SET_VRING_ERR]: {
    size: 8,
    fds: 'handler',
    vring: 'u64',
    handle(c, m) {
      const { index, fd } = takeVringFd(m);
      vringAt(c, index).setFd('errFd', fd);
      return undefined;
    },
  },

  [Request.GET_QUEUE_NUM]: { size: 0, fds: 'none', handle: (c) => u64(BigInt(c.device.numQueues)) },

  [Request.SET_VRING_ENABLE]: {
    size: 8,
    fds: 'none',
    vring: 'state',
    handle(c, m) {
      const vring = vringAt(c, m.view.getUint32(0, true));
      const enable = m.view.getUint32(4, true);
      if (enable > 1) throw new ProtocolError('VHOST_USER_BAD_PAYLOAD', `SET_VRING_ENABLE value ${enable} is not 0 or 1`);
      return vring.setEnabled(enable === 1)?.then(() => undefined);
    },
  },

  [Request.SET_BACKEND_REQ_FD]: {
    size: 0,
    fds: 'one',
    requires: ProtocolFeature.BACKEND_REQ,
    handle(c, m) {
      const fd = m.fds[0]!;
      checkFdKind(fd, 'socket', 'SET_BACKEND_REQ_FD fd');
      m.fds[0] = -1;
      c.setBackendChannel(fd);
      return undefined;
    },
  },

  [Request.GET_CONFIG]: {
    // u32 offset, u32 size, u32 flags, u8 payload[size]
    size: { atLeast: CONFIG_HEADER_SIZE },
    fds: 'none',
    requires: ProtocolFeature.CONFIG,
    handle(c, m) {
      const { offset, size } = checkConfigRequest(m);
      if (c.device.getConfig === undefined) throw new ProtocolError('VHOST_USER_BAD_CONFIG', 'device has no config space');
      const data = c.device.getConfig(offset, size);
      const reply = new Uint8Array(CONFIG_HEADER_SIZE + size);
      reply.set(m.payload.subarray(0, CONFIG_HEADER_SIZE));
      reply.set(data.subarray(0, size), CONFIG_HEADER_SIZE);
      return reply;
    },
  },

  [Request.SET_CONFIG]: {
    size: { atLeast: CONFIG_HEADER_SIZE },
    fds: 'none',
    requires: ProtocolFeature.CONFIG,
    handle(c, m) {
      const { offset, size } = checkConfigRequest(m);
      // The guest driver chose these bytes, so a refused write is the guest's mistake, not the
      // front-end's: refuse the request (NACK with REPLY_ACK) and keep the connection.
      if (c.device.setConfig === undefined) throw new RequestRefused(`config space is read-only (write of ${size} bytes at ${offset})`);
      const data = m.payload.slice(CONFIG_HEADER_SIZE, CONFIG_HEADER_SIZE + size);
      try {
        c.device.setConfig(offset, data);
      } catch (err) {
        throw new RequestRefused(`config write of ${size} bytes at ${offset} refused: ${(err as Error).message}`);
      }
      // Devices running queues in worker threads see the same write (e.g. blk's cache mode).
      c.queueWorkers?.setConfig(offset, data);
      return undefined;
    },
  },

  [Request.SEND_RARP]: {
    // u64 whose first 6 bytes are the guest's MAC (vhost-user.rst). QEMU copies only those 6 bytes
    // into an uninitialized u64, so the last two are ignored rather than checked.
    size: 8,
    fds: 'none',
    requires: ProtocolFeature.RARP,
    handle(c, m) {
      if (c.device.sendRarp === undefined) throw new ProtocolError('VHOST_USER_PROTOCOL_FEATURE_MISSING', 'device cannot send a RARP');
      c.device.sendRarp(m.payload.slice(0, 6));
      return undefined;
    },
  },

  [Request.NET_SET_MTU]: {
    size: 8,
    fds: 'none',
    requires: ProtocolFeature.NET_MTU,
    handle(c, m) {
      if (c.device.setMtu === undefined) throw new ProtocolError('VHOST_USER_PROTOCOL_FEATURE_MISSING', 'device has no MTU');
      const mtu = m.view.getBigUint64(0, true);
      // vhost-user.rst: the back-end answers non-zero (REPLY_ACK) for an invalid MTU, so a bad value
      // is a refusal, not a violation. virtio 1.2 §5.1.4.1: "The device MUST set mtu to between 68
      // and 65535 inclusive."
      if (mtu < BigInt(NET_MTU_MIN) || mtu > BigInt(NET_MTU_MAX)) {
        throw new RequestRefused(`MTU ${mtu} is outside ${NET_MTU_MIN}..${NET_MTU_MAX}`);
      }
      c.device.setMtu(Number(mtu));
      return undefined;
    },
  },

  [Request.GET_INFLIGHT_FD]: {
    // vhost-user.rst: the front-end names the queues and ring size; the back-end answers with a new
    // area (mmap_size, mmap_offset) and its fd. Sized for either ring layout: QEMU keeps one area over
    // driver resets that may change it.
    size: INFLIGHT_PAYLOAD_SIZE,
    fds: 'none',
    requires: ProtocolFeature.INFLIGHT_SHMFD,
    handle(c, m) {
      const { fd, description } = createInflightArea(decodeInflight(m.view), c.vrings.length, c.device.maxQueueSize);
      return { payload: encodeInflight(description), fds: [fd] };
    },
  },

  [Request.SET_INFLIGHT_FD]: {
    // The area to track in flight requests in, before the rings start (after a reconnect: the one an
    // earlier process used, which the rings then resume from).
    size: INFLIGHT_PAYLOAD_SIZE,
    fds: 'one',
    requires: ProtocolFeature.INFLIGHT_SHMFD,
    handle(c, m) {
      const running = c.vrings.find((vring) => vring.started);
      if (running !== undefined) throw new ProtocolError('VHOST_USER_BAD_STATE', `SET_INFLIGHT_FD while queue ${running.index} runs`);
      const area = InflightArea.map(m.fds[0]!, decodeInflight(m.view), c.vrings.length, c.device.maxQueueSize);
      m.fds[0] = -1;
      c.setInflight(area);
      return undefined;
    },
  },

  [Request.SET_STATUS]: {
    size: 8,
    fds: 'none',
    requires: ProtocolFeature.STATUS,
    handle(c, m) {
      const status = m.view.getBigUint64(0, true);
      if (status > 0xffn) throw new ProtocolError('VHOST_USER_BAD_PAYLOAD', `device status 0x${status.toString(16)} exceeds 8 bits`);
      c.status = Number(status);
      return undefined;
    },
  },

  [Request.GET_STATUS]: { size: 0, fds: 'none', requires: ProtocolFeature.STATUS, handle: (c) => u64(BigInt(c.status)) },
};

/** GET_CONFIG / SET_CONFIG: the region must lie inside the 256-byte config space and match the payload. */
function checkConfigRequest(m: Message): { offset: number; size: number } {
  const offset = m.view.getUint32(0, true);
  const size = m.view.getUint32(4, true);
  if (size === 0 || size > MAX_CONFIG_SIZE || offset > MAX_CONFIG_SIZE - size) {
    throw new ProtocolError('VHOST_USER_BAD_CONFIG', `config access of ${size} bytes at offset ${offset} is outside the ${MAX_CONFIG_SIZE}-byte config space`);
  }
  if (m.payload.length !== CONFIG_HEADER_SIZE + size) {
    throw new ProtocolError('VHOST_USER_BAD_SIZE', `config payload is ${m.payload.length} bytes, header says ${CONFIG_HEADER_SIZE + size}`);
  }
  return { offset, size };
}

/** RESET_OWNER / RESET_DEVICE: stop every ring and forget negotiated state; the connection stays. */
async function resetDevice(c: VhostUserConnection): Promise<undefined> {
  await c.stopVrings();
  c.device.reset?.();
  c.queueWorkers?.reset();
  c.ackedFeatures = 0n;
  c.status = 0;
  return undefined;
}

function buildEntry(code: number, spec: EntrySpec): RequestEntry {
  const name = requestName(code);
  return {
    check(c, m) {
      const size = m.payload.length;
      if (typeof spec.size === 'number' ? size !== spec.size : size < spec.size.atLeast) {
        const expected = typeof spec.size === 'number' ? `${spec.size}` : `at least ${spec.size.atLeast}`;
        throw new ProtocolError('VHOST_USER_BAD_SIZE', `${name} payload is ${size} bytes, expected ${expected}`);
      }
      if ((spec.fds === 'none' && m.fds.length !== 0) || (spec.fds === 'one' && m.fds.length !== 1)) {
        throw new ProtocolError('VHOST_USER_BAD_FDS', `${name} carries ${m.fds.length} fds, expected ${spec.fds === 'one' ? 1 : 0}`);
      }
      if (spec.requires !== undefined && !c.hasProtocolFeature(spec.requires)) {
        throw new ProtocolError('VHOST_USER_PROTOCOL_FEATURE_MISSING', `${name} needs a protocol feature that was not negotiated (bit ${spec.requires})`);
      }
      if (spec.vring !== undefined) {
        const index = spec.vring === 'state' ? m.view.getUint32(0, true) : Number(m.view.getBigUint64(0, true) & BigInt(VRING_IDX_MASK));
        checkVringIndex(index, c.vrings.length);
      }
    },
    handle: spec.handle,
  };
}

/** Request code → entry. Requests not in here are refused with VHOST_USER_UNKNOWN_REQUEST. */
export const dispatchTable: ReadonlyMap<number, RequestEntry> = new Map(
  Object.entries(entries).map(([code, spec]) => [Number(code), buildEntry(Number(code), spec)]),
);
