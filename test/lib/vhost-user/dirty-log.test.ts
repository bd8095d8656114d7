/**
 * Live migration's dirty page log over a real socket (vhost-user.rst, "Migration"): the front-end maps
 * a memfd bitmap with SET_LOG_BASE, turns logging on with VHOST_F_LOG_ALL and VHOST_VRING_F_LOG on a
 * running ring, runs I/O and reads the bits as QEMU does; then turns it off and sees no more bits.
 * Split and packed rings, on the main thread and in queue worker threads.
 */
import test, { type ExecutionContext } from 'ava';

import { native } from '../../../native';
import { LOG_PAGE_SIZE, logBytesFor } from '../../../lib/memory/dirty-log';
import { bit, VHOST_F_LOG_ALL } from '../../../lib/virtio/constants';
import { ProtocolFeature, Request, VHOST_VRING_F_LOG } from '../../../lib/vhost-user/messages';
import { DEFAULT_LAYOUT, encodeU64, encodeVringAddr, type Frontend, type QueueState } from '../../helpers/frontend';
import { TestDevice } from '../../helpers/test-device';
import { pattern, TestServer } from './harness';

const WORKERS = { threads: 1, modulePath: require.resolve('../../helpers/test-device'), exportName: 'createTestDeviceForWorker', config: { migratable: true } };
const QUEUE_SIZE = 16;

/** The front-end's side of the log: a memfd it maps itself, as QEMU does. */
class FrontendLog {
  readonly fd: number;
  readonly bits: Uint8Array;
  constructor(readonly size: number) {
    this.fd = native.memfdCreate('vhostd-test-log', size);
    this.bits = native.mmap(this.fd, size, 0, true).views[0]!;
  }
  dirtyPages(): number[] {
    const pages: number[] = [];
    this.bits.forEach((byte, i) => {
      for (let b = 0; b < 8; b++) if ((byte & (1 << b)) !== 0) pages.push(i * 8 + b);
    });
    return pages;
  }
  clear(): void {
    this.bits.fill(0);
  }
}

function pagesOf(gpa: number, length: number): number[] {
  const out: number[] = [];
  for (let p = Math.floor(gpa / LOG_PAGE_SIZE); p <= Math.floor((gpa + length - 1) / LOG_PAGE_SIZE); p++) out.push(p);
  return out;
}

function logBasePayload(size: number, offset: number): Uint8Array {
  const out = new Uint8Array(16);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(size), true);
  view.setBigUint64(8, BigInt(offset), true);
  return out;
}

/** SET_VRING_ADDR of a running queue with VHOST_VRING_F_LOG on or off (QEMU's vhost_dev_set_log). */
async function setRingLog(fe: Frontend, q: QueueState, on: boolean): Promise<void> {
  const { desc, avail, used } = q.driver.areas;
  const m = fe.memory;
  await fe.request(
    Request.SET_VRING_ADDR,
    encodeVringAddr({ index: q.index, flags: on ? VHOST_VRING_F_LOG : 0, desc: m.toUser(desc), used: m.toUser(used), avail: m.toUser(avail), log: on ? used : 0 }),
  );
}

