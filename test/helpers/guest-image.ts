/**
 * The guest image of the real-guest (e2e) tests: a Debian kernel and a busybox initramfs with the virtio
 * modules, built once by `scripts/build-guest-image.sh` and cached under `$VHOSTD_CACHE` (default
 * `~/.cache/vhostd`), plus the per-test initramfs that adds a test's script and files to it.
 *
 * A test's files never go into the cached image. Each run copies the base initramfs and appends one more
 * gzip'ed newc cpio archive; the kernel unpacks concatenated archives in order, later entries on top
 * (Linux Documentation/driver-api/early-userspace/buffer-format.rst), so a run costs a 1.5 MB copy, not a
 * rebuild.
 */
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { appendFile, copyFile } from 'node:fs/promises';
import { dirname, join, posix } from 'node:path';
import { gzipSync } from 'node:zlib';

/** A built guest image: absolute paths to what QEMU boots, and what the initramfs loads at boot. */
export interface GuestImage {
  /** Cache directory of this image. */
  readonly dir: string;
  /** Cache key: kernel ABI name, package versions and a hash of the build script. */
  readonly key: string;
  /** Kernel to pass to `-kernel`: an uncompressed ELF vmlinux (PVH boot) or else the bzImage. */
  readonly kernel: string;
  /** The base initramfs (gzip'ed newc cpio), without any test script. */
  readonly initrd: string;
  /** `uname -r` of the guest, e.g. `6.1.0-56-amd64`. */
  readonly kernelVersion: string;
  /** Modules /init inserts, in order, as paths inside the guest. */
  readonly modules: readonly string[];
}

/** A file to place in the guest's root filesystem (a tmpfs: the unpacked initramfs). */
export interface GuestFile {
  /** Absolute path inside the guest. Missing parent directories are created. */
  readonly path: string;
  readonly data: string | Uint8Array;
  /** Permission bits; default 0o644. */
  readonly mode?: number;
}

/** Where /init looks for the test script, and the shell library sourced before it. */
export const GUEST_SCRIPT_PATH = '/vhostd/test.sh';
export const GUEST_LIBRARY_PATH = '/vhostd/lib.sh';

/** The repository root: the nearest directory above this file whose package.json is vhostd's. */
export function repoRoot(): string {
  for (let dir = __dirname; ; dir = dirname(dir)) {
    const manifest = join(dir, 'package.json');
    if (existsSync(manifest) && (JSON.parse(readFileSync(manifest, 'utf8')) as { name?: unknown }).name === 'vhostd') {
      return dir;
    }
    if (dirname(dir) === dir) throw new Error(`no vhostd package.json above ${__dirname}`);
  }
}

/** Reads and checks an image directory's manifest.json. */
export function readGuestImage(dir: string): GuestImage {
  const file = join(dir, 'manifest.json');
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`guest image ${dir}: cannot read manifest.json: ${(err as Error).message}`);
  }
  const m = raw as Partial<Record<'key' | 'kernel' | 'initrd' | 'kernelVersion', unknown>> & { modules?: unknown };
  const str = (name: 'key' | 'kernel' | 'initrd' | 'kernelVersion'): string => {
    const value = m[name];
    if (typeof value !== 'string' || value === '') throw new Error(`guest image ${file}: "${name}" is missing`);
    return value;
  };
  const modules = m.modules;
  if (!Array.isArray(modules) || !modules.every((x): x is string => typeof x === 'string')) {
    throw new Error(`guest image ${file}: "modules" is not a list of paths`);
  }
  const image: GuestImage = {
    dir,
    key: str('key'),
    kernel: join(dir, str('kernel')),
    initrd: join(dir, str('initrd')),
    kernelVersion: str('kernelVersion'),
    modules,
  };
  for (const path of [image.kernel, image.initrd]) {
    if (!existsSync(path)) throw new Error(`guest image ${dir}: ${path} is missing`);
  }
  return image;
}

const building = new Map<string, Promise<GuestImage>>();

