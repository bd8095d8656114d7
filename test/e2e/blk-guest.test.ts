/**
 * vhost-user-blk in a real guest (QEMU TCG, the Linux virtio-blk driver): size, data integrity over
 * many offsets and sizes after dropping the guest's caches (checked against the host file too), sync,
 * the number of hardware queues, discard, a read-only device, packed rings, and a resize the guest sees
 * without rebooting. Two boots in all.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { guestTest } from '../helpers/guest-test';
import { runGuest } from '../helpers/qemu-guest';
import { Scrape } from '../helpers/scrape';

const MiB = 1 << 20;

/** An image of `size` bytes (zeroes, or `fill`) in a new directory under `parent`. */
function tempImage(size: number, fill?: number, parent = os.tmpdir()): string {
  const dir = fs.mkdtempSync(path.join(parent, 'vhostd-blk-e2e-'));
  const file = path.join(dir, 'disk.img');
  if (fill === undefined) {
    fs.writeFileSync(file, '');
    fs.truncateSync(file, size);
  } else {
    fs.writeFileSync(file, Buffer.alloc(size, fill));
  }
  return file;
}

function blkDevice(id: string, socketPath: string, extra = ''): string[] {
  return ['-chardev', `socket,id=${id},path=${socketPath}`, '-device', `vhost-user-blk-pci,chardev=${id}${extra}`];
}

function md5(bytes: Uint8Array): string {
  return createHash('md5').update(bytes).digest('hex');
}

const WRITES = 32;
const SLOT = 2 * MiB; // each write stays inside its own 2 MiB slot, so none overlap

/**
 * The guest writes WRITES chunks of random data (512 B to 1 MiB, pseudo-random sizes and offsets from
 * an LCG) with dd, syncs, drops its caches, reads every chunk back and prints `offset sectors md5-written
 * md5-read` lines.
 */
const integrityScript = `
seed=12345
i=0
: > /tmp/log
while [ $i -lt ${WRITES} ]; do
  seed=$(( (seed * 1103515245 + 12345) % 2147483648 ))
  sectors=$(( 1 + seed % 2048 ))
  seed=$(( (seed * 1103515245 + 12345) % 2147483648 ))
  start=$(( i * ${SLOT / 512} + seed % (${SLOT / 512} - sectors) ))
  dd if=/dev/urandom of=/tmp/chunk bs=512 count=$sectors 2>/dev/null
  sum=$(md5sum < /tmp/chunk | cut -d' ' -f1)
  dd if=/tmp/chunk of=/dev/vda bs=512 seek=$start count=$sectors conv=notrunc 2>/dev/null || echo "write $i failed"
  echo "$start $sectors $sum" >> /tmp/log
  i=$(( i + 1 ))
done
rm -f /tmp/chunk
section sync sync
echo 3 > /proc/sys/vm/drop_caches
while read start sectors sum; do
  back=$(dd if=/dev/vda bs=512 skip=$start count=$sectors 2>/dev/null | md5sum | cut -d' ' -f1)
  mark chunk "$start $sectors $sum $back"
done < /tmp/log
`;

guestTest('split ring, 2 queues: size, queues, data integrity after dropping caches, sync, discard', async (t) => {
  const size = 96 * MiB;
  const file = tempImage(size);
  const daemon = await startDaemon('blk', ['--file', file, '--num-queues', '2', '--discard', '--write-zeroes', '--serial', 'e2e-disk-0', '--metrics', '0']);
  try {
    const result = await runGuest({
      // Linux uses at most one queue per CPU: two vCPUs, so both queues are live.
      qemuArgs: ['-smp', '2', ...blkDevice('blk0', daemon.socketPath, ',num-queues=2')],
      timeoutMs: 150_000,
      script: [
        'mark size "$(blockdev --getsize64 /dev/vda)"',
        'mark queues "$(ls /sys/block/vda/mq | wc -l)"',
        'mark serial "$(cat /sys/block/vda/serial)"',
        'mark discard_max "$(cat /sys/block/vda/queue/discard_max_bytes)"',
        integrityScript,
        // Discard: fill 1 MiB at 80 MiB with data, discard it, read zeroes back from the device.
        `dd if=/dev/urandom of=/dev/vda bs=65536 seek=${(80 * MiB) / 65536} count=16 2>/dev/null`,
        'sync',
        `section discard blkdiscard -o ${80 * MiB} -l ${MiB} /dev/vda`,
        'echo 3 > /proc/sys/vm/drop_caches',
        `mark discarded "$(dd if=/dev/vda bs=65536 skip=${(80 * MiB) / 65536} count=16 2>/dev/null | md5sum | cut -d' ' -f1)"`,
        `mark zeroes "$(dd if=/dev/zero bs=65536 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"`,
      ].join('\n'),
    });
    const why = result.tail(30);
    t.is(result.exitStatus, 0, why);
    t.log(`boot ${result.bootMs ?? '?'} ms, run ${result.durationMs} ms`);
    t.is(Number(result.mark('size')), size, why);
    t.is(Number(result.mark('queues')), 2, why);
    t.is(result.mark('serial'), 'e2e-disk-0', why);
    t.true(Number(result.mark('discard_max')) > 0, why);

    const chunks = result.marks('chunk').map((line) => line.split(' '));
    t.is(chunks.length, WRITES, why);
    const image = fs.readFileSync(file);
    const sizes = new Set<number>();
    for (const [start, sectors, written, read] of chunks) {
      t.is(read, written, `chunk at sector ${start} (${sectors} sectors) read back differently`);
      const at = Number(start) * 512;
      t.is(md5(image.subarray(at, at + Number(sectors) * 512)), written ?? '', `host file differs at sector ${start}`);
      sizes.add(Number(sectors));
    }
    t.true(Math.max(...sizes) > 1024 && Math.min(...sizes) < 256, `sizes span small and large writes: ${[...sizes].join(',')}`);
    t.is(result.section('sync')?.status, 0, why);

    t.is(result.section('discard')?.status, 0, result.section('discard')?.output);
    t.is(result.mark('discarded'), result.mark('zeroes'), why);
    t.true(image.subarray(80 * MiB, 81 * MiB).every((b) => b === 0), 'the discarded range is zero in the file');

    // The operator sees the same traffic in the metrics.
    const port = /metrics on http:\/\/127\.0\.0\.1:(\d+)/.exec(daemon.stderr())?.[1];
    const metrics = Scrape.fromText(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text());
    t.is(metrics.value('vhostd_blk_capacity_bytes'), size, metrics.text);
    t.true(metrics.sum('vhostd_blk_requests_total', { type: 'discard' }) >= 1, metrics.text);
    t.true(metrics.sum('vhostd_blk_written_bytes_total') >= 16 * 65536, metrics.text);
  } finally {
    const code = await daemon.stop();
    t.is(code, 0, `daemon exit on SIGTERM; stderr: ${daemon.stderr()}`);
    fs.rmSync(path.dirname(file), { recursive: true, force: true });
  }
});

