import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import test from 'ava';

import {
  IFF_ATTACH_QUEUE,
  IFF_DETACH_QUEUE,
  IFF_MULTI_QUEUE,
  IFF_NO_PI,
  IFF_TAP,
  IFF_VNET_HDR,
  IORING_OP,
  native,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  TUN_F_TSO_ECN,
  TUN_F_UFO,
  TUN_F_USO4,
  TUN_F_USO6,
} from '../../native';
import { arpRequest as arpFrame, echoRequest as echoFrame, isArpReply, isEchoReply } from '../helpers/frames';
import { interfaceCounters } from '../helpers/net-topology';
import { until } from '../helpers/until';
import { collect, makeBatch, nativeError } from './helpers';

// These tests need root (CAP_NET_ADMIN) and /dev/net/tun; each uses its own TAP (and network
// namespace), so nothing reaches the host's interfaces.

const TAP_FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE;
/** struct virtio_net_hdr_mrg_rxbuf (virtio 1.2 §5.1.6): the header size every frame carries. */
const VNET_HDR_SIZE = 12;

let serial = 0;
/** A name no other test (or concurrent test run) uses; IFNAMSIZ allows 15 characters. */
function uniqueName(): string {
  return `vht${process.pid % 100000}x${serial++}`;
}

/** Opens `queues` queues of a new multi-queue TAP; `close()` closes them, which deletes the TAP. */
function openTap(queues: number) {
  const first = native.tapOpen(uniqueName(), TAP_FLAGS);
  const fds = [first.fd];
  for (let i = 1; i < queues; i++) fds.push(native.tapOpen(first.name, TAP_FLAGS).fd);
  return {
    name: first.name,
    fds,
    close() {
      for (const fd of fds) native.close(fd);
    },
  };
}

test('a multi-queue TAP opens with the requested flags and its queues configure', (t) => {
  const tap = openTap(2);
  t.teardown(() => tap.close());
  t.regex(tap.name, /^vht/);
  for (const fd of tap.fds) {
    const iff = native.tapGetIff(fd);
    t.is(iff.name, tap.name);
    t.is(iff.flags & TAP_FLAGS, TAP_FLAGS, 'vnet_hdr and multi_queue are set');
    native.tapSetVnetHdrSize(fd, VNET_HDR_SIZE);
  }
  t.is(nativeError(() => native.tapSetVnetHdrSize(tap.fds[0]!, 4)).code, 'EINVAL', 'smaller than virtio_net_hdr');

  const fd = tap.fds[0]!;
  native.tapSetOffload(fd, 0);
  native.tapSetOffload(fd, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO);
  native.tapSetOffload(fd, TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6); // Linux 6.2+
  t.is(nativeError(() => native.tapSetOffload(fd, 0x8000)).code, 'EINVAL', 'an unknown offload is refused');

  // A detached queue leaves the device until it is attached again; TUNGETIFF still names the device
  // and adds IFF_DETACH_QUEUE. The kernel refuses to detach it twice or to attach an attached queue.
  t.is(native.tapGetIff(tap.fds[1]!).flags & IFF_DETACH_QUEUE, 0);
  native.tapSetQueue(tap.fds[1]!, IFF_DETACH_QUEUE);
  const detached = native.tapGetIff(tap.fds[1]!);
  t.is(detached.name, tap.name);
  t.not(detached.flags & IFF_DETACH_QUEUE, 0, 'TUNGETIFF reports the queue detached');
  t.is(native.tapGetIff(tap.fds[0]!).flags & IFF_DETACH_QUEUE, 0, 'the other queue is still attached');
  t.is(nativeError(() => native.tapSetQueue(tap.fds[1]!, IFF_DETACH_QUEUE)).code, 'EINVAL');
  native.tapSetQueue(tap.fds[1]!, IFF_ATTACH_QUEUE);
  t.is(native.tapGetIff(tap.fds[1]!).flags & IFF_DETACH_QUEUE, 0);
  t.is(nativeError(() => native.tapSetQueue(tap.fds[1]!, IFF_ATTACH_QUEUE)).code, 'EINVAL');
  t.is(nativeError(() => native.tapSetQueue(tap.fds[0]!, 0)).code, 'EINVAL', 'neither attach nor detach');
});