/**
 * Ensures the cached guest image exists and returns its paths. The first call in a process runs the build
 * script, which answers from the cache in about a second (it asks apt which kernel is current) or builds
 * in about ten; later calls share that result.
 */
export function guestImage(opts: { cacheDir?: string } = {}): Promise<GuestImage> {
  const cacheKey = opts.cacheDir ?? '';
  let image = building.get(cacheKey);
  if (image === undefined) {
    image = runBuildScript(opts.cacheDir);
    building.set(cacheKey, image);
    // A failed build is not remembered, so a later test can try again.
    image.catch(() => building.delete(cacheKey));
  }
  return image;
}

function runBuildScript(cacheDir: string | undefined): Promise<GuestImage> {
  const script = join(repoRoot(), 'scripts', 'build-guest-image.sh');
  const env = cacheDir === undefined ? process.env : { ...process.env, VHOSTD_CACHE: cacheDir };
  return new Promise((resolve, reject) => {
    execFile('bash', [script], { env, maxBuffer: 16 << 20, timeout: 10 * 60_000 }, (err, stdout, stderr) => {
      if (err) {
        reject(new Error(`${script} failed (${err.message.split('\n')[0]}):\n${stderr.trim()}`));
        return;
      }
      const dir = stdout.trim().split('\n').pop();
      if (dir === undefined || dir === '') {
        reject(new Error(`${script} printed no image directory:\n${stderr.trim()}`));
        return;
      }
      try {
        resolve(readGuestImage(dir));
      } catch (e) {
        reject(e as Error);
      }
    });
  });
}

/**
 * Encodes files as one newc ("070701") cpio archive, with an entry for each parent directory first.
 * Format: Linux Documentation/driver-api/early-userspace/buffer-format.rst. A 110-byte ASCII header of
 * 13 eight-digit hex fields (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
 * rdevminor, namesize, check), the NUL-terminated name padded to a multiple of 4, the data padded to a
 * multiple of 4; a "TRAILER!!!" entry ends the archive.
 */
export function newcArchive(files: readonly GuestFile[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  const entry = (name: string, mode: number, data: Buffer): void => {
    const nameBytes = Buffer.from(`${name}\0`);
    const fields = [ino++, mode, 0, 0, (mode & 0o170000) === 0o040000 ? 2 : 1, 0, data.length, 0, 0, 0, 0, nameBytes.length, 0];
    const header = `070701${fields.map((f) => f.toString(16).padStart(8, '0')).join('')}`;
    parts.push(Buffer.from(header, 'ascii'), nameBytes, pad4(header.length + nameBytes.length), data, pad4(data.length));
  };
  const dirs = new Set<string>();
  for (const file of files) {
    if (!posix.isAbsolute(file.path) || file.path.endsWith('/') || posix.normalize(file.path) !== file.path) {
      throw new Error(`guest file path must be absolute and normalized: ${JSON.stringify(file.path)}`);
    }
    const name = file.path.slice(1);
    const parents: string[] = [];
    for (let d = posix.dirname(name); d !== '.'; d = posix.dirname(d)) parents.unshift(d);
    for (const d of parents) {
      if (!dirs.has(d)) {
        dirs.add(d);
        entry(d, 0o040755, Buffer.alloc(0));
      }
    }
    entry(name, 0o100000 | (file.mode ?? 0o644), Buffer.from(file.data));
  }
  entry('TRAILER!!!', 0, Buffer.alloc(0));
  return Buffer.concat(parts);
}

function pad4(n: number): Buffer {
  return Buffer.alloc((4 - (n % 4)) % 4);
}

/**
 * Writes `dest`: the image's base initramfs followed by one gzip'ed archive of `files`. Compressing the
 * extra archive means it needs no alignment after the base one.
 */
export async function writeTestInitrd(image: GuestImage, dest: string, files: readonly GuestFile[]): Promise<void> {
  await copyFile(image.initrd, dest);
  await appendFile(dest, gzipSync(newcArchive(files)));
}
