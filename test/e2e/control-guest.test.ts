/**
 * The control socket under a real guest (QEMU TCG, the Linux virtio-blk driver): `vhostctl status`
 * sees the attached front-end and its running queue, and `vhostctl resize` after the image file grew
 * makes the guest see the new size without a reboot (CONFIG_CHANGE_MSG, virtio 1.2 §5.2.6.2).
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { startDaemon } from '../helpers/daemon';
import { guestTest } from '../helpers/guest-test';
import { runGuest } from '../helpers/qemu-guest';
import { vhostctl, type VhostctlRun } from '../helpers/vhostctl';

const MiB = 1 << 20;

guestTest('vhostctl status and resize under a running guest: the guest sees the grown disk', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-control-e2e-'));
  const image = path.join(dir, 'disk.img');
  const control = path.join(dir, 'control.sock');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 16 * MiB);
  const daemon = await startDaemon('blk', ['--file', image, '--control', control]);
  let status: Promise<VhostctlRun> | undefined;
  let resize: Promise<VhostctlRun> | undefined;
  try {
    const result = await runGuest({
      qemuArgs: ['-chardev', `socket,id=blk0,path=${daemon.socketPath}`, '-device', 'vhost-user-blk-pci,chardev=blk0'],
      timeoutMs: 120_000,
      onConsoleLine: (line) => {
        // The guest is waiting: grow the image and tell the daemon through vhostctl, as an operator would.
        if (resize === undefined && line.includes('VHOSTD-MARK resize=now')) {
          fs.truncateSync(image, 48 * MiB);
          status = vhostctl('--control', control, '--json', 'status');
          resize = status.then(() => vhostctl('--control', control, 'resize'));
        }
      },
      script: [
        'mark size_before "$(cat /sys/block/vda/size)"',
        'mark resize now',
        `wait_for 30 sh -c '[ "$(cat /sys/block/vda/size)" -gt ${(16 * MiB) / 512} ]' && mark size_after "$(cat /sys/block/vda/size)"`,
        // The new tail is usable.
        'dd if=/dev/urandom of=/tmp/tail bs=4096 count=1 2>/dev/null',
        `dd if=/tmp/tail of=/dev/vda bs=4096 seek=${(40 * MiB) / 4096} conv=notrunc,fsync 2>/dev/null; mark tail_write "$?"`,
      ].join('\n'),
    });
    const why = result.tail(30);
    t.is(result.exitStatus, 0, why);

    const statusRun = await status!;
    t.is(statusRun.status, 0, statusRun.stderr);
    const seen = JSON.parse(statusRun.stdout) as { device: string; frontend: { connected: boolean }; queues: { started: boolean }[] };
    t.is(seen.device, 'blk');
    t.true(seen.frontend.connected, 'the guest is attached');
    t.true(seen.queues[0]?.started, 'its queue runs');

    const resizeRun = await resize!;
    t.is(resizeRun.status, 0, resizeRun.stderr);
    t.is(resizeRun.stdout, `blk: resized from ${(16 * MiB) / 512} to ${(48 * MiB) / 512} sectors (${48 * MiB} bytes)\n`);
    t.is(result.mark('size_before'), String((16 * MiB) / 512), why);
    t.is(result.mark('size_after'), String((48 * MiB) / 512), why);
    t.is(result.mark('tail_write'), '0', why);
  } finally {
    t.is(await daemon.stop(), 0, daemon.stderr());
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
