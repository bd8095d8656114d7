/**
 * Options every daemon shares, in the vhost-user.rst "Backend program conventions" shape:
 * `--socket-path` xor `--fd` (plus our `--connect`), `--print-capabilities`, `--socket-group`
 * (virtiofsd's), the control socket, and the metrics and log switches. `toCommonConfig` turns parsed
 * arguments into a config or throws ConfigError; it reads only LISTEN_FDS and the group database.
 */
import { execFileSync } from 'node:child_process';

import { ConfigError } from '../errors';
import { LOG_LEVELS, type LogLevel } from '../runtime/logger';
import { listenFds } from '../systemd/listen-fds';

/** LISTEN_FDNAMES name of the control socket (the control socket unit's FileDescriptorName=). */
export const CONTROL_FD_NAME = 'control';

/**
 * `--poll-us` default: 64. Since a batch's first completions go out early (drain.ts), the front-end's
 * next requests arrive within tens of µs of a batch, and a short poll takes them without a kick and a
 * wakeup: on the 2-vCPU VM every bench:blk case went to 1.2x qsd or more, at the same or lower CPU per
 * I/O (docs/benchmarks.md, "Polling on by default"). QEMU's IOThread polls 32 µs by default, Cloud
 * Hypervisor's back-ends about 50. The window adapts and shrinks to nothing while the guest idles.
 */
export const DEFAULT_POLL_US = 64;

/** Largest `--poll-us`: a second of spinning per idle spell is already no longer polling. */
export const MAX_POLL_US = 1_000_000;

/**
 * `--inline-io` / `--no-inline-io`, for the daemons that serve files (the policy: lib/io/engine.ts
 * inlineFlags, applied per op by IoEngine.addFileReadWrite).
 */
export const inlineIoOption = {
  type: 'boolean',
  default: true,
  describe:
    'Do reads and writes of images on tmpfs/ramfs/hugetlbfs, and reads that hit the page cache (RWF_NOWAIT), on the queue thread ' +
    'instead of io_uring: faster at low queue depth. --no-inline-io sends everything to io_uring: use it when large requests on a ' +
    'memory-backed image must not hold up the other queues of the same thread, or to compare',
  group: 'Device:',
} as const;

export const commonOptions = {
  'socket-path': {
    type: 'string',
    describe: 'Listen for the front-end (QEMU -chardev socket,path=...) on this unix socket',
    group: 'Connection:',
  },
  fd: {
    type: 'number',
    describe: 'Use this inherited, already listening unix socket (systemd socket activation sets it by itself)',
    group: 'Connection:',
  },
  connect: {
    type: 'string',
    describe: 'Connect to a front-end listening on this socket (QEMU -chardev socket,server=on), reconnecting after it leaves',
    group: 'Connection:',
  },
  'socket-group': {
    type: 'string',
    describe: 'Make the sockets the daemon creates (--socket-path, --control) mode 0660 with this group (name or gid) instead of 0600',
    group: 'Connection:',
  },
  'print-capabilities': {
    type: 'boolean',
    describe: 'Print the vhost-user capabilities as JSON and exit',
    group: 'Connection:',
  },
  metrics: {
    type: 'string',
    describe: 'Serve Prometheus metrics on [HOST:]PORT at /metrics (host defaults to 127.0.0.1)',
    group: 'Operation:',
  },
  'log-level': {
    choices: LOG_LEVELS,
    default: 'info',
    describe: 'Least severe log level written to stderr (change it at run time: vhostctl call log-level)',
    group: 'Operation:',
  },
  control: {
    type: 'string',
    describe: 'Control socket (JSON-RPC 2.0, one object per line; vhostctl speaks it) at this path, mode 0600',
    group: 'Operation:',
  },
  'poll-us': {
    type: 'number',
    default: DEFAULT_POLL_US,
    describe: 'After a batch, poll each queue (and its I/O) for up to this many microseconds, adaptively, before waiting for a kick; 0: never poll',
    group: 'Operation:',
  },
  'control-fd': {
    type: 'number',
    describe: `Use this inherited, listening unix socket as the control socket (socket activation passes it by itself when named "${CONTROL_FD_NAME}")`,
    group: 'Operation:',
  },
} as const;

export interface CommonArgs {
  'socket-path'?: string;
  fd?: number;
  connect?: string;
  'socket-group'?: string;
  metrics?: string;
  'log-level': string;
  control?: string;
  'control-fd'?: number;
  'poll-us'?: number;
}

export interface CommonConfig {
  socketPath?: string;
  fd?: number;
  connect?: string;
  /** gid for the sockets the daemon creates (mode 0660), or undefined for 0600. */
  socketGroup?: number;
  metrics?: { host: string; port: number };
  logLevel: LogLevel;
  /** Control socket: a path to create, or an inherited listening fd. */
  controlPath?: string;
  controlFd?: number;
  /** Longest adaptive poll window after a batch, µs (0: no polling). */
  pollUs: number;
}

