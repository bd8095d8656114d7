/**
 * One front-end connection: reads framed messages with their fds, runs them through the dispatch
 * table one at a time (a handler may be asynchronous, e.g. GET_VRING_BASE waits for in-flight I/O),
 * writes replies, and owns everything the front-end gave us until it goes away.
 *
 * Security model: the front-end is untrusted input. A malformed or out-of-range message ends the
 * connection with a logged {@link ProtocolError} code; every fd it carried is closed, every mapping
 * and queue of the connection released, and the server goes on accepting. Nothing the front-end
 * sends can make the process touch memory outside the regions it gave us.
 */
import { EventEmitter } from 'node:events';

import { native, POLL_READABLE, type NativeError, type RecvResult, type Watcher } from '../../native';
import { ProtocolError, RequestRefused, VhostdError } from '../errors';
import type { DirtyLog } from '../memory/dirty-log';
import { GuestMemory } from '../memory/guest-memory';
import type { Logger } from '../runtime/logger';
import type { QueueWorkerPool } from '../runtime/queue-workers';
import type { DeviceBackend, DeviceContext } from './device-backend';
import { BackendChannel } from './backend-channel';
import { dispatchTable, type Message } from './handlers';
import type { InflightArea } from './inflight-region';
import {
  HEADER_SIZE,
  MAX_FDS,
  MAX_PAYLOAD_SIZE,
  ProtocolFeature,
  requestName,
  u64,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
  VHOST_USER_VERSION_MASK,
} from './messages';
import { Vring } from './vring';

/** Why a connection ended, for logs, metrics and tests. */
export interface DisconnectInfo {
  /** The ProtocolError code when the front-end was dropped for a violation. */
  code?: string;
  /** The request being handled when it happened. */
  request?: string;
}

/** Counters kept across connections (the server owns them; metrics read them). */
export interface ProtocolCounters {
  /** Requests handled, by request name. */
  requests: Map<string, number>;
  /** Front-ends dropped, by error code. */
  drops: Map<string, number>;
}

export interface ConnectionOptions {
  fd: number;
  device: DeviceBackend;
  /** The server's vrings, one per device queue; reused across connections. */
  vrings: readonly Vring[];
  logger: Logger;
  counters: ProtocolCounters;
  /** Run queues in these worker threads (`--threads`); ended when the connection closes. */
  queueWorkers?: QueueWorkerPool | null;
  /** The queues' poll window limit, µs (QueueDriver `pollUs`). */
  pollUs?: number;
}

export class VhostUserConnection extends EventEmitter implements DeviceContext {
  /** Negotiated virtio features (SET_FEATURES). */
  ackedFeatures = 0n;
  /** Negotiated protocol features (SET_PROTOCOL_FEATURES). */
  ackedProtocolFeatures = 0n;
  memory: GuestMemory = GuestMemory.empty();
  /** The dirty page log of SET_LOG_BASE (live migration, dirty-logging.ts), until replaced or disconnect. */
  dirtyLog: DirtyLog | null = null;
  backendChannel: BackendChannel | null = null;
  /** Device status byte (SET_STATUS / GET_STATUS). */
  status = 0;
  /** The inflight area (SET_INFLIGHT_FD), kept until replaced or the front-end goes away. */
  inflight: InflightArea | null = null;
  closed = false;

  private readonly header = new Uint8Array(HEADER_SIZE);
  private readonly headerView = new DataView(this.header.buffer);
  private payload = new Uint8Array(0);
  private got = 0;
  private inPayload = false;
  private pendingFds: number[] = [];
  private busy = false;
  private readonly watcher: Watcher;

  readonly fd: number;
  readonly device: DeviceBackend;
  readonly vrings: readonly Vring[];
  readonly logger: Logger;
  readonly queueWorkers: QueueWorkerPool | null;
  readonly pollUs: number;
  private readonly counters: ProtocolCounters;

  constructor(options: ConnectionOptions) {
    super();
    this.fd = options.fd;
    this.device = options.device;
    this.vrings = options.vrings;
    this.logger = options.logger;
    this.counters = options.counters;
    this.queueWorkers = options.queueWorkers ?? null;
    this.pollUs = options.pollUs ?? 0;
    this.watcher = native.watch(this.fd, POLL_READABLE, () => void this.pump());
    this.device.attach?.(this);
  }

  /** DeviceContext: negotiated virtio features. */
  get features(): bigint {
    return this.ackedFeatures;
  }

