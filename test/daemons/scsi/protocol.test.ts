/**
 * The scsi daemon's device end to end through the real protocol engine, io_uring and real image files:
 * a test front-end over a unix socket, memfd guest memory with several regions, split and packed rings.
 * Commands on the request queues, task management on the control queue, held event buffers, and the
 * malformed chains that break a queue.
 */
import test from 'ava';
import { Registry } from 'prom-client';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { toConfig, type ScsiConfig } from '../../../daemons/scsi/cli';
import { MAX_QUEUED_EVENTS, ScsiDevice } from '../../../daemons/scsi/device';
import { COMMAND_CLASSES } from '../../../daemons/scsi/metrics';
import { createScsiDevice } from '../../../daemons/scsi/main';
import { Asc, Op, SenseKey, Status } from '../../../daemons/scsi/target/constants';
import { naaDesignator } from '../../../daemons/scsi/target/logical-unit';
import { ImageUnit } from '../../../daemons/scsi/units';
import {
  VIRTIO_SCSI_S_BAD_TARGET,
  VIRTIO_SCSI_S_FUNCTION_COMPLETE,
  VIRTIO_SCSI_S_FUNCTION_REJECTED,
  VIRTIO_SCSI_S_FUNCTION_SUCCEEDED,
  VIRTIO_SCSI_S_INCORRECT_LUN,
  VIRTIO_SCSI_S_OK,
  VIRTIO_SCSI_S_OVERRUN,
  VIRTIO_SCSI_EVT_RESET_REMOVED,
  VIRTIO_SCSI_EVT_RESET_RESCAN,
  VIRTIO_SCSI_T_EVENTS_MISSED,
  VIRTIO_SCSI_T_PARAM_CHANGE,
  VIRTIO_SCSI_T_TMF_CLEAR_ACA,
  VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
  VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET,
  VIRTIO_SCSI_T_TMF_QUERY_TASK,
  VIRTIO_SCSI_T_TRANSPORT_RESET,
} from '../../../daemons/scsi/virtio-scsi';
import { ControlError } from '../../../lib/control/protocol';
import { ConfigError, type ConfigErrorCode } from '../../../lib/errors';
import { openBackingFile } from '../../../lib/io/backing-file';
import { chooseExecutor } from '../../../lib/io/choose-executor';
import type { CompletionSink, ExecutorFactory } from '../../../lib/io/executor';
import { silentLogger } from '../../../lib/runtime/logger';
import { Request } from '../../../lib/vhost-user/messages';
import { Frontend } from '../../helpers/frontend';
import { tmpfsImage } from '../../helpers/tmpfs-image';
import { Scrape } from '../../helpers/scrape';
import { TestServer, pattern } from '../../lib/vhost-user/harness';
import { command, parseResponse, rw10, rw16, tmf } from './wire';

const ALL_FEATURES = (1n << 64n) - 1n;
const SIZE = 4 << 20;

function tempDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-scsi-test-'));
}

function image(dir: string, name: string, size = SIZE, fill = 0): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, Buffer.alloc(size, fill));
  return file;
}

/** LUN 0 read-write with discard, LUN 1 read-only, LUN 2 with 4096-byte blocks, target 1 LUN 5. */
function rig(requestQueues = 2): { config: ScsiConfig; files: string[] } {
  const dir = tempDir();
  const files = [image(dir, 'a.img'), image(dir, 'b.img', SIZE, 0x33), image(dir, 'c.img', SIZE + 1000), image(dir, 'd.img', 1 << 20)];
  const config = toConfig({
    lun: [`0=${files[0]},discard,serial=A0`, `1=${files[1]},ro`, `2=${files[2]},block-size=4096`, `1:5=${files[3]}`],
    'num-queues': requestQueues,
  });
  return { config, files };
}

async function attach(device: ScsiDevice, packed = false): Promise<{ ts: TestServer; fe: Frontend }> {
  const ts = await TestServer.start(device);
  const fe = ts.connect();
  await fe.negotiate({ features: ALL_FEATURES, packed, eventIdx: true, indirect: true });
  await fe.setMemTable();
  for (let q = 0; q < device.numQueues; q++) await fe.setupQueue(q, 128);
  return { ts, fe };
}

async function detach(ts: TestServer, fe: Frontend, device: ScsiDevice): Promise<void> {
  fe.close();
  await ts.server.close();
  device.close();
}

const REQUEST_QUEUE = 2;

