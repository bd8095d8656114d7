/**
 * vhost-user-blk with `--threads 2`: each of the two queues runs in its own worker thread that maps
 * guest memory itself. A real guest with two vCPUs writes and reads back through both queues.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { startDaemon } from '../helpers/daemon';
import { guestTest } from '../helpers/guest-test';
import { runGuest } from '../helpers/qemu-guest';

guestTest('blk --threads 2: a two-vCPU guest writes and reads back through two queues in two worker threads', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-blk-threads-'));
  const image = path.join(dir, 'disk.img');
  fs.writeFileSync(image, '');
  fs.truncateSync(image, 32 << 20);
  const daemon = await startDaemon('blk', ['--file', image, '--num-queues', '2', '--threads', '2']);
  try {
    const result = await runGuest({
      qemuArgs: [
        '-smp', '2',
        '-chardev', `socket,id=blk0,path=${daemon.socketPath}`,
        '-device', 'vhost-user-blk-pci,chardev=blk0,num-queues=2',
      ],
      script: [
        'mark queues "$(ls /sys/block/vda/mq | wc -l)"',
        // One writer per vCPU, so both hardware queues carry I/O.
        'dd if=/dev/urandom of=/tmp/a bs=1M count=4 2>/dev/null; dd if=/dev/urandom of=/tmp/b bs=1M count=4 2>/dev/null',
        'taskset 1 dd if=/tmp/a of=/dev/vda bs=64k seek=0 conv=fsync 2>/dev/null &',
        'taskset 2 dd if=/tmp/b of=/dev/vda bs=64k seek=256 conv=fsync 2>/dev/null &',
        'wait',
        'echo 3 > /proc/sys/vm/drop_caches',
        'mark a "$(md5sum < /tmp/a | cut -d" " -f1) $(dd if=/dev/vda bs=64k count=64 2>/dev/null | md5sum | cut -d" " -f1)"',
        'mark b "$(md5sum < /tmp/b | cut -d" " -f1) $(dd if=/dev/vda bs=64k skip=256 count=64 2>/dev/null | md5sum | cut -d" " -f1)"',
      ].join('\n'),
    });
    t.is(result.exitStatus, 0, result.tail());
    t.is(result.mark('queues'), '2');
    for (const [key, offset] of [['a', 0], ['b', 256 * 65536]] as const) {
      const [written, readBack] = (result.mark(key) ?? '').split(' ');
      t.is(readBack, written, `region ${key} reads back what was written`);
      const host = createHash('md5').update(fs.readFileSync(image).subarray(offset, offset + (4 << 20))).digest('hex');
      t.is(host, written ?? '', `region ${key} is in the image`);
    }
  } finally {
    t.is(await daemon.stop(), 0, daemon.stderr());
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
