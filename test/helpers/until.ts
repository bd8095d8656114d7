/**
 * Waiting in tests for something another thread, process or the kernel does: poll a condition.
 * The bound only ends a hang with a message; it asserts nothing about time.
 */

/**
 * Resolves once `condition()` holds (polled every 10 ms); throws an Error naming `what` (a function:
 * called then, to show the state reached) when it still does not after `timeoutMs`.
 */
export async function until(condition: () => boolean, what: string | (() => string), timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`not reached in ${timeoutMs} ms: ${typeof what === 'string' ? what : what()}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
