/**
 * vhost-user-scsi seen by the tools an administrator runs in the guest (sg3-utils and lsscsi in the guest
 * image): INQUIRY and its VPD pages, READ CAPACITY(16), TEST UNIT READY, a LOGICAL UNIT RESET by
 * `sg_reset -d` under reading I/O, after which I/O goes on. One boot.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { naaDesignator } from '../../daemons/scsi/target/logical-unit';
import { startDaemon } from '../helpers/daemon';
import { guestTest, runGuestWith } from '../helpers/guest-test';
import { controlMetrics } from '../helpers/vhostctl';

const MiB = 1 << 20;

guestTest('sg_inq, sg_vpd 0x83/0xb0, sg_readcap -l, sg_turs and lsscsi show the LUNs; sg_reset -d completes and I/O goes on', async (t) => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-scsi-sg-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const data = path.join(dir, 'data.img');
  const ro = path.join(dir, 'ro.img');
  fs.writeFileSync(data, '');
  fs.truncateSync(data, 48 * MiB);
  fs.writeFileSync(ro, '');
  fs.truncateSync(ro, 8 * MiB);
  const control = path.join(dir, 'control.sock');
  const daemon = await startDaemon('scsi', ['--lun', `0=${data},discard,serial=SG-DATA`, '--lun', `3=${ro},ro,block-size=4096`, '--control', control]);
  try {
    const { result, why } = await runGuestWith(t, daemon, {
      qemuArgs: ['-chardev', `socket,id=scsi0,path=${daemon.socketPath}`, '-device', 'vhost-user-scsi-pci,chardev=scsi0'],
      timeoutMs: 180_000,
      script: [
        "wait_for 60 sh -c '[ \"$(ls /sys/class/scsi_disk | wc -l)\" -ge 2 ]'",
        'D=/dev/$(ls /sys/class/scsi_disk/*:0:0:0/device/block); R=/dev/$(ls /sys/class/scsi_disk/*:0:0:3/device/block)',
        // By its path: busybox sh would run its own, smaller lsscsi applet (FEATURE_PREFER_APPLETS).
        'section lsscsi /usr/bin/lsscsi',
        'section lsscsi_g /usr/bin/lsscsi -g',
        'section inq sg_inq $D',
        'section vpd83 sg_vpd -p 0x83 $D',
        'section vpd83_ro sg_vpd -p 0x83 $R',
        'section vpdb0 sg_vpd -p 0xb0 $D',
        'section readcap sg_readcap -l $D',
        // The kernel opens a write-protected disk read-only: sg3-utils need -R (--readonly) for it.
        'section readcap_ro_rw sg_readcap -l $R',
        'section readcap_ro sg_readcap -R -l $R',
        'section turs sg_turs -n 20 $D',
        // A LOGICAL UNIT RESET while a reader runs: both finish, nothing fails.
        'dd if=$D of=/dev/null bs=64k 2>/tmp/dd & reader=$!',
        'section reset sg_reset -d $D',
        'wait $reader; mark reader "$? $(tail -n 1 /tmp/dd)"',
        'section turs_after sg_turs $D',
        'dd if=/dev/urandom of=/tmp/chunk bs=4096 count=16 2>/dev/null; mark sum "$(md5sum < /tmp/chunk | cut -d" " -f1)"',
        'dd if=/tmp/chunk of=$D bs=4096 seek=256 conv=notrunc,fsync 2>/dev/null; mark write $?',
        'echo 3 > /proc/sys/vm/drop_caches',
        'mark read "$(dd if=$D bs=4096 skip=256 count=16 2>/dev/null | md5sum | cut -d" " -f1)"',
      ].join('\n'),
    }, 60);
    const out = (name: string) => {
      const s = result.section(name);
      t.is(s?.status, 0, `${name}: ${s?.output ?? 'did not run'}\n${why}`);
      return s?.output ?? '';
    };

    // lsscsi: both units, as disks, with our INQUIRY strings, at their addresses (H:C:T:L).
    const lsscsi = out('lsscsi');
    t.regex(lsscsi, /^\[\d+:0:0:0\]\s+disk\s+VHOSTD\s+VHOSTD SCSI DISK\s+0001\s+\/dev\/sd[a-z]+\s*$/m, lsscsi);
    t.regex(lsscsi, /^\[\d+:0:0:3\]\s+disk\s+VHOSTD\s+VHOSTD SCSI DISK\s+0001\s+\/dev\/sd[a-z]+\s*$/m, lsscsi);
    t.is(lsscsi.trim().split('\n').length, 2, lsscsi);
    t.regex(out('lsscsi_g'), /\/dev\/sd[a-z]+\s+\/dev\/sg\d+/, 'each disk has its sg node');

    // Standard INQUIRY and the serial number (VPD 80h, which sg_inq reads too).
    const inq = out('inq');
    t.regex(inq, /Peripheral device type: disk/, inq);
    t.regex(inq, /Vendor identification: VHOSTD\s*$/m, inq);
    t.regex(inq, /Product identification: VHOSTD SCSI DISK\s*$/m, inq);
    t.regex(inq, /Product revision level: 0001\s*$/m, inq);
    t.regex(inq, /Unit serial number: SG-DATA\s*$/m, inq);

    // Device identification: the NAA id derives from the serial, or from the address and image path when
    // there is none, so it stays the same across daemon restarts; and the T10 vendor id.
    const naaHex = (name: string) => Buffer.from(naaDesignator(name)).toString('hex');
    const vpd83 = out('vpd83');
    // NAA 3h (locally assigned) is the designator's first hex digit.
    t.regex(vpd83, new RegExp(`designator type: NAA,\\s+code set: Binary\\s+0x${naaHex('serial:SG-DATA')}\\s`, 'i'), vpd83);
    t.regex(naaHex('serial:SG-DATA'), /^3/);
    t.regex(vpd83, /vendor id: VHOSTD\s*$/m, vpd83);
    t.regex(vpd83, /vendor specific: SG-DATA\s*$/m, vpd83);
    const vpd83ro = out('vpd83_ro');
    t.true(vpd83ro.toLowerCase().includes(`0x${naaHex(`0:3:${fs.realpathSync(ro)}`)}`), vpd83ro);

    // Block limits: 32 MiB per command, UNMAP limits on the discard LUN.
    const b0 = out('vpdb0');
    t.regex(b0, /Maximum transfer length: 65536 blocks/, b0);
    t.regex(b0, /Maximum unmap LBA count: 2097152\b/, b0);
    t.regex(b0, /Maximum unmap block descriptor count: 32\b/, b0);
    t.regex(b0, /Optimal unmap granularity: 1 blocks?/, b0);

    // READ CAPACITY(16): the image's size in its block size; thin provisioning only with discard.
    const cap = out('readcap');
    t.regex(cap, new RegExp(`Last LBA=${(48 * MiB) / 512 - 1} .*Number of logical blocks=${(48 * MiB) / 512}\\b`), cap);
    t.regex(cap, /Logical block length=512 bytes/, cap);
    t.regex(cap, /lbpme=1/, cap);
    t.regex(cap, new RegExp(`Device size: ${48 * MiB} bytes`), cap);
    const capRo = out('readcap_ro');
    t.regex(capRo, new RegExp(`Number of logical blocks=${(8 * MiB) / 4096}\\b`), capRo);
    t.regex(capRo, /Logical block length=4096 bytes/, capRo);
    t.regex(capRo, /lbpme=0/, capRo);
    t.regex(result.section('readcap_ro_rw')?.output ?? '', /Read-only file system/, 'the write-protected LUN does not open for writing');

    out('turs');
    // The reset completed, the reader finished its whole 48 MiB, and I/O after it reads back what it wrote.
    out('reset');
    t.is(result.mark('reader'), `0 ${(48 * MiB) / 65536}+0 records out`, why);
    out('turs_after');
    t.is(result.mark('write'), '0', why);
    t.is(result.mark('read'), result.mark('sum'), why);
    const written = fs.readFileSync(data).subarray(256 * 4096, 272 * 4096);
    t.is(createHash('md5').update(written).digest('hex'), result.mark('sum') ?? '', 'the image holds what the guest wrote after the reset');

    const metrics = await controlMetrics(control);
    t.true(metrics.sum('vhostd_scsi_task_management_total', { function: 'logical_unit_reset' }) >= 1, metrics.text);
    t.true(metrics.sum('vhostd_scsi_commands_total', { command: 'test_unit_ready' }) >= 21, metrics.text);
  } finally {
    t.is(await daemon.stop(), 0, `daemon exit on SIGTERM; stderr: ${daemon.stderr()}`);
  }
});
