/**
 * The rng device behind the real protocol engine, driven by the test front-end: source failures are
 * retried without losing the request, the rate limit splits and delays requests but drops none,
 * and a missing source is a clear start-up error.
 */
import { spawnSync } from 'node:child_process';
import path from 'node:path';

import test from 'ava';

import { RngDevice } from '../../../daemons/rng/device';
import type { EntropySource } from '../../../daemons/rng/entropy-source';
import type { Logger } from '../../../lib/runtime/logger';
import { daemonEnv } from '../../helpers/daemon';
import { TestServer } from '../../lib/vhost-user/harness';

/** A source that fails its first `failures` reads with EIO, then returns 0x5a bytes. */
class FlakySource implements EntropySource {
  readonly name = 'flaky';
  readonly synchronous = false;
  reads = 0;
  constructor(private failures: number) {}
  fillSync(): void {
    throw new Error('asynchronous only');
  }
  fill(view: Uint8Array, offset: number, length: number, done: (err: Error | null, bytes: number) => void): void {
    this.reads++;
    setImmediate(() => {
      if (this.failures > 0) {
        this.failures--;
        done(Object.assign(new Error('EIO: i/o error, read'), { code: 'EIO' }), 0);
        return;
      }
      view.fill(0x5a, offset, offset + length);
      done(null, length);
    });
  }
  close(): void {}
}

function capture(): { logger: Logger; errors: string[] } {
  const errors: string[] = [];
  const none = () => undefined;
  return { logger: { debug: none, info: none, warn: none, error: (m) => errors.push(m) }, errors };
}

test('a failing source is logged once and the request is retried until it succeeds', async (t) => {
  const { logger, errors } = capture();
  const source = new FlakySource(2);
  const ts = await TestServer.start(new RngDevice({ source, queueSize: 64, logger }));
  const fe = ts.connect();
  try {
    await fe.negotiate();
    await fe.setMemTable();
    await fe.setupQueue(0, 16);
    const done = await fe.transfer(0, { writable: [{ length: 32 }] }, 10_000);
    t.is(done.len, 32);
    t.deepEqual(done.written, new Uint8Array(32).fill(0x5a));
    t.is(source.reads, 3, 'two failed reads, then the one that worked');
    t.is(errors.length, 1, `one log line for a repeated failure: ${errors.join(' | ')}`);
    t.regex(errors[0] ?? '', /entropy source flaky: EIO/);
  } finally {
    fe.close();
    await ts.close();
  }
});

test('the rate limit splits and delays requests but completes every one', async (t) => {
  const { logger } = capture();
  const { GetrandomSource } = await import('../../../daemons/rng/entropy-source');
  const ts = await TestServer.start(
    new RngDevice({ source: new GetrandomSource(), rateLimit: { maxBytes: 100, periodMs: 100 }, queueSize: 64, logger }),
  );
  const fe = ts.connect();
  try {
    await fe.negotiate();
    await fe.setMemTable();
    await fe.setupQueue(0, 16);
    fe.submit(0, [{ writable: [{ length: 64 }] }, { writable: [{ length: 64 }] }, { writable: [{ length: 64 }] }]);
    const lens = (await fe.collect(0, 3, 10_000)).map((c) => c.len);
    t.deepEqual(lens, [64, 36, 64], 'the second request gets the rest of the quota, the third waits for the next period');
  } finally {
    fe.close();
    await ts.close();
  }
});

test('a missing --source is a one-line error and exit status 1', (t) => {
  const main = path.resolve(__dirname, '..', '..', '..', 'daemons', 'rng', 'main.js');
  const result = spawnSync(process.execPath, [main, '--socket-path', '/tmp/unused-rng.sock', '--source', '/nonexistent/hwrng'], { encoding: 'utf8', env: daemonEnv() });
  t.is(result.status, 1);
  t.regex(result.stderr, /^vhost-user-rng: --source \/nonexistent\/hwrng: ENOENT/);
  t.is(result.stderr.trim().split('\n').length, 1, 'no stack trace');
});
