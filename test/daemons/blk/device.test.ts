/**
 * The blk device over a real split ring in fake guest memory, with a fake disk executor: every request
 * type, every status, the fallbacks, batching, and the queue lifecycle. No native addon needed.
 */
import test from 'ava';
import { constants as osConstants } from 'node:os';

import { BlkDevice, type BlkDeviceOptions } from '../../../daemons/blk/device';
import { NullExecutor } from '../../../lib/io/executor';
import { FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, IORING_OP } from '../../../native/io-batch';
import {
  CONFIG_SIZE,
  VIRTIO_BLK_F_DISCARD,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from '../../../daemons/blk/virtio-blk';
import { RingError } from '../../../lib/errors';
import { silentLogger } from '../../../lib/runtime/logger';
import type { DeviceContext } from '../../../lib/vhost-user/device-backend';
import { bit } from '../../../lib/virtio/constants';
import type { DriverBuffer, UsedElement } from '../../helpers/driver-ring';
import { R0_DATA, R1_DATA, splitSetup } from '../../lib/virtqueue/setup';
import { FakeDiskExecutor, FakeImage, type FakeExecutorOptions } from './fake-disk';
import { blkHeader as header, discardSegment as segment } from './wire';

const { EIO } = osConstants.errno;
const IMAGE_SIZE = 1 << 20;

function options(over: Partial<BlkDeviceOptions> = {}): BlkDeviceOptions {
  return {
    readOnly: false,
    serial: 'vhostd-test-serial',
    numQueues: 1,
    queueSize: 64,
    logicalBlockSize: 512,
    discard: true,
    writeZeroes: true,
    writeback: true,
    ...over,
  };
}

interface Rig {
  device: BlkDevice;
  image: FakeImage;
  exec: FakeDiskExecutor;
  s: ReturnType<typeof splitSetup>;
  /** Next free guest address for buffers. */
  alloc(len: number): number;
  /** Publish chains, kick, wait for the executor, return used elements. */
  run(chains: DriverBuffer[][]): Promise<UsedElement[]>;
  /** Status byte at the end of `buffer`. */
  statusAt(buffer: DriverBuffer): number;
}

function rig(over: Partial<BlkDeviceOptions> = {}, execOptions: FakeExecutorOptions = {}): Rig {
  const image = new FakeImage(IMAGE_SIZE);
  const s = splitSetup({ size: 64 });
  let exec: FakeDiskExecutor | null = null;
  const device = new BlkDevice(options(over), {
    image,
    createExecutor: (_capacity, sink) => (exec = new FakeDiskExecutor(image, s.fake, sink, execOptions)),
    logger: silentLogger,
  });
  device.startQueue(0, s.queue);
  let next = R0_DATA;
  return {
    device,
    image,
    get exec() {
      return exec!;
    },
    s,
    alloc(len: number) {
      const at = next;
      next += Math.ceil(len / 64) * 64 + 64;
      return at;
    },
    async run(chains) {
      for (const c of chains) s.driver.addChain(c);
      s.driver.publish();
      device.processQueue(0, s.queue);
      await exec!.settle();
      return s.driver.takeUsed();
    },
    statusAt(buffer) {
      return s.fake.read(buffer.addr + buffer.len - 1, 1)[0]!;
    },
  };
}

function pattern(len: number, seed: number): Uint8Array {
  const out = new Uint8Array(len);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

/** Put `bytes` in guest memory as a readable buffer. */
function readable(r: Rig, bytes: Uint8Array): DriverBuffer {
  const addr = r.alloc(bytes.length);
  r.s.fake.write(addr, bytes);
  return { addr, len: bytes.length };
}

function writable(r: Rig, len: number): DriverBuffer {
  const addr = r.alloc(len);
  r.s.fake.fill(addr, len, 0xee);
  return { addr, len, writable: true };
}

test('OUT then IN: data lands in the image and comes back into guest memory', async (t) => {
  const r = rig();
  const data = pattern(8192, 7);
  const status = writable(r, 1);
  // Data split over two descriptors, the second crossing from region 0 into region 1.
  const second = { addr: R1_DATA - 3000, len: 8192 - 4096 };
  r.s.fake.write(second.addr, data.subarray(4096));
  const used = await r.run([[readable(r, header(VIRTIO_BLK_T_OUT, 16)), readable(r, data.subarray(0, 4096)), second, status]]);
  t.is(used.length, 1);
  t.is(used[0]!.len, 1);
  t.is(r.statusAt(status), VIRTIO_BLK_S_OK);
  t.deepEqual(r.image.disk.subarray(16 * 512, 16 * 512 + 8192), data);

  const into = writable(r, 8192 + 1); // data and status in one descriptor
  const back = await r.run([[readable(r, header(VIRTIO_BLK_T_IN, 16)), into]]);
  t.is(back[0]!.len, 8193);
  t.deepEqual(r.s.fake.read(into.addr, 8192), data);
  t.is(r.statusAt(into), VIRTIO_BLK_S_OK);
});

test('a kick with many chains is one submit and one flush', async (t) => {
  const r = rig();
  const chains = Array.from({ length: 20 }, (_, i) => [readable(r, header(VIRTIO_BLK_T_IN, i * 8)), writable(r, 4096), writable(r, 1)]);
  const used = await r.run(chains);
  t.is(used.length, 20);
  t.is(r.exec.submits, 1);
  t.is(r.s.queue.counters.batches, 1);
  t.is(r.device.inFlight(0), 0);
});

test('FLUSH is an fdatasync; GET_ID returns the serial', async (t) => {
  const r = rig();
  const flushStatus = writable(r, 1);
  const id = writable(r, 21);
  const used = await r.run([
    [readable(r, header(VIRTIO_BLK_T_FLUSH)), flushStatus],
    [readable(r, header(VIRTIO_BLK_T_GET_ID)), id],
  ]);
  t.is(used.length, 2);
  t.is(r.statusAt(flushStatus), VIRTIO_BLK_S_OK);
  t.true(r.exec.seen.some((op) => op.opcode === IORING_OP.FSYNC));
  t.is(Buffer.from(r.s.fake.read(id.addr, 20)).toString('latin1'), 'vhostd-test-serial\0\0');
  t.is(r.statusAt(id), VIRTIO_BLK_S_OK);
  t.is(used.find((u) => u.len === 21)?.len, 21);
});

test('discard and write zeroes zero their ranges with fallocate', async (t) => {
  const r = rig();
  r.image.disk.fill(0x77);
  const s1 = writable(r, 1);
  const s2 = writable(r, 1);
  await r.run([
    [readable(r, new Uint8Array([...header(VIRTIO_BLK_T_DISCARD), ...segment(8, 8)])), s1],
    [readable(r, new Uint8Array([...header(VIRTIO_BLK_T_WRITE_ZEROES), ...segment(32, 16, 1), ...segment(64, 8)])), s2],
  ]);
  t.is(r.statusAt(s1), VIRTIO_BLK_S_OK);
  t.is(r.statusAt(s2), VIRTIO_BLK_S_OK);
  const zero = (from: number, sectors: number) => r.image.disk.subarray(from * 512, (from + sectors) * 512).every((b) => b === 0);
  t.true(zero(8, 8));
  t.true(zero(32, 16));
  t.true(zero(64, 8));
  t.is(r.image.disk[7 * 512], 0x77);
  t.is(r.image.disk[48 * 512], 0x77);
  const modes = r.exec.seen.filter((op) => op.opcode === IORING_OP.FALLOCATE).map((op) => op.arg & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE));
  t.deepEqual(modes, [FALLOC_FL_PUNCH_HOLE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE]);
});

test('write zeroes falls back to writing zeroes when the file system refuses fallocate', async (t) => {
  const r = rig({}, { refuseModes: FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE });
  r.image.disk.fill(0x77);
  const s1 = writable(r, 1);
  await r.run([[readable(r, new Uint8Array([...header(VIRTIO_BLK_T_WRITE_ZEROES), ...segment(0, 300, 1)])), s1]]);
  t.is(r.statusAt(s1), VIRTIO_BLK_S_OK);
  t.true(r.image.disk.subarray(0, 300 * 512).every((b) => b === 0));
  t.is(r.image.disk[300 * 512], 0x77);
  t.true(r.image.zeroesUsed > 0);
  t.true(r.exec.seen.some((op) => op.opcode === IORING_OP.WRITEV && op.iovecs > 1), 'one writev of many zero-buffer iovecs');
  // Later requests skip the refused modes.
  const before = r.exec.seen.length;
  const s2 = writable(r, 1);
  await r.run([[readable(r, new Uint8Array([...header(VIRTIO_BLK_T_WRITE_ZEROES), ...segment(400, 8)])), s2]]);
  t.is(r.statusAt(s2), VIRTIO_BLK_S_OK);
  t.deepEqual(r.exec.seen.slice(before).map((op) => op.opcode), [IORING_OP.WRITEV]);
  // A discard the file system cannot do is still a success (discard is a hint).
  const s3 = writable(r, 1);
  await r.run([[readable(r, new Uint8Array([...header(VIRTIO_BLK_T_DISCARD), ...segment(0, 8)])), s3]]);
  t.is(r.statusAt(s3), VIRTIO_BLK_S_OK);
});

test('read-only: writes, discards and write zeroes fail with IOERR and the image is untouched', async (t) => {
  const r = rig({ readOnly: true, discard: false, writeZeroes: false });
  t.not(r.device.features() & bit(VIRTIO_BLK_F_RO), 0n);
  r.image.disk.fill(0x11);
  const s1 = writable(r, 1);
  const s2 = writable(r, 1);
  const s3 = writable(r, 1);
  const into = writable(r, 513);
  const used = await r.run([
    [readable(r, header(VIRTIO_BLK_T_OUT, 0)), readable(r, pattern(512, 1)), s1],
    [readable(r, new Uint8Array([...header(VIRTIO_BLK_T_DISCARD), ...segment(0, 8)])), s2],
    [readable(r, new Uint8Array([...header(VIRTIO_BLK_T_WRITE_ZEROES), ...segment(0, 8)])), s3],
    [readable(r, header(VIRTIO_BLK_T_IN, 0)), into],
  ]);
  t.is(used.length, 4);
  t.is(r.statusAt(s1), VIRTIO_BLK_S_IOERR);
  t.is(r.statusAt(s2), VIRTIO_BLK_S_UNSUPP); // not offered on this device
  t.is(r.statusAt(s3), VIRTIO_BLK_S_UNSUPP);
  t.is(r.statusAt(into), VIRTIO_BLK_S_OK);
  t.true(r.image.disk.every((b) => b === 0x11));
});

test('errors are statuses and the queue keeps serving', async (t) => {
  const r = rig();
  const statuses = [writable(r, 1), writable(r, 1), writable(r, 1)];
  await r.run([
    [readable(r, header(VIRTIO_BLK_T_IN, IMAGE_SIZE / 512)), writable(r, 512), statuses[0]!],
    [readable(r, header(99)), statuses[1]!],
    [readable(r, header(VIRTIO_BLK_T_IN, 0)), writable(r, 100), statuses[2]!],
  ]);
  t.deepEqual(statuses.map((b) => r.statusAt(b)), [VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_S_IOERR]);
  const ok = writable(r, 1);
  await r.run([[readable(r, header(VIRTIO_BLK_T_FLUSH)), ok]]);
  t.is(r.statusAt(ok), VIRTIO_BLK_S_OK);
});

test('host I/O errors become IOERR', async (t) => {
  const r = rig({}, { failWith: -EIO });
  const status = writable(r, 1);
  await r.run([[readable(r, header(VIRTIO_BLK_T_IN, 0)), writable(r, 512), status]]);
  t.is(r.statusAt(status), VIRTIO_BLK_S_IOERR);
  t.is(r.device.inFlight(0), 0);
});

test('short transfers are resubmitted for the rest', async (t) => {
  const r = rig({}, { shortTransfer: 1000 });
  const data = pattern(4096, 3);
  const status = writable(r, 1);
  await r.run([[readable(r, header(VIRTIO_BLK_T_OUT, 4)), readable(r, data.subarray(0, 1536)), readable(r, data.subarray(1536)), status]]);
  t.is(r.statusAt(status), VIRTIO_BLK_S_OK);
  t.deepEqual(r.image.disk.subarray(2048, 2048 + 4096), data);
  t.is(r.exec.seen.filter((op) => op.opcode === IORING_OP.WRITEV).length, 5);
});

test('a chain without a status byte breaks the queue after the chains before it complete', async (t) => {
  const r = rig();
  const good = writable(r, 1);
  r.s.driver.addChain([readable(r, header(VIRTIO_BLK_T_FLUSH)), good]);
  r.s.driver.addChain([readable(r, header(VIRTIO_BLK_T_OUT)), readable(r, pattern(512, 2))]);
  r.s.driver.publish();
  const err = t.throws(() => r.device.processQueue(0, r.s.queue), { instanceOf: RingError });
  t.is(err?.code, 'VIRTQ_BAD_REQUEST');
  await r.exec.settle();
  const used = r.s.driver.takeUsed();
  t.is(used.length, 1);
  t.is(r.statusAt(good), VIRTIO_BLK_S_OK);
});

test('a header shorter than 16 bytes is a RingError too', (t) => {
  const r = rig();
  r.s.driver.addChain([readable(r, header(VIRTIO_BLK_T_IN).subarray(0, 8)), writable(r, 1)]);
  r.s.driver.publish();
  const err = t.throws(() => r.device.processQueue(0, r.s.queue), { instanceOf: RingError });
  t.is(err?.code, 'VIRTQ_BAD_REQUEST');
});

test('stopQueue resolves only once the queue has nothing in flight', async (t) => {
  const r = rig();
  r.s.driver.addChain([readable(r, header(VIRTIO_BLK_T_IN, 0)), writable(r, 4096), writable(r, 1)]);
  r.s.driver.publish();
  r.device.processQueue(0, r.s.queue);
  t.is(r.device.inFlight(0), 1);
  let stopped = false;
  const stop = Promise.resolve(r.device.stopQueue(0)).then(() => (stopped = true));
  await Promise.resolve();
  t.false(stopped);
  await r.exec.settle();
  await stop;
  t.true(stopped);
  t.is(r.s.driver.takeUsed().length, 1);
});

test('guest memory is held while I/O is in flight', async (t) => {
  const r = rig();
  r.s.driver.addChain([readable(r, header(VIRTIO_BLK_T_IN, 0)), writable(r, 4096), writable(r, 1)]);
  r.s.driver.publish();
  r.device.processQueue(0, r.s.queue);
  // close() must not drop the regions while the read is in flight.
  const refsBefore = r.s.fake.regions.map((x) => x.refs);
  r.s.fake.memory.close();
  t.deepEqual(r.s.fake.regions.map((x) => x.refs), refsBefore);
  await r.exec.settle();
  t.deepEqual(r.s.fake.regions.map((x) => x.refs), refsBefore.map((n) => n - 1));
});

test('writethrough writes go to the O_DSYNC descriptor; setConfig switches the mode', async (t) => {
  const r = rig({ writeback: false });
  const write = () => r.run([[readable(r, header(VIRTIO_BLK_T_OUT, 0)), readable(r, pattern(512, 9)), writable(r, 1)]]);
  await write();
  t.is(r.exec.seen.at(-1)!.fd, r.image.syncFd);
  t.is(r.device.getConfig(32, 1)[0], 0);
  r.device.setConfig(32, new Uint8Array([1]));
  t.is(r.device.getConfig(32, 1)[0], 1);
  await write();
  t.is(r.exec.seen.at(-1)!.fd, r.image.fd);
  t.throws(() => r.device.setConfig(0, new Uint8Array(8)), { instanceOf: RangeError });
});

test('config space bytes', (t) => {
  const r = rig({ numQueues: 3, queueSize: 128, logicalBlockSize: 4096 });
  const c = r.device.getConfig(0, CONFIG_SIZE);
  const v = new DataView(c.buffer);
  t.is(v.getBigUint64(0, true), BigInt(IMAGE_SIZE / 512), 'capacity');
  t.is(v.getUint32(8, true), 1 << 20, 'size_max');
  t.is(v.getUint32(12, true), 126, 'seg_max');
  t.is(v.getUint32(16, true), 0, 'geometry');
  t.is(v.getUint32(20, true), 4096, 'blk_size');
  t.deepEqual([c[24], c[25], v.getUint16(26, true), v.getUint32(28, true)], [0, 0, 1, 0], 'topology');
  t.is(c[32], 1, 'writeback');
  t.is(c[33], 0, 'unused0');
  t.is(v.getUint16(34, true), 3, 'num_queues');
  t.is(v.getUint32(36, true), 2097152, 'max_discard_sectors');
  t.is(v.getUint32(40, true), 32, 'max_discard_seg');
  t.is(v.getUint32(44, true), 8, 'discard_sector_alignment');
  t.is(v.getUint32(48, true), 2097152, 'max_write_zeroes_sectors');
  t.is(v.getUint32(52, true), 32, 'max_write_zeroes_seg');
  t.is(c[56], 1, 'write_zeroes_may_unmap');
  t.true(c.subarray(57).every((b) => b === 0), 'unused1, secure erase and zoned fields');
  // Partial reads, as QEMU issues them.
  t.deepEqual(r.device.getConfig(34, 2), c.subarray(34, 36));
  t.deepEqual(r.device.getConfig(90, 16), new Uint8Array([...c.subarray(90), ...new Uint8Array(10)]));
  const f = r.device.features();
  for (const b of [VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]) t.not(f & bit(b), 0n);
  t.is(f & bit(VIRTIO_BLK_F_RO), 0n);
  t.is(rig({ discard: false, writeZeroes: false }).device.features() & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES) | bit(VIRTIO_BLK_F_MQ)), 0n);
});

