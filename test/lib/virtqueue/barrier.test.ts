/**
 * fullFence orders a store before a later load (the store→load case x86-64's TSO does not), checked
 * with the store-buffering litmus test on two threads: each stores its flag then loads the other's.
 * Without a fence both can load 0 (each store still sits in its core's store buffer); with fullFence
 * between store and load, never. The unfenced run comes first and must show the reordering, so
 * the harness is known to be able to catch a fence that does nothing.
 */
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';

import test from 'ava';

import type { StoreBufferingJob } from './store-buffering-worker';

const ROUNDS = 200_000;
/** Unfenced runs to try before concluding the reordering cannot be observed here. */
const MAX_CONTROL_RUNS = 10;

/** Rounds (of `ROUNDS`) in which both threads loaded 0. */
async function bothLoadedZero(fence: boolean): Promise<number> {
  const shared = new SharedArrayBuffer(4 * (4 * ROUNDS + 2));
  await Promise.all(
    ([0, 1] as const).map(
      (side) =>
        new Promise<void>((resolve, reject) => {
          const job: StoreBufferingJob = { shared, side, rounds: ROUNDS, fence };
          const worker = new Worker(path.join(__dirname, 'store-buffering-worker.js'), { workerData: job });
          worker.once('message', () => resolve());
          worker.once('error', reject);
        }),
    ),
  );
  const cells = new Int32Array(shared);
  let count = 0;
  for (let i = 0; i < ROUNDS; i++) if (cells[2 * ROUNDS + i] === 0 && cells[3 * ROUNDS + i] === 0) count++;
  return count;
}

const registerTest = os.availableParallelism() >= 2 ? test : test.skip;
const skipped = os.availableParallelism() >= 2 ? '' : ' [skipped: needs two CPUs to run the threads at once]';

registerTest(`fullFence orders a store before a later load (store-buffering litmus test)${skipped}`, async (t) => {
  let unfenced = 0;
  for (let run = 0; run < MAX_CONTROL_RUNS && unfenced === 0; run++) unfenced = await bothLoadedZero(false);
  t.true(unfenced > 0, 'without a fence the store→load reordering shows (else this test could not fail)');
  t.is(await bothLoadedZero(true), 0, `with fullFence no round loads 0 on both sides (unfenced: ${unfenced} of ${ROUNDS})`);
});
