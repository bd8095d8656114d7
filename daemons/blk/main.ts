#!/usr/bin/env node
/**
 * vhost-user-blk: parse the command line, open the image, pick the I/O engine, serve.
 */
import { runDaemon } from '../../lib/cli/run-daemon';
import { ConfigError } from '../../lib/errors';
import { nullBackingFile, openBackingFile, type BackingFile } from '../../lib/io/backing-file';
import { chooseExecutor } from '../../lib/io/choose-executor';
import { NullExecutor, type ExecutorFactory } from '../../lib/io/executor';
import type { Logger } from '../../lib/runtime/logger';
import type { QueueWorkerOptions } from '../../lib/runtime/queue-workers';
import { native } from '../../native/index';
import { DESCRIPTION, EPILOGUE, EXAMPLES, PROGRAM, options, toConfig, type BlkConfig } from './cli';
import { BlkDevice } from './device';

/** The null backend (--null) does no I/O; otherwise io_uring when the kernel allows it, else the thread pool. */
export function executorFactory(config: BlkConfig, logger: Logger): { kind: string; create: ExecutorFactory } {
  if (config.nullSize !== undefined) return { kind: 'null', create: (capacity, sink) => new NullExecutor(capacity, sink) };
  return chooseExecutor(logger);
}

/** Open the image and build the device (the image is closed again if that fails). */
export function createBlkDevice(config: BlkConfig, logger: Logger): BlkDevice {
  const image: BackingFile =
    config.nullSize !== undefined
      ? nullBackingFile(config.nullSize)
      : openBackingFile({ path: config.file!, readOnly: config.readOnly, direct: config.direct });
  try {
    const deviceBlock = image.nativeBlockSize;
    const lbs = config.logicalBlockSize ?? (deviceBlock === 4096 ? 4096 : 512);
    // Through the page cache any 512-byte access works; O_DIRECT needs the device's own alignment.
    if (deviceBlock > lbs && config.direct) {
      throw new ConfigError('CONFIG_INVALID', `--logical-block-size ${lbs} is below the ${deviceBlock}-byte sectors of ${config.file}, which --direct cannot serve`);
    }
    const size = image.size();
    if (size < lbs) throw new ConfigError('CONFIG_INVALID', `--file ${config.file}: the image is ${size} bytes, smaller than one ${lbs}-byte block`);
    const engine = executorFactory(config, logger);
    const device = new BlkDevice(
      {
        readOnly: config.readOnly,
        serial: config.serial,
        numQueues: config.numQueues,
        queueSize: config.queueSize,
        logicalBlockSize: lbs,
        discard: config.discard,
        writeZeroes: config.writeZeroes,
        writeback: config.writeback,
      },
      { image, createExecutor: engine.create, logger, executorKind: engine.kind, inlineTransfer: config.inlineIo ? native.transferBatch : undefined },
    );
    logger.info(
      `${image.path}: ${device.capacity} sectors (${size} bytes), ${lbs}-byte blocks, ${config.numQueues} queue(s), ` +
        `${engine.kind}, inline I/O ${device.inlineMode}${config.direct ? ', O_DIRECT' : ''}${config.readOnly ? ', read-only' : ''}, ${config.writeback ? 'writeback' : 'writethrough'}`,
    );
    return device;
  } catch (err) {
    image.close();
    throw err;
  }
}

/**
 * The device instance a queue worker thread runs (lib/runtime/queue-workers.ts): its own image fds
 * and executors, the same settings. Config space and features stay with the main thread's device.
 */
export function createBlkDeviceForWorker(config: BlkConfig, logger: Logger): BlkDevice {
  return createBlkDevice({ ...config, threads: 0 }, { ...logger, info: logger.debug });
}

/** `--threads N`: queues in N worker threads, each building its device with {@link createBlkDeviceForWorker}. */
export function blkQueueWorkers(config: BlkConfig): QueueWorkerOptions | undefined {
  if (config.threads === undefined || config.threads === 0) return undefined;
  return { threads: Math.min(config.threads, config.numQueues), modulePath: __filename, exportName: 'createBlkDeviceForWorker', config };
}

if (require.main === module) {
  runDaemon<BlkConfig>({
    program: PROGRAM,
    type: 'blk',
    capabilities: ['read-only', 'blk-file'],
    description: DESCRIPTION,
    options,
    examples: EXAMPLES,
    epilogue: EPILOGUE,
    toConfig,
    createDevice: createBlkDevice,
    queueWorkers: blkQueueWorkers,
  }).catch((err: Error) => {
    process.stderr.write(`${PROGRAM}: ${err.stack ?? err.message}\n`);
    process.exit(1);
  });
}
