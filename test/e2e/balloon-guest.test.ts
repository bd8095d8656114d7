/**
 * The balloon under a real guest: QEMU 10.2's vhost-user-test-device-pci (virtio-id 5) in front of
 * vhost-user-balloon, Linux's virtio_balloon driver in a 512 MiB guest. `vhostctl set-target` asks
 * for 256 MiB; the guest inflates, its MemTotal drops, the daemon punches the pages out of the guest's
 * memfd (its allocated size and QEMU's resident shared memory drop) and the guest reports `actual`;
 * the guest's statistics arrive as metrics; the target goes back to 0 and the guest uses that memory
 * again. With free page reporting, memory a guest process frees goes back to the host without any
 * target. With guest RAM on a private hugetlbfs, exactly the huge pages wholly in the balloon go back.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import type { ExecutionContext } from 'ava';

import { startDaemon, type RunningDaemon } from '../helpers/daemon';
import { guestTest } from '../helpers/guest-test';
import { HUGE_PAGE_SIZE, hugePagesUnavailable, reserveHugePages } from '../helpers/hugepages';
import { qemu102, runGuest } from '../helpers/qemu-guest';
import { vhostctl } from '../helpers/vhostctl';

const MiB = 1 << 20;
const TARGET = 256 * MiB;

/** Bytes allocated by the guest memory memfd(s) the daemon holds (its /proc fds, deduplicated by inode). */
function memfdAllocated(pid: number): number {
  const dir = `/proc/${pid}/fd`;
  const seen = new Map<bigint, number>();
  for (const fd of fs.readdirSync(dir)) {
    const link = fs.readlinkSync(path.join(dir, fd), { encoding: 'utf8' });
    if (!link.startsWith('/memfd:')) continue;
    const st = fs.statSync(path.join(dir, fd), { bigint: true });
    seen.set(st.ino, Number(st.blocks) * 512);
  }
  if (seen.size === 0) throw new Error(`daemon ${pid} holds no memfd`);
  return [...seen.values()].reduce((a, b) => a + b, 0);
}

/** QEMU's pid: the process whose command line names the daemon's socket. */
function qemuPid(socketPath: string): number {
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry) || Number(entry) === process.pid) continue;
    let cmdline: string[];
    try {
      cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, 'utf8').split('\0');
    } catch {
      continue; // a process that ended meanwhile
    }
    if (cmdline.some((arg) => arg.includes('vhost-user-test-device-pci')) && cmdline.some((arg) => arg.includes(socketPath))) return Number(entry);
  }
  throw new Error(`no QEMU runs with ${socketPath}`);
}

/** The shared memory QEMU has resident (RssShmem: the guest RAM it touched, in the memfd). */
function qemuRssShmem(pid: number): number {
  const kib = /RssShmem:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
  if (kib === undefined) throw new Error(`no RssShmem in /proc/${pid}/status`);
  return Number(kib) * 1024;
}

/** HugePages_Free and HugePages_Rsvd of /proc/meminfo (the whole machine's, for the log). */
function meminfoHugePages(): string {
  const meminfo = fs.readFileSync('/proc/meminfo', 'utf8');
  return ['HugePages_Free', 'HugePages_Rsvd'].map((key) => `${key} ${new RegExp(`${key}:\\s+(\\d+)`).exec(meminfo)?.[1]}`).join(', ');
}

interface BalloonState {
  targetPages: number;
  actualPages: number;
  balloonPages: number;
  partialHugePages: number;
  unreleasedPages: number;
  releasedBytes: { inflate: number; reporting: number };
  guestStats: Record<string, number>;
}

async function balloonState(t: ExecutionContext, control: string): Promise<BalloonState> {
  const run = await vhostctl('--control', control, '--json', 'status');
  t.is(run.status, 0, run.stderr);
  return (JSON.parse(run.stdout) as { state: BalloonState }).state;
}

