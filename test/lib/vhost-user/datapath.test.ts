/**
 * Data through the engine with the test device: split and packed rings, EVENT_IDX on and off,
 * indirect tables, chains whose buffers sit in different regions (and one that crosses from one
 * region into the next), ring wrap-around, out-of-order completion, stop/resume with
 * GET_VRING_BASE, and memory map changes under running queues.
 *
 * The driver side kicks only when the device's suppression state asks for it, so a backend that
 * forgets to re-enable notifications stalls a test instead of passing by luck.
 */
import test, { type ExecutionContext } from 'ava';

import { ProtocolFeature } from '../../../lib/vhost-user/messages';
import {
  ADJACENT_LAYOUT,
  DEFAULT_LAYOUT,
  Frontend,
  RING_FEATURES,
  type ChainSpec,
  type Completion,
} from '../../helpers/frontend';
import { TestDevice } from '../../helpers/test-device';
import { TestServer, expectedOutput, pattern } from './harness';

interface Expectation {
  queue: number;
  readable: Uint8Array[];
  writable: number;
}

/** Build a chain whose readable parts are spread over regions, and remember what should come back. */
function chain(queue: number, seed: number, opts: { parts: number; writableParts: number; indirect: boolean; regions: number }): [ChainSpec, Expectation] {
  const readable = Array.from({ length: opts.parts }, (_, k) => pattern(1 + ((seed * 37 + k * 101) % 700), seed * 10 + k));
  const total = readable.reduce((n, p) => n + p.length, 0);
  // Every third chain gets less writable room than it sent, so the device must truncate.
  const room = seed % 3 === 0 ? Math.max(1, total >> 1) : total + 16;
  const sizes = Array.from({ length: opts.writableParts }, (_, k) =>
    k === opts.writableParts - 1 ? room - Math.floor(room / opts.writableParts) * (opts.writableParts - 1) : Math.floor(room / opts.writableParts),
  ).filter((n) => n > 0);
  const spec: ChainSpec = {
    readable: readable.map((data, k) => ({ data, region: (seed + k) % opts.regions })),
    writable: sizes.map((length, k) => ({ length, region: (seed + k + 1) % opts.regions })),
    indirect: opts.indirect,
    indirectRegion: seed % opts.regions,
  };
  return [spec, { queue, readable, writable: sizes.reduce((n, s) => n + s, 0) }];
}

function check(t: ExecutionContext, done: Completion[], ids: number[], expected: Expectation[]): void {
  t.is(done.length, ids.length);
  ids.forEach((id, i) => {
    const c = done.find((d) => d.id === id);
    const e = expected[i]!;
    const want = expectedOutput(e.queue, e.readable, e.writable);
    if (c === undefined) {
      t.fail(`chain ${id} did not come back`);
      return;
    }
    t.is(c.len, want.length, `used length of chain ${id}`);
    t.deepEqual(c.written, want, `bytes written into chain ${id}`);
  });
}

async function start(t: ExecutionContext, device = new TestDevice()): Promise<{ ts: TestServer; fe: Frontend; device: TestDevice }> {
  const ts = await TestServer.start(device);
  const fe = ts.connect();
  t.teardown(async () => {
    fe.close();
    await ts.close();
  });
  return { ts, fe, device };
}

const MATRIX = [false, true].flatMap((packed) =>
  [false, true].flatMap((eventIdx) => [false, true].map((indirect) => ({ packed, eventIdx, indirect }))),
);

