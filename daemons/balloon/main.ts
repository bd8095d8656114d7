#!/usr/bin/env node
/**
 * vhost-user-balloon: a virtio-balloon device whose inflated and reported pages are really freed on
 * the host (holes punched in the guest memory fds). Wiring only: cli.ts (options → config),
 * device.ts (the DeviceBackend).
 */
import { runDaemon } from '../../lib/cli/run-daemon';
import { chooseExecutor } from '../../lib/io/choose-executor';
import { balloonOptions, toConfig } from './cli';
import { BalloonDevice } from './device';
import { BALLOON_PAGE_SIZE } from './inflate-deflate';

runDaemon({
  program: 'vhost-user-balloon',
  type: 'balloon',
  description:
    'Serve a virtio-balloon device over vhost-user: the host takes memory back from the guest.\n' +
    'Pages the guest puts in the balloon (or reports free, with --free-page-reporting) are freed\n' +
    'on the host: holes punched in the guest memory fds (memfd or hugetlbfs). Set the target with\n' +
    '--target or at run time with vhostctl set-target; guest memory statistics become metrics.',
  options: balloonOptions,
  examples: [
    ['$0 --socket-path /run/vhostd/balloon.sock --control /run/vhostd/balloon.ctl', 'serve a balloon, empty at start'],
    ['$0 --socket-path /run/vhostd/balloon.sock --target 1G --free-page-reporting', 'take 1 GiB back at once, and free memory as the guest frees it'],
    ['vhostctl --control /run/vhostd/balloon.ctl set-target 512M', 'at run time: ask the guest for 512 MiB'],
  ],
  epilogue: [
    'QEMU (10.2 or later: vhost-user-test-device-pci forwards the queues and config space; num_vqs is 2,',
    '3 with statistics, 4 with --free-page-reporting; start the daemon first, with a plain chardev):',
    '  qemu-system-x86_64 ... \\',
    '    -object memory-backend-memfd,id=mem,size=4G,share=on -machine memory-backend=mem \\',
    '    -chardev socket,id=bal0,path=/run/vhostd/balloon.sock \\',
    '    -device vhost-user-test-device-pci,chardev=bal0,virtio-id=5,num_vqs=3,config_size=8',
    '',
    'libvirt: the same -chardev/-device in <qemu:commandline>, <memballoon model=\'none\'/>, and',
    '  <memoryBacking><source type=\'memfd\'/><access mode=\'shared\'/></memoryBacking>.',
    '',
    'systemd: systemctl enable --now vhost-user-balloon@vm1.socket (socket /run/vhostd/balloon-vm1.sock).',
    'Every option can also be set in the environment as VHOSTD_<OPTION> (e.g. VHOSTD_STATS_INTERVAL=5).',
  ].join('\n'),
  toConfig,
  createDevice: (config, logger) => {
    const executor = chooseExecutor(logger);
    logger.info(
      `target ${config.targetPages} pages (${(config.targetPages * BALLOON_PAGE_SIZE) / 2 ** 20} MiB), ` +
        `stats every ${config.statsIntervalMs > 0 ? `${config.statsIntervalMs / 1000} s` : 'request only'}, ` +
        `releases through ${executor.kind}${config.freePageReporting ? ', free page reporting' : ''}`,
    );
    return new BalloonDevice({ ...config, createExecutor: executor.create, logger });
  },
}).catch((err: Error) => {
  process.stderr.write(`vhost-user-balloon: ${err.stack ?? err.message}\n`);
  process.exit(1);
});
