/**
 * The real-guest harness itself: the guest boots with no extra devices, loads the virtio drivers, runs
 * the script and reports its status. Every other e2e test builds on this, so when this fails, look here
 * first.
 */
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

guestTest('a script that hangs is killed at the timeout, with the console in the error', async (t) => {
  const err = await t.throwsAsync(
    runGuest({ script: 'echo about-to-hang; sleep 600', timeoutMs: 30_000 }),
    { instanceOf: GuestRunError },
  );
  t.is(err?.code, 'GUEST_TIMEOUT');
  t.true(err?.console.includes('about-to-hang'), err?.message);
});