guestTest('packed ring on a tmpfs image (inline I/O), a read-only device refuses writes, and a grown image is seen live', async (t) => {
  // On tmpfs every read and write of vda runs inline (daemons/blk/README.md "Inline I/O").
  const rwFile = tempImage(16 * MiB, undefined, '/dev/shm');
  const roFile = tempImage(8 * MiB, 0x5a);
  const rw = await startDaemon('blk', ['--file', rwFile, '--metrics', '0']);
  let ro: RunningDaemon | undefined;
  try {
    ro = await startDaemon('blk', ['--file', roFile, '--read-only']);
    let resized = false;
    const result = await runGuest({
      qemuArgs: [...blkDevice('blk0', rw.socketPath, ',packed=on'), ...blkDevice('blk1', ro.socketPath)],
      timeoutMs: 120_000,
      onConsoleLine: (line) => {
        // The guest is waiting: grow the image and tell the daemon (SIGHUP), as an operator would.
        if (!resized && line.includes('VHOSTD-MARK resize=now')) {
          resized = true;
          fs.truncateSync(rwFile, 32 * MiB);
          rw.process.kill('SIGHUP');
        }
      },
      script: [
        // Packed ring on vda: a 4 MiB round trip through the device.
        'dd if=/dev/urandom of=/tmp/data bs=65536 count=64 2>/dev/null',
        'dd if=/tmp/data of=/dev/vda bs=65536 seek=16 conv=notrunc 2>/dev/null',
        'sync; echo 3 > /proc/sys/vm/drop_caches',
        'mark packed_written "$(md5sum < /tmp/data | cut -d" " -f1)"',
        'mark packed_read "$(dd if=/dev/vda bs=65536 skip=16 count=64 2>/dev/null | md5sum | cut -d" " -f1)"',
        // Read-only vdb: the kernel knows, writes fail, the content reads back.
        'mark ro "$(blockdev --getro /dev/vdb)"',
        'section rowrite dd if=/dev/zero of=/dev/vdb bs=4096 count=1 conv=notrunc,fsync',
        'mark ro_first "$(dd if=/dev/vdb bs=1 count=4 2>/dev/null | od -An -tx1 | tr -d " ")"',
        // Resize: the host grows vda while the guest waits for the new size.
        'mark size_before "$(cat /sys/block/vda/size)"',
        'mark resize now',
        'wait_for 20 sh -c \'[ "$(cat /sys/block/vda/size)" -gt 32768 ]\' && mark size_after "$(cat /sys/block/vda/size)"',
        'dd if=/dev/urandom of=/tmp/tail bs=4096 count=1 2>/dev/null',
        'dd if=/tmp/tail of=/dev/vda bs=4096 seek=6144 conv=notrunc,fsync 2>/dev/null; mark tail_write "$?"',
      ].join('\n'),
    });
    const why = result.tail(30);
    t.is(result.exitStatus, 0, why);
    t.log(`boot ${result.bootMs ?? '?'} ms, run ${result.durationMs} ms`);
    t.truthy(result.mark('packed_written'), why);
    t.is(result.mark('packed_read'), result.mark('packed_written'), why);
    t.is(md5(fs.readFileSync(rwFile).subarray(MiB, 5 * MiB)), result.mark('packed_written') ?? '', 'host file matches what the guest wrote');

    t.is(result.mark('ro'), '1', why);
    t.not(result.section('rowrite')?.status, 0, result.section('rowrite')?.output);
    t.is(result.mark('ro_first'), '5a5a5a5a', why);
    t.true(fs.readFileSync(roFile).every((b) => b === 0x5a), 'the read-only image is untouched');

    t.is(result.mark('size_before'), String((16 * MiB) / 512), why);
    t.is(result.mark('size_after'), String((32 * MiB) / 512), why);
    t.is(result.mark('tail_write'), '0', why);

    const port = /metrics on http:\/\/127\.0\.0\.1:(\d+)/.exec(rw.stderr())?.[1];
    const metrics = Scrape.fromText(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text());
    t.true(metrics.sum('vhostd_blk_inline_ops_total') > 0, metrics.text);
    t.is(metrics.sum('vhostd_blk_inline_fallbacks_total'), 0, metrics.text);
  } finally {
    t.is(await rw.stop(), 0, rw.stderr());
    if (ro !== undefined) t.is(await ro.stop(), 0, ro.stderr());
    fs.rmSync(path.dirname(rwFile), { recursive: true, force: true });
    fs.rmSync(path.dirname(roFile), { recursive: true, force: true });
  }
});
