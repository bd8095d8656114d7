/**
 * vhost-user-scsi in a real guest (QEMU TCG, the Linux virtio_scsi and sd drivers): four LUNs on two
 * targets behind one controller with two request queues; the guest finds each disk at its address
 * with the right size, block size and write protection, writes pseudo-random data that reads back
 * after dropping its caches and matches the host file, discards a range (zeroes in the file), and a
 * read-only LUN refuses writes. One boot.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { naaDesignator } from '../../daemons/scsi/target/logical-unit';
import { startDaemon } from '../helpers/daemon';
import { guestTest, runGuestWith } from '../helpers/guest-test';
import { Scrape } from '../helpers/scrape';
import { vhostctl, type VhostctlRun } from '../helpers/vhostctl';

const MiB = 1 << 20;
const WRITES = 16;
const SLOT = 2 * MiB; // each write stays inside its own slot, so none overlap

function md5(bytes: Uint8Array): string {
  return createHash('md5').update(bytes).digest('hex');
}

/** The guest's block device of target:lun ("sda"...), from /sys/class/scsi_disk/H:C:T:L. */
const GUEST_HELPERS = `
disk() { ls /sys/class/scsi_disk/*:0:$1:$2/device/block 2>/dev/null; }
`;

guestTest('4 LUNs on 2 targets, 2 request queues: disks found at their addresses, data integrity, discard, read-only', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-scsi-e2e-'));
  const files = {
    data: path.join(dir, 'data.img'),
    ro: path.join(dir, 'ro.img'),
    big: path.join(dir, 'big.img'),
    other: path.join(dir, 'other.img'),
  };
  fs.writeFileSync(files.data, '');
  fs.truncateSync(files.data, 48 * MiB);
  fs.writeFileSync(files.ro, Buffer.alloc(8 * MiB, 0x5a));
  fs.writeFileSync(files.big, '');
  fs.truncateSync(files.big, 16 * MiB + 1000);
  fs.writeFileSync(files.other, '');
  fs.truncateSync(files.other, 4 * MiB);
  const daemon = await startDaemon('scsi', [
    '--lun', `0=${files.data},discard,serial=E2E-DATA`,
    '--lun', `1=${files.ro},ro`,
    '--lun', `2=${files.big},block-size=4096`,
    '--lun', `3:7=${files.other}`,
    '--num-queues', '2',
    '--metrics', '0',
  ]);
  try {
    const { result, why } = await runGuestWith(t, daemon, {
      qemuArgs: ['-smp', '2', '-chardev', `socket,id=scsi0,path=${daemon.socketPath}`, '-device', 'vhost-user-scsi-pci,chardev=scsi0,num_queues=2'],
      timeoutMs: 180_000,
      script: [
        GUEST_HELPERS,
        "wait_for 60 sh -c '[ \"$(ls /sys/class/scsi_disk | wc -l)\" -ge 4 ]'",
        'mark disks "$(ls /sys/class/scsi_disk | wc -l)"',
        'for a in 0:0 0:1 0:2 3:7; do d=$(disk ${a%:*} ${a#*:}); mark "lun_$a" "$d $(blockdev --getsize64 /dev/$d) $(cat /sys/block/$d/queue/logical_block_size) $(blockdev --getro /dev/$d)"; done',
        'D=$(disk 0 0); R=$(disk 0 1); B=$(disk 0 2); O=$(disk 3 7)',
        'mark wwid "$(cat /sys/block/$D/device/wwid)"',
        'mark vpd83 "$(od -An -tx1 /sys/block/$D/device/vpd_pg83 | tr -d \' \\n\')"',
        'mark cache "$(cat /sys/class/scsi_disk/*:0:0:0/cache_type)"',
        'mark discard_max "$(cat /sys/block/$D/queue/discard_max_bytes)"',
        // Pseudo-random writes 512 B .. 1 MiB, each in its own slot, read back after dropping caches.
        `seed=4242; i=0; : > /tmp/log
while [ $i -lt ${WRITES} ]; do
  seed=$(( (seed * 1103515245 + 12345) % 2147483648 )); sectors=$(( 1 + seed % 2048 ))
  seed=$(( (seed * 1103515245 + 12345) % 2147483648 )); start=$(( i * ${SLOT / 512} + seed % (${SLOT / 512} - sectors) ))
  dd if=/dev/urandom of=/tmp/chunk bs=512 count=$sectors 2>/dev/null
  sum=$(md5sum < /tmp/chunk | cut -d' ' -f1)
  dd if=/tmp/chunk of=/dev/$D bs=512 seek=$start count=$sectors conv=notrunc 2>/dev/null || echo "write $i failed"
  echo "$start $sectors $sum" >> /tmp/log
  i=$(( i + 1 ))
done`,
        'section sync sync',
        'echo 3 > /proc/sys/vm/drop_caches',
        `while read start sectors sum; do mark chunk "$start $sectors $sum $(dd if=/dev/$D bs=512 skip=$start count=$sectors 2>/dev/null | md5sum | cut -d' ' -f1)"; done < /tmp/log`,
        // Discard 1 MiB at 40 MiB after filling it.
        `dd if=/dev/urandom of=/dev/$D bs=65536 seek=${(40 * MiB) / 65536} count=16 conv=fsync 2>/dev/null`,
        `section discard blkdiscard -o ${40 * MiB} -l ${MiB} /dev/$D`,
        // Read-only LUN: writes refused, content intact.
        'section rowrite dd if=/dev/zero of=/dev/$R bs=4096 count=1 conv=notrunc,fsync',
        'echo 3 > /proc/sys/vm/drop_caches',
        'mark ro_first "$(dd if=/dev/$R bs=1 count=4 2>/dev/null | od -An -tx1 | tr -d " ")"',
        // 4096-byte blocks and the LUN on target 3: a round trip each.
        'dd if=/dev/urandom of=/tmp/b bs=4096 count=3 2>/dev/null; mark big_sum "$(md5sum < /tmp/b | cut -d" " -f1)"',
        'dd if=/tmp/b of=/dev/$B bs=4096 seek=100 conv=notrunc,fsync 2>/dev/null; mark big_write $?',
        'dd if=/tmp/b of=/dev/$O bs=4096 seek=10 conv=notrunc,fsync 2>/dev/null; mark other_write $?',
      ].join('\n'),
    });
    t.is(result.mark('disks'), '4', why);
    const lun = (a: string) => result.mark(`lun_${a}`)?.split(' ') ?? [];
    t.deepEqual(lun('0:0').slice(1), [String(48 * MiB), '512', '0'], why);
    t.deepEqual(lun('0:1').slice(1), [String(8 * MiB), '512', '1'], why);
    t.deepEqual(lun('0:2').slice(1), [String(16 * MiB), '4096', '0'], 'whole 4096-byte blocks only');
    t.deepEqual(lun('3:7').slice(1), [String(4 * MiB), '512', '0'], why);
    // Linux picks the T10 vendor designator for wwid (it ranks a locally assigned NAA below it); the
    // NAA designator, stable per unit, is in the page it read.
    t.is(result.mark('wwid'), 't10.VHOSTD  E2E-DATA', why);
    t.true((result.mark('vpd83') ?? '').includes(`01030008${Buffer.from(naaDesignator('serial:E2E-DATA')).toString('hex')}`), why);
    t.is(result.mark('cache'), 'write back', why);
    t.true(Number(result.mark('discard_max')) > 0, why);

    const chunks = result.marks('chunk').map((line) => line.split(' '));
    t.is(chunks.length, WRITES, why);
    const data = fs.readFileSync(files.data);
    for (const [start, sectors, written, read] of chunks) {
      t.is(read, written, `chunk at sector ${start} (${sectors} sectors) read back differently`);
      const at = Number(start) * 512;
      t.is(md5(data.subarray(at, at + Number(sectors) * 512)), written ?? '', `host file differs at sector ${start}`);
    }
    t.is(result.section('sync')?.status, 0, why);
    t.is(result.section('discard')?.status, 0, result.section('discard')?.output);
    t.true(data.subarray(40 * MiB, 41 * MiB).every((b) => b === 0), 'the discarded range is zero in the file');

    t.not(result.section('rowrite')?.status, 0, result.section('rowrite')?.output);
    t.is(result.mark('ro_first'), '5a5a5a5a', why);
    t.true(fs.readFileSync(files.ro).every((b) => b === 0x5a), 'the read-only image is untouched');

    t.is(result.mark('big_write'), '0', why);
    t.is(md5(fs.readFileSync(files.big).subarray(100 * 4096, 103 * 4096)), result.mark('big_sum') ?? '', 'the 4096-byte LUN has the data');
    t.is(result.mark('other_write'), '0', why);
    t.is(md5(fs.readFileSync(files.other).subarray(10 * 4096, 13 * 4096)), result.mark('big_sum') ?? '', 'the LUN on target 3 has the data');

    const port = /metrics on http:\/\/127\.0\.0\.1:(\d+)/.exec(daemon.stderr())?.[1];
    const metrics = Scrape.fromText(await (await fetch(`http://127.0.0.1:${port}/metrics`)).text());
    t.true(metrics.sum('vhostd_scsi_commands_total', { command: 'inquiry' }) >= 4, metrics.text);
    t.true(metrics.sum('vhostd_scsi_commands_total', { command: 'unmap' }) >= 1, metrics.text);
    t.true(metrics.sum('vhostd_scsi_check_conditions_total', { sense_key: 'data_protect' }) + metrics.sum('vhostd_scsi_commands_total', { command: 'mode_sense' }) >= 1, metrics.text);
    t.is(metrics.value('vhostd_scsi_logical_units'), 4, metrics.text);
  } finally {
    t.is(await daemon.stop(), 0, `daemon exit on SIGTERM; stderr: ${daemon.stderr()}`);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

guestTest('while the guest runs: write-through by MODE SELECT, lun-add, lun-resize and lun-remove seen by the guest', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-scsi-e2e-'));
  const base = path.join(dir, 'base.img');
  const hot = path.join(dir, 'hot.img');
  fs.writeFileSync(base, '');
  fs.truncateSync(base, 8 * MiB);
  fs.writeFileSync(hot, '');
  fs.truncateSync(hot, 4 * MiB);
  const control = path.join(dir, 'control.sock');
  const daemon = await startDaemon('scsi', ['--lun', `0=${base}`, '--control', control]);
  const operator: Promise<VhostctlRun>[] = [];
  const act: Record<string, () => Promise<VhostctlRun>> = {
    add: () => vhostctl('--control', control, '--json', 'call', 'lun-add', JSON.stringify({ spec: `0:5=${hot},serial=HOT5` })),
    resize: () => {
      fs.truncateSync(hot, 12 * MiB);
      return vhostctl('--control', control, '--json', 'call', 'lun-resize', JSON.stringify({ lun: '0:5' }));
    },
    remove: () => vhostctl('--control', control, '--json', 'call', 'lun-remove', JSON.stringify({ lun: '0:5' })),
  };
  try {
    const { result, why } = await runGuestWith(t, daemon, {
      qemuArgs: ['-chardev', `socket,id=scsi0,path=${daemon.socketPath}`, '-device', 'vhost-user-scsi-pci,chardev=scsi0'],
      timeoutMs: 180_000,
      onConsoleLine: (line) => {
        const step = /VHOSTD-MARK operator=(\w+)/.exec(line)?.[1];
        if (step !== undefined && act[step] !== undefined) operator.push(act[step]!());
      },
      script: [
        GUEST_HELPERS,
        "wait_for 60 sh -c 'ls -d /sys/class/scsi_disk/*:0:0:0 >/dev/null 2>&1'",
        "C=$(ls -d /sys/class/scsi_disk/*:0:0:0)",
        'section wt sh -c "echo \'write through\' > $C/cache_type"',
        'mark cache "$(cat $C/cache_type)"',
        'mark operator add',
        "wait_for 60 sh -c 'ls /sys/class/scsi_disk/*:0:0:5/device/block >/dev/null 2>&1' && H=$(disk 0 5)",
        'mark added "$H $(blockdev --getsize64 /dev/$H) $(cat /sys/block/$H/device/vpd_pg80 | tail -c 4)"',
        'dd if=/dev/urandom of=/tmp/h bs=4096 count=4 2>/dev/null; mark hot_sum "$(md5sum < /tmp/h | cut -d" " -f1)"',
        'dd if=/tmp/h of=/dev/$H bs=4096 seek=8 conv=notrunc,fsync 2>/dev/null; mark hot_write $?',
        'mark operator resize',
        `wait_for 60 sh -c '[ "$(blockdev --getsize64 /dev/'$H')" -gt ${4 * MiB} ]'; mark resized "$(blockdev --getsize64 /dev/$H)"`,
        'mark operator remove',
        "wait_for 60 sh -c '! ls -d /sys/class/scsi_disk/*:0:0:5 >/dev/null 2>&1' && mark removed yes",
      ].join('\n'),
    });
    t.is(result.section('wt')?.status, 0, result.section('wt')?.output);
    t.is(result.mark('cache'), 'write through', why);
    const runs = await Promise.all(operator);
    t.is(runs.length, 3, why);
    for (const run of runs) t.is(run.status, 0, run.stderr);
    t.like(JSON.parse(runs[0]!.stdout) as object, { lun: '0:5', event: 'sent' });
    t.deepEqual(result.mark('added')?.split(' ').slice(1), [String(4 * MiB), 'HOT5'], why);
    t.is(result.mark('hot_write'), '0', why);
    t.is(md5(fs.readFileSync(hot).subarray(8 * 4096, 12 * 4096)), result.mark('hot_sum') ?? '', 'the hot-added unit has the data');
    t.is(result.mark('resized'), String(12 * MiB), why);
    t.is(result.mark('removed'), 'yes', why);
  } finally {
    t.is(await daemon.stop(), 0, `daemon exit on SIGTERM; stderr: ${daemon.stderr()}`);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

guestTest('256 LUNs from a --luns list (flat addressing above 255) appear in the guest and each reads its own data', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-scsi-e2e-'));
  const luns = [...Array.from({ length: 200 }, (_, i) => i), ...Array.from({ length: 56 }, (_, i) => 300 + i)];
  const list = luns.map((lun) => {
    const file = path.join(dir, `lun${lun}.img`);
    fs.writeFileSync(file, `LUN${String(lun).padStart(5, '0')}`);
    fs.truncateSync(file, 64 * 1024);
    return { lun, file, readOnly: lun % 2 === 1 };
  });
  const listFile = path.join(dir, 'luns.json');
  fs.writeFileSync(listFile, JSON.stringify(list));
  const daemon = await startDaemon('scsi', ['--luns', listFile, '--num-queues', '2']);
  try {
    const { result, why } = await runGuestWith(t, daemon, {
      qemuArgs: ['-smp', '2', '-chardev', `socket,id=scsi0,path=${daemon.socketPath}`, '-device', 'vhost-user-scsi-pci,chardev=scsi0,num_queues=2'],
      timeoutMs: 300_000,
      script: [
        `wait_for 240 sh -c '[ "$(ls /sys/class/scsi_disk | wc -l)" -ge ${luns.length} ]'`,
        'mark disks "$(ls /sys/class/scsi_disk | wc -l)"',
        `ok=0; bad=""
for d in /sys/class/scsi_disk/*; do
  lun=\${d##*:}; b=$(ls $d/device/block)
  # Linux numbers a LUN from its REPORT LUNS entry bytes: flat space addressing (40h) stays in it.
  [ $lun -ge 16384 ] && lun=$((lun - 16384))
  got=$(dd if=/dev/$b bs=512 count=1 2>/dev/null | head -c 8)
  if [ "$got" = "$(printf 'LUN%05d' $lun)" ]; then ok=$((ok + 1)); else bad="$bad $lun"; fi
done
mark read_ok "$ok"
mark read_bad "$bad"`,
        'mark max_lun "$(ls /sys/class/scsi_disk | sed "s/.*://" | sort -n | tail -1)"',
      ].join('\n'),
    }, 30);
    t.is(result.mark('disks'), String(luns.length), why);
    t.is(result.mark('read_ok'), String(luns.length), `LUNs that read another unit's data: ${result.mark('read_bad')}`);
    t.is(result.mark('max_lun'), String(0x4000 + 355), 'LUN 355, in flat space addressing as Linux numbers it');
  } finally {
    t.is(await daemon.stop(), 0, `daemon exit on SIGTERM; stderr: ${daemon.stderr().slice(-2000)}`);
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
