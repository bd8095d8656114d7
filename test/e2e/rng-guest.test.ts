/**
 * vhost-user-rng in a real guest: the Linux virtio-rng driver binds, /dev/hwrng delivers bytes that
 * came from the daemon, and a rate limit really limits what the guest gets.
 */
import { startDaemon } from '../helpers/daemon';
import { guestTest } from '../helpers/guest-test';
import { runGuest } from '../helpers/qemu-guest';

function rngDevice(socketPath: string): string[] {
  return ['-chardev', `socket,id=rng0,path=${socketPath}`, '-device', 'vhost-user-rng-pci,chardev=rng0'];
}

guestTest('the guest reads 64 KiB of varied entropy from /dev/hwrng', async (t) => {
  const daemon = await startDaemon('rng', ['--metrics', '0']);
  try {
    const result = await runGuest({
      qemuArgs: rngDevice(daemon.socketPath),
      script: [
        'mark available "$(cat /sys/class/misc/hw_random/rng_available)"',
        'mark current "$(cat /sys/class/misc/hw_random/rng_current)"',
        'dd if=/dev/hwrng of=/tmp/r bs=4096 count=16 2>/dev/null',
        'mark bytes "$(wc -c < /tmp/r)"',
        // Distinct byte values in the sample: random data has (nearly) all 256.
        'mark distinct "$(od -An -v -tu1 /tmp/r | tr -s " " "\\n" | grep -v "^$" | sort -u | wc -l)"',
      ].join('\n'),
    });
    t.is(result.exitStatus, 0, result.tail());
    t.regex(result.mark('available') ?? '', /virtio_rng/);
    t.regex(result.mark('current') ?? '', /virtio_rng/);
    t.is(Number(result.mark('bytes')), 65536);
    t.true(Number(result.mark('distinct')) > 250, `only ${result.mark('distinct')} distinct byte values`);

    // The operator sees the same traffic in the metrics.
    const port = /metrics on http:\/\/127\.0\.0\.1:(\d+)/.exec(daemon.stderr())?.[1];
    t.truthy(port, daemon.stderr());
    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    const written = /^vhostd_queue_written_bytes_total\{queue="0",device="rng"\} (\d+)/m.exec(metrics)?.[1];
    t.true(Number(written) >= 65536, metrics);
    t.regex(metrics, /^vhostd_queue_kicks_total\{queue="0",device="rng"\} [1-9]/m);
  } finally {
    const code = await daemon.stop();
    t.is(code, 0, `daemon exit on SIGTERM; stderr: ${daemon.stderr()}`);
  }
});

guestTest('with --max-bytes the guest receives entropy at the configured rate (within 20%)', async (t) => {
  const rate = 4096; // bytes per 250 ms = 16 KiB/s
  const daemon = await startDaemon('rng', ['--max-bytes', String(rate), '--period-ms', '250']);
  try {
    const result = await runGuest({
      qemuArgs: rngDevice(daemon.socketPath),
      script: [
        // Warm up (the first period's quota is already there), then time 48 KiB.
        'dd if=/dev/hwrng of=/dev/null bs=1024 count=4 2>/dev/null',
        'start=$(cut -d" " -f1 /proc/uptime)',
        'dd if=/dev/hwrng of=/tmp/r bs=1024 count=48 2>/dev/null',
        'end=$(cut -d" " -f1 /proc/uptime)',
        'mark bytes "$(wc -c < /tmp/r)"',
        'mark seconds "$(echo "$start $end" | awk "{print \\$2 - \\$1}")"',
      ].join('\n'),
    });
    t.is(result.exitStatus, 0, result.tail());
    const bytes = Number(result.mark('bytes'));
    const seconds = Number(result.mark('seconds'));
    const measured = bytes / seconds;
    const expected = (rate * 1000) / 250;
    t.is(bytes, 48 * 1024);
    t.true(Math.abs(measured - expected) / expected < 0.2, `guest got ${measured.toFixed(0)} B/s, limit is ${expected} B/s`);
  } finally {
    await daemon.stop();
  }
});
