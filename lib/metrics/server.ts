/**
 * The `/metrics` endpoint: GET /metrics answers the registry's text, 500 when a scrape fails, 404
 * for every other path.
 */
import http from 'node:http';

import type { Registry } from 'prom-client';

export interface MetricsServer {
  /** The address actually bound (port 0 picks a free port). */
  readonly address: { host: string; port: number };
  close(): Promise<void>;
}

export async function startMetricsServer(registry: Registry, host: string, port: number): Promise<MetricsServer> {
  const server = http.createServer((req, res) => {
    if (req.method !== 'GET' || (req.url ?? '').split('?')[0] !== '/metrics') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found: try /metrics\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text),
      (err: Error) => res.writeHead(500, { 'content-type': 'text/plain' }).end(`scrape failed: ${err.message}\n`),
    );
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  server.unref();
  const bound = server.address();
  const actualPort = typeof bound === 'object' && bound !== null ? bound.port : port;
  return {
    address: { host, port: actualPort },
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}