for (const packed of [false, true]) {
  test.serial(`${packed ? 'packed' : 'split'} ring: WRITE and READ 10/16 on two request queues land in the file and read back`, async (t) => {
    const { config, files } = rig();
    const device = createScsiDevice(config, silentLogger);
    const { ts, fe } = await attach(device, packed);
    const written: [number, Uint8Array][] = [];
    for (let i = 0; i < 24; i++) {
      const blocks = 1 + ((i * 37) % 64);
      const lba = (i * 257) % (SIZE / 512 - 64);
      const data = pattern(blocks * 512, i + 1);
      const cdb = i % 2 === 0 ? rw10(Op.WRITE_10, lba, blocks, i % 4 === 0 ? 0x08 : 0) : rw16(Op.WRITE_16, lba, blocks);
      const c = parseResponse(await fe.transfer(REQUEST_QUEUE + (i % 2), command(0, 0, cdb, { dataOut: data, region: i % 3, indirect: i % 3 === 0 })));
      t.deepEqual([c.response, c.status, c.residual], [VIRTIO_SCSI_S_OK, Status.GOOD, 0]);
      written.push([lba, data]);
    }
    const disk = fs.readFileSync(files[0]!);
    const model = new Uint8Array(SIZE);
    for (const [lba, data] of written) model.set(data, lba * 512);
    // Buffer comparisons: ava's deepEqual walks megabytes byte by byte.
    t.true(disk.equals(model), 'the file holds every write');
    for (const [i, [lba, data]] of written.slice(-8).entries()) {
      const blocks = data.length / 512;
      const cdb = i % 2 === 0 ? rw10(Op.READ_10, lba, blocks) : rw16(Op.READ_16, lba, blocks);
      const c = parseResponse(await fe.transfer(REQUEST_QUEUE + (i % 2), command(0, 0, cdb, { dataIn: data.length, dataInParts: 1 + (i % 3), region: i % 3 })));
      t.deepEqual([c.response, c.status, c.residual, c.len], [VIRTIO_SCSI_S_OK, Status.GOOD, 0, 108 + data.length]);
      t.true(Buffer.from(c.data).equals(model.subarray(lba * 512, lba * 512 + data.length)), `read of LBA ${lba}`);
    }
    await detach(ts, fe, device);
  });
}

for (const inlineIo of [true, false]) {
  test.serial(`tmpfs image, ${inlineIo ? 'inline I/O: every READ and WRITE runs on the queue thread, none through io_uring' : '--no-inline-io: every READ and WRITE goes through io_uring'}; data lands and reads back`, async (t) => {
    const file = tmpfsImage(t, `scsi-inline-${inlineIo}`, SIZE);
    const device = createScsiDevice(toConfig({ lun: [`0=${file}`], 'num-queues': 1, 'inline-io': inlineIo }), silentLogger);
    const registry = new Registry();
    device.registerMetrics(registry);
    const { ts, fe } = await attach(device);
    // One batch of writes (1..16 blocks, data-out over two regions), then one batch of reads.
    const writes = Array.from({ length: 20 }, (_, i) => ({ lba: i * 64 + (i % 7), data: pattern(512 * (1 + ((i * 5) % 16)), 100 + i) }));
    fe.submit(REQUEST_QUEUE, writes.map((w, i) => command(0, 0, rw10(Op.WRITE_10, w.lba, w.data.length / 512), { dataOut: w.data, region: i % 3, indirect: i % 3 === 0 })));
    for (const c of await fe.collect(REQUEST_QUEUE, writes.length)) t.deepEqual([parseResponse(c).response, parseResponse(c).status], [VIRTIO_SCSI_S_OK, Status.GOOD]);
    const onDisk = fs.readFileSync(file);
    for (const w of writes) t.true(onDisk.subarray(w.lba * 512, w.lba * 512 + w.data.length).equals(w.data), `LBA ${w.lba} written`);
    fe.submit(REQUEST_QUEUE, writes.map((w, i) => command(0, 0, rw10(Op.READ_10, w.lba, w.data.length / 512), { dataIn: w.data.length, dataInParts: 1 + (i % 3), region: i % 3 })));
    const back = (await fe.collect(REQUEST_QUEUE, writes.length)).map(parseResponse);
    for (const w of writes) t.truthy(back.find((c) => c.status === Status.GOOD && Buffer.from(c.data).equals(w.data)), `LBA ${w.lba} reads back`);
    const stats = inlineIo ? { inline: 40, inlineFallbacks: 0, executor: 0 } : { inline: 0, inlineFallbacks: 0, executor: 40 };
    t.deepEqual({ ...device.engineStats(0) }, stats);
    const m = await Scrape.of(registry);
    t.is(m.value('vhostd_scsi_inline_ops_total', { queue: '0' }), stats.inline);
    t.is(m.value('vhostd_scsi_executor_ops_total', { queue: '0' }), stats.executor);
    await detach(ts, fe, device);
  });
}

