/**
 * IoEngine over a scripted executor (no addon): what the executor is asked to do, and what the
 * device's sink gets back.
 */
import test from 'ava';

import { INLINE, INLINE_NOWAIT, inlineFlags, IoEngine, RESUBMIT_SHORT, type InlineTransfer } from '../../../lib/io/engine';
import { NullExecutor, type CompletionSink, type IoExecutor } from '../../../lib/io/executor';
import { OpBatch } from '../../../lib/io/op-batch';
import { IORING_FSYNC_DATASYNC, IORING_OP, OFFSET_CURRENT, RWF_NOWAIT } from '../../../native/io-batch';

/** An op as the executor saw it. */
interface Submitted {
  tag: number;
  opcode: number;
  fd: number;
  offset: number;
  iovecs: [number, number][];
}

/** Records submitted ops; the test completes them with `complete(results)` in submission order. */
class ScriptedExecutor implements IoExecutor {
  readonly kind = 'scripted';
  readonly batch = new OpBatch(2, 2);
  readonly submitted: Submitted[] = [];
  /** Ops submitted and not completed yet, oldest first. */
  pending: Submitted[] = [];
  closed = false;

  constructor(private readonly sink: CompletionSink) {}

  submit(): void {
    const b = this.batch;
    for (let i = 0; i < b.count; i++) {
      const iovecs: [number, number][] = [];
      for (let k = b.iovStart[i]!; k < b.iovStart[i]! + b.iovCount[i]!; k++) iovecs.push([b.iovBase[k]!, b.iovLen[k]!]);
      const op = { tag: b.userData[i]!, opcode: b.opcode[i]!, fd: b.fd[i]!, offset: b.offset[i]!, iovecs };
      this.submitted.push(op);
      this.pending.push(op);
    }
    b.consume(b.count);
  }

  /** Complete the oldest `results.length` pending ops with these results, in one batch. */
  complete(...results: number[]): void {
    const ops = this.pending.splice(0, results.length);
    this.sink(Uint32Array.from(ops.map((op) => op.tag)), Int32Array.from(results), results.length);
  }

  close(): void {
    this.closed = true;
  }
}

/** An op as the inline transfer saw it, with its RWF flags. */
interface Transferred extends Submitted {
  rwFlags: number;
}

/** An {@link InlineTransfer} that records each call's ops and answers them with `answer(op)`. */
function scriptedTransfer(answer: (op: Transferred) => number) {
  const calls: Transferred[][] = [];
  const transfer: InlineTransfer = (b, count, result) => {
    const ops: Transferred[] = [];
    for (let i = 0; i < count; i++) {
      const iovecs: [number, number][] = [];
      for (let k = b.iovStart[i]!; k < b.iovStart[i]! + b.iovCount[i]!; k++) iovecs.push([b.iovBase[k]!, b.iovLen[k]!]);
      const op = { tag: b.userData[i]!, opcode: b.opcode[i]!, fd: b.fd[i]!, offset: b.offset[i]!, iovecs, rwFlags: b.arg[i]! };
      ops.push(op);
      result[i] = answer(op);
    }
    calls.push(ops);
  };
  return { transfer, calls };
}

function rig(capacity = 4, transfer: InlineTransfer | null = null) {
  const delivered: [number, number][] = [];
  let exec: ScriptedExecutor | null = null;
  const engine = new IoEngine(
    (_capacity, sink) => (exec = new ScriptedExecutor(sink)),
    capacity,
    (userData, result, count) => {
      for (let i = 0; i < count; i++) delivered.push([userData[i]!, result[i]!]);
    },
    transfer,
  );
  return { engine, exec: exec!, delivered };
}

/** Stage a READV/WRITEV over `iovecs` (address, length pairs). */
function stage(engine: IoEngine, opcode: typeof IORING_OP.READV | typeof IORING_OP.WRITEV, offset: number, iovecs: [number, number][], userData: number, flags = 0): void {
  engine.reserveIovecs(iovecs.length);
  iovecs.forEach(([base, len], k) => {
    engine.iovBase[engine.iovUsed + k] = base;
    engine.iovLen[engine.iovUsed + k] = len;
  });
  engine.addReadWrite(opcode, 7, offset, iovecs.length, userData, flags);
}

