/**
 * The host side of the disk: a raw image file or a block device, opened once. Two descriptors: one
 * for reads and writeback-mode writes, one opened O_DSYNC for writethrough mode (virtio 1.2 §5.2.6.2:
 * with `writeback` 0 a write "becomes stable once it is completed"), so switching the cache mode at run
 * time (CONFIG_WCE) only changes which fd a write goes to.
 *
 * Ownership: a BlockImage owns its fds and the zero buffer mapping, and releases them in `close`.
 */
import fs from 'node:fs';

import { native, type Mapping } from '../../native/index';
import { ConfigError } from '../../lib/errors';

/** What the device needs from its disk. */
export interface BlockImage {
  readonly path: string;
  /** Reads and writeback-mode writes; -1 for the null backend. */
  readonly fd: number;
  /** Writethrough-mode writes (O_DSYNC); equal to `fd` when read-only. */
  readonly syncFd: number;
  /** Logical block size of the underlying block device, or 0 for a regular file. */
  readonly nativeBlockSize: number;
  /** Current size in bytes (re-read on resize). */
  size(): number;
  /** Host address and length of a buffer of zeroes (write-zeroes fallback), created on first use. */
  zeroes(): { address: number; length: number };
  close(): void;
}

export interface OpenImageOptions {
  path: string;
  readOnly: boolean;
  direct: boolean;
}

/** Size of the zero buffer: 1 MiB × IOV_MAX iovecs covers a 1 GiB write-zeroes segment in one writev. */
export const ZERO_BUFFER_SIZE = 1 << 20;

class FileImage implements BlockImage {
  private zeroMapping: Mapping | null = null;
  private zeroFd = -1;

  constructor(
    readonly path: string,
    readonly fd: number,
    readonly syncFd: number,
    readonly nativeBlockSize: number,
  ) {}

  size(): number {
    return native.deviceSize(this.fd);
  }

  zeroes(): { address: number; length: number } {
    if (this.zeroMapping === null) {
      // A memfd nobody writes: its pages read as zeroes, and O_DIRECT accepts its page alignment.
      this.zeroFd = native.memfdCreate('vhost-user-blk-zeroes', ZERO_BUFFER_SIZE);
      this.zeroMapping = native.mmap(this.zeroFd, ZERO_BUFFER_SIZE, 0, false);
    }
    return { address: this.zeroMapping.address, length: ZERO_BUFFER_SIZE };
  }

  close(): void {
    if (this.zeroMapping !== null) native.munmap(this.zeroMapping.id);
    if (this.zeroFd >= 0) native.close(this.zeroFd);
    if (this.syncFd !== this.fd) fs.closeSync(this.syncFd);
    fs.closeSync(this.fd);
  }
}

/**
 * Open the image. Operator mistakes (missing file, no permission, O_DIRECT refused) become a
 * one-line ConfigError.
 */
export function openImage(options: OpenImageOptions): BlockImage {
  const { path, readOnly, direct } = options;
  const c = fs.constants;
  const base = (readOnly ? c.O_RDONLY : c.O_RDWR) | (direct ? c.O_DIRECT : 0); // libuv adds O_CLOEXEC itself
  let fd: number;
  try {
    fd = fs.openSync(path, base);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    const why =
      e.code === 'ENOENT' ? 'no such file' :
      e.code === 'EACCES' || e.code === 'EPERM' ? 'permission denied' + (readOnly ? '' : ' (try --read-only?)') :
      e.code === 'EINVAL' && direct ? 'the file system does not support O_DIRECT (drop --direct)' :
      e.code === 'EROFS' ? 'read-only file system (use --read-only)' :
      e.code ?? e.message;
    throw new ConfigError('CONFIG_INVALID', `--file ${path}: ${why}`);
  }
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile() && !st.isBlockDevice()) throw new ConfigError('CONFIG_INVALID', `--file ${path}: not a regular file or block device`);
    const syncFd = readOnly ? fd : fs.openSync(path, base | c.O_DSYNC);
    return new FileImage(path, fd, syncFd, native.logicalBlockSize(fd));
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/** The null backend's "image": a size and no file. */
export function nullImage(size: number): BlockImage {
  let zero: Mapping | null = null;
  let zeroFd = -1;
  return {
    path: 'null',
    fd: -1,
    syncFd: -1,
    nativeBlockSize: 0,
    size: () => size,
    zeroes() {
      if (zero === null) {
        zeroFd = native.memfdCreate('vhost-user-blk-zeroes', ZERO_BUFFER_SIZE);
        zero = native.mmap(zeroFd, ZERO_BUFFER_SIZE, 0, false);
      }
      return { address: zero.address, length: ZERO_BUFFER_SIZE };
    },
    close() {
      if (zero !== null) native.munmap(zero.id);
      if (zeroFd >= 0) native.close(zeroFd);
    },
  };
}
