/**
 * The getrandom source fills requests of every size whole, with fresh bytes (never the same bytes
 * twice, whatever the request sizes), and nothing outside the requested range.
 */
import test from 'ava';

import { GetrandomSource } from '../../../daemons/rng/entropy-source';

test('requests of every size are filled with bytes never handed out before', (t) => {
  const source = new GetrandomSource();
  const out = new Uint8Array(512 * 1024);
  // Sizes from 1 byte to 100 kB, as drivers post them.
  const sizes = [1, 7, 64, 4095, 4096, 65_535, 65_536, 100_000, 3, 16_384];
  let at = 0;
  for (let i = 0; at < out.length; i++) {
    const length = Math.min(sizes[i % sizes.length]!, out.length - at);
    source.fillSync(out, at, length);
    at += length;
  }
  // Random bytes: about 1/256 zeros overall (an unfilled stretch would be all zeros).
  const zeros = out.reduce((n, b) => n + (b === 0 ? 1 : 0), 0);
  t.true(zeros < (out.length / 256) * 1.5, `${zeros} zero bytes of ${out.length}`);
  // No 8 bytes twice at any offset: a source that handed bytes out again would repeat (random
  // collisions among 2^19 windows of 2^64 values are negligible).
  const dv = new DataView(out.buffer);
  const seen = new Set<bigint>();
  for (let i = 0; i + 8 <= out.length; i++) seen.add(dv.getBigUint64(i));
  t.is(seen.size, out.length - 7);
});

test('fill() reports the whole length', (t) => {
  const source = new GetrandomSource();
  const view = new Uint8Array(100);
  let reported = -1;
  source.fill(view, 10, 80, (err, bytes) => {
    t.is(err, null);
    reported = bytes;
  });
  t.is(reported, 80);
  t.true(view.subarray(0, 10).every((b) => b === 0) && view.subarray(90).every((b) => b === 0), 'nothing outside the range');
});