/** Parse `[HOST:]PORT` (IPv6 hosts in brackets). */
export function parseListenAddress(value: string): { host: string; port: number } {
  const match = /^(?:\[([^\]]+)\]:|([^:]+):)?(\d+)$/.exec(value);
  const port = match === null ? NaN : Number(match[3]);
  if (match === null || port > 65535) {
    throw new ConfigError('CONFIG_INVALID', `--metrics ${value}: expected [HOST:]PORT, e.g. 9100 or 127.0.0.1:9100`);
  }
  return { host: match[1] ?? match[2] ?? '127.0.0.1', port };
}

/** A group name or number → gid, through the system's group database (getent: files, LDAP...). */
export function resolveGroup(group: string): number {
  if (/^\d+$/.test(group)) return Number(group);
  let entry = '';
  try {
    entry = execFileSync('getent', ['group', group], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] });
  } catch {
    // getent exits 2 for an unknown group; the check below says so.
  }
  const gid = Number(entry.split(':')[2]);
  if (entry === '' || !Number.isInteger(gid)) throw new ConfigError('CONFIG_INVALID', `--socket-group ${group}: no such group`);
  return gid;
}

function checkFd(option: string, fd: number | undefined): void {
  if (fd !== undefined && (!Number.isInteger(fd) || fd < 0)) {
    throw new ConfigError('CONFIG_INVALID', `--${option} ${fd}: expected a file descriptor number`);
  }
}

/**
 * Turn parsed common arguments into a config. Socket activation (LISTEN_FDS) stands in for --fd, and
 * for --control-fd with the socket named "control" (LISTEN_FDNAMES).
 */
export function toCommonConfig(args: CommonArgs, env: NodeJS.ProcessEnv = process.env): CommonConfig {
  const activated = listenFds(env);
  const activatedControl = activated.filter((s) => s.name === CONTROL_FD_NAME);
  const activatedVhostUser = activated.filter((s) => s.name !== CONTROL_FD_NAME);
  let fd = args.fd;
  const given = [args['socket-path'], fd, args.connect].filter((v) => v !== undefined).length;
  if (given === 0) {
    if (activatedVhostUser.length > 1) {
      throw new ConfigError('CONFIG_INVALID', `systemd passed ${activatedVhostUser.length} vhost-user sockets; the unit must pass exactly one`);
    }
    fd = activatedVhostUser[0]?.fd;
  }
  if (given > 1) {
    throw new ConfigError('CONFIG_CONFLICT', '--socket-path, --fd and --connect exclude each other: give one');
  }
  if (given === 0 && fd === undefined) {
    throw new ConfigError('CONFIG_MISSING', 'no socket: give --socket-path PATH (or --fd N, or --connect PATH, or start under systemd socket activation)');
  }
  checkFd('fd', fd);

  let controlFd = args['control-fd'];
  if (args.control !== undefined && controlFd !== undefined) {
    throw new ConfigError('CONFIG_CONFLICT', '--control and --control-fd exclude each other: give one');
  }
  if (args.control === undefined && controlFd === undefined) {
    if (activatedControl.length > 1) {
      throw new ConfigError('CONFIG_INVALID', `systemd passed ${activatedControl.length} sockets named "${CONTROL_FD_NAME}"; the unit must pass at most one`);
    }
    controlFd = activatedControl[0]?.fd;
  }
  checkFd('control-fd', controlFd);
  if (args.control !== undefined && args.control === args['socket-path']) {
    throw new ConfigError('CONFIG_CONFLICT', `--control ${args.control}: the vhost-user socket has this path; give the control socket its own`);
  }

  const pollUs = args['poll-us'] ?? DEFAULT_POLL_US;
  if (!Number.isInteger(pollUs) || pollUs < 0 || pollUs > MAX_POLL_US) {
    throw new ConfigError('CONFIG_INVALID', `--poll-us ${pollUs}: expected an integer from 0 (no polling) to ${MAX_POLL_US}`);
  }

  const group = args['socket-group'];
  if (group !== undefined && args['socket-path'] === undefined && args.control === undefined) {
    throw new ConfigError('CONFIG_INVALID', '--socket-group applies to the sockets the daemon creates: give --socket-path or --control too');
  }
  return {
    socketPath: args['socket-path'],
    fd,
    connect: args.connect,
    socketGroup: group === undefined ? undefined : resolveGroup(group),
    metrics: args.metrics === undefined ? undefined : parseListenAddress(args.metrics),
    logLevel: args['log-level'] as LogLevel,
    controlPath: args.control,
    controlFd,
    pollUs,
  };
}
