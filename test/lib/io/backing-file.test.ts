import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import test from 'ava';

import { ConfigError } from '../../../lib/errors';
import { nullBackingFile, openBackingFile, ZERO_BUFFER_SIZE } from '../../../lib/io/backing-file';
import { native } from '../../../native';
import { fdCount } from '../../native/helpers';

function tempFile(size: number): string {
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-backing-')), 'disk.img');
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, size);
  return file;
}

/** The open flags of `fd` (octal `flags:` line of /proc/self/fdinfo). */
function openFlags(fd: number): number {
  const line = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8').split('\n').find((l) => l.startsWith('flags:'))!;
  return parseInt(line.split(/\s+/)[1]!, 8);
}

test.serial('read-write: a second O_DSYNC descriptor for write-through, the size, and close releases both', (t) => {
  const before = fdCount();
  const file = tempFile(1 << 20);
  const backing = openBackingFile({ path: file, readOnly: false, direct: false });
  t.is(fdCount(), before + 2);
  t.not(backing.syncFd, backing.fd);
  t.not(openFlags(backing.syncFd) & fs.constants.O_DSYNC, 0);
  t.is(openFlags(backing.fd) & fs.constants.O_DSYNC, 0);
  t.is(backing.size(), 1 << 20);
  t.is(backing.nativeBlockSize, 0, 'a regular file');
  fs.truncateSync(file, 2 << 20);
  t.is(backing.size(), 2 << 20, 'the size is read again');
  backing.close();
  t.is(fdCount(), before);
});

test.serial('read-only: one descriptor, opened read-only', (t) => {
  const before = fdCount();
  const backing = openBackingFile({ path: tempFile(4096), readOnly: true, direct: false });
  t.is(backing.syncFd, backing.fd);
  t.is(openFlags(backing.fd) & (fs.constants.O_WRONLY | fs.constants.O_RDWR), fs.constants.O_RDONLY);
  backing.close();
  t.is(fdCount(), before);
});

test.serial('the zero buffer reads as zeroes and is released with the file', async (t) => {
  const before = fdCount();
  const backing = openBackingFile({ path: tempFile(4096), readOnly: false, direct: false });
  const zeroes = backing.zeroes();
  t.is(zeroes.length, ZERO_BUFFER_SIZE);
  t.is(backing.zeroes().address, zeroes.address, 'created once');
  // Write the buffer's first page to the file through the thread pool: zeroes land there.
  fs.writeFileSync(backing.path, Buffer.alloc(4096, 0xff));
  const written = await new Promise<number>((resolve) =>
    native.ioAsync(true, backing.fd, 0, Float64Array.of(zeroes.address), Float64Array.of(4096), resolve),
  );
  t.is(written, 4096);
  t.true(fs.readFileSync(backing.path).every((b) => b === 0));
  backing.close();
  t.is(fdCount(), before);
});

test('operator mistakes are one ConfigError naming the option', (t) => {
  const missing = t.throws(() => openBackingFile({ path: '/nonexistent/disk.img', readOnly: false, direct: false }), { instanceOf: ConfigError });
  t.is(missing?.code, 'CONFIG_INVALID');
  t.true(missing!.message.startsWith('--file /nonexistent/disk.img:'));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-backing-'));
  const notFile = t.throws(() => openBackingFile({ path: dir, readOnly: true, direct: false, names: { file: '--lun', readOnly: '--ro', direct: '--direct' } }), {
    instanceOf: ConfigError,
  });
  t.is(notFile?.code, 'CONFIG_INVALID');
  t.true(notFile!.message.startsWith(`--lun ${dir}:`), 'the device names its own option');
});

test.serial('a descriptor is not leaked when the file is refused after open', (t) => {
  const before = fdCount();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vhostd-backing-'));
  t.throws(() => openBackingFile({ path: dir, readOnly: true, direct: false }), { instanceOf: ConfigError });
  t.is(fdCount(), before);
});

test('the null backing file has a size and no descriptor', (t) => {
  const backing = nullBackingFile(1 << 30);
  t.is(backing.size(), 1 << 30);
  t.is(backing.fd, -1);
  t.is(backing.zeroes().length, ZERO_BUFFER_SIZE);
  backing.close();
});
