/**
 * Where the entropy comes from. The default is the kernel's getrandom (Node's randomFillSync, drawn
 * 64 KiB at a time; see GetrandomSource). `--source PATH` reads a file or device such as /dev/hwrng on
 * the libuv thread pool, so a slow source never blocks the event loop: requests wait instead.
 */
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';

import { ConfigError } from '../../lib/errors';

export interface EntropySource {
  /** Human-readable name for logs. */
  readonly name: string;
  /** True when `fillSync` may be used (no waiting possible). */
  readonly synchronous: boolean;
  /** Fill `view[offset .. offset+length)` now. Only for synchronous sources. */
  fillSync(view: Uint8Array, offset: number, length: number): void;
  /** Read up to `length` bytes into `view[offset..]`; calls back with the count (0 = nothing yet) or an error. */
  fill(view: Uint8Array, offset: number, length: number, done: (err: Error | null, bytes: number) => void): void;
  close(): void;
}

/**
 * Draw this many bytes from the kernel at a time. Every randomFillSync call allocates a native job
 * (about 260 bytes of malloc) that lives until V8 collects its JavaScript wrapper; one call per
 * request, at 100k small requests a second, interleaved those with each connection's long-lived
 * native allocations and fragmented the malloc heap: RSS grew with every connection that did I/O.
 */
const POOL_BYTES = 64 * 1024;

/**
 * getrandom(2) through Node's crypto: never blocks once the kernel's pool is initialized. Small
 * requests are served from a pool refilled POOL_BYTES at a time (each byte handed out once); larger
 * ones are filled straight into guest memory.
 */
export class GetrandomSource implements EntropySource {
  readonly name = 'getrandom';
  readonly synchronous = true;
  private readonly pool = new Uint8Array(POOL_BYTES);
  /** Bytes of `pool` already handed out. */
  private used = POOL_BYTES;

  fillSync(view: Uint8Array, offset: number, length: number): void {
    if (length >= POOL_BYTES) {
      randomFillSync(view, offset, length);
      return;
    }
    let done = 0;
    while (done < length) {
      if (this.used === POOL_BYTES) {
        randomFillSync(this.pool);
        this.used = 0;
      }
      const n = Math.min(length - done, POOL_BYTES - this.used);
      view.set(this.pool.subarray(this.used, this.used + n), offset + done);
      this.used += n;
      done += n;
    }
  }

  fill(view: Uint8Array, offset: number, length: number, done: (err: Error | null, bytes: number) => void): void {
    this.fillSync(view, offset, length);
    done(null, length);
  }

  close(): void {}
}

/** A file or character device, read sequentially (e.g. /dev/hwrng), from a path or an open fd. */
export class FileSource implements EntropySource {
  readonly synchronous = false;
  private closed = false;

  constructor(
    readonly name: string,
    private readonly fd: number,
  ) {}

  /** Open `path` for reading; a clear ConfigError when that is impossible. */
  static open(path: string): FileSource {
    try {
      // libuv opens with O_CLOEXEC.
      return new FileSource(path, fs.openSync(path, fs.constants.O_RDONLY));
    } catch (err) {
      throw new ConfigError('CONFIG_INVALID', `--source ${path}: ${(err as Error).message}`);
    }
  }

  fillSync(): void {
    throw new Error('FileSource is asynchronous');
  }

  fill(view: Uint8Array, offset: number, length: number, done: (err: Error | null, bytes: number) => void): void {
    fs.read(this.fd, view, offset, length, null, (err, bytes) => done(err, bytes));
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}
