/**
 * The control socket against hostile and careless clients: every bad input gets its JSON-RPC error
 * code and the server keeps answering, on the same connection and on a new one; oversized lines close
 * only that client; clients run concurrently and one that leaves mid-request harms nobody.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

import test, { type ExecutionContext } from 'ava';

import { ControlError, RpcErrorCode, type ControlMethod, type RpcErrorObject } from '../../../lib/control/protocol';
import { MAX_LINE_BYTES, startControlServer } from '../../../lib/control/server';
import { ConfigError } from '../../../lib/errors';
import { silentLogger } from '../../../lib/runtime/logger';

interface Answer {
  jsonrpc: string;
  id: unknown;
  result?: unknown;
  error?: RpcErrorObject;
}

/** The `text` an `echo` call answered. */
function echoed(answer: Answer | null): unknown {
  return (answer?.result as { text?: unknown } | undefined)?.text;
}

/** A line-oriented raw client: send bytes, read answers one line at a time. */
class RawClient {
  private buffered = '';
  private readonly lines: string[] = [];
  private waiting: ((line: string | null) => void) | null = null;
  ended = false;
  readonly closed: Promise<void>;

  constructor(readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (text: string) => {
      this.buffered += text;
      for (let nl = this.buffered.indexOf('\n'); nl >= 0; nl = this.buffered.indexOf('\n')) {
        this.lines.push(this.buffered.slice(0, nl));
        this.buffered = this.buffered.slice(nl + 1);
      }
      this.wake();
    });
    socket.on('error', () => {});
    this.closed = new Promise((resolve) =>
      socket.once('close', () => {
        this.ended = true;
        this.wake();
        resolve();
      }),
    );
  }

  static async connect(socketPath: string): Promise<RawClient> {
    const socket = net.connect(socketPath);
    await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    return new RawClient(socket);
  }

  private wake(): void {
    if (this.waiting === null) return;
    if (this.lines.length > 0) this.waiting(this.lines.shift()!);
    else if (this.ended) this.waiting(null);
    else return;
    this.waiting = null;
  }

  send(data: string | Uint8Array): void {
    this.socket.write(data);
  }

  /** The next answer, parsed; null when the server closed the connection first. */
  next(timeoutMs = 5000): Promise<Answer | null> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no answer')), timeoutMs);
      this.waiting = (line) => {
        clearTimeout(timer);
        resolve(line === null ? null : (JSON.parse(line) as Answer));
      };
      this.wake();
    });
  }

  async call(method: string, params?: unknown, id: number | string = 1): Promise<Answer | null> {
    this.send(`${JSON.stringify({ jsonrpc: '2.0', id, method, params })}\n`);
    return this.next();
  }

  close(): void {
    this.socket.destroy();
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Methods with every kind of behaviour the dispatcher must handle. */
function testMethods(calls: string[]): Record<string, ControlMethod> {
  return {
    echo: {
      description: 'Answer the params',
      params: {
        text: { type: 'string', description: 'text', required: true },
        count: { type: 'integer', description: 'a number', min: 1, max: 10 },
        loud: { type: 'boolean', description: 'a flag' },
        mode: { type: 'string', description: 'a choice', choices: ['a', 'b'] },
      },
      call: (params) => params,
    },
    sleep: {
      description: 'Answer after ms',
      params: { ms: { type: 'integer', description: 'delay', min: 0, max: 5000 } },
      call: async (params) => {
        await sleep(params.ms as number);
        calls.push(`slept ${String(params.ms)}`);
        return { slept: params.ms };
      },
    },
    record: {
      description: 'Remember that it ran',
      params: { note: { type: 'string', description: 'what to remember' } },
      call: (params) => {
        calls.push(String(params.note));
        return calls.length;
      },
    },
    fail: {
      description: 'Throw',
      params: { how: { type: 'string', description: 'which error', choices: ['plain', 'config', 'refuse'], required: true } },
      call: (params) => {
        if (params.how === 'config') throw new ConfigError('CONFIG_INVALID', 'the image is gone');
        if (params.how === 'refuse') throw new ControlError(RpcErrorCode.INVALID_PARAMS, 'not now');
        throw new Error('boom');
      },
    },
    bigint: { description: 'A result JSON cannot carry', call: () => ({ features: 1n }) },
  };
}

async function startServer(t: ExecutionContext): Promise<{ socketPath: string; calls: string[] }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-control-'));
  const socketPath = path.join(dir, 'control.sock');
  const calls: string[] = [];
  const server = await startControlServer({ path: socketPath, device: 'test', methods: testMethods(calls), logger: silentLogger });
  t.teardown(async () => {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return { socketPath, calls };
}

const request = (fields: Record<string, unknown>) => `${JSON.stringify({ jsonrpc: '2.0', id: 9, ...fields })}\n`;

const badInputs: { name: string; line: string | Uint8Array; code: number; id?: unknown }[] = [
  { name: 'not JSON', line: '{"jsonrpc":"2.0",\n', code: RpcErrorCode.PARSE_ERROR, id: null },
  { name: 'invalid UTF-8', line: Buffer.from([...Buffer.from('{"jsonrpc":"2.0","id":1,"method":"ech'), 0xc3, 0x28, ...Buffer.from('"}\n')]), code: RpcErrorCode.PARSE_ERROR, id: null },
  { name: 'a batch array', line: `[${request({ method: 'echo' }).trim()}]\n`, code: RpcErrorCode.INVALID_REQUEST, id: null },
  { name: 'an empty batch', line: '[]\n', code: RpcErrorCode.INVALID_REQUEST, id: null },
  { name: 'a number', line: '42\n', code: RpcErrorCode.INVALID_REQUEST, id: null },
  { name: 'null', line: 'null\n', code: RpcErrorCode.INVALID_REQUEST, id: null },
  { name: 'no id and a bad method (invalid, so not a notification)', line: '{"jsonrpc":"2.0","method":1}\n', code: RpcErrorCode.INVALID_REQUEST, id: null },
  { name: 'jsonrpc 1.0', line: request({ jsonrpc: '1.0', method: 'echo' }), code: RpcErrorCode.INVALID_REQUEST, id: 9 },
  { name: 'no method', line: request({}), code: RpcErrorCode.INVALID_REQUEST, id: 9 },
  { name: 'a method that is not a string', line: request({ method: 7 }), code: RpcErrorCode.INVALID_REQUEST, id: 9 },
  { name: 'an object id', line: request({ id: {}, method: 'echo' }), code: RpcErrorCode.INVALID_REQUEST, id: null },
  { name: 'params neither object nor array', line: request({ method: 'echo', params: 'x' }), code: RpcErrorCode.INVALID_REQUEST, id: 9 },
  { name: 'an unknown method', line: request({ method: 'format-disk' }), code: RpcErrorCode.METHOD_NOT_FOUND, id: 9 },
  { name: 'an inherited property as method', line: request({ method: 'toString' }), code: RpcErrorCode.METHOD_NOT_FOUND, id: 9 },
  { name: 'params by position', line: request({ method: 'echo', params: ['hi'] }), code: RpcErrorCode.INVALID_PARAMS, id: 9 },
  { name: 'a missing required param', line: request({ method: 'echo', params: {} }), code: RpcErrorCode.INVALID_PARAMS, id: 9 },
  { name: 'an unknown param', line: request({ method: 'echo', params: { text: 'a', colour: 'red' } }), code: RpcErrorCode.INVALID_PARAMS, id: 9 },
  { name: 'a string for an integer', line: request({ method: 'echo', params: { text: 'a', count: '3' } }), code: RpcErrorCode.INVALID_PARAMS, id: 9 },
  { name: 'a fraction for an integer', line: request({ method: 'echo', params: { text: 'a', count: 2.5 } }), code: RpcErrorCode.INVALID_PARAMS, id: 9 },
  { name: 'an integer out of range', line: request({ method: 'echo', params: { text: 'a', count: 11 } }), code: RpcErrorCode.INVALID_PARAMS, id: 9 },
  { name: 'a number for a boolean', line: request({ method: 'echo', params: { text: 'a', loud: 1 } }), code: RpcErrorCode.INVALID_PARAMS, id: 9 },
  { name: 'a value outside the choices', line: request({ method: 'echo', params: { text: 'a', mode: 'c' } }), code: RpcErrorCode.INVALID_PARAMS, id: 9 },
  { name: 'another device', line: request({ method: 'echo', params: { text: 'a', device: 'net0' } }), code: RpcErrorCode.INVALID_PARAMS, id: 9 },
  { name: 'a method that throws', line: request({ method: 'fail', params: { how: 'plain' } }), code: RpcErrorCode.INTERNAL_ERROR, id: 9 },
  { name: 'a method that refuses', line: request({ method: 'fail', params: { how: 'refuse' } }), code: RpcErrorCode.INVALID_PARAMS, id: 9 },
  { name: 'a result JSON cannot carry', line: request({ method: 'bigint' }), code: RpcErrorCode.INTERNAL_ERROR, id: 9 },
];

test('every bad input gets its JSON-RPC error, and the same and a new connection go on', async (t) => {
  const { socketPath } = await startServer(t);
  const client = await RawClient.connect(socketPath);
  t.teardown(() => client.close());
  for (const bad of badInputs) {
    client.send(bad.line);
    const answer = await client.next();
    t.is(answer?.error?.code, bad.code, `${bad.name}: ${JSON.stringify(answer)}`);
    t.is(typeof answer?.error?.message, 'string', bad.name);
    t.deepEqual(answer?.id, bad.id, `${bad.name}: id`);
    t.is(answer?.jsonrpc, '2.0', bad.name);
    const after = await client.call('echo', { text: bad.name }, 'next');
    t.deepEqual(after, { jsonrpc: '2.0', id: 'next', result: { text: bad.name } }, `after ${bad.name}: the same connection answers`);
    const fresh = await RawClient.connect(socketPath);
    t.is(echoed(await fresh.call('echo', { text: 'fresh' })), 'fresh', `after ${bad.name}: a new connection answers`);
    fresh.close();
  }
});

test('a failure with a stable code carries it in error.data', async (t) => {
  const { socketPath } = await startServer(t);
  const client = await RawClient.connect(socketPath);
  t.teardown(() => client.close());
  const answer = await client.call('fail', { how: 'config' });
  t.is(answer?.error?.code, RpcErrorCode.INTERNAL_ERROR);
  t.deepEqual(answer?.error?.data, { code: 'CONFIG_INVALID' });
});

test('params: all valid kinds pass, the device param is accepted when it names this device', async (t) => {
  const { socketPath } = await startServer(t);
  const client = await RawClient.connect(socketPath);
  t.teardown(() => client.close());
  const answer = await client.call('echo', { text: 'x', count: 10, loud: false, mode: 'b', device: 'test' });
  t.deepEqual(answer?.result, { text: 'x', count: 10, loud: false, mode: 'b' }, 'the device param is consumed by the server');
  const listing = (await client.call('methods'))?.result as Record<string, { params: Record<string, { type: string }> }>;
  t.deepEqual(Object.keys(listing).sort(), ['bigint', 'echo', 'fail', 'methods', 'record', 'sleep']);
  t.is(listing.echo?.params.device?.type, 'string', 'every method lists the device param');
});

test('a line longer than the limit gets -32600 and closes only that client', async (t) => {
  const { socketPath } = await startServer(t);
  const other = await RawClient.connect(socketPath);
  t.teardown(() => other.close());
  const greedy = await RawClient.connect(socketPath);
  greedy.send(`{"jsonrpc":"2.0","id":1,"method":"echo","params":{"text":"${'x'.repeat(MAX_LINE_BYTES)}"}}\n`);
  const answer = await greedy.next();
  t.is(answer?.error?.code, RpcErrorCode.INVALID_REQUEST);
  t.is(answer?.id, null);
  t.is(await greedy.next(), null, 'then the server closes the connection');
  await greedy.closed;
  t.is(echoed(await other.call('echo', { text: 'still here' })), 'still here');
});

test('a line that never ends is cut off at the limit', async (t) => {
  const { socketPath } = await startServer(t);
  const endless = await RawClient.connect(socketPath);
  t.teardown(() => endless.close());
  let cutOff = false;
  const answered = endless.next().finally(() => (cutOff = true));
  endless.send('{"jsonrpc":"2.0","id":1,"method":"echo","params":{"text":"');
  // A trickle of chunks without a newline, until the server answers.
  for (let sent = 0; sent <= 2 * MAX_LINE_BYTES && !cutOff; sent += 4096) {
    endless.send('y'.repeat(4096));
    await sleep(1);
  }
  t.is((await answered)?.error?.code, RpcErrorCode.INVALID_REQUEST);
  await endless.closed;
  const fresh = await RawClient.connect(socketPath);
  t.is(echoed(await fresh.call('echo', { text: 'ok' })), 'ok');
  fresh.close();
});

test('a last request without a newline is answered when the client closes its side', async (t) => {
  const { socketPath } = await startServer(t);
  const client = await RawClient.connect(socketPath);
  t.teardown(() => client.close());
  client.socket.end('{"jsonrpc":"2.0","id":7,"method":"echo","params":{"text":"bye"}}');
  t.deepEqual(await client.next(), { jsonrpc: '2.0', id: 7, result: { text: 'bye' } });
  t.is(await client.next(), null);
});

test('notifications run without an answer; blank lines are ignored', async (t) => {
  const { socketPath, calls } = await startServer(t);
  const client = await RawClient.connect(socketPath);
  t.teardown(() => client.close());
  client.send('{"jsonrpc":"2.0","method":"record","params":{"note":"quiet"}}\n\n  \r\n');
  client.send('{"jsonrpc":"2.0","method":"no-such-method"}\n');
  const answer = await client.call('record', { note: 'loud' }, 2);
  t.deepEqual(answer, { jsonrpc: '2.0', id: 2, result: 2 }, 'the first answer is the request, not the notifications');
  t.deepEqual(calls, ['quiet', 'loud']);
});

test('one connection is answered in order; a slow client does not hold up another', async (t) => {
  const { socketPath } = await startServer(t);
  const slow = await RawClient.connect(socketPath);
  const quick = await RawClient.connect(socketPath);
  t.teardown(() => {
    slow.close();
    quick.close();
  });
  slow.send(request({ id: 1, method: 'sleep', params: { ms: 300 } }) + request({ id: 2, method: 'echo', params: { text: 'second' } }));
  const started = Date.now();
  t.is(echoed(await quick.call('echo', { text: 'quick' })), 'quick');
  t.true(Date.now() - started < 250, 'the other connection answered while the slow method ran');
  t.is((await slow.next())?.id, 1, 'answers come in request order');
  t.is((await slow.next())?.id, 2);
});

test('many clients at once each get their own answers', async (t) => {
  const { socketPath } = await startServer(t);
  const clients = await Promise.all(Array.from({ length: 20 }, () => RawClient.connect(socketPath)));
  t.teardown(() => clients.forEach((c) => c.close()));
  // Every client sends 10 requests in one write; all are in flight together.
  clients.forEach((c, i) => c.send(Array.from({ length: 10 }, (_, j) => request({ id: j, method: 'echo', params: { text: `${i}.${j}` } })).join('')));
  await Promise.all(
    clients.map(async (c, i) => {
      for (let j = 0; j < 10; j++) t.deepEqual(await c.next(), { jsonrpc: '2.0', id: j, result: { text: `${i}.${j}` } });
    }),
  );
});

test('a client that disconnects mid-request harms nobody', async (t) => {
  const { socketPath, calls } = await startServer(t);
  const leaver = await RawClient.connect(socketPath);
  leaver.send(request({ method: 'sleep', params: { ms: 100 } }));
  await sleep(20);
  leaver.close();
  await sleep(200);
  t.deepEqual(calls, ['slept 100'], 'the method ran to its end');
  const client = await RawClient.connect(socketPath);
  t.is(echoed(await client.call('echo', { text: 'alive' })), 'alive');
  client.close();
});

test('a control fd that is not a listening socket is a config error', async (t) => {
  const err = await t.throwsAsync(startControlServer({ fd: 0, device: 'test', methods: {}, logger: silentLogger }), { instanceOf: ConfigError });
  t.is(err?.code, 'CONFIG_INVALID');
});
