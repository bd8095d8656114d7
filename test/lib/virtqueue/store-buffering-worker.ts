/**
 * One side of the store-buffering litmus test (test/lib/virtqueue/barrier.test.ts), run in a worker
 * thread: for each round i, store 1 to my flag, optionally fullFence(), load the other side's flag.
 * The two sides advance in lock step so that their rounds overlap in time.
 */
import { parentPort, workerData } from 'node:worker_threads';

import { fullFence } from '../../../lib/virtqueue/barrier';

export interface StoreBufferingJob {
  /** Layout: flags of side 0 [0, rounds), of side 1 [rounds, 2 rounds), loads of side 0, of side 1, then 2 progress counters. */
  readonly shared: SharedArrayBuffer;
  readonly side: 0 | 1;
  readonly rounds: number;
  readonly fence: boolean;
}

const { shared, side, rounds, fence } = workerData as StoreBufferingJob;
const cells = new Int32Array(shared);
const progress = new Int32Array(shared, 4 * 4 * rounds, 2);
const mine = side * rounds;
const theirs = (1 - side) * rounds;
const loaded = (2 + side) * rounds;
for (let i = 0; i < rounds; i++) {
  // Atomics.load is a plain load on x86-64 (no fence); it only keeps the spin from being hoisted.
  while (Atomics.load(progress, 1 - side) < i);
  cells[mine + i] = 1;
  if (fence) fullFence();
  cells[loaded + i] = cells[theirs + i]!;
  progress[side] = i + 1;
}
parentPort!.postMessage('done');