  /** DeviceContext: send CONFIG_CHANGE_MSG if the front-end gave us a backend channel. */
  notifyConfigChange(): Promise<boolean> {
    return this.backendChannel?.sendConfigChange() ?? Promise.resolve(false);
  }

  /** DeviceContext: a queue this thread runs broke in the device's own work. */
  queueBroken(index: number, err: unknown): void {
    this.vrings[index]?.markBroken(err);
  }

  /** DeviceContext: a message to the device of every running queue worker thread. */
  messageWorkers(message: unknown): Promise<unknown[]> {
    return this.queueWorkers?.deviceMessage(message) ?? Promise.resolve([]);
  }

  /** SET_BACKEND_REQ_FD: takes ownership of `fd`, replacing any earlier channel. */
  setBackendChannel(fd: number): void {
    this.backendChannel?.close();
    this.backendChannel = null;
    try {
      this.backendChannel = new BackendChannel(fd, this.hasProtocolFeature(ProtocolFeature.REPLY_ACK), this.logger);
    } catch (err) {
      native.close(fd);
      throw new ProtocolError('VHOST_USER_BACKEND_CHANNEL', `cannot use the backend channel fd: ${(err as Error).message}`);
    }
  }

  /** SET_INFLIGHT_FD: use `area` from now on (the rings are stopped), releasing the previous one. */
  setInflight(area: InflightArea): void {
    this.inflight?.close();
    this.inflight = area;
  }

  hasProtocolFeature(bit: number): boolean {
    return (this.ackedProtocolFeatures & (1n << BigInt(bit))) !== 0n;
  }

