/**
 * Prometheus metrics for one daemon process: one Registry (never prom-client's global), metrics read
 * the engine's plain counters at scrape time, so the datapath only increments numbers.
 * Names follow `vhostd_<area>_<thing>_<unit>`; labels are bounded (queue index, request name, code).
 */
import { collectDefaultMetrics, Gauge, Registry } from 'prom-client';

import type { VhostUserServer } from '../runtime/serve';
import { collectedCounter, queueCounter } from './collected';
import { registerMergedMetrics } from './thread-metrics';
import type { QueueCounters } from '../virtqueue/virtqueue';

/** Sampling period of the event-loop lag metrics (vhostd_nodejs_eventloop_lag_*), ms. */
const EVENT_LOOP_MONITOR_MS = 100;

/**
 * Build the registry for `server`, labelled with the device name: process metrics, the engine's
 * queue/protocol/front-end metrics, then the device's own (DeviceBackend.registerMetrics), summed
 * with those of its instances in queue worker threads.
 */
export function createDaemonMetrics(server: VhostUserServer): Registry {
  const registry = new Registry();
  registry.setDefaultLabels({ device: server.device.name });
  // The event-loop delay monitor is a timer: at prom-client's 10 ms it woke an idle daemon 100 times a
  // second, most of its idle CPU (docs/benchmarks.md "Idle guest"). At 100 ms it still shows the stalls
  // that matter to a datapath (a blocked loop shows up as lag however coarse the sampling).
  collectDefaultMetrics({ register: registry, prefix: 'vhostd_', eventLoopMonitoringPrecision: EVENT_LOOP_MONITOR_MS });

  const vrings = server.vrings;
  const totals = (read: (c: QueueCounters) => number) => (q: number) => read(vrings[q]!.totals());
  const count = () => vrings.length;
  queueCounter(registry, 'vhostd_queue_requests_total', 'Descriptor chains processed', count, totals((c) => c.requests));
  queueCounter(registry, 'vhostd_queue_read_bytes_total', 'Bytes the driver offered to the device', count, totals((c) => c.bytesRead));
  queueCounter(registry, 'vhostd_queue_written_bytes_total', 'Bytes the device wrote to the driver', count, totals((c) => c.bytesWritten));
  queueCounter(
    registry,
    'vhostd_queue_notifications_total',
    'Interrupts signalled to the driver (call eventfd writes)',
    count,
    totals((c) => c.notifications),
  );
  queueCounter(registry, 'vhostd_queue_batches_total', 'Used-ring publications (one per processed batch)', count, totals((c) => c.batches));
  queueCounter(registry, 'vhostd_queue_kicks_total', 'Kicks received from the driver', count, (q) => vrings[q]!.kicks);
  queueCounter(registry, 'vhostd_queue_poll_hits_total', 'Poll rounds after a batch that found work without a kick (--poll-us)', count, (q) => vrings[q]!.polls.hits);
  queueCounter(registry, 'vhostd_queue_poll_seconds_total', 'Time spent polling the ring and its I/O after a batch (--poll-us)', count, (q) => vrings[q]!.polls.seconds);
  queueCounter(
    registry,
    'vhostd_queue_errors_total',
    'Times the driver broke a ring rule and the queue was marked broken',
    count,
    (q) => vrings[q]!.brokenCount,
  );
  collectedCounter(registry, 'vhostd_protocol_requests_total', 'vhost-user requests handled, by request', ['request'], () =>
    Array.from(server.counters.requests, ([request, n]) => [{ request }, n] as const),
  );
  collectedCounter(registry, 'vhostd_frontend_drops_total', 'Front-ends disconnected for a protocol violation, by error code', ['code'], () =>
    Array.from(server.counters.drops, ([code, n]) => [{ code }, n] as const),
  );
  new Gauge({
    name: 'vhostd_frontend_connected',
    help: '1 while a vhost-user front-end is attached',
    registers: [registry],
    collect() {
      this.set(server.connected ? 1 : 0);
    },
  });
  const workers = server.queueWorkers;
  if (workers === null) {
    server.device.registerMetrics?.(registry);
  } else {
    // Queues in worker threads count in the workers' own device instances: merged at scrape time.
    const own = new Registry();
    server.device.registerMetrics?.(own);
    registerMergedMetrics(registry, own, () => workers.metrics());
  }
  return registry;
}
