/**
 * 2 MiB huge pages for a test: some reserved in the kernel's pool (/proc/sys/vm/nr_hugepages) and a
 * private hugetlbfs mount limited to them, so that guest memory can live on hugetlbfs. Both are put
 * back by {@link HugePages.close}: the mount goes, nr_hugepages returns to its value before (less
 * what this reservation added, should another process have changed it meanwhile).
 *
 * The mount's statfs counts what the test's files hold: its `bfree` is the mount's huge pages neither
 * allocated nor reserved (hugetlbfs counts a page of a mapped file as used from mmap on, faulted in or
 * not). A huge page punched out of a file therefore shows up there exactly, and no other user of the
 * machine's huge pages disturbs the count (unlike HugePages_Free in /proc/meminfo, which is global).
 */
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export const HUGE_PAGE_SIZE = 2 << 20;

const NR_HUGEPAGES = '/proc/sys/vm/nr_hugepages';
/** The pool of 2 MiB pages: free_hugepages and resv_hugepages, whatever the default huge page size. */
const POOL = '/sys/kernel/mm/hugepages/hugepages-2048kB';

/**
 * Why this machine cannot give a test huge pages on a hugetlbfs of its own, or undefined when it can
 * (it does not reserve anything: whether the kernel finds the pages shows in {@link reserveHugePages}).
 */
export function hugePagesUnavailable(): string | undefined {
  if (os.platform() !== 'linux') return 'huge pages need Linux';
  if (!fs.existsSync(POOL)) return `the kernel has no 2 MiB huge pages (${POOL} is missing)`;
  if (!/\thugetlbfs$/m.test(fs.readFileSync('/proc/filesystems', 'utf8'))) return 'the kernel has no hugetlbfs';
  try {
    fs.accessSync(NR_HUGEPAGES, fs.constants.W_OK);
  } catch {
    return `reserving huge pages needs root (${NR_HUGEPAGES} is not writable)`;
  }
  if (process.getuid?.() !== 0) return 'mounting a hugetlbfs needs root';
  return undefined;
}

export interface HugePages {
  /** The private hugetlbfs mount point: files here are backed by the reserved huge pages. */
  readonly mount: string;
  /** Huge pages of the mount neither allocated nor reserved by a mapping (statfs f_bfree). */
  free(): number;
  /** Unmount, remove the mount point and give the reservation back (nr_hugepages as it was). */
  close(): void;
}

function run(command: string, args: string[]): void {
  const r = spawnSync(command, args, { encoding: 'utf8' });
  if (r.error !== undefined) throw new Error(`${command}: ${r.error.message}`);
  if (r.status !== 0) throw new Error(`${command} ${args.join(' ')}: ${r.stderr.trim()}`);
}

function readNumber(file: string): number {
  return Number(fs.readFileSync(file, 'utf8').trim());
}

/**
 * Reserve `count` more 2 MiB pages in the kernel's pool and mount a hugetlbfs of exactly `count`
 * pages at a fresh directory named after `name` and this process. Throws, with everything put back,
 * when the kernel cannot find the pages (memory too fragmented or too small) or the mount fails.
 */
export function reserveHugePages(count: number, name: string): HugePages {
  const previous = readNumber(NR_HUGEPAGES);
  const available = (): number => readNumber(path.join(POOL, 'free_hugepages')) - readNumber(path.join(POOL, 'resv_hugepages'));
  fs.writeFileSync(NR_HUGEPAGES, String(previous + count));
  // The kernel may find fewer. Giving back subtracts what was added from the pool as it is then, so
  // that tests of other processes reserving meanwhile get their own pages back too.
  const added = readNumber(NR_HUGEPAGES) - previous;
  const restore = (): void => fs.writeFileSync(NR_HUGEPAGES, String(Math.max(0, readNumber(NR_HUGEPAGES) - added)));
  if (available() < count) {
    const got = available();
    restore();
    throw new Error(`the kernel has ${got} of the ${count} free 2 MiB huge pages asked for (nr_hugepages ${previous} + ${count}): not enough contiguous free memory`);
  }
  let mount: string;
  try {
    mount = fs.mkdtempSync(path.join(os.tmpdir(), `vhostd-hugetlbfs-${name}-${process.pid}-`));
  } catch (err) {
    restore();
    throw err;
  }
  try {
    run('mount', ['-t', 'hugetlbfs', '-o', `pagesize=2M,size=${count * HUGE_PAGE_SIZE},mode=0700`, `vhostd-${name}`, mount]);
  } catch (err) {
    fs.rmdirSync(mount);
    restore();
    throw err;
  }
  let closed = false;
  return {
    mount,
    free: () => Number(fs.statfsSync(mount).bfree),
    close: () => {
      if (closed) return;
      closed = true;
      try {
        run('umount', [mount]);
        fs.rmdirSync(mount);
      } finally {
        restore();
      }
    },
  };
}
