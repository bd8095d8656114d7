/**
 * The rng daemon's own Prometheus metrics (`vhostd_rng_*`, listed in daemons/rng/README.md). The
 * device only adds to the plain numbers of {@link RngStats}; the metrics read them at scrape time.
 */
import type { Registry } from 'prom-client';

import { valueCounter } from '../../lib/metrics/collected';

/** The device's counters: plain numbers, cumulative for the life of the device. */
export class RngStats {
  /** Entropy bytes written into guest buffers (the sum of the used lengths). */
  deliveredBytes = 0;
  /** Requests the rate limit delayed to a later period or cut short. */
  rateLimited = 0;
  /** Failed reads from the entropy source (errors and end of file); each is retried. */
  sourceErrors = 0;
}

/** Register the `vhostd_rng_*` metrics reading `stats` in `registry`. */
export function createRngMetrics(registry: Registry, stats: RngStats) {
  const counter = (name: string, help: string, read: () => number) => valueCounter(registry, name, help, read);
  return {
    deliveredBytes: counter('vhostd_rng_delivered_bytes_total', 'Entropy bytes delivered to the guest', () => stats.deliveredBytes),
    rateLimited: counter(
      'vhostd_rng_rate_limited_total',
      'Requests the rate limit (--max-bytes/--period-ms) delayed to a later period or answered with fewer bytes than asked',
      () => stats.rateLimited,
    ),
    sourceErrors: counter('vhostd_rng_source_errors_total', 'Failed reads from the entropy source (each is retried)', () => stats.sourceErrors),
  };
}

export type RngMetrics = ReturnType<typeof createRngMetrics>;
