/**
 * Command line of vhost-user-blk: the yargs options (also the source of the README option list) and a
 * pure {@link toConfig} that turns parsed arguments into a {@link BlkConfig} or throws ConfigError.
 * Nothing here touches the file system; opening the image happens in main.ts.
 */
import type { Options } from 'yargs';

import { inlineIoOption } from '../../lib/cli/common-options';
import { integerOption, queueSizeOption } from '../../lib/cli/option-checks';
import { parseSize } from '../../lib/cli/size';
import { ConfigError } from '../../lib/errors';

export const PROGRAM = 'vhost-user-blk';

export const DESCRIPTION =
  'Serve a raw disk image or a block device as a virtio-blk device (virtio 1.2 §5.2) to a vhost-user ' +
  'front-end such as QEMU. I/O goes through io_uring straight into guest memory; without io_uring it ' +
  'falls back to preadv/pwritev on the thread pool. SIGHUP (or vhostctl resize on the --control socket) ' +
  're-reads the image size and tells the guest when it changed.';

export const options = {
  file: {
    type: 'string',
    describe: 'Raw disk image or block device to serve (vhost-user.rst calls this --blk-file)',
    alias: 'blk-file',
    group: 'Device:',
  },
  'read-only': {
    type: 'boolean',
    default: false,
    describe: 'Open the image read-only and offer VIRTIO_BLK_F_RO; writes fail with an I/O error in the guest',
    group: 'Device:',
  },
  serial: {
    type: 'string',
    default: '',
    describe: 'Device ID string the guest reads with GET_ID (/sys/block/vda/serial), up to 20 ASCII characters',
    group: 'Device:',
  },
  'num-queues': {
    type: 'number',
    default: 1,
    describe: 'Request queues (VIRTIO_BLK_F_MQ when more than 1); the guest gets one hardware queue per queue',
    group: 'Device:',
  },
  'queue-size': {
    type: 'number',
    default: 256,
    describe: 'Largest queue size accepted (a power of two, 2..32768); match QEMU queue-size=',
    group: 'Device:',
  },
  'logical-block-size': {
    choices: [512, 4096],
    type: 'number',
    describe: "Logical block size the guest sees (default: the block device's own, 512 for a file)",
    group: 'Device:',
  },
  direct: {
    type: 'boolean',
    default: false,
    describe: 'Open the image with O_DIRECT (bypass the host page cache; guest buffers must be block aligned)',
    group: 'Device:',
  },
  discard: {
    type: 'boolean',
    default: false,
    describe: 'Offer VIRTIO_BLK_F_DISCARD: guest discards punch holes in the image (fstrim, blkdiscard)',
    group: 'Device:',
  },
  'write-zeroes': {
    type: 'boolean',
    default: false,
    describe: 'Offer VIRTIO_BLK_F_WRITE_ZEROES: zeroed ranges become fallocate(ZERO_RANGE / PUNCH_HOLE)',
    group: 'Device:',
  },
  writeback: {
    type: 'boolean',
    describe: 'Start in writeback cache mode: writes complete once in the host page cache, FLUSH makes them durable (default)',
    group: 'Device:',
  },
  writethrough: {
    type: 'boolean',
    describe: 'Start in writethrough cache mode: every write is durable (O_DSYNC) before it completes',
    group: 'Device:',
  },
  threads: {
    type: 'number',
    default: 0,
    describe: 'Run the queues in this many worker threads (queue i in thread i % N), for more than one core; 0: all on the main thread',
    group: 'Device:',
  },
  'inline-io': inlineIoOption,
  null: {
    type: 'boolean',
    default: false,
    describe: "Null backend: every request completes at once without touching any file (overhead benchmarks, like QEMU's null-co)",
    group: 'Device:',
  },
  'null-size': {
    type: 'string',
    default: '1G',
    describe: 'Capacity of the --null device (bytes, or with a K/M/G/T suffix)',
    group: 'Device:',
  },
} satisfies Record<string, Options>;

export const EXAMPLES: [string, string][] = [
  ['$0 --socket-path /run/vhostd/blk0.sock --file /var/lib/images/disk.img', 'Serve disk.img read-write'],
  ['$0 --socket-path /tmp/blk.sock --file /dev/vg0/guest --num-queues 4 --direct --discard', 'A logical volume, 4 queues, no host page cache, guest TRIM'],
  ['$0 --socket-path /tmp/blk.sock --file base.img --read-only --serial BASE0001', 'A read-only disk with a serial number'],
];