test.serial('emulated commands: INQUIRY, missing LUN, REPORT LUNS, READ CAPACITY(16), MODE SENSE, residuals and OVERRUN', async (t) => {
  const { config } = rig();
  const device = createScsiDevice(config, silentLogger);
  const { ts, fe } = await attach(device);
  const q = REQUEST_QUEUE;
  const inq = parseResponse(await fe.transfer(q, command(0, 0, [Op.INQUIRY, 0, 0, 0, 96, 0], { dataIn: 96 })));
  t.deepEqual([inq.response, inq.status, inq.residual, inq.len], [VIRTIO_SCSI_S_OK, Status.GOOD, 96 - 36, 108 + 36]);
  t.is(Buffer.from(inq.data.subarray(8, 16)).toString(), 'VHOSTD  ');
  const missing = parseResponse(await fe.transfer(q, command(0, 9, [Op.INQUIRY, 0, 0, 0, 36, 0], { dataIn: 36 })));
  t.is(missing.data[0], 0x7f);
  const tur = parseResponse(await fe.transfer(q, command(0, 9, [Op.TEST_UNIT_READY], {})));
  t.is(tur.status, Status.CHECK_CONDITION);
  t.deepEqual([tur.sense[2]! & 0xf, tur.sense[12], tur.sense[13]], [SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED >> 8, 0]);
  t.is(tur.senseLength, 18);
  const badTarget = parseResponse(await fe.transfer(q, command(7, 0, [Op.INQUIRY, 0, 0, 0, 36, 0], { dataIn: 36 })));
  t.is(badTarget.response, VIRTIO_SCSI_S_BAD_TARGET);
  const luns = parseResponse(await fe.transfer(q, command(0, 0, [Op.REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], { dataIn: 256 })));
  t.is(new DataView(luns.data.buffer, luns.data.byteOffset).getUint32(0), 24, 'target 0 has three units');
  const luns1 = parseResponse(await fe.transfer(q, command(1, 0, [Op.REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], { dataIn: 256 })));
  t.deepEqual([...luns1.data.subarray(0, 4), ...luns1.data.subarray(8, 10)], [0, 0, 0, 8, 0, 5]);
  const cap = parseResponse(await fe.transfer(q, command(0, 2, [Op.SERVICE_ACTION_IN_16, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], { dataIn: 32 })));
  const capView = new DataView(cap.data.buffer, cap.data.byteOffset);
  t.deepEqual([Number(capView.getBigUint64(0)), capView.getUint32(8)], [SIZE / 4096 - 1, 4096], 'the partial block is not counted');
  const mode = parseResponse(await fe.transfer(q, command(0, 1, [Op.MODE_SENSE_6, 0, 0x3f, 0, 255, 0], { dataIn: 255 })));
  t.is(mode.data[2]! & 0x80, 0x80, 'read-only LUN: WP');
  const overrun = parseResponse(await fe.transfer(q, command(0, 0, rw10(Op.READ_10, 0, 8), { dataIn: 2048 })));
  t.is(overrun.response, VIRTIO_SCSI_S_OVERRUN);
  const bigger = parseResponse(await fe.transfer(q, command(0, 0, rw10(Op.READ_10, 0, 2), { dataIn: 4096 })));
  t.deepEqual([bigger.response, bigger.status, bigger.residual], [VIRTIO_SCSI_S_OK, Status.GOOD, 3072]);
  const range = parseResponse(await fe.transfer(q, command(0, 0, rw10(Op.READ_10, SIZE / 512, 1), { dataIn: 512 })));
  t.deepEqual([range.status, range.sense[2]! & 0xf, range.sense[12], range.residual], [Status.CHECK_CONDITION, SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE >> 8, 512]);
  await detach(ts, fe, device);
});

test.serial('a read-only LUN refuses writes with DATA PROTECT and the file is unchanged; UNMAP punches holes; SYNCHRONIZE CACHE', async (t) => {
  const { config, files } = rig();
  const device = createScsiDevice(config, silentLogger);
  const { ts, fe } = await attach(device);
  const q = REQUEST_QUEUE;
  const w = parseResponse(await fe.transfer(q, command(0, 1, rw10(Op.WRITE_10, 0, 8), { dataOut: pattern(4096, 3) })));
  t.deepEqual([w.response, w.status, w.sense[2]! & 0xf, w.sense[12]], [VIRTIO_SCSI_S_OK, Status.CHECK_CONDITION, SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED >> 8]);
  t.true(fs.readFileSync(files[1]!).every((b) => b === 0x33));
  const r = parseResponse(await fe.transfer(q, command(0, 1, rw10(Op.READ_10, 8, 8), { dataIn: 4096 })));
  t.true(r.data.every((b) => b === 0x33));

  fs.writeFileSync(files[0]!, Buffer.alloc(SIZE, 0x5a));
  const list = new Uint8Array(8 + 16);
  const lv = new DataView(list.buffer);
  lv.setUint16(0, 22);
  lv.setUint16(2, 16);
  lv.setBigUint64(8, 16n);
  lv.setUint32(16, 32);
  const unmap = parseResponse(await fe.transfer(q, command(0, 0, [Op.UNMAP, 0, 0, 0, 0, 0, 0, 0, list.length, 0], { dataOut: list })));
  t.deepEqual([unmap.response, unmap.status], [VIRTIO_SCSI_S_OK, Status.GOOD]);
  const disk = fs.readFileSync(files[0]!);
  t.true(disk.subarray(16 * 512, 48 * 512).every((b) => b === 0));
  t.is(disk[16 * 512 - 1], 0x5a);
  t.is(disk[48 * 512], 0x5a);
  t.is(disk.length, SIZE);
  const sync = parseResponse(await fe.transfer(q, command(0, 0, [Op.SYNCHRONIZE_CACHE_10, 0, 0, 0, 0, 0, 0, 0, 0, 0], {})));
  t.deepEqual([sync.response, sync.status], [VIRTIO_SCSI_S_OK, Status.GOOD]);
  const fua = parseResponse(await fe.transfer(q, command(0, 0, rw10(Op.WRITE_10, 100, 1, 0x08), { dataOut: pattern(512, 9) })));
  t.is(fua.status, Status.GOOD);
  await detach(ts, fe, device);
});

