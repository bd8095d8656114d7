/**
 * A TAP for net tests and the demo that reaches a peer without touching the host's own networking:
 * the TAP (multi_queue, vnet_hdr, in the host's network namespace, where the daemon looks it up) sits
 * on a bridge with one end of a veth pair; the other end lives in a network namespace of its own with
 * `peerIp`, so the kernel there answers ARP and ping. Neither the bridge nor the TAP has an address.
 * Needs root.
 */
import { execFileSync } from 'node:child_process';

export interface BridgedTap {
  /** The TAP for `--tap`. */
  readonly tap: string;
  /** The peer's namespace (for `ip netns exec`). */
  readonly namespace: string;
  /** Remove every interface and the namespace. Idempotent. */
  close(): void;
}

/**
 * Interfaces `<base>t` (TAP), `<base>b` (bridge), `<base>v`/`<base>p` (veth), namespace `<base>`;
 * `base` has at most 14 characters. The peer gets `peerMac` and `peerCidr` (e.g. 10.79.0.1/24).
 */
export function createBridgedTap(base: string, peerMac: string, peerCidr: string): BridgedTap {
  const [tap, bridge, veth, peer, namespace] = [`${base}t`, `${base}b`, `${base}v`, `${base}p`, base];
  const run = (...args: string[]) => execFileSync(args[0]!, args.slice(1));
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    for (const dev of [tap, bridge, veth]) execFileSync('ip', ['link', 'del', dev], { stdio: 'ignore' });
    execFileSync('ip', ['netns', 'del', namespace], { stdio: 'ignore' });
  };
  try {
    run('ip', 'netns', 'add', namespace);
    run('ip', 'tuntap', 'add', 'dev', tap, 'mode', 'tap', 'multi_queue', 'vnet_hdr');
    run('ip', 'link', 'add', bridge, 'type', 'bridge');
    run('ip', 'link', 'add', veth, 'type', 'veth', 'peer', 'name', peer);
    // IPv6 off keeps router solicitations and the like out of the tests' frames.
    for (const dev of [tap, bridge, veth]) run('sysctl', '-qw', `net.ipv6.conf.${dev}.disable_ipv6=1`);
    run('ip', 'link', 'set', tap, 'master', bridge);
    run('ip', 'link', 'set', veth, 'master', bridge);
    run('ip', 'link', 'set', peer, 'netns', namespace);
    run('ip', 'netns', 'exec', namespace, 'sysctl', '-qw', `net.ipv6.conf.${peer}.disable_ipv6=1`);
    run('ip', '-n', namespace, 'link', 'set', peer, 'address', peerMac);
    run('ip', '-n', namespace, 'addr', 'add', peerCidr, 'dev', peer);
    run('ip', '-n', namespace, 'link', 'set', peer, 'up');
    for (const dev of [tap, veth, bridge]) run('ip', 'link', 'set', dev, 'up');
  } catch (err) {
    close();
    throw err;
  }
  return { tap, namespace, close };
}
