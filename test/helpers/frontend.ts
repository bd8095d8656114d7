/**
 * A vhost-user front-end for tests: it does what QEMU does, over a real unix socket with real file
 * descriptors (memfds for guest memory, eventfds for kick/call/err, a socketpair for the backend
 * channel), and it plays the guest driver on the rings it sets up.
 *
 * Every payload is encoded here with DataView straight from QEMU docs/interop/vhost-user.rst, not with
 * the engine's decoders, so the tests are an independent oracle for them. The low-level `send` can
 * produce any message, including malformed ones (wrong size field, bad version bits, extra or missing
 * fds, unknown codes).
 *
 * Addresses: a region has a guest physical address (what descriptors hold), a front-end "user"
 * address (what SET_VRING_ADDR carries) and an mmap offset into its memfd. The default layout makes
 * all three differ, with gaps between regions, so a backend that mixes them up fails.
 *
 * Ownership: the Frontend owns every fd and mapping it creates and releases them all in `close()`.
 * Fds received from the backend are closed as soon as they are read.
 */
import fs from 'node:fs';

import { fullFence } from '../../lib/virtqueue/barrier';
import {
  native,
  MAP_VIEW_STRIDE,
  POLL_READABLE,
  type Mapping,
  type Watcher,
} from '../../native';
import {
  BackendRequest,
  CONFIG_HEADER_SIZE,
  HEADER_SIZE,
  MAX_FDS,
  MEMORY_REGION_SIZE,
  ProtocolFeature,
  Request,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
  VHOST_USER_VERSION_MASK,
  VRING_NOFD_MASK,
  requestName,
} from '../../lib/vhost-user/messages';
import {
  VHOST_USER_F_PROTOCOL_FEATURES,
  VIRTIO_F_RING_PACKED,
  VIRTIO_F_VERSION_1,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
  VRING_AVAIL_F_NO_INTERRUPT,
  VRING_PACKED_EVENT_FLAG_DESC,
  VRING_PACKED_EVENT_FLAG_DISABLE,
  VRING_PACKED_EVENT_FLAG_ENABLE,
  VRING_USED_F_NO_NOTIFY,
  bit,
} from '../../lib/virtio/constants';
import { PackedDriverRing, SplitDriverRing, packedRingLayout, splitRingLayout, type UsedElement } from './driver-ring';

export const DEFAULT_TIMEOUT_MS = 5000;

/** Front-end side failures, with stable codes for assertions. */
export type FrontendErrorCode =
  | 'FRONTEND_PEER_CLOSED'
  | 'FRONTEND_TIMEOUT'
  | 'FRONTEND_BAD_REPLY'
  | 'FRONTEND_NACK'
  | 'FRONTEND_SEND_FAILED'
  | 'FRONTEND_NO_MEMORY'
  | 'FRONTEND_BAD_USED';

export class FrontendError extends Error {
  constructor(
    readonly code: FrontendErrorCode,
    message: string,
  ) {
    super(message);
    this.name = 'FrontendError';
  }
}

// ---------------------------------------------------------------------------------------------
// Payload encoders (vhost-user.rst "Message Specification"). Little-endian: we only run on LE hosts.
// ---------------------------------------------------------------------------------------------

type U64 = number | bigint;
const big = (v: U64): bigint => (typeof v === 'bigint' ? v : BigInt(v));

/** `u64` payload. */
export function encodeU64(value: U64): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, big(value), true);
  return out;
}

/** Vring state description: u32 index, u32 num. */
export function encodeVringState(index: number, num: number): Uint8Array {
  const out = new Uint8Array(8);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, index >>> 0, true);
  dv.setUint32(4, num >>> 0, true);
  return out;
}

/**
 * Vring address description (struct vhost_vring_addr): u32 index, u32 flags, u64 desc_user_addr,
 * u64 used_user_addr, u64 avail_user_addr, u64 log_guest_addr. 40 bytes. Note the order: used
 * before avail.
 */
export function encodeVringAddr(a: {
  index: number;
  flags?: number;
  desc: U64;
  used: U64;
  avail: U64;
  log?: U64;
}): Uint8Array {
  const out = new Uint8Array(40);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, a.index >>> 0, true);
  dv.setUint32(4, (a.flags ?? 0) >>> 0, true);
  dv.setBigUint64(8, big(a.desc), true);
  dv.setBigUint64(16, big(a.used), true);
  dv.setBigUint64(24, big(a.avail), true);
  dv.setBigUint64(32, big(a.log ?? 0), true);
  return out;
}

/** One VhostUserMemoryRegion as it goes on the wire. */
export interface WireRegion {
  gpa: U64;
  size: U64;
  userAddr: U64;
  mmapOffset: U64;
}

function putRegion(dv: DataView, at: number, r: WireRegion): void {
  dv.setBigUint64(at, big(r.gpa), true);
  dv.setBigUint64(at + 8, big(r.size), true);
  dv.setBigUint64(at + 16, big(r.userAddr), true);
  dv.setBigUint64(at + 24, big(r.mmapOffset), true);
}

/**
 * Memory regions description: u32 nregions, u32 padding, then the regions. QEMU sends only the
 * regions in use (size = 8 + n * 32); `nregions` can be overridden to lie about the count.
 */
export function encodeMemTable(regions: readonly WireRegion[], nregions = regions.length): Uint8Array {
  const out = new Uint8Array(8 + regions.length * MEMORY_REGION_SIZE);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, nregions >>> 0, true);
  regions.forEach((r, i) => putRegion(dv, 8 + i * MEMORY_REGION_SIZE, r));
  return out;
}

/** Single memory region description (ADD_MEM_REG / REM_MEM_REG): u64 padding, then one region. */
export function encodeSingleRegion(r: WireRegion, padding: U64 = 0n): Uint8Array {
  const out = new Uint8Array(8 + MEMORY_REGION_SIZE);
  const dv = new DataView(out.buffer);
  dv.setBigUint64(0, big(padding), true);
  putRegion(dv, 8, r);
  return out;
}

/** Virtio device config space: u32 offset, u32 size, u32 flags, then `size` bytes. */
export function encodeConfig(offset: number, size: number, flags: number, data?: Uint8Array): Uint8Array {
  const body = data ?? new Uint8Array(size);
  const out = new Uint8Array(CONFIG_HEADER_SIZE + body.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, offset >>> 0, true);
  dv.setUint32(4, size >>> 0, true);
  dv.setUint32(8, flags >>> 0, true);
  out.set(body, CONFIG_HEADER_SIZE);
  return out;
}

/** A whole message: 12-byte header then the payload. `size` defaults to the payload length. */
export function encodeMessage(request: number, flags: number, payload: Uint8Array, size = payload.length): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, request >>> 0, true);
  dv.setUint32(4, flags >>> 0, true);
  dv.setUint32(8, size >>> 0, true);
  out.set(payload, HEADER_SIZE);
  return out;
}

