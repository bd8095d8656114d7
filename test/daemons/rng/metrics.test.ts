/**
 * The rng daemon's `vhostd_rng_*` metrics as an operator scrapes them: the device behind the real
 * protocol engine, requests driven by the test front-end, then the registry the daemon would serve
 * (createDaemonMetrics) read as Prometheus text.
 */
import test from 'ava';

import { RngDevice } from '../../../daemons/rng/device';
import { GetrandomSource, type EntropySource } from '../../../daemons/rng/entropy-source';
import type { RateLimit } from '../../../daemons/rng/rate-limiter';
import { createDaemonMetrics } from '../../../lib/metrics/registry';
import { silentLogger } from '../../../lib/runtime/logger';
import type { Frontend } from '../../helpers/frontend';
import { Scrape } from '../../helpers/scrape';
import { TestServer } from '../../lib/vhost-user/harness';

/** An asynchronous source whose first `failures` reads fail with EIO; then 0x5a bytes. */
class FlakySource implements EntropySource {
  readonly name = 'flaky';
  readonly synchronous = false;
  constructor(private failures: number) {}
  fillSync(): void {
    throw new Error('asynchronous only');
  }
  fill(view: Uint8Array, offset: number, length: number, done: (err: Error | null, bytes: number) => void): void {
    setImmediate(() => {
      if (this.failures > 0) {
        this.failures--;
        done(new Error('EIO: i/o error, read'), 0);
        return;
      }
      view.fill(0x5a, offset, offset + length);
      done(null, length);
    });
  }
  close(): void {}
}

async function withDevice(source: EntropySource, rateLimit: RateLimit | undefined, body: (fe: Frontend, scrape: () => Promise<Scrape>) => Promise<void>): Promise<void> {
  const ts = await TestServer.start(new RngDevice({ source, rateLimit, queueSize: 64, logger: silentLogger }));
  const registry = createDaemonMetrics(ts.server);
  const fe = ts.connect();
  try {
    await fe.negotiate();
    await fe.setMemTable();
    await fe.setupQueue(0, 16);
    await body(fe, () => Scrape.of(registry));
  } finally {
    fe.close();
    await ts.close();
  }
}

test('delivered bytes; nothing rate limited without a limit', async (t) => {
  await withDevice(new GetrandomSource(), undefined, async (fe, scrape) => {
    const before = await scrape();
    t.is(before.value('vhostd_rng_delivered_bytes_total', { device: 'rng' }), 0, 'the series exist before the first request');
    fe.submit(0, [{ writable: [{ length: 64 }] }, { writable: [{ length: 64 }] }, { writable: [{ length: 32 }, { length: 32 }] }]);
    t.deepEqual((await fe.collect(0, 3)).map((c) => c.len), [64, 64, 64]);
    const m = await scrape();
    t.is(m.value('vhostd_rng_delivered_bytes_total', { device: 'rng' }), 192);
    t.is(m.value('vhostd_rng_rate_limited_total'), 0);
    t.is(m.value('vhostd_rng_source_errors_total'), 0);
    t.is(m.value('vhostd_queue_written_bytes_total', { queue: '0' }), 192, 'the engine agrees');
  });
});

test('the rate limit: a shortened request and a delayed one count as rate limited', async (t) => {
  await withDevice(new GetrandomSource(), { maxBytes: 100, periodMs: 100 }, async (fe, scrape) => {
    fe.submit(0, [{ writable: [{ length: 64 }] }, { writable: [{ length: 64 }] }, { writable: [{ length: 64 }] }]);
    t.deepEqual((await fe.collect(0, 3, 10_000)).map((c) => c.len), [64, 36, 64]);
    const m = await scrape();
    t.is(m.value('vhostd_rng_delivered_bytes_total'), 164);
    t.is(m.value('vhostd_rng_rate_limited_total'), 2, 'the second got 36 of 64 bytes, the third waited for the next period');
    // A request after the ring ran empty, with quota left, is not limited.
    await new Promise((resolve) => setTimeout(resolve, 150));
    t.is((await fe.transfer(0, { writable: [{ length: 16 }] })).len, 16);
    t.is((await scrape()).value('vhostd_rng_rate_limited_total'), 2);
  });
});

test('source errors count every failed read; the retried request is delivered once', async (t) => {
  await withDevice(new FlakySource(2), undefined, async (fe, scrape) => {
    const done = await fe.transfer(0, { writable: [{ length: 32 }] }, 10_000);
    t.is(done.len, 32);
    const m = await scrape();
    t.is(m.value('vhostd_rng_source_errors_total'), 2);
    t.is(m.value('vhostd_rng_delivered_bytes_total'), 32);
    t.is(m.value('vhostd_rng_rate_limited_total'), 0);
  });
});