for (const { packed, eventIdx, indirect } of MATRIX) {
  for (const deferred of [false, true]) {
    const name = `${packed ? 'packed' : 'split'} ring, event idx ${eventIdx ? 'on' : 'off'}, indirect ${indirect ? 'on' : 'off'}${deferred ? ', out-of-order completion' : ''}`;
    test(`data moves on two queues: ${name}`, async (t) => {
      const { fe, device } = await start(t, new TestDevice({ deferred }));
      const neg = await fe.negotiate({ packed, eventIdx, indirect });
      t.is((neg.features & RING_FEATURES.packed) !== 0n, packed);
      t.is((neg.features & RING_FEATURES.eventIdx) !== 0n, eventIdx);
      t.is((neg.features & RING_FEATURES.indirect) !== 0n, indirect);
      await fe.setMemTable(DEFAULT_LAYOUT);
      // Queue 0: 8 entries in region 1 (wraps every few rounds). Queue 1: 16 entries in region 2,
      // whose mmap offset is past 2 MiB.
      await fe.setupQueue(0, 8, { ringRegion: 1 });
      await fe.setupQueue(1, 16, { ringRegion: 2 });
      t.deepEqual(device.starts, [1, 1]);

      let seed = 1;
      let sent = 0;
      for (let round = 0; round < 12; round++) {
        const batch0 = [0, 1].map((i) => chain(0, seed++, { parts: 2, writableParts: 1, indirect: indirect && i === 0, regions: 3 }));
        const batch1 = [0, 1, 2].map((i) => chain(1, seed++, { parts: 3, writableParts: 2, indirect: indirect && i !== 1, regions: 3 }));
        const ids0 = fe.submit(0, batch0.map(([s]) => s));
        const ids1 = fe.submit(1, batch1.map(([s]) => s));
        check(t, await fe.collect(0, ids0.length), ids0, batch0.map(([, e]) => e));
        check(t, await fe.collect(1, ids1.length), ids1, batch1.map(([, e]) => e));
        sent += ids0.length + ids1.length;
      }
      t.is(device.completed[0]! + device.completed[1]!, sent);
      t.deepEqual(device.errors, [[], []]);
    });
  }
}

test('a buffer may cross from one region into the adjacent one', async (t) => {
  const { fe } = await start(t);
  await fe.negotiate({ indirect: true });
  await fe.setMemTable(ADJACENT_LAYOUT);
  // Rings at the top of the second region; the buffers below stay clear of them.
  await fe.setupQueue(0, 16, { ringRegion: 1 });
  const [a, b] = [fe.memory.regions[0]!, fe.memory.regions[1]!];
  t.is(a.end, b.gpa, 'the layout has two regions touching in guest physical space');
  const data = pattern(3000, 42);
  for (const indirect of [false, true]) {
    // The readable buffer starts 1000 bytes before the boundary and ends 2000 bytes after it.
    const done = await fe.transfer(0, {
      readable: [{ data, gpa: a.end - 1000 }],
      writable: [{ length: 1200, gpa: b.gpa + 0x1000 }, { length: 1800, gpa: a.gpa + 0x1000 }],
      indirect,
    });
    t.is(done.len, 3000);
    t.deepEqual(done.written, expectedOutput(0, [data], 3000));
  }
  // A writable buffer across the boundary.
  const crossing = await fe.transfer(0, {
    readable: [{ data: data.subarray(0, 500), gpa: a.gpa + 0x8000 }],
    writable: [{ length: 500, gpa: a.end - 250 }],
  });
  t.is(crossing.len, 500);
  t.deepEqual(crossing.written, expectedOutput(0, [data.subarray(0, 500)], 500));
});

test('a packed ring whose size is not a power of two wraps correctly', async (t) => {
  const { fe, device } = await start(t);
  await fe.negotiate({ packed: true, eventIdx: true });
  await fe.setMemTable(DEFAULT_LAYOUT);
  await fe.setupQueue(0, 100);
  let seed = 1;
  for (let round = 0; round < 10; round++) {
    const batch = Array.from({ length: 29 }, () => chain(0, seed++, { parts: 1, writableParts: 1, indirect: false, regions: 3 }));
    const ids = fe.submit(0, batch.map(([s]) => s));
    check(t, await fe.collect(0, ids.length), ids, batch.map(([, e]) => e));
  }
  t.is(device.completed[0], 290);
});

for (const packed of [false, true]) {
  test(`GET_VRING_BASE stops a ${packed ? 'packed' : 'split'} ring and SET_VRING_BASE resumes it`, async (t) => {
    const { fe, device } = await start(t, new TestDevice());
    await fe.negotiate({ packed, eventIdx: true });
    await fe.setMemTable(DEFAULT_LAYOUT);
    await fe.setupQueue(0, 8);
    let seed = 1;
    const roundTrip = async (n: number) => {
      const batch = Array.from({ length: n }, () => chain(0, seed++, { parts: 1, writableParts: 1, indirect: false, regions: 3 }));
      const ids = fe.submit(0, batch.map(([s]) => s));
      check(t, await fe.collect(0, ids.length), ids, batch.map(([, e]) => e));
    };
    // Chains of two descriptors: at most 4 fit a ring of 8.
    await roundTrip(3);
    await roundTrip(4);
    await roundTrip(4);
    const base = await fe.getVringBase(0);
    t.is(device.stops[0], 1, 'the device was told to stop the queue');
    if (packed) {
      // 11 two-descriptor chains on 8 entries: 22 descriptors, so both indexes are at 6 after two
      // wraps (wrap counters back to 1), in QEMU's layout.
      t.is(base, 0x8006 + 0x8006 * 0x10000);
    } else {
      t.is(base, 11);
    }
    // A chain made available while the ring is stopped is processed once it restarts.
    const [spec, want] = chain(0, seed++, { parts: 1, writableParts: 1, indirect: false, regions: 3 });
    const [id] = fe.submit(0, spec);
    await fe.restartQueue(0, base);
    t.is(device.starts[0], 2);
    check(t, await fe.collect(0, 1), [id!], [want]);
    await roundTrip(3);
    await roundTrip(4);
  });
}

