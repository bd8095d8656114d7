/**
 * The blk daemon's device end to end through the real protocol engine, the native io_uring (and the
 * thread-pool fallback) and a real image file: a test front-end over a unix socket, memfd guest memory
 * with several regions, split and packed rings, indirect tables. Data must land in the file and come
 * back into guest memory.
 */
import test from 'ava';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { BlkConfig } from '../../../daemons/blk/cli';
import { BlkDevice } from '../../../daemons/blk/device';
import { createBlkDevice } from '../../../daemons/blk/main';
import {
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from '../../../daemons/blk/virtio-blk';
import { ConfigError } from '../../../lib/errors';
import { openBackingFile } from '../../../lib/io/backing-file';
import { ThreadPoolExecutor } from '../../../lib/io/thread-pool-executor';
import { silentLogger } from '../../../lib/runtime/logger';
import { BackendRequest } from '../../../lib/vhost-user/messages';
import { Frontend, type ChainSpec, type SegmentSpec } from '../../helpers/frontend';
import { tmpfsImage } from '../../helpers/tmpfs-image';
import { TestServer, pattern } from '../../lib/vhost-user/harness';
import { blkHeader as header, discardSegment as segment } from './wire';

const IMAGE_SIZE = 8 << 20;
const ALL_FEATURES = (1n << 64n) - 1n;

function tempImage(size = IMAGE_SIZE): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-blk-test-'));
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  return file;
}

function config(file: string, over: Partial<BlkConfig> = {}): BlkConfig {
  return {
    file,
    readOnly: false,
    serial: 'proto-test',
    numQueues: 2,
    queueSize: 256,
    direct: false,
    discard: true,
    writeZeroes: true,
    writeback: true,
    inlineIo: true,
    ...over,
  };
}

function concat(...parts: Uint8Array[]): Uint8Array {
  return new Uint8Array(Buffer.concat(parts));
}

/** Split `data` into `n` readable segments over the regions. */
function split(data: Uint8Array, n: number, seed: number): SegmentSpec[] {
  const out: SegmentSpec[] = [];
  const step = Math.ceil(data.length / n);
  for (let i = 0; i < data.length; i += step) out.push({ data: data.subarray(i, i + step), region: (seed + i) % 3 });
  return out;
}

function writeChain(sector: number, data: Uint8Array, seed: number, indirect: boolean): ChainSpec {
  return { readable: [{ data: header(VIRTIO_BLK_T_OUT, sector) }, ...split(data, 1 + (seed % 5), seed)], writable: [{ length: 1, region: seed % 3 }], indirect };
}

function readChain(sector: number, length: number, seed: number, indirect: boolean): ChainSpec {
  const parts = 1 + (seed % 4);
  const step = Math.floor(length / parts);
  const sizes = Array.from({ length: parts }, (_, i) => (i === parts - 1 ? length - step * (parts - 1) : step));
  return {
    readable: [{ data: header(VIRTIO_BLK_T_IN, sector) }],
    writable: [...sizes.map((n, i) => ({ length: n, region: (seed + i) % 3 })), { length: 1 }],
    indirect,
  };
}

async function attach(device: BlkDevice, opts: { packed?: boolean; queues?: number } = {}): Promise<{ ts: TestServer; fe: Frontend }> {
  const ts = await TestServer.start(device);
  const fe = ts.connect();
  await fe.negotiate({ features: ALL_FEATURES, packed: opts.packed ?? false, eventIdx: true, indirect: true });
  await fe.setMemTable();
  for (let q = 0; q < (opts.queues ?? 1); q++) await fe.setupQueue(q, 128);
  return { ts, fe };
}

async function detach(ts: TestServer, fe: Frontend, device: BlkDevice): Promise<void> {
  fe.close();
  await ts.server.close();
  device.close();
}