test('a short READV with RESUBMIT_SHORT is resubmitted for the rest; the sink sees one whole result', (t) => {
  const { engine, exec, delivered } = rig();
  stage(engine, IORING_OP.READV, 4096, [[0x10000, 1000], [0x20000, 3000]], 0xdead_beef, RESUBMIT_SHORT);
  engine.submit();
  exec.complete(1500);
  t.deepEqual(delivered, [], 'nothing delivered for a partial transfer');
  t.is(exec.submitted.length, 2);
  const rest = exec.submitted[1]!;
  t.is(rest.opcode, IORING_OP.READV);
  t.is(rest.fd, 7);
  t.is(rest.offset, 4096 + 1500);
  t.deepEqual(rest.iovecs, [[0x20000 + 500, 2500]], 'the first iovec done, the second cut');
  t.is(engine.inFlight, 1);
  exec.complete(2500);
  t.deepEqual(delivered, [[0xdead_beef, 4000]]);
  t.is(engine.inFlight, 0);
});

test('an op cut exactly at an iovec boundary resumes with the next iovec', (t) => {
  const { engine, exec, delivered } = rig();
  stage(engine, IORING_OP.WRITEV, 0, [[0x1000, 512], [0x2000, 512], [0x3000, 512]], 1, RESUBMIT_SHORT);
  engine.submit();
  exec.complete(1024);
  t.deepEqual(exec.submitted[1]!.iovecs, [[0x3000, 512]]);
  t.is(exec.submitted[1]!.offset, 1024);
  exec.complete(512);
  t.deepEqual(delivered, [[1, 1536]]);
});

test('without RESUBMIT_SHORT a short transfer is the result (TAP fds, sockets); OFFSET_CURRENT stays -1', (t) => {
  const { engine, exec, delivered } = rig();
  stage(engine, IORING_OP.READV, OFFSET_CURRENT, [[0x1000, 65536]], 3);
  engine.submit();
  t.is(exec.submitted[0]!.offset, -1);
  exec.complete(60);
  t.deepEqual(delivered, [[3, 60]]);
  t.is(exec.submitted.length, 1);
});

test('a resubmitted op at OFFSET_CURRENT continues at the current position', (t) => {
  const { engine, exec, delivered } = rig();
  stage(engine, IORING_OP.WRITEV, OFFSET_CURRENT, [[0x1000, 100]], 4, RESUBMIT_SHORT);
  engine.submit();
  exec.complete(40);
  t.is(exec.submitted[1]!.offset, -1);
  t.deepEqual(exec.submitted[1]!.iovecs, [[0x1000 + 40, 60]]);
  exec.complete(60);
  t.deepEqual(delivered, [[4, 100]]);
});

test('end of file and errors end a resubmitted op: bytes so far, or the error', (t) => {
  const { engine, exec, delivered } = rig();
  stage(engine, IORING_OP.READV, 0, [[0x1000, 4096]], 1, RESUBMIT_SHORT);
  stage(engine, IORING_OP.WRITEV, 0, [[0x2000, 4096]], 2, RESUBMIT_SHORT);
  engine.submit();
  exec.complete(1000, 1000);
  exec.complete(0, -28); // EOF for the read, ENOSPC for the write
  t.deepEqual(delivered, [
    [1, 1000],
    [2, -28],
  ]);
  t.is(engine.inFlight, 0);
});

test('fsync and fallocate results pass through with their userData', (t) => {
  const { engine, exec, delivered } = rig();
  engine.addFsync(5, IORING_FSYNC_DATASYNC, 10);
  engine.addFallocate(5, 3, 4096, 8192, 11);
  t.is(engine.inFlight, 2, 'staged ops count as in flight');
  engine.submit();
  t.deepEqual(
    exec.submitted.map((op) => op.opcode),
    [IORING_OP.FSYNC, IORING_OP.FALLOCATE],
  );
  t.is(exec.submitted[1]!.offset, 4096);
  t.deepEqual(exec.submitted[1]!.iovecs, [[0, 8192]], 'the fallocate length travels in iovLen');
  exec.complete(0, -95);
  t.deepEqual(delivered, [
    [10, 0],
    [11, -95],
  ]);
});

