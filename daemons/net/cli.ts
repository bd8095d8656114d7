/**
 * Command line of vhost-user-net: the yargs options (also the source of the README option list) and a
 * pure {@link toConfig}. Opening the TAP happens in main.ts.
 *
 * No --mac: QEMU keeps the config space (MAC, link status) and the control queue of a vhost-user net
 * device (hw/net/vhost_net.c user_feature_bits has neither VIRTIO_NET_F_MAC nor CTRL_VQ), so the MAC
 * is QEMU's `-device virtio-net-pci,mac=...`.
 */
import type { Options } from 'yargs';

import { integerOption, queueSizeOption } from '../../lib/cli/option-checks';
import { ConfigError } from '../../lib/errors';

export const PROGRAM = 'vhost-user-net';

export const DESCRIPTION =
  'Serve the rx/tx queues of a virtio-net device (virtio 1.2 §5.1) to a vhost-user front-end such as QEMU, ' +
  'moving frames between guest memory and a TAP interface with readv/writev and no copy. The TAP must exist, ' +
  'with multi_queue and vnet_hdr (or give --create-tap and CAP_NET_ADMIN); attach it to a bridge or give it an ' +
  'address on the host as for any VM NIC.';

export const options = {
  tap: {
    type: 'string',
    describe: 'TAP interface to attach to (ip tuntap add dev NAME mode tap multi_queue vnet_hdr user USER)',
    group: 'Device:',
  },
  'create-tap': {
    type: 'boolean',
    default: false,
    describe: 'Create the --tap interface if it does not exist (needs CAP_NET_ADMIN); it goes away when the daemon exits',
    group: 'Device:',
  },
  queues: {
    type: 'number',
    default: 1,
    describe: 'Queue pairs (QEMU -netdev vhost-user,queues=N and -device virtio-net-pci,mq=on); one TAP queue each',
    group: 'Device:',
  },
  threads: {
    type: 'number',
    default: 0,
    describe: 'Run the queue pairs in this many worker threads (pair p in thread p % N); 0: all on the main thread',
    group: 'Device:',
  },
  mtu: {
    type: 'number',
    default: 1500,
    describe: 'Largest MTU: guest frames over MTU + 18 bytes without GSO are dropped, and QEMU host_mtu= above it is refused',
    group: 'Device:',
  },
  'tx-uring': {
    type: 'boolean',
    default: true,
    describe: 'Write guest frames to the TAP with io_uring, one system call per batch (--no-tx-uring: one writev per frame, as without io_uring)',
    group: 'Device:',
  },
  'queue-size': {
    type: 'number',
    default: 1024,
    describe: 'Largest queue size accepted (QEMU rx_queue_size=/tx_queue_size=, a power of two up to 32768)',
    group: 'Device:',
  },
} satisfies Record<string, Options>;

export const EXAMPLES: [string, string][] = [
  ['$0 --socket-path /run/vhostd/net0.sock --tap vm1tap0', 'One queue pair on an existing TAP'],
  ['$0 --socket-path /run/vhostd/net0.sock --tap vm1tap0 --queues 4 --threads 2 --mtu 9000', 'Four pairs in two threads, jumbo frames'],
];

export const EPILOGUE = `Make the TAP (once, as root; the daemon then runs as USER without capabilities):
  ip tuntap add dev vm1tap0 mode tap multi_queue vnet_hdr user USER
  ip link set vm1tap0 master br0 up          # or: ip addr add 192.0.2.1/24 dev vm1tap0; ip link set vm1tap0 up

QEMU (guest memory must be shared with the daemon; queues= matches --queues):
  qemu-system-x86_64 ... \\
    -object memory-backend-memfd,id=mem,size=4G,share=on -machine memory-backend=mem \\
    -chardev socket,id=c0,path=/run/vhostd/net0.sock \\
    -netdev vhost-user,id=n0,chardev=c0,queues=4 \\
    -device virtio-net-pci,netdev=n0,mq=on,mac=52:54:00:12:34:56,host_mtu=1500

libvirt (domain XML):
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <interface type='vhostuser'>
    <mac address='52:54:00:12:34:56'/>
    <source type='unix' path='/run/vhostd/net0.sock' mode='client'><reconnect enabled='yes' timeout='10'/></source>
    <model type='virtio'/>
    <driver queues='4'/>
  </interface>

Signals: SIGTERM stops.`;

export interface NetConfig {
  tap: string;
  createTap: boolean;
  queuePairs: number;
  /** Worker threads for the queue pairs; 0: the main thread. */
  threads: number;
  mtu: number;
  queueSize: number;
  txUring: boolean;
}

/** Most queue pairs: Linux's MAX_TAP_QUEUES is 256, QEMU's virtio-net VIRTIO_QUEUE_MAX allows 511 pairs. */
export const MAX_QUEUE_PAIRS = 256;

/** Pure: parsed arguments → config. Throws ConfigError on anything wrong. */
export function toConfig(args: Record<string, unknown>): NetConfig {
  const tap = args.tap as string | undefined;
  if (tap === undefined || tap === '') {
    throw new ConfigError('CONFIG_MISSING', 'no TAP: give --tap NAME (make it with: ip tuntap add dev NAME mode tap multi_queue vnet_hdr user $(id -un))');
  }
  // IFNAMSIZ is 16 with the terminating NUL; the name goes into /sys/class/net/NAME.
  if (tap.length > 15 || !/^[A-Za-z0-9_.-]+$/.test(tap) || tap === '.' || tap === '..') {
    throw new ConfigError('CONFIG_INVALID', `--tap ${JSON.stringify(tap)}: expected an interface name of 1 to 15 letters, digits, '_', '.' or '-'`);
  }
  const queuePairs = integerOption('queues', args.queues ?? 1, 1, MAX_QUEUE_PAIRS);
  const threads = integerOption('threads', args.threads ?? 0, 0, MAX_QUEUE_PAIRS);
  // 68: the IPv4 minimum (RFC 791), as NET_SET_MTU's range; 65535: the largest IP packet.
  const mtu = integerOption('mtu', args.mtu ?? 1500, 68, 65535);
  const queueSize = queueSizeOption(args['queue-size'] ?? 1024);
  return { tap, createTap: args['create-tap'] === true, queuePairs, threads, mtu, queueSize, txUring: args['tx-uring'] !== false };
}
