#!/usr/bin/env node
/**
 * vhost-user-net: parse the command line, open and check the TAP, serve.
 */
import { runDaemon } from '../../lib/cli/run-daemon';
import type { Logger } from '../../lib/runtime/logger';
import type { QueueWorkerOptions } from '../../lib/runtime/queue-workers';
import { native } from '../../native';
import { DESCRIPTION, EPILOGUE, EXAMPLES, PROGRAM, options, toConfig, type NetConfig } from './cli';
import { NetDevice } from './device';
import { openTapQueue, probeOffloads, setTapQueueAttached, tapExists } from './tap';
import { VNET_HDR_SIZE } from './virtio-net';

function deviceOptions(config: NetConfig, logger: Logger) {
  return { tap: config.tap, queuePairs: config.queuePairs, queueSize: config.queueSize, mtu: config.mtu, txUring: config.txUring, threads: config.threads, logger };
}

/**
 * Open the TAP's anchor queue (checking the TAP is there, multi-queue, with vnet_hdr, and ours), probe
 * its offloads, then detach the anchor so the kernel steers no frame to it.
 */
export function createNetDevice(config: NetConfig, logger: Logger): NetDevice {
  const existed = tapExists(config.tap);
  const anchor = openTapQueue(config.tap, config.createTap);
  try {
    native.tapSetVnetHdrSize(anchor, VNET_HDR_SIZE);
    const offloads = probeOffloads(anchor);
    setTapQueueAttached(anchor, false);
    logger.info(
      `${existed ? 'attached to' : 'created'} TAP ${config.tap}: ${config.queuePairs} queue pair(s), MTU limit ${config.mtu}` +
        `${offloads.ufo ? ', UFO' : ''}${offloads.uso4 ? ', USO4' : ''}${offloads.uso6 ? ', USO6' : ''}`,
    );
    return new NetDevice(deviceOptions(config, logger), { anchorFd: anchor, offloads });
  } catch (err) {
    native.close(anchor);
    throw err;
  }
}

/**
 * The device instance a queue worker thread runs: it opens its own TAP queues for the pairs it runs.
 * Features, config and the anchor stay with the main thread's device.
 */
export function createNetDeviceForWorker(config: NetConfig, logger: Logger): NetDevice {
  return new NetDevice(deviceOptions(config, logger), { anchorFd: null, offloads: { ufo: false, uso4: false, uso6: false } });
}

/** `--threads N`: pair p runs in thread p % N (queueGroup keeps rx and tx of a pair together). */
export function netQueueWorkers(config: NetConfig): QueueWorkerOptions | undefined {
  if (config.threads === 0) return undefined;
  return { threads: Math.min(config.threads, config.queuePairs), modulePath: __filename, exportName: 'createNetDeviceForWorker', config };
}

if (require.main === module) {
  runDaemon<NetConfig>({
    program: PROGRAM,
    type: 'net',
    description: DESCRIPTION,
    options,
    examples: EXAMPLES,
    epilogue: EPILOGUE,
    toConfig,
    createDevice: createNetDevice,
    queueWorkers: netQueueWorkers,
  }).catch((err: Error) => {
    process.stderr.write(`${PROGRAM}: ${err.stack ?? err.message}\n`);
    process.exit(1);
  });
}
