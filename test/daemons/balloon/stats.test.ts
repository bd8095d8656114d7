import test from 'ava';

import { parseStats, STAT_TAGS } from '../../../daemons/balloon/stats';

function buffer(entries: [number, bigint][], extra = 0): Uint8Array {
  const bytes = new Uint8Array(entries.length * 10 + extra);
  const view = new DataView(bytes.buffer);
  entries.forEach(([tag, value], i) => {
    view.setUint16(i * 10, tag, true);
    view.setBigUint64(i * 10 + 2, value, true);
  });
  return bytes;
}

test('parseStats names the tags of virtio 1.2 §5.5.6.3 and Linux, the last value of a tag wins', (t) => {
  const stats = parseStats(buffer([[0, 1n], [4, 100n << 20n], [5, 512n << 20n], [4, 90n << 20n], [15, 7n]]));
  t.deepEqual(stats, { values: { swap_in_bytes: 1, free_bytes: 90 << 20, total_bytes: 512 << 20, direct_reclaims: 7 }, unknownTags: 0 });
  t.is(STAT_TAGS.length, 16);
});

test('parseStats counts unknown tags and ignores a partial entry', (t) => {
  const stats = parseStats(buffer([[16, 1n], [0xffff, 2n], [6, 3n]], 7));
  t.deepEqual(stats, { values: { available_bytes: 3 }, unknownTags: 2 });
});

test('parseStats reads at most 64 entries', (t) => {
  const entries = Array.from({ length: 100 }, (_, i): [number, bigint] => [i < 64 ? 99 : 2, BigInt(i)]);
  t.deepEqual(parseStats(buffer(entries)), { values: {}, unknownTags: 64 });
});
