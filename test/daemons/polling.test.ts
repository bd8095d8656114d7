/**
 * Polling is shared (issue 12): every daemon takes `--poll-us` through the common options and the
 * queue runtime polls its queues, so a request the front-end posts right after a batch is served
 * without a kick. Each daemon runs as its own process, driven by the test front-end through a real
 * request of its kind; the daemon's own metrics (control socket) say what happened. The engine's
 * rules for the window (split and packed rings, EVENT_IDX or not, an idle queue stops) are tested in
 * process in test/lib/vhost-user/polling.test.ts. A new daemon adds itself with one row in DEVICES.
 *
 * The front-end follows the ring rules: it publishes, then kicks only if the daemon asked (EVENT_IDX:
 * `avail_event`), which the daemon does not while it polls. Whether a given request comes while the
 * daemon still polls depends on how fast this process answers a completion, so the test repeats the
 * round trip until the daemon's `vhostd_queue_poll_hits_total` (poll rounds that found a chain or
 * finished I/O) shows it polled a few times, rather than timing anything. Requests that went without
 * a kick alone prove nothing: the daemon signals a completion before its pass over the ring ends, and
 * takes a chain added meanwhile in the same pass, polling or not. Needs root for net (a TAP in a
 * network namespace).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import test, { type ExecutionContext } from 'ava';

import { VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN } from '../../daemons/blk/virtio-blk';
import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { arpRequest } from '../helpers/frames';
import { Frontend, type ChainSpec, type Completion } from '../helpers/frontend';
import { namespaceWithTap } from '../helpers/net-topology';
import { until } from '../helpers/until';
import { controlMetrics } from '../helpers/vhostctl';
import { blkHeader } from './blk/wire';
import { command, parseResponse, rw10 } from './scsi/wire';

/** The window the issue names: long enough for this process to answer a completion now and then. */
const POLL_US = 200;
/** Round trips between two looks at the daemon's metrics. */
const ROUNDS_PER_LOOK = 100;
/** Round trips after which a daemon that polls has surely been caught polling a few times. */
const MAX_ROUNDS = 2000;
/** Poll hits that show polling works for a device. */
const HITS_WANTED = 3;
const BLOCK = 4096;
const IMAGE_SIZE = 1 << 20;
const READ_10 = 0x28;
const TEST_UNIT_READY = 0x00;
/** virtio-net header with VIRTIO_F_VERSION_1 (num_buffers included). */
const NET_HDR = 12;

interface PollingCase {
  readonly name: string;
  readonly device: string;
  /** The queue the requests go through. */
  readonly queue: number;
  /** Every queue to set up (net's tx queue needs its pair's rx queue). */
  readonly queues: readonly number[];
  /** Command-line arguments and the command to run the daemon under, with what it needs made in `dir`. */
  setup(t: ExecutionContext, dir: string): { args: string[]; prefix?: string[] };
  request(i: number): ChainSpec;
  /** Why `done` is not a correct completion of a request, or null. */
  wrong(done: Completion): string | null;
}

/**
 * An image in /dev/shm: I/O on a memory file system runs inline (lib/io/engine.ts), so a request
 * completes within its batch and the queue polls after it; I/O in flight ends a poll (queue-driver.ts).
 */
function shmImage(dir: string, name: string): string {
  const file = path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : dir, `vhostd-polling-${process.pid}-${name}`);
  fs.writeFileSync(file, Buffer.alloc(IMAGE_SIZE, 0x5a));
  return file;
}

const blkRead = (i: number): ChainSpec => ({
  readable: [{ data: blkHeader(VIRTIO_BLK_T_IN, ((i * BLOCK) % IMAGE_SIZE) / 512) }],
  writable: [{ length: BLOCK }, { length: 1 }],
});

const blkWrong = (done: Completion): string | null => {
  const status = done.written[BLOCK];
  return done.len === BLOCK + 1 && status === VIRTIO_BLK_S_OK ? null : `read of ${done.len} bytes, status ${status}`;
};

