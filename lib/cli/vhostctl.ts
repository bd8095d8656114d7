#!/usr/bin/env node
/**
 * vhostctl: talk to a running vhostd daemon through its control socket (`--control PATH`).
 *
 *   vhostctl --control /run/vhostd/blk0.ctl status
 *   vhostctl --control /run/vhostd/blk0.ctl resize
 *   vhostctl --control /run/vhostd/blk0.ctl call log-level '{"level":"debug"}'
 *
 * Human output by default, `--json` prints the result as one JSON line for scripts. Every failure
 * (no socket, daemon not running, a JSON-RPC error) is one line on stderr and exit status 1.
 */
import yargs from 'yargs';

import { ControlClient, ControlClientError } from '../control/client';
import { parseSize } from './size';

const PROGRAM = 'vhostctl';

interface QueueStatus {
  index: number;
  size: number;
  enabled: boolean;
  started: boolean;
  broken: boolean;
  kicks: number;
  requests: number;
}

interface Status {
  device: string;
  pid: number;
  frontend: { connected: boolean; features: string; protocolFeatures: string };
  queues: QueueStatus[];
  /** The device's own state (balloon: target, actual, guest statistics). */
  state?: Record<string, unknown>;
}

interface Resize {
  device: string;
  previousSectors: number;
  sectors: number;
  bytes: number;
}

function formatStatus(status: Status): string {
  const { frontend } = status;
  const lines = [`${status.device} (pid ${status.pid}): front-end ${frontend.connected ? 'connected' : 'not connected'}`];
  if (frontend.connected) lines.push(`  features ${frontend.features}, protocol features ${frontend.protocolFeatures}`);
  for (const q of status.queues) {
    const state = q.broken ? 'broken' : q.started ? 'running' : q.enabled ? 'enabled' : 'stopped';
    lines.push(`  queue ${q.index}: ${state}, size ${q.size}, ${q.kicks} kicks, ${q.requests} requests`);
  }
  for (const [key, value] of Object.entries(status.state ?? {})) lines.push(`  ${key}: ${typeof value === 'object' ? JSON.stringify(value) : String(value)}`);
  return lines.join('\n');
}

interface Target {
  device: string;
  previousPages: number;
  targetPages: number;
  targetBytes: number;
  actualPages: number;
  notified: boolean;
}

function formatTarget(r: Target): string {
  return (
    `${r.device}: target ${r.targetBytes} bytes (${r.targetPages} pages, was ${r.previousPages}); the guest reports ${r.actualPages} pages` +
    (r.notified ? '' : '\n  (no front-end was told: the guest reads the target when it next looks)')
  );
}

function formatResize(r: Resize): string {
  return r.sectors === r.previousSectors
    ? `${r.device}: size unchanged, ${r.sectors} sectors (${r.bytes} bytes)`
    : `${r.device}: resized from ${r.previousSectors} to ${r.sectors} sectors (${r.bytes} bytes)`;
}

interface Invocation {
  method: string;
  params: Record<string, unknown>;
  format: (result: unknown) => string;
}

/** Parse the command line, call the daemon, print; resolves with the exit status. */
export async function main(argv: string[]): Promise<number> {
  let invocation: Invocation | undefined;
  const parser = yargs(argv)
    .scriptName(PROGRAM)
    .usage('Usage: $0 --control PATH <command>\n\nTalk to a running vhostd daemon through its control socket (the daemon\'s --control PATH).')
    .option('control', { type: 'string', demandOption: true, describe: 'The daemon\'s control socket (VHOSTCTL_CONTROL)' })
    .option('device', { type: 'string', describe: 'Device the call is for; refused unless the daemon serves it' })
    .option('json', { type: 'boolean', default: false, describe: 'Print the result as one JSON line' })
    .env('VHOSTCTL')
    .command('status', 'Device, front-end, negotiated features, queues', {}, () => {
      invocation = { method: 'status', params: {}, format: (r) => formatStatus(r as Status) };
    })
    .command('resize', 'Re-read the image size after growing it and tell the guest (blk; what SIGHUP does)', {}, () => {
      invocation = { method: 'resize', params: {}, format: (r) => formatResize(r as Resize) };
    })
    .command(
      'set-target <size>',
      'Set the balloon size, the memory to take from the guest, e.g. 512M, 2G or 0 (balloon)',
      (y) => y.positional('size', { type: 'string', demandOption: true }),
      (args) => {
        invocation = { method: 'set-target', params: { bytes: parseSize('set-target', args.size) }, format: (r) => formatTarget(r as Target) };
      },
    )
    .command(
      'call <method> [params]',
      'Call any method (`call methods` lists them) with params as a JSON object',
      (y) => y.positional('method', { type: 'string', demandOption: true }).positional('params', { type: 'string', describe: 'e.g. \'{"level":"debug"}\'' }),
      (args) => {
        let params: unknown = {};
        if (args.params !== undefined) {
          try {
            params = JSON.parse(args.params);
          } catch {
            params = undefined;
          }
        }
        if (typeof params !== 'object' || params === null || Array.isArray(params)) {
          throw new Error(`params ${args.params}: expected a JSON object, e.g. '{"level":"debug"}'`);
        }
        invocation = { method: args.method, params: params as Record<string, unknown>, format: (r) => JSON.stringify(r, null, 2) };
      },
    )
    .demandCommand(1, 'give a command: status, resize, set-target or call')
    .strict()
    .example('$0 --control /run/vhostd/blk0.ctl status', 'What the daemon serves and its queues')
    .example('$0 --control /run/vhostd/blk0.ctl resize', 'After truncate -s +1G disk.img: the guest sees the new size')
    .example('$0 --control /run/vhostd/balloon0.ctl set-target 1G', 'The guest gives 1 GiB back to the host')
    .example('$0 --control /run/vhostd/blk0.ctl call log-level \'{"level":"debug"}\'', 'Log more, without a restart')
    .wrap(Math.min(110, process.stdout.columns ?? 100))
    .help()
    .version()
    .fail((message, err) => {
      throw err ?? new Error(message);
    });

  let args: { control: string; device?: string; json: boolean };
  try {
    args = await parser.parseAsync();
  } catch (err) {
    process.stderr.write(`${PROGRAM}: ${(err as Error).message}\nTry '${PROGRAM} --help'.\n`);
    return 1;
  }
  // --help and --version print and end here.
  if (invocation === undefined) return 0;

  const params = args.device === undefined ? invocation.params : { ...invocation.params, device: args.device };
  let client: ControlClient | undefined;
  try {
    client = await ControlClient.connect(args.control);
    const result = await client.call(invocation.method, params);
    process.stdout.write(`${args.json ? JSON.stringify(result) : invocation.format(result)}\n`);
    return 0;
  } catch (err) {
    if (!(err instanceof ControlClientError)) throw err;
    if (args.json) process.stdout.write(`${JSON.stringify({ error: err.rpcError ?? { code: err.code, message: err.message } })}\n`);
    process.stderr.write(`${PROGRAM}: ${invocation.method}: ${err.message}\n`);
    return 1;
  } finally {
    client?.close();
  }
}

if (require.main === module) {
  void main(process.argv.slice(2)).then((status) => {
    process.exitCode = status;
  });
}