test.serial('WRITE SAME: the pattern block over the range (several writevs), zeroes by NDOB or a zero block, holes with UNMAP; a short block is OVERRUN', async (t) => {
  const { config, files } = rig();
  fs.writeFileSync(files[0]!, Buffer.alloc(SIZE, 0x5a));
  fs.writeFileSync(files[2]!, Buffer.alloc(SIZE + 1000, 0x5a));
  const device = createScsiDevice(config, silentLogger);
  const { ts, fe } = await attach(device);
  const q = REQUEST_QUEUE;
  // 4096-byte blocks whose data-out spans two guest segments: 512 blocks per writev, 800 blocks need two.
  const block = pattern(4096, 11);
  const ws = parseResponse(await fe.transfer(q, command(0, 2, rw16(Op.WRITE_SAME_16, 100, 800), { dataOut: block })));
  t.deepEqual([ws.response, ws.status, ws.residual], [VIRTIO_SCSI_S_OK, Status.GOOD, 0]);
  let disk = fs.readFileSync(files[2]!);
  for (let lba = 100; lba < 900; lba++) t.true(disk.subarray(lba * 4096, (lba + 1) * 4096).equals(block), `block ${lba}`);
  t.is(disk[100 * 4096 - 1], 0x5a);
  t.is(disk[900 * 4096], 0x5a);

  const zeroBlock = parseResponse(await fe.transfer(q, command(0, 0, rw10(Op.WRITE_SAME_10, 8, 8), { dataOut: new Uint8Array(512) })));
  t.deepEqual([zeroBlock.response, zeroBlock.status], [VIRTIO_SCSI_S_OK, Status.GOOD]);
  const blocksBefore = fs.statSync(files[0]!).blocks;
  const ndobUnmap = parseResponse(await fe.transfer(q, command(0, 0, rw16(Op.WRITE_SAME_16, 1024, 2048, 0x09))));
  t.deepEqual([ndobUnmap.response, ndobUnmap.status], [VIRTIO_SCSI_S_OK, Status.GOOD]);
  disk = fs.readFileSync(files[0]!);
  t.true(disk.subarray(8 * 512, 16 * 512).every((b) => b === 0) && disk[7 * 512] === 0x5a && disk[16 * 512] === 0x5a);
  t.true(disk.subarray(1024 * 512, 3072 * 512).every((b) => b === 0) && disk[3072 * 512] === 0x5a);
  t.true(fs.statSync(files[0]!).blocks < blocksBefore, 'NDOB with UNMAP punched a hole');
  t.is(disk.length, SIZE);

  const short = parseResponse(await fe.transfer(q, command(0, 0, rw10(Op.WRITE_SAME_10, 0, 4), { dataOut: new Uint8Array(100).fill(1) })));
  t.deepEqual([short.response, short.status], [VIRTIO_SCSI_S_OVERRUN, 0]);
  t.is(fs.readFileSync(files[0]!)[0], 0x5a, 'nothing written');
  const ro = parseResponse(await fe.transfer(q, command(0, 1, rw16(Op.WRITE_SAME_16, 0, 4, 0x01))));
  t.deepEqual([ro.status, ro.sense[2]! & 0xf], [Status.CHECK_CONDITION, SenseKey.DATA_PROTECT]);
  t.deepEqual(device.queueStats(0).commands[COMMAND_CLASSES.indexOf('write_same')], 5);
  await detach(ts, fe, device);
});

test.serial('VERIFY: BYTCHK 0 reads, 01b compares the data-out, 11b one block over 1 MiB chunks; MISCOMPARE names the first differing byte', async (t) => {
  const { config, files } = rig();
  const contents = Buffer.from(pattern(SIZE + 1000, 5));
  fs.writeFileSync(files[2]!, contents);
  const device = createScsiDevice(config, silentLogger);
  const { ts, fe } = await attach(device);
  const q = REQUEST_QUEUE;
  const medium = parseResponse(await fe.transfer(q, command(0, 2, rw10(Op.VERIFY_10, 0, 1024))));
  t.deepEqual([medium.response, medium.status], [VIRTIO_SCSI_S_OK, Status.GOOD]);
  const same = contents.subarray(4096 * 3, 4096 * 11);
  const match = parseResponse(await fe.transfer(q, command(0, 2, rw10(Op.VERIFY_10, 3, 8, 0x02), { dataOut: same })));
  t.deepEqual([match.response, match.status, match.residual], [VIRTIO_SCSI_S_OK, Status.GOOD, 0]);
  const changed = Buffer.from(same);
  changed[5000] = changed[5000]! ^ 0xff;
  const differs = parseResponse(await fe.transfer(q, command(0, 2, rw16(Op.VERIFY_16, 3, 8, 0x02), { dataOut: changed })));
  t.deepEqual([differs.response, differs.status, differs.sense[0], differs.sense[2]! & 0xf, differs.sense[12]], [VIRTIO_SCSI_S_OK, Status.CHECK_CONDITION, 0xf0, SenseKey.MISCOMPARE, 0x1d]);
  t.is(new DataView(differs.sense.buffer, differs.sense.byteOffset).getUint32(3), 5000);
  const short = parseResponse(await fe.transfer(q, command(0, 2, rw10(Op.VERIFY_10, 3, 8, 0x02), { dataOut: same.subarray(0, 4096) })));
  t.is(short.response, VIRTIO_SCSI_S_OVERRUN);

  // BYTCHK 11b over 3.2 MiB: four chunks; the difference is in the third.
  const block = pattern(4096, 12);
  t.is(parseResponse(await fe.transfer(q, command(0, 2, rw16(Op.WRITE_SAME_16, 100, 800), { dataOut: block }))).status, Status.GOOD);
  const all = parseResponse(await fe.transfer(q, command(0, 2, rw16(Op.VERIFY_16, 100, 800, 0x06), { dataOut: block })));
  t.deepEqual([all.response, all.status], [VIRTIO_SCSI_S_OK, Status.GOOD]);
  const fd = fs.openSync(files[2]!, 'r+');
  fs.writeSync(fd, Uint8Array.of(block[123]! ^ 1), 0, 1, 100 * 4096 + (2 << 20) + 123);
  fs.closeSync(fd);
  // Several at once: they take the queue's compare buffer in turn.
  fe.submit(q, [0, 1, 2].map((id) => command(0, 2, rw16(Op.VERIFY_16, 100, 800, 0x06), { dataOut: block, id })));
  for (const c of (await fe.collect(q, 3)).map(parseResponse)) {
    t.deepEqual([c.status, c.sense[2]! & 0xf], [Status.CHECK_CONDITION, SenseKey.MISCOMPARE]);
    t.is(new DataView(c.sense.buffer, c.sense.byteOffset).getUint32(3), (2 << 20) + 123);
  }
  const beyond = parseResponse(await fe.transfer(q, command(0, 2, rw16(Op.VERIFY_16, 1000, 100, 0x00))));
  t.deepEqual([beyond.status, beyond.sense[12]], [Status.CHECK_CONDITION, Asc.LBA_OUT_OF_RANGE >> 8]);
  await detach(ts, fe, device);
});

