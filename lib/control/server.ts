/**
 * The control socket: JSON-RPC 2.0 over a unix stream socket, one JSON object per line (`\n`), for
 * operators and vhostctl. Plain node:net (nothing here carries fds).
 *
 * Every bad input gets a JSON-RPC error and the connection goes on: invalid UTF-8 or JSON (-32700), a
 * non-request or a batch array (-32600), an unknown method (-32601), bad params (-32602), a method that
 * fails (-32603 or the method's own code). A line longer than the limit (also one that never ends) gets
 * -32600 and then that client is closed, since the rest of its stream cannot be framed. Requests of one
 * connection are answered in order; connections are independent. Notifications (no `id`) run without
 * a reply (JSON-RPC 2.0 §4.1).
 */
import fs from 'node:fs';
import net from 'node:net';

import { native } from '../../native';
import { ConfigError, VhostdError } from '../errors';
import type { Logger } from '../runtime/logger';
import { listenPrivateUnixSocket } from '../runtime/private-socket';
import { checkParams, ControlError, DEVICE_PARAM, RpcErrorCode, type ControlMethod, type RpcErrorObject } from './protocol';

/** Longest request line; a client sending more without a newline is answered and closed. */
export const MAX_LINE_BYTES = 64 * 1024;
/** How long a client told to go may keep sending before it is cut off. */
const CLOSE_GRACE_MS = 2000;
/** Clients connected at once; more are closed at accept. */
const MAX_CLIENTS = 32;

export interface ControlServerOptions {
  /** Listen on this path (created mode 0600, or 0660 with `group`; a stale socket file is replaced). */
  path?: string;
  group?: number;
  /** Or use this inherited listening unix socket (`--control-fd`, socket activation). */
  fd?: number;
  /** Name of the device the methods act on (`status`'s `device`, the `device` param). */
  device: string;
  methods: Record<string, ControlMethod>;
  logger: Logger;
}

export interface ControlServer {
  /** Stop listening, drop the clients, remove the socket file it created. */
  close(): Promise<void>;
}

type RequestId = string | number | null;

