import test from 'ava';
import { Gauge, Registry } from 'prom-client';

import { startMetricsServer } from '../../../lib/metrics/server';

test('serves /metrics, 404 elsewhere, 500 when a scrape fails', async (t) => {
  const registry = new Registry();
  let broken = false;
  new Gauge({
    name: 'vhostd_test_value',
    help: 'test',
    registers: [registry],
    collect() {
      if (broken) throw new Error('collector failed');
      this.set(42);
    },
  });
  const server = await startMetricsServer(registry, '127.0.0.1', 0);
  try {
    const base = `http://127.0.0.1:${server.address.port}`;
    const ok = await fetch(`${base}/metrics`);
    t.is(ok.status, 200);
    t.regex(await ok.text(), /^vhostd_test_value 42$/m);
    t.is((await fetch(`${base}/`)).status, 404);
    broken = true;
    const failed = await fetch(`${base}/metrics`);
    t.is(failed.status, 500);
    t.regex(await failed.text(), /collector failed/);
  } finally {
    await server.close();
  }
});