test('drained() resolves at once when idle, else after the last completion (resubmissions included)', async (t) => {
  const { engine, exec } = rig();
  await engine.drained();
  stage(engine, IORING_OP.READV, 0, [[0x1000, 100]], 1, RESUBMIT_SHORT);
  engine.addFsync(5, 0, 2);
  engine.submit();
  let drained = false;
  const done = engine.drained().then(() => (drained = true));
  exec.complete(50, 0);
  await Promise.resolve();
  t.false(drained, 'the read is resubmitted, not done');
  t.is(engine.inFlight, 1);
  exec.complete(50);
  await done;
  t.true(drained);
});

test('ops staged by the sink are submitted by the engine after the batch', (t) => {
  const delivered: number[] = [];
  let exec: ScriptedExecutor | null = null;
  const engine: IoEngine = new IoEngine(
    (_capacity, sink) => (exec = new ScriptedExecutor(sink)),
    4,
    (userData, _result, count) => {
      for (let i = 0; i < count; i++) {
        delivered.push(userData[i]!);
        if (userData[i] === 1) engine.addFsync(5, 0, 2);
      }
    },
  );
  engine.addFsync(5, 0, 1);
  engine.submit();
  exec!.complete(0);
  t.is(exec!.pending.length, 1, 'the follow-up op went to the executor');
  exec!.complete(0);
  t.deepEqual(delivered, [1, 2]);
  t.is(engine.inFlight, 0);
});

test('more ops than the capacity: tags grow and every userData comes back once', (t) => {
  const { engine, exec, delivered } = rig(2);
  const n = 100;
  for (let i = 0; i < n; i++) stage(engine, IORING_OP.WRITEV, i * 512, [[0x1000 + i * 512, 512]], 1000 + i, RESUBMIT_SHORT);
  t.is(engine.inFlight, n);
  engine.submit();
  exec.complete(...new Array<number>(n).fill(256));
  t.is(exec.pending.length, n, 'every op resubmitted for its second half');
  t.true(exec.pending.every((op, i) => op.offset === i * 512 + 256));
  exec.complete(...new Array<number>(n).fill(256));
  t.deepEqual(
    delivered.sort((a, b) => a[0] - b[0]),
    Array.from({ length: n }, (_, i) => [1000 + i, 512]),
  );
  t.is(engine.inFlight, 0);
});

test('a resubmitted read/write beyond 2^31-1 bytes is refused before anything is staged', (t) => {
  const { engine } = rig();
  t.throws(() => stage(engine, IORING_OP.READV, 0, [[0x1000, 2 ** 30], [0x1000, 2 ** 30]], 1, RESUBMIT_SHORT), { instanceOf: RangeError });
  t.is(engine.inFlight, 0);
});

test('NullExecutor: every op completes inside submit, reads and writes with their full length', (t) => {
  const delivered: [number, number][] = [];
  const engine = new IoEngine(
    (capacity, sink) => new NullExecutor(capacity, sink),
    4,
    (userData, result, count) => {
      for (let i = 0; i < count; i++) delivered.push([userData[i]!, result[i]!]);
    },
  );
  t.is(engine.kind, 'null');
  stage(engine, IORING_OP.READV, 0, [[0x1000, 300], [0x2000, 212]], 1, RESUBMIT_SHORT);
  engine.addFsync(3, 0, 2);
  engine.submit();
  t.deepEqual(delivered, [
    [1, 512],
    [2, 0],
  ]);
  t.is(engine.inFlight, 0);
});

test('close releases the executor', (t) => {
  const { engine, exec } = rig();
  engine.close();
  t.true(exec.closed);
});

/** Bytes of an op's iovecs. */
const opLength = (op: Submitted) => op.iovecs.reduce((n, [, len]) => n + len, 0);

