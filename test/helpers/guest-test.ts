/**
 * `guestTest`: an ava test that needs a real guest (kept apart from qemu-guest.ts so that programs
 * outside ava, such as `npm run demo`, can boot guests without loading ava).
 */
import test, { type ExecutionContext, type ImplementationFn } from 'ava';

import { qemu102, qemuMissingReason, runGuest, type GuestResult, type RunGuestOptions } from './qemu-guest';

export interface GuestTestOptions {
  /**
   * Why the test cannot pass yet (a QEMU bug, say): it is registered with ava's `test.failing`, so the
   * run stays green while it fails and goes red, asking for this option to go, once it passes.
   */
  readonly knownFailure?: string;
  /** The test runs QEMU 10.2 ({@link qemu102}), not the default QEMU: skipped (failed in CI) without it. */
  readonly qemu102?: boolean;
  /**
   * Why this machine cannot run the test at all (no root for huge pages, say), or undefined: it is
   * skipped with that reason, also under CI, which cannot change the machine.
   */
  readonly unavailable?: string | undefined;
  /** Run alone (ava's `test.serial`), e.g. a test with two QEMUs whose guest must keep pace with a migration. */
  readonly serial?: boolean;
}

/**
 * Registers an ava test that needs a real guest. Without QEMU it is skipped, with the reason in its
 * title; but when `CI` is set a missing QEMU fails the test instead, since CI installs it. A test
 * the machine cannot run (`options.unavailable`) is skipped with that reason.
 */
export function guestTest(title: string, impl: ImplementationFn<[]>, options: GuestTestOptions = {}): void {
  const q102 = options.qemu102 === true ? qemu102() : undefined;
  const missing = q102 !== undefined && 'missing' in q102 ? q102.missing : qemuMissingReason();
  if (options.unavailable !== undefined) {
    test.skip(`${title} [skipped: ${options.unavailable}]`, impl);
  } else if (missing === undefined) {
    const register = options.serial === true ? test.serial : test;
    if (options.knownFailure !== undefined) register.failing(`${title} [known failure: ${options.knownFailure}]`, impl);
    else register(title, impl);
  } else if (process.env['CI']) {
    test(title, (t: ExecutionContext) => t.fail(`CI is set but ${missing}`));
  } else {
    test.skip(`${title} [skipped: ${missing}]`, impl);
  }
}

/**
 * {@link runGuest} for a test whose guest uses `daemon`: the daemon's stderr is logged when the run
 * throws, the guest's script must exit 0, and boot and run times are logged. Returns the result and
 * its last `tailLines` console lines, the message for the test's own assertions.
 */
export async function runGuestWith(
  t: ExecutionContext,
  daemon: { stderr(): string },
  opts: RunGuestOptions,
  tailLines = 40,
): Promise<{ result: GuestResult; why: string }> {
  const result = await runGuest(opts).catch((err: unknown) => {
    t.log(`daemon stderr:\n${daemon.stderr().slice(-4000)}`);
    throw err;
  });
  const why = result.tail(tailLines);
  t.is(result.exitStatus, 0, why);
  t.log(`boot ${result.bootMs ?? '?'} ms, run ${result.durationMs} ms`);
  return { result, why };
}
