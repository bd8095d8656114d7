/**
 * A packet capture on one interface, for checking frames a daemon puts on the wire (an AF_PACKET socket
 * in python3, which scripts/install-deps.sh installs; no tcpdump needed). Needs root.
 */
import { spawn } from 'node:child_process';

import { diesWithParent } from './qemu-guest';

/** Prints "<pkttype> <hex>" for every frame of the wanted EtherTypes that the interface did not send itself. */
const CAPTURE = `
import socket, sys
types = {int(t, 16) for t in sys.argv[2].split(',')}
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
s.bind((sys.argv[1], 0))
print('capturing', flush=True)
while True:
    frame, address = s.recvfrom(65535)
    # PACKET_OUTGOING: the kernel sent it out of this interface (for a TAP: towards the daemon).
    if address[2] != socket.PACKET_OUTGOING and len(frame) >= 14 and int.from_bytes(frame[12:14], 'big') in types:
        print(address[2], frame.hex(), flush=True)
`;

export interface PacketCapture {
  /** Frames captured so far, in order. */
  readonly frames: Buffer[];
  /** End the capture. */
  stop(): void;
}

/**
 * Capture the frames with one of `etherTypes` that arrive on `iface` (on a TAP: what the program behind
 * it wrote, RX from the kernel's view), optionally in network namespace `namespace`. Resolves once the
 * socket is bound, so nothing sent after that is missed.
 */
export function capturePackets(iface: string, etherTypes: readonly number[], namespace?: string): Promise<PacketCapture> {
  const command = ['python3', '-c', CAPTURE, iface, etherTypes.map((t) => t.toString(16)).join(',')];
  const argv = diesWithParent(namespace === undefined ? command : ['ip', 'netns', 'exec', namespace, ...command]);
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'pipe'] });
  const frames: Buffer[] = [];
  let partial = '';
  let stderr = '';
  const stop = () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  };
  return new Promise((resolve, reject) => {
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.once('error', reject);
    child.once('exit', (code) => reject(new Error(`capture on ${iface} exited (${code}): ${stderr}`)));
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (text: string) => {
      const lines = (partial + text).split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) {
        if (line === 'capturing') resolve({ frames, stop });
        const hex = line.split(' ')[1];
        if (hex !== undefined) frames.push(Buffer.from(hex, 'hex'));
      }
    });
  });
}
