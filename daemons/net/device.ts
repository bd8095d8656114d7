/**
 * virtio-net (virtio 1.2 §5.1, device id 1) over a TAP: the daemon runs the rx/tx queue pairs
 * (queue 2p receives, 2p+1 transmits); QEMU keeps the control queue, the config space (MAC, status)
 * and the features it does not let a vhost-user back-end handle (hw/net/vhost_net.c
 * user_feature_bits), so this device has no config space and no control queue.
 *
 * Every device instance (the main one, or a queue worker's with `--threads`) opens its own TAP queue
 * for each pair it runs (tap.ts) and moves frames with rx.ts and tx.ts. A pair's rx and tx share a
 * thread (queueGroup). The main instance also holds the "anchor" queue opened at start: it proves
 * the TAP is usable, probes its offloads, keeps a TAP made with --create-tap alive, and sends the
 * RARP announcement; it stays detached so the kernel never steers frames to it.
 */
import type { Registry } from 'prom-client';

import { RequestRefused } from '../../lib/errors';
import type { Logger } from '../../lib/runtime/logger';
import type { DeviceBackend, DeviceContext } from '../../lib/vhost-user/device-backend';
import { VIRTIO_F_VERSION_1, bit } from '../../lib/virtio/constants';
import type { Virtqueue } from '../../lib/virtqueue/virtqueue';
import { native } from '../../native';
import { createNetMetrics, NetQueueStats } from './metrics';
import { txLimits } from './net-header';
import { RxPath } from './rx';
import { openTapQueue, openTapWriter, setTapOffloads, setTapQueueAttached, type TapOffloadSupport } from './tap';
import { TX_BATCH, TxPath } from './tx';
import {
  ETH_HLEN,
  MAX_GSO_PAYLOAD,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_ANNOUNCE,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_GUEST_UFO,
  VIRTIO_NET_F_GUEST_USO4,
  VIRTIO_NET_F_GUEST_USO6,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_HOST_UFO,
  VIRTIO_NET_F_HOST_USO,
  VIRTIO_NET_F_MQ,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_NET_F_MTU,
  VLAN_HLEN,
  VNET_HDR_LEGACY_SIZE,
  VNET_HDR_SIZE,
} from './virtio-net';

export interface NetDeviceOptions {
  /** The TAP interface. */
  tap: string;
  queuePairs: number;
  queueSize: number;
  /** Largest MTU: frames over MTU + 18 without GSO are dropped; NET_SET_MTU above it is refused. */
  mtu: number;
  /** Write tx frames to the TAP with io_uring when the kernel allows (else a writev per frame). */
  txUring: boolean;
  /** Worker threads running the queue pairs (--threads); 0: this instance runs them. */
  threads: number;
  logger: Logger;
}

export interface NetDeviceHost {
  /** The main instance's anchor TAP queue (detached), or null in a queue worker. */
  anchorFd: number | null;
  /** Offloads the TAP accepts beyond CSUM/TSO (probed on the anchor at start). */
  offloads: TapOffloadSupport;
}

/** One queue pair on this instance. */
class QueuePair {
  /** This instance's TAP queue for the pair, or -1 while neither ring runs. */
  fd = -1;
  rx: RxPath | null = null;
  tx: TxPath | null = null;
  rxEnabled = false;
  txEnabled = false;
}

export class NetDevice implements DeviceBackend {
  readonly name = 'net';
  readonly numQueues: number;
  readonly maxQueueSize: number;
  /** Its state is guest memory, the rings and what QEMU sends again at start: live migration works. */
  readonly migratable = true;
  private readonly options: NetDeviceOptions;
  private readonly host: NetDeviceHost;
  private readonly logger: Logger;
  private readonly pairs: QueuePair[];
  private readonly stats: NetQueueStats[];
  private context: DeviceContext | null = null;
  /**
   * How tx frames were written the last time a tx queue of this instance started (logged when it
   * changes, not per start); null before (and on the main thread with --threads, whose queues run in workers).
   */
  private txMethod: 'io_uring' | 'writev' | null = null;
  /** The MTU the front-end announced (NET_SET_MTU), for status. */
  private frontendMtu: number | null = null;

  constructor(options: NetDeviceOptions, host: NetDeviceHost) {
    this.options = options;
    this.host = host;
    this.logger = options.logger;
    this.numQueues = 2 * options.queuePairs;
    this.maxQueueSize = options.queueSize;
    this.pairs = Array.from({ length: options.queuePairs }, () => new QueuePair());
    this.stats = Array.from({ length: this.numQueues }, () => new NetQueueStats());
  }