function readU64(payload: Uint8Array): bigint {
  if (payload.length !== 8) throw new FrontendError('FRONTEND_BAD_REPLY', `expected a u64 payload, got ${payload.length} bytes`);
  return new DataView(payload.buffer, payload.byteOffset, 8).getBigUint64(0, true);
}

// ---------------------------------------------------------------------------------------------
// A message channel over a nonblocking unix stream socket (the main socket and the backend channel).
// ---------------------------------------------------------------------------------------------

/** A received message. `fds` are already closed by the channel unless `keepFds` was set. */
export interface Message {
  request: number;
  flags: number;
  /** The header's size field. */
  size: number;
  payload: Uint8Array;
  fds: number[];
}

export interface SendOptions {
  /** Descriptors to attach (SCM_RIGHTS). */
  fds?: number[];
  /** Full flags word; defaults to version 1 plus NEED_REPLY when `needReply`. */
  flags?: number;
  needReply?: boolean;
  /** Lie in the header's size field. */
  size?: number;
}

/** One receive buffer for every channel: reads are synchronous and parse() copies what it keeps. */
const rxBuf = new Uint8Array(65536);

class Channel {
  private watcher: Watcher | null;
  private acc = new Uint8Array(0);
  private pendingFds: number[] = [];
  private readonly inbox: Message[] = [];
  private wake: (() => void) | null = null;
  private peerClosed = false;
  private fdClosed = false;
  /** Hand received fds over with the message instead of closing them. */
  keepFds = false;
  /** Resolves when the peer closed the connection (EOF or reset). */
  readonly closed: Promise<void>;
  private resolveClosed!: () => void;

  constructor(
    readonly fd: number,
    private readonly onMessage?: (msg: Message) => boolean,
  ) {
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
    this.watcher = native.watch(fd, POLL_READABLE, () => this.onReadable());
  }

  get isPeerClosed(): boolean {
    return this.peerClosed;
  }

  send(bytes: Uint8Array, fds: number[]): void {
    if (this.fdClosed) throw new FrontendError('FRONTEND_SEND_FAILED', 'channel is closed');
    let off = 0;
    let first = true;
    while (off < bytes.length) {
      let n: number;
      try {
        n = native.sendMsg(this.fd, bytes, off, bytes.length - off, first ? fds : []);
      } catch (err) {
        // EPIPE / ECONNRESET: the backend hung up.
        this.markPeerClosed();
        throw new FrontendError('FRONTEND_PEER_CLOSED', `send failed: ${(err as Error).message}`);
      }
      if (n < 0) throw new FrontendError('FRONTEND_SEND_FAILED', 'socket buffer full (EAGAIN)');
      off += n;
      first = false;
    }
  }

