/**
 * The backend → front-end channel (SET_BACKEND_REQ_FD): the backend sends requests such as
 * CONFIG_CHANGE_MSG. With REPLY_ACK negotiated we set NEED_REPLY and wait (bounded) for the ack;
 * the front-end answers on the same socket.
 *
 * Owns the channel fd.
 */
import { native, POLL_READABLE, type Watcher } from '../../native';
import type { Logger } from '../runtime/logger';
import {
  BackendRequest,
  HEADER_SIZE,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
} from './messages';

/** How long to wait for the front-end to acknowledge a backend request. */
const REPLY_TIMEOUT_MS = 5000;

export class BackendChannel {
  private readonly watcher: Watcher;
  private readonly replyBuf = new Uint8Array(HEADER_SIZE + 8);
  private got = 0;
  private pending: { resolve: (ok: boolean) => void; timer: NodeJS.Timeout } | null = null;
  private closed = false;

  constructor(
    private readonly fd: number,
    private readonly replyAck: boolean,
    private readonly logger: Logger,
  ) {
    this.watcher = native.watch(fd, POLL_READABLE, () => this.onReadable());
  }

  /** vhost-user.rst VHOST_USER_BACKEND_CONFIG_CHANGE_MSG: no payload. Resolves whether it was delivered. */
  async sendConfigChange(): Promise<boolean> {
    return this.send(BackendRequest.CONFIG_CHANGE_MSG);
  }

  private send(request: number): Promise<boolean> {
    if (this.closed || this.pending !== null) return Promise.resolve(false);
    const msg = new Uint8Array(HEADER_SIZE);
    const view = new DataView(msg.buffer);
    view.setUint32(0, request, true);
    view.setUint32(4, VHOST_USER_VERSION | (this.replyAck ? VHOST_USER_NEED_REPLY_MASK : 0), true);
    view.setUint32(8, 0, true);
    try {
      if (native.sendMsg(this.fd, msg, 0, msg.length, []) !== msg.length) return Promise.resolve(false);
    } catch (err) {
      this.logger.warn(`backend channel: ${(err as Error).message}`);
      return Promise.resolve(false);
    }
    if (!this.replyAck) return Promise.resolve(true);
    return new Promise((resolve) => {
      const timer = setTimeout(() => this.settle(false), REPLY_TIMEOUT_MS);
      this.pending = { resolve, timer };
    });
  }

  private onReadable(): void {
    try {
      for (;;) {
        const { bytes, fds } = native.recvMsg(this.fd, this.replyBuf, this.got, this.replyBuf.length - this.got, 0);
        for (const fd of fds) native.close(fd);
        if (bytes < 0) return;
        if (bytes === 0) return this.close();
        this.got += bytes;
        if (this.got === this.replyBuf.length) {
          const view = new DataView(this.replyBuf.buffer);
          const ok = (view.getUint32(4, true) & VHOST_USER_REPLY_MASK) !== 0 && view.getBigUint64(HEADER_SIZE, true) === 0n;
          this.got = 0;
          this.settle(ok);
        }
      }
    } catch (err) {
      this.logger.warn(`backend channel closed: ${(err as Error).message}`);
      this.close();
    }
  }

  private settle(ok: boolean): void {
    if (this.pending === null) return;
    clearTimeout(this.pending.timer);
    this.pending.resolve(ok);
    this.pending = null;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.watcher.stop();
    this.settle(false);
    native.close(this.fd);
  }
}