for (const packed of [false, true]) {
  test.serial(`io_uring, ${packed ? 'packed' : 'split'} ring: random writes land in the file and read back`, async (t) => {
    const file = tempImage();
    const device = createBlkDevice(config(file), silentLogger);
    const { ts, fe } = await attach(device, { packed, queues: 2 });
    const written = new Map<number, Uint8Array>();
    let seed = 1;
    for (let round = 0; round < 6; round++) {
      const chains: ChainSpec[] = [];
      const queue = round % 2;
      for (let i = 0; i < 12; i++, seed++) {
        const sectors = 1 + ((seed * 7919) % 64);
        const sector = ((seed * 104729) % (IMAGE_SIZE / 512 - 64)) & ~0;
        const data = pattern(sectors * 512, seed);
        chains.push(writeChain(sector, data, seed, seed % 3 === 0));
        written.set(sector, data);
      }
      fe.submit(queue, chains);
      const done = await fe.collect(queue, chains.length);
      t.true(done.every((c) => c.written[0] === VIRTIO_BLK_S_OK));
    }
    // Later writes may overlap earlier ones: compare with a model of the disk.
    const model = new Uint8Array(IMAGE_SIZE);
    for (const [sector, data] of written) model.set(data, sector * 512);
    const onDisk = new Uint8Array(fs.readFileSync(file));
    // Read a few ranges back through the device.
    const reads = [...written.keys()].slice(0, 16);
    fe.submit(0, reads.map((sector, i) => readChain(sector, written.get(sector)!.length, i, i % 2 === 0)));
    const back = await fe.collect(0, reads.length);
    for (const c of back) t.is(c.written[c.written.length - 1], VIRTIO_BLK_S_OK);
    t.is(back.length, reads.length);
    // The model is only exact where no later write overlapped; the file is the truth for reads.
    for (const [i, sector] of reads.entries()) {
      const len = written.get(sector)!.length;
      const got = back.find((c) => c.len === len + 1 && Buffer.compare(c.written.subarray(0, len), onDisk.subarray(sector * 512, sector * 512 + len)) === 0);
      t.truthy(got, `read ${i} at sector ${sector} matches the file`);
    }
    t.deepEqual(onDisk.length, model.length);
    await detach(ts, fe, device);
  });
}

test.serial('flush, GET_ID, discard and write zeroes on a real file', async (t) => {
  const file = tempImage();
  fs.writeFileSync(file, Buffer.alloc(IMAGE_SIZE, 0x5a));
  const device = createBlkDevice(config(file), silentLogger);
  const { ts, fe } = await attach(device);
  const flush = await fe.transfer(0, { readable: [{ data: header(VIRTIO_BLK_T_FLUSH) }], writable: [{ length: 1 }] });
  t.deepEqual([...flush.written], [VIRTIO_BLK_S_OK]);
  const id = await fe.transfer(0, { readable: [{ data: header(VIRTIO_BLK_T_GET_ID) }], writable: [{ length: 20 }, { length: 1 }] });
  t.is(Buffer.from(id.written.subarray(0, 10)).toString(), 'proto-test');
  const discard = await fe.transfer(0, { readable: [{ data: concat(header(VIRTIO_BLK_T_DISCARD), segment(8, 16), segment(64, 8)) }], writable: [{ length: 1 }] });
  t.deepEqual([...discard.written], [VIRTIO_BLK_S_OK]);
  const zeroes = await fe.transfer(0, { readable: [{ data: concat(header(VIRTIO_BLK_T_WRITE_ZEROES), segment(128, 8)) }], writable: [{ length: 1 }] });
  t.deepEqual([...zeroes.written], [VIRTIO_BLK_S_OK]);
  const disk = fs.readFileSync(file);
  const allZero = (sector: number, n: number) => disk.subarray(sector * 512, (sector + n) * 512).every((b) => b === 0);
  t.true(allZero(8, 16));
  t.true(allZero(64, 8));
  t.true(allZero(128, 8));
  t.is(disk[7 * 512 + 511], 0x5a);
  t.is(disk[24 * 512], 0x5a);
  t.is(disk.length, IMAGE_SIZE, 'punching holes keeps the size');
  await detach(ts, fe, device);
});

