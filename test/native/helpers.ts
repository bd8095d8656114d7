import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { native, POLL_READABLE, type IoBatch, type IoUring, type NativeError } from '../../native';

/** Number of open descriptors of this process. */
export function fdCount(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/** Number of mappings of this process whose path contains `name` (memfds show as `/memfd:<name>`). */
export function mappingCount(name: string): number {
  return fs
    .readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((line) => line.includes(name)).length;
}

/** A fresh temporary directory. */
export function tempDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-native-'));
}

/** Runs `fn` and returns the NativeError it throws. */
export function nativeError(fn: () => unknown): NativeError {
  try {
    fn();
  } catch (err) {
    return err as NativeError;
  }
  throw new Error('expected a NativeError');
}

/** An IoBatch with room for `requests` requests and `iovecs` iovecs. */
export function makeBatch(requests: number, iovecs: number): IoBatch {
  return {
    opcode: new Uint8Array(requests),
    fd: new Int32Array(requests),
    offset: new Float64Array(requests),
    arg: new Uint32Array(requests),
    iovStart: new Uint32Array(requests),
    iovCount: new Uint32Array(requests),
    userData: new Uint32Array(requests),
    iovBase: new Float64Array(iovecs),
    iovLen: new Float64Array(iovecs),
  };
}

/** The arrays of an IoBatch with one entry per request (the batch holds as many as the shortest). */
export const PER_REQUEST_ARRAYS = ['opcode', 'fd', 'offset', 'arg', 'iovStart', 'iovCount', 'userData'] as const;

/** A copy of `batch` whose per-request array `key` holds only its first `length` entries. */
export function shortened(batch: IoBatch, key: (typeof PER_REQUEST_ARRAYS)[number], length: number): IoBatch {
  return { ...batch, [key]: batch[key].slice(0, length) };
}

/**
 * Collects `count` completions of `ring`, waiting on its eventfd with `watch`.
 * Resolves with a map from userData to result.
 */
export function collect(ring: IoUring, count: number, timeoutMs = 5000): Promise<Map<number, number>> {
  const results = new Map<number, number>();
  const userData = new Uint32Array(16);
  const result = new Int32Array(16);
  return new Promise((resolve, reject) => {
    const drain = (): boolean => {
      for (;;) {
        const n = ring.reap(userData, result);
        for (let i = 0; i < n; i++) results.set(userData[i]!, result[i]!);
        if (n < userData.length) break;
      }
      return results.size >= count;
    };
    const finish = (): void => {
      clearTimeout(timer);
      watcher.stop();
      resolve(results);
    };
    const watcher = native.watch(ring.eventFd, POLL_READABLE, () => {
      native.eventfdRead(ring.eventFd);
      if (drain()) finish();
    });
    const timer = setTimeout(() => {
      watcher.stop();
      reject(new Error(`only ${results.size} of ${count} completions`));
    }, timeoutMs);
    // Completions may already be there (the eventfd was signalled before the watch started: the
    // watch still fires, but draining now is harmless).
    if (drain()) finish();
  });
}

/** Runs a command without blocking the event loop; resolves with its exit status and output. */
export function run(command: string, args: string[]): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (chunk: string) => (stdout += chunk));
    child.stderr.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
    const timer = setTimeout(() => child.kill('SIGKILL'), 10000);
    child.on('close', (status) => {
      clearTimeout(timer);
      resolve({ status, stdout, stderr });
    });
  });
}

/** A memfd mapped read-write: `view` is its bytes, `address` their host address (for iovecs). */
export function mappedMemfd(size: number, name = 'vhostd-test') {
  const fd = native.memfdCreate(name, size);
  const m = native.mmap(fd, size, 0, true);
  return {
    view: m.views[0]!,
    address: m.address,
    free() {
      native.munmap(m.id);
      native.close(fd);
    },
  };
}

/** A sparse file of `size` bytes in a fresh temp directory, opened read-write. */
export function tempFile(size: number): { fd: number; file: string } {
  const file = path.join(tempDir(), 'disk.img');
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, size);
  return { fd: fs.openSync(file, 'r+'), file };
}
