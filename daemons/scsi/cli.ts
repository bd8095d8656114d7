/**
 * Command line of vhost-user-scsi: the yargs options (also the source of the README option list), a
 * pure {@link toConfig} that turns parsed arguments into a {@link ScsiConfig} or throws ConfigError, and
 * the pure parsers of one `--lun` value and of a `--luns` JSON list (main.ts reads the file).
 */
import type { Options } from 'yargs';

import { inlineIoOption } from '../../lib/cli/common-options';
import { ConfigError } from '../../lib/errors';
import { MAX_LUN } from './target/constants';

export const PROGRAM = 'vhost-user-scsi';

export const DESCRIPTION =
  'Serve raw images or block devices as the logical units of an emulated SCSI target to QEMU ' +
  "(vhost-user-scsi-pci, virtio 1.2 §5.6): many disks on one controller, the SCSI command set emulated " +
  'here (INQUIRY and VPD pages, READ/WRITE 6-16 with FUA, SYNCHRONIZE CACHE, UNMAP, MODE SENSE, REPORT ' +
  'LUNS...), task management on the control queue, units added, removed and resized while the guest runs (vhostctl). Data moves through io_uring straight into guest memory, ' +
  'one ring per request queue whatever the number of LUNs (images in memory, and page-cache hits, are copied on the queue thread: --inline-io).';

export const options = {
  lun: {
    type: 'string',
    array: true,
    describe: 'A logical unit: [TARGET:]LUN=IMAGE[,ro][,serial=S][,block-size=512|4096][,discard] (repeatable; target 0 when omitted)',
    group: 'Device:',
  },
  luns: {
    type: 'string',
    describe: 'A JSON file listing logical units: [{"target":0,"lun":1,"file":"a.img","readOnly":false,"serial":"S","blockSize":512,"discard":true}, ...]',
    group: 'Device:',
  },
  'num-queues': {
    type: 'number',
    default: 1,
    describe: 'Request queues (QEMU num_queues= must not exceed it); the device adds the control and event queues',
    group: 'Device:',
  },
  'queue-size': {
    type: 'number',
    default: 256,
    describe: 'Largest queue size accepted (a power of two, 2..32768); QEMU virtqueue_size= must not exceed it',
    group: 'Device:',
  },
  direct: {
    type: 'boolean',
    default: false,
    describe: 'Open the images with O_DIRECT (bypass the host page cache)',
    group: 'Device:',
  },
  threads: {
    type: 'number',
    default: 0,
    describe: 'Run the request queues in this many worker threads; control and event queues stay on the main thread. 0: all on the main thread',
    group: 'Device:',
  },
  'inline-io': inlineIoOption,
} satisfies Record<string, Options>;

export const EXAMPLES: [string, string][] = [
  ['$0 --socket-path /run/vhostd/scsi0.sock --lun 0=/var/lib/images/a.img --lun 1=/var/lib/images/b.img', 'Two disks, LUNs 0 and 1 of target 0'],
  ['$0 --socket-path /tmp/scsi.sock --lun 0=base.img,ro,serial=BASE --lun 1=/dev/vg0/data,discard --num-queues 4', 'A read-only disk and a thin LV with UNMAP, 4 request queues'],
  ['$0 --socket-path /tmp/scsi.sock --luns luns.json --threads 2 --num-queues 4', 'Hundreds of LUNs from a JSON list, request queues in 2 threads'],
];

export const EPILOGUE = `QEMU (guest memory must be shared with the daemon):
  qemu-system-x86_64 ... \\
    -object memory-backend-memfd,id=mem,size=4G,share=on -machine memory-backend=mem \\
    -chardev socket,id=c0,path=/run/vhostd/scsi0.sock \\
    -device vhost-user-scsi-pci,chardev=c0,num_queues=4

libvirt (domain XML):
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  and, under <qemu:commandline>, the -chardev and -device arguments above
  (libvirt has no vhost-user SCSI controller model; xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0').

Hotplug (a daemon started with --control PATH):
  vhostctl --control PATH call lun-add '{"spec":"0:5=/var/lib/images/extra.img"}'
  vhostctl --control PATH call lun-resize '{"lun":"0:5"}'
  vhostctl --control PATH call lun-remove '{"lun":"0:5"}'

Signals: SIGTERM stops.`;

/** One logical unit. */
export interface LunConfig {
  target: number;
  lun: number;
  file: string;
  readOnly: boolean;
  serial: string;
  /** Undefined: the block device's own, or 512. */
  blockSize?: 512 | 4096;
  discard: boolean;
}

/** What the daemon runs with. */
export interface ScsiConfig {
  /** Units from --lun; main.ts adds those of {@link lunsFile}. */
  luns: LunConfig[];
  lunsFile?: string;
  requestQueues: number;
  queueSize: number;
  direct: boolean;
  threads: number;
  /** `--inline-io` (default) / `--no-inline-io`: I/O that cannot wait for a disk runs on the queue thread. */
  inlineIo: boolean;
}

/** Most request queues: every queue costs an io_uring. */
export const MAX_QUEUES = 64;
/** Highest target number (QEMU's max_target). */
export const MAX_TARGET = 255;

function integerIn(option: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new ConfigError('CONFIG_INVALID', `--${option} ${String(value)}: expected an integer from ${min} to ${max}`);
  }
  return value;
}