test('ADD_MEM_REG and REM_MEM_REG change the memory map under a running queue', async (t) => {
  const { fe } = await start(t);
  const neg = await fe.negotiate();
  t.true((neg.protocolFeatures & (1n << BigInt(ProtocolFeature.CONFIGURE_MEM_SLOTS))) !== 0n);
  await fe.setMemTable([DEFAULT_LAYOUT[0]!]);
  await fe.setupQueue(0, 16);
  const added = await fe.addMemReg({ gpa: 0x4000_0000, size: 1 << 20, userAddr: 0x7f60_0000_0000, mmapOffset: 0x5000 });
  const regionIndex = fe.memory.regions.indexOf(added);
  const data = pattern(4000, 9);
  let done = await fe.transfer(0, { readable: [{ data, region: regionIndex }], writable: [{ length: 4000, region: regionIndex }] });
  t.deepEqual(done.written, expectedOutput(0, [data], 4000));
  await fe.remMemReg(0x4000_0000);
  done = await fe.transfer(0, { readable: [{ data }], writable: [{ length: 4000 }] });
  t.deepEqual(done.written, expectedOutput(0, [data], 4000));
});

test('a new SET_MEM_TABLE under running queues keeps them working', async (t) => {
  const { fe } = await start(t);
  await fe.negotiate({ eventIdx: true });
  await fe.setMemTable(DEFAULT_LAYOUT);
  await fe.setupQueue(0, 16, { ringRegion: 2 });
  const data = pattern(512, 3);
  t.deepEqual((await fe.transfer(0, { readable: [{ data }], writable: [{ length: 512 }] })).written, expectedOutput(0, [data], 512));
  const extra = fe.memory.add({ gpa: 0x2_0000_0000, size: 1 << 20, userAddr: 0x7f70_0000_0000 });
  await fe.sendMemTable();
  const i = fe.memory.regions.indexOf(extra);
  const done = await fe.transfer(0, { readable: [{ data, region: i }], writable: [{ length: 512, region: 0 }] });
  t.deepEqual(done.written, expectedOutput(0, [data], 512));
});

test('a front-end without protocol features: rings start enabled', async (t) => {
  const { fe } = await start(t);
  const offered = await fe.getFeatures();
  t.not(offered & (1n << 30n), 0n);
  // A legacy front-end: no GET/SET_PROTOCOL_FEATURES, no bit 30 in SET_FEATURES, no SET_VRING_ENABLE.
  await fe.negotiate({ legacy: true });
  t.false(fe.replyAck);
  await fe.setMemTable(DEFAULT_LAYOUT);
  await fe.setupQueue(0, 16, { enable: false });
  const data = pattern(64, 5);
  t.deepEqual((await fe.transfer(0, { readable: [{ data }], writable: [{ length: 64 }] })).written, expectedOutput(0, [data], 64));
});

test('a disabled ring is not processed until SET_VRING_ENABLE 1', async (t) => {
  const { fe, device } = await start(t);
  await fe.negotiate();
  await fe.setMemTable(DEFAULT_LAYOUT);
  await fe.setupQueue(0, 16, { enable: false });
  const data = pattern(64, 5);
  const [id] = fe.submit(0, { readable: [{ data }], writable: [{ length: 64 }] });
  await fe.sync();
  t.is(device.completed[0], 0);
  await fe.setVringEnable(0, true);
  const [done] = await fe.collect(0, 1);
  t.is(done!.id, id!);
  t.deepEqual(done!.written, expectedOutput(0, [data], 64));
});