  /** Drop the front-end and release everything it gave us. Idempotent. */
  async close(info: DisconnectInfo = {}): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.watcher.stop();
    await this.stopVrings();
    try {
      await this.queueWorkers?.close();
    } catch (err) {
      this.logger.warn(`stopping queue workers: ${(err as Error).message}`);
    }
    this.device.reset?.();
    this.device.detach?.();
    this.backendChannel?.close();
    this.backendChannel = null;
    this.memory.close();
    this.memory = GuestMemory.empty();
    this.dirtyLog?.close(); // every ring stopped: nothing logs any more
    this.dirtyLog = null;
    this.inflight?.close();
    this.inflight = null;
    for (const fd of this.pendingFds) native.close(fd);
    this.pendingFds = [];
    native.close(this.fd);
    this.emit('close', info);
  }

  /** Stop every ring (the device drains each) and forget their configuration: reset or disconnect. */
  async stopVrings(): Promise<void> {
    for (const vring of this.vrings) {
      try {
        await vring.stop();
      } catch (err) {
        this.logger.warn(`stopping queue ${vring.index}: ${(err as Error).message}`);
      }
      vring.release();
    }
  }

  /** Read and handle every complete message; one at a time, in order. */
  private async pump(): Promise<void> {
    if (this.busy || this.closed) return;
    this.busy = true;
    try {
      for (;;) {
        const message = this.readMessage();
        if (message === null) break;
        await this.handle(message);
        if (this.closed) break;
      }
    } catch (err) {
      await this.fail(err, undefined);
    } finally {
      this.busy = false;
    }
  }

  /**
   * Advance the header/payload state machine with what the socket has. Returns a complete message,
   * or null when more bytes are needed (or the connection closed).
   */
  private readMessage(): Message | null {
    for (;;) {
      const target = this.inPayload ? this.payload : this.header;
      if (this.got < target.length) {
        const { bytes, fds } = this.receive(target);
        this.pendingFds.push(...fds);
        if (bytes < 0) return null;
        if (bytes === 0) {
          void this.close({});
          return null;
        }
        this.got += bytes;
        if (this.pendingFds.length > MAX_FDS) {
          throw new ProtocolError('VHOST_USER_BAD_FDS', `more than ${MAX_FDS} fds in one message`);
        }
        continue;
      }
      if (!this.inPayload) {
        const flags = this.headerView.getUint32(4, true);
        const size = this.headerView.getUint32(8, true);
        if ((flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION) {
          throw new ProtocolError('VHOST_USER_BAD_VERSION', `protocol version ${flags & VHOST_USER_VERSION_MASK}, expected 1`);
        }
        if (size > MAX_PAYLOAD_SIZE) {
          throw new ProtocolError('VHOST_USER_BAD_SIZE', `payload of ${size} bytes exceeds ${MAX_PAYLOAD_SIZE}`);
        }
        this.inPayload = true;
        this.payload = new Uint8Array(size);
        this.got = 0;
        if (size > 0) continue;
      }
      const message: Message = {
        request: this.headerView.getUint32(0, true),
        flags: this.headerView.getUint32(4, true),
        payload: this.payload,
        view: new DataView(this.payload.buffer),
        fds: this.pendingFds,
      };
      this.pendingFds = [];
      this.inPayload = false;
      this.got = 0;
      return message;
    }
  }

  /** recvmsg; more fds than a message may carry arrive truncated (the native side closed them). */
  private receive(target: Uint8Array): RecvResult {
    try {
      return native.recvMsg(this.fd, target, this.got, target.length - this.got, MAX_FDS);
    } catch (err) {
      if ((err as NativeError).code === 'EMSGSIZE') {
        throw new ProtocolError('VHOST_USER_BAD_FDS', `more than ${MAX_FDS} fds in one message`);
      }
      throw err;
    }
  }

  private async handle(message: Message): Promise<void> {
    const name = requestName(message.request);
    // Bounded metric labels: every unknown code counts as one.
    this.countRequest(dispatchTable.has(message.request) ? name : 'UNSUPPORTED');
    const needReply = (message.flags & VHOST_USER_NEED_REPLY_MASK) !== 0 && this.hasProtocolFeature(ProtocolFeature.REPLY_ACK);
    try {
      const entry = dispatchTable.get(message.request);
      if (entry === undefined) {
        throw new ProtocolError('VHOST_USER_UNKNOWN_REQUEST', `unsupported request ${name}`);
      }
      entry.check(this, message);
      this.logger.debug(`request ${name}`, { size: message.payload.length, fds: message.fds.length });
      const reply = await entry.handle(this, message);
      if (reply instanceof Uint8Array) this.send(message.request, reply);
      else if (reply !== undefined) this.sendClosing(message.request, reply.payload, reply.fds);
      else if (needReply) this.send(message.request, u64(0n));
    } catch (err) {
      if (err instanceof RequestRefused) {
        this.logger.warn(`${name} refused: ${err.message}`);
        if (needReply) this.send(message.request, u64(1n));
        return;
      }
      if (needReply && !this.closed) {
        // REPLY_ACK: a non-zero u64 tells the front-end the request failed before we hang up.
        this.trySend(message.request, u64(1n));
      }
      await this.fail(err, name);
    } finally {
      for (const fd of message.fds) if (fd >= 0) native.close(fd);
    }
  }

  private async fail(err: unknown, request: string | undefined): Promise<void> {
    if (PEER_GONE.has((err as NativeError)?.code)) {
      // The front-end hung up while we were reading or replying: a disconnect, not a violation.
      await this.close({});
      return;
    }
    const code = err instanceof VhostdError ? err.code : 'INTERNAL';
    const message = err instanceof VhostdError ? err.message : ((err as Error)?.stack ?? String(err));
    this.logger.error(`dropping front-end: ${message}`, { code, request });
    this.counters.drops.set(code, (this.counters.drops.get(code) ?? 0) + 1);
    await this.close({ code, request });
  }

  /** Write a reply. The socket is nonblocking and replies are small: a full socket means a stuck peer. */
  send(request: number, payload: Uint8Array, fds: number[] = []): void {
    const buf = new Uint8Array(HEADER_SIZE + payload.length);
    const view = new DataView(buf.buffer);
    view.setUint32(0, request, true);
    view.setUint32(4, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, true);
    view.setUint32(8, payload.length, true);
    buf.set(payload, HEADER_SIZE);
    const sent = native.sendMsg(this.fd, buf, 0, buf.length, fds);
    if (sent !== buf.length) {
      throw new ProtocolError('VHOST_USER_BAD_STATE', `front-end is not reading replies (sent ${sent} of ${buf.length} bytes)`);
    }
  }

  /** Send a reply with fds we created for the front-end, then close ours (sent or not). */
  private sendClosing(request: number, payload: Uint8Array, fds: number[]): void {
    try {
      this.send(request, payload, fds);
    } finally {
      for (const fd of fds) native.close(fd);
    }
  }

  private trySend(request: number, payload: Uint8Array): void {
    try {
      this.send(request, payload);
    } catch {
      // The connection is being dropped anyway.
    }
  }

  private countRequest(name: string): void {
    this.counters.requests.set(name, (this.counters.requests.get(name) ?? 0) + 1);
  }
}

/** Errors that mean the front-end closed its end of the socket. */
const PEER_GONE = new Set<string | undefined>(['EPIPE', 'ECONNRESET']);
