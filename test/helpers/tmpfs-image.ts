/**
 * A sparse image file on tmpfs (/dev/shm), which openBackingFile reports as 'memory' storage: the
 * backing file of the inline I/O tests.
 */
import fs from 'node:fs';
import path from 'node:path';

import type { ExecutionContext } from 'ava';

/** A zeroed image of `size` bytes in /dev/shm, named after `name` and the process, removed at teardown. */
export function tmpfsImage(t: ExecutionContext, name: string, size: number): string {
  const file = path.join('/dev/shm', `vhostd-${name}-${process.pid}.img`);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  t.teardown(() => fs.rmSync(file, { force: true }));
  return file;
}
