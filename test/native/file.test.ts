import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import test from 'ava';

import { native } from '../../native';
import { nativeError, run, tempDir } from './helpers';

const PAGE = 4096;

function ioAsync(write: boolean, fd: number, offset: number, iovecs: [number, number][]): Promise<number> {
  return new Promise((resolve) => {
    native.ioAsync(
      write,
      fd,
      offset,
      Float64Array.from(iovecs.map(([base]) => base)),
      Float64Array.from(iovecs.map(([, len]) => len)),
      resolve,
    );
  });
}

function setup(fileSize: number) {
  const memfd = native.memfdCreate('io-async', 8 * PAGE);
  const m = native.mmap(memfd, 8 * PAGE, 0, true);
  const file = path.join(tempDir(), 'disk.img');
  fs.writeFileSync(file, Buffer.alloc(fileSize));
  const fd = fs.openSync(file, 'r+');
  return {
    view: m.views[0]!,
    address: m.address,
    fd,
    file,
    free() {
      fs.closeSync(fd);
      native.munmap(m.id);
      native.close(memfd);
    },
  };
}

test('ioAsync writes a file from mapped memory and reads it back into another place', async (t) => {
  const s = setup(0);
  for (let i = 0; i < 2 * PAGE; i++) s.view[i] = (i * 13) & 0xff;
  const written = await ioAsync(true, s.fd, PAGE, [
    [s.address, PAGE],
    [s.address + PAGE, PAGE],
  ]);
  t.is(written, 2 * PAGE);
  t.true(fs.readFileSync(s.file).subarray(PAGE).equals(Buffer.from(s.view.subarray(0, 2 * PAGE))));

  const read = await ioAsync(false, s.fd, PAGE, [[s.address + 4 * PAGE, 2 * PAGE]]);
  t.is(read, 2 * PAGE);
  t.deepEqual(s.view.subarray(4 * PAGE, 6 * PAGE), s.view.subarray(0, 2 * PAGE));
  t.is(await ioAsync(false, s.fd, 100 * PAGE, [[s.address, PAGE]]), 0, 'past the end');
  s.free();
});

test('ioAsync copies the iovecs at call time', async (t) => {
  const s = setup(0);
  s.view.fill(0x11, 0, PAGE);
  const base = Float64Array.of(s.address);
  const len = Float64Array.of(PAGE);
  const done = new Promise<number>((resolve) => native.ioAsync(true, s.fd, 0, base, len, resolve));
  base[0] = 0;
  len[0] = 1;
  t.is(await done, PAGE);
  t.is(fs.readFileSync(s.file).length, PAGE);
  s.free();
});

test('ioAsync reports errors as -errno', async (t) => {
  const s = setup(PAGE);
  t.is(await ioAsync(false, 100000, 0, [[s.address, PAGE]]), -9); // EBADF
  t.is(await ioAsync(true, s.fd, 0, [[16, PAGE]]), -14); // EFAULT
  t.throws(() => native.ioAsync(true, s.fd, 0, new Float64Array(1), new Float64Array(2), () => undefined), {
    instanceOf: RangeError,
  });
  t.throws(() => native.ioAsync(true, s.fd, 0, new Float64Array(1), new Float64Array(1), 1 as never), {
    instanceOf: TypeError,
  });
  t.throws(() => native.ioAsync(true, s.fd, -2, new Float64Array(0), new Float64Array(0), () => undefined), {
    instanceOf: RangeError,
  }, 'offsets below -1 (the current position) are refused');
  s.free();
});

test('fallocate punches holes and reports errors', (t) => {
  const s = setup(4 * PAGE);
  fs.writeSync(s.fd, Buffer.alloc(4 * PAGE, 0xcc), 0, 4 * PAGE, 0);
  native.fallocate(s.fd, 3, PAGE, PAGE);
  const data = fs.readFileSync(s.file);
  t.is(data.length, 4 * PAGE);
  t.true(data.subarray(PAGE, 2 * PAGE).every((b) => b === 0));
  t.is(data[0], 0xcc);
  t.is(data[2 * PAGE], 0xcc);
  native.fallocate(s.fd, 0, 0, 8 * PAGE);
  t.is(native.deviceSize(s.fd), 8 * PAGE, 'mode 0 extends the file');
  const err = nativeError(() => native.fallocate(s.fd, 2, 0, PAGE));
  t.is(err.code, 'EOPNOTSUPP');
  t.is(err.syscall, 'fallocate');
  s.free();
});

test('deviceSize and logicalBlockSize of a regular file', (t) => {
  const s = setup(12345);
  t.is(native.deviceSize(s.fd), 12345);
  t.is(native.logicalBlockSize(s.fd), 0);
  t.is(nativeError(() => native.deviceSize(100000)).code, 'EBADF');
  s.free();
});

/** Why no loop device can be set up here, or undefined when one can (root, the loop driver, losetup). */
function loopDeviceMissingReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'loop devices need root';
  if (!fs.existsSync('/dev/loop-control')) return 'no loop driver (/dev/loop-control)';
  if (spawnSync('losetup', ['--version']).status !== 0) return 'no losetup (package mount; scripts/install-deps.sh)';
  return undefined;
}

const noLoopDevice = loopDeviceMissingReason();
(noLoopDevice === undefined ? test : test.skip)(
  `deviceSize and logicalBlockSize of a block device (a loop device with 4096-byte sectors)${noLoopDevice === undefined ? '' : ` [skipped: ${noLoopDevice}]`}`,
  (t) => {
    const file = path.join(tempDir(), 'loop.img');
    fs.writeFileSync(file, Buffer.alloc(0));
    fs.truncateSync(file, 1 << 20);
    const dev = execFileSync('losetup', ['--find', '--show', '--sector-size', '4096', file], { encoding: 'utf8' }).trim();
    try {
      const fd = fs.openSync(dev, 'r');
      try {
        t.is(native.deviceSize(fd), 1 << 20);
        t.is(native.logicalBlockSize(fd), 4096);
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      execFileSync('losetup', ['--detach', dev]);
    }
  },
);

test('an exception thrown by the ioAsync callback surfaces as an uncaught exception', async (t) => {
  const index = path.resolve(__dirname, '..', '..', 'native', 'index.js');
  const script = `
    const { native } = require(${JSON.stringify(index)});
    process.on('uncaughtException', (err) => console.log('caught: ' + err.message));
    native.ioAsync(false, 0, 0, new Float64Array(0), new Float64Array(0), () => { throw new Error('io boom'); });
  `;
  const out = await run(process.execPath, ['-e', script]);
  t.is(out.status, 0, out.stderr);
  t.is(out.stdout.trim(), 'caught: io boom');
});
