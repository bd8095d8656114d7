/**
 * vhost-user-scsi with `--threads 2`: the two request queues in two worker threads (each worker's own
 * device instance, image fds and io_uring, built by createScsiDeviceForWorker), the control and event
 * queues on the main thread, through the real engine and real image files. GET /metrics sums the
 * workers' device counters with the main device's.
 */
import test, { type ExecutionContext } from 'ava';
import fs from 'node:fs';
import path from 'node:path';

import { toConfig } from '../../../daemons/scsi/cli';
import type { ScsiDevice } from '../../../daemons/scsi/device';
import { createScsiDevice, scsiQueueWorkers } from '../../../daemons/scsi/main';
import { Asc, Op, SenseKey, Status } from '../../../daemons/scsi/target/constants';
import { VIRTIO_SCSI_S_FUNCTION_COMPLETE, VIRTIO_SCSI_S_OK, VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET } from '../../../daemons/scsi/virtio-scsi';
import { ControlError } from '../../../lib/control/protocol';
import { silentLogger } from '../../../lib/runtime/logger';
import type { Frontend } from '../../helpers/frontend';
import { serveWithThreads, tempDir } from '../../helpers/threaded-device';
import { pattern } from '../../lib/vhost-user/harness';
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
    t.is(m.value('vhostd_scsi_responses_total', { ...labels, response: 'ok' }), writes.length + reads.length);
    // The workers' engines run I/O inline too (reads of data just written hit the page cache, or the
    // image is on tmpfs); every op is counted once, inline or handed to io_uring (fallbacks included).
    const inline = m.value('vhostd_scsi_inline_ops_total', labels)!;
    t.true(inline > 0, `inline ops on queue ${queue}`);
    t.is(inline + m.value('vhostd_scsi_executor_ops_total', labels)!, writes.length + reads.length, `ops on queue ${queue}`);
  }
  // The control queue ran on the main thread: its counter is the main device's, in the same scrape.
  t.is(m.value('vhostd_scsi_task_management_total', { function: 'logical_unit_reset' }), 1);
  t.is(m.value('vhostd_scsi_logical_units'), 2, 'a device-wide gauge is not summed over threads');
});

/** A `--threads 2` daemon with two request queues, attached to a test front-end. */
async function threaded(t: ExecutionContext, luns: (dir: string) => string[], size = SIZE): Promise<{ device: ScsiDevice; fe: Frontend; dir: string; files: string[] }> {
  const dir = tempDir(t, 'scsi-threads');
  const files = [0, 1].map((i) => path.join(dir, `${i}.img`));
  for (const file of files) {
    fs.writeFileSync(file, '');
    fs.truncateSync(file, size);
  }
  const config = toConfig({ lun: luns(dir), 'num-queues': 2, threads: 2 });
  const device = createScsiDevice(config, silentLogger);
  const { fe } = await serveWithThreads(t, device, scsiQueueWorkers(config), { queues: 4 });
  return { device, fe, dir, files };
}

test.serial('--threads: MODE SELECT on one worker\'s queue holds on the other worker\'s and on the main device; a device reset restores it', async (t) => {
  const { device, fe } = await threaded(t, (dir) => [`0=${path.join(dir, '0.img')}`]);
  const sense = async (queue: number) => parseResponse(await fe.transfer(queue, command(0, 0, [Op.MODE_SENSE_6, 0x08, 0x08, 0, 255, 0], { dataIn: 255 })));
  const caching = [...(await sense(2)).data.subarray(4, 24)];
  t.is(caching[2]! & 0x04, 0x04, 'WCE on at first');
  const changeable = parseResponse(await fe.transfer(3, command(0, 0, [Op.MODE_SENSE_6, 0x08, 0x48, 0, 255, 0], { dataIn: 255 })));
  t.is(changeable.data[4 + 2], 0x04, 'WCE is changeable with workers');
  caching[0] = 0x08;
  caching[2] = 0;
  const list = Uint8Array.from([0, 0, 0, 0, ...caching]);
  const select = parseResponse(await fe.transfer(2, command(0, 0, [Op.MODE_SELECT_6, 0x10, 0, 0, list.length, 0], { dataOut: list })));
  t.deepEqual([select.response, select.status], [VIRTIO_SCSI_S_OK, Status.GOOD]);
  t.is((await sense(3)).data[4 + 2]! & 0x04, 0, 'the other worker sees WCE off');
  t.false(device.logicalUnits()[0]!.writeCache, 'the main device too');
  device.reset();
  t.is((await sense(3)).data[4 + 2]! & 0x04, 0x04, 'a reset restores WCE in the workers');
});

test.serial('--threads: lun-add, lun-resize and lun-remove reach the workers\' queues before the guest hears of them', async (t) => {
  const { fe, files, device } = await threaded(t, (dir) => [`0=${path.join(dir, '0.img')}`]);
  const methods = device.controlMethods();
  const added = (await methods['lun-add']!.call({ spec: `7=${files[1]},serial=NEW` })) as { lun: string };
  t.is(added.lun, '0:7');
  for (const queue of [2, 3]) {
    const data = pattern(4096, queue);
    const w = parseResponse(await fe.transfer(queue, command(0, 7, rw10(Op.WRITE_10, queue * 8, 8), { dataOut: data })));
    t.deepEqual([w.response, w.status], [VIRTIO_SCSI_S_OK, Status.GOOD], `queue ${queue} writes to the new unit`);
    t.true(fs.readFileSync(files[1]!).subarray(queue * 4096, queue * 4096 + 4096).equals(data));
  }
  fs.truncateSync(files[1]!, SIZE * 2);
  await methods['lun-resize']!.call({ lun: '0:7' });
  for (const queue of [2, 3]) {
    const cap = parseResponse(await fe.transfer(queue, command(0, 7, [Op.READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], { dataIn: 8 })));
    t.is(new DataView(cap.data.buffer, cap.data.byteOffset).getUint32(0), (SIZE * 2) / 512 - 1, `queue ${queue} sees the new capacity`);
  }
  await methods['lun-remove']!.call({ lun: '0:7' });
  for (const queue of [2, 3]) {
    const gone = parseResponse(await fe.transfer(queue, command(0, 7, rw10(Op.READ_10, 0, 1), { dataIn: 512 })));
    t.deepEqual([gone.status, gone.sense[2]! & 0xf, gone.sense[12]], [Status.CHECK_CONDITION, SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED >> 8], `queue ${queue}: the unit is gone`);
  }
  await t.throwsAsync(async () => methods['lun-add']!.call({ spec: `8=${path.join(path.dirname(files[0]!), 'missing.img')}` }), { instanceOf: ControlError });
});

test.serial('--threads: a LOGICAL UNIT RESET answers only once the commands in flight in the workers completed', async (t) => {
  const { fe } = await threaded(t, (dir) => [`0=${path.join(dir, '0.img')},block-size=4096`], 160 << 20);
  // 128 MiB of a pattern: 64 writevs of 2 MiB one after the other in worker 0.
  fe.submit(2, command(0, 0, [Op.WRITE_SAME_16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0, 0, 0], { dataOut: pattern(4096, 3) }));
  t.is((await fe.transfer(0, tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0, 0), 30_000)).written[0], VIRTIO_SCSI_S_FUNCTION_COMPLETE);
  const done = fe.takeCompletions(2).map(parseResponse);
  t.is(done.length, 1, 'the WRITE SAME completed before the reset did');
  t.deepEqual([done[0]!.response, done[0]!.status], [VIRTIO_SCSI_S_OK, Status.GOOD]);
});