test.serial('read-only: writes fail, the file is unchanged, reads work', async (t) => {
  const file = tempImage();
  fs.writeFileSync(file, Buffer.alloc(IMAGE_SIZE, 0x33));
  const device = createBlkDevice(config(file, { readOnly: true, discard: false, writeZeroes: false }), silentLogger);
  const { ts, fe } = await attach(device);
  const w = await fe.transfer(0, writeChain(0, pattern(4096, 1), 1, false));
  t.deepEqual([...w.written], [VIRTIO_BLK_S_IOERR]);
  const r = await fe.transfer(0, readChain(0, 4096, 0, false));
  t.is(r.written[4096], VIRTIO_BLK_S_OK);
  t.true(r.written.subarray(0, 4096).every((b) => b === 0x33));
  t.true(fs.readFileSync(file).every((b) => b === 0x33));
  await detach(ts, fe, device);
});

test.serial('GET_CONFIG, and a grown image reaches the front-end as CONFIG_CHANGE_MSG', async (t) => {
  const file = tempImage();
  const device = createBlkDevice(config(file), silentLogger);
  const { ts, fe } = await attach(device);
  await fe.setBackendChannel();
  const before = await fe.getConfig(0, 60);
  t.is(new DataView(before.buffer, before.byteOffset).getBigUint64(0, true), BigInt(IMAGE_SIZE / 512));
  t.is(new DataView(before.buffer, before.byteOffset).getUint16(34, true), 2);
  fs.truncateSync(file, IMAGE_SIZE * 2);
  await device.reload();
  const msg = await fe.waitBackendMessage(BackendRequest.CONFIG_CHANGE_MSG);
  t.truthy(msg);
  const after = await fe.getConfig(0, 8);
  t.is(new DataView(after.buffer, after.byteOffset).getBigUint64(0, true), BigInt((IMAGE_SIZE * 2) / 512));
  // The new space is writable.
  const w = await fe.transfer(0, writeChain(IMAGE_SIZE / 512 + 10, pattern(512, 5), 2, false));
  t.deepEqual([...w.written], [VIRTIO_BLK_S_OK]);
  await detach(ts, fe, device);
});

test.serial('thread-pool fallback executor moves the same data', async (t) => {
  const file = tempImage();
  const image = openBackingFile({ path: file, readOnly: false, direct: false });
  const device = new BlkDevice(
    { readOnly: false, serial: '', numQueues: 1, queueSize: 256, logicalBlockSize: 512, discard: true, writeZeroes: true, writeback: false },
    { image, createExecutor: (capacity, sink) => new ThreadPoolExecutor(capacity, sink), logger: silentLogger },
  );
  const { ts, fe } = await attach(device);
  const data = pattern(64 * 1024, 42);
  fe.submit(0, [writeChain(100, data, 3, true), { readable: [{ data: concat(header(VIRTIO_BLK_T_WRITE_ZEROES), segment(0, 8, 1)) }], writable: [{ length: 1 }] }]);
  const done = await fe.collect(0, 2);
  t.true(done.every((c) => c.written[0] === VIRTIO_BLK_S_OK));
  t.deepEqual(new Uint8Array(fs.readFileSync(file).subarray(100 * 512, 100 * 512 + data.length)), data);
  const back = await fe.transfer(0, readChain(100, data.length, 2, true));
  t.deepEqual(back.written.subarray(0, data.length), data);
  await detach(ts, fe, device);
});

/** Write `data` at byte `offset` of `file` with O_DIRECT (dd): it lands on disk and leaves the page cache without it. */
function writeUncached(file: string, offset: number, data: Uint8Array): void {
  const src = path.join(path.dirname(file), 'src.bin');
  fs.writeFileSync(src, data);
  execFileSync('dd', [`if=${src}`, `of=${file}`, `bs=${data.length}`, `seek=${offset / data.length}`, 'conv=notrunc', 'oflag=direct', 'status=none']);
}

