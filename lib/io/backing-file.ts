/**
 * A file that stores what a device serves (a disk image, a LUN): a regular file or a block device,
 * opened once. Two descriptors: one for reads and writeback-mode writes, one opened O_DSYNC for
 * write-through (each write is stable when it completes), so a device that switches its cache mode at
 * run time only changes which fd a write goes to.
 *
 * Ownership: a BackingFile owns its fds and its zero buffer, and releases them in `close`.
 */
import fs from 'node:fs';

import { native, type Mapping } from '../../native/index';
import { ConfigError } from '../errors';
import type { FileStorage } from './engine';

/** f_type of the file systems whose files live in memory (linux/magic.h): I/O on them never waits for a disk. */
export const MEMORY_FS_MAGIC = {
  TMPFS: 0x01021994,
  RAMFS: 0x858458f6,
  HUGETLBFS: 0x958458f6,
} as const;

/** What a device needs from its backing file. */
export interface BackingFile {
  readonly path: string;
  /** Reads and writeback-mode writes; -1 for the null backend. */
  readonly fd: number;
  /** Write-through writes (O_DSYNC); equal to `fd` when read-only. */
  readonly syncFd: number;
  /** Logical block size of the underlying block device, or 0 for a regular file. */
  readonly nativeBlockSize: number;
  /**
   * Where the data lives: 'memory' (a regular file on tmpfs, ramfs or hugetlbfs), 'page-cache'
   * (buffered), 'direct' (O_DIRECT), 'none' (the null backend). Decides what runs inline (engine.ts
   * inlineFlags).
   */
  readonly storage: FileStorage;
  /** Current size in bytes (read again on every call: the file may have been resized). */
  size(): number;
  /** Host address and length of a buffer of zeroes (zero writes), created on first use. */
  zeroes(): { address: number; length: number };
  close(): void;
}

/** The command-line options an error message names (a device passes its own spelling). */
export interface BackingFileOptionNames {
  /** The option naming the file, e.g. `--file`. */
  file: string;
  readOnly: string;
  direct: string;
}

export interface OpenBackingFileOptions {
  path: string;
  readOnly: boolean;
  /** O_DIRECT: bypass the page cache (needs aligned buffers, offsets and lengths). */
  direct: boolean;
  /** Defaults to `--file`, `--read-only`, `--direct`. */
  names?: BackingFileOptionNames;
}

/** Size of the zero buffer: 1 MiB × IOV_MAX iovecs covers 1 GiB of zeroes in one writev. */
export const ZERO_BUFFER_SIZE = 1 << 20;

const DEFAULT_NAMES: BackingFileOptionNames = { file: '--file', readOnly: '--read-only', direct: '--direct' };

/** A read-only mapping of zeroes, mapped on first use. */
class ZeroBuffer {
  private mapping: Mapping | null = null;
  private fd = -1;

  get(): { address: number; length: number } {
    if (this.mapping === null) {
      // A memfd nobody writes: its pages read as zeroes, and O_DIRECT accepts its page alignment.
      this.fd = native.memfdCreate('vhostd-zeroes', ZERO_BUFFER_SIZE);
      this.mapping = native.mmap(this.fd, ZERO_BUFFER_SIZE, 0, false);
    }
    return { address: this.mapping.address, length: ZERO_BUFFER_SIZE };
  }

  close(): void {
    if (this.mapping !== null) native.munmap(this.mapping.id);
    if (this.fd >= 0) native.close(this.fd);
    this.mapping = null;
    this.fd = -1;
  }
}

class OpenFile implements BackingFile {
  private readonly zero = new ZeroBuffer();

  constructor(
    readonly path: string,
    readonly fd: number,
    readonly syncFd: number,
    readonly nativeBlockSize: number,
    readonly storage: FileStorage,
  ) {}

  size(): number {
    return native.deviceSize(this.fd);
  }

  zeroes(): { address: number; length: number } {
    return this.zero.get();
  }

  close(): void {
    this.zero.close();
    if (this.syncFd !== this.fd) fs.closeSync(this.syncFd);
    fs.closeSync(this.fd);
  }
}

/**
 * Open a backing file. Operator mistakes (missing file, no permission, O_DIRECT refused, not a file)
 * become a one-line ConfigError (CONFIG_INVALID) naming the option.
 */
export function openBackingFile(options: OpenBackingFileOptions): BackingFile {
  const { path, readOnly, direct } = options;
  const names = options.names ?? DEFAULT_NAMES;
  const c = fs.constants;
  const base = (readOnly ? c.O_RDONLY : c.O_RDWR) | (direct ? c.O_DIRECT : 0); // libuv adds O_CLOEXEC itself
  let fd: number;
  try {
    fd = fs.openSync(path, base);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    const why =
      e.code === 'ENOENT' ? 'no such file' :
      e.code === 'EACCES' || e.code === 'EPERM' ? 'permission denied' + (readOnly ? '' : ` (try ${names.readOnly}?)`) :
      e.code === 'EINVAL' && direct ? `the file system does not support O_DIRECT (drop ${names.direct})` :
      e.code === 'EROFS' ? `read-only file system (use ${names.readOnly})` :
      e.code ?? e.message;
    throw new ConfigError('CONFIG_INVALID', `${names.file} ${path}: ${why}`);
  }
  try {
    const st = fs.fstatSync(fd);
    if (!st.isFile() && !st.isBlockDevice()) throw new ConfigError('CONFIG_INVALID', `${names.file} ${path}: not a regular file or block device`);
    const syncFd = readOnly ? fd : fs.openSync(path, base | c.O_DSYNC);
    return new OpenFile(path, fd, syncFd, native.logicalBlockSize(fd), fileStorage(fd, st.isFile(), direct));
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

/**
 * Where the data of open file `fd` lives. Checked for regular files only: a block device node's own
 * file system is /dev's (devtmpfs, which reports TMPFS_MAGIC), not where its blocks are.
 */
function fileStorage(fd: number, regular: boolean, direct: boolean): FileStorage {
  if (regular) {
    const type = native.fstatfs(fd);
    if (type === MEMORY_FS_MAGIC.TMPFS || type === MEMORY_FS_MAGIC.RAMFS || type === MEMORY_FS_MAGIC.HUGETLBFS) return 'memory';
  }
  return direct ? 'direct' : 'page-cache';
}

/** The null backend's file: a size and no file (pair it with the NullExecutor). */
export function nullBackingFile(size: number): BackingFile {
  const zero = new ZeroBuffer();
  return {
    path: 'null',
    fd: -1,
    syncFd: -1,
    nativeBlockSize: 0,
    storage: 'none',
    size: () => size,
    zeroes: () => zero.get(),
    close: () => zero.close(),
  };
}
