#!/usr/bin/env node
/**
 * vhost-user-rng: a virtio-rng device (vhost-user-rng-pci) fed by getrandom or a file, with an
 * optional rate limit. The template every other daemon follows: cli.ts (options → config),
 * device.ts (the DeviceBackend), main.ts (this: wiring only).
 */
import { runDaemon } from '../../lib/cli/run-daemon';
import { rngOptions, toConfig } from './cli';
import { RngDevice } from './device';
import { FileSource, GetrandomSource } from './entropy-source';

runDaemon({
  program: 'vhost-user-rng',
  type: 'rng',
  description:
    'Serve a virtio-rng device to QEMU over vhost-user: the guest reads host entropy from /dev/hwrng.\n' +
    'Entropy comes from getrandom(2) unless --source names a file or device; --max-bytes/--period-ms limit the rate.',
  options: rngOptions,
  examples: [
    ['$0 --socket-path /run/vhostd/rng.sock', 'serve getrandom entropy'],
    ['$0 --socket-path /run/vhostd/rng.sock --source /dev/hwrng --max-bytes 1024 --period-ms 1000', 'pass the host hwrng through, at most 1 KiB/s'],
  ],
  epilogue: [
    'QEMU:',
    '  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=1G,share=on -machine memory-backend=mem \\',
    '    -chardev socket,id=rng0,path=/run/vhostd/rng.sock -device vhost-user-rng-pci,chardev=rng0',
    '',
    'systemd: systemctl enable --now vhost-user-rng@vm1.socket (socket /run/vhostd/rng-vm1.sock).',
    'Every option can also be set in the environment as VHOSTD_<OPTION> (e.g. VHOSTD_MAX_BYTES=1024).',
  ].join('\n'),
  toConfig,
  createDevice: (config, logger) => {
    const source = config.source === undefined ? new GetrandomSource() : FileSource.open(config.source);
    logger.info(
      `entropy from ${source.name}` +
        (config.rateLimit === undefined ? '' : `, at most ${config.rateLimit.maxBytes} bytes per ${config.rateLimit.periodMs} ms`),
    );
    return new RngDevice({ source, rateLimit: config.rateLimit, queueSize: config.queueSize, logger });
  },
}).catch((err: Error) => {
  process.stderr.write(`vhost-user-rng: ${err.stack ?? err.message}\n`);
  process.exit(1);
});