test('INLINE ops run in one transfer call at submit, results reach the sink before submit returns, the executor sees none', (t) => {
  const { transfer, calls } = scriptedTransfer(opLength);
  const { engine, exec, delivered } = rig(4, transfer);
  stage(engine, IORING_OP.WRITEV, 8192, [[0x1000, 512], [0x2000, 3584]], 1, INLINE);
  stage(engine, IORING_OP.READV, 0, [[0x3000, 4096]], 2, INLINE);
  t.is(calls.length, 0, 'nothing runs before submit');
  engine.submit();
  t.is(calls.length, 1, 'one call for the batch');
  t.deepEqual(
    calls[0]!.map(({ opcode, fd, offset, iovecs, rwFlags }) => ({ opcode, fd, offset, iovecs, rwFlags })),
    [
      { opcode: IORING_OP.WRITEV, fd: 7, offset: 8192, iovecs: [[0x1000, 512], [0x2000, 3584]], rwFlags: 0 },
      { opcode: IORING_OP.READV, fd: 7, offset: 0, iovecs: [[0x3000, 4096]], rwFlags: 0 },
    ],
  );
  t.deepEqual(delivered, [[1, 4096], [2, 4096]]);
  t.is(exec.submitted.length, 0);
  t.is(engine.inFlight, 0);
  t.deepEqual({ ...engine.stats }, { inline: 2, inlineFallbacks: 0, executor: 0 });
});

test('inline and executor ops of one batch: each goes its way, iovecs stay with their op', (t) => {
  const { transfer, calls } = scriptedTransfer(opLength);
  const { engine, exec, delivered } = rig(4, transfer);
  stage(engine, IORING_OP.WRITEV, 0, [[0x1000, 512]], 1, RESUBMIT_SHORT);
  stage(engine, IORING_OP.READV, 512, [[0x2000, 1024], [0x2800, 1024]], 2, INLINE);
  stage(engine, IORING_OP.WRITEV, 4096, [[0x4000, 2048]], 3, RESUBMIT_SHORT);
  engine.submit();
  t.deepEqual(calls[0]!.map((op) => op.iovecs), [[[0x2000, 1024], [0x2800, 1024]]]);
  t.deepEqual(exec.submitted.map((op) => [op.offset, op.iovecs]), [[0, [[0x1000, 512]]], [4096, [[0x4000, 2048]]]]);
  t.deepEqual(delivered, [[2, 2048]]);
  exec.complete(512, 2048);
  t.deepEqual(delivered, [[2, 2048], [1, 512], [3, 2048]]);
});

test('INLINE_NOWAIT: a miss (EAGAIN) goes to the executor whole, a partial hit sends the rest, a full hit completes inline', (t) => {
  const EAGAIN = 11;
  const { transfer, calls } = scriptedTransfer((op) => (op.tag === 0 ? -EAGAIN : op.tag === 1 ? 1536 : opLength(op)));
  const { engine, exec, delivered } = rig(4, transfer);
  stage(engine, IORING_OP.READV, 4096, [[0x1000, 4096]], 10, INLINE_NOWAIT);
  stage(engine, IORING_OP.READV, 65536, [[0x2000, 1024], [0x3000, 1024]], 11, INLINE_NOWAIT);
  stage(engine, IORING_OP.READV, 0, [[0x5000, 512]], 12, INLINE_NOWAIT);
  engine.submit();
  t.true(calls[0]!.every((op) => op.rwFlags === RWF_NOWAIT));
  t.deepEqual(delivered, [[12, 512]], 'the hit completes at once');
  t.deepEqual(
    exec.submitted.map((op) => [op.offset, op.iovecs]),
    [
      [4096, [[0x1000, 4096]]],
      [65536 + 1536, [[0x3000 + 512, 512]]],
    ],
  );
  t.is(engine.inFlight, 2);
  exec.complete(4096, 512);
  t.deepEqual(delivered, [[12, 512], [10, 4096], [11, 2048]], 'the sink sees whole-op results');
  t.deepEqual({ ...engine.stats }, { inline: 1, inlineFallbacks: 2, executor: 2 });
});