  /**
   * What QEMU lets a vhost-user net back-end decide (hw/net/vhost_net.c user_feature_bits), minus
   * what TAP cannot do: the checksum and segmentation offloads both ways (TAP passes the virtio-net
   * header through), mergeable rx buffers, MTU, multiqueue, and GUEST_ANNOUNCE (the guest announces
   * itself after migration; QEMU then sends no SEND_RARP). UFO and USO only when the host's TAP
   * takes them (QEMU 10 itself clears the USO bits for any vhost-user back-end: net/vhost-user.c
   * has no has_uso, so virtio_net_get_features drops them; other front-ends see them). The engine
   * adds VERSION_1 and the ring features.
   */
  features(): bigint {
    let f = [
      VIRTIO_NET_F_CSUM,
      VIRTIO_NET_F_GUEST_CSUM,
      VIRTIO_NET_F_GUEST_TSO4,
      VIRTIO_NET_F_GUEST_TSO6,
      VIRTIO_NET_F_GUEST_ECN,
      VIRTIO_NET_F_HOST_TSO4,
      VIRTIO_NET_F_HOST_TSO6,
      VIRTIO_NET_F_HOST_ECN,
      VIRTIO_NET_F_MRG_RXBUF,
      VIRTIO_NET_F_MTU,
      VIRTIO_NET_F_MQ,
      VIRTIO_NET_F_GUEST_ANNOUNCE,
    ].reduce((mask, n) => mask | bit(n), 0n);
    const { ufo, uso4, uso6 } = this.host.offloads;
    if (ufo) f |= bit(VIRTIO_NET_F_GUEST_UFO) | bit(VIRTIO_NET_F_HOST_UFO);
    if (uso4) f |= bit(VIRTIO_NET_F_GUEST_USO4);
    if (uso6) f |= bit(VIRTIO_NET_F_GUEST_USO6);
    // The kernel that hands USO frames over also takes them (gso_type UDP_L4) on write, since 6.2.
    if (uso4 || uso6) f |= bit(VIRTIO_NET_F_HOST_USO);
    return f;
  }

  protocolFeatures(): bigint {
    return 0n; // MQ comes from the engine; NET_MTU and RARP from setMtu and sendRarp
  }

  /** rx and tx of a pair run in one thread. */
  queueGroup(index: number): number {
    return index >> 1;
  }

  /** NET_SET_MTU: the MTU QEMU's host_mtu= gives the guest; above --mtu the daemon would drop its frames. */
  setMtu(mtu: number): void {
    if (mtu > this.options.mtu) throw new RequestRefused(`MTU ${mtu} is above --mtu ${this.options.mtu}`);
    this.frontendMtu = mtu;
  }

  /** SEND_RARP: a RARP broadcast from `mac` (RFC 903, as QEMU's qemu_announce_self) so switches learn where the guest went. */
  sendRarp(mac: Uint8Array): void {
    const fd = this.host.anchorFd;
    if (fd === null) return;
    const memfd = native.memfdCreate('vhostd-net-rarp', 4096);
    const mapping = native.mmap(memfd, 4096, 0, true);
    native.close(memfd);
    try {
      rarpFrame(mapping.views[0]!.subarray(VNET_HDR_SIZE), mac);
      // The anchor joins the TAP just for this write (a detached queue cannot send).
      setTapQueueAttached(fd, true);
      const result = new Int32Array(1);
      native.writeFrames(fd, Float64Array.of(mapping.address), Float64Array.of(VNET_HDR_SIZE + RARP_FRAME_LENGTH), Uint32Array.of(0), Uint32Array.of(1), result, 1);
      setTapQueueAttached(fd, false);
      const from = Array.from(mac, (b) => b.toString(16).padStart(2, '0')).join(':');
      if (result[0]! < 0) this.logger.warn(`RARP announcement for ${from} not sent: errno ${-result[0]!}`);
      else this.logger.info(`RARP announcement for ${from} sent into the TAP`);
    } finally {
      native.munmap(mapping.id);
    }
  }

  registerMetrics(registry: Registry): void {
    createNetMetrics(registry, this);
  }

  /** The device's state for the control `status` method (`vhostctl status`): the TAP side, and how tx writes it. */
  status(): Record<string, unknown> {
    return {
      tap: this.options.tap,
      mtuLimit: this.options.mtu,
      frontendMtu: this.frontendMtu,
      tapOffloads: this.host.offloads,
      // With --threads the pairs run in the workers' instances: their state is in the queues above and the log.
      ...(this.options.threads > 0
        ? { threads: this.options.threads }
        : { txWrites: this.txMethod, pairs: this.pairs.map((pair) => ({ tapQueueOpen: pair.fd >= 0, rxEnabled: pair.rxEnabled, txEnabled: pair.txEnabled })) }),
    };
  }

  queueStats(index: number): NetQueueStats {
    return this.stats[index]!;
  }

  attach(context: DeviceContext): void {
    this.context = context;
  }

  detach(): void {
    this.context = null;
    for (let p = 0; p < this.pairs.length; p++) this.closePair(p);
  }

