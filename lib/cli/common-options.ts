/**
 * Options every daemon shares, in the vhost-user.rst "Backend program conventions" shape:
 * `--socket-path` xor `--fd` (plus our `--connect`), `--print-capabilities`, and the metrics and log
 * switches. A pure `toCommonConfig` turns parsed arguments into a config or throws ConfigError.
 */
import { ConfigError } from '../errors';
import type { LogLevel } from '../runtime/logger';
import { listenFds } from '../systemd/listen-fds';

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
    choices: ['debug', 'info', 'warn', 'error'],
    default: 'info',
    describe: 'Least severe log level written to stderr',
    group: 'Operation:',
  },
} as const;

export interface CommonArgs {
  'socket-path'?: string;
  fd?: number;
  connect?: string;
  metrics?: string;
  'log-level': string;
}

export interface CommonConfig {
  socketPath?: string;
  fd?: number;
  connect?: string;
  metrics?: { host: string; port: number };
  logLevel: LogLevel;
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

/** Turn parsed common arguments into a config. Socket activation (LISTEN_FDS) stands in for --fd. */
export function toCommonConfig(args: CommonArgs, env: NodeJS.ProcessEnv = process.env): CommonConfig {
  let fd = args.fd;
  const given = [args['socket-path'], fd, args.connect].filter((v) => v !== undefined).length;
  if (given === 0) {
    const activated = listenFds(env);
    if (activated.length > 1) {
      throw new ConfigError('CONFIG_INVALID', `systemd passed ${activated.length} sockets; the unit must pass exactly one`);
    }
    fd = activated[0];
  }
  if (given > 1) {
    throw new ConfigError('CONFIG_CONFLICT', '--socket-path, --fd and --connect exclude each other: give one');
  }
  if (given === 0 && fd === undefined) {
    throw new ConfigError('CONFIG_MISSING', 'no socket: give --socket-path PATH (or --fd N, or --connect PATH, or start under systemd socket activation)');
  }
  if (fd !== undefined && (!Number.isInteger(fd) || fd < 0)) {
    throw new ConfigError('CONFIG_INVALID', `--fd ${fd}: expected a file descriptor number`);
  }
  return {
    socketPath: args['socket-path'],
    fd,
    connect: args.connect,
    metrics: args.metrics === undefined ? undefined : parseListenAddress(args.metrics),
    logLevel: args['log-level'] as LogLevel,
  };
}