interface Response {
  jsonrpc: '2.0';
  id: RequestId;
  result?: unknown;
  error?: RpcErrorObject;
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

class RequestFailure extends Error {
  constructor(
    readonly id: RequestId,
    readonly error: RpcErrorObject,
  ) {
    super(error.message);
  }
}

function isRequestId(id: unknown): id is RequestId {
  return id === null || typeof id === 'string' || (typeof id === 'number' && Number.isFinite(id));
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

export class ControlDispatcher {
  private readonly methods: Record<string, ControlMethod>;

  constructor(
    private readonly device: string,
    methods: Record<string, ControlMethod>,
  ) {
    if (Object.hasOwn(methods, 'methods')) throw new Error('control method "methods" is built in');
    this.methods = {
      ...methods,
      methods: {
        description: 'List the methods with their params',
        call: () =>
          Object.fromEntries(
            Object.entries(this.methods).map(([name, m]) => [name, { description: m.description, params: { ...m.params, device: DEVICE_PARAM } }]),
          ),
      },
    };
  }

  /** Answer one line (without its newline) with a serialized response; undefined for a notification or a blank line. */
  async handleLine(line: Uint8Array): Promise<string | undefined> {
    const response = await this.respond(line);
    if (response === undefined) return undefined;
    try {
      return JSON.stringify(response);
    } catch (err) {
      // A result JSON cannot carry (a bigint, a cycle) is this request's error.
      return JSON.stringify({ jsonrpc: '2.0', id: response.id, error: { code: RpcErrorCode.INTERNAL_ERROR, message: `result: ${(err as Error).message}` } });
    }
  }

  private async respond(line: Uint8Array): Promise<Response | undefined> {
    let id: RequestId = null;
    let notification = false;
    try {
      let text: string;
      let request: unknown;
      try {
        text = utf8.decode(line);
        if (text.trim() === '') return undefined;
        request = JSON.parse(text);
      } catch (err) {
        throw new RequestFailure(null, { code: RpcErrorCode.PARSE_ERROR, message: `not a JSON text: ${(err as Error).message}` });
      }
      if (Array.isArray(request)) throw new RequestFailure(null, { code: RpcErrorCode.INVALID_REQUEST, message: 'batches are not supported: send one request per line' });
      if (!isPlainObject(request)) throw new RequestFailure(null, { code: RpcErrorCode.INVALID_REQUEST, message: 'a request is a JSON object' });
      if (!isRequestId(request.id) && request.id !== undefined) {
        throw new RequestFailure(null, { code: RpcErrorCode.INVALID_REQUEST, message: 'id must be a string, a number or null' });
      }
      notification = !Object.hasOwn(request, 'id');
      id = (request.id as RequestId | undefined) ?? null;
      if (request.jsonrpc !== '2.0') throw new RequestFailure(id, { code: RpcErrorCode.INVALID_REQUEST, message: 'jsonrpc must be "2.0"' });
      if (typeof request.method !== 'string') throw new RequestFailure(id, { code: RpcErrorCode.INVALID_REQUEST, message: 'method must be a string' });
      const method = Object.hasOwn(this.methods, request.method) ? this.methods[request.method]! : undefined;
      if (method === undefined) {
        throw new RequestFailure(id, {
          code: RpcErrorCode.METHOD_NOT_FOUND,
          message: `no method "${request.method}"; known: ${Object.keys(this.methods).join(', ')}`,
        });
      }
      const params = request.params ?? {};
      if (Array.isArray(params)) throw new RequestFailure(id, { code: RpcErrorCode.INVALID_PARAMS, message: 'params by position are not supported: pass an object' });
      if (!isPlainObject(params)) throw new RequestFailure(id, { code: RpcErrorCode.INVALID_REQUEST, message: 'params must be an object' });
      const result = await this.call(method, params);
      return notification ? undefined : { jsonrpc: '2.0', id, result: result ?? null };
    } catch (err) {
      if (err instanceof RequestFailure) {
        // A notification gets no answer, but a line that is not a valid request is not a notification
        // (JSON-RPC 2.0 §5: Invalid Request is answered with id null).
        const malformed = err.error.code === RpcErrorCode.PARSE_ERROR || err.error.code === RpcErrorCode.INVALID_REQUEST;
        return notification && !malformed ? undefined : { jsonrpc: '2.0', id: err.id, error: err.error };
      }
      if (notification) return undefined;
      if (err instanceof ControlError) return { jsonrpc: '2.0', id, error: { code: err.code, message: err.message } };
      const error: RpcErrorObject = { code: RpcErrorCode.INTERNAL_ERROR, message: (err as Error).message };
      if (err instanceof VhostdError) error.data = { code: err.code };
      return { jsonrpc: '2.0', id, error };
    }
  }

  private async call(method: ControlMethod, params: Record<string, unknown>): Promise<unknown> {
    checkParams({ ...method.params, device: DEVICE_PARAM }, params);
    const { device, ...own } = params;
    if (device !== undefined && device !== this.device) {
      throw new ControlError(RpcErrorCode.INVALID_PARAMS, `no device "${String(device)}" here: this daemon serves "${this.device}"`);
    }
    return method.call(own);
  }
}

/** Frame one client's byte stream into lines and answer them in order. */
function serveClient(socket: net.Socket, dispatcher: ControlDispatcher, logger: Logger): void {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  let answered: Promise<void> = Promise.resolve();
  let done = false;

  const send = (response: string | undefined) => {
    if (response !== undefined && socket.writable) socket.write(`${response}\n`);
  };
  const enqueue = (line: Buffer) => {
    answered = answered.then(() => dispatcher.handleLine(line)).then(send);
  };
  // Stop reading requests, answer the last, close our side. What the client still sends is read and
  // dropped until it closes too (or the grace time is over): closing with unread data would reset the
  // connection, and the client might lose the answer.
  const finish = (response?: string) => {
    done = true;
    answered = answered.then(() => {
      send(response);
      socket.end();
      const timer = setTimeout(() => socket.destroy(), CLOSE_GRACE_MS).unref();
      socket.once('close', () => clearTimeout(timer));
    });
  };

  socket.on('data', (chunk: Buffer) => {
    if (done) return;
    let start = 0;
    let tooLong = false;
    for (let newline = chunk.indexOf(0x0a); newline >= 0 && !tooLong; newline = chunk.indexOf(0x0a, start)) {
      const part = chunk.subarray(start, newline);
      start = newline + 1;
      tooLong = pendingBytes + part.length > MAX_LINE_BYTES;
      if (!tooLong) enqueue(pending.length === 0 ? part : Buffer.concat([...pending, part]));
      pending = [];
      pendingBytes = 0;
    }
    const rest = chunk.subarray(start);
    if (tooLong || pendingBytes + rest.length > MAX_LINE_BYTES) {
      logger.warn('control client sent a line longer than the limit; closing it', { limit: MAX_LINE_BYTES });
      const error = { code: RpcErrorCode.INVALID_REQUEST, message: `request line longer than ${MAX_LINE_BYTES} bytes` };
      finish(JSON.stringify({ jsonrpc: '2.0', id: null, error }));
      return;
    }
    if (rest.length > 0) {
      pending.push(rest);
      pendingBytes += rest.length;
    }
  });
  // The client closed its side: a last line without a newline is still a request, then we close ours.
  socket.on('end', () => {
    if (done) return;
    if (pendingBytes > 0) enqueue(Buffer.concat(pending));
    finish();
  });
  // A client that goes away mid-request: its answer is dropped (send checks `writable`).
  socket.on('error', (err) => logger.debug(`control client: ${err.message}`));
}

/** Listen on the control socket and serve `methods`. Throws ConfigError when the socket cannot be set up. */
export async function startControlServer(options: ControlServerOptions): Promise<ControlServer> {
  const dispatcher = new ControlDispatcher(options.device, options.methods);
  let fd: number;
  if (options.path !== undefined) {
    fd = listenPrivateUnixSocket(options.path, MAX_CLIENTS, options.group);
  } else if (options.fd !== undefined && native.isListeningUnixSocket(options.fd)) {
    fd = options.fd;
  } else {
    throw new ConfigError('CONFIG_INVALID', `control fd ${String(options.fd)} is not a listening unix stream socket`);
  }
  const clients = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    clients.add(socket);
    socket.once('close', () => clients.delete(socket));
    serveClient(socket, dispatcher, options.logger);
  });
  server.maxConnections = MAX_CLIENTS;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ fd }, () => resolve());
  });
  server.on('error', (err) => options.logger.error(`control socket: ${err.message}`));
  server.unref();
  return {
    close: async () => {
      for (const socket of clients) socket.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      if (options.path !== undefined) fs.rmSync(options.path, { force: true });
    },
  };
}
