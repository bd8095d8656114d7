/**
 * Live migration, protocol side (vhost-user.rst, "Migration"): the dirty page log of SET_LOG_BASE
 * (mapped by lib/memory/dirty-log.ts), SET_LOG_FD, and logging turned on and off by VHOST_F_LOG_ALL in
 * SET_FEATURES and VHOST_VRING_F_LOG in SET_VRING_ADDR. While logging is on every ring holds the log
 * and marks what the device writes (lib/virtqueue/ring-log.ts), on this thread and in queue workers.
 *
 * QEMU's order: SET_LOG_BASE (the log, sized for its memory map), SET_FEATURES with LOG_ALL, then
 * SET_VRING_ADDR with VHOST_VRING_F_LOG on each running ring; at the end of the migration the rings
 * stop (GET_VRING_BASE, which waits for in-flight I/O, so every write is marked before QEMU's last
 * sync). Cancelling clears LOG_ALL and the ring flags the same way; we stop logging then (rust-vmm's
 * backends never do).
 */
import { ProtocolError } from '../errors';
import { DirtyLog, logBytesFor, MAX_LOG_SIZE } from '../memory/dirty-log';
import { bit, VHOST_F_LOG_ALL, VIRTIO_F_RING_PACKED } from '../virtio/constants';
import type { VhostUserConnection } from './connection';
import type { Message } from './handlers';
import { u64 } from './messages';
import { checkFdKind, checkLogArea } from './validate';
import type { Vring } from './vring';

/** The log the rings write into now: mapped and LOG_ALL negotiated. */
function activeLog(c: VhostUserConnection): DirtyLog | null {
  return (c.ackedFeatures & bit(VHOST_F_LOG_ALL)) !== 0n ? c.dirtyLog : null;
}

/** Highest guest physical address (exclusive) of the memory map. */
function memoryEnd(c: VhostUserConnection): number {
  return c.memory.regions.reduce((end, r) => Math.max(end, r.guestPhysAddr + r.size), 0);
}

/**
 * vhost-user.rst: the used ring's log_guest_addr "might be outside the legal guest physical address
 * range ... but the bit offset of the last byte of the ring must fall within the size supplied by
 * VhostUserLog". Split rings only: a packed ring's writes are logged at the guest addresses of its
 * areas, inside the memory map the log covers.
 */
function checkUsedRingLogged(c: VhostUserConnection, vring: Vring, log: DirtyLog): void {
  if (vring.logGuestAddr === null || vring.num === 0 || (c.ackedFeatures & bit(VIRTIO_F_RING_PACKED)) !== 0n) return;
  // virtio 1.2 §2.7: the used ring is 6 + 8 * size bytes, plus avail_event (EVENT_IDX).
  const end = vring.logGuestAddr + 6 + 8 * vring.num + 2;
  if (end > log.coveredEnd) {
    throw new ProtocolError(
      'VHOST_USER_BAD_LOG',
      `used ring of queue ${vring.index} at log address 0x${vring.logGuestAddr.toString(16)} ends past the ${log.size}-byte dirty log`,
    );
  }
}

/** Give `vring` the log it must write into now (a queue in a worker: resolves once it mapped it). */
export function applyRingLog(c: VhostUserConnection, vring: Vring): Promise<void> | undefined {
  const log = activeLog(c);
  if (log !== null) checkUsedRingLogged(c, vring, log);
  return vring.setDirtyLog(log);
}

/** Logging may have started, stopped or moved: every ring follows before the front-end's reply. */
export async function applyDirtyLog(c: VhostUserConnection): Promise<void> {
  const switching: Promise<void>[] = [];
  for (const vring of c.vrings) {
    const done = applyRingLog(c, vring);
    if (done !== undefined) switching.push(done);
  }
  await Promise.all(switching);
}

/**
 * SET_LOG_BASE with LOG_SHMFD: VhostUserLog {u64 mmap_size, u64 mmap_offset} and the log's fd. Maps
 * the new log, moves every ring to it, then unmaps the old one. QEMU waits for an answer with the same
 * request code (vhost_user_set_log_base reads one when the log is shared); the spec's table says
 * "N/A", so we answer a u64 0 as libvhost-user does.
 */
export async function setLogBase(c: VhostUserConnection, m: Message): Promise<Uint8Array> {
  const area = checkLogArea(m.view.getBigUint64(0, true), m.view.getBigUint64(8, true), MAX_LOG_SIZE, logBytesFor(memoryEnd(c)));
  const fd = m.fds[0]!;
  m.fds[0] = -1;
  let log: DirtyLog;
  try {
    log = new DirtyLog(area, fd); // takes the fd, closed on failure
  } catch (err) {
    throw new ProtocolError('VHOST_USER_BAD_LOG', `cannot map the dirty log: ${(err as Error).message}`);
  }
  const old = c.dirtyLog;
  c.dirtyLog = log;
  try {
    await applyDirtyLog(c);
  } finally {
    old?.close();
  }
  c.logger.info(`dirty page log: ${area.size} bytes, logging ${activeLog(c) !== null ? 'on' : 'off'}`);
  return u64(0n);
}

/**
 * SET_LOG_FD: "an optional message with an eventfd in ancillary data, it may be used to inform the
 * front-end that the log has been modified". May: we check it is an eventfd and let the connection
 * close it. The front-end reads the bitmap itself (QEMU at every migration iteration, and it never
 * sends this message to a vhost-user back-end).
 */
export function setLogFd(m: Message): undefined {
  checkFdKind(m.fds[0]!, 'eventfd', 'SET_LOG_FD fd');
  return undefined;
}