function checkUnit(where: string, unit: LunConfig): LunConfig {
  if (!Number.isInteger(unit.target) || unit.target < 0 || unit.target > MAX_TARGET) throw new ConfigError('CONFIG_INVALID', `${where}: target ${unit.target} is not in 0..${MAX_TARGET}`);
  if (!Number.isInteger(unit.lun) || unit.lun < 0 || unit.lun > MAX_LUN) throw new ConfigError('CONFIG_INVALID', `${where}: LUN ${unit.lun} is not in 0..${MAX_LUN}`);
  if (typeof unit.file !== 'string' || unit.file === '') throw new ConfigError('CONFIG_INVALID', `${where}: no image file`);
  if (typeof unit.serial !== 'string' || unit.serial.length > 36 || !/^[\x21-\x7e]*$/.test(unit.serial)) {
    throw new ConfigError('CONFIG_INVALID', `${where}: serial ${JSON.stringify(unit.serial)}: expected at most 36 printable ASCII characters without spaces`);
  }
  if (unit.blockSize !== undefined && unit.blockSize !== 512 && unit.blockSize !== 4096) {
    throw new ConfigError('CONFIG_INVALID', `${where}: block size ${String(unit.blockSize)}: expected 512 or 4096`);
  }
  if (unit.readOnly && unit.discard) throw new ConfigError('CONFIG_CONFLICT', `${where}: a read-only unit cannot discard`);
  return unit;
}

/** Parse one `--lun` value: `[TARGET:]LUN=IMAGE[,ro][,serial=S][,block-size=N][,discard]`. */
export function parseLun(value: string): LunConfig {
  const where = `--lun ${value}`;
  const m = /^(?:(\d+):)?(\d+)=([^,]+)((?:,[^,]*)*)$/.exec(value);
  if (m === null) throw new ConfigError('CONFIG_INVALID', `${where}: expected [TARGET:]LUN=IMAGE[,ro][,serial=S][,block-size=512|4096][,discard]`);
  const unit: LunConfig = { target: Number(m[1] ?? 0), lun: Number(m[2]), file: m[3]!, readOnly: false, serial: '', discard: false };
  for (const flag of m[4]!.split(',').slice(1)) {
    const [name, arg] = flag.split('=', 2) as [string, string | undefined];
    if (name === 'ro' && arg === undefined) unit.readOnly = true;
    else if (name === 'discard' && arg === undefined) unit.discard = true;
    else if (name === 'serial' && arg !== undefined) unit.serial = arg;
    else if (name === 'block-size' && arg !== undefined) unit.blockSize = Number(arg) as 512 | 4096;
    else throw new ConfigError('CONFIG_INVALID', `${where}: unknown setting ${JSON.stringify(flag)} (ro, discard, serial=S, block-size=512|4096)`);
  }
  return checkUnit(where, unit);
}

/** Parse the text of a `--luns` file (`source` names it in errors). */
export function parseLunList(text: string, source: string): LunConfig[] {
  let list: unknown;
  try {
    list = JSON.parse(text);
  } catch (err) {
    throw new ConfigError('CONFIG_INVALID', `--luns ${source}: not JSON (${(err as Error).message})`);
  }
  if (!Array.isArray(list)) throw new ConfigError('CONFIG_INVALID', `--luns ${source}: expected a JSON list of units`);
  return list.map((entry: unknown, i) => {
    const where = `--luns ${source} entry ${i}`;
    if (typeof entry !== 'object' || entry === null) throw new ConfigError('CONFIG_INVALID', `${where}: expected an object`);
    const e = entry as Record<string, unknown>;
    const known = new Set(['target', 'lun', 'file', 'readOnly', 'serial', 'blockSize', 'discard']);
    for (const key of Object.keys(e)) if (!known.has(key)) throw new ConfigError('CONFIG_INVALID', `${where}: unknown key ${JSON.stringify(key)}`);
    return checkUnit(where, {
      target: (e.target ?? 0) as number,
      lun: e.lun as number,
      file: e.file as string,
      readOnly: e.readOnly === true,
      serial: (e.serial ?? '') as string,
      blockSize: e.blockSize as 512 | 4096 | undefined,
      discard: e.discard === true,
    });
  });
}

/** Refuse two units at the same address. */
export function checkDistinct(units: LunConfig[]): void {
  const seen = new Set<number>();
  for (const u of units) {
    const key = u.target * (MAX_LUN + 1) + u.lun;
    if (seen.has(key)) throw new ConfigError('CONFIG_CONFLICT', `LUN ${u.target}:${u.lun} is given twice`);
    seen.add(key);
  }
}

/** Pure: parsed arguments → config. Throws ConfigError on anything wrong or contradictory. */
export function toConfig(args: Record<string, unknown>): ScsiConfig {
  const luns = ((args.lun as string[] | undefined) ?? []).map(parseLun);
  const lunsFile = args.luns as string | undefined;
  if (luns.length === 0 && lunsFile === undefined) {
    throw new ConfigError('CONFIG_MISSING', 'no logical unit: give --lun LUN=IMAGE (repeatable) or --luns FILE');
  }
  checkDistinct(luns);
  const requestQueues = integerIn('num-queues', args['num-queues'] ?? 1, 1, MAX_QUEUES);
  const queueSize = integerIn('queue-size', args['queue-size'] ?? 256, 2, 32768);
  // virtio 1.2 §2.7: split ring sizes are powers of two.
  if ((queueSize & (queueSize - 1)) !== 0) {
    throw new ConfigError('CONFIG_INVALID', `--queue-size ${queueSize}: expected a power of two (e.g. 128, 256, 1024)`);
  }
  const threads = integerIn('threads', args.threads ?? 0, 0, MAX_QUEUES);
  return { luns, lunsFile, requestQueues, queueSize, direct: args.direct === true, threads, inlineIo: args['inline-io'] !== false };
}
