/**
 * Connection churn against every daemon as a real process, as guests that reboot put it through:
 * 200 front-ends in a row, each connecting, setting up a queue, moving thousands of requests
 * through it at depth 16 and hanging up. Afterwards the daemon has exactly the fds it had before and
 * its resident memory outside V8's heap grew by less than 5 MiB. What the datapath leaves behind per
 * connection (native memory allocated per request, a mapping, a handle per kick) shows here and not in
 * the in-process soak (test/lib/vhost-user/soak.test.ts), which does no sustained I/O. A new daemon
 * adds itself with one row in DAEMONS.
 *
 * Why outside V8's heap: see test/helpers/process-memory.ts; the whole process, heap included, is
 * what the in-process soak checks.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import test from 'ava';

import { VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN } from '../../daemons/blk/virtio-blk';
import { startDaemon } from '../helpers/daemon';
import { Frontend, type ChainSpec, type Completion } from '../helpers/frontend';
import { rss, v8PagesRss } from '../helpers/process-memory';
import { openFds, settleFds } from '../lib/vhost-user/harness';
import { blkHeader } from './blk/wire';
import { command, parseResponse, rw10 } from './scsi/wire';

const CYCLES = 200;
/** Cycles before the baseline: V8 sizes its heap and the JIT settles over the first connections. */
const WARMUP = 20;
const DEPTH = 16;
const QUEUE_SIZE = 64;
const MiB = 1 << 20;
const MAX_GROWTH = 5 * MiB;
const mib = (bytes: number): string => `${(bytes / MiB).toFixed(1)} MiB`;

interface ChurnCase {
  readonly device: string;
  /** The queue the requests go through; default 0. */
  readonly queue?: number;
  /**
   * Requests per connection: enough that a few hundred bytes of native memory per request add up
   * (rng's small requests are cheap, so it takes more of them), few enough for CI.
   */
  readonly requests: number;
  /** Command-line arguments, with any files the daemon needs created in `dir`. */
  args(dir: string): string[];
  /** Request `i` of a cycle. */
  request(i: number): ChainSpec;
  /** Why `done` is not a correct completion of a request, or null. */
  wrong(done: Completion): string | null;
}

const BLOCK = 4096;
const IMAGE_SIZE = 8 * MiB;

/** virtio 1.2 §5.6.2: 0 controlq, 1 eventq, 2.. request queues. */
const SCSI_REQUEST_QUEUE = 2;
const READ_10 = 0x28;

/** The first page of the front-end's region 1 (DEFAULT_LAYOUT: guest address 0x800000). */
const BALLOON_FIRST_PFN = 0x800;

/** `count` consecutive 4 KiB page frame numbers from `first`, as the balloon's u32 array. */
function pfns(first: number, count: number): Uint8Array {
  const out = new Uint8Array(4 * count);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < count; i++) dv.setUint32(4 * i, first + i, true);
  return out;
}

const DAEMONS: readonly ChurnCase[] = [
  {
    device: 'rng',
    requests: 16_384,
    args: () => [],
    request: () => ({ writable: [{ length: 64 }] }),
    wrong: (done) => (done.len === 64 ? null : `${done.len} bytes of entropy for 64`),
  },
  {
    device: 'blk',
    requests: 4096,
    args: (dir) => {
      const image = path.join(dir, 'disk.img');
      fs.writeFileSync(image, '');
      fs.truncateSync(image, IMAGE_SIZE);
      return ['--file', image];
    },
    request: (i) => ({
      readable: [{ data: blkHeader(VIRTIO_BLK_T_IN, ((i * BLOCK) % IMAGE_SIZE) / 512) }],
      writable: [{ length: BLOCK }, { length: 1 }],
    }),
    wrong: (done) => {
      const status = done.written[BLOCK];
      return done.len === BLOCK + 1 && status === VIRTIO_BLK_S_OK ? null : `read of ${done.len} bytes, status ${status}`;
    },
  },
  {
    device: 'scsi',
    queue: SCSI_REQUEST_QUEUE,
    requests: 4096,
    args: (dir) => {
      const image = path.join(dir, 'lun0.img');
      fs.writeFileSync(image, '');
      fs.truncateSync(image, IMAGE_SIZE);
      return ['--lun', `0=${image}`];
    },
    request: (i) => command(0, 0, rw10(READ_10, ((i * BLOCK) % IMAGE_SIZE) / 512, BLOCK / 512), { dataIn: BLOCK }),
    wrong: (done) => {
      const r = parseResponse(done);
      return r.response === 0 && r.status === 0 && r.residual === 0 ? null : `READ(10): response ${r.response}, status ${r.status}, residual ${r.residual}`;
    },
  },
  {
    device: 'balloon',
    requests: 2048,
    args: () => [],
    // Inflate buffers of 16 PFNs in the front-end's region 1 (guest 8 MiB .. 9 MiB: no ring and no
    // buffer lives there), punched out of its memfd; the driver gets nothing written back.
    request: (i) => ({ readable: [{ data: pfns(BALLOON_FIRST_PFN + ((i * 16) % 256), 16) }] }),
    wrong: (done) => (done.len === 0 ? null : `inflate completed with ${done.len} bytes written`),
  },
];

