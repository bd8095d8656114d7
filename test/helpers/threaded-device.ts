/**
 * A daemon's device served with its queues in worker threads (`--threads`), as the daemon's
 * `<dev>QueueWorkers(config)` sets them up, a test front-end connected with its queues running, and
 * the registry GET /metrics answers from (createDaemonMetrics). Everything is released at teardown.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { ExecutionContext } from 'ava';
import type { Registry } from 'prom-client';

import { createDaemonMetrics } from '../../lib/metrics/registry';
import type { QueueWorkerOptions } from '../../lib/runtime/queue-workers';
import type { DeviceBackend } from '../../lib/vhost-user/device-backend';
import { TestServer } from '../lib/vhost-user/harness';
import type { Frontend } from './frontend';
import { Scrape } from './scrape';

export interface ThreadedSession {
  ts: TestServer;
  fe: Frontend;
  registry: Registry;
  /** What GET /metrics answers now. */
  scrape(): Promise<Scrape>;
}

export interface ThreadedOptions {
  /** Virtio features the front-end accepts; default every one offered. */
  features?: bigint;
  /** Queues set up, 0 to queues - 1 (ring of queue q in region q % 2). */
  queues: number;
  queueSize?: number;
}

/** A temporary directory, removed at teardown. */
export function tempDir(t: ExecutionContext, prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vhostd-${prefix}-`));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Serve `device` with `workers`, connect, negotiate (EVENT_IDX, indirect), map memory and start the queues. */
export async function serveWithThreads(
  t: ExecutionContext,
  device: DeviceBackend & { close(): unknown },
  workers: QueueWorkerOptions | undefined,
  options: ThreadedOptions,
): Promise<ThreadedSession> {
  t.truthy(workers, 'the config asks for worker threads');
  const ts = await TestServer.start(device, { queueWorkers: workers });
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
    device.close();
  });
  await fe.negotiate({ features: options.features ?? (1n << 64n) - 1n, eventIdx: true, indirect: true });
  await fe.setMemTable();
  for (let q = 0; q < options.queues; q++) await fe.setupQueue(q, options.queueSize ?? 128, { ringRegion: q % 2 });
  const registry = createDaemonMetrics(ts.server);
  return { ts, fe, registry, scrape: () => Scrape.of(registry) };
}