test.serial('control queue: task management answered, event buffers held and given back at GET_VRING_BASE', async (t) => {
  const { config } = rig(1);
  const device = createScsiDevice(config, silentLogger);
  const { ts, fe } = await attach(device);
  const answer = async (spec: ReturnType<typeof tmf>) => (await fe.transfer(0, spec)).written[0];
  t.is(await answer(tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0, 0)), VIRTIO_SCSI_S_FUNCTION_COMPLETE);
  t.is(await answer(tmf(VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, 1, 0)), VIRTIO_SCSI_S_FUNCTION_COMPLETE);
  t.is(await answer(tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK, 0, 0, 77)), VIRTIO_SCSI_S_FUNCTION_COMPLETE, 'no such task in flight');
  t.is(await answer(tmf(VIRTIO_SCSI_T_TMF_CLEAR_ACA, 0, 0)), VIRTIO_SCSI_S_FUNCTION_REJECTED);
  t.is(await answer(tmf(99, 0, 0)), VIRTIO_SCSI_S_FUNCTION_REJECTED);
  t.is(await answer(tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 9, 0)), VIRTIO_SCSI_S_BAD_TARGET);
  t.is(await answer(tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0, 40)), VIRTIO_SCSI_S_INCORRECT_LUN);
  const an = new Uint8Array(16);
  an[0] = 1; // VIRTIO_SCSI_T_AN_QUERY
  const anReply = await fe.transfer(0, { readable: [{ data: an }], writable: [{ length: 5 }] });
  t.deepEqual([...anReply.written], [0, 0, 0, 0, VIRTIO_SCSI_S_OK]);

  // Event buffers wait for events: none completes, and GET_VRING_BASE hands all four back.
  const base = await fe.getVringBase(1).then(async (b) => {
    await fe.setupQueue(1, 128, { base: b });
    return b;
  });
  fe.submit(1, Array.from({ length: 4 }, () => ({ writable: [{ length: 16 }] })));
  for (let i = 0; i < 100 && device.heldEventBuffers() < 4; i++) await new Promise((r) => setTimeout(r, 20));
  t.is(device.heldEventBuffers(), 4);
  t.is(await fe.getVringBase(1), base, 'the held buffers went back to the ring');
  t.is(device.heldEventBuffers(), 0);
  await detach(ts, fe, device);
});

test.serial('malformed requests break the queue: a header shorter than 51 bytes, no room for the response', async (t) => {
  const { config } = rig(2);
  const device = createScsiDevice(config, silentLogger);
  const { ts, fe } = await attach(device);
  fe.submit(REQUEST_QUEUE, { readable: [{ data: new Uint8Array(40) }], writable: [{ length: 108 }] });
  await fe.waitErr(REQUEST_QUEUE);
  fe.submit(REQUEST_QUEUE + 1, { readable: command(0, 0, [Op.TEST_UNIT_READY]).readable, writable: [{ length: 100 }] });
  await fe.waitErr(REQUEST_QUEUE + 1);
  // The control queue still answers.
  t.is((await fe.transfer(0, tmf(VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET, 0, 0))).written[0], VIRTIO_SCSI_S_FUNCTION_COMPLETE);
  await detach(ts, fe, device);
});

