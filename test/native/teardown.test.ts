import path from 'node:path';
import { Worker } from 'node:worker_threads';

import test from 'ava';

import { native } from '../../native';
import { fdCount, mappingCount } from './helpers';

const index = path.resolve(__dirname, '..', '..', 'native', 'index.js');

/** A worker that leaves a watch, a mapping and an io_uring open, then is terminated. */
const workerCode = `
const { native, POLL_READABLE } = require(${JSON.stringify(index)});
const { parentPort } = require('node:worker_threads');
const fd = native.eventfd(0);
native.watch(fd, POLL_READABLE, () => {});
const mfd = native.memfdCreate('vhostd-worker-mem', 1 << 20);
const m = native.mmap(mfd, 1 << 20, 0, true);
m.views[0][0] = 1;
const ring = native.createIoUring(4);
native.watch(ring.eventFd, POLL_READABLE, () => {});
native.close(mfd);
parentPort.postMessage(fd);
`;

test.serial('a worker torn down with live watches, mappings and rings exits cleanly and leaks nothing native', async (t) => {
  const before = fdCount();
  const callerFds: number[] = [];
  for (let i = 0; i < 5; i++) {
    const worker = new Worker(workerCode, { eval: true });
    callerFds.push(await new Promise<number>((resolve) => worker.once('message', resolve)));
    t.is(await worker.terminate(), 1);
  }
  t.is(mappingCount('memfd:vhostd-worker-mem'), 0, 'mappings unmapped with the environment');
  // The eventfds belong to the JS caller (never closed by the worker); everything else is gone.
  t.is(fdCount(), before + callerFds.length);
  for (const fd of callerFds) native.close(fd);
});