export const EPILOGUE = `QEMU (guest memory must be shared with the daemon):
  qemu-system-x86_64 ... \\
    -object memory-backend-memfd,id=mem,size=4G,share=on -machine memory-backend=mem \\
    -chardev socket,id=c0,path=/run/vhostd/blk0.sock \\
    -device vhost-user-blk-pci,chardev=c0,num-queues=4

libvirt (domain XML):
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <disk type='vhostuser' device='disk'>
    <driver name='qemu' type='raw'/>
    <source type='unix' path='/run/vhostd/blk0.sock'><reconnect enabled='yes' timeout='10'/></source>
    <target dev='vda' bus='virtio'/>
  </disk>

Resize: grow the file, then vhostctl --control PATH resize (a daemon started with --control PATH), or kill -HUP.
Signals: SIGHUP re-reads the image size, SIGTERM stops.`;

/** What the daemon runs with. */
export interface BlkConfig {
  /** The image path; undefined with the null backend. */
  file?: string;
  /** Null backend capacity in bytes, when --null. */
  nullSize?: number;
  readOnly: boolean;
  serial: string;
  numQueues: number;
  queueSize: number;
  /** Undefined: the block device's own, or 512. */
  logicalBlockSize?: 512 | 4096;
  direct: boolean;
  discard: boolean;
  writeZeroes: boolean;
  writeback: boolean;
  /** Worker threads for the queues (`--threads`); 0 or undefined: the main thread. */
  threads?: number;
  /** `--inline-io` (default) / `--no-inline-io`: I/O that cannot wait for a disk runs on the queue thread. */
  inlineIo: boolean;
}

/** Most queues: QEMU's VIRTIO_QUEUE_MAX is 1024, but every queue costs an io_uring here. */
export const MAX_QUEUES = 64;

/** Pure: parsed arguments → config. Throws ConfigError on anything wrong or contradictory. */
export function toConfig(args: Record<string, unknown>): BlkConfig {
  const file = args.file as string | undefined;
  const useNull = args.null === true;
  if (useNull && file !== undefined) {
    throw new ConfigError('CONFIG_CONFLICT', '--null and --file exclude each other: the null backend has no file');
  }
  if (!useNull && (file === undefined || file === '')) {
    throw new ConfigError('CONFIG_MISSING', 'no image: give --file PATH (a raw image or a block device), or --null');
  }

  const readOnly = args['read-only'] === true;
  const discard = args.discard === true;
  const writeZeroes = args['write-zeroes'] === true;
  if (readOnly && (discard || writeZeroes)) {
    throw new ConfigError('CONFIG_CONFLICT', `--read-only excludes ${discard ? '--discard' : '--write-zeroes'}: both change the image`);
  }

  if (args.writeback === true && args.writethrough === true) {
    throw new ConfigError('CONFIG_CONFLICT', '--writeback and --writethrough exclude each other');
  }
  const writeback = args.writethrough === true ? false : args.writeback !== false;

  const serial = (args.serial as string | undefined) ?? '';
  if (serial.length > 20 || !/^[\x20-\x7e]*$/.test(serial)) {
    throw new ConfigError('CONFIG_INVALID', `--serial ${JSON.stringify(serial)}: expected at most 20 printable ASCII characters`);
  }

  const numQueues = integerOption('num-queues', args['num-queues'] ?? 1, 1, MAX_QUEUES);
  const queueSize = queueSizeOption(args['queue-size'] ?? 256);

  const lbs = args['logical-block-size'];
  if (lbs !== undefined && lbs !== 512 && lbs !== 4096) {
    throw new ConfigError('CONFIG_INVALID', `--logical-block-size ${String(lbs)}: expected 512 or 4096`);
  }

  const threads = integerOption('threads', args.threads ?? 0, 0, MAX_QUEUES);

  const nullSize = useNull ? parseSize('--null-size', String(args['null-size'] ?? '1G'), 512) : undefined;
  return {
    file: useNull ? undefined : file,
    nullSize,
    readOnly,
    serial,
    numQueues,
    queueSize,
    logicalBlockSize: lbs as 512 | 4096 | undefined,
    direct: args.direct === true,
    discard,
    writeZeroes,
    writeback,
    threads,
    inlineIo: args['inline-io'] !== false,
  };
}
