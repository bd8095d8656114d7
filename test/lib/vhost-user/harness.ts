/**
 * Shared setup for the vhost-user protocol tests: an in-process server on a temporary socket with a
 * capturing logger, a queue of its 'disconnect' events, and the "does it still serve?" check that
 * every hostile-input row ends with.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import v8 from 'node:v8';
import { runInNewContext } from 'node:vm';

import type { ExecutionContext } from 'ava';

import type { LogFields, Logger } from '../../../lib/runtime/logger';
import { serve, type ServeOptions, type VhostUserServer } from '../../../lib/runtime/serve';
import type { DeviceBackend } from '../../../lib/vhost-user/device-backend';
import { DEFAULT_LAYOUT, DEFAULT_TIMEOUT_MS, Frontend, FrontendError, type NegotiateOptions } from '../../helpers/frontend';
import { transform } from '../../helpers/test-device';

export interface DisconnectEvent {
  code?: string;
  request?: string;
}

export interface LogEntry {
  level: string;
  message: string;
  fields?: LogFields;
}

let serial = 0;

export class TestServer {
  readonly disconnects: DisconnectEvent[] = [];
  readonly logs: LogEntry[] = [];
  connections = 0;
  private wake: (() => void) | null = null;
  server!: VhostUserServer;

  private constructor(
    readonly device: DeviceBackend,
    readonly socketPath: string,
  ) {}

  static async start(device: DeviceBackend, extra: Omit<ServeOptions, 'socketPath' | 'logger'> = {}): Promise<TestServer> {
    const socketPath = path.join(os.tmpdir(), `vhostd-test-${process.pid}-${serial++}.sock`);
    const ts = new TestServer(device, socketPath);
    const log =
      (level: string) =>
      (message: string, fields?: LogFields): void => {
        // Keep what tests look at (problems, coded events, a worker TestDevice's hook calls), not the
        // per-connection chatter, so that long runs do not grow the heap.
        if (level !== 'info' || fields?.code !== undefined || fields?.call !== undefined) ts.logs.push({ level, message, fields });
      };
    const logger: Logger = { debug: () => undefined, info: log('info'), warn: log('warn'), error: log('error') };
    ts.server = await serve(device, { ...extra, socketPath, logger });
    ts.server.on('disconnect', (info: DisconnectEvent) => {
      ts.disconnects.push({ ...info });
      ts.wake?.();
    });
    ts.server.on('connection', () => ts.connections++);
    return ts;
  }

  connect(): Frontend {
    return Frontend.connect(this.socketPath);
  }

  /** The next 'disconnect' event (waits up to `timeoutMs`). */
  async nextDisconnect(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<DisconnectEvent> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const ev = this.disconnects.shift();
      if (ev !== undefined) return ev;
      const left = deadline - Date.now();
      if (left <= 0) throw new FrontendError('FRONTEND_TIMEOUT', `the server reported no disconnect within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          this.wake = null;
          resolve();
        };
      });
    }
  }

  /**
   * Wait until no front-end is attached and forget earlier events, so that a test that failed midway
   * does not leave its disconnect for the next one.
   */
  async idle(timeoutMs = DEFAULT_TIMEOUT_MS): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.server.connected && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
    this.disconnects.length = 0;
  }

  /** Log entries carrying `code`. */
  logged(code: string): LogEntry[] {
    return this.logs.filter((e) => e.fields?.code === code);
  }

  async close(): Promise<void> {
    await this.server.close();
    fs.rmSync(this.socketPath, { force: true });
  }
}

/** Deterministic bytes (xorshift), so failures reproduce. */
export function pattern(length: number, seed: number): Uint8Array {
  const out = new Uint8Array(length);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out[i] = x & 0xff;
  }
  return out;
}

export function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** The front-end's guess at what the device wrote for a chain: the transform, cut to the writable size. */
export function expectedOutput(queue: number, readable: readonly Uint8Array[], writable: number): Uint8Array {
  const out = transform(queue, concat(readable));
  return out.subarray(0, Math.min(out.length, writable));
}

/** A full garbage collection (with or without --expose-gc), before measuring memory. */
export function collectGarbage(): void {
  const exposed = (globalThis as { gc?: () => void }).gc;
  if (exposed !== undefined) return exposed();
  v8.setFlagsFromString('--expose-gc');
  (runInNewContext('gc') as () => void)();
}

/** Number of open fds of this process, or of process `pid`. */
export function openFds(pid: number | 'self' = 'self'): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

/**
 * Wait until the open fd count (of this process or of `pid`) is back to `baseline` (releases can
 * trail the disconnect event by a turn of the event loop); returns the last count seen.
 */
export async function settleFds(baseline: number, timeoutMs = 2000, pid: number | 'self' = 'self'): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  let n = openFds(pid);
  while (n !== baseline && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 10));
    n = openFds(pid);
  }
  return n;
}

/**
 * Connect a correct front-end, set up queue 0 and move one chain through it, then hang up.
 * Asserts the bytes came back transformed and the disconnect was clean.
 */
export async function assertServes(t: ExecutionContext, ts: TestServer, negotiate: NegotiateOptions = {}): Promise<void> {
  const fe = ts.connect();
  try {
    await fe.negotiate(negotiate);
    await fe.setMemTable(DEFAULT_LAYOUT);
    await fe.setupQueue(0, 16);
    const data = pattern(100, 7);
    const done = await fe.transfer(0, { readable: [{ data, region: 1 }], writable: [{ length: 128, region: 2 }] });
    t.is(done.len, 100, 'a fresh front-end gets its chain back');
    t.deepEqual(done.written, expectedOutput(0, [data], 128));
  } finally {
    fe.close();
  }
  const ev = await ts.nextDisconnect();
  t.is(ev.code, undefined, 'a clean hang-up is not reported as a violation');
}
