/**
 * openTapWriter (daemons/net/tap.ts): which way tx frames reach a TAP queue. The frames themselves are
 * in test/native/tap.test.ts (the native writers) and protocol.test.ts (through the daemon).
 */
import fs from 'node:fs';

import test from 'ava';

import { openTapWriter, TAP_FLAGS } from '../../../daemons/net/tap';
import { native } from '../../../native';

let serial = 0;

/** A TAP queue of a fresh TAP (needs CAP_NET_ADMIN); closing it deletes the TAP. */
function tapQueue(t: { teardown(fn: () => void): void }): number {
  const { fd } = native.tapOpen(`vhw${process.pid % 100000}x${serial++}`, TAP_FLAGS);
  t.teardown(() => native.close(fd));
  native.tapSetVnetHdrSize(fd, 12);
  return fd;
}

test('a TAP queue gets the io_uring writer; --no-tx-uring the writev one', (t) => {
  const fd = tapQueue(t);
  const uring = openTapWriter(fd, 64, true);
  t.teardown(() => uring.writer.close());
  t.is(uring.writer.method, 'io_uring');
  t.is(uring.uringUnavailable, null);
  const plain = openTapWriter(fd, 64, false);
  t.is(plain.writer.method, 'writev');
  t.is(plain.uringUnavailable, null, 'not asked for: nothing to warn about');
});

test('an fd that refuses non-blocking io_uring writes gets the writev writer, and the reason', (t) => {
  // /dev/full has no FMODE_NOWAIT, as tun on older kernels: io_uring refuses RWF_NOWAIT writes there.
  const fd = fs.openSync('/dev/full', 'w');
  t.teardown(() => fs.closeSync(fd));
  const { writer, uringUnavailable } = openTapWriter(fd, 64, true);
  t.is(writer.method, 'writev');
  t.regex(uringUnavailable ?? '', /non-blocking io_uring writes/);
});
