/**
 * The blk daemon's `vhostd_blk_*` metrics as an operator scrapes them: a device behind the real
 * protocol engine, requests driven by the test front-end, then the registry the daemon would serve
 * (createDaemonMetrics) read as Prometheus text.
 */
import test from 'ava';
import fs from 'node:fs';
import { constants as osConstants } from 'node:os';
import os from 'node:os';
import path from 'node:path';

import type { BlkConfig } from '../../../daemons/blk/cli';
import { BlkDevice } from '../../../daemons/blk/device';
import { createBlkDevice, executorFactory } from '../../../daemons/blk/main';
import {
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_GET_LIFETIME,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from '../../../daemons/blk/virtio-blk';
import { nullBackingFile } from '../../../lib/io/backing-file';
import { NullExecutor, type CompletionSink, type ExecutorFactory } from '../../../lib/io/executor';
import { createDaemonMetrics } from '../../../lib/metrics/registry';
import { silentLogger } from '../../../lib/runtime/logger';
import type { ChainSpec, Frontend } from '../../helpers/frontend';
import { Scrape } from '../../helpers/scrape';
import { TestServer, pattern } from '../../lib/vhost-user/harness';
import { blkHeader as header, discardSegment as range } from './wire';

const { EIO } = osConstants.errno;
const IMAGE_SIZE = 8 << 20;
const ALL_FEATURES = (1n << 64n) - 1n;
const KiB = 1024;

function tempImage(): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-blk-metrics-'));
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, IMAGE_SIZE);
  return file;
}

function config(file: string): BlkConfig {
  return { file, readOnly: false, serial: 'metrics', numQueues: 2, queueSize: 128, direct: false, discard: true, writeZeroes: true, writeback: true, inlineIo: true };
}

const write = (sector: number, data: Uint8Array): ChainSpec => ({ readable: [{ data: header(VIRTIO_BLK_T_OUT, sector) }, { data, region: 1 }], writable: [{ length: 1 }] });
const read = (sector: number, length: number): ChainSpec => ({ readable: [{ data: header(VIRTIO_BLK_T_IN, sector) }], writable: [{ length, region: 2 }, { length: 1 }] });
const bare = (type: number, data?: Uint8Array): ChainSpec => ({ readable: [{ data: data ?? header(type) }], writable: [{ length: 1 }] });
const status = (c: { written: Uint8Array }) => c.written[c.written.length - 1];

async function attach(device: BlkDevice, queues: number): Promise<{ ts: TestServer; fe: Frontend }> {
  const ts = await TestServer.start(device);
  const fe = ts.connect();
  await fe.negotiate({ features: ALL_FEATURES, eventIdx: true, indirect: true });
  await fe.setMemTable();
  for (let q = 0; q < queues; q++) await fe.setupQueue(q, 64);
  return { ts, fe };
}

async function detach(ts: TestServer, fe: Frontend, device: BlkDevice): Promise<void> {
  fe.close();
  await ts.server.close();
  device.close();
}

