/**
 * The engine choice, made once per process: io_uring when the kernel allows it (old kernels, seccomp
 * and the io_uring_disabled sysctl refuse it), else preadv/pwritev on the libuv thread pool.
 */
import { native } from '../../native/index';
import type { Logger } from '../runtime/logger';
import type { ExecutorFactory } from './executor';
import { IoUringExecutor } from './io-uring-executor';
import { ThreadPoolExecutor } from './thread-pool-executor';

/** Probe io_uring with a small ring; the fallback is said once, as a warning. */
export function chooseExecutor(logger: Logger): { kind: string; create: ExecutorFactory } {
  try {
    native.createIoUring(8).close();
  } catch (err) {
    logger.warn(`io_uring is unavailable (${(err as Error).message}); using preadv/pwritev on the libuv thread pool`);
    return { kind: 'thread-pool', create: (capacity, sink) => new ThreadPoolExecutor(capacity, sink) };
  }
  return { kind: 'io_uring', create: (capacity, sink) => new IoUringExecutor(capacity, sink, logger) };
}
