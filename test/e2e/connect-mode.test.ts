/**
 * `--connect`: QEMU listens (`-chardev socket,server=on`) and the daemon dials it, the arrangement
 * for a VMM that owns the socket. QEMU waits for the daemon before it starts the guest.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { daemonEnv } from '../helpers/daemon';
import { repoRoot } from '../helpers/guest-image';
import { guestTest } from '../helpers/guest-test';
import { runGuest } from '../helpers/qemu-guest';

guestTest('blk with --connect: the daemon dials QEMU and the guest uses the disk', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-connect-'));
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 16 << 20);
  const socketPath = path.join(dir, 'qemu.sock');
  const daemon = spawn(
    process.execPath,
    [path.join(repoRoot(), 'build', 'daemons', 'blk', 'main.js'), '--connect', socketPath, '--file', image],
    { stdio: ['ignore', 'inherit', 'pipe'], env: daemonEnv() },
  );
  let stderr = '';
  daemon.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  const exited = new Promise<number | null>((resolve) => daemon.once('exit', resolve));
  try {
    const result = await runGuest({
      qemuArgs: ['-chardev', `socket,id=blk0,path=${socketPath},server=on,wait=on`, '-device', 'vhost-user-blk-pci,chardev=blk0'],
      script: [
        'mark size "$(cat /sys/block/vda/size)"',
        'echo connect-mode-data | dd of=/dev/vda bs=512 conv=sync,fsync 2>/dev/null',
        'echo 3 > /proc/sys/vm/drop_caches',
        'mark data "$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n1)"',
      ].join('\n'),
    });
    t.is(result.exitStatus, 0, result.tail());
    t.is(Number(result.mark('size')), (16 << 20) / 512);
    t.is(result.mark('data'), 'connect-mode-data');
    t.is(fs.readFileSync(image).subarray(0, 17).toString(), 'connect-mode-data', 'the data is in the image');
  } finally {
    daemon.kill('SIGTERM');
    t.is(await exited, 0, stderr);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
