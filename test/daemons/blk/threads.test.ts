/**
 * vhost-user-blk with `--threads 2`: two queues in two worker threads, each with its own device
 * instance (image fds, io_uring) built by createBlkDeviceForWorker, through the real engine and a
 * real image file. The main thread's device keeps the config space; GET /metrics shows the workers'
 * device counters.
 */
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';

import type { BlkConfig } from '../../../daemons/blk/cli';
import { blkQueueWorkers, createBlkDevice } from '../../../daemons/blk/main';
import { VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from '../../../daemons/blk/virtio-blk';
import { silentLogger } from '../../../lib/runtime/logger';
import { toConfig } from '../../../daemons/blk/cli';
import { pattern } from '../../lib/vhost-user/harness';
import { serveWithThreads, tempDir } from '../../helpers/threaded-device';
import { blkHeader as header } from './wire';

const IMAGE_SIZE = 8 << 20;

test.serial('--threads 2: writes on two queues in two workers land in the file and read back; /metrics counts them', async (t) => {
  const file = path.join(tempDir(t, 'blk-threads'), 'disk.img');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, IMAGE_SIZE);
  const config: BlkConfig = toConfig({ file, 'num-queues': 2, threads: 2 });
  t.is(config.threads, 2);
  const device = createBlkDevice(config, silentLogger);
  const { ts, fe, scrape } = await serveWithThreads(t, device, blkQueueWorkers(config), { queues: 2 });

  /** Requests and bytes by queue, as the front-end sent them. */
  const sent = [0, 1].map(() => ({ write: 0, read: 0, flush: 0, writtenBytes: 0, readBytes: 0 }));
  const written = new Map<number, Uint8Array>();
  for (let round = 0; round < 4; round++) {
    for (const queue of [0, 1]) {
      const chains = Array.from({ length: 8 }, (_, i) => {
        const seed = round * 100 + queue * 10 + i + 1;
        const sector = (queue * 8192 + round * 512 + i * 64) % (IMAGE_SIZE / 512 - 64);
        const data = pattern(4096 * (1 + (i % 4)), seed);
        written.set(sector, data);
        sent[queue]!.write++;
        sent[queue]!.writtenBytes += data.length;
        return { readable: [{ data: header(VIRTIO_BLK_T_OUT, sector) }, { data, region: i % 3 }], writable: [{ length: 1 }], indirect: i % 2 === 0 };
      });
      fe.submit(queue, chains);
    }
    for (const queue of [0, 1]) {
      const done = await fe.collect(queue, 8);
      t.true(done.every((c) => c.written[0] === VIRTIO_BLK_S_OK), `round ${round} queue ${queue}`);
    }
  }
  const flush = await fe.transfer(1, { readable: [{ data: header(VIRTIO_BLK_T_FLUSH) }], writable: [{ length: 1 }] });
  t.deepEqual([...flush.written], [VIRTIO_BLK_S_OK]);
  sent[1]!.flush++;
  const onDisk = fs.readFileSync(file);
  for (const [sector, data] of written) t.true(onDisk.subarray(sector * 512, sector * 512 + data.length).equals(data), `sector ${sector} in the file`);

  // Read back through both queues.
  let i = 0;
  for (const [sector, data] of written) {
    const queue = i++ % 2;
    const back = await fe.transfer(queue, { readable: [{ data: header(VIRTIO_BLK_T_IN, sector) }], writable: [{ length: data.length, region: i % 3 }, { length: 1 }] });
    t.is(back.written[data.length], VIRTIO_BLK_S_OK);
    t.true(Buffer.from(back.written.subarray(0, data.length)).equals(data), `read of sector ${sector} on queue ${queue}`);
    sent[queue]!.read++;
    sent[queue]!.readBytes += data.length;
  }
  // The main device ran no queue; config space still answers, counters come back.
  t.is(device.inFlight(0) + device.inFlight(1), 0);
  const config0 = await fe.getConfig(0, 8);
  t.is(new DataView(config0.buffer, config0.byteOffset).getBigUint64(0, true), BigInt(IMAGE_SIZE / 512));
  t.deepEqual(ts.logs.filter((l) => l.level === 'error'), []);

  // The workers' device counters reach /metrics, summed with the main device's (which ran no queue).
  const checkCounters = async (when: string): Promise<void> => {
    const m = await scrape();
    for (const queue of [0, 1]) {
      const labels = { queue: String(queue) };
      const s = sent[queue]!;
      t.true(s.write > 0 && s.read > 0, 'both queues did work');
      for (const type of ['write', 'read', 'flush'] as const) t.is(m.value('vhostd_blk_requests_total', { ...labels, type }), s[type], `${when}: ${type} requests of queue ${queue}`);
      t.is(m.value('vhostd_blk_written_bytes_total', labels), s.writtenBytes, `${when}: bytes written by queue ${queue}`);
      t.is(m.value('vhostd_blk_read_bytes_total', labels), s.readBytes, `${when}: bytes read by queue ${queue}`);
      t.is(m.value('vhostd_blk_io_errors_total', labels), 0);
    }
    t.is(m.value('vhostd_blk_capacity_bytes'), IMAGE_SIZE, `${when}: a device-wide gauge is the main device's, not a sum over threads`);
  };
  await checkCounters('running');
  // The workers end with the front-end; what they counted stays.
  fe.close();
  await ts.nextDisconnect();
  t.is(ts.server.queueWorkers!.running, 0);
  await checkCounters('after the disconnect');
});

test('--threads: parsed, 0 by default, bounded', (t) => {
  t.is(toConfig({ null: true }).threads, 0);
  t.is(blkQueueWorkers(toConfig({ null: true })), undefined);
  t.is(blkQueueWorkers(toConfig({ null: true, threads: 4, 'num-queues': 2 }))!.threads, 2, 'no more threads than queues');
  t.throws(() => toConfig({ null: true, threads: -1 }));
});
