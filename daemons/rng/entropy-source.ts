/**
 * Where the entropy comes from. The default is the kernel's getrandom, straight into guest memory.
 * `--source PATH` reads a file or device such as /dev/hwrng on the libuv thread pool, so a slow source
 * never blocks the event loop: requests wait instead.
 */
import fs from 'node:fs';

import { ConfigError } from '../../lib/errors';
import { native } from '../../native';

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
 * getrandom(2) straight into guest memory (native, one syscall per request, no copy). Node's
 * randomFillSync was used here before: each call allocates a native job (about 260 bytes of malloc)
 * that lives until V8 collects its wrapper, and at 100k small requests a second those interleaved with
 * each connection's long-lived native allocations and fragmented the malloc heap, so RSS grew with
 * every connection that did I/O (test/daemons/churn.test.ts).
 */
export class GetrandomSource implements EntropySource {
  readonly name = 'getrandom';
  readonly synchronous = true;

  fillSync(view: Uint8Array, offset: number, length: number): void {
    // One call fills any guest buffer (the kernel shortens only requests of 32 MiB and more).
    for (let done = 0; done < length; ) done += native.getrandom(view, offset + done, length - done);
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
