/**
 * TAPs for net tests and the demo, kept off the host's own networking. Needs root.
 * - `createBridgedTap`: the TAP (multi_queue, vnet_hdr, in the host's network namespace, where the daemon
 *   looks it up) sits on a bridge with one end of a veth pair; the other end lives in a network namespace
 *   of its own with `peerIp`, so the kernel there answers ARP and ping. Neither the bridge nor the TAP has
 *   an address.
 * - `namespaceWithTap`: the TAP itself, with an address, in a namespace of its own; the daemon runs in
 *   that namespace (`startDaemon(..., { prefix: ['ip', 'netns', 'exec', namespace] })`), as do host-side
 *   peers (`runInNamespace`).
 */
import { execFileSync, spawn } from 'node:child_process';

export interface BridgedTap {
  /** The TAP for `--tap`. */
  readonly tap: string;
  /** Every TAP on the bridge (`tap` first), as many as `tapCount` asked for. */
  readonly taps: readonly string[];
  /** The peer's namespace (for `ip netns exec`). */
  readonly namespace: string;
  /** Remove every interface and the namespace. Idempotent. */
  close(): void;
}

/**
 * Interfaces `<base>t` (TAP), `<base>b` (bridge), `<base>v`/`<base>p` (veth), namespace `<base>`;
 * `base` has at most 14 characters. The peer gets `peerMac` and `peerCidr` (e.g. 10.79.0.1/24).
 * `tapCount` > 1 puts more TAPs on the bridge, `<base>t1`, `<base>t2`... (a live migration's
 * destination on a port of its own); `base` then has at most 13 characters.
 */
export function createBridgedTap(base: string, peerMac: string, peerCidr: string, tapCount = 1): BridgedTap {
  const [bridge, veth, peer, namespace] = [`${base}b`, `${base}v`, `${base}p`, base];
  const taps = Array.from({ length: tapCount }, (_, i) => (i === 0 ? `${base}t` : `${base}t${i}`));
  const tap = taps[0]!;
  const run = (...args: string[]) => execFileSync(args[0]!, args.slice(1));
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    for (const dev of [...taps, bridge, veth]) execFileSync('ip', ['link', 'del', dev], { stdio: 'ignore' });
    execFileSync('ip', ['netns', 'del', namespace], { stdio: 'ignore' });
  };
  try {
    run('ip', 'netns', 'add', namespace);
    for (const dev of taps) run('ip', 'tuntap', 'add', 'dev', dev, 'mode', 'tap', 'multi_queue', 'vnet_hdr');
    run('ip', 'link', 'add', bridge, 'type', 'bridge');
    run('ip', 'link', 'add', veth, 'type', 'veth', 'peer', 'name', peer);
    // IPv6 off keeps router solicitations and the like out of the tests' frames.
    for (const dev of [...taps, bridge, veth]) run('sysctl', '-qw', `net.ipv6.conf.${dev}.disable_ipv6=1`);
    for (const dev of taps) run('ip', 'link', 'set', dev, 'master', bridge);
    run('ip', 'link', 'set', veth, 'master', bridge);
    run('ip', 'link', 'set', peer, 'netns', namespace);
    run('ip', 'netns', 'exec', namespace, 'sysctl', '-qw', `net.ipv6.conf.${peer}.disable_ipv6=1`);
    run('ip', '-n', namespace, 'link', 'set', peer, 'address', peerMac);
    run('ip', '-n', namespace, 'addr', 'add', peerCidr, 'dev', peer);
    run('ip', '-n', namespace, 'link', 'set', peer, 'up');
    for (const dev of [...taps, veth, bridge]) run('ip', 'link', 'set', dev, 'up');
  } catch (err) {
    close();
    throw err;
  }
  return { tap, taps, namespace, close };
}

/** What `namespaceWithTap` cleans up with: ava's `t` or anything else with `teardown`. */
export interface Teardown {
  teardown(fn: () => void): void;
}

let namespaces = 0;

/**
 * A fresh network namespace holding a multi-queue vnet_hdr TAP with `hostCidr` (e.g. 10.78.0.1/24) and
 * `mtu`, up; the namespace (and so the TAP) is removed at teardown.
 */
export function namespaceWithTap(t: Teardown, hostCidr: string, mtu = 1500): { namespace: string; tap: string } {
  const namespace = `vhtn${process.pid % 100000}x${namespaces++}`;
  const tap = `${namespace}t`;
  execFileSync('ip', ['netns', 'add', namespace]);
  t.teardown(() => execFileSync('ip', ['netns', 'del', namespace]));
  const ip = (...args: string[]) => execFileSync('ip', ['-n', namespace, ...args]);
  ip('tuntap', 'add', 'dev', tap, 'mode', 'tap', 'multi_queue', 'vnet_hdr');
  ip('link', 'set', 'dev', tap, 'mtu', String(mtu));
  ip('addr', 'add', hostCidr, 'dev', tap);
  ip('link', 'set', 'dev', tap, 'up');
  return { namespace, tap };
}

export interface RunInNamespaceOptions {
  /** Kills the command (SIGTERM) when aborted, e.g. a server at the test's teardown. */
  readonly signal?: AbortSignal;
  /** Called with each chunk of output as it arrives (to see a server say that it listens). */
  readonly onOutput?: (text: string) => void;
}

/**
 * Runs `command` in `namespace` to its end, asynchronously (a guest in this process keeps running), and
 * resolves with its exit status (null when killed) and its stdout and stderr interleaved.
 */
export function runInNamespace(namespace: string, command: readonly string[], options: RunInNamespaceOptions = {}): Promise<{ status: number | null; output: string }> {
  const child = spawn('ip', ['netns', 'exec', namespace, ...command], { stdio: ['ignore', 'pipe', 'pipe'], signal: options.signal });
  let output = '';
  const collect = (chunk: Buffer) => {
    output += chunk.toString();
    options.onOutput?.(chunk.toString());
  };
  child.stdout.on('data', collect);
  child.stderr.on('data', collect);
  // An abort surfaces as an 'error' event (AbortError) before 'close'; the status tells it anyway.
  child.on('error', () => {});
  return new Promise((resolve) => child.once('close', (status) => resolve({ status, output })));
}

export interface InterfaceCounters {
  rxPackets: number;
  rxBytes: number;
  txPackets: number;
  txBytes: number;
}

/** An interface's packet and byte counters (`ip -s link`), in `namespace` or the host's. */
export function interfaceCounters(dev: string, namespace?: string): InterfaceCounters {
  const args = [...(namespace === undefined ? [] : ['-n', namespace]), '-s', '-j', 'link', 'show', 'dev', dev];
  const [link] = JSON.parse(execFileSync('ip', args, { encoding: 'utf8' })) as {
    stats64: { rx: { packets: number; bytes: number }; tx: { packets: number; bytes: number } };
  }[];
  const { rx, tx } = link!.stats64;
  return { rxPackets: rx.packets, rxBytes: rx.bytes, txPackets: tx.packets, txBytes: tx.bytes };
}