/**
 * The balloon state once the guest reports `pages` as its balloon (or after two minutes): the driver
 * writes `actual` only after the device used its last buffer, so every release has been counted.
 */
async function settledState(t: ExecutionContext, control: string, pages: number): Promise<BalloonState> {
  const deadline = Date.now() + 120_000;
  for (;;) {
    const state = await balloonState(t, control);
    if (state.actualPages === pages || Date.now() > deadline) return state;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

function qemuDevice(socketPath: string, numVqs: number): string[] {
  return ['-chardev', `socket,id=bal0,path=${socketPath}`, '-device', `vhost-user-test-device-pci,chardev=bal0,virtio-id=5,num_vqs=${numVqs},config_size=8`];
}

/** Shell functions of the guest scripts: MemTotal in KiB, and whether it went below or back to $before. */
const GUEST_FUNCTIONS = [
  "memtotal() { awk '/MemTotal/ { print $2 }' /proc/meminfo; }",
  'shrunk_by() { [ "$(memtotal)" -le $(( before - $1 )) ]; }',
  'grown_back() { [ "$(memtotal)" -ge "$before" ]; }',
].join('\n');

async function withDaemon(t: ExecutionContext, args: string[], body: (daemon: RunningDaemon, control: string) => Promise<void>): Promise<void> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-balloon-e2e-'));
  const control = path.join(dir, 'control.sock');
  // The daemon first: this front-end does not wait for a back-end that is not there yet.
  const daemon = await startDaemon('balloon', ['--control', control, ...args]);
  try {
    await body(daemon, control);
  } finally {
    t.is(await daemon.stop(), 0, daemon.stderr());
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function binary(): string {
  const q = qemu102();
  if ('missing' in q) throw new Error(q.missing);
  return q.binary;
}

guestTest(
  'set-target inflates the guest balloon, the memfd shrinks on the host, stats arrive, and the memory comes back',
  async (t) => {
    await withDaemon(t, ['--stats-interval', '1'], async (daemon, control) => {
      const pid = daemon.process.pid!;
      const steps: Promise<void>[] = [];
      let beforeInflate = 0;
      let afterInflate = 0;
      let qemu = 0;
      let qemuBefore = 0;
      let qemuAfter = 0;
      let inflated: BalloonState | undefined;
      let deflated: BalloonState | undefined;
      let freshStats = false;
      const result = await runGuest({
        qemu: binary(),
        memory: '512M',
        qemuArgs: qemuDevice(daemon.socketPath, 3),
        timeoutMs: 240_000,
        onConsoleLine: (line) => {
          if (line.includes('VHOSTD-MARK inflate=now')) {
            beforeInflate = memfdAllocated(pid);
            qemu = qemuPid(daemon.socketPath);
            qemuBefore = qemuRssShmem(qemu);
            steps.push(vhostctl('--control', control, 'set-target', '256M').then((r) => void t.is(r.status, 0, r.stderr)));
          } else if (line.includes('VHOSTD-MARK memtotal_inflated=')) {
            steps.push(
              (async () => {
                afterInflate = memfdAllocated(pid);
                qemuAfter = qemuRssShmem(qemu);
                inflated = await balloonState(t, control);
                const stats = await vhostctl('--control', control, '--json', 'call', 'stats');
                t.is(stats.status, 0, stats.stderr);
                freshStats = (JSON.parse(stats.stdout) as { fresh: boolean }).fresh;
                const r = await vhostctl('--control', control, 'set-target', '0');
                t.is(r.status, 0, r.stderr);
              })(),
            );
          } else if (line.includes('VHOSTD-MARK memtotal_deflated=')) {
            steps.push(balloonState(t, control).then((s) => void (deflated = s)));
          }
        },
        script: [
          GUEST_FUNCTIONS,
          'before=$(memtotal)',
          'mark memtotal_before "$before"',
          'mark bound "$(ls /sys/bus/virtio/drivers/virtio_balloon | grep -c virtio)"',
          // Touch most of the free memory (dd's 320 MiB buffer) and free it again, so that the pages the
          // balloon takes are backed on the host.
          'dd if=/dev/zero of=/dev/null bs=320M count=1 2>/dev/null; mark touched "$?"',
          'mark inflate now',
          `wait_for 120 shrunk_by ${TARGET / 1024} && mark memtotal_inflated "$(memtotal)"`,
          'wait_for 120 grown_back && mark memtotal_deflated "$(memtotal)"',
          // The memory given back is the guest's again: fill 200 MiB of it.
          'dd if=/dev/urandom of=/fill bs=1M count=200 2>/dev/null; mark refill "$?"; rm -f /fill',
        ].join('\n'),
      });
      await Promise.all(steps);
      const why = result.tail(30);
      t.is(result.exitStatus, 0, why);
      t.is(result.mark('bound'), '1', why);
      t.is(result.mark('touched'), '0', why);
      const before = Number(result.mark('memtotal_before'));
      t.true(Number(result.mark('memtotal_inflated')) <= before - TARGET / 1024, why);
      t.true(Number(result.mark('memtotal_deflated')) >= before, why);
      t.is(result.mark('refill'), '0', why);

      t.is(inflated?.targetPages, TARGET / 4096);
      t.is(inflated?.actualPages, TARGET / 4096, 'the guest reported the whole balloon');
      t.is(inflated?.balloonPages, TARGET / 4096);
      t.is(inflated?.releasedBytes.inflate, TARGET, 'every inflated page was released');
      t.log(`memfd allocated: ${beforeInflate / MiB} MiB before the inflate, ${afterInflate / MiB} MiB after`);
      t.true(afterInflate <= beforeInflate - 192 * MiB, `the memfd shrank: ${beforeInflate} -> ${afterInflate} bytes`);
      t.log(`QEMU RssShmem: ${qemuBefore / MiB} MiB before the inflate, ${qemuAfter / MiB} MiB after`);
      t.true(qemuAfter <= qemuBefore - 192 * MiB, `QEMU's resident guest memory shrank: ${qemuBefore} -> ${qemuAfter} bytes`);
      t.is(deflated?.actualPages, 0);
      t.is(deflated?.balloonPages, 0);

      // Statistics arrived (every second) and are metrics.
      const metricsRun = await vhostctl('--control', control, '--json', 'call', 'metrics');
      t.is(metricsRun.status, 0, metricsRun.stderr);
      const metrics = (JSON.parse(metricsRun.stdout) as { metrics: { name: string; values: { value: number }[] }[] }).metrics;
      const total = metrics.find((m) => m.name === 'vhostd_balloon_guest_total_bytes')?.values[0]?.value ?? 0;
      t.true(total > 256 * MiB && total <= 512 * MiB, `guest total memory ${total}`);
      t.true(freshStats, 'fresh statistics on demand (vhostctl call stats) while the guest ran');
    });
  },
  { qemu102: true },
);

guestTest(
  'with free page reporting, memory a guest process frees goes back to the host',
  async (t) => {
    await withDaemon(t, ['--free-page-reporting', '--stats-interval', '0'], async (daemon, control) => {
      const pid = daemon.process.pid!;
      let filled = 0;
      let reported: BalloonState | undefined;
      let afterReport = 0;
      const steps: Promise<void>[] = [];
      const result = await runGuest({
        qemu: binary(),
        memory: '512M',
        qemuArgs: qemuDevice(daemon.socketPath, 4),
        timeoutMs: 240_000,
        onConsoleLine: (line) => {
          if (line.includes('VHOSTD-MARK freed=now')) {
            // Poll until the memfd gave back at least 128 MiB of the 200 MiB freed (the guest waits
            // meanwhile): its first reports cover memory free since boot, the freed file's pages follow.
            steps.push(
              (async () => {
                const deadline = Date.now() + 120_000;
                do {
                  await new Promise((resolve) => setTimeout(resolve, 500));
                  afterReport = memfdAllocated(pid);
                } while (afterReport > filled - 128 * MiB && Date.now() < deadline);
                reported = await balloonState(t, control);
                // Tell the guest it may stop: a one-page balloon lowers its MemTotal.
                const r = await vhostctl('--control', control, 'set-target', '4096');
                t.is(r.status, 0, r.stderr);
              })(),
            );
          } else if (line.includes('VHOSTD-MARK filled=')) {
            filled = memfdAllocated(pid);
          }
        },
        script: [
          GUEST_FUNCTIONS,
          'before=$(memtotal)',
          'dd if=/dev/zero of=/fill bs=1M count=200; mark fill "$?"',
          'mark filled yes',
          'rm /fill',
          'mark freed now',
          // The host watches the reports come in (Linux sends them 2 s after pages are freed), then
          // inflates one page as the signal that it has seen enough.
          'wait_for 180 shrunk_by 4; mark signalled "$?"',
        ].join('\n'),
      });
      await Promise.all(steps);
      t.is(result.exitStatus, 0, result.tail(30));
      t.is(result.mark('signalled'), '0', result.tail(30));
      t.true((reported?.releasedBytes.reporting ?? 0) >= 128 * MiB, `released by reporting: ${reported?.releasedBytes.reporting}`);
      t.is(reported?.releasedBytes.inflate, 0, 'no target was set until the end');
      t.log(`memfd allocated: ${filled / MiB} MiB filled, ${afterReport / MiB} MiB after the reports`);
      t.true(afterReport <= filled - 128 * MiB, `the memfd shrank: ${filled} -> ${afterReport} bytes`);
      t.is(reported?.balloonPages, 0, 'reported pages are not in the balloon');
    });
  },
  { qemu102: true },
);

const HUGE_GUEST_PAGES = 128; // 256 MiB of guest RAM
const HUGE_TARGET = 128 * MiB;

guestTest(
  'on hugetlbfs, the huge pages wholly in the balloon go back to the host, exactly those, and come back after a deflate',
  async (t) => {
    const huge = reserveHugePages(HUGE_GUEST_PAGES, 'balloon-huge');
    t.teardown(() => huge.close());
    await withDaemon(t, ['--stats-interval', '0'], async (daemon, control) => {
      const steps: Promise<void>[] = [];
      let freeBefore = -1;
      let freeInflated = -1;
      let freeRefilled = -1;
      let inflated: BalloonState | undefined;
      let deflated: BalloonState | undefined;
      const result = await runGuest({
        qemu: binary(),
        memory: `${HUGE_GUEST_PAGES * 2}M`,
        memoryFile: path.join(huge.mount, 'guest-ram'),
        qemuArgs: qemuDevice(daemon.socketPath, 3),
        timeoutMs: 300_000,
        onConsoleLine: (line) => {
          if (line.includes('VHOSTD-MARK inflate=now')) {
            freeBefore = huge.free();
            t.log(`before the inflate: ${freeBefore} huge pages free in the mount; ${meminfoHugePages()}`);
            steps.push(vhostctl('--control', control, 'set-target', String(HUGE_TARGET)).then((r) => void t.is(r.status, 0, r.stderr)));
          } else if (line.includes('VHOSTD-MARK memtotal_inflated=')) {
            steps.push(
              (async () => {
                inflated = await settledState(t, control, HUGE_TARGET / 4096);
                freeInflated = huge.free();
                t.log(`inflated: ${freeInflated} huge pages free in the mount; ${meminfoHugePages()}`);
                const r = await vhostctl('--control', control, 'set-target', '0');
                t.is(r.status, 0, r.stderr);
              })(),
            );
          } else if (line.includes('VHOSTD-MARK memtotal_deflated=')) {
            steps.push(settledState(t, control, 0).then((state) => void (deflated = state)));
          } else if (line.includes('VHOSTD-MARK refill=')) {
            freeRefilled = huge.free();
            t.log(`refilled: ${freeRefilled} huge pages free in the mount; ${meminfoHugePages()}`);
          }
        },
        script: [
          GUEST_FUNCTIONS,
          'before=$(memtotal)',
          'mark memtotal_before "$before"',
          // Touch most of the free memory (dd's 120 MiB buffer) and free it again, so that the huge
          // pages the balloon takes are allocated on the host, not only reserved.
          'dd if=/dev/zero of=/dev/null bs=120M count=1 2>/dev/null; mark touched "$?"',
          // Data the guest keeps through the inflate: no page it still uses may be punched.
          'dd if=/dev/urandom of=/keep bs=1M count=16 2>/dev/null; kept=$(md5sum < /keep)',
          'mark inflate now',
          `wait_for 120 shrunk_by ${HUGE_TARGET / 1024} && mark memtotal_inflated "$(memtotal)"`,
          'mark kept "$([ "$(md5sum < /keep)" = "$kept" ] && echo intact || echo changed)"',
          'wait_for 120 grown_back && mark memtotal_deflated "$(memtotal)"',
          // The memory given back is the guest's again: a 120 MiB buffer faults the huge pages back in.
          'dd if=/dev/zero of=/dev/null bs=120M count=1 2>/dev/null; mark refill "$?"',
          'mark kept_after "$([ "$(md5sum < /keep)" = "$kept" ] && echo intact || echo changed)"',
        ].join('\n'),
      });
      await Promise.all(steps);
      const why = result.tail(30);
      t.is(result.exitStatus, 0, why);
      t.is(result.mark('touched'), '0', why);
      const before = Number(result.mark('memtotal_before'));
      t.true(Number(result.mark('memtotal_inflated')) <= before - HUGE_TARGET / 1024, why);
      t.is(result.mark('kept'), 'intact', "the guest's own data survived the inflate");
      t.true(Number(result.mark('memtotal_deflated')) >= before, why);
      t.is(result.mark('refill'), '0', why);
      t.is(result.mark('kept_after'), 'intact');

      t.is(inflated?.actualPages, HUGE_TARGET / 4096, 'the guest reported the whole balloon');
      t.is(inflated?.balloonPages, HUGE_TARGET / 4096);
      const released = inflated?.releasedBytes.inflate ?? 0;
      t.is(released % HUGE_PAGE_SIZE, 0, `only whole huge pages are released: ${released} bytes`);
      const releasedPages = released / HUGE_PAGE_SIZE;
      t.log(`${releasedPages} of the ${HUGE_TARGET / HUGE_PAGE_SIZE} huge pages the balloon could fill were wholly in it and released`);
      // Linux inflates free pages, mostly in whole free blocks: most of the balloon forms whole huge pages.
      t.true(releasedPages >= (HUGE_TARGET / HUGE_PAGE_SIZE) * 0.75, `huge pages released: ${releasedPages}`);
      t.is(freeInflated - freeBefore, releasedPages, 'the hugetlbfs got back exactly the huge pages the daemon released');
      const unreleased = inflated?.unreleasedPages ?? -1;
      t.log(`${inflated?.partialHugePages} huge pages partly in the balloon hold its other ${unreleased} pages`);
      t.is(HUGE_TARGET / 4096 - unreleased, released / 4096, 'each page of the balloon is released in a whole huge page or counted as unreleased');
      t.true((inflated?.partialHugePages ?? 0) * (HUGE_PAGE_SIZE / 4096) > unreleased, 'and those lie in partly inflated huge pages');
      t.deepEqual([deflated?.balloonPages, deflated?.partialHugePages, deflated?.unreleasedPages], [0, 0, 0]);
      t.true(freeRefilled < freeInflated, `the guest uses the deflated memory again: ${freeInflated} -> ${freeRefilled} huge pages free`);
    });
  },
  { qemu102: true, unavailable: hugePagesUnavailable() },
);
