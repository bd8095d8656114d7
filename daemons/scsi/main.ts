#!/usr/bin/env node
/**
 * vhost-user-scsi: parse the command line, open every image, pick the I/O engine, serve.
 */
import fs from 'node:fs';

import { runDaemon } from '../../lib/cli/run-daemon';
import { ConfigError } from '../../lib/errors';
import { chooseExecutor } from '../../lib/io/choose-executor';
import { inlineMode } from '../../lib/io/engine';
import type { Logger } from '../../lib/runtime/logger';
import type { QueueWorkerOptions } from '../../lib/runtime/queue-workers';
import { native } from '../../native/index';
import { DESCRIPTION, EPILOGUE, EXAMPLES, PROGRAM, checkDistinct, options, parseLunList, toConfig, type LunConfig, type ScsiConfig } from './cli';
import { ScsiDevice } from './device';
import { openUnit, type ImageUnit } from './units';

/** The units of `config`: `--lun` ones and those of the `--luns` file. */
export function loadUnits(config: ScsiConfig): LunConfig[] {
  if (config.lunsFile === undefined) return config.luns;
  let text: string;
  try {
    text = fs.readFileSync(config.lunsFile, 'utf8');
  } catch (err) {
    throw new ConfigError('CONFIG_INVALID', `--luns ${config.lunsFile}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const units = [...config.luns, ...parseLunList(text, config.lunsFile)];
  checkDistinct(units);
  if (units.length === 0) throw new ConfigError('CONFIG_MISSING', `--luns ${config.lunsFile}: the list is empty`);
  return units;
}

/** Open the images and build the device (every image is closed again if that fails). */
export function createScsiDevice(config: ScsiConfig, logger: Logger): ScsiDevice {
  const units: ImageUnit[] = [];
  try {
    for (const u of loadUnits(config)) units.push(openUnit(u, config.direct));
    const engine = chooseExecutor(logger);
    const device = new ScsiDevice(
      { requestQueues: config.requestQueues, queueSize: config.queueSize, workerQueues: config.threads > 0, direct: config.direct },
      { units, createExecutor: engine.create, logger, inlineTransfer: config.inlineIo ? native.transferBatch : undefined },
    );
    for (const unit of units) {
      logger.debug(
        `LUN ${unit.target}:${unit.lun}: ${unit.image.path}, ${unit.blocks} blocks of ${unit.blockSize} bytes, inline I/O ${inlineMode(unit.image.storage, config.inlineIo)}` +
          `${unit.options.readOnly ? ', read-only' : ''}${unit.options.discard ? ', discard' : ''}`,
      );
    }
    logger.info(`${units.length} logical unit(s), ${config.requestQueues} request queue(s), ${engine.kind}, inline I/O ${config.inlineIo ? 'on' : 'off'}${config.direct ? ', O_DIRECT' : ''}`);
    return device;
  } catch (err) {
    for (const unit of units) unit.image.close();
    throw err;
  }
}

/**
 * The device instance a queue worker thread runs (lib/runtime/queue-workers.ts): its own image fds
 * and engines for the request queues it is given; the main device keeps its units and their mode
 * pages in step (ScsiDevice.workerMessage).
 */
export function createScsiDeviceForWorker(config: ScsiConfig, logger: Logger): ScsiDevice {
  return createScsiDevice({ ...config, threads: 0 }, { ...logger, info: logger.debug });
}

/** `--threads N`: request queues in N worker threads (control and event stay on the main thread). */
export function scsiQueueWorkers(config: ScsiConfig): QueueWorkerOptions | undefined {
  if (config.threads === 0) return undefined;
  return { threads: Math.min(config.threads, config.requestQueues), modulePath: __filename, exportName: 'createScsiDeviceForWorker', config };
}

if (require.main === module) {
  runDaemon<ScsiConfig>({
    program: PROGRAM,
    type: 'scsi',
    description: DESCRIPTION,
    options,
    examples: EXAMPLES,
    epilogue: EPILOGUE,
    toConfig,
    createDevice: createScsiDevice,
    queueWorkers: scsiQueueWorkers,
  }).catch((err: Error) => {
    process.stderr.write(`${PROGRAM}: ${err.stack ?? err.message}\n`);
    process.exit(1);
  });
}
