/**
 * The control methods every daemon has, whatever its device: `status`, `metrics` and `log-level`.
 * Devices add theirs through DaemonDevice.controlMethods (lib/cli/run-daemon.ts).
 */
import type { Registry } from 'prom-client';

import { LOG_LEVELS, type LevelLogger, type LogLevel } from '../runtime/logger';
import type { VhostUserServer } from '../runtime/serve';
import type { ControlMethod } from './protocol';

/** Feature bits as JSON carries them: a hex string (bigints do not serialize). */
function hex(bits: bigint): string {
  return `0x${bits.toString(16)}`;
}

/**
 * The common methods plus the device's own (`deviceMethods`), which must not take a common name.
 * `deviceStatus`, when given, adds the device's own state to `status` as `state`.
 */
export function daemonControlMethods(
  server: VhostUserServer,
  registry: Registry,
  logger: LevelLogger,
  deviceMethods: Record<string, ControlMethod> = {},
  deviceStatus?: () => Record<string, unknown>,
): Record<string, ControlMethod> {
  const device = server.device.name;
  const common = commonMethods(server, registry, logger, deviceStatus);
  for (const name of Object.keys(deviceMethods)) {
    if (Object.hasOwn(common, name)) throw new Error(`${device} defines control method "${name}", which every daemon has`);
  }
  return { ...deviceMethods, ...common };
}

function commonMethods(
  server: VhostUserServer,
  registry: Registry,
  logger: LevelLogger,
  deviceStatus: (() => Record<string, unknown>) | undefined,
): Record<string, ControlMethod> {
  const device = server.device.name;
  return {
    status: {
      description: 'Device, front-end, negotiated features and the state of every queue',
      call: () => {
        const { features, protocolFeatures } = server.negotiated;
        return {
          device,
          pid: process.pid,
          frontend: { connected: server.connected, features: hex(features), protocolFeatures: hex(protocolFeatures) },
          queues: server.vrings.map((vring) => ({
            index: vring.index,
            size: vring.num,
            enabled: vring.enabled,
            started: vring.started,
            broken: vring.broken,
            kicks: vring.kicks,
            requests: vring.totals().requests,
          })),
          ...(deviceStatus === undefined ? {} : { state: deviceStatus() }),
        };
      },
    },
    metrics: {
      description: 'The Prometheus metrics (what /metrics serves) as JSON',
      call: async () => ({ device, metrics: await registry.getMetricsAsJSON() }),
    },
    'log-level': {
      description: 'Get the log level, or set it with "level"',
      params: { level: { type: 'string', choices: LOG_LEVELS, description: 'New least severe level logged' } },
      call: (params) => {
        const previous = logger.level;
        if (params.level !== undefined) {
          logger.level = params.level as LogLevel;
          if (logger.level !== previous) logger.info(`log level ${previous} -> ${logger.level} (control socket)`);
        }
        return { device, level: logger.level, previous };
      },
    },
  };
}