test('configuration errors are one ConfigError each', (t) => {
  const dir = tempDir();
  const file = image(dir, 'x.img', 4096);
  const cases: [Record<string, unknown>, ConfigErrorCode][] = [
    [{}, 'CONFIG_MISSING'],
    [{ lun: ['x=a.img'] }, 'CONFIG_INVALID'],
    [{ lun: ['16384=a.img'] }, 'CONFIG_INVALID'],
    [{ lun: ['256:0=a.img'] }, 'CONFIG_INVALID'],
    [{ lun: ['0=a.img,bogus'] }, 'CONFIG_INVALID'],
    [{ lun: ['0=a.img,block-size=1024'] }, 'CONFIG_INVALID'],
    [{ lun: ['0=a.img,ro,discard'] }, 'CONFIG_CONFLICT'],
    [{ lun: ['0=a.img', '0:0=b.img'] }, 'CONFIG_CONFLICT'],
    [{ lun: ['0=a.img'], 'queue-size': 100 }, 'CONFIG_INVALID'],
  ];
  for (const [args, code] of cases) t.is(t.throws(() => toConfig(args), { instanceOf: ConfigError })?.code, code, JSON.stringify(args));
  const parsed = toConfig({ lun: [`3:200=${file},serial=S1,block-size=4096`] }).luns[0]!;
  t.deepEqual(parsed, { target: 3, lun: 200, file, readOnly: false, serial: 'S1', blockSize: 4096, discard: false });
  t.is(t.throws(() => createScsiDevice(toConfig({ lun: ['0=/nonexistent.img'] }), silentLogger), { instanceOf: ConfigError })?.code, 'CONFIG_INVALID');
  const list = path.join(dir, 'luns.json');
  fs.writeFileSync(list, JSON.stringify(Array.from({ length: 300 }, (_, lun) => ({ lun, file }))));
  const device = createScsiDevice(toConfig({ luns: list }), silentLogger);
  t.is(device.unitCount, 300);
  device.close();
  fs.writeFileSync(list, JSON.stringify([{ lun: 1, file, color: 'red' }]));
  t.is(t.throws(() => createScsiDevice(toConfig({ luns: list }), silentLogger), { instanceOf: ConfigError })?.code, 'CONFIG_INVALID');
});

test.serial('a response header split over several buffers is written whole: status, residual, sense, then the data-in', async (t) => {
  const { config } = rig(1);
  const device = createScsiDevice(config, silentLogger);
  const { ts, fe } = await attach(device);
  const data = pattern(2048, 41);
  const parts = [5, 60, 43];
  const w = parseResponse(await fe.transfer(REQUEST_QUEUE, command(0, 0, rw10(Op.WRITE_10, 8, 4), { dataOut: data, responseParts: parts })));
  t.deepEqual([w.response, w.status, w.residual, w.senseLength], [VIRTIO_SCSI_S_OK, Status.GOOD, 0, 0]);
  const r = parseResponse(await fe.transfer(REQUEST_QUEUE, command(0, 0, rw10(Op.READ_10, 8, 4), { dataIn: 2560, responseParts: parts })));
  t.deepEqual([r.response, r.status, r.residual, r.len], [VIRTIO_SCSI_S_OK, Status.GOOD, 512, 108 + 2048]);
  t.true(Buffer.from(r.data.subarray(0, 2048)).equals(data));
  const bad = parseResponse(await fe.transfer(REQUEST_QUEUE, command(0, 0, rw10(Op.READ_10, SIZE / 512, 1), { dataIn: 512, responseParts: parts })));
  t.deepEqual([bad.response, bad.status, bad.residual, bad.senseLength, bad.sense[2]! & 0x0f, bad.sense[12]], [VIRTIO_SCSI_S_OK, Status.CHECK_CONDITION, 512, 18, SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE >> 8]);
  await detach(ts, fe, device);
});

test.serial('seeded fuzz: random LUN fields, CDBs and buffer sizes always get a well-formed response', async (t) => {
  const { config } = rig(1);
  const device = createScsiDevice(config, silentLogger);
  const { ts, fe } = await attach(device);
  let x = 0x5eed;
  const rand = (n: number) => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0) >>> 8) % n;
  const seen = new Map<string, number>();
  const interesting = [Op.READ_6, Op.READ_10, Op.READ_16, Op.WRITE_10, Op.WRITE_12, Op.INQUIRY, Op.REPORT_LUNS, Op.MODE_SENSE_10, Op.UNMAP, Op.SERVICE_ACTION_IN_16, Op.REQUEST_SENSE];
  for (let round = 0; round < 10; round++) {
    const chains = Array.from({ length: 24 }, () => {
      const cdb = Array.from({ length: 32 }, () => rand(256));
      cdb[0] = rand(3) === 0 ? rand(256) : interesting[rand(interesting.length)]!;
      if (rand(2) === 0) {
        // A small LBA and length, so that some transfers are in range (and some find their buffers too small).
        cdb.fill(0, 1, 13);
        cdb[4] = rand(16);
        cdb[8] = rand(16);
      }
      const spec = command(rand(4) === 0 ? rand(256) : rand(3), rand(3) === 0 ? rand(0x4000) : rand(4), cdb, {
        dataOut: rand(2) === 0 ? pattern(rand(4) * 512 + rand(2) * rand(512), rand(1000)) : undefined,
        dataIn: rand(3) === 0 ? 0 : rand(9000),
        dataInParts: 1 + rand(3),
      });
      if (rand(8) === 0) (spec.readable![0]!.data as Uint8Array)[0] = rand(256); // LUN byte 0 mangled
      return spec;
    });
    fe.submit(REQUEST_QUEUE, chains);
    for (const c of await fe.collect(REQUEST_QUEUE, chains.length)) {
      const r = parseResponse(c);
      t.true(r.response <= 12 && r.senseLength <= 96 && c.len >= 108, `response ${r.response}, sense ${r.senseLength}, len ${c.len}`);
      if (r.response === VIRTIO_SCSI_S_OK) t.true(r.status === Status.GOOD || (r.status === Status.CHECK_CONDITION && ((r.senseLength === 18 && r.sense[0] === 0x70) || (r.senseLength >= 8 && r.sense[0] === 0x72))));
      const kind = `${r.response}/${r.status}`;
      seen.set(kind, (seen.get(kind) ?? 0) + 1);
    }
  }
  // The fuzz reaches every outcome: GOOD, CHECK CONDITION, OVERRUN, BAD_TARGET.
  for (const kind of [`${VIRTIO_SCSI_S_OK}/${Status.GOOD}`, `${VIRTIO_SCSI_S_OK}/${Status.CHECK_CONDITION}`, `${VIRTIO_SCSI_S_OVERRUN}/0`, `${VIRTIO_SCSI_S_BAD_TARGET}/0`]) {
    t.true((seen.get(kind) ?? 0) > 0, `${kind} in ${JSON.stringify([...seen])}`);
  }
  t.deepEqual(ts.logs.filter((l) => l.level === 'error' || l.fields?.code !== undefined), [], 'no queue broke');
  await detach(ts, fe, device);
});

