/**
 * Sizes on the command line and in control calls: `1G`, `512M`, `4k`, `1TiB`, `1048576` (binary
 * suffixes K, M, G, T, with an optional `B` or `iB`).
 */
import { ConfigError } from '../errors';

const SIZE_SUFFIX: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/**
 * Parse `value`, a size given as `what` (`--target`, `set-target`: named in the error), of at least
 * `minBytes`; throws ConfigError CONFIG_INVALID.
 */
export function parseSize(what: string, value: string, minBytes = 0): number {
  const m = /^(\d+)([KMGT]?)(?:i?B)?$/i.exec(value.trim());
  const size = m === null ? NaN : Number(m[1]) * SIZE_SUFFIX[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(size) || size < minBytes) {
    throw new ConfigError('CONFIG_INVALID', `${what} ${value}: expected a size of at least ${minBytes} bytes, e.g. 1G or 268435456`);
  }
  return size;
}
