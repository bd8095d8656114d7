/**
 * vhost-user-scsi with `--threads 2`: the two request queues in two worker threads (each worker's own
 * device instance, image fds and io_uring, built by createScsiDeviceForWorker), the control and event
 * queues on the main thread, through the real engine and real image files. GET /metrics sums the
 * workers' device counters with the main device's.
 */
import test from 'ava';
import fs from 'node:fs';
import path from 'node:path';

import { toConfig } from '../../../daemons/scsi/cli';
import { createScsiDevice, scsiQueueWorkers } from '../../../daemons/scsi/main';
import { Op, Status } from '../../../daemons/scsi/target/constants';
import { VIRTIO_SCSI_S_FUNCTION_COMPLETE, VIRTIO_SCSI_S_OK, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET } from '../../../daemons/scsi/virtio-scsi';
import { silentLogger } from '../../../lib/runtime/logger';
import { pattern } from '../../lib/vhost-user/harness';
import { serveWithThreads, tempDir } from '../../helpers/threaded-device';
import { command, parseResponse, rw10, tmf } from './wire';

const SIZE = 8 << 20;

test.serial('--threads 2: I/O on two request queues in two workers lands in the files; the control queue answers on the main thread; /metrics counts both', async (t) => {
  const dir = tempDir(t, 'scsi-threads');
  const files = [0, 1].map((i) => path.join(dir, `${i}.img`));
  for (const file of files) fs.writeFileSync(file, Buffer.alloc(SIZE));
  const config = toConfig({ lun: [`0=${files[0]}`, `1=${files[1]}`], 'num-queues': 2, threads: 2 });
  const workers = scsiQueueWorkers(config);
  t.is(workers?.threads, 2);
  t.is(scsiQueueWorkers(toConfig({ lun: ['0=x'], 'num-queues': 1, threads: 4 }))?.threads, 1, 'no more threads than request queues');
  const device = createScsiDevice(config, silentLogger);
  const { ts, fe, scrape } = await serveWithThreads(t, device, workers, { queues: 4 });

  const written: [number, number, number, Uint8Array][] = [];
  for (let round = 0; round < 3; round++) {
    for (const queue of [2, 3]) {
      const chains = Array.from({ length: 8 }, (_, i) => {
        const lun = (i + queue) % 2;
        const lba = round * 2048 + queue * 256 + i * 16;
        const data = pattern(4096 * (1 + (i % 2)), round * 100 + queue * 10 + i);
        written.push([queue, lun, lba, data]);
        return command(0, lun, rw10(Op.WRITE_10, lba, data.length / 512), { dataOut: data, region: i % 3, indirect: i % 2 === 0 });
      });
      fe.submit(queue, chains);
    }
    for (const queue of [2, 3]) {
      const done = (await fe.collect(queue, 8)).map(parseResponse);
      t.true(done.every((r) => r.response === VIRTIO_SCSI_S_OK && r.status === Status.GOOD), `round ${round} queue ${queue}`);
    }
  }
  t.is((await fe.transfer(0, tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0, 1))).written[0], VIRTIO_SCSI_S_FUNCTION_COMPLETE);
  const disks = files.map((f) => fs.readFileSync(f));
  for (const [queue, lun, lba, data] of written) {
    t.true(disks[lun]!.subarray(lba * 512, lba * 512 + data.length).equals(data), `LUN ${lun} LBA ${lba} in the file`);
    const back = parseResponse(await fe.transfer(5 - queue, command(0, lun, rw10(Op.READ_10, lba, data.length / 512), { dataIn: data.length })));
    t.true(Buffer.from(back.data).equals(data), `read of LUN ${lun} LBA ${lba} on the other queue`);
  }
  t.is(device.inFlight(0) + device.inFlight(1), 0, 'the main device ran no request queue');
  // Each worker has its own copy of the units: the mode pages are not changeable there.
  const mode = parseResponse(await fe.transfer(2, command(0, 0, [Op.MODE_SENSE_6, 0x08, 0x48, 0, 255, 0], { dataIn: 255 })));
  t.is(mode.data[4 + 2], 0, 'WCE is not changeable');
  t.deepEqual(ts.logs.filter((l) => l.level === 'error'), []);

  // Request queue r (virtqueue r + 2) wrote its own chains and read back the other queue's.
  const m = await scrape();
  for (const queue of [2, 3]) {
    const labels = { queue: String(queue - 2) };
    const writes = written.filter(([q]) => q === queue);
    const reads = written.filter(([q]) => q === 5 - queue);
    const bytes = (list: typeof written): number => list.reduce((n, [, , , data]) => n + data.length, 0);
    t.true(writes.length > 0);
    t.is(m.value('vhostd_scsi_commands_total', { ...labels, command: 'write' }), writes.length, `writes on queue ${queue}`);
    t.is(m.value('vhostd_scsi_commands_total', { ...labels, command: 'read' }), reads.length, `reads on queue ${queue}`);
    t.is(m.value('vhostd_scsi_written_bytes_total', labels), bytes(writes));
    t.is(m.value('vhostd_scsi_read_bytes_total', labels), bytes(reads));
    t.is(m.value('vhostd_scsi_responses_total', { ...labels, response: 'ok' }), writes.length + reads.length + (queue === 2 ? 1 : 0), 'MODE SENSE went to queue 2');
  }
  // The control queue ran on the main thread: its counter is the main device's, in the same scrape.
  t.is(m.value('vhostd_scsi_task_management_total', { function: 'logical_unit_reset' }), 1);
  t.is(m.value('vhostd_scsi_logical_units'), 2, 'a device-wide gauge is not summed over threads');
});