test.serial('a LOGICAL UNIT RESET waits for the commands in flight; QUERY TASK finds them', async (t) => {
  const dir = tempDir();
  const file = image(dir, 'gated.img');
  // Completions are held back until the test releases them: the write stays in flight.
  const held: [Uint32Array, Int32Array, number, CompletionSink][] = [];
  const real = chooseExecutor(silentLogger).create;
  const createExecutor: ExecutorFactory = (capacity, sink) => real(capacity, (u, r, n) => held.push([u.slice(0, n), r.slice(0, n), n, sink]));
  const unit = new ImageUnit({ blockSize: 512, readOnly: false, discard: false, serial: 'G', naa: naaDesignator('G') }, openBackingFile({ path: file, readOnly: false, direct: false }), 0, 0);
  const device = new ScsiDevice({ requestQueues: 1, queueSize: 128 }, { units: [unit], createExecutor, logger: silentLogger });
  const { ts, fe } = await attach(device);
  const popped = async (queue: number, n: number) => {
    for (let i = 0; i < 500 && ts.server.vrings[queue]!.totals().requests < n; i++) await new Promise((r) => setTimeout(r, 10));
  };
  const data = pattern(4096, 77);
  fe.submit(REQUEST_QUEUE, command(0, 0, rw10(Op.WRITE_10, 8, 8), { dataOut: data, id: 4242 }));
  for (let i = 0; i < 500 && held.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
  t.is(held.length, 1, 'the write reached the kernel and its completion is held');
  t.is((await fe.transfer(0, tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK, 0, 0, 4242))).written[0], VIRTIO_SCSI_S_FUNCTION_SUCCEEDED);
  t.is((await fe.transfer(0, tmf(VIRTIO_SCSI_T_TMF_QUERY_TASK, 0, 0, 4243))).written[0], VIRTIO_SCSI_S_FUNCTION_COMPLETE);
  fe.submit(0, tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, 0, 0));
  await popped(0, 3);
  await t.throwsAsync(fe.collect(0, 1, 100), { code: 'FRONTEND_TIMEOUT' }, 'no answer while the write is in flight');
  for (const [u, r, n, sink] of held.splice(0)) sink(u, r, n);
  const [write] = (await fe.collect(REQUEST_QUEUE, 1)).map(parseResponse);
  t.deepEqual([write!.response, write!.status], [VIRTIO_SCSI_S_OK, Status.GOOD]);
  t.is((await fe.collect(0, 1))[0]!.written[0], VIRTIO_SCSI_S_FUNCTION_COMPLETE);
  t.true(fs.readFileSync(file).subarray(8 * 512, 16 * 512).equals(data));
  await detach(ts, fe, device);
});

