/**
 * A device's metrics across threads. With queue worker threads each worker builds its own device
 * instance, whose plain counters (`vhostd_blk_*`, ...) live in that thread. The datapath stays as it
 * is: each worker registers its device's metrics in a registry of its own, and when the main thread
 * is scraped it asks every worker for that registry's samples (one message round trip per worker and
 * scrape, none per request) and merges them with its own device's, metric by metric, with the
 * metric's prom-client aggregator (as prom-client's AggregatorRegistry merges a cluster): counters
 * and histograms sum per label set (a histogram bucket by bucket); a gauge sums too unless it is
 * declared with `aggregator: 'first'`, a device-wide value the main device answers first (blk's
 * capacity).
 */
import { AggregatorRegistry, type Metric, type Registry } from 'prom-client';

/** Every metric of a registry with its samples: what `Registry.getMetricsAsJSON()` gives, structured-clonable. */
export type MetricSnapshot = Awaited<ReturnType<Registry['getMetricsAsJSON']>>;

/** The snapshots' metrics merged by name, each with its own aggregator; synchronous. */
export function mergeSnapshots(snapshots: readonly MetricSnapshot[]): MetricSnapshot {
  // AggregatorRegistry.aggregate registers each merged metric as a plain object carrying the merged
  // fields and values (its get() returns that object), so the array is the merged snapshot.
  return AggregatorRegistry.aggregate([...snapshots]).getMetricsAsArray() as unknown as MetricSnapshot;
}

/**
 * What a thread's metrics leave behind when the thread ends: its counters and histograms, which
 * keep counting for the device. A gauge is a value now, and an ended thread has none.
 */
export function lastingMetrics(snapshot: MetricSnapshot): MetricSnapshot {
  // prom-client's JSON carries the type as its name ('gauge'), though its typings say an enum.
  return snapshot.filter((metric) => String(metric.type) !== 'gauge');
}

/**
 * Register in `registry` every metric of `own` (the main thread's device instance), each answering
 * at scrape time with its own samples merged with the same metric of the snapshots `others` gives
 * (the worker threads' device instances, live and ended).
 */
export function registerMergedMetrics(registry: Registry, own: Registry, others: () => Promise<MetricSnapshot[]>): void {
  let merged: Promise<Map<string, MetricSnapshot[number]>> | null = null;
  // A scrape asks every metric in one go: they share one round trip to the workers.
  const scrape = (): Promise<Map<string, MetricSnapshot[number]>> =>
    (merged ??= Promise.all([own.getMetricsAsJSON(), others()])
      .then(([mine, theirs]) => new Map(mergeSnapshots([mine, ...theirs]).map((metric) => [metric.name, metric])))
      .finally(() => {
        merged = null;
      }));
  for (const metric of own.getMetricsAsArray()) {
    const { name, help, type, aggregator } = metric;
    const proxy = { name, help, type, aggregator, get: async () => (await scrape()).get(name)! };
    registry.registerMetric(proxy as unknown as Metric);
  }
}