async function run(t: ExecutionContext, packed: boolean, workers: boolean): Promise<void> {
  const device = new TestDevice({ migratable: true });
  const ts = await TestServer.start(device, workers ? { queueWorkers: WORKERS } : {});
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
  });
  const neg = await fe.negotiate({ packed, eventIdx: true });
  t.not(neg.offeredFeatures & bit(VHOST_F_LOG_ALL), 0n, 'VHOST_F_LOG_ALL offered');
  t.not(neg.protocolFeatures & bit(ProtocolFeature.LOG_SHMFD), 0n, 'LOG_SHMFD negotiated');
  await fe.setMemTable(DEFAULT_LAYOUT);
  const q = await fe.setupQueue(0, QUEUE_SIZE, { ringRegion: 1 });

  // Sized as QEMU sizes it: from address 0 to the end of the highest region.
  const end = Math.max(...DEFAULT_LAYOUT.map((r) => r.gpa + r.size));
  const log = new FrontendLog(logBytesFor(end));
  t.teardown(() => native.close(log.fd));
  const reply = await fe.call(Request.SET_LOG_BASE, logBasePayload(log.size, 0), { fds: [native.dup(log.fd)] });
  t.is(reply.length, 8, 'SET_LOG_BASE is answered');
  await fe.request(Request.SET_FEATURES, encodeU64(neg.features | bit(VHOST_F_LOG_ALL)));
  await setRingLog(fe, q, true);

  const region0 = fe.memory.regions[0]!.gpa;
  const region2 = fe.memory.regions[2]!.gpa;
  // The writable buffer crosses a page boundary; the readable one sits in other pages.
  const writable = { gpa: region2 + 3 * LOG_PAGE_SIZE + 1000, length: 5000 };
  const readable = { gpa: region0 + 40 * LOG_PAGE_SIZE, data: pattern(3000, 7) };
  t.deepEqual(log.dirtyPages(), [], 'nothing is marked before I/O');
  await fe.transfer(0, { readable: [readable], writable: [writable] });

  const dirty = log.dirtyPages();
  const dataPages = pagesOf(writable.gpa, writable.length);
  const { desc, used } = q.driver.areas;
  // Where the device writes its ring: split, the used ring (6 + 8n + avail_event); packed, the
  // descriptor ring and the device event suppression area.
  const ringPages = packed ? [...pagesOf(desc, 16 * QUEUE_SIZE), ...pagesOf(used, 4)] : pagesOf(used, 8 + 8 * QUEUE_SIZE);
  for (const page of dataPages) t.true(dirty.includes(page), `data page ${page} is marked`);
  const published = packed ? Math.floor(desc / LOG_PAGE_SIZE) : Math.floor((used + 2) / LOG_PAGE_SIZE);
  t.true(dirty.includes(published), 'the page of the used index / used descriptor is marked');
  const expected = new Set([...dataPages, ...ringPages]);
  t.deepEqual(dirty.filter((p) => !expected.has(p)), [], 'only pages the device wrote are marked');
  t.false(pagesOf(readable.gpa, readable.data.length).some((p) => dirty.includes(p)), 'the readable buffer is not marked');

  // QEMU's cancel: LOG_ALL cleared, the ring flag cleared. Nothing is marked any more.
  await fe.request(Request.SET_FEATURES, encodeU64(neg.features));
  await setRingLog(fe, q, false);
  log.clear();
  await fe.transfer(0, { readable: [readable], writable: [writable] });
  t.deepEqual(log.dirtyPages(), [], 'no page is marked once logging is off');
  t.deepEqual(device.errors, [[], []]);
}

for (const packed of [false, true]) {
  for (const workers of [false, true]) {
    test(`pages the device writes are marked while logging is on: ${packed ? 'packed' : 'split'} ring${workers ? ', queue in a worker thread' : ''}`, (t) =>
      run(t, packed, workers));
  }
}

test('a device that is not migratable offers neither VHOST_F_LOG_ALL nor LOG_SHMFD', async (t) => {
  const ts = await TestServer.start(new TestDevice());
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
  });
  t.is((await fe.getFeatures()) & bit(VHOST_F_LOG_ALL), 0n);
  t.is((await fe.getProtocolFeatures()) & bit(ProtocolFeature.LOG_SHMFD), 0n);
});

test('a second SET_LOG_BASE replaces the log: the old one gets no more bits', async (t) => {
  const ts = await TestServer.start(new TestDevice({ migratable: true }));
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
  });
  const neg = await fe.negotiate({});
  await fe.setMemTable(DEFAULT_LAYOUT);
  const q = await fe.setupQueue(0, QUEUE_SIZE, { ringRegion: 1 });
  const size = logBytesFor(Math.max(...DEFAULT_LAYOUT.map((r) => r.gpa + r.size)));
  const first = new FrontendLog(size);
  const second = new FrontendLog(size + 4096);
  t.teardown(() => {
    native.close(first.fd);
    native.close(second.fd);
  });
  await fe.call(Request.SET_LOG_BASE, logBasePayload(first.size, 0), { fds: [native.dup(first.fd)] });
  await fe.request(Request.SET_FEATURES, encodeU64(neg.features | bit(VHOST_F_LOG_ALL)));
  await setRingLog(fe, q, true);
  const writable = { gpa: fe.memory.regions[0]!.gpa + 8 * LOG_PAGE_SIZE, length: 100 };
  await fe.transfer(0, { readable: [{ data: pattern(100, 1), region: 0 }], writable: [writable] });
  t.true(first.dirtyPages().includes(8));
  first.clear();
  await fe.call(Request.SET_LOG_BASE, logBasePayload(second.size, 0), { fds: [native.dup(second.fd)] });
  await fe.transfer(0, { readable: [{ data: pattern(100, 2), region: 0 }], writable: [writable] });
  t.deepEqual(first.dirtyPages(), []);
  t.true(second.dirtyPages().includes(8));
});