/** The fd count of `pid` once it stayed the same for 200 ms (the last disconnect's closes are done). */
async function steadyFds(pid: number): Promise<number> {
  const deadline = Date.now() + 5000;
  let n = openFds(pid);
  for (let same = 0; same < 10 && Date.now() < deadline; ) {
    await new Promise((resolve) => setTimeout(resolve, 20));
    const now = openFds(pid);
    same = now === n ? same + 1 : 0;
    n = now;
  }
  return n;
}

/** One front-end: set up the case's queue, move `c.requests` requests through it DEPTH at a time, hang up. */
async function cycle(socketPath: string, c: ChurnCase): Promise<void> {
  const fe = Frontend.connect(socketPath);
  try {
    await fe.negotiate();
    await fe.setMemTable();
    const queue = c.queue ?? 0;
    await fe.setupQueue(queue, QUEUE_SIZE);
    let submitted = Math.min(DEPTH, c.requests);
    fe.submit(queue, Array.from({ length: submitted }, (_, i) => c.request(i)));
    for (let completed = 0; completed < c.requests; ) {
      const done = await fe.collect(queue, 1);
      for (const d of done) {
        const wrong = c.wrong(d);
        if (wrong !== null) throw new Error(`${c.device}: ${wrong}`);
      }
      completed += done.length;
      const more = Math.min(done.length, c.requests - submitted);
      if (more > 0) fe.submit(queue, Array.from({ length: more }, (_, i) => c.request(submitted + i)));
      submitted += more;
    }
  } finally {
    fe.close();
  }
}

for (const c of DAEMONS) {
  test.serial(`${c.device}: ${CYCLES} connections with I/O leave no fd behind and RSS outside V8's heap grows < 5 MiB`, async (t) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `vhostd-churn-${c.device}-`));
    const daemon = await startDaemon(c.device, c.args(dir));
    t.teardown(async () => {
      await daemon.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    });
    const pid = daemon.process.pid!;

    for (let i = 0; i < WARMUP; i++) await cycle(daemon.socketPath, c);
    // After the warm-up, not at start: a device may open what it keeps for its lifetime on the first
    // queue start (blk's io_uring and its eventfd).
    const fdsBefore = await steadyFds(pid);
    const v8Before = v8PagesRss(pid);
    const outsideBefore = rss(pid) - v8Before;

    for (let i = 0; i < CYCLES; i++) await cycle(daemon.socketPath, c);

    t.is(await settleFds(fdsBefore, 2000, pid), fdsBefore, `open fds back to ${fdsBefore}`);
    const v8After = v8PagesRss(pid);
    const growth = rss(pid) - v8After - outsideBefore;
    t.log(`${c.device}: over ${CYCLES} connections of ${c.requests} requests RSS outside V8's heap grew by ${mib(growth)}, V8's pages by ${mib(v8After - v8Before)}`);
    t.true(growth < MAX_GROWTH, `RSS outside V8's heap grew by ${mib(growth)}`);
    t.is(daemon.process.exitCode, null, `the daemon is still running: ${daemon.stderr()}`);
  });
}
