/**
 * Prometheus metrics for one daemon process: one Registry (never prom-client's global), metrics read
 * the engine's plain counters at scrape time, so the datapath only increments numbers.
 * Names follow `vhostd_<area>_<thing>_<unit>`; labels are bounded (queue index, request name, code).
 */
import { collectDefaultMetrics, Counter, Gauge, Registry } from 'prom-client';

import type { VhostUserServer } from '../runtime/serve';
import type { QueueCounters } from '../virtqueue/virtqueue';

/**
 * Build the registry for `server`, labelled with the device name: process metrics, the engine's
 * queue/protocol/front-end metrics, then the device's own (DeviceBackend.registerMetrics).
 */
export function createDaemonMetrics(server: VhostUserServer): Registry {
  const registry = new Registry();
  registry.setDefaultLabels({ device: server.device.name });
  collectDefaultMetrics({ register: registry, prefix: 'vhostd_' });

  const queueCounter = (name: string, help: string, read: (c: QueueCounters) => number) =>
    new Counter({
      name,
      help,
      labelNames: ['queue'],
      registers: [registry],
      collect() {
        this.reset();
        for (const vring of server.vrings) this.inc({ queue: String(vring.index) }, read(vring.totals()));
      },
    });
  queueCounter('vhostd_queue_requests_total', 'Descriptor chains processed', (c) => c.requests);
  queueCounter('vhostd_queue_read_bytes_total', 'Bytes the driver offered to the device', (c) => c.bytesRead);
  queueCounter('vhostd_queue_written_bytes_total', 'Bytes the device wrote to the driver', (c) => c.bytesWritten);
  queueCounter('vhostd_queue_notifications_total', 'Interrupts signalled to the driver (call eventfd writes)', (c) => c.notifications);
  queueCounter('vhostd_queue_batches_total', 'Used-ring publications (one per processed batch)', (c) => c.batches);

  new Counter({
    name: 'vhostd_queue_kicks_total',
    help: 'Kicks received from the driver',
    labelNames: ['queue'],
    registers: [registry],
    collect() {
      this.reset();
      for (const vring of server.vrings) this.inc({ queue: String(vring.index) }, vring.kicks);
    },
  });
  new Counter({
    name: 'vhostd_queue_errors_total',
    help: 'Times the driver broke a ring rule and the queue was marked broken',
    labelNames: ['queue'],
    registers: [registry],
    collect() {
      this.reset();
      for (const vring of server.vrings) this.inc({ queue: String(vring.index) }, vring.brokenCount);
    },
  });
  new Counter({
    name: 'vhostd_protocol_requests_total',
    help: 'vhost-user requests handled, by request',
    labelNames: ['request'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [request, n] of server.counters.requests) this.inc({ request }, n);
    },
  });
  new Counter({
    name: 'vhostd_frontend_drops_total',
    help: 'Front-ends disconnected for a protocol violation, by error code',
    labelNames: ['code'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [code, n] of server.counters.drops) this.inc({ code }, n);
    },
  });
  new Gauge({
    name: 'vhostd_frontend_connected',
    help: '1 while a vhost-user front-end is attached',
    registers: [registry],
    collect() {
      this.set(server.connected ? 1 : 0);
    },
  });
  server.device.registerMetrics?.(registry);
  return registry;
}
