/**
 * TxPath (daemons/net/tx.ts) over a real split ring in fake guest memory, with a scripted frame
 * writer in place of the TAP: what the guest gets back when the TAP takes only some frames of a batch
 * (EAGAIN), as an io_uring writer reports it. The real TAP paths are in protocol.test.ts and
 * test/native/tap.test.ts.
 */
import { constants as osConstants } from 'node:os';

import test from 'ava';

import { NetQueueStats } from '../../../daemons/net/metrics';
import { txLimits } from '../../../daemons/net/net-header';
import type { TapFrameWriter } from '../../../daemons/net/tap';
import { TxPath } from '../../../daemons/net/tx';
import { VNET_HDR_SIZE } from '../../../daemons/net/virtio-net';
import { VIRTIO_F_VERSION_1, bit } from '../../../lib/virtio/constants';
import { native } from '../../../native';
import { until } from '../../helpers/until';
import { R0_DATA, splitSetup } from '../../lib/virtqueue/setup';

const { EAGAIN } = osConstants.errno;
const FRAME = 60;

/** A writer that answers each call from `script` (one entry per call: a result per frame, 'sent' = bytes). */
function scriptedWriter(script: ('sent' | number)[][]) {
  const calls: number[][] = [];
  const writer: TapFrameWriter & { calls: number[][] } = {
    method: 'io_uring',
    calls,
    write(iovBase, _iovLen, iovStart, _iovCount, result, count) {
      const answers = script[calls.length] ?? [];
      // Record each frame by the host address of its frame bytes (the iovec after the header copy).
      calls.push(Array.from({ length: count }, (_, i) => iovBase[iovStart[i]! + 1]!));
      for (let i = 0; i < count; i++) {
        const answer = answers[i] ?? 'sent';
        result[i] = answer === 'sent' ? VNET_HDR_SIZE + FRAME : answer;
      }
      return count;
    },
    close() {},
  };
  return writer;
}

function setup(t: { teardown(fn: () => void): void }, script: ('sent' | number)[][]) {
  const s = splitSetup({ size: 8 });
  const writer = scriptedWriter(script);
  const stats = new NetQueueStats();
  // An eventfd is always writable: the "TAP" becomes writable as soon as the path waits for it.
  const fd = native.eventfd(0);
  const errors: unknown[] = [];
  const tx = new TxPath(s.queue, fd, writer, txLimits(bit(VIRTIO_F_VERSION_1), VNET_HDR_SIZE, 1500), stats, (err) => errors.push(err));
  t.teardown(() => {
    tx.close();
    native.close(fd);
  });
  const heads: number[] = [];
  for (let i = 0; i < 4; i++) {
    const gpa = R0_DATA + 0x100 * i;
    s.fake.write(gpa + VNET_HDR_SIZE, new Uint8Array(FRAME).fill(i + 1));
    heads.push(s.driver.addChain([{ addr: gpa, len: VNET_HDR_SIZE + FRAME }]));
  }
  s.driver.publish();
  return { s, tx, writer, stats, errors, heads };
}

test('frames the TAP refused (EAGAIN) wait, are written again in order once it is writable, and each is completed once', async (t) => {
  const { s, tx, writer, stats, errors, heads } = setup(t, [['sent', -EAGAIN, 'sent', -EAGAIN], [-EAGAIN, 'sent'], ['sent']]);
  tx.kick();
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    [heads[0], heads[2]],
    'the frames the TAP took complete at once',
  );
  await until(() => writer.calls.length === 3, 'three writes: the batch, then the retries as the TAP drains');
  const [batch, firstRetry, secondRetry] = writer.calls;
  t.deepEqual(firstRetry, [batch![1], batch![3]], 'the refused frames, in their order');
  t.deepEqual(secondRetry, [batch![1]], 'only the one refused again');
  await until(() => s.driver.usedIdx() === 4, 'all four used');
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    [heads[3], heads[1]],
  );
  t.is(stats.frames, 4);
  t.is(stats.tapErrors, 0);
  t.deepEqual(errors, []);
});

test('a queue stop with refused frames tries them once more, then completes them as lost', (t) => {
  const { s, tx, stats, heads } = setup(t, [['sent', -EAGAIN, -EAGAIN, 'sent'], [-EAGAIN, 'sent']]);
  tx.kick();
  s.driver.takeUsed();
  tx.settle();
  t.deepEqual(
    s.driver.takeUsed().map((u) => u.id),
    [heads[2], heads[1]],
    'one sent on the last try, one lost; both given back to the guest',
  );
  t.is(stats.frames, 3);
  t.is(stats.tapErrors, 1, 'the lost frame is counted');
});