  /** The next message, waiting up to `timeoutMs`. Throws FRONTEND_PEER_CLOSED once drained after EOF. */
  async next(timeoutMs: number): Promise<Message> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const msg = this.inbox.shift();
      if (msg !== undefined) return msg;
      if (this.peerClosed) throw new FrontendError('FRONTEND_PEER_CLOSED', 'the backend closed the connection');
      const left = deadline - Date.now();
      if (left <= 0) throw new FrontendError('FRONTEND_TIMEOUT', `no message within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(() => {
          this.wake = null;
          resolve();
        }, left);
        this.wake = () => {
          clearTimeout(timer);
          this.wake = null;
          resolve();
        };
      });
    }
  }

  /** Wait until the peer closes; true if it did within `timeoutMs`. */
  async waitPeerClosed(timeoutMs: number): Promise<boolean> {
    if (this.peerClosed) return true;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), timeoutMs)));
    const result = await Promise.race([this.closed.then(() => true), timeout]);
    clearTimeout(timer);
    return result;
  }

  close(): void {
    this.stopWatch();
    for (const fd of this.pendingFds) native.close(fd);
    this.pendingFds = [];
    if (!this.fdClosed) {
      this.fdClosed = true;
      native.close(this.fd);
    }
    this.markPeerClosed();
  }

  private stopWatch(): void {
    this.watcher?.stop();
    this.watcher = null;
  }

  private markPeerClosed(): void {
    if (this.peerClosed) return;
    this.peerClosed = true;
    this.stopWatch();
    this.resolveClosed();
    this.wake?.();
  }

  private onReadable(): void {
    while (!this.peerClosed) {
      let r;
      try {
        r = native.recvMsg(this.fd, rxBuf, 0, rxBuf.length, MAX_FDS);
      } catch {
        this.markPeerClosed();
        return;
      }
      if (r.bytes < 0) return;
      this.pendingFds.push(...r.fds);
      if (r.bytes === 0) {
        this.markPeerClosed();
        return;
      }
      const acc = new Uint8Array(this.acc.length + r.bytes);
      acc.set(this.acc);
      acc.set(rxBuf.subarray(0, r.bytes), this.acc.length);
      this.acc = acc;
      this.parse();
    }
  }

  private parse(): void {
    while (this.acc.length >= HEADER_SIZE) {
      const dv = new DataView(this.acc.buffer, this.acc.byteOffset, HEADER_SIZE);
      const size = dv.getUint32(8, true);
      if (this.acc.length < HEADER_SIZE + size) return;
      const msg: Message = {
        request: dv.getUint32(0, true),
        flags: dv.getUint32(4, true),
        size,
        payload: this.acc.slice(HEADER_SIZE, HEADER_SIZE + size),
        fds: this.pendingFds,
      };
      this.pendingFds = [];
      this.acc = this.acc.slice(HEADER_SIZE + size);
      // A test front-end keeps no fd from the backend but the one getInflightFd waits for.
      if (!this.keepFds) {
        for (const fd of msg.fds) native.close(fd);
        msg.fds = [];
      }
      if (this.onMessage?.(msg) === true) continue;
      this.inbox.push(msg);
      this.wake?.();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Guest memory, as the front-end (QEMU) holds it: memfds mapped here, addressed by gpa.
// ---------------------------------------------------------------------------------------------

/** How to lay out one region. `userAddr` defaults to a fake front-end address unlike `gpa`. */
export interface RegionLayout {
  gpa: number;
  size: number;
  userAddr?: number;
  mmapOffset?: number;
  /**
   * Back the region with a new file at this path (on a hugetlbfs mount, say: `mmapOffset + size`
   * must then be whole huge pages) instead of a memfd. It is unlinked at once; the fd keeps it.
   */
  file?: string;
}

/**
 * Three regions with gaps between them, user addresses unrelated to guest addresses, and mmap
 * offsets of 0, one page and 2 MiB + one page (the backend must align the mmap itself).
 */
export const DEFAULT_LAYOUT: readonly RegionLayout[] = [
  { gpa: 0x0, size: 1 << 20, userAddr: 0x7f10_0000_0000, mmapOffset: 0 },
  { gpa: 0x80_0000, size: 1 << 20, userAddr: 0x7f20_0040_0000, mmapOffset: 0x1000 },
  { gpa: 0x1_0000_0000, size: 2 << 20, userAddr: 0x7f00_0000_0000, mmapOffset: 0x20_1000 },
];

/** Two regions adjacent in guest physical space (different memfds), so one buffer can cross them. */
export const ADJACENT_LAYOUT: readonly RegionLayout[] = [
  { gpa: 0x10_0000, size: 1 << 20, userAddr: 0x7f30_0000_0000, mmapOffset: 0x3000 },
  { gpa: 0x20_0000, size: 1 << 20, userAddr: 0x7f40_0000_0000, mmapOffset: 0 },
];

/** A file of `size` bytes created at `path` and unlinked, open read-write. */
function createUnlinkedFile(path: string, size: number): number {
  const fd = fs.openSync(path, 'wx+', 0o600);
  try {
    fs.ftruncateSync(fd, size);
    return fd;
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  } finally {
    fs.unlinkSync(path);
  }
}

export class FrontendRegion implements WireRegion {
  readonly userAddr: number;
  readonly mmapOffset: number;
  /** Buffers are bump-allocated from the bottom (wrapping); rings from the top, never reused. */
  private bottom = 0;
  private top: number;

  constructor(
    readonly gpa: number,
    readonly size: number,
    userAddr: number,
    mmapOffset: number,
    readonly fd: number,
    private readonly mapping: Mapping,
  ) {
    this.userAddr = userAddr;
    this.mmapOffset = mmapOffset;
    this.top = size;
  }

  static create(layout: RegionLayout, name: string): FrontendRegion {
    const mmapOffset = layout.mmapOffset ?? 0;
    const userAddr = layout.userAddr ?? 0x7e00_0000_0000 + layout.gpa;
    const fd = layout.file === undefined ? native.memfdCreate(name, mmapOffset + layout.size) : createUnlinkedFile(layout.file, mmapOffset + layout.size);
    try {
      const mapping = native.mmap(fd, mmapOffset + layout.size, 0, true);
      return new FrontendRegion(layout.gpa, layout.size, userAddr, mmapOffset, fd, mapping);
    } catch (err) {
      native.close(fd);
      throw err;
    }
  }

  get end(): number {
    return this.gpa + this.size;
  }

  contains(gpa: number): boolean {
    return gpa >= this.gpa && gpa < this.end;
  }

  /** Bytes `[gpa, gpa+len)`, which must lie inside this region and one mapping view. */
  view(gpa: number, len: number): Uint8Array {
    const at = this.mmapOffset + (gpa - this.gpa);
    const i = Math.floor(at / MAP_VIEW_STRIDE);
    const v = this.mapping.views[i];
    const start = at - i * MAP_VIEW_STRIDE;
    if (v === undefined || gpa < this.gpa || gpa + len > this.end || start + len > v.length) {
      throw new RangeError(`0x${gpa.toString(16)}+${len} is not inside one view of region 0x${this.gpa.toString(16)}`);
    }
    return v.subarray(start, start + len);
  }

  allocRing(len: number, align: number): number {
    const at = Math.floor((this.top - len) / align) * align;
    if (at < this.bottom) throw new FrontendError('FRONTEND_NO_MEMORY', 'region full (rings)');
    this.top = at;
    return this.gpa + at;
  }

  allocBuffer(len: number, align: number): number {
    let at = Math.ceil(this.bottom / align) * align;
    if (at + len > this.top) at = 0;
    if (at + len > this.top) throw new FrontendError('FRONTEND_NO_MEMORY', `region too small for ${len} bytes`);
    this.bottom = at + len;
    return this.gpa + at;
  }

  close(): void {
    native.munmap(this.mapping.id);
    native.close(this.fd);
  }
}

/** The guest physical memory map (driver's view). */
export class FrontendMemory {
  readonly regions: FrontendRegion[] = [];
  private serial = 0;

  add(layout: RegionLayout): FrontendRegion {
    const region = FrontendRegion.create(layout, `vhostd-test-guest-${this.serial++}`);
    this.regions.push(region);
    return region;
  }

  /** Drop a region from the map and release it. */
  remove(region: FrontendRegion): void {
    const i = this.regions.indexOf(region);
    if (i >= 0) this.regions.splice(i, 1);
    region.close();
  }

  region(gpa: number): FrontendRegion {
    const r = this.regions.find((x) => x.contains(gpa));
    if (r === undefined) throw new RangeError(`guest address 0x${gpa.toString(16)} is not mapped`);
    return r;
  }

  /** Front-end virtual address of `gpa` (what SET_VRING_ADDR carries). */
  toUser(gpa: number): number {
    const r = this.region(gpa);
    return r.userAddr + (gpa - r.gpa);
  }

  view(gpa: number, len: number): Uint8Array {
    return this.region(gpa).view(gpa, len);
  }

  dataView(gpa: number, len: number): DataView {
    const v = this.view(gpa, len);
    return new DataView(v.buffer, v.byteOffset, v.byteLength);
  }

  /** Copy `data` to `gpa`, crossing into the next region when it is adjacent. */
  write(gpa: number, data: Uint8Array): void {
    let done = 0;
    while (done < data.length) {
      const r = this.region(gpa + done);
      const n = Math.min(data.length - done, r.end - (gpa + done));
      r.view(gpa + done, n).set(data.subarray(done, done + n));
      done += n;
    }
  }

  read(gpa: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    let done = 0;
    while (done < len) {
      const r = this.region(gpa + done);
      const n = Math.min(len - done, r.end - (gpa + done));
      out.set(r.view(gpa + done, n), done);
      done += n;
    }
    return out;
  }

  close(): void {
    for (const r of this.regions) r.close();
    this.regions.length = 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Driver side of the rings.
// ---------------------------------------------------------------------------------------------

/** One buffer of a chain, already placed in guest memory. */
export interface PlacedSegment {
  gpa: number;
  len: number;
  writable: boolean;
}

/** What the Frontend needs from a ring driver (split or packed). */
export interface RingDriver {
  readonly size: number;
  /** Descriptors still free. */
  readonly freeDescriptors: number;
  /** Where the three areas are (gpa), in SET_VRING_ADDR order: desc, avail/driver, used/device. */
  readonly areas: { desc: number; avail: number; used: number };
  /** Initial SET_VRING_BASE value. */
  readonly initialBase: number;
  /** Write a chain (direct or through an indirect table at `indirectGpa`) without publishing it. */
  add(segments: readonly PlacedSegment[], indirectGpa?: number): number;
  /** Make everything added visible to the device; returns whether the device wants a kick. */
  publish(): boolean;
  /** Whether the device asks for a kick for the next chain published (its suppression state now). */
  kickWanted(): boolean;
  /** Used elements the device returned since the last call. */
  takeUsed(): UsedElement[];
  /** Ask for (or stop asking for) used-buffer notifications. */
  setInterrupts(on: boolean): void;
}

const u16 = (v: number): number => v & 0xffff;
/** virtio 1.2 §2.7.10.1 vring_need_event. */
const needEvent = (event: number, newIdx: number, old: number): boolean => u16(newIdx - event - 1) < u16(newIdx - old);

/**
 * Split ring (virtio 1.2 §2.7) on top of driver-ring.ts's {@link SplitDriverRing}, adding what a
 * front-end needs around it: the rings placed in one region, the kick decision (EVENT_IDX
 * avail_event or used.flags NO_NOTIFY) and used_event kept at the last used index seen.
 */
export class SplitQueueDriver implements RingDriver {
  readonly ring: SplitDriverRing;
  readonly areas: { desc: number; avail: number; used: number };
  readonly initialBase = 0;
  private published = 0;
  private interrupts = true;

  constructor(
    mem: FrontendMemory,
    readonly size: number,
    private readonly eventIdx: boolean,
    region: FrontendRegion,
  ) {
    const layout = splitRingLayout(size, region.allocRing(splitRingLayout(size, 0).end, 16));
    this.ring = new SplitDriverRing(mem, { size, desc: layout.desc, avail: layout.avail, used: layout.used });
    this.areas = { desc: layout.desc, avail: layout.avail, used: layout.used };
  }

  get freeDescriptors(): number {
    return this.ring.freeDescriptors;
  }

  add(segments: readonly PlacedSegment[], indirectGpa?: number): number {
    return this.ring.addChain(
      segments.map((s) => ({ addr: s.gpa, len: s.len, writable: s.writable })),
      { indirect: indirectGpa },
    );
  }

  /** Put a raw head index in the next available ring entry (hostile tests: a head ≥ size). */
  pushHead(head: number): void {
    this.ring.writeAvailRing(this.ring.availIdx, head);
    this.ring.availIdx = u16(this.ring.availIdx + 1);
  }

  publish(): boolean {
    const old = this.published;
    this.ring.publish();
    // Store avail.idx, then load avail_event: a store→load order, so a full barrier (virtio 1.2
    // §2.7.13.4; Linux virtqueue_kick_prepare's virtio_mb). It matters once the device runs on
    // another thread (queue workers); on one event loop the two sides never overlap.
    fullFence();
    this.published = this.ring.availIdx;
    if (this.eventIdx) return needEvent(this.ring.availEvent(), this.published, old);
    return (this.ring.usedFlags() & VRING_USED_F_NO_NOTIFY) === 0;
  }

  kickWanted(): boolean {
    if (this.eventIdx) return needEvent(this.ring.availEvent(), u16(this.published + 1), this.published);
    return (this.ring.usedFlags() & VRING_USED_F_NO_NOTIFY) === 0;
  }

  takeUsed(): UsedElement[] {
    const seen = this.ring.lastUsed;
    const idx = this.ring.usedIdx();
    // virtio 1.2 §2.7.14: the device can never have used more than the ring holds.
    if (u16(idx - seen) > this.size) throw new FrontendError('FRONTEND_BAD_USED', `used.idx jumped from ${seen} to ${idx}`);
    const out = this.ring.takeUsed().map(({ id, len }) => ({ id, len }));
    this.refreshInterrupts();
    return out;
  }

  setInterrupts(on: boolean): void {
    this.interrupts = on;
    this.refreshInterrupts();
  }

  private refreshInterrupts(): void {
    if (this.eventIdx) {
      // Ask for a notification as soon as the device uses anything past what we have seen.
      this.ring.setUsedEvent(this.interrupts ? this.ring.lastUsed : u16(this.ring.lastUsed - 1));
    } else {
      this.ring.setAvailFlags(this.interrupts ? 0 : VRING_AVAIL_F_NO_INTERRUPT);
    }
  }
}

/**
 * Packed ring (virtio 1.2 §2.8) on top of driver-ring.ts's {@link PackedDriverRing}, adding the
 * rings' placement, QEMU's SET_VRING_BASE layout and the kick decision from the device event
 * suppression area (§2.8.10, as Linux virtqueue_kick_prepare_packed computes it).
 */
export class PackedQueueDriver implements RingDriver {
  readonly ring: PackedDriverRing;
  readonly areas: { desc: number; avail: number; used: number };
  /** Descriptors added since the last publish. */
  private added = 0;

  constructor(
    mem: FrontendMemory,
    readonly size: number,
    region: FrontendRegion,
  ) {
    const layout = packedRingLayout(size, region.allocRing(packedRingLayout(size, 0).end, 16));
    this.ring = new PackedDriverRing(mem, { size, desc: layout.desc, driverEvent: layout.driverEvent, deviceEvent: layout.deviceEvent });
    this.areas = { desc: layout.desc, avail: layout.driverEvent, used: layout.deviceEvent };
  }

  /** QEMU layout: avail index | avail wrap << 15 | (used index | used wrap << 15) << 16. */
  get initialBase(): number {
    const r = this.ring;
    return (r.nextAvail | (r.availWrap << 15)) + (r.nextUsed | (r.usedWrap << 15)) * 0x10000;
  }

  get freeDescriptors(): number {
    return this.ring.freeSlots;
  }

  add(segments: readonly PlacedSegment[], indirectGpa?: number): number {
    const id = this.ring.addChain(
      segments.map((s) => ({ addr: s.gpa, len: s.len, writable: s.writable })),
      { indirect: indirectGpa },
    );
    this.added += indirectGpa === undefined ? segments.length : 1;
    return id;
  }

  publish(): boolean {
    this.ring.publish();
    fullFence(); // store the descriptors' flags, then load the device event area (see the split ring)
    const added = this.added;
    this.added = 0;
    const ev = this.ring.deviceEvent();
    const flags = ev.flags & 0x3;
    if (flags === VRING_PACKED_EVENT_FLAG_DISABLE) return false;
    if (flags !== VRING_PACKED_EVENT_FLAG_DESC) return true;
    let event = ev.offset;
    if (ev.wrap !== this.ring.availWrap) event -= this.size;
    const newIdx = this.ring.nextAvail;
    return needEvent(u16(event), newIdx, u16(newIdx - added));
  }

  kickWanted(): boolean {
    const ev = this.ring.deviceEvent();
    const flags = ev.flags & 0x3;
    if (flags !== VRING_PACKED_EVENT_FLAG_DESC) return flags !== VRING_PACKED_EVENT_FLAG_DISABLE;
    return ev.offset === this.ring.nextAvail && ev.wrap === this.ring.availWrap;
  }

  takeUsed(): UsedElement[] {
    return this.ring.takeUsed().map(({ id, len }) => ({ id, len }));
  }

  setInterrupts(on: boolean): void {
    this.ring.setDriverEvent(on ? VRING_PACKED_EVENT_FLAG_ENABLE : VRING_PACKED_EVENT_FLAG_DISABLE);
  }
}

// ---------------------------------------------------------------------------------------------
// The front-end.
// ---------------------------------------------------------------------------------------------

export interface NegotiateOptions {
  /** Virtio features the driver accepts (masked with what the backend offers). Default: VERSION_1 + ring features below. */
  features?: bigint;
  packed?: boolean;
  eventIdx?: boolean;
  indirect?: boolean;
  /** Protocol features to accept (masked with what the backend offers). Default: everything offered. */
  protocolFeatures?: bigint;
  /** Skip SET_OWNER (hostile tests). */
  skipOwner?: boolean;
  /** Behave like a front-end that predates protocol features: no GET/SET_PROTOCOL_FEATURES, no bit 30. */
  legacy?: boolean;
}

export interface Negotiated {
  offeredFeatures: bigint;
  offeredProtocolFeatures: bigint;
  features: bigint;
  protocolFeatures: bigint;
}

export interface QueueOptions {
  packed?: boolean;
  eventIdx?: boolean;
  indirect?: boolean;
  /** Region (index into memory.regions) holding the rings; default 0. */
  ringRegion?: number;
  /** SET_VRING_BASE value; default the ring's initial base. */
  base?: number;
  /** Send SET_VRING_ENABLE 1 (default true when protocol features were negotiated). */
  enable?: boolean;
  /** Also send SET_VRING_ERR with an eventfd (default true). */
  errFd?: boolean;
  /** Kick on every publish, ignoring the device's suppression (default false). */
  alwaysKick?: boolean;
}

/** A buffer of a chain to submit. Readable segments carry `data`; writable ones a `length`. */
export interface SegmentSpec {
  data?: Uint8Array;
  length?: number;
  /** Place it at this guest address (may cross into an adjacent region). */
  gpa?: number;
  /** Or allocate it in this region (index into memory.regions); default 0. */
  region?: number;
}

export interface ChainSpec {
  readable?: readonly SegmentSpec[];
  writable?: readonly SegmentSpec[];
  /** Put the chain in an indirect table (allocated in region `indirectRegion`, default 0). */
  indirect?: boolean;
  indirectRegion?: number;
}

export interface Completion {
  id: number;
  /** Bytes the device says it wrote. */
  len: number;
  /** The first `min(len, writable length)` bytes of the chain's writable part. */
  written: Uint8Array;
}

export interface QueueState {
  readonly index: number;
  readonly driver: RingDriver;
  readonly kickFd: number;
  readonly callFd: number;
  readonly errFd: number | null;
  calls: number;
  errors: number;
  /** Kicks written (every `kick`, the ones `submit` decided on included). */
  kicks: number;
  alwaysKick: boolean;
}

/** An inflight area as GET_INFLIGHT_FD returned it (the fd is the front-end's to keep and close). */
export interface InflightAreaFd {
  fd: number;
  mmapSize: bigint;
  mmapOffset: bigint;
  numQueues: number;
  queueSize: number;
}

interface QueueInternal extends QueueState {
  /** The last SET_VRING_BASE sent. */
  lastBase: number;
  watchers: Watcher[];
  pendingCall: boolean;
  pendingErr: boolean;
  wakeCall: (() => void) | null;
  wakeErr: (() => void) | null;
  /** Writable segments of each in-flight chain, by id. */
  inflight: Map<number, PlacedSegment[]>;
}

/** A backend-channel request the front-end received (CONFIG_CHANGE_MSG...). */
export interface BackendMessage {
  request: number;
  flags: number;
  payload: Uint8Array;
}

export class Frontend {
  readonly memory = new FrontendMemory();
  readonly queues = new Map<number, QueueInternal>();
  readonly backendMessages: BackendMessage[] = [];
  negotiated: Negotiated | null = null;
  private main: Channel;
  private backend: Channel | null = null;
  private backendWake: (() => void) | null = null;
  private closedByUs = false;
  private ringDefaults = { packed: false, eventIdx: false, indirect: false };

  constructor(fd: number) {
    this.main = new Channel(fd);
  }

  /** Connect to a backend listening on `path`. */
  static connect(path: string): Frontend {
    return new Frontend(native.connectUnix(path));
  }

  get replyAck(): boolean {
    return ((this.negotiated?.protocolFeatures ?? 0n) & bit(ProtocolFeature.REPLY_ACK)) !== 0n;
  }

  hasProtocolFeature(f: number): boolean {
    return ((this.negotiated?.protocolFeatures ?? 0n) & bit(f)) !== 0n;
  }

  /** True once the backend closed the main socket. */
  get backendClosed(): boolean {
    return this.main.isPeerClosed && !this.closedByUs;
  }

  // ---- raw messages --------------------------------------------------------------------------

  /** Send any message. Throws FRONTEND_PEER_CLOSED when the backend has hung up. */
  send(request: number, payload: Uint8Array = new Uint8Array(0), opts: SendOptions = {}): void {
    const flags = opts.flags ?? VHOST_USER_VERSION | (opts.needReply === true ? VHOST_USER_NEED_REPLY_MASK : 0);
    this.main.send(encodeMessage(request, flags, payload, opts.size ?? payload.length), opts.fds ?? []);
  }

  /** Send raw bytes (a partial header, garbage...). */
  sendRaw(bytes: Uint8Array, fds: number[] = []): void {
    this.main.send(bytes, fds);
  }

  /** The next message from the backend. */
  nextMessage(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Message> {
    return this.main.next(timeoutMs);
  }

  /** Wait for the reply to `request` and check its header (version 1, REPLY set, same code). */
  async reply(request: number, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Message> {
    const msg = await this.main.next(timeoutMs);
    if (msg.request !== request) {
      throw new FrontendError('FRONTEND_BAD_REPLY', `expected a reply to ${requestName(request)}, got ${requestName(msg.request)}`);
    }
    if ((msg.flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION || (msg.flags & VHOST_USER_REPLY_MASK) === 0) {
      throw new FrontendError('FRONTEND_BAD_REPLY', `reply to ${requestName(request)} has flags 0x${msg.flags.toString(16)}`);
    }
    return msg;
  }

  /** Send a request that has a reply body and return the reply payload. */
  async call(request: number, payload?: Uint8Array, opts: SendOptions = {}): Promise<Uint8Array> {
    this.send(request, payload, opts);
    return (await this.reply(request)).payload;
  }

  /**
   * Send a request without a reply body. With REPLY_ACK negotiated it sets NEED_REPLY and checks the
   * ack is 0 (throws FRONTEND_NACK otherwise), as QEMU does; without it, it just sends.
   */
  async request(request: number, payload?: Uint8Array, fds?: number[]): Promise<void> {
    if (!this.replyAck) {
      this.send(request, payload, { fds });
      return;
    }
    this.send(request, payload, { fds, needReply: true });
    const ack = readU64(await this.reply(request).then((m) => m.payload));
    if (ack !== 0n) throw new FrontendError('FRONTEND_NACK', `${requestName(request)} was refused (${ack})`);
  }

  /** A round trip that proves every earlier message was processed (messages are handled in order). */
  async sync(): Promise<void> {
    await this.call(Request.GET_FEATURES);
  }

  /** Wait until the backend closes the connection; true if it did within `timeoutMs`. */
  waitClosed(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<boolean> {
    return this.main.waitPeerClosed(timeoutMs);
  }

  // ---- negotiation ---------------------------------------------------------------------------

  async getFeatures(): Promise<bigint> {
    return readU64(await this.call(Request.GET_FEATURES));
  }

  async getProtocolFeatures(): Promise<bigint> {
    return readU64(await this.call(Request.GET_PROTOCOL_FEATURES));
  }

  async getQueueNum(): Promise<number> {
    return Number(readU64(await this.call(Request.GET_QUEUE_NUM)));
  }

  async getMaxMemSlots(): Promise<number> {
    return Number(readU64(await this.call(Request.GET_MAX_MEM_SLOTS)));
  }

  /** GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, SET_OWNER, SET_FEATURES. */
  async negotiate(opts: NegotiateOptions = {}): Promise<Negotiated> {
    const offered = await this.getFeatures();
    let offeredProtocol = 0n;
    let protocol = 0n;
    const useProtocol = opts.legacy !== true && (offered & bit(VHOST_USER_F_PROTOCOL_FEATURES)) !== 0n;
    if (useProtocol) {
      offeredProtocol = await this.getProtocolFeatures();
      protocol = offeredProtocol & (opts.protocolFeatures ?? offeredProtocol);
      // SET_PROTOCOL_FEATURES itself is never acked: REPLY_ACK is not in force until it is processed.
      this.send(Request.SET_PROTOCOL_FEATURES, encodeU64(protocol));
    }
    this.negotiated = { offeredFeatures: offered, offeredProtocolFeatures: offeredProtocol, features: 0n, protocolFeatures: protocol };
    if (opts.skipOwner !== true) await this.request(Request.SET_OWNER);
    const ring =
      (opts.packed === true ? bit(VIRTIO_F_RING_PACKED) : 0n) |
      (opts.eventIdx === true ? bit(VIRTIO_RING_F_EVENT_IDX) : 0n) |
      (opts.indirect === true ? bit(VIRTIO_RING_F_INDIRECT_DESC) : 0n);
    const wanted = opts.features ?? bit(VIRTIO_F_VERSION_1) | ring;
    let features = offered & wanted;
    // QEMU acknowledges VHOST_USER_F_PROTOCOL_FEATURES in SET_FEATURES whenever it used them.
    if (useProtocol) features |= bit(VHOST_USER_F_PROTOCOL_FEATURES);
    await this.request(Request.SET_FEATURES, encodeU64(features));
    this.negotiated.features = features;
    this.ringDefaults = {
      packed: (features & bit(VIRTIO_F_RING_PACKED)) !== 0n,
      eventIdx: (features & bit(VIRTIO_RING_F_EVENT_IDX)) !== 0n,
      indirect: (features & bit(VIRTIO_RING_F_INDIRECT_DESC)) !== 0n,
    };
    return this.negotiated;
  }

  // ---- memory --------------------------------------------------------------------------------

  /** Create the regions (memfds, mapped here) and send SET_MEM_TABLE with one fd per region. */
  async setMemTable(layout: readonly RegionLayout[] = DEFAULT_LAYOUT): Promise<void> {
    for (const r of layout) this.memory.add(r);
    await this.sendMemTable();
  }

  /** (Re)send SET_MEM_TABLE for the current regions. */
  async sendMemTable(): Promise<void> {
    const regions = this.memory.regions;
    await this.request(Request.SET_MEM_TABLE, encodeMemTable(regions), regions.map((r) => r.fd));
  }

  /** Create a region and send ADD_MEM_REG for it. */
  async addMemReg(layout: RegionLayout): Promise<FrontendRegion> {
    const region = this.memory.add(layout);
    await this.request(Request.ADD_MEM_REG, encodeSingleRegion(region), [region.fd]);
    return region;
  }

  /** Send REM_MEM_REG for the region at `gpa` and release it here. */
  async remMemReg(gpa: number): Promise<void> {
    const region = this.memory.region(gpa);
    await this.request(Request.REM_MEM_REG, encodeSingleRegion(region));
    this.memory.remove(region);
  }

  // ---- queues --------------------------------------------------------------------------------

  /**
   * Allocate rings in guest memory and send SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR,
   * SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR and SET_VRING_ENABLE (QEMU's order).
   */
  async setupQueue(index: number, size: number, opts: QueueOptions = {}): Promise<QueueState> {
    const packed = opts.packed ?? this.ringDefaults.packed;
    const eventIdx = opts.eventIdx ?? this.ringDefaults.eventIdx;
    const region = this.memory.regions[opts.ringRegion ?? 0];
    if (region === undefined) throw new RangeError('no such region for the rings');
    const driver: RingDriver = packed ? new PackedQueueDriver(this.memory, size, region) : new SplitQueueDriver(this.memory, size, eventIdx, region);
    this.releaseQueue(index);
    const kickFd = native.eventfd(0);
    const callFd = native.eventfd(0);
    const errFd = opts.errFd === false ? null : native.eventfd(0);
    const q: QueueInternal = {
      lastBase: 0,
      index,
      driver,
      kickFd,
      callFd,
      errFd,
      calls: 0,
      errors: 0,
      kicks: 0,
      alwaysKick: opts.alwaysKick ?? false,
      watchers: [],
      pendingCall: false,
      pendingErr: false,
      wakeCall: null,
      wakeErr: null,
      inflight: new Map(),
    };
    this.queues.set(index, q);
    q.watchers.push(
      native.watch(callFd, POLL_READABLE, () => {
        if (native.eventfdRead(callFd) === 0) return;
        q.calls++;
        q.pendingCall = true;
        q.wakeCall?.();
      }),
    );
    if (errFd !== null) {
      q.watchers.push(
        native.watch(errFd, POLL_READABLE, () => {
          if (native.eventfdRead(errFd) === 0) return;
          q.errors++;
          q.pendingErr = true;
          q.wakeErr?.();
        }),
      );
    }
    driver.setInterrupts(true);
    await this.configureQueue(q, opts.base ?? driver.initialBase, opts.enable);
    return q;
  }

  /**
   * Send the ring's configuration again with `base` (after GET_VRING_BASE stopped it), reusing its
   * rings and eventfds: what QEMU does when it restarts a device.
   */
  async restartQueue(index: number, base: number, enable?: boolean): Promise<void> {
    await this.configureQueue(this.queue(index), base, enable);
  }

  private async configureQueue(q: QueueInternal, base: number, enable: boolean | undefined): Promise<void> {
    const { index, driver } = q;
    const areas = driver.areas;
    q.lastBase = base;
    await this.request(Request.SET_VRING_NUM, encodeVringState(index, driver.size));
    await this.request(Request.SET_VRING_BASE, encodeVringState(index, base));
    await this.request(
      Request.SET_VRING_ADDR,
      encodeVringAddr({
        index,
        desc: this.memory.toUser(areas.desc),
        used: this.memory.toUser(areas.used),
        avail: this.memory.toUser(areas.avail),
      }),
    );
    await this.request(Request.SET_VRING_KICK, encodeU64(index), [q.kickFd]);
    await this.request(Request.SET_VRING_CALL, encodeU64(index), [q.callFd]);
    if (q.errFd !== null) await this.request(Request.SET_VRING_ERR, encodeU64(index), [q.errFd]);
    const protocolNegotiated = ((this.negotiated?.features ?? 0n) & bit(VHOST_USER_F_PROTOCOL_FEATURES)) !== 0n;
    if (enable ?? protocolNegotiated) await this.setVringEnable(index, true);
    if (!this.replyAck) await this.sync();
  }

  async setVringEnable(index: number, on: boolean): Promise<void> {
    await this.request(Request.SET_VRING_ENABLE, encodeVringState(index, on ? 1 : 0));
  }

  /** GET_VRING_BASE: stops the ring and returns where it stopped. */
  async getVringBase(index: number): Promise<number> {
    const reply = await this.call(Request.GET_VRING_BASE, encodeVringState(index, 0));
    if (reply.length !== 8) throw new FrontendError('FRONTEND_BAD_REPLY', `GET_VRING_BASE reply of ${reply.length} bytes`);
    const dv = new DataView(reply.buffer, reply.byteOffset, 8);
    if (dv.getUint32(0, true) !== index) throw new FrontendError('FRONTEND_BAD_REPLY', 'GET_VRING_BASE reply for another ring');
    return dv.getUint32(4, true);
  }

  private queue(index: number): QueueInternal {
    const q = this.queues.get(index);
    if (q === undefined) throw new RangeError(`queue ${index} is not set up`);
    return q;
  }

  /** Write the kick eventfd. */
  kick(index: number): void {
    const q = this.queue(index);
    native.eventfdWrite(q.kickFd, 1);
    q.kicks++;
  }

  /** Wait for the call eventfd (consumes calls that already arrived). */
  waitCall(index: number, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    const q = this.queue(index);
    return this.waitSignal(
      () => q.pendingCall,
      () => (q.pendingCall = false),
      (w) => (q.wakeCall = w),
      timeoutMs,
      `no call on queue ${index}`,
    );
  }

  /** Wait for the err eventfd (SET_VRING_ERR). */
  waitErr(index: number, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    const q = this.queue(index);
    return this.waitSignal(
      () => q.pendingErr,
      () => (q.pendingErr = false),
      (w) => (q.wakeErr = w),
      timeoutMs,
      `no error signal on queue ${index}`,
    );
  }

  private waitSignal(
    pending: () => boolean,
    consume: () => void,
    setWake: (w: (() => void) | null) => void,
    timeoutMs: number,
    what: string,
  ): Promise<void> {
    if (pending()) {
      consume();
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        setWake(null);
        reject(new FrontendError('FRONTEND_TIMEOUT', `${what} within ${timeoutMs} ms`));
      }, timeoutMs);
      setWake(() => {
        clearTimeout(timer);
        setWake(null);
        consume();
        resolve();
      });
    });
  }

  /** Place a chain's buffers in guest memory (readable data copied in, writable zeroed). */
  placeChain(spec: ChainSpec): PlacedSegment[] {
    const place = (s: SegmentSpec, writable: boolean): PlacedSegment => {
      const len = writable ? (s.length ?? 0) : (s.data?.length ?? s.length ?? 0);
      let gpa = s.gpa;
      if (gpa === undefined) {
        const r = this.memory.regions[s.region ?? 0];
        if (r === undefined) throw new RangeError(`no region ${s.region}`);
        gpa = r.allocBuffer(Math.max(len, 1), 8);
      }
      if (writable) this.memory.write(gpa, new Uint8Array(len));
      else if (s.data !== undefined) this.memory.write(gpa, s.data);
      return { gpa, len, writable };
    };
    return [...(spec.readable ?? []).map((s) => place(s, false)), ...(spec.writable ?? []).map((s) => place(s, true))];
  }

  /**
   * Add chains to queue `index`, publish them with one index update and kick if the device asked
   * for it (or always with `alwaysKick`; never with `kick: false`, to see what the device does without
   * one). Returns the chain ids.
   */
  submit(index: number, chains: ChainSpec | readonly ChainSpec[], opts: { kick?: boolean } = {}): number[] {
    const q = this.queue(index);
    const list: readonly ChainSpec[] = Array.isArray(chains) ? chains : [chains as ChainSpec];
    const ids = list.map((spec) => {
      const segments = this.placeChain(spec);
      let table: number | undefined;
      if (spec.indirect === true) {
        const r = this.memory.regions[spec.indirectRegion ?? 0];
        if (r === undefined) throw new RangeError('no region for the indirect table');
        table = r.allocBuffer(16 * segments.length, 16);
      }
      const id = q.driver.add(segments, table);
      q.inflight.set(
        id,
        segments.filter((s) => s.writable),
      );
      return id;
    });
    const wantsKick = q.driver.publish();
    if (opts.kick !== false && (wantsKick || q.alwaysKick)) this.kick(index);
    return ids;
  }

  /** Used elements so far, with their written bytes read back. */
  takeCompletions(index: number): Completion[] {
    const q = this.queue(index);
    return q.driver.takeUsed().map(({ id, len }, i, all) => {
      const segs = q.inflight.get(id);
      if (segs === undefined) {
        // Enough to tell a stale or unwritten used element from a completion delivered twice.
        const batch = all.map((u) => `${u.id}/${u.len}`).join(' ');
        throw new FrontendError(
          'FRONTEND_BAD_USED',
          `queue ${index}: used id ${id} (len ${len}, element ${i} of this batch: ${batch}) is not in flight; in flight: ${[...q.inflight.keys()].join(' ')}`,
        );
      }
      q.inflight.delete(id);
      const total = segs.reduce((n, s) => n + s.len, 0);
      const out = new Uint8Array(Math.min(len, total));
      let done = 0;
      for (const s of segs) {
        if (done >= out.length) break;
        const n = Math.min(s.len, out.length - done);
        out.set(this.memory.read(s.gpa, n), done);
        done += n;
      }
      return { id, len, written: out };
    });
  }

  /** Wait (on the call eventfd) until `count` chains came back. */
  async collect(index: number, count: number, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Completion[]> {
    const deadline = Date.now() + timeoutMs;
    const out: Completion[] = [];
    for (;;) {
      out.push(...this.takeCompletions(index));
      if (out.length >= count) return out;
      const left = deadline - Date.now();
      if (left <= 0) throw new FrontendError('FRONTEND_TIMEOUT', `queue ${index}: ${out.length} of ${count} chains came back within ${timeoutMs} ms`);
      await this.waitCall(index, left);
    }
  }

  /** Submit one chain and wait for it. */
  async transfer(index: number, chain: ChainSpec, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<Completion> {
    const [id] = this.submit(index, chain);
    const done = await this.collect(index, 1, timeoutMs);
    const c = done.find((x) => x.id === id);
    if (c === undefined) throw new FrontendError('FRONTEND_BAD_USED', 'another chain came back');
    return c;
  }

  private releaseQueue(index: number): void {
    const q = this.queues.get(index);
    if (q === undefined) return;
    for (const w of q.watchers) w.stop();
    native.close(q.kickFd);
    native.close(q.callFd);
    if (q.errFd !== null) native.close(q.errFd);
    this.queues.delete(index);
  }

  /**
   * The SET_VRING_BASE QEMU sends when a back-end went away without answering GET_VRING_BASE: split,
   * the used index (virtio_queue_restore_last_avail_idx); packed, the base of the last start (QEMU
   * has no packed ring state to restore from).
   */
  crashBase(index: number): number {
    const q = this.queue(index);
    return q.driver instanceof SplitQueueDriver ? q.driver.ring.usedIdx() : q.lastBase;
  }

  // ---- inflight area (INFLIGHT_SHMFD) ----------------------------------------------------------

  /** GET_INFLIGHT_FD for `numQueues` rings of `queueSize`: the back-end's new area and its fd. */
  async getInflightFd(numQueues: number, queueSize: number): Promise<InflightAreaFd> {
    const payload = new Uint8Array(24);
    const dv = new DataView(payload.buffer);
    dv.setUint16(16, numQueues, true);
    dv.setUint16(18, queueSize, true);
    this.main.keepFds = true;
    let reply: Message;
    try {
      this.send(Request.GET_INFLIGHT_FD, payload);
      reply = await this.reply(Request.GET_INFLIGHT_FD);
    } finally {
      this.main.keepFds = false;
    }
    if (reply.payload.length !== 24 || reply.fds.length !== 1) {
      for (const fd of reply.fds) native.close(fd);
      throw new FrontendError('FRONTEND_BAD_REPLY', `GET_INFLIGHT_FD reply of ${reply.payload.length} bytes with ${reply.fds.length} fds`);
    }
    const rv = new DataView(reply.payload.buffer, reply.payload.byteOffset, 24);
    return { fd: reply.fds[0]!, mmapSize: rv.getBigUint64(0, true), mmapOffset: rv.getBigUint64(8, true), numQueues: rv.getUint16(16, true), queueSize: rv.getUint16(18, true) };
  }

  /** SET_INFLIGHT_FD with `area` (the fd stays ours: QEMU keeps it for the next back-end). */
  async setInflightFd(area: InflightAreaFd): Promise<void> {
    const payload = new Uint8Array(24);
    const dv = new DataView(payload.buffer);
    dv.setBigUint64(0, area.mmapSize, true);
    dv.setBigUint64(8, area.mmapOffset, true);
    dv.setUint16(16, area.numQueues, true);
    dv.setUint16(18, area.queueSize, true);
    await this.request(Request.SET_INFLIGHT_FD, payload, [area.fd]);
  }

  /**
   * What QEMU does when its back-end went away: connect to `path` (the restarted back-end) and
   * negotiate and send the memory table again. Queues keep their rings, eventfds and the chains in
   * flight; the caller restarts them (SET_INFLIGHT_FD first, then restartQueue with crashBase).
   */
  async reconnect(path: string, negotiate: NegotiateOptions = {}): Promise<void> {
    this.main.close();
    this.backend?.close();
    this.backend = null;
    this.main = new Channel(native.connectUnix(path));
    this.closedByUs = false;
    await this.negotiate(negotiate);
    await this.sendMemTable();
  }

  // ---- config space --------------------------------------------------------------------------

  /** GET_CONFIG; returns the reply's config bytes (empty when the backend signals an error). */
  async getConfig(offset: number, size: number, flags = 0): Promise<Uint8Array> {
    const reply = await this.call(Request.GET_CONFIG, encodeConfig(offset, size, flags));
    if (reply.length === 0) return reply;
    if (reply.length !== CONFIG_HEADER_SIZE + size) throw new FrontendError('FRONTEND_BAD_REPLY', `GET_CONFIG reply of ${reply.length} bytes`);
    return reply.slice(CONFIG_HEADER_SIZE);
  }

  async setConfig(offset: number, data: Uint8Array, flags = 0): Promise<void> {
    await this.request(Request.SET_CONFIG, encodeConfig(offset, data.length, flags, data));
  }

  // ---- backend channel -----------------------------------------------------------------------

  /** SET_BACKEND_REQ_FD with one end of a socketpair; requests on it are recorded and acked. */
  async setBackendChannel(): Promise<void> {
    const [ours, theirs] = native.socketPair();
    this.backend = new Channel(ours, (msg) => {
      this.backendMessages.push({ request: msg.request, flags: msg.flags, payload: msg.payload });
      if ((msg.flags & VHOST_USER_NEED_REPLY_MASK) !== 0) {
        this.backend?.send(encodeMessage(msg.request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, encodeU64(0)), []);
      }
      this.backendWake?.();
      return true;
    });
    try {
      await this.request(Request.SET_BACKEND_REQ_FD, undefined, [theirs]);
    } finally {
      native.close(theirs);
    }
  }

  /** Wait until the backend channel received a request with code `request`; returns it. */
  async waitBackendMessage(request: number = BackendRequest.CONFIG_CHANGE_MSG, timeoutMs = DEFAULT_TIMEOUT_MS): Promise<BackendMessage> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const i = this.backendMessages.findIndex((m) => m.request === request);
      if (i >= 0) return this.backendMessages.splice(i, 1)[0]!;
      const left = deadline - Date.now();
      if (left <= 0) throw new FrontendError('FRONTEND_TIMEOUT', `no backend request ${request} within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.backendWake = () => {
          clearTimeout(timer);
          this.backendWake = null;
          resolve();
        };
      });
    }
  }

  // ---- teardown ------------------------------------------------------------------------------

  /** Hang up and release every fd and mapping. Idempotent. */
  close(): void {
    if (!this.main.isPeerClosed) this.closedByUs = true;
    this.main.close();
    this.backend?.close();
    this.backend = null;
    for (const index of [...this.queues.keys()]) this.releaseQueue(index);
    this.memory.close();
  }
}

/** Feature helpers for tests. */
export const RING_FEATURES = {
  packed: bit(VIRTIO_F_RING_PACKED),
  eventIdx: bit(VIRTIO_RING_F_EVENT_IDX),
  indirect: bit(VIRTIO_RING_F_INDIRECT_DESC),
};
export { VRING_NOFD_MASK };