for (const inlineIo of [true, false]) {
  test.serial(`tmpfs image, ${inlineIo ? 'inline I/O: every read and write runs on the queue thread, none through io_uring' : '--no-inline-io: every read and write goes through io_uring'}; data lands and reads back`, async (t) => {
    const file = tmpfsImage(t, `blk-inline-${inlineIo}`, IMAGE_SIZE);
    const device = createBlkDevice(config(file, { numQueues: 1, inlineIo }), silentLogger);
    t.is(device.inlineMode, inlineIo ? 'memory' : 'off');
    const { ts, fe } = await attach(device);
    // One batch of writes (1..16 sectors, 1..5 segments over three regions), then one batch of reads.
    const writes = Array.from({ length: 20 }, (_, i) => ({ sector: i * 64 + (i % 7), data: pattern(512 * (1 + ((i * 5) % 16)), 100 + i) }));
    fe.submit(0, writes.map((w, i) => writeChain(w.sector, w.data, i, i % 3 === 0)));
    t.true((await fe.collect(0, writes.length)).every((c) => c.written[0] === VIRTIO_BLK_S_OK));
    const onDisk = fs.readFileSync(file);
    for (const w of writes) t.deepEqual(new Uint8Array(onDisk.subarray(w.sector * 512, w.sector * 512 + w.data.length)), w.data);
    fe.submit(0, writes.map((w, i) => readChain(w.sector, w.data.length, i, i % 2 === 0)));
    const back = await fe.collect(0, writes.length);
    for (const w of writes) {
      t.truthy(back.find((c) => c.written[c.written.length - 1] === VIRTIO_BLK_S_OK && Buffer.compare(c.written.subarray(0, -1), w.data) === 0), `sector ${w.sector} reads back`);
    }
    const stats = device.engineStats(0);
    t.deepEqual({ ...stats }, inlineIo ? { inline: 40, inlineFallbacks: 0, executor: 0 } : { inline: 0, inlineFallbacks: 0, executor: 40 });
    await detach(ts, fe, device);
  });
}

test.serial('disk image: reads try RWF_NOWAIT; a page-cache miss falls back to io_uring with the right data, the next read of it hits inline; writes go to io_uring', async (t) => {
  // /var/tmp: a disk file system, not tmpfs, on the usual layouts.
  const dir = fs.mkdtempSync(path.join('/var/tmp', 'vhostd-blk-nowait-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, '');
  fs.truncateSync(file, IMAGE_SIZE);
  const data = pattern(64 * 1024, 77);
  const offset = 1 << 20;
  writeUncached(file, offset, data);
  const device = createBlkDevice(config(file, { numQueues: 1 }), silentLogger);
  t.is(device.inlineMode, 'nowait-reads');
  const { ts, fe } = await attach(device);
  const first = await fe.transfer(0, readChain(offset / 512, data.length, 3, false));
  t.is(first.written[data.length], VIRTIO_BLK_S_OK);
  t.deepEqual(first.written.subarray(0, data.length), data, 'read through the fallback');
  const missed = { ...device.engineStats(0) };
  t.true(missed.inlineFallbacks >= 1, 'the uncached range was not read inline');
  t.is(missed.executor, missed.inlineFallbacks);
  const again = await fe.transfer(0, readChain(offset / 512, data.length, 2, true));
  t.deepEqual(again.written.subarray(0, data.length), data, 'read from the page cache inline');
  t.deepEqual({ ...device.engineStats(0) }, { ...missed, inline: missed.inline + 1 });
  const w = await fe.transfer(0, writeChain(8, pattern(4096, 9), 1, false));
  t.is(w.written[0], VIRTIO_BLK_S_OK);
  t.is(device.engineStats(0).executor, missed.executor + 1);
  await detach(ts, fe, device);
});

test('a missing image is one ConfigError line', (t) => {
  const err = t.throws(() => createBlkDevice(config('/nonexistent/disk.img'), silentLogger), { instanceOf: ConfigError });
  t.is(err?.code, 'CONFIG_INVALID');
  t.regex(err!.message, /^--file \/nonexistent\/disk.img: no such file$/);
});
