/**
 * GET_INFLIGHT_FD / SET_INFLIGHT_FD areas on real memfds: what GET makes, SET maps back (the round
 * trip QEMU does across a daemon restart), and one row per check on what SET is handed. A refused
 * area leaves its fd to the caller (the connection closes it) and maps nothing: the fd count is back
 * where it was after every row.
 */
import test from 'ava';

import { ProtocolError } from '../../../lib/errors';
import { createInflightArea, InflightArea, type InflightDescription } from '../../../lib/vhost-user/inflight-region';
import { inflightQueueBytes } from '../../../lib/virtqueue/inflight';
import { F_SEAL_GROW, F_SEAL_SHRINK, native } from '../../../native';
import { openFds } from './harness';

const QUEUES = 2;
const MAX_QUEUE_SIZE = 1024;

function request(numQueues: number, queueSize: number): InflightDescription {
  return { mmapSize: 0n, mmapOffset: 0n, numQueues, queueSize };
}

test('GET makes a zeroed sealed memfd of one 64-byte-aligned area per queue; SET maps it back', (t) => {
  const baseline = openFds();
  const { fd, description } = createInflightArea(request(2, 256), QUEUES, MAX_QUEUE_SIZE);
  t.is(description.mmapSize, BigInt(2 * inflightQueueBytes(256)));
  t.is(inflightQueueBytes(256) % 64, 0);
  // Room for the packed layout (32-byte header, 32 bytes per descriptor), the larger of the two.
  t.true(inflightQueueBytes(256) >= 32 + 32 * 256);
  t.is(native.deviceSize(fd), Number(description.mmapSize));
  t.true((native.fileSeals(fd) & (F_SEAL_SHRINK | F_SEAL_GROW)) === (F_SEAL_SHRINK | F_SEAL_GROW));
  const area = InflightArea.map(fd, description, QUEUES, MAX_QUEUE_SIZE);
  const q1 = area.queueView(1, 256)!;
  t.is(q1.byteLength, inflightQueueBytes(256));
  t.true(q1.every((b) => b === 0));
  t.is(area.queueView(QUEUES, 256), undefined, 'a queue the area does not cover runs untracked');
  t.throws(() => area.queueView(0, 512), { instanceOf: ProtocolError, message: /tracks rings of 256/ });
  area.close();
  t.is(openFds(), baseline);
});

for (const [name, numQueues, queueSize] of [
  ['no queues', 0, 128],
  ['more queues than the device has', QUEUES + 1, 128],
  ['rings of 0', 1, 0],
  ['rings larger than the device takes', 1, MAX_QUEUE_SIZE * 2],
] as const) {
  test(`GET for ${name} is refused with VHOST_USER_BAD_INFLIGHT`, (t) => {
    const baseline = openFds();
    const err = t.throws(() => createInflightArea(request(numQueues, queueSize), QUEUES, MAX_QUEUE_SIZE), { instanceOf: ProtocolError });
    t.is(err?.code, 'VHOST_USER_BAD_INFLIGHT');
    t.is(openFds(), baseline);
  });
}

const SIZE = BigInt(inflightQueueBytes(128));
const rows: { name: string; fd(): number; description: InflightDescription }[] = [
  { name: 'an unsealed memfd (could shrink under the mapping)', fd: () => native.memfdCreate('unsealed', Number(SIZE)), description: { mmapSize: SIZE, mmapOffset: 0n, numQueues: 1, queueSize: 128 } },
  { name: 'an eventfd', fd: () => native.eventfd(0), description: { mmapSize: SIZE, mmapOffset: 0n, numQueues: 1, queueSize: 128 } },
  { name: 'a size that is not the shape’s', fd: () => native.memfdCreateSealed('big', 2 * Number(SIZE)), description: { mmapSize: 2n * SIZE, mmapOffset: 0n, numQueues: 1, queueSize: 128 } },
  { name: 'an offset past the end of the memfd', fd: () => native.memfdCreateSealed('short', Number(SIZE)), description: { mmapSize: SIZE, mmapOffset: 0x10000n, numQueues: 1, queueSize: 128 } },
  { name: 'an unaligned offset', fd: () => native.memfdCreateSealed('odd', 2 * Number(SIZE)), description: { mmapSize: SIZE, mmapOffset: 8n, numQueues: 1, queueSize: 128 } },
  { name: 'an offset near 2^64', fd: () => native.memfdCreateSealed('huge', Number(SIZE)), description: { mmapSize: SIZE, mmapOffset: 0xffff_ffff_ffff_f000n, numQueues: 1, queueSize: 128 } },
  { name: 'more queues than the device has (CVE-2022-0669 class)', fd: () => native.memfdCreateSealed('q', Number(SIZE)), description: { mmapSize: SIZE * 300n, mmapOffset: 0n, numQueues: 300, queueSize: 128 } },
  { name: 'a split-only size (too small for a packed ring)', fd: () => native.memfdCreateSealed('split', 2112), description: { mmapSize: 2112n, mmapOffset: 0n, numQueues: 1, queueSize: 128 } },
];

for (const row of rows) {
  test(`SET with ${row.name} is refused with VHOST_USER_BAD_INFLIGHT and maps nothing`, (t) => {
    const baseline = openFds();
    const fd = row.fd();
    const err = t.throws(() => InflightArea.map(fd, row.description, QUEUES, MAX_QUEUE_SIZE), { instanceOf: ProtocolError });
    t.is(err?.code, 'VHOST_USER_BAD_INFLIGHT');
    native.close(fd); // the connection's job for a refused message
    t.is(openFds(), baseline);
  });
}