const DEVICES: readonly PollingCase[] = [
  {
    name: 'rng',
    device: 'rng',
    queue: 0,
    queues: [0],
    setup: () => ({ args: [] }),
    request: () => ({ writable: [{ length: 64 }] }),
    wrong: (done) => (done.len === 64 ? null : `${done.len} bytes of entropy for 64`),
  },
  {
    name: 'blk',
    device: 'blk',
    queue: 0,
    queues: [0],
    setup: (_t, dir) => ({ args: ['--file', shmImage(dir, 'blk.img')] }),
    request: blkRead,
    wrong: blkWrong,
  },
  {
    name: 'blk, queue in a worker thread',
    device: 'blk',
    queue: 0,
    queues: [0],
    setup: (_t, dir) => ({ args: ['--file', shmImage(dir, 'blk-threads.img'), '--threads', '1'] }),
    request: blkRead,
    wrong: blkWrong,
  },
  {
    name: 'scsi, TEST UNIT READY',
    device: 'scsi',
    // virtio 1.2 §5.6.2: 0 controlq, 1 eventq, 2.. request queues.
    queue: 2,
    queues: [2],
    setup: (_t, dir) => ({ args: ['--lun', `0=${shmImage(dir, 'lun0-tur.img')}`] }),
    // Answered by the target itself, within the batch.
    request: () => command(0, 0, [TEST_UNIT_READY, 0, 0, 0, 0, 0]),
    wrong: (done) => {
      const r = parseResponse(done);
      return r.response === 0 && r.status === 0 ? null : `TEST UNIT READY: response ${r.response}, status ${r.status}`;
    },
  },
  {
    name: 'scsi, READ(10)',
    device: 'scsi',
    queue: 2,
    queues: [2],
    setup: (_t, dir) => ({ args: ['--lun', `0=${shmImage(dir, 'lun0.img')}`] }),
    request: (i) => command(0, 0, rw10(READ_10, ((i * BLOCK) % IMAGE_SIZE) / 512, BLOCK / 512), { dataIn: BLOCK }),
    wrong: (done) => {
      const r = parseResponse(done);
      return r.response === 0 && r.status === 0 && r.residual === 0 ? null : `READ(10): response ${r.response}, status ${r.status}, residual ${r.residual}`;
    },
  },
  {
    name: 'net',
    device: 'net',
    // Transmit queue of pair 0: the frame goes out of the TAP.
    queue: 1,
    queues: [0, 1],
    setup: (t) => {
      const { namespace, tap } = namespaceWithTap(t, '10.77.3.1/24');
      return { args: ['--tap', tap], prefix: ['ip', 'netns', 'exec', namespace] };
    },
    request: (i) => ({ readable: [{ data: new Uint8Array(NET_HDR) }, { data: arpRequest([0x02, 0, 0, 0, 0x77, 2], [10, 77, 3, 2], [10, 77, 3, 100 + (i % 100)]) }] }),
    wrong: (done) => (done.len === 0 ? null : `transmit completed with ${done.len} bytes written`),
  },
];