test.serial('a real image: requests by type, bytes read and written, errors, capacity, executor', async (t) => {
  const file = tempImage();
  const device = createBlkDevice(config(file), silentLogger);
  const { ts, fe } = await attach(device, 2);
  try {
    const registry = createDaemonMetrics(ts.server);

    // Queue 0: 3 writes of 4 KiB, a flush, a GET_ID, a discard, a write-zeroes, an unknown type and a
    // read beyond the end of the disk.
    fe.submit(0, [write(0, pattern(4 * KiB, 1)), write(8, pattern(4 * KiB, 2)), write(16, pattern(4 * KiB, 3))]);
    t.true((await fe.collect(0, 3)).every((c) => status(c) === VIRTIO_BLK_S_OK));
    t.is(status(await fe.transfer(0, bare(VIRTIO_BLK_T_FLUSH))), VIRTIO_BLK_S_OK);
    t.is(status(await fe.transfer(0, { readable: [{ data: header(VIRTIO_BLK_T_GET_ID) }], writable: [{ length: 20 }, { length: 1 }] })), VIRTIO_BLK_S_OK);
    const discard = new Uint8Array(Buffer.concat([header(VIRTIO_BLK_T_DISCARD), range(64, 8)]));
    t.is(status(await fe.transfer(0, bare(VIRTIO_BLK_T_DISCARD, discard))), VIRTIO_BLK_S_OK);
    const zeroes = new Uint8Array(Buffer.concat([header(VIRTIO_BLK_T_WRITE_ZEROES), range(128, 8)]));
    t.is(status(await fe.transfer(0, bare(VIRTIO_BLK_T_WRITE_ZEROES, zeroes))), VIRTIO_BLK_S_OK);
    t.is(status(await fe.transfer(0, bare(VIRTIO_BLK_T_GET_LIFETIME))), VIRTIO_BLK_S_UNSUPP);
    // used.len 1 (the status byte, VIRTIO_BLK_S_IOERR) instead of 513: the front-end cannot see that byte.
    t.is((await fe.transfer(0, read(IMAGE_SIZE / 512, 512))).len, 1);
    // Queue 1: 2 reads of 8 KiB.
    fe.submit(1, [read(0, 8 * KiB), read(16, 8 * KiB)]);
    t.true((await fe.collect(1, 2)).every((c) => status(c) === VIRTIO_BLK_S_OK));

    const m = await Scrape.of(registry);
    const q0 = { queue: '0', device: 'blk' };
    const q1 = { queue: '1', device: 'blk' };
    t.is(m.value('vhostd_blk_written_bytes_total', q0), 12288);
    t.is(m.value('vhostd_blk_requests_total', { ...q0, type: 'write' }), 3);
    t.is(m.value('vhostd_blk_requests_total', { ...q0, type: 'read' }), 1, 'the read beyond the end counts as a read');
    t.is(m.value('vhostd_blk_requests_total', { ...q0, type: 'flush' }), 1);
    t.is(m.value('vhostd_blk_requests_total', { ...q0, type: 'get_id' }), 1);
    t.is(m.value('vhostd_blk_requests_total', { ...q0, type: 'discard' }), 1);
    t.is(m.value('vhostd_blk_requests_total', { ...q0, type: 'write_zeroes' }), 1);
    t.is(m.value('vhostd_blk_requests_total', { ...q0, type: 'unsupported' }), 1);
    t.is(m.value('vhostd_blk_read_bytes_total', q0), 0, 'the refused read moved no data');
    t.is(m.value('vhostd_blk_io_errors_total', q0), 1);

    t.is(m.value('vhostd_blk_read_bytes_total', q1), 16384);
    t.is(m.value('vhostd_blk_requests_total', { ...q1, type: 'read' }), 2);
    t.is(m.value('vhostd_blk_requests_total', { ...q1, type: 'write' }), 0, 'every type has a series from the start');
    t.is(m.value('vhostd_blk_written_bytes_total', q1), 0);
    t.is(m.value('vhostd_blk_io_errors_total', q1), 0);

    t.is(m.value('vhostd_blk_requests_in_flight', q0), 0);
    t.is(m.value('vhostd_blk_requests_in_flight', q1), 0);
    t.is(m.value('vhostd_blk_capacity_bytes', { device: 'blk' }), IMAGE_SIZE);
    t.is(m.value('vhostd_blk_io_uring', { device: 'blk' }), executorFactory(config(file), silentLogger).kind === 'io_uring' ? 1 : 0);
    // Queue 0's writes, flush, discard and write-zeroes went to the executor; queue 1's reads of what
    // queue 0 wrote hit the page cache and ran inline (RWF_NOWAIT).
    t.is(m.value('vhostd_blk_executor_ops_total', q0), 6);
    t.is(m.value('vhostd_blk_inline_ops_total', q0), 0);
    t.is(m.value('vhostd_blk_inline_ops_total', q1), 2);
    t.is(m.value('vhostd_blk_inline_fallbacks_total', q1), 0);
    t.is(m.value('vhostd_blk_executor_ops_total', q1), 0);
    // The engine's shared metrics agree on the request count.
    t.is(m.value('vhostd_queue_requests_total', q0), 9);

    // A grown image shows on the next scrape after SIGHUP (reload).
    fs.truncateSync(file, IMAGE_SIZE * 2);
    await device.reload();
    t.is((await Scrape.of(registry)).value('vhostd_blk_capacity_bytes'), IMAGE_SIZE * 2);
  } finally {
    await detach(ts, fe, device);
  }
});

/** A {@link NullExecutor} whose completions wait until `release()`, and may fail with -EIO. */
function heldExecutor(opts: { fail: boolean }) {
  let held: { sink: CompletionSink; userData: Uint32Array; result: Int32Array; count: number }[] = [];
  return {
    create: (capacity: number, sink: CompletionSink) =>
      new NullExecutor(capacity, (userData, result, count) => {
        if (opts.fail) result.fill(-EIO, 0, count);
        held.push({ sink, userData: userData.slice(0, count), result: result.slice(0, count), count });
      }),
    release(): void {
      const batches = held;
      held = [];
      for (const b of batches) b.sink(b.userData, b.result, b.count);
    },
  };
}

function nullDevice(createExecutor: ExecutorFactory): BlkDevice {
  return new BlkDevice(
    { readOnly: false, serial: '', numQueues: 1, queueSize: 64, logicalBlockSize: 512, discard: false, writeZeroes: false, writeback: true },
    { image: nullBackingFile(1 << 20), createExecutor, logger: silentLogger, executorKind: 'null' },
  );
}

test.serial('requests in flight while the I/O is pending; failed host I/O counts as an error and moves no bytes', async (t) => {
  const exec = heldExecutor({ fail: true });
  const device = nullDevice(exec.create);
  const { ts, fe } = await attach(device, 1);
  try {
    const registry = createDaemonMetrics(ts.server);
    const q0 = { queue: '0' };
    t.is((await Scrape.of(registry)).value('vhostd_blk_io_uring'), 0, 'the null executor is not io_uring');

    fe.submit(0, [write(0, pattern(4 * KiB, 4)), write(8, pattern(4 * KiB, 5))]);
    // The kick reaches the device on a later turn of the event loop.
    for (let i = 0; i < 200 && device.inFlight(0) < 2; i++) await new Promise((resolve) => setTimeout(resolve, 5));
    let m = await Scrape.of(registry);
    t.is(m.value('vhostd_blk_requests_in_flight', q0), 2);
    t.is(m.value('vhostd_blk_requests_total', { ...q0, type: 'write' }), 2);
    t.is(m.value('vhostd_blk_written_bytes_total', q0), 0, 'bytes count when the I/O completes');

    exec.release();
    t.true((await fe.collect(0, 2)).every((c) => status(c) === VIRTIO_BLK_S_IOERR));
    m = await Scrape.of(registry);
    t.is(m.value('vhostd_blk_requests_in_flight', q0), 0);
    t.is(m.value('vhostd_blk_io_errors_total', q0), 2);
    t.is(m.value('vhostd_blk_written_bytes_total', q0), 0);
    t.is(m.value('vhostd_blk_capacity_bytes'), 1 << 20);
  } finally {
    await detach(ts, fe, device);
  }
});
