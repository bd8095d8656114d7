/**
 * Checks of device options that several daemons share, for their pure `toConfig`: each returns the
 * value or throws a ConfigError (CONFIG_INVALID) naming the option.
 */
import { ConfigError } from '../errors';

/** An integer from `min` to `max` given as `--option`. */
export function integerOption(option: string, value: unknown, min: number, max: number): number {
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) {
    throw new ConfigError('CONFIG_INVALID', `--${option} ${String(value)}: expected an integer from ${min} to ${max}`);
  }
  return value;
}

/** `--queue-size`: virtio 1.2 §2.7, split ring sizes are powers of two up to 32768. */
export function queueSizeOption(value: unknown): number {
  const size = integerOption('queue-size', value, 2, 32768);
  if ((size & (size - 1)) !== 0) {
    throw new ConfigError('CONFIG_INVALID', `--queue-size ${size}: expected a power of two (e.g. 128, 256, 1024)`);
  }
  return size;
}
