/**
 * The real-guest harness itself: the guest boots with no extra devices, loads the virtio drivers, runs
 * the script and reports its status. Every other e2e test builds on this, so when this fails, look here
 * first.
 */
import type { ExecutionContext } from 'ava';

import { guestImage } from '../helpers/guest-image';
import { guestTest } from '../helpers/guest-test';
import { GuestRunError, runGuest } from '../helpers/qemu-guest';

// The drivers /init registers on the virtio bus (the names under /sys/bus/virtio/drivers). virtio_pci
// sits on the PCI bus instead, sd on the SCSI bus, and sg is a SCSI class interface, not a driver.
const VIRTIO_DRIVERS = ['virtio_balloon', 'virtio_blk', 'virtio_net', 'virtio_rng', 'virtio_scsi'];
// The modules the image is built to load, as /proc/modules names them.
const MODULES = ['virtio_pci', 'virtio_blk', 'virtio_net', 'virtio_scsi', 'sd_mod', 'sg', 'virtio_rng', 'virtio_balloon'];

guestTest('guest boots, loads the virtio drivers and reports the script status', async (t) => {
  const image = await guestImage();
  const result = await runGuest({
    script: [
      'uname -r',
      'section kernel uname -r',
      'section virtio ls -1 /sys/bus/virtio/drivers',
      'section pci ls -1 /sys/bus/pci/drivers',
      'section scsi ls -1 /sys/bus/scsi/drivers',
      "section modules cut -d' ' -f1 /proc/modules",
      'mark answer 42',
      'exit 7',
    ].join('\n'),
  });
  const why = result.tail();
  t.log(`boot: ${result.bootMs ?? '?'} ms wall to the ready marker, guest uptime ${result.guestBootSeconds ?? '?'} s; run ${result.durationMs} ms`);

  t.is(result.exitStatus, 7, why);
  t.is(result.section('kernel')?.output, image.kernelVersion, why);
  t.true(result.console.includes(`\n${image.kernelVersion}\n`), why);
  t.deepEqual(result.section('virtio'), { output: VIRTIO_DRIVERS.join('\n'), status: 0 }, why);
  t.true(result.section('pci')?.output.split('\n').includes('virtio-pci'), why);
  t.deepEqual(result.section('scsi')?.output.split('\n'), ['sd'], why);
  const loaded = result.section('modules')?.output.split('\n') ?? [];
  t.deepEqual(MODULES.filter((m) => !loaded.includes(m)), [], why);
  t.is(result.mark('answer'), '42', why);
});

/** Asserts that a rejected run left no QEMU behind. */
function assertGone(t: ExecutionContext, pid: number | undefined): void {
  t.not(pid, undefined);
  t.throws(() => process.kill(pid!, 0), { code: 'ESRCH' }, `QEMU ${pid} still exists`);
}

guestTest('a run that outlasts its timeout is killed and rejected', async (t) => {
  const err = await t.throwsAsync(runGuest({ script: 'sleep 600', timeoutMs: 2000 }), { instanceOf: GuestRunError });
  t.is(err?.code, 'GUEST_TIMEOUT');
  t.regex(err?.message ?? '', /within 2000 ms[^]*--- last console lines ---/);
  assertGone(t, err?.pid);
});

guestTest('a console callback that throws ends the run, with the console in the error', async (t) => {
  const err = await t.throwsAsync(
    runGuest({
      script: 'echo about-to-hang; sleep 600',
      onConsoleLine: (line) => {
        if (line.includes('about-to-hang')) throw new Error('seen enough');
      },
    }),
    { instanceOf: GuestRunError },
  );
  t.is(err?.code, 'GUEST_CONSOLE_CALLBACK');
  t.regex(err?.message ?? '', /seen enough/);
  t.true(err?.console.includes('VHOSTD-GUEST-READY'), err?.message);
  t.true(err?.console.includes('about-to-hang'), err?.message);
  assertGone(t, err?.pid);
});

guestTest('a guest kernel panic ends the run without an exit marker', async (t) => {
  const err = await t.throwsAsync(runGuest({ script: 'echo c > /proc/sysrq-trigger; sleep 600' }), { instanceOf: GuestRunError });
  t.is(err?.code, 'GUEST_NO_EXIT_MARKER');
  t.regex(err?.console ?? '', /Kernel panic/, err?.message);
  assertGone(t, err?.pid);
});
