/**
 * A client of the control socket (vhostctl, tests): one connection, requests answered by id, a
 * timeout per call, and every way it can fail as a ControlClientError with a stable code.
 */
import net from 'node:net';

import { VhostdError } from '../errors';
import type { RpcErrorObject } from './protocol';

export type ControlClientErrorCode =
  /** No socket file at the path. */
  | 'CONTROL_SOCKET_MISSING'
  /** A socket file, but nothing listens: the daemon is not running. */
  | 'CONTROL_NOT_RUNNING'
  | 'CONTROL_PERMISSION_DENIED'
  | 'CONTROL_CONNECT_FAILED'
  /** The daemon closed the connection before answering. */
  | 'CONTROL_CONNECTION_LOST'
  | 'CONTROL_TIMEOUT'
  /** The answer is not a JSON-RPC 2.0 response. */
  | 'CONTROL_BAD_RESPONSE'
  /** The daemon answered with a JSON-RPC error (`rpcError`). */
  | 'CONTROL_RPC_ERROR';

export class ControlClientError extends VhostdError<ControlClientErrorCode> {
  constructor(
    code: ControlClientErrorCode,
    message: string,
    readonly rpcError?: RpcErrorObject,
  ) {
    super(code, message);
  }
}

const CONNECT_ERRORS: Record<string, [ControlClientErrorCode, string]> = {
  ENOENT: ['CONTROL_SOCKET_MISSING', 'no control socket there (is the daemon started with --control PATH?)'],
  ECONNREFUSED: ['CONTROL_NOT_RUNNING', 'nothing listens there: the daemon is not running'],
  EACCES: ['CONTROL_PERMISSION_DENIED', 'permission denied (the socket is mode 0600, or 0660 with --socket-group)'],
};

interface Pending {
  resolve(result: unknown): void;
  reject(err: ControlClientError): void;
  timer: NodeJS.Timeout;
}

export class ControlClient {
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private buffered = '';
  private lost: ControlClientError | null = null;

  private constructor(
    private readonly socket: net.Socket,
    private readonly path: string,
    private readonly timeoutMs: number,
  ) {
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => this.receive(text));
    socket.on('error', (err) => this.fail(new ControlClientError('CONTROL_CONNECTION_LOST', `${path}: ${err.message}`)));
    socket.on('close', () => this.fail(new ControlClientError('CONTROL_CONNECTION_LOST', `${path}: the daemon closed the connection`)));
  }

  /** Connect to the control socket at `path`. */
  static connect(path: string, timeoutMs = 10_000): Promise<ControlClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect(path);
      socket.once('connect', () => {
        socket.removeAllListeners('error');
        resolve(new ControlClient(socket, path, timeoutMs));
      });
      socket.once('error', (err: NodeJS.ErrnoException) => {
        const [code, why] = CONNECT_ERRORS[err.code ?? ''] ?? ['CONTROL_CONNECT_FAILED', err.message];
        reject(new ControlClientError(code, `${path}: ${why}`));
      });
    });
  }

  /** Call `method`; resolves with its result, rejects with CONTROL_RPC_ERROR when the daemon refused. */
  call(method: string, params?: Record<string, unknown>): Promise<unknown> {
    if (this.lost !== null) return Promise.reject(this.lost);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new ControlClientError('CONTROL_TIMEOUT', `${this.path}: no answer to ${method} within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.socket.write(`${JSON.stringify({ jsonrpc: '2.0', id, method, params })}\n`);
    });
  }

  close(): void {
    this.socket.destroy();
  }

  private receive(text: string): void {
    this.buffered += text;
    for (let newline = this.buffered.indexOf('\n'); newline >= 0; newline = this.buffered.indexOf('\n')) {
      const line = this.buffered.slice(0, newline);
      this.buffered = this.buffered.slice(newline + 1);
      let response: { id?: unknown; result?: unknown; error?: RpcErrorObject };
      try {
        response = JSON.parse(line) as typeof response;
      } catch {
        this.fail(new ControlClientError('CONTROL_BAD_RESPONSE', `${this.path}: answer is not JSON: ${line.slice(0, 80)}`));
        return;
      }
      const waiting = typeof response.id === 'number' ? this.pending.get(response.id) : undefined;
      if (waiting === undefined) {
        // id null: the daemon could not read a request; nothing sent by this client is malformed.
        this.fail(new ControlClientError('CONTROL_BAD_RESPONSE', `${this.path}: unexpected answer ${line.slice(0, 200)}`, response.error));
        return;
      }
      this.pending.delete(response.id as number);
      clearTimeout(waiting.timer);
      if (response.error !== undefined) {
        const { code, message } = response.error;
        waiting.reject(new ControlClientError('CONTROL_RPC_ERROR', `${message} (JSON-RPC error ${code})`, response.error));
      } else {
        waiting.resolve(response.result);
      }
    }
  }

  private fail(err: ControlClientError): void {
    this.lost ??= err;
    for (const waiting of this.pending.values()) {
      clearTimeout(waiting.timer);
      waiting.reject(err);
    }
    this.pending.clear();
    this.socket.destroy();
  }
}