test('an existing TAP without multi_queue refuses a second queue', (t) => {
  const single = native.tapOpen(uniqueName(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
  t.teardown(() => native.close(single.fd));
  t.is(native.tapGetIff(single.fd).flags & IFF_MULTI_QUEUE, 0);
  const err = nativeError(() => native.tapOpen(single.name, TAP_FLAGS));
  t.is(err.code, 'EINVAL');
  t.is(err.syscall, 'ioctl(TUNSETIFF)');
});

test('a name longer than IFNAMSIZ is refused before any syscall', (t) => {
  t.throws(() => native.tapOpen('x'.repeat(16), TAP_FLAGS), { instanceOf: RangeError });
});

/** Runs `script` in a child node process with the native module loaded as `native`. */
function childScript(script: string): string {
  const nativePath = path.resolve(__dirname, '..', '..', 'native');
  return `const { native } = require(${JSON.stringify(nativePath)});
try { ${script}; console.log('ok'); } catch (err) { console.log(err.name, err.code, err.syscall); }`;
}

test('opening a TAP without CAP_NET_ADMIN fails with EPERM', (t) => {
  const script = childScript(`native.tapOpen(${JSON.stringify(uniqueName())}, ${TAP_FLAGS})`);
  const out = execFileSync(
    'setpriv',
    ['--inh-caps=-net_admin', '--bounding-set=-net_admin', process.execPath, '-e', script],
    { encoding: 'utf8' },
  );
  t.is(out.trim(), 'NativeError EPERM ioctl(TUNSETIFF)');
});

test('a missing /dev/net/tun fails with ENOENT', (t) => {
  // A private mount namespace whose /dev/net is an empty tmpfs.
  const script = childScript(`native.tapOpen('', ${TAP_FLAGS})`);
  const r = spawnSync(
    'unshare',
    ['-m', 'sh', '-c', 'mount -t tmpfs tmpfs /dev/net && exec "$0" -e "$1"', process.execPath, script],
    { encoding: 'utf8' },
  );
  t.is(r.stdout.trim(), 'NativeError ENOENT open', r.stderr);
});

// Frames --------------------------------------------------------------------------------------------

const TAP_MAC = [0x02, 0x00, 0x00, 0x00, 0x77, 0x01];
const PEER_MAC = [0x02, 0x00, 0x00, 0x00, 0x77, 0x02];
const TAP_IP = [10, 77, 0, 1];
const PEER_IP = [10, 77, 0, 2];

function arpRequest(): Uint8Array {
  return arpFrame(PEER_MAC, PEER_IP, TAP_IP);
}

function echoRequest(id: number, data: number[]): Uint8Array {
  return echoFrame(PEER_MAC, PEER_IP, TAP_MAC, TAP_IP, id, data);
}

function ip(namespace: string, ...args: string[]): void {
  execFileSync('ip', ['-n', namespace, ...args]);
}

/**
 * A TAP queue whose interface lives in its own network namespace with address TAP_IP; frames are
 * staged in a memfd mapping, as guest memory would hold them.
 */
function tapInNamespace(t: { teardown(fn: () => void): void }) {
  const tap = openTap(1);
  const namespace = tap.name;
  execFileSync('ip', ['netns', 'add', namespace]);
  t.teardown(() => {
    tap.close();
    execFileSync('ip', ['netns', 'del', namespace]);
  });
  native.tapSetVnetHdrSize(tap.fds[0]!, VNET_HDR_SIZE);
  native.tapSetOffload(tap.fds[0]!, 0);
  // The queue's fd stays ours while the interface moves; IPv6 off keeps router solicitations away.
  execFileSync('ip', ['link', 'set', 'dev', tap.name, 'netns', namespace]);
  execFileSync('ip', ['netns', 'exec', namespace, 'sysctl', '-qw', `net.ipv6.conf.${tap.name}.disable_ipv6=1`]);
  ip(namespace, 'link', 'set', 'dev', tap.name, 'address', TAP_MAC.map((b) => b.toString(16).padStart(2, '0')).join(':'));
  ip(namespace, 'addr', 'add', `${TAP_IP.join('.')}/24`, 'dev', tap.name);
  ip(namespace, 'link', 'set', 'dev', tap.name, 'up');

  const memfd = native.memfdCreate('tap-frames', 1 << 16);
  const mapping = native.mmap(memfd, 1 << 16, 0, true);
  t.teardown(() => {
    native.munmap(mapping.id);
    native.close(memfd);
  });
  return { fd: tap.fds[0]!, memory: mapping.views[0]!, address: mapping.address };
}

const RX_OFFSET = 0x8000;
const RX_SIZE = 0x4000;

test('frames move through writeFrames and readFrames with a virtio-net header', async (t) => {
  const { fd, memory, address } = tapInNamespace(t);
  // The frame as a driver would post it: a zeroed header descriptor, then the packet.
  const frame = arpRequest();
  memory.fill(0, 0, VNET_HDR_SIZE);
  memory.set(frame, 0x100);
  const tx = makeBatch(1, 2);
  tx.iovBase.set([address, address + 0x100]);
  tx.iovLen.set([VNET_HDR_SIZE, frame.length]);
  tx.iovCount[0] = 2;
  const txResult = new Int32Array(1);
  t.is(native.writeFrames(fd, tx.iovBase, tx.iovLen, tx.iovStart, tx.iovCount, txResult, 1), 1);
  t.is(txResult[0], VNET_HDR_SIZE + frame.length);

  // Receive into two buffers per frame (header, then payload), up to four frames per call.
  const frames = 4;
  const rx = makeBatch(frames, 2 * frames);
  for (let i = 0; i < frames; i++) {
    const base = address + RX_OFFSET + i * RX_SIZE;
    rx.iovBase.set([base, base + VNET_HDR_SIZE], 2 * i);
    rx.iovLen.set([VNET_HDR_SIZE, RX_SIZE - VNET_HDR_SIZE], 2 * i);
    rx.iovStart[i] = 2 * i;
    rx.iovCount[i] = 2;
  }
  memory.fill(0xee, RX_OFFSET);
  const rxResult = new Int32Array(frames);
  let reply: Uint8Array | undefined;
  let header: Uint8Array | undefined;
  await until(() => {
    const n = native.readFrames(fd, rx.iovBase, rx.iovLen, rx.iovStart, rx.iovCount, rxResult, frames);
    for (let i = 0; i < n && reply === undefined; i++) {
      t.true(rxResult[i]! > VNET_HDR_SIZE, `frame ${i}: ${rxResult[i]}`);
      const start = RX_OFFSET + i * RX_SIZE;
      const packet = memory.subarray(start + VNET_HDR_SIZE, start + rxResult[i]!);
      if (isArpReply(packet)) {
        reply = packet.slice();
        header = memory.slice(start, start + VNET_HDR_SIZE);
      }
    }
    return reply !== undefined;
  }, 'an ARP reply from the TAP');
  // virtio_net_hdr: no flags, GSO_NONE, no lengths (the kernel checksummed the frame itself).
  t.deepEqual([...header!.subarray(0, 10)], new Array(10).fill(0));
  t.deepEqual([...reply!.subarray(0, 6)], PEER_MAC, 'addressed to the peer');
  t.deepEqual([...reply!.subarray(6, 12)], TAP_MAC);
  t.deepEqual([...reply!.subarray(22, 28)], TAP_MAC, 'sender hardware address');
  t.deepEqual([...reply!.subarray(28, 32)], TAP_IP, 'sender protocol address');

  // Nothing else pending: EAGAIN ends the batch at once.
  await until(() => native.readFrames(fd, rx.iovBase, rx.iovLen, rx.iovStart, rx.iovCount, rxResult, frames) === 0, 'an empty TAP');
  t.is(native.readFrames(fd, rx.iovBase, rx.iovLen, rx.iovStart, rx.iovCount, rxResult, frames), 0);
});

test('io_uring READV/WRITEV at offset -1 (the current position) work on a TAP queue', async (t) => {
  const { fd, memory, address } = tapInNamespace(t);
  const ring = native.createIoUring(8);
  t.teardown(() => ring.close());
  // The ARP request makes the kernel learn the peer's address, so the echo reply needs no ARP of its own.
  const arp = arpRequest();
  const echo = echoRequest(0x1234, [1, 2, 3, 4, 5, 6, 7, 8]);
  memory.fill(0, 0, VNET_HDR_SIZE);
  memory.set(arp, 0x100);
  memory.set(echo, 0x200);
  const batch = makeBatch(2, 4);
  batch.iovBase.set([address, address + 0x100, address, address + 0x200]);
  batch.iovLen.set([VNET_HDR_SIZE, arp.length, VNET_HDR_SIZE, echo.length]);
  for (let i = 0; i < 2; i++) {
    batch.opcode[i] = IORING_OP.WRITEV;
    batch.fd[i] = fd;
    batch.offset[i] = -1;
    batch.iovStart[i] = 2 * i;
    batch.iovCount[i] = 2;
    batch.userData[i] = i;
  }
  t.is(ring.submit(batch, 1), 1);
  t.is((await collect(ring, 1)).get(0), VNET_HDR_SIZE + arp.length);
  batch.iovStart[0] = 2;
  t.is(ring.submit(batch, 1), 1);
  t.is((await collect(ring, 1)).get(0), VNET_HDR_SIZE + echo.length);

  // Read frames one at a time through the ring until the echo reply shows up.
  const read = makeBatch(1, 1);
  read.opcode[0] = IORING_OP.READV;
  read.fd[0] = fd;
  read.offset[0] = -1;
  read.iovBase[0] = address + RX_OFFSET;
  read.iovLen[0] = RX_SIZE;
  read.iovCount[0] = 1;
  let reply: Uint8Array | undefined;
  for (let attempt = 0; attempt < 8 && reply === undefined; attempt++) {
    t.is(ring.submit(read, 1), 1);
    const bytes = (await collect(ring, 1)).get(0)!;
    t.true(bytes > VNET_HDR_SIZE, `read ${bytes}`);
    const packet = memory.subarray(RX_OFFSET + VNET_HDR_SIZE, RX_OFFSET + bytes);
    if (isEchoReply(packet)) reply = packet.slice();
  }
  t.truthy(reply, 'an ICMP echo reply arrived');
  t.deepEqual([...reply!.subarray(0, 6)], PEER_MAC);
  t.deepEqual([...reply!.subarray(26, 30)], TAP_IP, 'from the TAP address');
  t.deepEqual([...reply!.subarray(38, 42)], [0x12, 0x34, 0, 1], 'same id and sequence');
  t.deepEqual([...reply!.subarray(42, 50)], [1, 2, 3, 4, 5, 6, 7, 8], 'same data');
});

test('frame batches are checked before any frame moves', (t) => {
  const tap = openTap(1);
  t.teardown(() => tap.close());
  const b = makeBatch(2, 2);
  const result = new Int32Array(2);
  b.iovStart.set([0, 1]);
  b.iovCount.set([1, 2]); // frame 1 runs past the iovecs
  t.throws(() => native.writeFrames(tap.fds[0]!, b.iovBase, b.iovLen, b.iovStart, b.iovCount, result, 2), {
    instanceOf: RangeError,
  });
  t.throws(() => native.readFrames(tap.fds[0]!, b.iovBase, b.iovLen, b.iovStart, b.iovCount, result, 3), {
    instanceOf: RangeError,
  });
  // A bad address fails that frame only (EFAULT), not the call.
  b.iovStart.set([0, 1]);
  b.iovCount.set([1, 1]);
  b.iovBase.set([4096, 4096]);
  b.iovLen.set([64, 64]);
  t.is(native.writeFrames(tap.fds[0]!, b.iovBase, b.iovLen, b.iovStart, b.iovCount, result, 2), 2);
  t.deepEqual([...result], [-14, -14]);
});

// io_uring frame writer -----------------------------------------------------------------------------

test('a TapWriter writes a batch larger than its ring with io_uring; every frame arrives and the peer answers each', async (t) => {
  const tap = tapInNamespace(t);
  const { fd, memory, address } = tap;
  const name = native.tapGetIff(fd).name;
  const writer = native.createTapWriter(fd, 2); // 2 SQEs: five frames take three io_uring_enter calls
  t.teardown(() => writer.close());
  const frames = [arpRequest(), ...[1, 2, 3, 4].map((seq) => echoRequest(seq, [seq, seq, seq, seq]))];
  memory.fill(0, 0, VNET_HDR_SIZE);
  const tx = makeBatch(frames.length, 2 * frames.length);
  frames.forEach((frame, i) => {
    memory.set(frame, 0x100 * (i + 1));
    tx.iovBase.set([address, address + 0x100 * (i + 1)], 2 * i);
    tx.iovLen.set([VNET_HDR_SIZE, frame.length], 2 * i);
    tx.iovStart[i] = 2 * i;
    tx.iovCount[i] = 2;
  });
  const before = interfaceCounters(name, name).rxPackets;
  const result = new Int32Array(frames.length);
  t.is(writer.writeFrames(tx.iovBase, tx.iovLen, tx.iovStart, tx.iovCount, result, frames.length), frames.length);
  t.deepEqual([...result], frames.map((f) => VNET_HDR_SIZE + f.length));
  t.is(interfaceCounters(name, name).rxPackets - before, frames.length, 'the TAP counted each frame');

  const rx = makeBatch(1, 1);
  rx.iovBase[0] = address + RX_OFFSET;
  rx.iovLen[0] = RX_SIZE;
  rx.iovCount[0] = 1;
  const replies = new Set<number>();
  const got = new Int32Array(1);
  await until(() => {
    while (native.readFrames(fd, rx.iovBase, rx.iovLen, rx.iovStart, rx.iovCount, got, 1) === 1) {
      const packet = memory.subarray(RX_OFFSET + VNET_HDR_SIZE, RX_OFFSET + got[0]!);
      if (isEchoReply(packet)) replies.add(packet[39]!); // the identifier's low byte
    }
    return replies.size === 4;
  }, 'four echo replies');
  t.deepEqual([...replies].sort(), [1, 2, 3, 4]);
});

test('a TapWriter checks the batch before any frame moves; a bad address fails that frame only; closed, it throws EBADF', (t) => {
  const tap = openTap(1);
  t.teardown(() => tap.close());
  const writer = native.createTapWriter(tap.fds[0]!, 4);
  const b = makeBatch(2, 2);
  const result = new Int32Array(2);
  b.iovStart.set([0, 1]);
  b.iovCount.set([1, 2]); // frame 1 runs past the iovecs
  t.throws(() => writer.writeFrames(b.iovBase, b.iovLen, b.iovStart, b.iovCount, result, 2), { instanceOf: RangeError });
  t.throws(() => writer.writeFrames(b.iovBase, b.iovLen, b.iovStart, b.iovCount, result, 3), { instanceOf: RangeError });
  b.iovCount.set([1, 1]);
  b.iovBase.set([4096, 4096]);
  b.iovLen.set([64, 64]);
  t.is(writer.writeFrames(b.iovBase, b.iovLen, b.iovStart, b.iovCount, result, 2), 2);
  t.deepEqual([...result], [-14, -14], 'EFAULT');
  // An empty frame reaches the driver, which refuses it (the probe of daemons/net/tap.ts relies on this).
  b.iovCount.set([0]);
  writer.writeFrames(b.iovBase, b.iovLen, b.iovStart, b.iovCount, result, 1);
  t.is(result[0], -22, 'EINVAL from tun, not EOPNOTSUPP from io_uring');
  writer.close();
  writer.close();
  t.is(nativeError(() => writer.writeFrames(b.iovBase, b.iovLen, b.iovStart, b.iovCount, result, 1)).code, 'EBADF');
});

test('a TapWriter on a full non-blocking fd gets EAGAIN per frame at once instead of waiting, and writes once there is room', (t) => {
  // A stream socket stands in for a full TAP (a TAP is full only with a small TUNSETSNDBUF and frames
  // held by a qdisc): both take RWF_NOWAIT writes through io_uring.
  const [a, b] = native.socketPair();
  t.teardown(() => {
    native.close(a);
    native.close(b);
  });
  const filler = new Uint8Array(65536);
  while (native.sendMsg(a, filler, 0, filler.length, []) > 0);
  const memfd = native.memfdCreate('tap-writer-frames', 4096);
  const mapping = native.mmap(memfd, 4096, 0, true);
  t.teardown(() => {
    native.munmap(mapping.id);
    native.close(memfd);
  });
  const writer = native.createTapWriter(a, 4);
  t.teardown(() => writer.close());
  const batch = makeBatch(3, 3);
  for (let i = 0; i < 3; i++) {
    batch.iovBase[i] = mapping.address + 100 * i;
    batch.iovLen[i] = 100;
    batch.iovStart[i] = i;
    batch.iovCount[i] = 1;
  }
  const result = new Int32Array(3);
  t.is(writer.writeFrames(batch.iovBase, batch.iovLen, batch.iovStart, batch.iovCount, result, 3), 3);
  t.deepEqual([...result], [-11, -11, -11], 'EAGAIN');
  const sink = new Uint8Array(65536);
  while (native.recvMsg(b, sink, 0, sink.length, 0).bytes > 0);
  t.is(writer.writeFrames(batch.iovBase, batch.iovLen, batch.iovStart, batch.iovCount, result, 3), 3);
  t.deepEqual([...result], [100, 100, 100]);
});

test('closing a TapWriter lets go of the TAP queue at once: closing the fd then deletes the TAP', (t) => {
  const tap = openTap(1);
  const writer = native.createTapWriter(tap.fds[0]!, 4);
  writer.close();
  tap.close();
  // A queue the ring still held would stay attached (and get frames steered to it) until the kernel's
  // deferred ring teardown ran; the last queue's close deletes a TAP that is not persistent.
  t.false(fs.existsSync(`/sys/class/net/${tap.name}`));
});