test.serial('hotplug: lun-add, lun-resize and lun-remove reach the driver as events on held buffers, queued while it has none; dropped ones are flagged', async (t) => {
  const { config } = rig(1);
  const device = createScsiDevice(config, silentLogger);
  const { ts, fe } = await attach(device);
  const methods = device.controlMethods();
  const dir = tempDir();
  const extra = image(dir, 'hot.img', 1 << 20, 0x11);
  const event = (c: { written: Uint8Array }) => {
    const v = new DataView(c.written.buffer, c.written.byteOffset, 16);
    return { event: v.getUint32(0, true), lun: [...c.written.subarray(4, 8)], reason: v.getUint32(12, true) };
  };

  // No event buffer yet: the event waits for one.
  t.like(await methods['lun-add']!.call({ spec: `0:9=${extra},serial=HOT` }), { lun: '0:9', blocks: 2048, event: 'queued' });
  const first = await fe.transfer(1, { writable: [{ length: 16 }] });
  t.deepEqual(event(first), { event: VIRTIO_SCSI_T_TRANSPORT_RESET, lun: [1, 0, 0, 9], reason: VIRTIO_SCSI_EVT_RESET_RESCAN });

  fe.submit(1, Array.from({ length: 4 }, () => ({ writable: [{ length: 16 }] })));
  for (let i = 0; i < 200 && device.heldEventBuffers() < 4; i++) await new Promise((r) => setTimeout(r, 10));
  const inq = parseResponse(await fe.transfer(REQUEST_QUEUE, command(0, 9, [Op.INQUIRY, 1, 0x80, 0, 64, 0], { dataIn: 64 })));
  t.is(Buffer.from(inq.data.subarray(4, 7)).toString(), 'HOT', 'the added unit answers');

  t.like(await methods['lun-add']!.call({ spec: `1:300=${extra},ro` }), { lun: '1:300', event: 'sent' });
  t.deepEqual(event((await fe.collect(1, 1))[0]!), { event: VIRTIO_SCSI_T_TRANSPORT_RESET, lun: [1, 1, 0x41, 0x2c], reason: VIRTIO_SCSI_EVT_RESET_RESCAN });

  fs.truncateSync(extra, 2 << 20);
  t.like(await methods['lun-resize']!.call({ lun: '0:9' }), { previousBlocks: 2048, blocks: 4096, event: 'sent' });
  t.like(await methods['lun-resize']!.call({ lun: '0:9' }), { blocks: 4096, event: 'none' }, 'unchanged: no event');
  t.deepEqual(event((await fe.collect(1, 1))[0]!), { event: VIRTIO_SCSI_T_PARAM_CHANGE, lun: [1, 0, 0, 9], reason: 0x092a });

  t.like(await methods['lun-remove']!.call({ lun: '0:9' }), { lun: '0:9', event: 'sent' });
  t.deepEqual(event((await fe.collect(1, 1))[0]!), { event: VIRTIO_SCSI_T_TRANSPORT_RESET, lun: [1, 0, 0, 9], reason: VIRTIO_SCSI_EVT_RESET_REMOVED });
  const gone = parseResponse(await fe.transfer(REQUEST_QUEUE, command(0, 9, [Op.INQUIRY, 0, 0, 0, 36, 0], { dataIn: 36 })));
  t.is(gone.data[0], 0x7f);

  for (const [method, params] of [['lun-add', { spec: `0:0=${extra}` }], ['lun-add', { spec: '0:20=/nonexistent.img' }], ['lun-remove', { lun: '0:9' }], ['lun-resize', { lun: 'x' }]] as const) {
    await t.throwsAsync(async () => methods[method]!.call(params), { instanceOf: ControlError }, `${method} ${JSON.stringify(params)}`);
  }
  t.is(device.unitCount, 5);

  // More events than the device keeps while the driver gives no buffer: the rest are dropped, and the
  // first event the driver gets then says EVENTS_MISSED.
  t.is(device.heldEventBuffers(), 1);
  const outcomes: unknown[] = [];
  for (let i = 0; i < MAX_QUEUED_EVENTS / 2 + 1; i++) {
    outcomes.push(((await methods['lun-add']!.call({ spec: `2:1=${extra}` })) as { event: string }).event);
    outcomes.push(((await methods['lun-remove']!.call({ lun: '2:1' })) as { event: string }).event);
  }
  t.deepEqual([outcomes[0], outcomes[1], outcomes.at(-1)], ['sent', 'queued', 'dropped']);
  t.deepEqual(event((await fe.collect(1, 1))[0]!), { event: VIRTIO_SCSI_T_TRANSPORT_RESET, lun: [1, 2, 0, 1], reason: VIRTIO_SCSI_EVT_RESET_RESCAN }, 'the last held buffer');
  const next = await fe.transfer(1, { writable: [{ length: 16 }] });
  t.deepEqual(event(next), { event: (VIRTIO_SCSI_T_TRANSPORT_RESET | VIRTIO_SCSI_T_EVENTS_MISSED) >>> 0, lun: [1, 2, 0, 1], reason: VIRTIO_SCSI_EVT_RESET_REMOVED });
  await detach(ts, fe, device);
});

test.serial('the guest switches the write cache off by MODE SELECT; a device reset restores it', async (t) => {
  const { config } = rig(1);
  const device = createScsiDevice(config, silentLogger);
  const { ts, fe } = await attach(device);
  const sensed = parseResponse(await fe.transfer(REQUEST_QUEUE, command(0, 0, [Op.MODE_SENSE_6, 0x08, 0x08, 0, 255, 0], { dataIn: 255 })));
  const page = sensed.data.slice(4, 24);
  page[2] = 0;
  const list = Uint8Array.from([0, 0, 0, 0, ...page]);
  const select = parseResponse(await fe.transfer(REQUEST_QUEUE, command(0, 0, [Op.MODE_SELECT_6, 0x10, 0, 0, list.length, 0], { dataOut: list })));
  t.deepEqual([select.response, select.status], [VIRTIO_SCSI_S_OK, Status.GOOD]);
  t.false(device.logicalUnits()[0]!.writeCache);
  await fe.request(Request.RESET_DEVICE);
  await fe.sync();
  t.true(device.logicalUnits()[0]!.writeCache);
  await detach(ts, fe, device);
});