test('writeback reads 0 once the driver negotiated CONFIG_WCE without FLUSH', (t) => {
  const r = rig();
  r.device.attach({ features: bit(11), notifyConfigChange: async () => true });
  t.is(r.device.getConfig(32, 1)[0], 0);
  r.device.attach({ features: bit(11) | bit(VIRTIO_BLK_F_FLUSH), notifyConfigChange: async () => true });
  t.is(r.device.getConfig(32, 1)[0], 1);
});

test('reload: a grown image changes capacity and notifies the front-end', async (t) => {
  const r = rig();
  let notified = 0;
  const context: DeviceContext = { features: 0n, notifyConfigChange: async () => (notified++, true) };
  r.device.attach(context);
  await r.device.reload();
  t.is(notified, 0);
  r.image.resize(IMAGE_SIZE * 2 + 100);
  await r.device.reload();
  t.is(notified, 1);
  t.is(r.device.capacity, (IMAGE_SIZE * 2) / 512);
  t.is(new DataView(r.device.getConfig(0, 8).buffer).getBigUint64(0, true), BigInt((IMAGE_SIZE * 2) / 512));
  // The new sectors are usable.
  const status = writable(r, 1);
  await r.run([[readable(r, header(VIRTIO_BLK_T_OUT, IMAGE_SIZE / 512)), readable(r, pattern(512, 4)), status]]);
  t.is(r.statusAt(status), VIRTIO_BLK_S_OK);
});

test('null executor: every request completes at once', async (t) => {
  const image = new FakeImage(IMAGE_SIZE);
  const s = splitSetup({ size: 64 });
  const device = new BlkDevice(options(), { image, createExecutor: (capacity, sink) => new NullExecutor(capacity, sink), logger: silentLogger });
  device.startQueue(0, s.queue);
  for (let i = 0; i < 20; i++) {
    s.driver.addChain([
      { addr: R0_DATA + i * 0x2000, len: 16 },
      { addr: R0_DATA + i * 0x2000 + 0x100, len: 4096, writable: true },
      { addr: R0_DATA + i * 0x2000 + 0x1100, len: 1, writable: true },
    ]);
    s.fake.write(R0_DATA + i * 0x2000, header(i % 2 === 0 ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_FLUSH, i));
  }
  s.driver.publish();
  device.processQueue(0, s.queue);
  const used = s.driver.takeUsed();
  t.is(used.length, 20);
  t.is(device.inFlight(0), 0);
  t.is(s.queue.counters.batches, 1);
});