async function attach(t: ExecutionContext, c: PollingCase, pollUs: number): Promise<{ fe: Frontend; control: string; daemon: RunningDaemon }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vhostd-polling-${c.device}-`));
  t.teardown(() => {
    fs.rmSync(dir, { recursive: true, force: true });
    for (const f of fs.existsSync('/dev/shm') ? fs.readdirSync('/dev/shm') : []) {
      if (f.startsWith(`vhostd-polling-${process.pid}-`)) fs.rmSync(path.join('/dev/shm', f), { force: true });
    }
  });
  const control = path.join(dir, 'control.sock');
  const { args, prefix } = c.setup(t, dir);
  const daemon = await startDaemon(c.device, [...args, '--poll-us', String(pollUs), '--control', control], 10_000, { prefix });
  const fe = Frontend.connect(daemon.socketPath);
  t.teardown(async () => {
    fe.close();
    await daemon.stop();
  });
  await fe.negotiate({ eventIdx: true });
  await fe.setMemTable();
  for (const q of c.queues) await fe.setupQueue(q, 64);
  return { fe, control, daemon };
}

async function roundTrip(t: ExecutionContext, fe: Frontend, c: PollingCase, i: number, kick?: boolean): Promise<void> {
  fe.submit(c.queue, c.request(i), { kick });
  const [done] = await fe.collect(c.queue, 1);
  const wrong = c.wrong(done!);
  if (wrong !== null) t.fail(`${c.name}: request ${i}: ${wrong}`);
}

/** The daemon's poll hits and kicks on the case's queue, from its metrics. */
async function queueMetrics(control: string, c: PollingCase): Promise<{ hits: number; pollSeconds: number; kicks: number; requests: number }> {
  const m = await controlMetrics(control);
  const labels = { queue: String(c.queue) };
  return {
    hits: m.sum('vhostd_queue_poll_hits_total', labels),
    pollSeconds: m.sum('vhostd_queue_poll_seconds_total', labels),
    kicks: m.sum('vhostd_queue_kicks_total', labels),
    requests: m.sum('vhostd_queue_requests_total', labels),
  };
}

/**
 * Round trips in blocks until the daemon's metrics count `wanted` poll hits (or MAX_ROUNDS went by);
 * returns the rounds and the daemon's counters. Each request is posted as soon as the previous one
 * came back, kicked only when the daemon asks.
 */
async function pollUntilHits(t: ExecutionContext, fe: Frontend, control: string, c: PollingCase, wanted: number): Promise<{ rounds: number; hits: number; kicks: number; requests: number }> {
  let rounds = 0;
  for (;;) {
    for (const end = rounds + ROUNDS_PER_LOOK; rounds < end; rounds++) await roundTrip(t, fe, c, rounds);
    const m = await queueMetrics(control, c);
    if (m.hits >= wanted || rounds >= MAX_ROUNDS) return { rounds, ...m };
  }
}

for (const c of DEVICES) {
  test.serial(`${c.name}: with --poll-us ${POLL_US} requests posted right after a batch are served without a kick while the queue polls`, async (t) => {
    const { fe, control, daemon } = await attach(t, c, POLL_US);
    const q = fe.queues.get(c.queue)!;
    const m = await pollUntilHits(t, fe, control, c, HITS_WANTED);
    t.log(`${c.name}: ${m.rounds} round trips, ${m.rounds - q.kicks} without a kick; the daemon counted ${m.requests} requests, ${m.kicks} kicks, ${m.hits} poll hits`);
    t.is(m.requests, m.rounds);
    t.true(m.kicks <= q.kicks, `the daemon counted ${m.kicks} kicks, the front-end wrote ${q.kicks}`);
    t.true(m.hits >= HITS_WANTED, `vhostd_queue_poll_hits_total is ${m.hits} after ${m.rounds} round trips: the daemon never polled its queue`);
    t.true(m.requests - m.kicks >= HITS_WANTED, `${m.requests - m.kicks} requests came without a kick`);
    t.is(daemon.process.exitCode, null, `the daemon is still running: ${daemon.stderr()}`);
  });

  test.serial(`${c.name}: with --poll-us 0 a request posted after a batch waits for the kick the daemon asks for`, async (t) => {
    const { fe, control, daemon } = await attach(t, c, 0);
    const q = fe.queues.get(c.queue)!;
    await roundTrip(t, fe, c, 0);
    for (let i = 1; i <= 3; i++) {
      // The daemon signals a completion before it ends its pass over the ring (a chain added meanwhile
      // is still taken, kick or not); once the pass is over it asks for a kick: wait for that (a queue
      // worker may wait for a CPU on a loaded machine).
      await until(() => q.driver.kickWanted(), 'the daemon asks for a kick once its batch is done');
      fe.submit(c.queue, c.request(i), { kick: false });
      // Round trips on the vhost-user socket: the daemon's main loop ran meanwhile, the request waits.
      for (let n = 0; n < 10; n++) await fe.sync();
      t.deepEqual(fe.takeCompletions(c.queue), [], 'no request is taken without a kick');
      fe.kick(c.queue);
      const [done] = await fe.collect(c.queue, 1);
      t.is(c.wrong(done!), null);
    }
    // And the traffic of the test above, as much as it needs at most between two looks.
    for (let i = 4; i < 4 + ROUNDS_PER_LOOK; i++) await roundTrip(t, fe, c, i);
    const m = await queueMetrics(control, c);
    t.deepEqual([m.hits, m.pollSeconds, m.requests], [0, 0, 4 + ROUNDS_PER_LOOK], 'no poll hits, no time polled, every request served');
    t.is(daemon.process.exitCode, null, `the daemon is still running: ${daemon.stderr()}`);
  });
}