  startQueue(index: number, queue: Virtqueue): void {
    const p = index >> 1;
    const pair = this.pairs[p]!;
    const features = this.context?.features ?? 0n;
    const has = (n: number) => (features & bit(n)) !== 0n;
    const headerSize = has(VIRTIO_F_VERSION_1) || has(VIRTIO_NET_F_MRG_RXBUF) ? VNET_HDR_SIZE : VNET_HDR_LEGACY_SIZE;
    if (pair.fd < 0) {
      const fd = openTapQueue(this.options.tap);
      try {
        native.tapSetVnetHdrSize(fd, headerSize);
        setTapOffloads(fd, features);
        setTapQueueAttached(fd, false); // until the guest enables a ring of the pair
      } catch (err) {
        native.close(fd);
        throw err;
      }
      pair.fd = fd;
    }
    const stats = this.stats[index]!;
    const broken = (err: unknown) => this.context?.queueBroken?.(index, err);
    if (index % 2 === 0) {
      const gso = has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6) || has(VIRTIO_NET_F_GUEST_UFO) || has(VIRTIO_NET_F_GUEST_USO4) || has(VIRTIO_NET_F_GUEST_USO6);
      const maxFrame = headerSize + (gso ? MAX_GSO_PAYLOAD : this.options.mtu) + ETH_HLEN + VLAN_HLEN;
      pair.rx = new RxPath(queue, pair.fd, { headerSize, mergeable: has(VIRTIO_NET_F_MRG_RXBUF), maxFrame }, stats, broken);
    } else {
      const { writer, uringUnavailable } = openTapWriter(pair.fd, TX_BATCH, this.options.txUring);
      if (writer.method !== this.txMethod) {
        this.txMethod = writer.method;
        if (uringUnavailable !== null) this.logger.warn(`tx: io_uring unavailable (${uringUnavailable}); one writev per frame`);
        else this.logger.info(`tx: frames go to the TAP with ${writer.method === 'io_uring' ? 'io_uring, one io_uring_enter per batch' : 'one writev each (--no-tx-uring)'}`);
      }
      pair.tx = new TxPath(queue, pair.fd, writer, txLimits(features, headerSize, this.options.mtu), stats, broken);
    }
  }

  queueEnabled(index: number, enabled: boolean): void {
    const p = index >> 1;
    const pair = this.pairs[p]!;
    if (index % 2 === 0) pair.rxEnabled = enabled;
    else pair.txEnabled = enabled;
    if (pair.fd >= 0) setTapQueueAttached(pair.fd, pair.rxEnabled || pair.txEnabled);
    if (index % 2 === 0) {
      if (enabled) pair.rx?.start();
      else pair.rx?.stop();
    } else if (!enabled) {
      // A disabled ring is not processed (vhost-user.rst): finish or drop what was taken, wait for enable.
      pair.tx?.settle();
    }
  }

  processQueue(index: number): void {
    const pair = this.pairs[index >> 1]!;
    if (index % 2 === 0) pair.rx?.kick();
    else pair.tx?.kick();
  }

  /** Frames staged for transmission point into the old map: finish them, then go on in the new one. */
  memoryChanged(): void {
    for (const pair of this.pairs) {
      pair.tx?.settle();
      if (pair.txEnabled) pair.tx?.kick();
    }
  }

  stopQueue(index: number): void {
    const p = index >> 1;
    const pair = this.pairs[p]!;
    if (index % 2 === 0) {
      pair.rx?.close();
      pair.rx = null;
      pair.rxEnabled = false;
    } else {
      pair.tx?.close();
      pair.tx = null;
      pair.txEnabled = false;
    }
    if (pair.rx === null && pair.tx === null) this.closePair(p);
  }

  /** The anchor goes when the daemon ends (a TAP made with --create-tap goes with it). */
  close(): void {
    for (let p = 0; p < this.pairs.length; p++) this.closePair(p);
    if (this.host.anchorFd !== null) native.close(this.host.anchorFd);
    this.host.anchorFd = null;
  }

  private closePair(p: number): void {
    const pair = this.pairs[p]!;
    pair.rx?.close();
    pair.tx?.close();
    pair.rx = pair.tx = null;
    pair.rxEnabled = pair.txEnabled = false;
    if (pair.fd >= 0) native.close(pair.fd);
    pair.fd = -1;
  }
}

/** RFC 903 RARP request as QEMU's announce_self_create builds it: 42 bytes, zero-padded to Ethernet's 60. */
const RARP_FRAME_LENGTH = 60;

function rarpFrame(out: Uint8Array, mac: Uint8Array): void {
  out.fill(0xff, 0, 6); // broadcast
  out.set(mac, 6);
  out.set([0x80, 0x35], 12); // ETH_P_RARP
  out.set([0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03], 14); // Ethernet, IPv4, hlen 6, plen 4, "reverse request"
  out.set(mac, 22); // sender hardware address
  out.fill(0, 28, 32);
  out.set(mac, 32); // target hardware address
  out.fill(0, 38, RARP_FRAME_LENGTH);
}
