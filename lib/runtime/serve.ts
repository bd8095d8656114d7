/**
 * Run a device on a vhost-user socket: listen on a path (`--socket-path`), use an inherited
 * listening socket (`--fd`, systemd socket activation), or connect out to a front-end that listens
 * (`--connect`, QEMU `-chardev socket,server=on`), reconnecting after it goes away.
 *
 * One front-end at a time: while one is attached the listening socket is not watched, so a second
 * front-end waits in the backlog until the first disconnects.
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';

import { native, POLL_READABLE, type Watcher } from '../../native';
import { ConfigError } from '../errors';
import { VhostUserConnection, type DisconnectInfo, type ProtocolCounters } from '../vhost-user/connection';
import type { DeviceBackend } from '../vhost-user/device-backend';
import { Vring } from '../vhost-user/vring';
import { silentLogger, type Logger } from './logger';
import { listenPrivateUnixSocket } from './private-socket';
import { QueueWorkerPool, type QueueWorkerOptions } from './queue-workers';

export interface ServeOptions {
  /** Listen on this unix socket path (created mode 0600; a stale socket file is replaced). */
  socketPath?: string;
  /** With `socketPath`: mode 0660 and this group (a gid), for a front-end running as another user. */
  socketGroup?: number;
  /** Use this already-listening unix socket fd (systemd LISTEN_FDS, `--fd`). */
  fd?: number;
  /** Connect to a front-end listening on this path, and again after every disconnect. */
  connect?: string;
  logger?: Logger;
  /** Delay between connection attempts in `connect` mode. */
  reconnectDelayMs?: number;
  /** Run the queues in worker threads (`--threads`); threads live while a front-end is attached. */
  queueWorkers?: QueueWorkerOptions;
  /** Longest adaptive poll window after a batch, µs (`--poll-us`; QueueDriver); 0 or absent: no polling. */
  pollUs?: number;
}

export interface VhostUserServer extends EventEmitter {
  readonly device: DeviceBackend;
  /** One per device queue, reused across connections (metrics read their counters). */
  readonly vrings: readonly Vring[];
  readonly counters: ProtocolCounters;
  /** The queue worker threads (`queueWorkers` option), or null: queues run on the main thread. */
  readonly queueWorkers: QueueWorkerPool | null;
  /** Whether a front-end is attached now. */
  readonly connected: boolean;
  /** Virtio and protocol features the attached front-end acked (0n without one). */
  readonly negotiated: { features: bigint; protocolFeatures: bigint };
  /** Stop accepting, drop the front-end, release everything. */
  close(): Promise<void>;
  on(event: 'connection', listener: () => void): this;
  on(event: 'disconnect', listener: (info: DisconnectInfo) => void): this;
}

class Server extends EventEmitter implements VhostUserServer {
  readonly vrings: Vring[];
  readonly counters: ProtocolCounters = { requests: new Map(), drops: new Map() };
  private connection: VhostUserConnection | null = null;
  private listenFd = -1;
  private listenWatcher: Watcher | null = null;
  private reconnectTimer: NodeJS.Timeout | null = null;
  private closing = false;
  private readonly logger: Logger;
  readonly queueWorkers: QueueWorkerPool | null;

  constructor(
    readonly device: DeviceBackend,
    private readonly options: ServeOptions,
  ) {
    super();
    this.logger = options.logger ?? silentLogger;
    this.vrings = Array.from({ length: device.numQueues }, (_, i) => new Vring(i));
    this.queueWorkers = options.queueWorkers !== undefined ? new QueueWorkerPool(options.queueWorkers, this.logger, () => device.workerState?.()) : null;
  }

  get connected(): boolean {
    return this.connection !== null;
  }

  get negotiated(): { features: bigint; protocolFeatures: bigint } {
    return { features: this.connection?.ackedFeatures ?? 0n, protocolFeatures: this.connection?.ackedProtocolFeatures ?? 0n };
  }

  start(): void {
    const { socketPath, fd, connect } = this.options;
    const modes = [socketPath, fd, connect].filter((m) => m !== undefined).length;
    if (modes !== 1) {
      throw new ConfigError('CONFIG_CONFLICT', 'give exactly one of --socket-path, --fd or --connect');
    }
    if (connect !== undefined) {
      this.connectOut();
      return;
    }
    if (fd !== undefined) {
      if (!native.isListeningUnixSocket(fd)) {
        throw new ConfigError('CONFIG_INVALID', `fd ${fd} is not a listening unix stream socket`);
      }
      native.setNonBlocking(fd, true);
      this.listenFd = fd;
    } else {
      this.listenFd = listenPrivateUnixSocket(socketPath!, 1, this.options.socketGroup);
    }
    this.watchListener();
  }

  private watchListener(): void {
    if (this.closing || this.listenFd < 0) return;
    this.listenWatcher = native.watch(this.listenFd, POLL_READABLE, () => this.acceptOne());
  }

  private acceptOne(): void {
    const fd = native.accept(this.listenFd);
    if (fd < 0) return;
    this.listenWatcher?.stop();
    this.listenWatcher = null;
    this.attach(fd);
  }

  private connectOut(): void {
    if (this.closing) return;
    let fd: number;
    try {
      fd = native.connectUnix(this.options.connect!);
    } catch (err) {
      this.logger.debug(`connect ${this.options.connect}: ${(err as Error).message}; retrying`);
      this.reconnectTimer = setTimeout(() => this.connectOut(), this.options.reconnectDelayMs ?? 1000);
      return;
    }
    this.attach(fd);
  }

  private attach(fd: number): void {
    this.logger.info('front-end connected');
    const connection = new VhostUserConnection({
      fd,
      device: this.device,
      vrings: this.vrings,
      logger: this.logger,
      counters: this.counters,
      queueWorkers: this.queueWorkers,
      pollUs: this.options.pollUs,
    });
    this.connection = connection;
    connection.once('close', (info: DisconnectInfo) => {
      this.connection = null;
      this.logger.info('front-end disconnected', { code: info.code });
      this.emit('disconnect', info);
      if (this.closing) return;
      if (this.options.connect !== undefined) {
        this.reconnectTimer = setTimeout(() => this.connectOut(), this.options.reconnectDelayMs ?? 1000);
      } else {
        this.watchListener();
      }
    });
    this.emit('connection');
  }

  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    this.listenWatcher?.stop();
    await this.connection?.close({});
    if (this.listenFd >= 0) {
      native.close(this.listenFd);
      this.listenFd = -1;
      if (this.options.socketPath !== undefined) fs.rmSync(this.options.socketPath, { force: true });
    }
  }
}

/** Start serving `device`. Throws ConfigError when the socket cannot be set up. */
export async function serve(device: DeviceBackend, options: ServeOptions): Promise<VhostUserServer> {
  const server = new Server(device, options);
  server.start();
  return server;
}