test('INLINE_NOWAIT: a file system without RWF_NOWAIT (EOPNOTSUPP) and a zero-byte read go to the executor, which has the last word', (t) => {
  const { transfer } = scriptedTransfer((op) => (op.tag === 0 ? -95 : 0));
  const { engine, exec, delivered } = rig(4, transfer);
  stage(engine, IORING_OP.READV, 0, [[0x1000, 512]], 0, INLINE_NOWAIT);
  stage(engine, IORING_OP.READV, 1 << 20, [[0x2000, 512]], 1, INLINE_NOWAIT);
  engine.submit();
  t.deepEqual(delivered, []);
  t.is(exec.submitted.length, 2);
  exec.complete(512, 0);
  t.deepEqual(delivered, [[0, 512], [1, 0]], 'the end of the file is the executor\'s zero');
});

test('INLINE: errors and a zero-byte read are final; a short transfer is resubmitted through the executor', (t) => {
  const { transfer } = scriptedTransfer((op) => (op.tag === 0 ? -28 : op.tag === 1 ? 0 : 1000));
  const { engine, exec, delivered } = rig(4, transfer);
  stage(engine, IORING_OP.WRITEV, 0, [[0x1000, 512]], 0, INLINE);
  stage(engine, IORING_OP.READV, 1 << 20, [[0x2000, 512]], 1, INLINE);
  stage(engine, IORING_OP.WRITEV, 4096, [[0x3000, 4096]], 2, INLINE);
  engine.submit();
  t.deepEqual(delivered, [[0, -28], [1, 0]]);
  t.deepEqual(exec.submitted.map((op) => [op.offset, op.iovecs]), [[4096 + 1000, [[0x3000 + 1000, 3096]]]]);
  exec.complete(3096);
  t.deepEqual(delivered, [[0, -28], [1, 0], [2, 4096]]);
});

test('inline ops staged by the sink run in the same submit; a throwing transfer fails its ops with EIO', (t) => {
  let first = true;
  const transfer: InlineTransfer = (_batch, count, result) => {
    if (!first) throw new RangeError('request 0: iovecs out of range');
    first = false;
    for (let i = 0; i < count; i++) result[i] = 512;
  };
  const delivered: [number, number][] = [];
  let engine: IoEngine | null = null;
  engine = new IoEngine(
    (_c, sink) => new ScriptedExecutor(sink),
    4,
    (userData, result, count) => {
      for (let i = 0; i < count; i++) {
        delivered.push([userData[i]!, result[i]!]);
        if (userData[i] === 1) stage(engine!, IORING_OP.READV, 0, [[0x1000, 512]], 2, INLINE);
      }
    },
    transfer,
  );
  stage(engine, IORING_OP.READV, 0, [[0x1000, 512]], 1, INLINE);
  engine.submit();
  t.deepEqual(delivered, [[1, 512], [2, -5]]);
  t.is(engine.inFlight, 0);
});

test('without a transfer the inline flags are ignored: every op goes to the executor', (t) => {
  const { engine, exec, delivered } = rig(4, null);
  stage(engine, IORING_OP.READV, 0, [[0x1000, 512]], 1, INLINE);
  stage(engine, IORING_OP.READV, 512, [[0x2000, 512]], 2, INLINE_NOWAIT);
  engine.submit();
  t.is(exec.submitted.length, 2);
  exec.complete(100, 512);
  t.deepEqual(exec.submitted[2]!.offset, 100, 'INLINE implies RESUBMIT_SHORT');
  exec.complete(412);
  t.deepEqual(delivered, [[2, 512], [1, 512]]);
});

test('inlineFlags: memory file systems inline, page-cache reads with RWF_NOWAIT, never O_DIRECT or the null backend', (t) => {
  t.is(inlineFlags('memory', false), INLINE);
  t.is(inlineFlags('memory', true), INLINE);
  t.is(inlineFlags('page-cache', false), INLINE_NOWAIT);
  t.is(inlineFlags('page-cache', true), 0);
  t.is(inlineFlags('direct', false), 0);
  t.is(inlineFlags('none', false), 0);
});
