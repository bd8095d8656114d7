import test from 'ava';

import { parseSize } from '../../../lib/cli/size';
import { ConfigError } from '../../../lib/errors';

test('parseSize takes bytes and binary suffixes, and refuses what is not a size or is too small', (t) => {
  t.is(parseSize('--x', '512'), 512);
  t.is(parseSize('--x', '4k'), 4096);
  t.is(parseSize('--x', '2G'), 2 ** 31);
  t.is(parseSize('--x', '1TiB'), 2 ** 40);
  t.is(parseSize('--x', '0'), 0);
  for (const [value, min] of [['256', 512], ['1Q', 0], ['-1', 0], ['', 0], ['9007199254740993', 0]] as const) {
    t.is(t.throws(() => parseSize('--x', value, min), { instanceOf: ConfigError })?.code, 'CONFIG_INVALID', value);
  }
});
