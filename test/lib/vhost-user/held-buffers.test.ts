/**
 * Held buffers over a real socket: a device that keeps the buffers it pops (as virtio-scsi's event
 * queue and virtio-balloon's stats queue do) completes them correctly after the front-end changed the
 * memory table (ADD_MEM_REG, REM_MEM_REG, then a new SET_MEM_TABLE that maps every region anew and
 * unmaps the old mappings), and gives the unused ones back on GET_VRING_BASE, so the ring restarted
 * from that base hands them to the device again.
 */
import test, { type ExecutionContext } from 'ava';

import type { DeviceBackend } from '../../../lib/vhost-user/device-backend';
import { VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC, bit } from '../../../lib/virtio/constants';
import { HeldBuffers } from '../../../lib/virtqueue/held-buffers';
import type { Virtqueue } from '../../../lib/virtqueue/virtqueue';
import { DEFAULT_LAYOUT, type Frontend } from '../../helpers/frontend';
import { TestServer, pattern } from './harness';

/** Holds every chain it pops; the test completes them one at a time, oldest first. */
class HoldingDevice implements DeviceBackend {
  readonly name = 'holding';
  readonly numQueues = 1;
  readonly maxQueueSize = 256;
  held: HeldBuffers | null = null;
  stops = 0;

  features(): bigint {
    return bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_PACKED) | bit(VIRTIO_RING_F_INDIRECT_DESC);
  }

  protocolFeatures(): bigint {
    return 0n;
  }

  startQueue(_index: number, queue: Virtqueue): void {
    this.held = new HeldBuffers(queue);
  }

  stopQueue(): void {
    this.stops++;
    this.held?.returnAll();
  }

  processQueue(_index: number, queue: Virtqueue): void {
    do {
      queue.disableNotification();
      for (let chain = queue.pop(); chain !== null; chain = queue.pop()) this.held!.hold(chain);
    } while (queue.enableNotification());
  }

  /** Fill the oldest held buffer with `data` and give it to the driver. */
  complete(data: Uint8Array): void {
    const held = this.held!;
    const chain = held.take();
    if (chain === null) throw new Error('no buffer held');
    const written = chain.write(0, data);
    held.queue.pushUsed(chain, written);
    held.queue.flush();
  }
}

async function start(t: ExecutionContext): Promise<{ fe: Frontend; device: HoldingDevice }> {
  const device = new HoldingDevice();
  const ts = await TestServer.start(device);
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
  });
  return { fe, device };
}

/** Wait until the device holds `count` buffers. */
async function holding(device: HoldingDevice, count: number): Promise<void> {
  const deadline = Date.now() + 5000;
  while (device.held?.count !== count) {
    if (Date.now() > deadline) throw new Error(`the device holds ${device.held?.count} buffers, not ${count}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

for (const packed of [false, true]) {
  const name = packed ? 'packed' : 'split';

  test(`${name}: a held buffer is completed through the memory table in force when it completes`, async (t) => {
    const { fe, device } = await start(t);
    await fe.negotiate({ packed, indirect: true });
    await fe.setMemTable(DEFAULT_LAYOUT);
    await fe.setupQueue(0, 8);
    // The buffer sits in region 1 (mmap offset of one page), behind an indirect table in region 0.
    const [id] = fe.submit(0, { writable: [{ length: 100, region: 1 }, { length: 60, region: 1 }], indirect: true });
    await holding(device, 1);

    const added = await fe.addMemReg({ gpa: 0x4000_0000, size: 1 << 20, userAddr: 0x7f60_0000_0000, mmapOffset: 0x5000 });
    await fe.remMemReg(DEFAULT_LAYOUT[2]!.gpa);
    // Every region mapped anew; the mappings the buffer was popped through are unmapped.
    await fe.sendMemTable();
    t.true(fe.memory.regions.includes(added));

    const data = pattern(160, 4);
    device.complete(data);
    const [done] = await fe.collect(0, 1);
    t.is(done!.id, id!);
    t.is(done!.len, 160);
    t.deepEqual(done!.written, data);
    t.is(device.held!.count, 0);
  });

  test(`${name}: GET_VRING_BASE gives held buffers back and the restarted ring offers them again`, async (t) => {
    const { fe, device } = await start(t);
    await fe.negotiate({ packed });
    await fe.setMemTable(DEFAULT_LAYOUT);
    await fe.setupQueue(0, 8);
    const [first] = fe.submit(0, { writable: [{ length: 32 }] });
    await holding(device, 1);
    device.complete(pattern(32, 1));
    t.is((await fe.collect(0, 1))[0]!.id, first!);

    const ids = fe.submit(0, [{ writable: [{ length: 48, region: 1 }] }, { writable: [{ length: 16, region: 2 }] }]);
    await holding(device, 2);
    const base = await fe.getVringBase(0);
    t.is(device.stops, 1);
    t.is(device.held!.count, 0, 'the device returned what it held');
    // One single-descriptor buffer was used: the ring resumes right after it, at the two given back.
    t.is(base, packed ? 0x8001_8001 : 1);
    t.deepEqual(fe.takeCompletions(0), [], 'nothing was completed by the stop');

    await fe.restartQueue(0, base);
    await holding(device, 2);
    const data = [pattern(48, 2), pattern(16, 3)];
    device.complete(data[0]!);
    device.complete(data[1]!);
    const done = await fe.collect(0, 2);
    t.deepEqual(
      done.map((c) => ({ id: c.id, written: c.written })),
      [
        { id: ids[0]!, written: data[0]! },
        { id: ids[1]!, written: data[1]! },
      ],
    );
  });
}
