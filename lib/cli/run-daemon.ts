/**
 * The part of every daemon's main() that is not about its device: parse the command line, print
 * capabilities, build the device, serve it, metrics, sd_notify and the watchdog, and a prompt clean
 * exit on SIGTERM/SIGINT (vhost-user.rst: the backend "must end (as quickly and cleanly as possible)
 * when the SIGTERM signal is received"). Expected errors (ConfigError) print one line and exit 1.
 */
import yargs, { type Options } from 'yargs';

import { daemonControlMethods } from '../control/daemon-methods';
import type { ControlMethod } from '../control/protocol';
import { startControlServer, type ControlServer } from '../control/server';
import { ConfigError } from '../errors';
import { createDaemonMetrics } from '../metrics/registry';
import { startMetricsServer, type MetricsServer } from '../metrics/server';
import { createLogger, type LevelLogger, type Logger } from '../runtime/logger';
import type { QueueWorkerOptions } from '../runtime/queue-workers';
import { serve } from '../runtime/serve';
import { sdNotify, startWatchdog } from '../systemd/notify';
import type { DeviceBackend } from '../vhost-user/device-backend';
import { commonOptions, toCommonConfig, type CommonArgs } from './common-options';

/** A device plus the process-level hooks a daemon may have. */
export interface DaemonDevice extends DeviceBackend {
  /** Release host resources (files, rings) after the front-end is gone. */
  close?(): Promise<void> | void;
  /** SIGHUP: re-read what can change at run time (e.g. a grown image). */
  reload?(): Promise<void> | void;
  /**
   * The device's own control socket methods (blk `resize`), next to the common `status`, `metrics`
   * and `log-level`; their params are checked against each method's `params` before `call`.
   */
  controlMethods?(): Record<string, ControlMethod>;
  /** The device's own state for the control `status` method (balloon: target, actual, guest stats). */
  status?(): Record<string, unknown>;
}

export interface DaemonSpec<Config> {
  /** Program name, e.g. "vhost-user-rng". */
  program: string;
  /** vhost-user.rst --print-capabilities "type". */
  type: string;
  /** --print-capabilities "features". */
  capabilities?: string[];
  /** One paragraph for --help. */
  description: string;
  /** Device options (yargs), grouped under "Device:". */
  options: Record<string, Options>;
  /** Examples for --help: [command, description]. */
  examples: [string, string][];
  /** Text after the options: QEMU / libvirt command lines. */
  epilogue: string;
  /** Pure: parsed arguments → device config; throws ConfigError. */
  toConfig(args: Record<string, unknown>): Config;
  createDevice(config: Config, logger: Logger): Promise<DaemonDevice> | DaemonDevice;
  /** Queues in worker threads for this config (e.g. `--threads N`), or undefined for one thread. */
  queueWorkers?(config: Config): QueueWorkerOptions | undefined;
}

/** Time allowed for a clean stop before the process exits anyway. */
const STOP_TIMEOUT_MS = 5000;

export async function runDaemon<Config>(spec: DaemonSpec<Config>, argv: string[] = process.argv.slice(2)): Promise<void> {
  const parser = yargs(argv)
    .scriptName(spec.program)
    .usage(`Usage: $0 --socket-path PATH [options]\n\n${spec.description}`)
    .options(commonOptions)
    .options(spec.options)
    .env('VHOSTD')
    .strict()
    .wrap(Math.min(110, process.stdout.columns ?? 100))
    .epilogue(spec.epilogue)
    .help()
    .version()
    .fail((message, err) => {
      if (err !== undefined && err !== null) throw err;
      process.stderr.write(`${spec.program}: ${message}\nTry '${spec.program} --help'.\n`);
      process.exit(1);
    });
  for (const [command, description] of spec.examples) parser.example(command, description);
  const args = (await parser.parseAsync()) as unknown as Record<string, unknown> & CommonArgs & { 'print-capabilities'?: boolean };

  if (args['print-capabilities'] === true) {
    process.stdout.write(`${JSON.stringify({ type: spec.type, features: spec.capabilities ?? [] })}\n`);
    return;
  }

  let logger: LevelLogger | undefined;
  try {
    const common = toCommonConfig(args);
    logger = createLogger({ level: common.logLevel });
    const config = spec.toConfig(args);
    const device = await spec.createDevice(config, logger);
    const queueWorkers = spec.queueWorkers?.(config);
    const server = await serve(device, {
      socketPath: common.socketPath,
      socketGroup: common.socketGroup,
      fd: common.fd,
      connect: common.connect,
      logger,
      queueWorkers,
      pollUs: common.pollUs,
    });
    if (queueWorkers !== undefined) logger.info(`queues run in ${queueWorkers.threads} worker thread(s)`);
    const withControl = common.controlPath !== undefined || common.controlFd !== undefined;
    const registry = common.metrics !== undefined || withControl ? createDaemonMetrics(server) : undefined;
    let metrics: MetricsServer | undefined;
    if (common.metrics !== undefined) {
      metrics = await startMetricsServer(registry!, common.metrics.host, common.metrics.port);
      logger.info(`metrics on http://${metrics.address.host}:${metrics.address.port}/metrics`);
    }
    let control: ControlServer | undefined;
    if (withControl) {
      const methods = daemonControlMethods(server, registry!, logger, device.controlMethods?.(), device.status?.bind(device));
      const controlOptions = { path: common.controlPath, group: common.socketGroup, fd: common.controlFd, device: device.name, methods, logger };
      // A control socket that cannot be created ends the daemon: leave no vhost-user socket behind.
      control = await startControlServer(controlOptions).catch(async (err: unknown) => {
        await server.close();
        throw err;
      });
      logger.info(`control socket on ${common.controlPath ?? `fd ${common.controlFd}`}`);
    }
    const where = common.socketPath ?? (common.connect !== undefined ? `connect ${common.connect}` : `fd ${common.fd}`);
    logger.info(`${spec.program} serving ${device.name} on ${where}`);
    sdNotify(`READY=1\nSTATUS=serving on ${where}`);
    const stopWatchdog = startWatchdog();

    let stopping = false;
    const stop = async (signal: string) => {
      if (stopping) return;
      stopping = true;
      logger!.info(`${signal}: stopping`);
      sdNotify('STOPPING=1');
      setTimeout(() => {
        logger!.error(`clean stop took more than ${STOP_TIMEOUT_MS} ms; exiting`);
        process.exit(1);
      }, STOP_TIMEOUT_MS).unref();
      stopWatchdog();
      await control?.close();
      await server.close();
      await device.close?.();
      await metrics?.close();
      process.exit(0);
    };
    process.on('SIGTERM', () => void stop('SIGTERM'));
    process.on('SIGINT', () => void stop('SIGINT'));
    process.on('SIGHUP', () => {
      Promise.resolve(device.reload?.()).catch((err: Error) => logger!.error(`reload failed: ${err.message}`));
    });
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`${spec.program}: ${err.message}\n`);
      process.exit(1);
    }
    throw err;
  }
}
